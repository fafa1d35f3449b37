"""Tracing: env configuration, propagation, the trace file, and zero cost when off.

OpenTelemetry's global TracerProvider can be set once per process, so every test
that turns tracing on (or asserts what "off" installs) runs a short script in a
subprocess that imports only opentelemetry and `pdserve.observability.tracing`.
The rest (configuration parsing, propagation, the JSON-lines exporter on a private
provider) runs here and never calls `setup_tracing`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from pdserve.observability import tracing
from pdserve.observability.tracing import JsonLinesSpanExporter, TracingConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def run_script(code: str, env: dict[str, str] | None = None) -> dict:
    """Run `code` in a fresh interpreter without inherited OTEL_* settings; its last stdout line is JSON."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PDSERVE_TRACE_FILE"}
    clean.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=clean, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Failed to detach context" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def by_name(records: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in records}


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("env, exporters, protocol, enabled", [
    ({}, (), "grpc", False),
    ({"OTEL_TRACES_EXPORTER": "none"}, (), "grpc", False),
    ({"OTEL_TRACES_EXPORTER": " "}, (), "grpc", False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",), "grpc", True),
    ({"OTEL_TRACES_EXPORTER": "console"}, ("console",), "grpc", True),
    ({"OTEL_TRACES_EXPORTER": "otlp, console,otlp"}, ("otlp", "console"), "grpc", True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, ("otlp",),
     "http/protobuf", True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, ("otlp",), "grpc", True),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, (), "grpc", False),
])
def test_config_from_env(env, exporters, protocol, enabled):
    config = TracingConfig.from_env(env, "pdserve-decode")
    assert (config.exporters, config.otlp_protocol, config.enabled) == (exporters, protocol, enabled)
    assert config.service_name == "pdserve-decode"
    assert config.trace_file is None


def test_config_service_name_and_trace_file():
    config = TracingConfig.from_env({"OTEL_SERVICE_NAME": "edge", "PDSERVE_TRACE_FILE": "/tmp/t.jsonl"}, "router")
    assert (config.service_name, config.exporters, config.trace_file, config.enabled) == (
        "edge", (), "/tmp/t.jsonl", True)


@pytest.mark.parametrize("env, message", [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "unknown exporter 'jaeger'"),
    ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "'none' combined"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "unsupported 'http/json'"),
])
def test_config_rejects_bad_settings(env, message):
    with pytest.raises(ValueError, match=message):
        TracingConfig.from_env(env, "decode")


def test_config_ignores_protocol_without_otlp():
    assert TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "bogus"},
                                  "decode").exporters == ("console",)


# -- propagation (no provider needed: only the current context matters) ---------------------


def remote_parent(sampled: bool = True, state: TraceState | None = None) -> NonRecordingSpan:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=flags, trace_state=state))


def test_inject_without_a_span_adds_nothing():
    assert tracing.inject_metadata() == []
    given = [("x-request-id", "r1")]
    out = tracing.inject_metadata(given)
    assert out == [("x-request-id", "r1")] and out is not given


def test_inject_extract_round_trip():
    with trace.use_span(remote_parent(state=TraceState([("vendor", "v1")])), end_on_exit=False):
        metadata = tracing.inject_metadata([("x-request-id", "r1")])
    assert metadata == [("x-request-id", "r1"),
                        ("traceparent", f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"),
                        ("tracestate", "vendor=v1")]
    ctx = tracing.extract_context(metadata)
    assert ctx is not None
    parent = trace.get_current_span(ctx).get_span_context()
    assert (parent.trace_id, parent.span_id, parent.is_remote, parent.trace_flags.sampled) == (
        TRACE_ID, SPAN_ID, True, True)
    assert parent.trace_state.get("vendor") == "v1"


def test_unsampled_flag_travels():
    with trace.use_span(remote_parent(sampled=False), end_on_exit=False):
        (_, value), = tracing.inject_metadata()
    assert value == f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-00"
    ctx = tracing.extract_context([("traceparent", value)])
    assert not trace.get_current_span(ctx).get_span_context().trace_flags.sampled


@pytest.mark.parametrize("metadata", [
    None, [], (("user-agent", "grpc-python"),), [("traceparent", "not-a-traceparent")],
    [("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
    [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
])
def test_extract_absent_or_malformed_is_none(metadata):
    assert tracing.extract_context(metadata) is None


def test_attach_makes_the_remote_context_current_and_restores():
    assert tracing.attach(None) is tracing.attach(None)
    before = otel_context.get_current()
    ctx = tracing.extract_context([("traceparent", f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01")])
    with tracing.attach(ctx):
        # Tracing is off here: the attached context is still forwarded downstream.
        assert tracing.inject_metadata() == [("traceparent", f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01")]
    assert otel_context.get_current() == before
    assert tracing.inject_metadata() == []


# -- the JSON-lines exporter, on a private provider ---------------------------------------------


def test_json_lines_exporter_writes_one_valid_line_per_span(tmp_path):
    path = tmp_path / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(path))))
    t = provider.get_tracer("test")
    with t.start_as_current_span("outer", attributes={"gen_ai.usage.output_tokens": 7}) as outer:
        with t.start_as_current_span("inner") as inner:
            inner.add_event("retry", {"attempt": 2})
        assert len(path.read_text().splitlines()) == 1  # written when the span ends, not at shutdown
        outer.set_attribute("gen_ai.response.finish_reasons", ["stop"])
    provider.shutdown()
    lines = path.read_text().splitlines()
    records = by_name([json.loads(line) for line in lines])
    outer_r, inner_r = records["outer"], records["inner"]
    assert len(lines) == 2
    assert inner_r["trace_id"] == outer_r["trace_id"] and len(outer_r["trace_id"]) == 32
    assert inner_r["parent_span_id"] == outer_r["span_id"] and outer_r["parent_span_id"] is None
    assert outer_r["attributes"] == {"gen_ai.usage.output_tokens": 7, "gen_ai.response.finish_reasons": ["stop"]}
    assert inner_r["events"][0]["name"] == "retry" and inner_r["events"][0]["attributes"] == {"attempt": 2}
    assert outer_r["status"] == {"code": "UNSET", "description": None}
    assert set(outer_r) >= {"name", "trace_id", "span_id", "parent_span_id", "attributes", "events", "status"}


def test_json_lines_exporters_share_a_file(tmp_path):
    path = str(tmp_path / "shared.jsonl")
    providers = []
    for service in ("router", "decode"):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
        providers.append(provider)
    for i in range(20):
        for provider in providers:
            with provider.get_tracer("t").start_as_current_span(f"s{i}", attributes={"pad": "x" * 500}):
                pass
    for provider in providers:
        provider.shutdown()
    assert len([json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]) == 40


# -- tracing on (subprocesses) ---------------------------------------------------------------------

ON_SCRIPT = """
import json
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry import trace
from pdserve.observability import tracing
from pdserve.observability.tracing import Attr, SpanKind

exporter = InMemorySpanExporter()
out = {"on": tracing.setup_tracing("pdserve-router", exporter=exporter), "enabled": tracing.enabled()}
out["idempotent"] = tracing.setup_tracing("other") and tracing.tracer() is tracing.tracer()

# "router": a request span with placement inside; the metadata goes to the next process.
with tracing.span("router.request", {Attr.REQUEST_ID: "r1", Attr.REQUEST_TEMPERATURE: None},
                  kind=SpanKind.SERVER) as s:
    out["recording"] = s.is_recording()
    with tracing.span("router.placement", {Attr.PLACEMENT_PREFILL_CANDIDATES: ["p1", "p2"]}):
        tracing.add_event("retry", {"attempt": 1, "reason": "UNAVAILABLE"})
        tracing.set_error(ConnectionError("p0 refused"))
    metadata = tracing.inject_metadata()
    tracing.set_attributes({Attr.USAGE_OUTPUT_TOKENS: 3, Attr.USAGE_INPUT_TOKENS: None})
out["detached"] = not trace.get_current_span().get_span_context().is_valid

# "decode": a fresh context, the parent only through the metadata.
parent = tracing.extract_context(metadata)
with tracing.span("decode.request", parent=parent, kind=SpanKind.SERVER):
    tracing.record_span("decode.queue", 1_000, 2_000, {Attr.REQUEST_ID: "r1"})
with tracing.attach(parent), tracing.span("kv_transfer.receive", kind=SpanKind.CLIENT):
    try:
        with tracing.span("decode.generate"):
            raise TimeoutError("deadline")
    except TimeoutError:
        pass

tracing.shutdown_tracing()
out["off_after_shutdown"] = not tracing.enabled() and tracing.span("x") is tracing.span("y")
out["spans"] = [tracing.span_record(s) for s in exporter.get_finished_spans()]
print(json.dumps(out))
"""


def test_spans_across_processes_form_one_tree():
    out = run_script(ON_SCRIPT)
    assert out["on"] and out["enabled"] and out["idempotent"] and out["recording"] and out["detached"]
    assert out["off_after_shutdown"]
    spans = by_name(out["spans"])
    assert set(spans) == {"router.request", "router.placement", "decode.request", "decode.queue",
                          "kv_transfer.receive", "decode.generate"}
    root = spans["router.request"]
    assert root["parent_span_id"] is None and root["kind"] == "SERVER"
    assert {s["trace_id"] for s in spans.values()} == {root["trace_id"]}
    parents = {name: s["parent_span_id"] for name, s in spans.items()}
    ids = {name: s["span_id"] for name, s in spans.items()}
    assert parents["router.placement"] == ids["router.request"]
    assert parents["decode.request"] == ids["router.request"]
    assert parents["kv_transfer.receive"] == ids["router.request"]
    assert parents["decode.queue"] == ids["decode.request"]
    assert parents["decode.generate"] == ids["kv_transfer.receive"]
    assert root["service"] == "pdserve-router"
    # Attributes: None values dropped, late attributes kept.
    assert root["attributes"] == {"pdserve.request_id": "r1", "gen_ai.usage.output_tokens": 3}
    # Handled error: event + status; retry event with attributes.
    placement = spans["router.placement"]
    assert [e["name"] for e in placement["events"]] == ["retry", "exception"]
    assert placement["events"][0]["attributes"] == {"attempt": 1, "reason": "UNAVAILABLE"}
    assert placement["status"] == {"code": "ERROR", "description": "ConnectionError: p0 refused"}
    assert placement["attributes"]["error.type"] == "ConnectionError"
    # Raised error: recorded by span() itself.
    generate = spans["decode.generate"]
    assert generate["status"]["code"] == "ERROR" and generate["events"][0]["name"] == "exception"
    # Retroactive span keeps its timestamps.
    queue = spans["decode.queue"]
    assert (queue["start_time_ns"], queue["end_time_ns"]) == (1_000, 2_000)


def test_trace_file_alone_turns_tracing_on(tmp_path):
    path = tmp_path / "trace.jsonl"
    out = run_script("""
        import json, threading
        from opentelemetry import trace
        from pdserve.observability import tracing
        on = tracing.setup_tracing("pdserve-decode")
        with tracing.span("decode.request", {"pdserve.request_id": "r9"}):
            with tracing.span("decode.generate"):
                pass
            lines_before_end = open(%r).read().count("\\n")
        print(json.dumps({"on": on, "lines_before_end": lines_before_end,
                          "threads": [t.name for t in threading.enumerate()]}))
    """ % str(path), {"PDSERVE_TRACE_FILE": str(path), "OTEL_SERVICE_NAME": "decode-7"})
    assert out["on"] and out["lines_before_end"] == 1  # each span is flushed when it ends
    assert out["threads"] == ["MainThread"]  # the file processor is synchronous
    records = by_name([json.loads(line) for line in path.read_text().splitlines()])
    assert records["decode.generate"]["parent_span_id"] == records["decode.request"]["span_id"]
    assert records["decode.request"]["service"] == "decode-7"
    assert records["decode.request"]["attributes"] == {"pdserve.request_id": "r9"}


def test_console_exporter_runs_a_batch_thread_and_prints_spans():
    out = run_script("""
        import io, json, sys, threading, contextlib
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            from pdserve.observability import tracing
            on = tracing.setup_tracing("pdserve-prefill")
            threads = [t.name for t in threading.enumerate()]
            with tracing.span("prefill.compute", {"gen_ai.usage.input_tokens": 12}):
                pass
            tracing.shutdown_tracing()
        print(json.dumps({"on": on, "threads": threads, "printed": buf.getvalue()}))
    """, {"OTEL_TRACES_EXPORTER": "console"})
    assert out["on"]
    assert any("OtelBatch" in name for name in out["threads"])
    printed = json.loads(out["printed"])
    assert printed["name"] == "prefill.compute"
    assert printed["attributes"] == {"gen_ai.usage.input_tokens": 12}
    assert printed["resource"]["attributes"]["service.name"] == "pdserve-prefill"


def test_otlp_exporter_follows_the_protocol():
    out = run_script("""
        import json
        from pdserve.observability import tracing
        from pdserve.observability.tracing import TracingConfig
        kinds = {}
        for protocol in ("grpc", "http/protobuf"):
            (exporter,) = tracing._exporters(TracingConfig("s", ("otlp",), protocol))
            kinds[protocol] = type(exporter).__module__
            exporter.shutdown()
        print(json.dumps({"kinds": kinds, "on": tracing.setup_tracing("pdserve-router")}))
    """, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert out["on"]
    assert out["kinds"] == {"grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                            "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter"}


def test_sampler_comes_from_the_environment():
    out = run_script("""
        import json
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from pdserve.observability import tracing
        exporter = InMemorySpanExporter()
        tracing.setup_tracing("pdserve-router", exporter=exporter)
        with tracing.span("router.request"):
            metadata = tracing.inject_metadata()
        print(json.dumps({"spans": len(exporter.get_finished_spans()), "metadata": metadata}))
    """, {"OTEL_TRACES_SAMPLER": "always_off"})
    assert out["spans"] == 0
    # Not sampled, still propagated: downstream parent-based samplers drop it too.
    (key, value), = out["metadata"]
    assert key == "traceparent" and int(value[-2:], 16) & 0x01 == 0  # sampled bit clear


ASYNC_SCRIPT = """
import asyncio, gc, json
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pdserve.observability import tracing

exporter = InMemorySpanExporter()
tracing.setup_tracing("pdserve-decode", exporter=exporter)

async def generate(metadata, rid):
    # A streaming handler: the request span stays open across yields.
    with tracing.attach(tracing.extract_context(metadata)), tracing.span("decode.request", {"rid": rid}):
        for i in range(3):
            with tracing.span("decode.step", {"rid": rid}):
                await asyncio.sleep(0.005)
            yield i

async def consume(metadata, rid, stall_after=None):
    async for i in generate(metadata, rid):
        if i == stall_after:
            await asyncio.sleep(30)  # cancelled here, outside the generator: it is abandoned

async def main():
    with tracing.span("router.request"):
        metadata = tracing.inject_metadata()
    await asyncio.gather(consume(metadata, "a"), consume(metadata, "b"))
    task = asyncio.create_task(consume(metadata, "c", stall_after=0))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    gc.collect()
    await asyncio.sleep(0.05)  # the loop's finalizer closes the abandoned generator

asyncio.run(main())
print(json.dumps([tracing.span_record(s) for s in exporter.get_finished_spans()]))
"""


def test_spans_in_async_streams():
    records = run_script(ASYNC_SCRIPT)
    root = next(r for r in records if r["name"] == "router.request")
    requests = {r["attributes"]["rid"]: r for r in records if r["name"] == "decode.request"}
    assert set(requests) == {"a", "b", "c"}
    for rid, request in requests.items():
        assert request["parent_span_id"] == root["span_id"] and request["trace_id"] == root["trace_id"]
        steps = [r for r in records if r["name"] == "decode.step" and r["attributes"]["rid"] == rid]
        assert {r["parent_span_id"] for r in steps} == {request["span_id"]}  # concurrent streams do not mix
    # The abandoned stream's span still ends, marked cancelled, without a detach error.
    assert [e["name"] for e in requests["c"]["events"]] == ["cancelled"]
    assert requests["a"]["events"] == [] and requests["a"]["status"]["code"] == "UNSET"


# -- tracing off (subprocess: asserts what the process does NOT have) ----------------------------------

OFF_SCRIPT = """
import json, sys, threading
from opentelemetry import trace
from opentelemetry.trace import span as api_span
from pdserve.observability import tracing

created = []
original_init = api_span.NonRecordingSpan.__init__
def counting_init(self, *args, **kwargs):
    created.append(1)
    original_init(self, *args, **kwargs)
api_span.NonRecordingSpan.__init__ = counting_init

on = tracing.setup_tracing("pdserve-decode")
otel_calls = []
def profile(frame, event, arg):
    if event == "call" and "opentelemetry" in frame.f_code.co_filename:
        otel_calls.append(frame.f_code.co_name)

managers = set()
sys.setprofile(profile)
for i in range(10_000):
    cm = tracing.span("decode.step", None)
    managers.add(id(cm))
    with cm as s:
        tracing.add_event("token")
        tracing.set_attributes({"i": i})
    tracing.record_span("decode.queue", 0, 1)
sys.setprofile(None)

print(json.dumps({
    "on": on, "enabled": tracing.enabled(),
    "distinct_managers": len(managers),
    "yields_invalid_span": s is trace.INVALID_SPAN,
    "otel_calls": len(otel_calls), "spans_created": len(created),
    "provider": type(trace.get_tracer_provider()).__name__,
    "tracer": type(tracing.tracer()).__name__,
    "sdk_imported": any(m.startswith("opentelemetry.sdk") for m in sys.modules),
    "grpc_imported": "grpc" in sys.modules, "torch_imported": "torch" in sys.modules,
    "threads": [t.name for t in threading.enumerate()],
}))
"""


@pytest.mark.parametrize("env", [{}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_tracing_off_installs_nothing_and_creates_no_spans(env):
    out = run_script(OFF_SCRIPT, env)
    assert out == {
        "on": False, "enabled": False,
        "distinct_managers": 1, "yields_invalid_span": True,
        "otel_calls": 0, "spans_created": 0,
        "provider": "ProxyTracerProvider", "tracer": "NoOpTracer",
        "sdk_imported": False, "grpc_imported": False, "torch_imported": False,
        "threads": ["MainThread"],
    }
