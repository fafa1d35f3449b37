"""Request tracing: OpenTelemetry set up from the environment, span helpers, propagation.

Configuration (read once, by `setup_tracing`, which only entry points call):
- `OTEL_TRACES_EXPORTER`: comma-separated `otlp`, `console` or `none`. Unset or
  `none` means tracing is OFF (the SDK would default to `otlp`; pdserve does not).
- `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc`
  (the Python SDK's default) or `http/protobuf`.
- `OTEL_EXPORTER_OTLP_ENDPOINT`, `_HEADERS`, `_TIMEOUT`...: read by the exporter.
- `OTEL_SERVICE_NAME`: overrides the daemon's default service name.
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`: read by the SDK's TracerProvider
  (default `parentbased_always_on`, so downstream daemons follow the router's decision).
- `OTEL_SDK_DISABLED=true`: everything off.
- `PDSERVE_TRACE_FILE=/path` (tests): each finished span is appended to the file as
  one JSON line (`span_record`), written synchronously with a single O_APPEND write,
  so several processes may share one file. Alone, it turns tracing on.

When tracing is off nothing is installed (no TracerProvider, no exporter thread,
the SDK is not even imported) and `span()` returns one shared no-op context
manager: a call site costs a function call and a flag test.

Propagation: W3C `traceparent`/`tracestate` in gRPC metadata. `inject_metadata`
depends only on the current context, not on `setup_tracing`, so the client SDK
forwards its application's trace and a daemon with tracing off still passes an
attached remote context on.

Span tree of one request (names in `SpanName`; attributes in `Attr`):
    router.request (SERVER)
      router.placement            chosen decode worker, prefill candidates, reason
      decode.request (SERVER)
        kv_transfer.receive (CLIENT)   bytes, chunks, retries (retry events)
          prefill.request (SERVER)
            preprocess                 template, tokens, cache hit
            prefill.queue, prefill.compute
            kv_transfer.send           bytes, chunks
        decode.queue, decode.generate  tokens, preemptions, finish reason
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "Attr", "JsonLinesSpanExporter", "SpanKind", "SpanName", "TracingConfig", "add_event", "attach",
    "enabled", "extract_context", "inject_metadata", "record_span", "set_attributes", "set_error",
    "setup_tracing", "shutdown_tracing", "span", "span_record", "tracer",
]

log = logging.getLogger("pdserve.tracing")

AttributeValue = str | bool | int | float | Sequence[str] | Sequence[bool] | Sequence[int] | Sequence[float]
Attributes = Mapping[str, AttributeValue | None]

EXPORTERS = ("otlp", "console")
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
_TRACE_HEADERS = ("traceparent", "tracestate")


class SpanName:
    """Span names shared by the daemons (and asserted by the e2e test)."""

    ROUTER_REQUEST = "router.request"
    PLACEMENT = "router.placement"
    DECODE_REQUEST = "decode.request"
    PREFILL_REQUEST = "prefill.request"
    PREPROCESS = "preprocess"
    PREFILL_QUEUE = "prefill.queue"
    PREFILL_COMPUTE = "prefill.compute"
    KV_SEND = "kv_transfer.send"
    KV_RECEIVE = "kv_transfer.receive"
    DECODE_QUEUE = "decode.queue"
    DECODE = "decode.generate"


class Attr:
    """Attribute keys: GenAI semantic conventions where they exist, `pdserve.*` otherwise."""

    REQUEST_ID = "pdserve.request_id"
    WORKER_ID = "pdserve.worker_id"
    OPERATION = "gen_ai.operation.name"  # "chat" or "text_completion"
    REQUEST_MODEL = "gen_ai.request.model"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    REQUEST_TOP_P = "gen_ai.request.top_p"
    REQUEST_TOP_K = "gen_ai.request.top_k"
    REQUEST_SEED = "gen_ai.request.seed"
    RESPONSE_ID = "gen_ai.response.id"
    RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"  # list[str]
    USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
    USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    ERROR_TYPE = "error.type"
    PLACEMENT_DECODE_WORKER = "pdserve.placement.decode_worker"
    PLACEMENT_PREFILL_CANDIDATES = "pdserve.placement.prefill_candidates"  # list[str], in order
    PLACEMENT_REASON = "pdserve.placement.reason"
    PLACEMENT_ATTEMPT = "pdserve.placement.attempt"
    PREFILL_MODE = "pdserve.prefill_mode"  # "remote" or "local"
    PREPROCESS_TEMPLATE = "pdserve.preprocess.template"
    PREPROCESS_CACHE_HIT = "pdserve.preprocess.cache_hit"
    NUM_CACHED_TOKENS = "pdserve.num_cached_tokens"  # prompt tokens served by the prefix cache
    KV_BYTES = "pdserve.kv.bytes"
    KV_CHUNKS = "pdserve.kv.chunks"
    KV_RETRIES = "pdserve.kv.retries"
    KV_PEER = "pdserve.kv.peer"
    NUM_PREEMPTIONS = "pdserve.num_preemptions"


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class TracingConfig:
    """What `setup_tracing` installs; `from_env` reads it from `OTEL_*` variables."""

    service_name: str
    # Exporters behind a BatchSpanProcessor, each one of EXPORTERS.
    exporters: tuple[str, ...] = ()
    otlp_protocol: str = "grpc"
    # Test-only JSON-lines file (PDSERVE_TRACE_FILE).
    trace_file: str | None = None

    def __post_init__(self) -> None:
        if not self.service_name:
            raise ValueError("tracing: service_name must not be empty")
        for name in self.exporters:
            if name not in EXPORTERS:
                raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} "
                                 f"(expected a comma-separated list of {', '.join(EXPORTERS)}, or none)")
        if self.otlp_protocol not in OTLP_PROTOCOLS:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported {self.otlp_protocol!r} "
                             f"(expected one of {', '.join(OTLP_PROTOCOLS)})")

    @property
    def enabled(self) -> bool:
        return bool(self.exporters) or self.trace_file is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str], service_name: str) -> TracingConfig:
        service_name = environ.get("OTEL_SERVICE_NAME", "").strip() or service_name
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls(service_name)
        names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
        if "none" in names and len(names) > 1:
            raise ValueError(f"OTEL_TRACES_EXPORTER: 'none' combined with other exporters: {','.join(names)}")
        exporters = tuple(dict.fromkeys(n for n in names if n != "none"))
        protocol = "grpc"
        if "otlp" in exporters:
            protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
                        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip() or "grpc")
        return cls(service_name, exporters, protocol, environ.get("PDSERVE_TRACE_FILE") or None)


# -- process state -----------------------------------------------------------------------

_lock = threading.Lock()
_configured = False
_enabled = False
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()
_propagator = TraceContextTextMapPropagator()


def setup_tracing(service_name: str, *, exporter: SpanExporter | None = None) -> bool:
    """Install tracing as the environment asks; True when it is on. Idempotent.

    `exporter` (tests) is added behind a synchronous SimpleSpanProcessor and turns
    tracing on whatever the environment says. Raises ValueError on a bad setting.
    """
    global _configured, _enabled, _provider, _tracer
    with _lock:
        if _configured:
            return _enabled
        config = TracingConfig.from_env(os.environ, service_name)
        _configured = True
        if not config.enabled and exporter is None:
            return False
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name}))
        for processor in _span_processors(config, exporter):
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)  # warns and keeps the old one if the app set one first
        _provider = provider
        _tracer = provider.get_tracer("pdserve")
        _enabled = True
        log.info("tracing on: service %s, exporters %s%s", config.service_name, ",".join(config.exporters) or "-",
                 f", file {config.trace_file}" if config.trace_file else "")
        return True


def _span_processors(config: TracingConfig, exporter: SpanExporter | None) -> list[Any]:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    processors: list[Any] = [BatchSpanProcessor(e) for e in _exporters(config)]
    if config.trace_file is not None:
        processors.append(SimpleSpanProcessor(JsonLinesSpanExporter(config.trace_file)))  # type: ignore[arg-type]
    if exporter is not None:
        processors.append(SimpleSpanProcessor(exporter))
    return processors


def _exporters(config: TracingConfig) -> list[SpanExporter]:
    """One exporter per configured name; each reads its own OTEL_EXPORTER_OTLP_* settings."""
    exporters: list[SpanExporter] = []
    for name in config.exporters:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif config.otlp_protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPExporter

            exporters.append(HTTPExporter())
    return exporters


def shutdown_tracing() -> None:
    """Flush and stop the exporters (on daemon shutdown); later spans are no-ops."""
    global _enabled, _tracer
    with _lock:
        provider = _provider
        _enabled = False
        _tracer = trace.NoOpTracer()
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    """Whether spans are recorded in this process; guard any costly attribute building with it."""
    return _enabled


def tracer() -> trace.Tracer:
    """pdserve's tracer (a no-op tracer when tracing is off)."""
    return _tracer


# -- spans -----------------------------------------------------------------------------------


class _NoopSpanContext:
    """The one context manager `span()` returns while tracing is off; yields INVALID_SPAN."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *exc_info: object) -> None:
        return None


_NOOP_SPAN = _NoopSpanContext()


def span(name: str, attributes: Attributes | None = None, *, parent: Context | None = None,
         kind: SpanKind = SpanKind.INTERNAL):
    """A context manager for a span made current for its body (sync or async code).

    `parent` is a context from `extract_context` (default: the current context).
    An exception leaving the body is recorded as an event and sets status ERROR.
    Off: the shared no-op manager, no span created.
    """
    if not _enabled:
        return _NOOP_SPAN
    return _CurrentSpan(_tracer.start_span(name, context=parent, kind=kind, attributes=_clean(attributes)))


class _CurrentSpan:
    """Makes a span current for a `with` body and ends it, like the SDK's
    `start_as_current_span`, but also when the body is an async generator abandoned
    mid-stream (a cancelled gRPC stream) and closed later by the event loop's
    finalizer in another context: the span still ends, marked cancelled, and no
    "Failed to detach context" error is logged."""

    __slots__ = ("_span", "_token")

    def __init__(self, s: Span) -> None:
        self._span = s
        self._token: object | None = None

    def __enter__(self) -> Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if isinstance(exc, Exception):
                _mark_failed(self._span, exc, None)
            elif exc is not None:  # CancelledError, GeneratorExit: the caller went away
                self._span.add_event("cancelled", {"exception.type": type(exc).__name__})
            self._span.end()
        finally:
            _detach(self._token)


def record_span(name: str, start_ns: int, end_ns: int, attributes: Attributes | None = None, *,
                parent: Context | None = None) -> None:
    """A finished span from timestamps (`time.time_ns()` clock), e.g. a queue wait measured
    on the engine thread and reported afterwards; its parent is the current span by default."""
    if not _enabled:
        return
    s = _tracer.start_span(name, context=parent, attributes=_clean(attributes), start_time=start_ns)
    s.end(end_time=end_ns)


def add_event(name: str, attributes: Attributes | None = None) -> None:
    """An event (a retry, a preemption) on the current span. Not per token."""
    if _enabled:
        trace.get_current_span().add_event(name, _clean(attributes))


def set_attributes(attributes: Attributes) -> None:
    """Attributes known only later (usage, finish reason) on the current span; None values skipped."""
    if _enabled:
        trace.get_current_span().set_attributes(_clean(attributes) or {})


def set_error(exc: BaseException, *, description: str | None = None) -> None:
    """Mark the current span failed by `exc` (handled errors; a raised one is recorded by `span`)."""
    if _enabled:
        _mark_failed(trace.get_current_span(), exc, description)


def _mark_failed(s: Span, exc: BaseException, description: str | None) -> None:
    s.record_exception(exc)
    s.set_attribute(Attr.ERROR_TYPE, type(exc).__name__)
    s.set_status(Status(StatusCode.ERROR, description or f"{type(exc).__name__}: {exc}"))


def _clean(attributes: Attributes | None) -> dict[str, AttributeValue] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


# -- propagation through gRPC metadata ----------------------------------------------------------


def inject_metadata(metadata: Iterable[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """`metadata` plus `traceparent` (and `tracestate`) of the current span, if there is one.

    Reads only the current context, so it works with tracing off: then it returns
    the given metadata (or []) unless a remote context was attached.
    """
    pairs = list(metadata) if metadata is not None else []
    if not trace.get_current_span().get_span_context().is_valid:
        return pairs
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    pairs.extend(carrier.items())
    return pairs


def extract_context(invocation_metadata: Iterable[tuple[str, Any]] | None) -> Context | None:
    """The remote parent carried by `context.invocation_metadata()`; None when absent or malformed."""
    if not invocation_metadata:
        return None
    carrier = {k: v for k, v in invocation_metadata if k in _TRACE_HEADERS and isinstance(v, str)}
    if "traceparent" not in carrier:
        return None
    ctx = _propagator.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


class _Attached:
    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: Context | None) -> None:
        self._ctx = ctx
        self._token: object | None = None

    def __enter__(self) -> Context | None:
        if self._ctx is not None:
            self._token = otel_context.attach(self._ctx)
        return self._ctx

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _detach(self._token)


_NOOP_ATTACH = _Attached(None)


def attach(ctx: Context | None):
    """A context manager making `ctx` (from `extract_context`) current; no-op for None.

    Attached even when tracing is off, so `inject_metadata` passes the trace on.
    """
    if ctx is None:
        return _NOOP_ATTACH
    return _Attached(ctx)


def _detach(token: Any) -> None:
    var = getattr(token, "var", None)  # the default runtime context hands out contextvars tokens
    if var is None:
        otel_context.detach(token)
        return
    try:
        var.reset(token)
    except ValueError:
        pass  # exited in another context (an abandoned async generator being finalized): nothing to restore


# -- test exporter -------------------------------------------------------------------------------


def span_record(s: ReadableSpan) -> dict[str, Any]:
    """One finished span as the plain dict `PDSERVE_TRACE_FILE` writes (ids in hex)."""
    ctx = s.get_span_context()
    parent = s.parent
    return {
        "name": s.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "kind": s.kind.name,
        "service": s.resource.attributes.get("service.name"),
        "start_time_ns": s.start_time,
        "end_time_ns": s.end_time,
        "attributes": dict(s.attributes or {}),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in s.events],
        "status": {"code": s.status.status_code.name, "description": s.status.description},
    }


class JsonLinesSpanExporter:
    """A SpanExporter (by protocol, so this module needs no SDK import) appending JSON lines.

    Each span is one `os.write` on an O_APPEND descriptor: flushed at once, and whole
    lines even when several processes append to the same file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        with self._lock:
            if self._fd is None:
                return SpanExportResult.FAILURE
            for s in spans:
                line = json.dumps(span_record(s), separators=(",", ":"), default=str) + "\n"
                data = line.encode()
                while data:
                    data = data[os.write(self._fd, data):]
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True
