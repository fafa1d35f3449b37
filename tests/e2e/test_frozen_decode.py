"""A decode worker frozen mid-generation (SIGSTOP): the router sees its heartbeats stop and its streams go
quiet, moves its requests to the other worker without waiting for gRPC's keepalive, and the worker, once
thawed, frees the blocks of the calls the router cancelled and serves again."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from tests.cluster_helpers import stream_all, wait_kv_free
from tests.engine_helpers import random_prompts

PROMPTS = random_prompts([10 + i for i in range(12)], seed=11)
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("frozen") / "daemons.log"
    spec = ClusterSpec(num_prefill=1, num_decode=2, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, log_path=str(log))
    with LocalCluster(spec) as c:
        c.test_log = log
        yield c


def decode_ids(address: str) -> dict[str, str]:
    with Client(address) as client:
        return {w.address: w.worker_id for w in client.cluster_status() if w.role == "decode"}


def test_a_frozen_decode_worker_loses_no_request_and_thaws_without_leaks(cluster):
    reference = asyncio.run(stream_all(cluster.address, PROMPTS, MAX_TOKENS))
    victim = next(w for w in cluster.workers if w.role == "decode")
    victim_id = decode_ids(cluster.address)[victim.address]
    frozen = {}

    def freeze_when_streaming(counts):
        if not frozen and min(counts) >= 2:
            victim.process.send_signal(signal.SIGSTOP)
            frozen["at"] = list(counts)

    try:
        results = asyncio.run(stream_all(cluster.address, PROMPTS, MAX_TOKENS, freeze_when_streaming))
    finally:
        victim.process.send_signal(signal.SIGCONT)
    assert frozen and sum(0 < c < MAX_TOKENS for c in frozen["at"]) >= len(PROMPTS) // 2  # mid-generation
    for (ref_ids, ref_text, _), (ids, text, result) in zip(reference, results):
        assert ids == ref_ids and text == ref_text  # nothing repeated, nothing missing
        assert result.usage.completion_tokens == MAX_TOKENS
    assert victim_id not in {r.decode_worker_id for _, _, r in results}
    # Moved by the router's sweep (heartbeats and stream both silent), not by a keepalive timeout.
    log = cluster.test_log.read_text()
    assert f"decode {victim_id} stopped answering" in log
    assert f"decode {victim_id} stopped mid-generation" in log
    # Thawed, it learns of the cancelled calls, frees their blocks, heartbeats again and gets work.
    assert wait_kv_free(victim.address, "decode", timeout=10.0) == 0
    deadline = time.monotonic() + 10
    with Client(cluster.address) as client:
        while time.monotonic() < deadline:
            health = {w.worker_id: w.health for w in client.cluster_status()}
            if health.get(victim_id) == "healthy":
                break
            time.sleep(0.1)
        assert health.get(victim_id) == "healthy"
    again = asyncio.run(stream_all(cluster.address, PROMPTS, MAX_TOKENS))
    assert [ids for ids, _, _ in again] == [ids for ids, _, _ in reference]
    assert victim_id in {r.decode_worker_id for _, _, r in again}
