"""Admission control at 4x capacity: --max-inflight requests run, --max-queue wait, the rest are refused
at once with a retry hint; the admitted ones all finish, and no daemon's memory grows with the overload."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import CapacityError
from tests.cluster_helpers import wait_kv_free

LIMIT, QUEUE = 4, 4
CAPACITY = LIMIT + QUEUE


@pytest.fixture(scope="module")
def bounded(tiny_dir):
    spec = ClusterSpec(num_prefill=0, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3,
                       extra_args={"router": ["--max-inflight", str(LIMIT), "--max-queue", str(QUEUE)]})
    with LocalCluster(spec) as c:
        yield c


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def overload(address: str, n: int):
    async def one(client, i):
        started = time.monotonic()
        try:
            result = await client.complete(prompt_token_ids=[5, 6, 7, i % 50], max_tokens=200, temperature=0.0,
                                           ignore_eos=True)
            return "ok", result, time.monotonic() - started
        except CapacityError as exc:
            return "refused", exc, time.monotonic() - started

    async with AsyncClient(address) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def test_at_4x_capacity_admitted_requests_finish_the_rest_are_told_at_once(bounded):
    asyncio.run(overload(bounded.address, CAPACITY))  # warm-up: every daemon at its working size
    pids = [bounded.router.process.pid] + [w.process.pid for w in bounded.workers]
    before = [rss_mib(pid) for pid in pids]
    for _ in range(3):
        outcomes = asyncio.run(overload(bounded.address, 4 * CAPACITY))
        admitted = [r for kind, r, _ in outcomes if kind == "ok"]
        refused = [(r, s) for kind, r, s in outcomes if kind == "refused"]
        # The first LIMIT run, the next QUEUE wait for a slot; all of them finish in full.
        assert len(admitted) >= CAPACITY and len(refused) >= len(outcomes) - 2 * CAPACITY
        assert all(len(r.token_ids) == 200 and r.finish_reason == "length" for r in admitted)
        assert all("--max-queue" in str(exc) and exc.retry_after_s == 1.0 for exc, _ in refused)
        assert max(s for _, s in refused) < min(s for kind, _, s in outcomes if kind == "ok")  # told at once
    after = [rss_mib(pid) for pid in pids]
    # Memory is bounded: 3 rounds of 4x overload grow no daemon by more than a few MiB.
    assert all(a - b < 32 for a, b in zip(after, before)), (before, after)
    assert wait_kv_free(bounded.workers[0].address, "decode", timeout=2.0) == 0
    with Client(bounded.address) as client:  # the bound frees up: new requests are admitted again
        assert client.complete(prompt_token_ids=[5, 6], max_tokens=2, temperature=0.0).finish_reason == "length"
