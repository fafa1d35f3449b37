"""pdserve-router's process: its flags, the registry and policies it serves with, the gRPC and HTTP servers."""

from __future__ import annotations

import argparse
import asyncio
import os

from pdserve.routing.admission import Admission
from pdserve.routing.placement import Placer
from pdserve.routing.registry import Registry, Role
from pdserve.server import daemon, observe, streams, tls
from pdserve.server.router import auth
from pdserve.server.router.servicer import RouterServicer
from pdserve.server.router.tool_calls import PARSERS
from pdserve.v1 import router_pb2, router_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve-router", description="pdserve router")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="expected worker heartbeat interval")
    p.add_argument("--missed-heartbeats", type=int, default=3, help="heartbeats missed before unhealthy")
    p.add_argument("--prefill-addr", nargs="*", default=[], help="static prefill workers")
    p.add_argument("--decode-addr", nargs="*", default=[], help="static decode workers")
    p.add_argument("--grace-s", type=float, default=30.0)
    p.add_argument("--max-inflight", type=int, default=256,
                   help="requests placed on workers at once; more wait in the admission queue (0: no bound)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for admission; beyond it RESOURCE_EXHAUSTED with a retry hint")
    p.add_argument("--queue-timeout-s", type=float, default=30.0,
                   help="longest wait in the admission queue before RESOURCE_EXHAUSTED")
    p.add_argument("--placement-wait-s", type=float, default=5.0,
                   help="how long a request waits for a decode worker when none is healthy for now")
    streams.add_args(p)
    p.add_argument("--prefix-affinity-slack", type=int, default=8,
                   help="how many more requests than the load-balanced choice a decode worker that holds the "
                        "prompt's prefix may run and still be chosen (-1: place by load alone)")
    p.add_argument("--migration-limit", type=int, default=3,
                   help="how often one request may move to another decode worker when its own dies")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API on this port (0: any free one; default: off)")
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--served-model-name", default="default", help="the model id the HTTP API answers to")
    p.add_argument("--tool-call-parser", choices=sorted(PARSERS), default=None,
                   help="read tool calls out of the model's output in this format, for the HTTP API's "
                        "tool_choice \"auto\" (hermes: <tool_call>{...}</tool_call>, Hermes and Qwen2.5; "
                        "default: off, and \"auto\" is refused)")
    auth.add_args(p)
    tls.add_args(p)
    observe.add_args(p)
    return p


async def serve(args: argparse.Namespace) -> None:
    registry = Registry(heartbeat_interval_s=args.heartbeat_s, missed_heartbeats=args.missed_heartbeats)
    for address in args.prefill_addr:
        registry.add_static(Role.PREFILL, address)
    for address in args.decode_addr:
        registry.add_static(Role.DECODE, address)
    tls_files = tls.TlsFiles.from_args(args)
    daemon.configure_tls(tls_files)
    metrics = observe.start("router", args)
    servicer = RouterServicer(registry, Placer(registry, affinity_slack=args.prefix_affinity_slack), metrics,
                              migration_limit=args.migration_limit,
                              admission=Admission(args.max_inflight, args.max_queue, args.queue_timeout_s),
                              slow_reader_timeout_s=args.slow_reader_timeout_s,
                              placement_wait_s=args.placement_wait_s)
    keys = auth.ApiKeys.from_args(args)
    d = daemon.Daemon("router", args.listen, args.grace_s, metrics,
                      interceptors=[auth.ApiKeyInterceptor(keys)] if keys.enabled else [])
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, d.server)
    http = None
    if args.http_port is not None:
        from pdserve.server.router.openai_http import OpenAIServer

        http = OpenAIServer(servicer, args.served_model_name, args.http_host, args.http_port, keys=keys,
                            ssl_context=tls_files.http_context() if tls_files else None,
                            tool_call_parser=args.tool_call_parser)
        await http.start()
    await d.start([router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name],
                  ready={"http_port": http.port} if http else None)
    tasks = [asyncio.create_task(servicer.membership.maintain()), asyncio.create_task(servicer.relays.watch())]
    try:
        await d.run_until_signal()
    finally:
        for task in tasks:
            task.cancel()
        if http is not None:
            await http.stop()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    daemon.setup_logging(f"router[{os.getpid()}]")
    daemon.run(lambda: serve(args))

