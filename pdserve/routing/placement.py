"""The placement policy: which decode worker serves a request, and which prefill workers
it should pull the prompt's KV from, in order.

Decode worker: power of two choices among the HEALTHY decode workers not excluded. Two
are sampled at random (the only one is taken when there is one) and the better wins:
  (a) KV room first. Estimated free blocks = the reported `kv_num_free` minus the blocks
      of the requests the router placed there since (`in_flight * ceil(estimate /
      block_size)`, a rough but cheap guess). A worker whose estimate cannot hold the
      prompt loses to any that can: it would refuse the KV header (RESOURCE_EXHAUSTED)
      and cost a retry.
  (b) Then fewer running + waiting + in-flight requests; then more free blocks; then the
      smaller id, so the choice is a function of the state and the rng.
Why two random choices rather than the best of all: load reports are up to a heartbeat
old, and every request placed before the next report would pile onto the same "best"
worker (herding). Sampling two keeps most of the benefit of choosing by load, but
spreads requests between reports; `in_flight` corrects the reports in between.

Prefill candidates: HEALTHY prefill workers compatible with the chosen decode worker
(equal model fingerprint, KV layout and preprocessing version, with unknown values from
static registration matching anything, and the pair not marked incompatible), ordered
by pending prefill tokens + in_flight * estimate, least first, at most
`max_prefill_candidates`. The decode worker tries them in order and prefills locally
when the list is empty or all fail.

Prefix affinity (`pdserve.routing.prefix_affinity`): given the request's prefix keys, a decode
worker thought to hold a longer prefix of the prompt in its KV cache (the router sent it an
earlier turn of the conversation) is taken instead of the two-choice winner when the prompt
fits there and it runs at most `affinity_slack` more requests: its cached blocks need neither
prefill compute nor transfer. Prefill candidates are ordered by the work a prompt would add:
pending tokens plus the prompt's tokens not thought cached there.

`place` does not record its choice: the caller holds the placement (`hold`) while the request
runs there, which counts it in flight on its decode worker and first prefill candidate and
remembers the prefix they will hold.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass

from pdserve.errors import UnavailableError
from pdserve.routing.prefix_affinity import PrefixIndex
from pdserve.routing.registry import Registry, Role, Worker


@dataclass(frozen=True)
class Placement:
    decode: Worker
    prefills: list[Worker]  # candidates for the decode worker to try, best first; may be empty
    reason: str  # why, for logs and traces


@dataclass(frozen=True)
class DecodeScore:
    """How a decode worker looks for one prompt; smaller `key` is better."""

    fits: bool
    free_blocks: int  # estimated, after the router's own placements since the report
    num_requests: int  # running + waiting + in flight

    @property
    def key(self) -> tuple[bool, int, int]:
        return (not self.fits, self.num_requests, -self.free_blocks)


def decode_score(worker: Worker, num_tokens: int) -> DecodeScore:
    load = worker.load
    num_requests = load.num_running + load.num_waiting + worker.in_flight
    if load.kv_block_size == 0:
        # No KV pool reported yet (a static worker before its first poll): no known room.
        return DecodeScore(fits=False, free_blocks=0, num_requests=num_requests)
    need = math.ceil(num_tokens / load.kv_block_size)
    free = load.kv_num_free - worker.in_flight * need
    return DecodeScore(fits=free >= need, free_blocks=free, num_requests=num_requests)


def prefill_score(worker: Worker, num_tokens: int, num_cached_tokens: int = 0) -> int:
    """Prompt tokens this prefill worker would compute before and for a new prompt (estimated)."""
    return worker.load.num_pending_prefill_tokens + worker.in_flight * num_tokens + num_tokens - num_cached_tokens


def compatible(registry: Registry, prefill: Worker, decode: Worker) -> bool:
    return prefill.info.compatible_with(decode.info) and not registry.is_incompatible(
        prefill.worker_id, decode.worker_id
    )


class Placer:
    """Chooses a decode worker and prefill candidates for each request; see the module."""

    def __init__(
        self,
        registry: Registry,
        *,
        rng: random.Random | None = None,
        max_prefill_candidates: int = 3,
        affinity_slack: int = 8,
    ) -> None:
        if max_prefill_candidates < 0:
            raise ValueError(f"max_prefill_candidates must be >= 0, got {max_prefill_candidates}")
        self.registry = registry
        self.rng = rng if rng is not None else random.Random()
        self.max_prefill_candidates = max_prefill_candidates
        self.affinity_slack = affinity_slack  # < 0: prefixes are ignored
        self.prefixes = PrefixIndex()

    @property
    def uses_prefixes(self) -> bool:
        """False: prefixes are ignored, so callers need not compute a request's keys."""
        return self.affinity_slack >= 0

    def place(
        self, num_prompt_tokens_estimate: int, *, exclude_decode: Set[str] = frozenset(),
        version: str | None = None, prefix_keys: Sequence[int] = (),
    ) -> Placement:
        """Pick a decode worker and its prefill candidates for a prompt of about this size.

        `version`: only workers with that rollout label (None: any); `prefix_keys`: the
        request's (`prefix_affinity.block_keys`). Raises UnavailableError when no healthy
        decode worker is left after `exclude_decode`.
        """
        if num_prompt_tokens_estimate < 0:
            raise ValueError(
                f"num_prompt_tokens_estimate must be >= 0, got {num_prompt_tokens_estimate}"
            )
        decodes = [
            w for w in self.registry.healthy(Role.DECODE)
            if w.worker_id not in exclude_decode and version in (None, w.info.version)
        ]
        if not decodes:
            raise UnavailableError("no healthy decode worker" + (f" of version {version!r}" if version else ""))
        keys = prefix_keys if self.uses_prefixes else ()
        decode, how = self._choose_decode(decodes, num_prompt_tokens_estimate, keys)
        prefills = self._prefill_candidates(decode, num_prompt_tokens_estimate, version, keys)
        reason = _describe(decode, how, prefills, num_prompt_tokens_estimate)
        return Placement(decode=decode, prefills=prefills, reason=reason)

    @contextlib.contextmanager
    def hold(self, placement: Placement, prefix_keys: Sequence[int]) -> Iterator[None]:
        """The request runs on these workers for the block: counted in their in_flight, and
        their prefix remembered."""
        self.placed(placement, prefix_keys)
        workers = [w.worker_id for w in [placement.decode, *placement.prefills[:1]]]
        for worker_id in workers:
            self.registry.begin(worker_id)
        try:
            yield
        finally:
            for worker_id in workers:
                self.registry.finish(worker_id)

    def placed(self, placement: Placement, prefix_keys: Sequence[int]) -> None:
        """The request goes to these workers: they will hold its prefix."""
        if not self.uses_prefixes:
            return
        for worker in [placement.decode, *placement.prefills[:1]]:
            self.prefixes.record(worker.worker_id, prefix_keys, worker.load.kv_num_total * worker.load.kv_block_size)

    def forget(self, worker_id: str) -> None:
        """The worker (re)registered: whatever it cached is gone."""
        self.prefixes.forget(worker_id)

    def _choose_decode(self, decodes: list[Worker], num_tokens: int, keys: Sequence[int]) -> tuple[Worker, str]:
        """The better of two sampled workers, or one holding more of the prefix; and why."""
        sampled = decodes if len(decodes) == 1 else self.rng.sample(decodes, 2)
        best = min(sampled, key=lambda w: (decode_score(w, num_tokens).key, w.worker_id))
        how = "only candidate" if len(sampled) == 1 else "p2c of " + ",".join(sorted(w.worker_id for w in sampled))
        if not keys:
            return best, how
        matches = {w.worker_id: self.prefixes.match(w.worker_id, keys) for w in decodes}
        warm = max(decodes, key=lambda w: (matches[w.worker_id], -decode_score(w, num_tokens).num_requests))
        if matches[warm.worker_id] > matches[best.worker_id]:
            score, best_score = decode_score(warm, num_tokens), decode_score(best, num_tokens)
            if score.fits and score.num_requests <= best_score.num_requests + self.affinity_slack:
                best, how = warm, "prefix affinity"
        return best, f"{how}; holds {matches[best.worker_id]} of {len(keys)} prefix blocks"

    def _prefill_candidates(self, decode: Worker, num_tokens: int, version: str | None,
                            keys: Sequence[int]) -> list[Worker]:
        matching = [
            w
            for w in self.registry.healthy(Role.PREFILL)
            if compatible(self.registry, w, decode) and version in (None, w.info.version)
        ]

        def cached(w: Worker) -> int:  # prompt tokens thought cached there
            return num_tokens * self.prefixes.match(w.worker_id, keys) // len(keys) if keys else 0

        matching.sort(key=lambda w: (prefill_score(w, num_tokens, cached(w)), w.worker_id))
        return matching[: self.max_prefill_candidates]


def _describe(decode: Worker, how: str, prefills: list[Worker], num_tokens: int) -> str:
    score = decode_score(decode, num_tokens)
    room = f"{score.free_blocks} free blocks"
    if not score.fits:
        room += " (too few for the prompt)"
    text = f"decode {decode.worker_id}: {room}, {score.num_requests} requests ({how})"
    if not prefills:
        return text + "; no compatible prefill: decode prefills locally"
    first = prefills[0]
    return text + f"; prefill {first.worker_id}: {first.load.num_pending_prefill_tokens} pending tokens"
