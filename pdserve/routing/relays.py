"""The router's decode calls in flight, and the ones held by a worker that stopped answering.

A decode worker that freezes (SIGSTOP, a paused VM, a wedged host) keeps its connections
open: its streams just go quiet, and gRPC's keepalive notices only after its ping timeout
(15 s with the daemons' settings). Its heartbeats stop as well, which the router sees
within the heartbeat timeout. `sweep`, run once per heartbeat interval, cancels each relay
whose worker is unresponsive (`Registry.unresponsive`) and that has itself received nothing
for a heartbeat timeout; the request then moves to another worker as if its own had died.
Both conditions are needed: a worker that misses heartbeats under load but still streams
keeps its requests, and a quiet stream on a live worker (a long local prefill) is left alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pdserve.routing.registry import Registry

log = logging.getLogger("pdserve.router")


@dataclass(eq=False)
class Relay:
    """One decode call the router relays."""

    worker_id: str
    cancel: Callable[[], object]
    clock: Callable[[], float] = time.monotonic
    last_message: float = field(init=False)
    lost: bool = False  # cancelled by `sweep`: the worker stopped answering

    def __post_init__(self) -> None:
        self.last_message = self.clock()

    def received(self) -> None:
        self.last_message = self.clock()


class Relays:
    def __init__(self, registry: Registry, now: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self._now = now
        self._active: set[Relay] = set()

    @contextmanager
    def track(self, worker_id: str, cancel: Callable[[], object]) -> Iterator[Relay]:
        relay = Relay(worker_id, cancel, self._now)
        self._active.add(relay)
        try:
            yield relay
        finally:
            self._active.discard(relay)

    def sweep(self) -> list[Relay]:
        """Cancel the relays of unresponsive workers that have been silent for a heartbeat timeout."""
        now, timeout = self._now(), self.registry.heartbeat_timeout_s
        lost = [r for r in self._active if not r.lost and now - r.last_message >= timeout
                and self.registry.unresponsive(r.worker_id)]
        for relay in lost:
            log.warning("decode %s stopped answering: a stream silent for %.1f s while the worker misses its "
                        "heartbeats; moving the request", relay.worker_id, now - relay.last_message)
            relay.lost = True
            relay.cancel()
        return lost

    async def watch(self) -> None:
        """Sweep once per heartbeat interval, until cancelled."""
        while True:
            await asyncio.sleep(self.registry.heartbeat_interval_s)
            self.sweep()
