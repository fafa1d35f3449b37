"""Slow readers: a send blocked past the timeout stalls its stream, once, and frees what it holds."""

from __future__ import annotations

import asyncio

from pdserve.errors import CapacityError
from pdserve.server.streams import SlowReaders


def test_a_blocked_send_stalls_its_stream_once_and_others_are_untouched():
    counted, freed = [], []
    readers = SlowReaders(timeout_s=10, count=lambda: counted.append(1))

    async def main():
        slow = readers.watch("slow", on_stall=lambda: freed.append("slow"))
        fast = readers.watch("fast", on_stall=lambda: freed.append("fast"))
        slow.sending()
        slow.since -= 11  # blocked for 11 s
        fast.sending()
        fast.sent()
        readers.sweep(slow.since + 11.5)
        readers.sweep(slow.since + 20)
        assert slow.stalled and not fast.stalled
        assert freed == ["slow"] and counted == [1]
        err = slow.error("r1")
        assert isinstance(err, CapacityError) and "stopped reading" in str(err) and "10 s" in str(err)
        readers.release(slow)
        readers.release(fast)

    asyncio.run(main())


def test_the_sweeper_runs_by_itself_and_zero_means_never():
    freed = []

    async def main():
        readers = SlowReaders(timeout_s=0.08)
        w = readers.watch("stuck", on_stall=lambda: freed.append(1))
        w.sending()
        await asyncio.sleep(0.3)
        assert freed == [1]
        readers.release(w)
        never = SlowReaders(timeout_s=0)
        w2 = never.watch("stuck")
        w2.sending()
        await asyncio.sleep(0.05)
        assert not w2.stalled

    asyncio.run(main())
