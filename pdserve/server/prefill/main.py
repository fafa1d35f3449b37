"""pdserve-prefill's process: its flags, the worker and the service."""

from __future__ import annotations

import argparse

from pdserve.kv_transfer.grpc_stream import SERVICE_NAME, add_prefill_service
from pdserve.kv_transfer.protocol import MAX_CHUNK_BYTES
from pdserve.server.prefill.servicer import PrefillServicer
from pdserve.server.worker import add_worker_args, run_worker
from pdserve.v1 import common_pb2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve-prefill", description="pdserve prefill worker")
    add_worker_args(p, default_kv_gib=1.0)
    p.add_argument("--kv-chunk-bytes", type=int, default=MAX_CHUNK_BYTES,
                   help="most K plus V bytes per KV chunk message (a decode worker may ask for fewer)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.kv_chunk_bytes < 1:
        raise SystemExit("pdserve-prefill: error: --kv-chunk-bytes: must be >= 1")
    run_worker(args, common_pb2.WORKER_ROLE_PREFILL, SERVICE_NAME, lambda worker, server: add_prefill_service(
        PrefillServicer(worker, max_chunk_bytes=args.kv_chunk_bytes), server))

