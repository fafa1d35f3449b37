"""Metrics: exact counts in the exposition text, gauges from the state callback, /metrics over HTTP."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.observability.metrics import Metrics, WorkerState, start_metrics


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of an exposition text."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


@pytest.fixture
def metrics():
    m = start_metrics("decode")
    yield m
    m.shutdown()


def test_request_counts_and_histograms_match(metrics: Metrics):
    for i in range(5):
        metrics.record_request("stop", "OK", e2e_s=0.5, ttft_s=0.1, queue_s=0.02,
                               num_prompt_tokens=10, num_output_tokens=4)
    metrics.record_request("length", "OK", e2e_s=2.0, ttft_s=0.2)
    metrics.record_request("error", "DEADLINE_EXCEEDED")
    text = metrics.render()
    assert value(text, "pdserve_requests_total", role="decode", finish_reason="stop", status_code="OK") == 5
    assert value(text, "pdserve_requests_total", role="decode", finish_reason="length", status_code="OK") == 1
    assert value(text, "pdserve_requests_total", role="decode", finish_reason="error",
                 status_code="DEADLINE_EXCEEDED") == 1
    assert value(text, "pdserve_e2e_latency_seconds_count", role="decode") == 6
    assert value(text, "pdserve_e2e_latency_seconds_sum", role="decode") == pytest.approx(4.5)
    assert value(text, "pdserve_time_to_first_token_seconds_count", role="decode") == 6
    assert value(text, "pdserve_time_to_first_token_seconds_bucket", role="decode", le="0.1") == 5
    assert value(text, "pdserve_time_to_first_token_seconds_bucket", role="decode", le="+Inf") == 6
    assert value(text, "pdserve_queue_time_seconds_count", role="decode") == 5
    assert value(text, "pdserve_prompt_tokens_total", role="decode") == 50
    assert value(text, "pdserve_generation_tokens_total", role="decode") == 20


def test_event_counters(metrics: Metrics):
    metrics.record_kv_transfer(0.05, 4096)
    metrics.record_kv_transfer(0.15, 1024)
    metrics.inc_kv_retry()
    metrics.inc_preemptions(3)
    metrics.inc_preemptions(0)
    metrics.inc_preprocessing_failure()
    metrics.inc_decode_timeout()
    metrics.inc_decode_timeout()
    for seconds in (0.01, 0.02, 0.03):
        metrics.record_itl(seconds)
    metrics.record_queue(0.5)
    text = metrics.render()
    assert value(text, "pdserve_kv_transfer_seconds_count", role="decode") == 2
    assert value(text, "pdserve_kv_transfer_seconds_sum", role="decode") == pytest.approx(0.2)
    assert value(text, "pdserve_kv_transfer_bytes_total", role="decode") == 5120
    assert value(text, "pdserve_kv_transfer_retries_total", role="decode") == 1
    assert value(text, "pdserve_preemptions_total", role="decode") == 3
    assert value(text, "pdserve_preprocessing_failures_total", role="decode") == 1
    assert value(text, "pdserve_decode_timeouts_total", role="decode") == 2
    assert value(text, "pdserve_inter_token_latency_seconds_count", role="decode") == 3
    assert value(text, "pdserve_inter_token_latency_seconds_bucket", role="decode", le="0.02") == 2
    assert value(text, "pdserve_queue_time_seconds_count", role="decode") == 1


def test_counters_exist_at_zero_from_startup(metrics: Metrics):
    text = metrics.render()
    for name in ("pdserve_preemptions_total", "pdserve_decode_timeouts_total", "pdserve_kv_transfer_bytes_total",
                 "pdserve_preprocessing_failures_total", "pdserve_kv_transfer_retries_total"):
        assert value(text, name, role="decode") == 0, name
    assert value(text, "pdserve_process_cpu_seconds_total", role="decode") > 0


def test_gauges_come_from_one_callback_call_per_scrape(metrics: Metrics):
    calls = []

    def state() -> WorkerState:
        calls.append(1)
        return WorkerState(kv_blocks_total=200, kv_blocks_used=50, kv_blocks_cached=10, kv_fragmentation=0.125,
                           prefix_cache_hit_rate=0.75, batch_fill_rate=0.5, num_running=3, num_waiting=1)

    assert value(metrics.render(), "pdserve_kv_cache_used_blocks", role="decode") is None
    metrics.set_state_callback(state)
    text = metrics.render()
    assert len(calls) == 1
    expected = {
        "pdserve_kv_cache_capacity_blocks": 200, "pdserve_kv_cache_used_blocks": 50,
        "pdserve_kv_cache_cached_blocks": 10, "pdserve_kv_cache_usage_ratio": 0.25,
        "pdserve_kv_cache_fragmentation_ratio": 0.125, "pdserve_prefix_cache_hit_ratio": 0.75,
        "pdserve_batch_fill_ratio": 0.5, "pdserve_running_requests": 3, "pdserve_waiting_requests": 1,
    }
    for name, v in expected.items():
        assert value(text, name, role="decode") == v, name
    # A field left None (no preprocessing cache on this worker) is not exported.
    assert "pdserve_preprocess_cache_hit_ratio" not in text
    metrics.render()
    assert len(calls) == 2


def test_gauges_follow_the_state(metrics: Metrics):
    state = WorkerState(num_running=1)
    metrics.set_state_callback(lambda: state)
    assert value(metrics.render(), "pdserve_running_requests", role="decode") == 1
    state = WorkerState(num_running=4, kv_blocks_total=0, kv_blocks_used=0)
    text = metrics.render()
    assert value(text, "pdserve_running_requests", role="decode") == 4
    assert "pdserve_kv_cache_usage_ratio" not in text  # no pool: no ratio rather than a division by zero


def test_failing_callback_drops_the_gauges_not_the_scrape(metrics: Metrics):
    def broken() -> WorkerState:
        raise RuntimeError("engine gone")

    metrics.record_request("stop", "OK")
    metrics.set_state_callback(broken)
    text = metrics.render()
    assert "pdserve_running_requests" not in text
    assert value(text, "pdserve_requests_total", role="decode", finish_reason="stop", status_code="OK") == 1


def test_recording_is_thread_safe(metrics: Metrics):
    def work():
        for _ in range(500):
            metrics.record_request("stop", "OK", e2e_s=0.1)
            metrics.record_itl(0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = metrics.render()
    assert value(text, "pdserve_requests_total", role="decode", finish_reason="stop", status_code="OK") == 2000
    assert value(text, "pdserve_e2e_latency_seconds_count", role="decode") == 2000
    assert value(text, "pdserve_inter_token_latency_seconds_count", role="decode") == 2000


def test_instances_are_independent():
    prefill, router = start_metrics("prefill"), start_metrics("router")
    try:
        prefill.record_request("stop", "OK")
        assert "pdserve_requests_total" not in router.render()
        assert value(prefill.render(), "pdserve_requests_total", role="prefill", finish_reason="stop",
                     status_code="OK") == 1
    finally:
        prefill.shutdown()
        router.shutdown()


def test_http_endpoint_on_a_free_port():
    m = start_metrics("router", 0)
    try:
        assert m.port and m.port > 0
        for _ in range(3):
            m.record_request("stop", "OK", e2e_s=0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        assert value(text, "pdserve_requests_total", role="router", finish_reason="stop", status_code="OK") == 3
        assert value(text, "pdserve_e2e_latency_seconds_count", role="router") == 3
        with pytest.raises(RuntimeError, match="already served"):
            m.serve(0)
    finally:
        m.shutdown()
    m.shutdown()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=2)


def test_no_port_means_no_server_thread():
    before = {t.ident for t in threading.enumerate()}
    m = start_metrics("prefill", None)
    try:
        assert m.port is None
        assert {t.ident for t in threading.enumerate()} == before
    finally:
        m.shutdown()


def test_unknown_role_is_rejected():
    with pytest.raises(ValueError, match="'worker' is not one of prefill, decode, router"):
        start_metrics("worker")


def test_recent_window_rates_and_p99_forget_old_samples():
    from pdserve.observability.metrics import RecentWindow

    now = [0.0]
    w = RecentWindow(window_s=10.0, clock=lambda: now[0])
    now[0] = 20.0  # the worker has run longer than the window: rates are per window_s
    for i in range(100):
        w.add("itl", (i + 1) / 1000)  # 1..100 ms
        w.add("output", 5)
    w.add("ttft", 0.25)
    w.add("prefill", 300)
    s = w.summary()
    assert s.output_tokens_per_s == 500 / 10.0 and s.prefill_tokens_per_s == 30.0
    assert s.p99_itl_ms == 100.0 and s.p99_ttft_ms == 250.0
    now[0] = 31.0  # every sample is now older than the window
    assert w.summary() == type(s)()
