"""The daemons' side of observability: set-up, the server span of an RPC, status names.

Every daemon calls `start(role, metrics_port)` once: tracing as the OTEL_*
environment asks (off unless OTEL_TRACES_EXPORTER or PDSERVE_TRACE_FILE is set) and
its Metrics, served on /metrics when a port is given. Each RPC handler runs in
`server_span(...)`: the caller's W3C trace context, read from the gRPC metadata,
is made current and the handler's span is its child.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import grpc

from pdserve.observability import tracing
from pdserve.observability.metrics import Metrics, start_metrics
from pdserve.status import status_code


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free one; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on (0.0.0.0: all)")


def start(role: str, args: argparse.Namespace) -> Metrics:
    tracing.setup_tracing(f"pdserve-{role}")
    return start_metrics(role, args.metrics_port, host=args.metrics_host)


@contextlib.contextmanager
def server_span(name: str, context: grpc.aio.ServicerContext, attributes: tracing.Attributes) -> Iterator[object]:
    """The RPC's span, child of the caller's span when its metadata carries one."""
    with tracing.attach(tracing.extract_context(context.invocation_metadata())), \
            tracing.span(name, attributes, kind=tracing.SpanKind.SERVER) as s:
        yield s


def failed(metrics: Metrics, exc: BaseException) -> None:
    """A request ends with `exc`: its span marked failed, the error counted under its gRPC status."""
    tracing.set_error(exc)
    metrics.record_request("error", status_code(exc).name)
