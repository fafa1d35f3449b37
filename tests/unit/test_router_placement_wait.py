"""The router waits a little for a decode worker that is unhealthy for now; it never waits for one
that does not exist."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.errors import UnavailableError
from pdserve.router.placement import Placer
from pdserve.router.registry import Load, Registry, Role, WorkerInfo
from pdserve.server.router import RouterServicer
from pdserve.v1 import common_pb2

REQUEST = common_pb2.GenerateRequest(prompt="hi")


def router(wait_s: float) -> tuple[RouterServicer, Registry, str]:
    registry = Registry(heartbeat_interval_s=1.0)
    decode = registry.register(None, WorkerInfo(Role.DECODE, "127.0.0.1:1", "m", "p", "l", "v1"),
                               Load(kv_num_total=100, kv_num_free=100, kv_block_size=16))
    return RouterServicer(registry, Placer(registry), placement_wait_s=wait_s), registry, decode


def test_a_request_waits_for_a_decode_worker_that_comes_back():
    async def main():
        servicer, registry, decode = router(wait_s=5.0)
        registry.mark_failed(decode)  # e.g. missed heartbeats under load
        started = time.monotonic()
        placing = asyncio.ensure_future(servicer._place_when_possible(REQUEST, [], set(), 0, None, started, None))
        await asyncio.sleep(0.2)
        assert not placing.done()
        registry.heartbeat(decode, Load(kv_num_total=100, kv_num_free=100, kv_block_size=16))  # it answers again
        placement = await asyncio.wait_for(placing, 1.0)
        assert placement.decode.worker_id == decode

    asyncio.run(main())


def test_the_wait_is_bounded_by_the_option_and_the_deadline():
    async def main():
        servicer, registry, decode = router(wait_s=0.3)
        registry.mark_failed(decode)
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await servicer._place_when_possible(REQUEST, [], set(), 0, None, started, None)
        assert 0.3 <= time.monotonic() - started < 1.0
        servicer.placement_wait_s = 30.0
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            await servicer._place_when_possible(REQUEST, [], set(), 0, None, started, 0.2)  # a 0.2 s deadline
        assert time.monotonic() - started < 0.6

    asyncio.run(main())


def test_no_wait_for_a_worker_that_could_never_take_the_request():
    async def main():
        servicer, registry, decode = router(wait_s=30.0)
        registry.mark_failed(decode)
        started = time.monotonic()
        for version, excluded in (("v2", set()), (None, {decode})):  # unknown version; already failed here
            with pytest.raises(UnavailableError):
                await servicer._place_when_possible(REQUEST, [], excluded, 0, version, started, None)
        assert time.monotonic() - started < 0.2

    asyncio.run(main())
