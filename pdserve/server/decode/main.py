"""pdserve-decode's process: its flags, the worker and the service."""

from __future__ import annotations

import argparse

from pdserve.server import streams
from pdserve.server.decode.servicer import DecodeOptions, DecodeServicer
from pdserve.server.worker import Worker, add_worker_args, run_worker
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve-decode", description="pdserve decode worker")
    add_worker_args(p, default_kv_gib=2.0)
    p.add_argument("--kv-stall-timeout-s", type=float, default=5.0)
    p.add_argument("--local-prefill-below", type=int, default=0,
                   help="prefill prompts shorter than this many tokens locally")
    streams.add_args(p)
    p.add_argument("--max-output-backlog", type=int, default=1024,
                   help="outputs of one request made but not yet sent; beyond it the request is aborted")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    options = DecodeOptions(args.kv_stall_timeout_s, args.local_prefill_below, args.slow_reader_timeout_s,
                            args.max_output_backlog)

    def add(worker: Worker, server) -> None:
        servicer = DecodeServicer(worker, options)
        decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
        worker.on_grace_end.append(servicer.evict_all)

    run_worker(args, common_pb2.WORKER_ROLE_DECODE, decode_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name,
               add)

