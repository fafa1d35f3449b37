"""Slow readers: a response stream whose reader stopped reading must not hold resources.

A streaming handler's send blocks once the reader's flow-control window is full. The
handler marks each send (`Watch.sending` / `Watch.sent`); a sweeper, once per quarter of
the timeout, finds sends blocked longer than `timeout_s` and stalls those streams: the
stream's `on_stall` runs once (it frees what the request holds: the engine request and
its KV blocks, or the call upstream), and `Watch.stalled` tells the handler, when its
send finally returns, to end the stream with an error instead of going on.

Neither gRPC nor aiohttp can end a call whose send is blocked (the status would queue
behind the data), so the call itself stays open, holding at most one flow-control window
of bytes, until the reader reads (and gets the error), leaves, or its deadline passes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable

from pdserve.errors import CapacityError

log = logging.getLogger("pdserve.streams")

DEFAULT_TIMEOUT_S = 30.0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slow-reader-timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="abort a request whose client has not read its stream for this long (0: never)")


class Watch:
    """One response stream's sends. `since` is when the pending send started (0: none pending)."""

    __slots__ = ("since", "stalled", "on_stall", "what", "timeout_s", "_count")

    def __init__(self, what: str, timeout_s: float, on_stall: Callable[[], None] | None = None,
                 count: Callable[[], None] | None = None) -> None:
        self.what = what
        self.timeout_s = timeout_s
        self.on_stall = on_stall  # may be set later, e.g. once the upstream call exists
        self._count = count
        self.since = 0.0
        self.stalled = False

    def sending(self) -> None:
        self.since = time.monotonic()

    def sent(self) -> None:
        self.since = 0.0

    def stall(self, reason: str) -> None:
        """Give up on this stream's reader (once): free what it holds."""
        if self.stalled:
            return
        self.stalled = True
        log.warning("%s: %s; aborting it", self.what, reason)
        if self._count is not None:
            self._count()
        if self.on_stall is not None:
            self.on_stall()

    def error(self, request_id: str | None = None) -> CapacityError:
        return CapacityError(f"the client stopped reading the response stream (no send completed within "
                             f"{self.timeout_s:g} s, or its output backlog was full); the request was aborted",
                             request_id=request_id)


class SlowReaders:
    """The watches of one daemon's response streams, and the sweeper that stalls blocked ones."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, count: Callable[[], None] | None = None) -> None:
        self.timeout_s = timeout_s  # 0: never stall a stream
        self._count = count  # called once per stalled stream, e.g. a metric's counter
        self._watches: set[Watch] = set()
        self._sweeper: asyncio.Task | None = None

    def watch(self, what: str, on_stall: Callable[[], None] | None = None) -> Watch:
        """A new stream's watch; `release` it when the stream ends."""
        w = Watch(what, self.timeout_s, on_stall, self._count)
        if self.timeout_s > 0:
            self._watches.add(w)
            if self._sweeper is None or self._sweeper.done():
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="slow-readers")
        return w

    def release(self, w: Watch) -> None:
        self._watches.discard(w)

    def sweep(self, now: float) -> None:
        for w in list(self._watches):
            if w.since and now - w.since > self.timeout_s:
                w.stall(f"a send has been blocked for {now - w.since:.1f} s")

    async def _sweep(self) -> None:
        while self._watches:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            self.sweep(time.monotonic())
