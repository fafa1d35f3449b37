"""Admission control: beyond --max-inflight the router refuses at once; the admitted requests finish."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import CapacityError

LIMIT = 4


@pytest.fixture(scope="module")
def bounded(tiny_dir):
    spec = ClusterSpec(num_prefill=0, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, extra_args={"router": ["--max-inflight", str(LIMIT)]})
    with LocalCluster(spec) as c:
        yield c


def test_overload_is_refused_at_once_and_admitted_requests_finish(bounded):
    async def one(client, i):
        started = time.monotonic()
        try:
            result = await client.complete(prompt_token_ids=[5, 6, 7, i], max_tokens=200, temperature=0.0,
                                           ignore_eos=True)
            return "ok", result, time.monotonic() - started
        except CapacityError as exc:
            return "refused", exc, time.monotonic() - started

    async def main():
        async with AsyncClient(bounded.address) as client:
            return await asyncio.gather(*(one(client, i) for i in range(4 * LIMIT)))  # 4x the bound

    outcomes = asyncio.run(main())
    admitted = [r for kind, r, _ in outcomes if kind == "ok"]
    refused = [(r, s) for kind, r, s in outcomes if kind == "refused"]
    assert len(admitted) >= LIMIT and refused
    assert all(len(r.token_ids) == 200 and r.finish_reason == "length" for r in admitted)
    assert all("--max-inflight" in str(exc) and "retry after" in str(exc) for exc, _ in refused)
    assert max(s for _, s in refused) < min(s for kind, _, s in outcomes if kind == "ok")  # told at once
    with Client(bounded.address) as client:  # the bound frees up: new requests are admitted again
        assert client.complete(prompt_token_ids=[5, 6], max_tokens=2, temperature=0.0).finish_reason == "length"
