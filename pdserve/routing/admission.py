"""Admission control: a bound on the requests in the cluster and a bounded queue before it.

At most `max_inflight` requests run at once; up to `max_queue` more wait in arrival
order, each at most `queue_timeout_s` (or its own deadline, when sooner); a request
beyond the queue is refused at once. A refusal is a CapacityError (RESOURCE_EXHAUSTED)
carrying `retry_after_s`, the hint the fronts pass on (gRPC trailer, HTTP Retry-After).
A slot freed by a finished request goes straight to the oldest waiter.
"""

from __future__ import annotations

import asyncio
import collections

from pdserve.errors import CapacityError, DeadlineError

RETRY_AFTER_S = 1.0


class Admission:
    def __init__(self, max_inflight: int = 0, max_queue: int = 0, queue_timeout_s: float = 30.0) -> None:
        self.max_inflight = max_inflight  # 0: no bound (and no queue)
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, request_id: str, timeout_s: float | None = None) -> None:
        """Take one slot, waiting in the queue when all are taken; `release` it when the request ends."""
        if not self.max_inflight or (self.inflight < self.max_inflight and not self._waiters):
            self.inflight += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise self._refusal(f"{self.inflight} requests are in flight (--max-inflight {self.max_inflight}) "
                                f"and {len(self._waiters)} wait (--max-queue {self.max_queue})", request_id)
        wait_s = self.queue_timeout_s if timeout_s is None else min(self.queue_timeout_s, timeout_s)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(wait_s, 0.0))
        except asyncio.TimeoutError:
            self._forget(waiter)
            if timeout_s is not None and timeout_s <= self.queue_timeout_s:
                raise DeadlineError(f"the deadline passed after {wait_s:.2f} s in the admission queue",
                                    request_id=request_id) from None
            raise self._refusal(f"no slot freed within {wait_s:g} s in the admission queue (--queue-timeout-s)",
                                request_id) from None
        except BaseException:  # the caller left while waiting
            if waiter.done() and not waiter.cancelled():
                self.release()  # a slot was handed over just now: pass it on
            else:
                self._forget(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the oldest waiter
                return
        self.inflight -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    @staticmethod
    def _refusal(why: str, request_id: str) -> CapacityError:
        exc = CapacityError(f"{why}; retry after {RETRY_AFTER_S:g} s", request_id=request_id)
        exc.retry_after_s = RETRY_AFTER_S
        return exc
