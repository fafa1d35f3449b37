"""Faults injected at exact points of a KV transfer: the request still gets one correct answer.

Workers here run standalone (no router) so that the test, not placement, decides
which prefill candidates a decode worker tries and in which order.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time

import pytest

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import IncompatibleError
from pdserve.v1 import common_pb2
from tests import cluster_helpers
from tests.cluster_helpers import E2E_LOG, start_worker, wait_kv_free
from tests.engine_helpers import hf_greedy, random_prompts

PROMPT = random_prompts([40], seed=9)[0]
MAX_TOKENS = 12
# Small KV chunks, so that a fault can land in the middle of one request's transfer: the tiny
# model's 40-token prompt then takes 6 chunks (3 per layer), not one chunk for both layers.
SMALL_CHUNKS = ("--kv-chunk-bytes", "4096")


@pytest.fixture(scope="module")
def decode(tiny_dir):
    # Without a prefix cache, every test's transfer carries the whole prompt (the fault points count on it).
    child = start_worker("decode", tiny_dir, "--kv-stall-timeout-s", "1.0", "--no-prefix-caching")
    yield child
    child.stop(5)


@pytest.fixture(scope="module")
def healthy_prefill(tiny_dir):
    child = start_worker("prefill", tiny_dir)
    yield child
    child.stop(5)


@pytest.fixture(scope="module")
def expected(tiny_oracles):
    return hf_greedy(tiny_oracles["llama"], PROMPT, MAX_TOKENS)


def generate_via(decode_address: str, candidates: list[str], prompt=PROMPT, max_tokens=MAX_TOKENS):
    return cluster_helpers.generate_via(decode_address, candidates, prompt, max_tokens)


def test_remote_prefill_matches_oracle(decode, healthy_prefill, expected):
    tokens, result = generate_via(decode.address, [healthy_prefill.address])
    assert tokens == expected
    assert result.prefill_mode == common_pb2.PREFILL_MODE_REMOTE and result.num_prefill_attempts == 1


def test_prefill_killed_mid_transfer_falls_over_to_next_candidate(tiny_dir, decode, healthy_prefill, expected):
    # Dies at its 2nd chunk, while sending layer 0's KV.
    doomed = start_worker("prefill", tiny_dir, *SMALL_CHUNKS, env={"PDSERVE_FAULT": "kill_after_chunks=2"})
    try:
        tokens, result = generate_via(decode.address, [doomed.address, healthy_prefill.address])
        assert doomed.process.wait(10) == -signal.SIGKILL
    finally:
        doomed.stop(1)
    assert tokens == expected
    assert result.num_prefill_attempts == 2 and result.prefill_worker_id == "p1"
    assert wait_kv_free(decode.address, "decode") == 0


def test_stalled_prefill_times_out_and_falls_back_to_local(tiny_dir, decode, expected):
    stalled = start_worker("prefill", tiny_dir, *SMALL_CHUNKS, env={"PDSERVE_FAULT": "pause_after_chunks=1"})
    try:
        started = time.monotonic()
        tokens, result = generate_via(decode.address, [stalled.address])
        assert time.monotonic() - started < 10
        assert wait_kv_free(stalled.address, "prefill", timeout=3.0) == 0
    finally:
        stalled.stop(1)
    assert tokens == expected
    assert result.prefill_mode == common_pb2.PREFILL_MODE_LOCAL and result.num_prefill_attempts == 1
    assert wait_kv_free(decode.address, "decode") == 0


def test_sigstopped_prefill_is_passed_over_and_serves_again_after_sigcont(tiny_dir, decode, healthy_prefill,
                                                                          expected):
    frozen = start_worker("prefill", tiny_dir, *SMALL_CHUNKS, env={"PDSERVE_FAULT": "stop_after_chunks=1"})
    try:
        started = time.monotonic()
        tokens, result = generate_via(decode.address, [frozen.address, healthy_prefill.address])
        assert time.monotonic() - started < 10  # within the 1 s stall timeout and a backoff, not a hang
        assert tokens == expected
        assert result.num_prefill_attempts == 2 and result.prefill_worker_id == "p1"
        assert wait_kv_free(decode.address, "decode") == 0
        frozen.process.send_signal(signal.SIGCONT)
        # Thawed: the abandoned transfer's blocks are released, and it serves the next request itself.
        assert wait_kv_free(frozen.address, "prefill", timeout=3.0) == 0
        tokens, result = generate_via(decode.address, [frozen.address])
        assert tokens == expected
        assert result.prefill_mode == common_pb2.PREFILL_MODE_REMOTE and result.prefill_worker_id == "p0"
        assert wait_kv_free(frozen.address, "prefill", timeout=3.0) == 0
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        frozen.stop(1)


def test_all_prefill_workers_down_means_local_prefill(decode, expected):
    tokens, result = generate_via(decode.address, ["127.0.0.1:1", "127.0.0.1:2"])
    assert tokens == expected
    assert result.prefill_mode == common_pb2.PREFILL_MODE_LOCAL and result.num_prefill_attempts == 2


def test_fingerprint_mismatch_is_failed_precondition(other_tiny_dir, decode):
    other = start_worker("prefill", other_tiny_dir)
    try:
        with pytest.raises(IncompatibleError):
            generate_via(decode.address, [other.address])
    finally:
        other.stop(2)
    assert wait_kv_free(decode.address, "decode") == 0


def test_router_never_pairs_mismatched_workers(tiny_dir, other_tiny_dir, tiny_oracles):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32",
                       router_listen="127.0.0.1:0", kv_cache_gib=0.05, heartbeat_s=0.5, log_path=E2E_LOG)
    with LocalCluster(spec) as cluster:
        other = start_worker("prefill", other_tiny_dir, "--router", cluster.address, "--heartbeat-s", "0.5")
        try:
            cluster.wait_registered(3)
            with Client(cluster.address, timeout=60) as client:
                results = [client.complete(prompt_token_ids=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0)
                           for _ in range(6)]
                prefill_ids = {w.worker_id for w in client.cluster_status()
                               if w.role == "prefill" and w.address != other.address}
        finally:
            other.stop(2)
    expected = hf_greedy(tiny_oracles["llama"], PROMPT, MAX_TOKENS)
    assert all(r.token_ids == expected for r in results)
    assert {r.prefill_worker_id for r in results} == prefill_ids


def test_killed_decode_worker_is_dropped_and_avoided(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=2, model=tiny_dir, dtype="float32",
                       router_listen="127.0.0.1:0", kv_cache_gib=0.05, heartbeat_s=0.3, log_path=E2E_LOG)
    with LocalCluster(spec) as cluster:
        victim = [w for w in cluster.workers if w.role == "decode"][0]
        victim.process.kill()
        victim.process.wait()
        killed_at = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(1) as pool, Client(cluster.address, timeout=30) as client:
            # Requests go on while the status is watched, so detection time is not request time.
            pending = pool.submit(lambda: [client.complete(prompt_token_ids=PROMPT, max_tokens=4, temperature=0.0)
                                           for _ in range(4)])
            gone = None
            while time.monotonic() - killed_at < 5:
                status = {w.address: w.health for w in client.cluster_status()}
                if status.get(victim.address) != "healthy":
                    gone = time.monotonic() - killed_at
                    break
                time.sleep(0.05)
            results = pending.result(60)
    assert all(r.usage.completion_tokens == 4 for r in results)
    assert gone is not None and gone <= 3 * 0.3 + 0.5  # within 3 heartbeats (plus one poll)


def _retries(worker) -> float:
    return worker.metric_sum("pdserve_kv_transfer_retries_total")


@pytest.fixture(scope="module")
def counted_decode(tiny_dir):
    child = start_worker("decode", tiny_dir, "--kv-stall-timeout-s", "1.0", "--metrics-port", "0",
                         "--no-prefix-caching")
    yield child
    child.stop(5)


@pytest.mark.parametrize("fault", ["truncate_chunk=2", "reorder_chunk=2", "foreign_chunk=1", "misplace_chunk=2",
                                   "corrupt_chunk=2"])
def test_damaged_chunks_are_detected_retried_and_counted(tiny_dir, counted_decode, healthy_prefill, expected, fault):
    damaged = start_worker("prefill", tiny_dir, *SMALL_CHUNKS, env={"PDSERVE_FAULT": fault})
    try:
        before = _retries(counted_decode)
        tokens, result = generate_via(counted_decode.address, [damaged.address, healthy_prefill.address])
        assert tokens == expected  # never garbage with status OK
        assert result.num_prefill_attempts == 2 and result.prefill_worker_id == "p1"
        assert _retries(counted_decode) == before + 1
        assert wait_kv_free(counted_decode.address, "decode") == 0
        assert wait_kv_free(damaged.address, "prefill", timeout=3.0) == 0
    finally:
        damaged.stop(1)
