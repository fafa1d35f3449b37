"""The router's admission control: a bound, a FIFO queue before it, refusals told at once."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.errors import CapacityError, DeadlineError
from pdserve.routing.admission import Admission


def run(coro):
    return asyncio.run(coro)


def test_beyond_bound_and_queue_refused_at_once_with_a_retry_hint():
    async def main():
        a = Admission(max_inflight=2, max_queue=1, queue_timeout_s=5)
        await a.acquire("r1")
        await a.acquire("r2")
        waiting = asyncio.ensure_future(a.acquire("r3"))
        await asyncio.sleep(0)
        assert a.queued == 1 and not waiting.done()
        with pytest.raises(CapacityError) as err:
            await a.acquire("r4")
        assert err.value.retry_after_s == 1.0
        assert "--max-queue 1" in str(err.value) and "retry after" in str(err.value)
        a.release()  # r1 ends: its slot goes to r3
        await asyncio.wait_for(waiting, 1)
        assert a.inflight == 2 and a.queued == 0
        a.release()
        a.release()
        assert a.inflight == 0

    run(main())


def test_waiters_are_served_in_arrival_order():
    async def main():
        a = Admission(max_inflight=1, max_queue=10)
        await a.acquire("first")
        order = []

        async def one(name):
            await a.acquire(name)
            order.append(name)

        tasks = [asyncio.ensure_future(one(f"w{i}")) for i in range(5)]
        await asyncio.sleep(0)
        for _ in range(6):
            a.release()
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert order == [f"w{i}" for i in range(5)]

    run(main())


def test_queue_timeout_and_client_deadline():
    async def main():
        a = Admission(max_inflight=1, max_queue=5, queue_timeout_s=0.05)
        await a.acquire("busy")
        with pytest.raises(CapacityError, match="--queue-timeout-s"):
            await a.acquire("patient")
        with pytest.raises(DeadlineError, match="admission queue"):
            await a.acquire("hurried", timeout_s=0.01)
        assert a.queued == 0 and a.inflight == 1

    run(main())


def test_a_waiter_that_leaves_loses_no_slot():
    async def main():
        a = Admission(max_inflight=1, max_queue=5)
        await a.acquire("busy")
        leaving = asyncio.ensure_future(a.acquire("leaving"))
        staying = asyncio.ensure_future(a.acquire("staying"))
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0.01)
        assert a.queued == 1
        a.release()
        await asyncio.wait_for(staying, 1)
        # A slot handed to a waiter in the same instant it leaves is passed on, not lost.
        handed = asyncio.ensure_future(a.acquire("handed"))
        after = asyncio.ensure_future(a.acquire("after"))
        await asyncio.sleep(0)
        a.release()  # resolves handed's future...
        handed.cancel()  # ...which leaves before it runs
        await asyncio.sleep(0.01)
        if not handed.cancelled():  # (the wait ended before the cancellation landed: handed holds it)
            a.release()
        await asyncio.wait_for(after, 1)
        assert a.inflight == 1 and a.queued == 0

    run(main())


def test_no_bound_means_no_queue():
    async def main():
        a = Admission(max_inflight=0)
        for i in range(1000):
            await a.acquire(str(i))
        assert a.inflight == 1000

    run(main())
