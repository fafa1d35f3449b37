"""One request's way through the decode workers: placed, placed again before its first token,
moved after it (migration), or failed. No gRPC and no protobuf: the router hands in the call to
a decode worker as a function, and tests drive the whole state machine with fake workers and a
fake clock.

The rules, for each attempt on a decode worker:
1. placement: when no decode worker that could take the request is healthy for now (missed
   heartbeats, a restart), wait for one, at most `placement_wait_s` and the deadline; a request
   no registered worker could ever take (e.g. an unknown version) fails at once;
2. the call's messages are relayed as they come; its end ends the request;
3. the call fails with UNAVAILABLE after tokens went out (the worker died, drained or froze):
   the request resumes on another decode worker after those tokens, the failed worker marked
   down; at most `migration_limit` moves. A request that cannot resume from one token list
   (n > 1 samples: not `resumable`) fails with the error instead;
4. it fails before anything went out with a status another worker may not share
   (UNAVAILABLE, RESOURCE_EXHAUSTED, FAILED_PRECONDITION): placed again elsewhere, at most
   `max_placements` attempts; UNAVAILABLE marks the worker down, FAILED_PRECONDITION the
   (prefill, decode) pair incompatible for good;
5. any other failure ends the request with its error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence, Set
from dataclasses import dataclass
from typing import Any

from pdserve.errors import PdserveError, UnavailableError
from pdserve.routing.placement import Placement, Placer
from pdserve.routing.registry import Registry, Role

MAX_PLACEMENTS = 3
PLACEMENT_POLL_S = 0.05  # how often a request waiting for a healthy decode worker looks again
# Status names of a decode call, before its first token, after which another worker may serve.
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"})


@dataclass(frozen=True)
class Relayed:
    """One message of a decode call, as the route needs to see it; `message` goes out untouched."""

    message: Any
    token_ids: Sequence[int] = ()  # a delta's tokens
    final: bool = False  # the result, the call's last message


class CallFailed(Exception):
    """A decode call ended with a status: its name (a grpc.StatusCode's) and the error it stands for."""

    def __init__(self, code: str, error: PdserveError) -> None:
        super().__init__(f"{code}: {error}")
        self.code = code
        self.error = error


# (placement, tokens already sent to the client) -> the call's messages; raises CallFailed.
StartCall = Callable[[Placement, list[int]], AsyncIterator[Relayed]]
# (excluded decode worker ids, attempt) -> a placement; UnavailableError when none is healthy.
Place = Callable[[Set[str], int], Placement]


@dataclass
class RouteLimits:
    max_placements: int = MAX_PLACEMENTS
    migration_limit: int = 3
    placement_wait_s: float = 5.0
    poll_s: float = PLACEMENT_POLL_S


class Route:
    """Runs one request to its end; see the module docstring. `on_retry(placement, code, error)` and
    `on_migrate(placement, num_tokens_sent, error)` observe the rules' decisions (logs, traces, metrics)."""

    def __init__(self, request_id: str, placer: Placer, place: Place, *, prefix_keys: Sequence[int] = (),
                 version: str | None = None, resumable: bool = True, deadline: float | None = None, limits: RouteLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_retry: Callable[[Placement, str, PdserveError], None] | None = None,
                 on_migrate: Callable[[Placement, int, PdserveError], None] | None = None) -> None:
        self.request_id = request_id
        self.placer = placer
        self.registry: Registry = placer.registry
        self.limits = limits or RouteLimits()
        self.generated: list[int] = []  # token ids already relayed to the client
        self.excluded: set[str] = set()  # decode workers not to try again
        self.num_attempts = 0  # placements that failed before a first token
        self.num_migrations = 0
        self._place = place
        self._prefix_keys = prefix_keys
        self._version = version
        self._resumable = resumable  # whether a request cut mid-generation may continue elsewhere (n == 1)
        self._deadline = deadline  # on `clock`
        self._clock = clock
        self._sleep = sleep
        self._on_retry = on_retry
        self._on_migrate = on_migrate

    async def run(self, start_call: StartCall) -> AsyncIterator[Any]:
        """The messages to relay, from whichever decode worker serves; raises the request's error."""
        rid = self.request_id
        last_error: PdserveError = UnavailableError("no healthy decode worker", request_id=rid)
        while self.num_attempts < self.limits.max_placements:
            try:
                placement = await self._place_when_possible()
            except UnavailableError as exc:
                if not (self.num_attempts or self.num_migrations):
                    last_error = UnavailableError(str(exc), request_id=rid)
                break
            sent_here = False
            try:
                with self.placer.hold(placement, self._prefix_keys):
                    async with contextlib.aclosing(start_call(placement, list(self.generated))) as messages:
                        async for item in messages:
                            if not item.final:
                                self.generated.extend(item.token_ids)
                            sent_here = True
                            yield item.message
                return
            except CallFailed as failed:
                code, last_error = failed.code, failed.error
            decode_id = placement.decode.worker_id
            if self.generated and code == "UNAVAILABLE" and self._resumable:
                if self.num_migrations >= self.limits.migration_limit:
                    raise UnavailableError(
                        f"decode worker {decode_id} failed mid-generation and the request already moved "
                        f"{self.num_migrations} times (--migration-limit {self.limits.migration_limit})",
                        request_id=rid)
                self.num_migrations += 1
                self.registry.mark_failed(decode_id)
                self.excluded.add(decode_id)
                if self._on_migrate is not None:
                    self._on_migrate(placement, len(self.generated), last_error)
                continue
            if sent_here or self.generated or code not in RETRYABLE:
                raise last_error
            if code == "UNAVAILABLE":
                self.registry.mark_failed(decode_id)
            elif code == "FAILED_PRECONDITION" and placement.prefills:
                self.registry.incompatible(placement.prefills[0].worker_id, decode_id)
            if self._on_retry is not None:
                self._on_retry(placement, code, last_error)
            self.excluded.add(decode_id)
            self.num_attempts += 1
        raise last_error

    async def _place_when_possible(self) -> Placement:
        until = self._clock() + self.limits.placement_wait_s
        if self._deadline is not None:
            until = min(until, self._deadline)
        while True:
            try:
                return self._place(self.excluded, self.num_attempts)
            except UnavailableError:
                known = [w for w in self.registry.all() if w.role == Role.DECODE and w.worker_id not in self.excluded
                         and self._version in (None, w.info.version)]
                if not known or self._clock() >= until:
                    raise
                await self._sleep(self.limits.poll_s)
