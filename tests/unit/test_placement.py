"""Placement policy: exact choices for given loads, power of two choices, KV room before
load, health and compatibility filters, in-flight spreading, and a property test over
random registries."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.errors import UnavailableError
from pdserve.routing.placement import Placer, decode_score, prefill_score
from pdserve.routing.registry import Health, Load, Registry, Role, Worker, WorkerInfo

BLOCK = 16


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make_info(
    role: Role, address: str, fingerprint: str = "m1", version: str = "pp1", layout: str = "kv1"
) -> WorkerInfo:
    return WorkerInfo(role, address, fingerprint, version, layout)


def decode_load(free: int, running: int = 0, waiting: int = 0, total: int = 1000) -> Load:
    return Load(
        num_running=running, num_waiting=waiting, kv_num_total=total, kv_num_free=free,
        kv_block_size=BLOCK,
    )


def prefill_load(pending: int) -> Load:
    return Load(num_pending_prefill_tokens=pending, kv_num_total=100, kv_num_free=100,
                kv_block_size=BLOCK)


class Cluster:
    """A registry on a fake clock, with helpers to add workers by id."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.reg = Registry(now=self.clock)
        self._port = 0

    def add(self, wid: str, role: Role, load: Load, **info: str) -> str:
        self._port += 1
        return self.reg.register(wid, make_info(role, f"h:{self._port}", **info), load)

    def placer(self, seed: int = 0, **kwargs: int) -> Placer:
        return Placer(self.reg, rng=random.Random(seed), **kwargs)


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def ids(workers: Sequence[Worker]) -> list[str]:
    return [w.worker_id for w in workers]


def test_exact_choice_for_given_loads(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=500, running=3))
    cluster.add("d2", Role.DECODE, decode_load(free=812, running=1))
    cluster.add("p1", Role.PREFILL, prefill_load(0))
    cluster.add("p2", Role.PREFILL, prefill_load(300))
    cluster.add("p3", Role.PREFILL, prefill_load(40))
    placement = cluster.placer().place(100)
    assert placement.decode.worker_id == "d2"
    assert ids(placement.prefills) == ["p1", "p3", "p2"]
    assert placement.reason == (
        "decode d2: 812 free blocks, 1 requests (p2c of d1,d2); prefill p1: 0 pending tokens"
    )


def test_fewer_requests_wins_when_both_have_room(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900, running=2, waiting=2))
    cluster.add("d2", Role.DECODE, decode_load(free=100, running=3))
    assert cluster.placer().place(64).decode.worker_id == "d2"


def test_kv_room_dominates_load(cluster: Cluster) -> None:
    cluster.add("busy", Role.DECODE, decode_load(free=10, running=50, waiting=20))
    cluster.add("idle", Role.DECODE, decode_load(free=3))
    placement = cluster.placer().place(10 * BLOCK)  # needs 10 blocks: only "busy" has them
    assert placement.decode.worker_id == "busy"
    cluster.reg.begin("busy")  # one more in flight: 10 - 10 = 0 estimated free, no room
    placement = cluster.placer().place(10 * BLOCK)
    assert placement.decode.worker_id == "idle"
    assert "too few for the prompt" in placement.reason


def test_a_worker_without_room_is_still_placed_when_it_is_the_only_one(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=0))
    placement = cluster.placer().place(100)
    assert placement.decode.worker_id == "d1"
    assert "only candidate" in placement.reason


class RecordingRandom(random.Random):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.samples: list[list[Worker]] = []

    def sample(self, population, k, **kwargs):  # type: ignore[override]
        chosen = super().sample(population, k, **kwargs)
        self.samples.append(list(chosen))
        return chosen


def test_p2c_never_picks_the_worse_of_the_two_sampled(cluster: Cluster) -> None:
    rng = random.Random(7)
    for i in range(8):
        cluster.add(f"d{i}", Role.DECODE,
                    decode_load(free=rng.randrange(0, 40), running=rng.randrange(0, 10)))
    recorder = RecordingRandom(1)
    placer = Placer(cluster.reg, rng=recorder)
    sampled_ids: set[str] = set()
    for _ in range(200):
        tokens = rng.randrange(1, 400)
        chosen = placer.place(tokens).decode
        pair = recorder.samples[-1]
        assert chosen in pair
        other = pair[1] if chosen is pair[0] else pair[0]
        assert decode_score(chosen, tokens).key <= decode_score(other, tokens).key
        sampled_ids.update(ids(pair))
    assert sampled_ids == {f"d{i}" for i in range(8)}  # sampling reaches every worker


def test_same_seed_same_choices(cluster: Cluster) -> None:
    for i in range(6):
        cluster.add(f"d{i}", Role.DECODE, decode_load(free=100 + i, running=i % 3))
    a, b = cluster.placer(seed=3), cluster.placer(seed=3)
    runs = [[p.place(50).decode.worker_id for _ in range(20)] for p in (a, b)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # the seed matters, not just the loads


def test_missed_heartbeats_stop_placement(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    cluster.add("d2", Role.DECODE, decode_load(free=100))
    cluster.clock.t += 2.0
    cluster.reg.heartbeat("d2", decode_load(free=100))
    cluster.clock.t += 1.0  # d1 silent for 3 intervals, d2 for 1
    placer = cluster.placer()
    assert {placer.place(10).decode.worker_id for _ in range(10)} == {"d2"}
    cluster.clock.t += 2.0
    with pytest.raises(UnavailableError, match="no healthy decode worker"):
        placer.place(10)


def test_draining_and_failed_workers_are_not_placed(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    cluster.add("d2", Role.DECODE, decode_load(free=100))
    cluster.add("p1", Role.PREFILL, prefill_load(0))
    cluster.add("p2", Role.PREFILL, prefill_load(1000))
    cluster.reg.heartbeat("d1", decode_load(free=900), draining=True)
    cluster.reg.mark_failed("p1")
    placement = cluster.placer().place(10)
    assert placement.decode.worker_id == "d2"
    assert ids(placement.prefills) == ["p2"]


@pytest.mark.parametrize(
    "mismatch",
    [{"fingerprint": "m2"}, {"layout": "kv2"}, {"version": "pp2"}],
)
def test_incompatible_prefill_workers_are_not_paired(
    cluster: Cluster, mismatch: dict[str, str]
) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    cluster.add("p_bad", Role.PREFILL, prefill_load(0), **mismatch)
    cluster.add("p_ok", Role.PREFILL, prefill_load(500))
    assert ids(cluster.placer().place(10).prefills) == ["p_ok"]


def test_no_compatible_prefill_means_local_prefill(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    cluster.add("p1", Role.PREFILL, prefill_load(0), fingerprint="other")
    placement = cluster.placer().place(10)
    assert placement.prefills == []
    assert placement.reason.endswith("no compatible prefill: decode prefills locally")


def test_a_pair_marked_incompatible_is_never_chosen_again(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    cluster.add("d2", Role.DECODE, decode_load(free=900))
    cluster.add("p1", Role.PREFILL, prefill_load(0))
    cluster.add("p2", Role.PREFILL, prefill_load(100))
    cluster.reg.incompatible("p1", "d1")
    placer = cluster.placer()
    for _ in range(30):
        placement = placer.place(10)
        expected = ["p2"] if placement.decode.worker_id == "d1" else ["p1", "p2"]
        assert ids(placement.prefills) == expected
    cluster.reg.register("d1", cluster.reg.get("d1").info, decode_load(free=900))
    placement = placer.place(10, exclude_decode={"d2"})
    assert ids(placement.prefills) == ["p1", "p2"]  # d1 re-registered: the verdict is stale


def test_static_prefill_is_compatible_with_any_decode(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900), fingerprint="whatever")
    static = cluster.reg.add_static(Role.PREFILL, "static:1")
    assert ids(cluster.placer().place(10).prefills) == [static]


def test_in_flight_spreads_consecutive_placements_over_equal_workers(cluster: Cluster) -> None:
    for wid in ("d1", "d2"):
        cluster.add(wid, Role.DECODE, decode_load(free=900))
    for wid in ("p1", "p2", "p3"):
        cluster.add(wid, Role.PREFILL, prefill_load(0))
    placer = cluster.placer()
    decodes, prefills = [], []
    for _ in range(6):
        placement = placer.place(100)
        cluster.reg.begin(placement.decode.worker_id)
        cluster.reg.begin(placement.prefills[0].worker_id)
        decodes.append(placement.decode.worker_id)
        prefills.append(placement.prefills[0].worker_id)
    assert decodes == ["d1", "d2"] * 3
    assert prefills == ["p1", "p2", "p3"] * 2


def test_candidates_are_capped(cluster: Cluster) -> None:
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    for i in range(5):
        cluster.add(f"p{i}", Role.PREFILL, prefill_load(100 - i))
    assert ids(cluster.placer(max_prefill_candidates=2).place(10).prefills) == ["p4", "p3"]
    assert cluster.placer(max_prefill_candidates=0).place(10).prefills == []


def test_no_decode_worker_is_unavailable(cluster: Cluster) -> None:
    cluster.add("p1", Role.PREFILL, prefill_load(0))
    with pytest.raises(UnavailableError, match="no healthy decode worker"):
        cluster.placer().place(10)
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    with pytest.raises(UnavailableError):
        cluster.placer().place(10, exclude_decode={"d1"})


def test_placer_rejects_bad_arguments(cluster: Cluster) -> None:
    with pytest.raises(ValueError):
        Placer(cluster.reg, max_prefill_candidates=-1)
    cluster.add("d1", Role.DECODE, decode_load(free=900))
    with pytest.raises(ValueError):
        cluster.placer().place(-1)


# -- property test ----------------------------------------------------------------------

FINGERPRINTS = st.sampled_from(["m1", "m2"])
LAYOUTS = st.sampled_from(["kv1", "kv2"])
HEALTH_EVENTS = st.sampled_from(["ok", "draining", "failed", "silent"])

worker_specs = st.fixed_dictionaries({
    "role": st.sampled_from([Role.PREFILL, Role.DECODE]),
    "fingerprint": FINGERPRINTS,
    "layout": LAYOUTS,
    "static": st.booleans(),
    "event": HEALTH_EVENTS,
    "running": st.integers(0, 20),
    "pending": st.integers(0, 5000),
    "free": st.integers(0, 200),
    "in_flight": st.integers(0, 4),
})


@dataclass(frozen=True)
class Built:
    """A random registry and, computed from the specs alone, what placement may use."""

    reg: Registry
    specs: dict[str, dict]  # worker id -> the spec it was built from
    usable: frozenset[str]  # ids that must count as healthy
    bad_pairs: frozenset[tuple[str, str]]  # (prefill, decode) marked incompatible

    def compatible(self, prefill_id: str, decode_id: str) -> bool:
        p, d = self.specs[prefill_id], self.specs[decode_id]
        if (prefill_id, decode_id) in self.bad_pairs:
            return False
        # Static workers know no fingerprint or layout, so they pair with anything.
        return p["static"] or d["static"] or (
            p["fingerprint"] == d["fingerprint"] and p["layout"] == d["layout"]
        )


def build(specs: list[dict], pairs: list[tuple[int, int]]) -> Built:
    clock = FakeClock()
    reg = Registry(now=clock)
    wids = []
    for i, s in enumerate(specs):
        if s["static"]:
            wid = reg.add_static(s["role"], f"h:{i}")
        else:
            info = make_info(s["role"], f"h:{i}", fingerprint=s["fingerprint"], layout=s["layout"])
            wid = reg.register(f"w{i}", info, Load())
        wids.append(wid)
        for _ in range(s["in_flight"]):
            reg.begin(wid)
    bad_pairs = frozenset((wids[a], wids[b]) for a, b in pairs if max(a, b) < len(wids))
    for prefill_id, decode_id in bad_pairs:
        reg.incompatible(prefill_id, decode_id)
    # Silent workers go stale (static ones never do): the rest report after the jump.
    clock.t += 5.0
    for wid, s in zip(wids, specs):
        if s["event"] == "silent":
            continue
        load = Load(num_running=s["running"], num_pending_prefill_tokens=s["pending"],
                    kv_num_total=200, kv_num_free=s["free"], kv_block_size=BLOCK)
        reg.heartbeat(wid, load, draining=s["event"] == "draining")
        if s["event"] == "failed":
            reg.mark_failed(wid)
    usable = frozenset(
        wid for wid, s in zip(wids, specs)
        if s["event"] == "ok" or (s["event"] == "silent" and s["static"])
    )
    return Built(reg, dict(zip(wids, specs)), usable, bad_pairs)


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(worker_specs, max_size=10),
    pairs=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=6),
    exclude=st.sets(st.integers(0, 9), max_size=3),
    tokens=st.integers(0, 3000),
    seed=st.integers(0, 2**16),
    max_candidates=st.integers(0, 4),
)
def test_placement_only_returns_healthy_compatible_workers_in_order(
    specs: list[dict],
    pairs: list[tuple[int, int]],
    exclude: set[int],
    tokens: int,
    seed: int,
    max_candidates: int,
) -> None:
    built = build(specs, pairs)
    excluded = {wid for i, wid in enumerate(built.specs) if i in exclude}
    placer = Placer(built.reg, rng=random.Random(seed), max_prefill_candidates=max_candidates)
    decodes = [
        wid for wid in built.usable
        if built.specs[wid]["role"] is Role.DECODE and wid not in excluded
    ]
    if not decodes:
        with pytest.raises(UnavailableError):
            placer.place(tokens, exclude_decode=excluded)
        return
    placement = placer.place(tokens, exclude_decode=excluded)
    decode = placement.decode
    assert decode.worker_id in decodes and decode.health is Health.HEALTHY
    compatible = [
        w for w in built.reg.all()
        if w.worker_id in built.usable
        and w.role is Role.PREFILL
        and built.compatible(w.worker_id, decode.worker_id)
    ]
    assert len(placement.prefills) == min(max_candidates, len(compatible))
    assert all(p in compatible and p.health is Health.HEALTHY for p in placement.prefills)
    scores = [prefill_score(p, tokens) for p in placement.prefills]
    assert scores == sorted(scores)
    # Nobody left out is better than the last candidate taken.
    left_out = [p for p in compatible if p not in placement.prefills]
    if placement.prefills and left_out:
        assert min(prefill_score(p, tokens) for p in left_out) >= scores[-1]
