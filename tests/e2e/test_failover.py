"""Decode failover: SIGKILL of a decode worker mid-generation; its requests resume on the other one."""

from __future__ import annotations

import asyncio
import signal

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from tests.cluster_helpers import stream_all
from tests.engine_helpers import random_prompts

PROMPTS = random_prompts([12 + i for i in range(16)], seed=7)
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("failover") / "daemons.log"
    spec = ClusterSpec(num_prefill=1, num_decode=2, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, log_path=str(log))
    with LocalCluster(spec) as c:
        c.test_log = log
        yield c


def run_all(address: str, on_progress=None):
    return asyncio.run(stream_all(address, PROMPTS, MAX_TOKENS, on_progress))


def test_killing_a_decode_worker_loses_no_request_and_changes_no_token(cluster):
    reference = run_all(cluster.address)
    assert all(len(ids) == MAX_TOKENS for ids, _, _ in reference)
    victim = next(w for w in cluster.workers if w.role == "decode")
    with Client(cluster.address) as client:
        victim_id = next(w.worker_id for w in client.cluster_status() if w.address == victim.address)
    killed = {}

    def kill_when_streaming(counts):
        # Every stream has tokens out, most are not done: the victim holds requests mid-generation.
        if not killed and min(counts) >= 2:
            victim.process.send_signal(signal.SIGKILL)
            killed["at"] = list(counts)

    results = run_all(cluster.address, kill_when_streaming)
    assert killed and sum(0 < c < MAX_TOKENS for c in killed["at"]) >= len(PROMPTS) // 2  # mid-generation
    for (ref_ids, ref_text, _), (ids, text, result) in zip(reference, results):
        assert ids == ref_ids  # nothing repeated, nothing missing, same tokens
        assert text == ref_text
        assert result.finish_reason == "length" and result.usage.completion_tokens == MAX_TOKENS
    survivors = {r.decode_worker_id for _, _, r in results}
    assert victim_id not in survivors and len(survivors) == 1
    # The victim was serving some of them when it died: the router moved each of those once.
    moved = [line for line in cluster.test_log.read_text().splitlines() if f"decode {victim_id} stopped mid-generation" in line]
    assert 1 <= len(moved) < len(PROMPTS)


def test_past_the_migration_limit_the_client_is_told_why(tiny_dir):
    from pdserve.errors import UnavailableError

    spec = ClusterSpec(num_prefill=0, num_decode=2, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, extra_args={"router": ["--migration-limit", "0"]})
    with LocalCluster(spec) as c:
        decodes = {w.address: w for w in c.workers}

        async def main():
            async with AsyncClient(c.address) as client:
                stream = client.generate(prompt_token_ids=PROMPTS[0], max_tokens=400, temperature=0.0,
                                         ignore_eos=True)
                async for delta in stream:
                    if delta.token_ids:
                        # Kill whichever decode worker serves it: both are candidates, so kill both.
                        for w in decodes.values():
                            w.process.send_signal(signal.SIGKILL)
                        break
                async for _ in stream:
                    pass

        with pytest.raises(UnavailableError, match="migration-limit"):
            asyncio.run(main())
