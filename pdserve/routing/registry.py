"""The router's record of its workers: who they are, what load they report, whether they
may be placed on.

A worker's life in the registry:
  1. `register` (or `add_static` for an address from the command line) creates the
     record, HEALTHY. A registration at an address that already has a record under
     another id is a restart: the old record is dropped with everything remembered
     about it (in-flight count, incompatible pairs).
  2. `heartbeat` refreshes the load and the health (HEALTHY, or DRAINING when the
     worker says it is shutting down). An unknown id gets False: re-register.
  3. `mark_failed` (the router could not reach it) makes it UNHEALTHY at once, and
     `expire` makes it UNHEALTHY after `missed_heartbeats` silent intervals; the next
     successful heartbeat makes it HEALTHY again.
  4. `expire` removes a worker silent for ten times that long, and `remove` at once.

Statically configured workers (`add_static`) do not heartbeat: the router polls their
Stats and calls `heartbeat` on their behalf, or `mark_failed` when the poll fails. They
never expire for silence, and their fingerprint, preprocessing version and KV layout are
unknown (None), which makes them compatible with any peer; the decode worker still
checks the fingerprint in the KV header, so a wrong pairing fails loudly, not silently.

The registry also keeps the router-side count of requests in flight per worker (load
moves between heartbeats) and the prefill/decode pairs that failed with
FAILED_PRECONDITION, so placement never tries such a pair again.
"""

from __future__ import annotations

import enum
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from pdserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

# A worker silent this many times longer than the unhealthy threshold is presumed gone
# for good; keeping it would only grow the table (workers that come back re-register).
_REMOVE_FACTOR = 10


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class Health(enum.Enum):
    HEALTHY = "healthy"
    DRAINING = "draining"  # alive, finishing its requests, takes no new ones
    UNHEALTHY = "unhealthy"  # missed heartbeats or refused a connection


@dataclass(frozen=True)
class Load:
    """The load a worker reports at registration and in each heartbeat.

    A worker with `kv_num_total == 0` has reported no KV pool (a static worker before its
    first poll); placement treats it as having no room.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_pending_prefill_tokens: int = 0
    kv_num_total: int = 0
    kv_num_free: int = 0  # includes cached blocks nobody holds, which are reusable
    kv_num_cached: int = 0
    kv_block_size: int = 0
    # Reported for display (`pdserve top`), not used for placement.
    kv_prefix_hit_rate: float = 0.0
    output_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    p99_ttft_ms: float = 0.0
    p99_itl_ms: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise InvalidRequestError(f"load.{f.name}", "must be >= 0")
        if self.kv_num_free > self.kv_num_total:
            raise InvalidRequestError(
                "load.kv_num_free", f"{self.kv_num_free} exceeds kv_num_total {self.kv_num_total}"
            )
        if self.kv_num_total > 0 and self.kv_block_size == 0:
            raise InvalidRequestError("load.kv_block_size", "must be > 0 when kv_num_total > 0")


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker registers with. None means unknown (a statically configured worker)."""

    role: Role
    address: str  # host:port
    model_fingerprint: str | None  # opaque; workers are paired only when equal
    preprocessing_version: str | None  # tokenizer + chat template; must match to pair
    kv_layout: str | None  # opaque (layers, KV heads, head dim, dtype); must match to pair
    version: str = ""  # rollout label (--version); requests may be split over versions

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            raise InvalidRequestError("role", f"must be a Role, got {self.role!r}")
        if not self.address:
            raise InvalidRequestError("address", "is required (host:port)")
        for name in ("model_fingerprint", "preprocessing_version", "kv_layout"):
            # An empty string is almost surely an unset proto field; say None for unknown.
            if getattr(self, name) == "":
                raise InvalidRequestError(name, "is empty (use None for unknown)")

    def compatible_with(self, other: WorkerInfo) -> bool:
        """True when KV from one can feed the other; unknown fields match anything."""
        return all(
            _same_or_unknown(getattr(self, name), getattr(other, name))
            for name in ("model_fingerprint", "preprocessing_version", "kv_layout")
        )


def _same_or_unknown(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b


@dataclass
class Worker:
    """The registry's mutable record of one worker."""

    worker_id: str
    info: WorkerInfo
    load: Load
    health: Health
    last_heartbeat: float  # clock time of the last registration or heartbeat
    registered_at: float
    # Requests the router placed here and has not seen finish: router-side accounting,
    # so placement reacts to its own decisions between heartbeats.
    in_flight: int = 0
    failures: int = 0  # consecutive failures the router reported; reset by a heartbeat
    static: bool = False  # from --prefill-addr/--decode-addr: polled, never expires

    @property
    def role(self) -> Role:
        return self.info.role

    @property
    def address(self) -> str:
        return self.info.address


class Registry:
    """Workers by id, with heartbeat-driven health. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        heartbeat_interval_s: float = 1.0,
        missed_heartbeats: int = 3,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be > 0, got {heartbeat_interval_s}")
        if missed_heartbeats < 1:
            raise ValueError(f"missed_heartbeats must be >= 1, got {missed_heartbeats}")
        self.heartbeat_interval_s = heartbeat_interval_s
        self.missed_heartbeats = missed_heartbeats
        self._now = now
        self._workers: dict[str, Worker] = {}
        self._by_address: dict[str, str] = {}
        self._incompatible: set[tuple[str, str]] = set()  # (prefill_id, decode_id)
        self._next_id = itertools.count(1)

    @property
    def heartbeat_timeout_s(self) -> float:
        """Silence after which a worker is UNHEALTHY (for RegisterResponse)."""
        return self.heartbeat_interval_s * self.missed_heartbeats

    # -- membership ---------------------------------------------------------------

    def register(self, worker_id: str | None, info: WorkerInfo, load: Load) -> str:
        """Add or refresh a worker; returns its id (assigned when `worker_id` is None or "")."""
        now = self._now()
        wid = worker_id if worker_id else self._new_id(info.role)
        self._evict_other_at(info.address, wid)
        worker = self._workers.get(wid)
        if worker is None:
            worker = Worker(wid, info, load, Health.HEALTHY, now, registered_at=now)
            self._workers[wid] = worker
        else:
            # Same id again: a reconnect, or a restart that kept its id. Its info may
            # have changed, so old verdicts about its pairs no longer hold. in_flight
            # stays: the router still calls finish() for each request it placed.
            self._by_address.pop(worker.address, None)
            self._forget_pairs(wid)
            worker.info, worker.load, worker.last_heartbeat = info, load, now
            worker.health, worker.failures, worker.static = Health.HEALTHY, 0, False
        self._by_address[info.address] = wid
        return wid

    def add_static(self, role: Role, address: str) -> str:
        """Add a worker from a static address list; see the module docstring.

        It starts HEALTHY with an empty load, so it can be placed before the first poll
        (a dead one is found by the first connection and `mark_failed`). Adding an
        address twice returns the existing id.
        """
        existing = self._by_address.get(address)
        if existing is not None:
            worker = self._workers[existing]
            if worker.role is not role:
                raise ValueError(f"{address} is already a {worker.role.value} worker")
            return existing
        info = WorkerInfo(role, address, None, None, None)
        now = self._now()
        wid = self._new_id(role)
        self._workers[wid] = Worker(
            wid, info, Load(), Health.HEALTHY, now, registered_at=now, static=True
        )
        self._by_address[address] = wid
        return wid

    def remove(self, worker_id: str) -> None:
        """Forget a worker and everything remembered about it; unknown ids are ignored."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return
        if self._by_address.get(worker.address) == worker_id:
            del self._by_address[worker.address]
        self._forget_pairs(worker_id)

    # -- health -------------------------------------------------------------------

    def heartbeat(self, worker_id: str, load: Load, draining: bool = False) -> bool:
        """Record a load report; False when the id is unknown (the worker must re-register)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return False
        worker.load = load
        worker.last_heartbeat = self._now()
        worker.health = Health.DRAINING if draining else Health.HEALTHY
        worker.failures = 0
        return True

    def mark_failed(self, worker_id: str) -> None:
        """The router could not reach the worker: UNHEALTHY until its next heartbeat."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return
        worker.health = Health.UNHEALTHY
        worker.failures += 1

    def expire(self) -> list[str]:
        """Mark silent workers UNHEALTHY (their ids are returned); remove long-silent ones."""
        now = self._now()
        newly_unhealthy: list[str] = []
        for worker in self.all():
            if worker.static:
                continue
            silence = now - worker.last_heartbeat
            if silence >= self.heartbeat_timeout_s * _REMOVE_FACTOR:
                log.info("removing worker %s (%s): silent for %.1fs",
                         worker.worker_id, worker.address, silence)
                self.remove(worker.worker_id)
            elif silence >= self.heartbeat_timeout_s and worker.health is not Health.UNHEALTHY:
                worker.health = Health.UNHEALTHY
                newly_unhealthy.append(worker.worker_id)
        return newly_unhealthy

    def healthy(self, role: Role) -> list[Worker]:
        """Workers of `role` that may take new requests now, sorted by id.

        Freshness is checked here too, so a worker that went silent is never placed on
        even if `expire` has not run since.
        """
        now = self._now()
        return [
            w
            for w in self.all()
            if w.role is role and w.health is Health.HEALTHY and self._fresh(w, now)
        ]

    def unresponsive(self, worker_id: str) -> bool:
        """The worker missed its heartbeats, could not be reached, or is gone."""
        worker = self._workers.get(worker_id)
        return worker is None or worker.health is Health.UNHEALTHY or not self._fresh(worker, self._now())

    def all(self) -> list[Worker]:
        return [self._workers[wid] for wid in sorted(self._workers)]

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    # -- router-side accounting ---------------------------------------------------

    def begin(self, worker_id: str) -> None:
        """The router placed a request on the worker."""
        worker = self._workers.get(worker_id)
        if worker is not None:
            worker.in_flight += 1

    def finish(self, worker_id: str) -> None:
        """A request the router placed on the worker ended (any way)."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.in_flight > 0:
            worker.in_flight -= 1

    def incompatible(self, prefill_id: str, decode_id: str) -> None:
        """Never pair these two again (until either re-registers); unknown ids are ignored."""
        if prefill_id in self._workers and decode_id in self._workers:
            self._incompatible.add((prefill_id, decode_id))

    def is_incompatible(self, prefill_id: str, decode_id: str) -> bool:
        return (prefill_id, decode_id) in self._incompatible

    # -- internals ----------------------------------------------------------------

    def _fresh(self, worker: Worker, now: float) -> bool:
        return worker.static or now - worker.last_heartbeat < self.heartbeat_timeout_s

    def _new_id(self, role: Role) -> str:
        while True:
            wid = f"{role.value}-{next(self._next_id)}"
            if wid not in self._workers:
                return wid

    def _evict_other_at(self, address: str, worker_id: str) -> None:
        """A different id at a known address is a restart: drop the old record."""
        holder = self._by_address.get(address)
        if holder is not None and holder != worker_id:
            log.info("worker %s replaces %s at %s", worker_id, holder, address)
            self.remove(holder)

    def _forget_pairs(self, worker_id: str) -> None:
        self._incompatible = {p for p in self._incompatible if worker_id not in p}
