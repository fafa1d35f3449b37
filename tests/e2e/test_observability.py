"""Traces across router, decode and prefill processes; /metrics on each daemon; tracing off costs nothing.

One cluster for the module: router, one prefill and one decode worker on a tiny model,
each with --metrics-port 0 and PDSERVE_TRACE_FILE set, so every finished span of every
process lands, one JSON line each, in one file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import InvalidRequestError
from pdserve.observability.tracing import SpanName
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

METRICS = ["--metrics-port", "0"]


@pytest.fixture(scope="module")
def traced(tiny_dir, tmp_path_factory):
    trace_file = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.5, extra_args={"prefill": METRICS, "decode": METRICS, "router": METRICS})
    old = os.environ.get("PDSERVE_TRACE_FILE")
    os.environ["PDSERVE_TRACE_FILE"] = str(trace_file)
    try:
        with LocalCluster(spec) as cluster:
            yield cluster, trace_file
    finally:
        if old is None:
            os.environ.pop("PDSERVE_TRACE_FILE", None)
        else:
            os.environ["PDSERVE_TRACE_FILE"] = old


def client_tracer():
    """The application's own tracer (not pdserve's): the SDK must carry its current span on."""
    return TracerProvider().get_tracer("test-app")


def spans_of(trace_file, trace_id: str, expected: set[str], timeout: float = 15.0) -> list[dict]:
    """The file's spans of one trace, once every expected name is there (daemons end spans after replying)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [json.loads(line) for line in trace_file.read_text().splitlines() if line.strip()]
        mine = [s for s in spans if s["trace_id"] == trace_id]
        if expected <= {s["name"] for s in mine} or time.monotonic() > deadline:
            return mine
        time.sleep(0.1)


def test_one_request_is_one_trace_tree_across_the_three_daemons(traced):
    cluster, trace_file = traced
    with client_tracer().start_as_current_span("client.generate") as root, Client(cluster.address) as client:
        result = client.complete(prompt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
                                 max_tokens=4, temperature=0.0, ignore_eos=True)
    assert result.finish_reason == "length"
    trace_id = format(root.get_span_context().trace_id, "032x")
    root_id = format(root.get_span_context().span_id, "016x")
    expected = {SpanName.ROUTER_REQUEST, SpanName.PLACEMENT, SpanName.DECODE_REQUEST, SpanName.KV_RECEIVE,
                SpanName.PREFILL_REQUEST, SpanName.PREPROCESS, SpanName.PREFILL_QUEUE, SpanName.PREFILL_COMPUTE,
                SpanName.KV_SEND, SpanName.DECODE}
    spans = spans_of(trace_file, trace_id, expected)
    names = {s["name"] for s in spans}
    assert expected <= names, f"missing {expected - names}"
    assert {s["service"] for s in spans} == {"pdserve-router", "pdserve-decode", "pdserve-prefill"}
    # One tree rooted at the client's span: every parent is the root or a span of this trace.
    by_id = {s["span_id"]: s for s in spans}
    for s in spans:
        assert s["parent_span_id"] == root_id or s["parent_span_id"] in by_id, s["name"]
    parent = lambda name: by_id.get(next(s for s in spans if s["name"] == name)["parent_span_id"], {}).get("name")  # noqa: E731
    assert next(s for s in spans if s["name"] == SpanName.ROUTER_REQUEST)["parent_span_id"] == root_id
    assert parent(SpanName.DECODE_REQUEST) == SpanName.ROUTER_REQUEST
    assert parent(SpanName.KV_RECEIVE) == SpanName.DECODE_REQUEST
    assert parent(SpanName.PREFILL_REQUEST) == SpanName.KV_RECEIVE
    assert parent(SpanName.KV_SEND) == SpanName.PREFILL_REQUEST
    decode = next(s for s in spans if s["name"] == SpanName.DECODE_REQUEST)["attributes"]
    assert decode["pdserve.request_id"] == result.request_id
    assert decode["gen_ai.usage.output_tokens"] == 4 and decode["gen_ai.response.finish_reasons"] == ["length"]
    send = next(s for s in spans if s["name"] == SpanName.KV_SEND)["attributes"]
    assert send["pdserve.kv.bytes"] > 0 and send["pdserve.kv.chunks"] >= 1


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series (0 when absent); labels must match exactly those given."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{([^}}]*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_metrics_count_the_requests_and_the_failures(traced):
    cluster, _ = traced
    daemons = {"router": cluster.router, **{w.role: w for w in cluster.workers}}
    assert all(d.metrics_port for d in daemons.values())
    before = {role: scrape(d.metrics_port) for role, d in daemons.items()}
    n = 3
    with Client(cluster.address) as client:
        for i in range(n):
            client.complete(prompt_token_ids=[7 + i, 8, 9, 10], max_tokens=3, temperature=0.0, ignore_eos=True)
        with pytest.raises(InvalidRequestError):
            client.complete(prompt_token_ids=[7, 8], max_tokens=3, temperature=-1.0)
    time.sleep(0.2)
    after = {role: scrape(d.metrics_port) for role, d in daemons.items()}

    def delta(role: str, name: str, **labels: str) -> float:
        return sample(after[role], name, **labels) - sample(before[role], name, **labels)

    for role in ("router", "decode"):
        assert delta(role, "pdserve_requests_total", finish_reason="length", status_code="OK") == n
        assert delta(role, "pdserve_time_to_first_token_seconds_count") == n
        assert delta(role, "pdserve_e2e_latency_seconds_count") == n
        assert delta(role, "pdserve_generation_tokens_total") == 3 * n
    assert delta("decode", "pdserve_inter_token_latency_seconds_count") == 2 * n  # 3 tokens: 2 gaps each
    assert delta("decode", "pdserve_kv_transfer_bytes_total") > 0
    assert delta("prefill", "pdserve_requests_total", finish_reason="prefilled", status_code="OK") == n
    assert delta("router", "pdserve_requests_total", finish_reason="error", status_code="INVALID_ARGUMENT") == 1
    assert sample(after["decode"], "pdserve_kv_cache_capacity_blocks") > 0
    assert "pdserve_process_cpu_seconds_total" in after["prefill"]


def test_a_prefill_retry_is_an_event_on_the_decode_span(traced, unused_tcp_port):
    cluster, trace_file = traced
    decode = next(w for w in cluster.workers if w.role == "decode")
    prefill = next(w for w in cluster.workers if w.role == "prefill")
    request = decode_pb2.DecodeGenerateRequest(
        request=common_pb2.GenerateRequest(request_id="retry-1", prompt_token_ids=common_pb2.TokenIds(token_ids=[5, 6, 7]),
                                           sampling_params=common_pb2.SamplingParams(max_tokens=2, temperature=0.0)),
        prefill_candidates=[decode_pb2.PrefillCandidate(address=f"127.0.0.1:{unused_tcp_port}"),
                            decode_pb2.PrefillCandidate(address=prefill.address)])
    from pdserve.observability.tracing import inject_metadata

    with client_tracer().start_as_current_span("client.retry") as root, grpc.insecure_channel(decode.address) as ch:
        responses = list(decode_pb2_grpc.DecodeServiceStub(ch).Generate(request, timeout=30,
                                                                         metadata=inject_metadata()))
    assert responses[-1].result.prefill_mode == common_pb2.PREFILL_MODE_REMOTE
    assert responses[-1].result.num_prefill_attempts == 2
    spans = spans_of(trace_file, format(root.get_span_context().trace_id, "032x"),
                     {SpanName.DECODE_REQUEST, SpanName.PREFILL_REQUEST})
    span = next(s for s in spans if s["name"] == SpanName.DECODE_REQUEST)
    retries = [e for e in span["events"] if e["name"] == "kv_transfer.retry"]
    assert len(retries) == 1 and retries[0]["attributes"]["pdserve.kv.peer"].endswith(str(unused_tcp_port))
    failed = [s for s in spans if s["name"] == SpanName.KV_RECEIVE and s["status"]["code"] == "ERROR"]
    assert len(failed) == 1


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracing_off_installs_nothing_and_makes_no_spans():
    code = """
import sys, threading
from pdserve.server import observe
from pdserve.observability import tracing
import argparse
metrics = observe.start("decode", argparse.Namespace(metrics_port=None, metrics_host="127.0.0.1"))
assert not tracing.enabled()
assert "opentelemetry.sdk.trace" not in sys.modules, "the tracing SDK was imported"
a, b = tracing.span("x"), tracing.span("y", {"k": 1})
assert a is b, "a span object per call"
with a as s:
    assert not s.get_span_context().is_valid
names = [t.name for t in threading.enumerate()]
assert not any("Otel" in n or "Span" in n for n in names), names
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PDSERVE_TRACE"))}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
