"""A request's route over decode workers (`pdserve.routing.route`), driven with fake workers and a fake
clock: placement waits, retries before the first token, migrations after it, and their limits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pdserve.errors import CapacityError, IncompatibleError, InvalidRequestError, PdserveError, UnavailableError
from pdserve.routing.placement import Placement, Placer
from pdserve.routing.registry import Health, Load, Registry, Role, WorkerInfo
from pdserve.routing.route import CallFailed, Relayed, Route, RouteLimits

LOAD = Load(kv_num_total=100, kv_num_free=100, kv_block_size=16)


class Clock:
    """Time that moves only when the route sleeps; `on_sleep` runs at each of its sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.on_sleep: Callable[[], None] = lambda: None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep()
        await asyncio.sleep(0)


def cluster(num_decode: int = 3, num_prefill: int = 1) -> tuple[Registry, list[str], list[str]]:
    registry = Registry(heartbeat_interval_s=1.0)
    decodes = [registry.register(None, WorkerInfo(Role.DECODE, f"127.0.0.1:{10 + i}", "m", "p", "l", "v1"), LOAD)
               for i in range(num_decode)]
    prefills = [registry.register(None, WorkerInfo(Role.PREFILL, f"127.0.0.1:{20 + i}", "m", "p", "l", "v1"), LOAD)
                for i in range(num_prefill)]
    return registry, decodes, prefills


def worker(tokens: list[int], fail: tuple[str, PdserveError] | None = None, fail_after: int = 0):
    """A fake decode worker: streams `tokens` (after the ones already sent), then a result; or fails
    with `fail` after `fail_after` of them."""
    async def call(placement: Placement, generated: list[int]):
        for i, token in enumerate(tokens[len(generated):]):
            if fail is not None and i == fail_after:
                raise CallFailed(*fail)
            yield Relayed(("delta", token, placement.decode.worker_id), [token])
        if fail is not None and fail_after >= len(tokens) - len(generated):
            raise CallFailed(*fail)
        yield Relayed(("result", placement.decode.worker_id), final=True)
    return call


class Scenario:
    """A route whose calls go to the fake worker each decode worker id maps to."""

    def __init__(self, registry: Registry, behaviour: dict[str, Callable], clock: Clock | None = None,
                 limits: RouteLimits | None = None, version: str | None = None, deadline: float | None = None,
                 resumable: bool = True):
        self.registry = registry
        self.placer = Placer(registry)
        self.clock = clock or Clock()
        self.calls: list[tuple[str, list[int]]] = []  # (decode worker, tokens it was told were sent)
        self.retries: list[tuple[str, str]] = []
        self.migrations: list[tuple[str, int]] = []
        self.in_flight_seen: list[int] = []
        self.route = Route(
            "r", self.placer, lambda excluded, attempt: self.placer.place(10, exclude_decode=excluded, version=version),
            version=version, resumable=resumable, deadline=deadline, limits=limits, clock=self.clock,
            sleep=self.clock.sleep,
            on_retry=lambda p, code, error: self.retries.append((p.decode.worker_id, code)),
            on_migrate=lambda p, n, error: self.migrations.append((p.decode.worker_id, n)))
        self.behaviour = behaviour

    def start(self, placement: Placement, generated: list[int]):
        self.calls.append((placement.decode.worker_id, generated))
        self.in_flight_seen.append(self.registry.get(placement.decode.worker_id).in_flight)
        return self.behaviour[placement.decode.worker_id](placement, generated)

    def run(self) -> list:
        async def main():
            return [m async for m in self.route.run(self.start)]
        return asyncio.run(main())


def only(decodes: list[str], behaviour) -> dict[str, Callable]:
    return {d: behaviour for d in decodes}


def test_a_healthy_worker_streams_the_request_to_its_end():
    registry, decodes, _ = cluster(num_decode=1)
    s = Scenario(registry, only(decodes, worker([1, 2, 3])))
    assert s.run() == [("delta", t, decodes[0]) for t in (1, 2, 3)] + [("result", decodes[0])]
    assert s.in_flight_seen == [1] and registry.get(decodes[0]).in_flight == 0  # held while it ran, only then


def first_fails(tokens: list[int], fail: tuple[str, PdserveError], fail_after: int, called: list[str]):
    """Behaviour shared by every decode worker: the first one called fails as given, the others serve."""
    def call(placement, generated):
        called.append(placement.decode.worker_id)
        if len(called) == 1:
            return worker(tokens, fail, fail_after)(placement, generated)
        return worker(tokens)(placement, generated)
    return call


@pytest.mark.parametrize("code", ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"])
def test_a_refusal_before_the_first_token_is_placed_again_elsewhere(code):
    registry, decodes, prefills = cluster(num_decode=2)
    called: list[str] = []
    s = Scenario(registry, only(decodes, first_fails([1, 2], (code, UnavailableError("no")), 0, called)))
    out = s.run()
    bad, good = called
    assert bad != good and out == [("delta", 1, good), ("delta", 2, good), ("result", good)]
    assert s.retries == [(bad, code)] and s.route.excluded == {bad}
    assert (registry.get(bad).health == Health.UNHEALTHY) == (code == "UNAVAILABLE")
    assert registry.is_incompatible(prefills[0], bad) == (code == "FAILED_PRECONDITION")
    assert registry.get(bad).in_flight == registry.get(good).in_flight == 0


def test_other_failures_before_the_first_token_end_the_request_with_their_error():
    registry, decodes, _ = cluster(num_decode=2)
    s = Scenario(registry, only(decodes, worker([1], ("INVALID_ARGUMENT", InvalidRequestError("prompt", "bad")), 0)))
    with pytest.raises(InvalidRequestError, match="prompt: bad"):
        s.run()
    assert len(s.calls) == 1 and not s.retries


def test_placements_are_bounded():
    registry, decodes, _ = cluster(num_decode=5)
    s = Scenario(registry, only(decodes, worker([1], ("RESOURCE_EXHAUSTED", CapacityError("full")), 0)))
    with pytest.raises(CapacityError, match="full"):
        s.run()
    assert len(s.calls) == 3 and len({w for w, _ in s.calls}) == 3  # MAX_PLACEMENTS, each elsewhere


def test_a_worker_that_dies_mid_generation_is_left_and_the_request_resumes_after_the_sent_tokens():
    registry, decodes, _ = cluster(num_decode=2)
    tokens = [5, 6, 7, 8, 9]
    called: list[str] = []
    s = Scenario(registry, only(decodes, first_fails(tokens, ("UNAVAILABLE", UnavailableError("gone")), 2, called)))
    out = s.run()
    dead, other = called
    assert [m[1] for m in out[:-1]] == tokens  # every token once, in order: the client sees one stream
    assert [m[2] for m in out[:-1]] == [dead, dead, other, other, other] and out[-1] == ("result", other)
    assert s.calls == [(dead, []), (other, [5, 6])] and s.migrations == [(dead, 2)]
    assert registry.get(dead).health == Health.UNHEALTHY and dead in s.route.excluded


def test_a_request_that_cannot_resume_fails_when_its_worker_dies_mid_generation():
    """n > 1 samples cannot continue from one token list: the client gets the error, not a mix."""
    registry, decodes, _ = cluster(num_decode=2)
    s = Scenario(registry, only(decodes, worker([1, 2, 3], ("UNAVAILABLE", UnavailableError("gone")), 2)),
                 resumable=False)
    with pytest.raises(UnavailableError, match="gone"):
        s.run()
    assert len(s.calls) == 1 and not s.migrations


def test_other_failures_after_the_first_token_end_the_stream():
    registry, decodes, _ = cluster(num_decode=2)
    s = Scenario(registry, only(decodes, worker([1, 2, 3], ("RESOURCE_EXHAUSTED", CapacityError("late")), 1)))
    with pytest.raises(CapacityError, match="late"):
        s.run()
    assert len(s.calls) == 1 and not s.migrations


def test_migrations_are_bounded_by_the_limit():
    registry, decodes, _ = cluster(num_decode=4)
    s = Scenario(registry, only(decodes, worker(list(range(10)), ("UNAVAILABLE", UnavailableError("gone")), 1)),
                 limits=RouteLimits(migration_limit=2))
    with pytest.raises(UnavailableError, match="already moved 2 times"):
        s.run()
    assert len(s.migrations) == 2 and [len(g) for _, g in s.calls] == [0, 1, 2]


def test_a_request_waits_for_a_decode_worker_that_comes_back():
    registry, decodes, _ = cluster(num_decode=1)
    registry.mark_failed(decodes[0])  # e.g. missed heartbeats under load
    clock = Clock()
    sleeps = []

    def on_sleep():
        sleeps.append(clock.now)
        if len(sleeps) == 10:
            registry.heartbeat(decodes[0], LOAD)  # it answers again, 0.5 s later

    clock.on_sleep = on_sleep
    s = Scenario(registry, only(decodes, worker([1])), clock=clock)
    assert s.run()[-1] == ("result", decodes[0]) and len(sleeps) == 10


def test_the_wait_is_bounded_by_the_option_and_the_deadline():
    registry, decodes, _ = cluster(num_decode=1)
    registry.mark_failed(decodes[0])
    for limits, deadline, waited in ((RouteLimits(placement_wait_s=0.3), None, 0.3),
                                     (RouteLimits(placement_wait_s=30.0), 1000.2, 0.2)):
        clock = Clock()
        s = Scenario(registry, only(decodes, worker([1])), clock=clock, limits=limits, deadline=deadline)
        with pytest.raises(UnavailableError, match="no healthy decode worker"):
            s.run()
        assert waited <= clock.now - 1000.0 < waited + 0.1 and not s.calls


def test_no_wait_for_a_worker_that_could_never_take_the_request():
    registry, decodes, _ = cluster(num_decode=1)
    registry.mark_failed(decodes[0])
    clock = Clock()
    s = Scenario(registry, only(decodes, worker([1])), clock=clock, version="v2")  # no worker of that version
    with pytest.raises(UnavailableError, match="of version 'v2'"):
        s.run()
    assert clock.now == 1000.0


def test_an_incompatible_pair_is_never_chosen_again():
    registry, decodes, prefills = cluster(num_decode=1, num_prefill=2)
    failed = []

    def refuses_first_pair(placement, generated):
        if not failed:
            failed.append(placement.prefills[0].worker_id)
            return worker([1], ("FAILED_PRECONDITION", IncompatibleError("fingerprints differ")), 0)(placement, generated)
        return worker([1])(placement, generated)

    s = Scenario(registry, only(decodes, refuses_first_pair), limits=RouteLimits(max_placements=1))
    with pytest.raises(IncompatibleError):
        s.run()
    assert registry.is_incompatible(failed[0], decodes[0])
    placement = Placer(registry).place(10)
    assert failed[0] not in [w.worker_id for w in placement.prefills]
