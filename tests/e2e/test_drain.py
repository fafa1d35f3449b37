"""Drain: SIGTERM on a decode worker. The router stops placing on it at once; what it cannot finish
within its grace period moves to the other decode worker, token-identical, and it exits cleanly."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from tests.cluster_helpers import stream_all
from tests.engine_helpers import random_prompts

PROMPTS = random_prompts([10 + i for i in range(8)], seed=11)
MAX_TOKENS = 900
GRACE_S = 1.5


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("drain") / "daemons.log"
    # Worker 1 is the first decode worker (0 is the prefill worker): a short grace period.
    spec = ClusterSpec(num_prefill=1, num_decode=2, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, log_path=str(log), worker_args={1: ["--grace-s", str(GRACE_S)]})
    with LocalCluster(spec) as c:
        c.test_log = log
        yield c


def run_all(address: str, on_progress=None):
    return asyncio.run(stream_all(address, PROMPTS, MAX_TOKENS, on_progress))


def test_sigterm_stops_placement_at_once_and_unfinished_requests_move(cluster):
    reference = run_all(cluster.address)
    victim = cluster.workers[1]
    assert victim.role == "decode"
    with Client(cluster.address) as client:
        victim_id = next(w.worker_id for w in client.cluster_status() if w.address == victim.address)
    served_by_victim = sum(r.decode_worker_id == victim_id for _, _, r in reference)
    assert 0 < served_by_victim < len(PROMPTS)  # both decode workers get work
    state = {}

    async def drain_when_streaming(counts):
        if not state and min(counts) >= 4:
            victim.process.send_signal(signal.SIGTERM)
            state["at"] = time.monotonic()
            await asyncio.sleep(0.2)  # the drain heartbeat reaches the router at once
            async with AsyncClient(cluster.address) as client:
                placed = [await client.complete(prompt_token_ids=[7, 8, 9, i], max_tokens=2, temperature=0.0)
                          for i in range(4)]
            state["placed_on"] = {r.decode_worker_id for r in placed}

    results = run_all(cluster.address, drain_when_streaming)
    assert state["placed_on"] and victim_id not in state["placed_on"]
    for (ref_ids, _, _), (ids, _, result) in zip(reference, results):
        assert ids == ref_ids  # nothing repeated, nothing missing, same tokens
        assert result.finish_reason == "length" and result.usage.completion_tokens == MAX_TOKENS
    assert victim.process.wait(GRACE_S + 5) == 0  # a clean exit within its grace period
    log = cluster.test_log.read_text()
    # It could not finish 900 tokens each in 1.5 s: what it still ran moved to the other worker.
    assert "running requests move to other decode workers" in log
    assert f"decode {victim_id} stopped mid-generation" in log
    assert all(r.decode_worker_id != victim_id for _, _, r in results)
