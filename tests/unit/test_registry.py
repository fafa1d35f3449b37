"""Worker registry: registration and restarts, heartbeat-driven health, static workers,
in-flight accounting and remembered incompatible pairs, all on a fake clock."""

from __future__ import annotations

import pytest

from pdserve.errors import InvalidRequestError
from pdserve.routing.registry import Health, Load, Registry, Role, WorkerInfo


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make_info(role: Role, address: str, fingerprint: str = "m1") -> WorkerInfo:
    return WorkerInfo(role, address, fingerprint, "pp1", "L2-H4-D16-f32")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reg(clock: FakeClock) -> Registry:
    return Registry(heartbeat_interval_s=1.0, missed_heartbeats=3, now=clock)


def ids(workers) -> list[str]:
    return [w.worker_id for w in workers]


def test_register_assigns_ids_or_keeps_the_workers_own(reg: Registry) -> None:
    assert reg.register(None, make_info(Role.PREFILL, "h:1"), Load()) == "prefill-1"
    assert reg.register(None, make_info(Role.DECODE, "h:2"), Load()) == "decode-2"
    assert reg.register("mine", make_info(Role.DECODE, "h:3"), Load()) == "mine"
    assert ids(reg.all()) == ["decode-2", "mine", "prefill-1"]
    assert ids(reg.healthy(Role.DECODE)) == ["decode-2", "mine"]
    worker = reg.get("mine")
    assert worker is not None and worker.registered_at == 100.0 and worker.health is Health.HEALTHY


def test_assigned_ids_skip_ids_workers_chose(reg: Registry) -> None:
    reg.register("prefill-1", make_info(Role.PREFILL, "h:1"), Load())
    assert reg.register(None, make_info(Role.PREFILL, "h:2"), Load()) == "prefill-2"


def test_restart_at_same_address_replaces_old_record(reg: Registry) -> None:
    old = reg.register("old", make_info(Role.DECODE, "h:1"), Load())
    reg.begin(old)
    new = reg.register("new", make_info(Role.DECODE, "h:1"), Load())
    assert reg.get(old) is None
    assert ids(reg.all()) == [new]
    assert reg.heartbeat(old, Load()) is False
    assert reg.get(new).in_flight == 0


def test_restart_without_id_replaces_old_record(reg: Registry) -> None:
    first = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    second = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    assert first != second
    assert ids(reg.all()) == [second]


def test_same_id_reregistering_updates_info_and_marks_healthy(
    reg: Registry, clock: FakeClock
) -> None:
    wid = reg.register("d", make_info(Role.DECODE, "h:1"), Load())
    reg.begin(wid)
    reg.mark_failed(wid)
    clock.advance(5)
    reg.register("d", make_info(Role.DECODE, "h:9", fingerprint="m2"), Load(num_running=4))
    worker = reg.get("d")
    assert worker.health is Health.HEALTHY and worker.failures == 0
    assert worker.address == "h:9" and worker.info.model_fingerprint == "m2"
    assert worker.load.num_running == 4 and worker.last_heartbeat == 105.0
    assert worker.registered_at == 100.0
    assert worker.in_flight == 1  # the router still finishes what it placed
    # The old address is free again: registering there is not a restart of "d".
    reg.register("other", make_info(Role.DECODE, "h:1"), Load())
    assert ids(reg.all()) == ["d", "other"]


def test_heartbeat_from_unknown_id_returns_false(reg: Registry) -> None:
    assert reg.heartbeat("nobody", Load()) is False


def test_heartbeat_updates_load(reg: Registry, clock: FakeClock) -> None:
    wid = reg.register(None, make_info(Role.PREFILL, "h:1"), Load())
    clock.advance(0.5)
    assert reg.heartbeat(wid, Load(num_pending_prefill_tokens=70)) is True
    assert reg.get(wid).load.num_pending_prefill_tokens == 70
    assert reg.get(wid).last_heartbeat == 100.5


def test_draining_worker_is_not_healthy_until_it_says_otherwise(reg: Registry) -> None:
    wid = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    reg.heartbeat(wid, Load(), draining=True)
    assert reg.get(wid).health is Health.DRAINING
    assert reg.healthy(Role.DECODE) == []
    reg.heartbeat(wid, Load())
    assert ids(reg.healthy(Role.DECODE)) == [wid]


def test_missed_heartbeats_make_a_worker_unhealthy_within_three_intervals(
    reg: Registry, clock: FakeClock
) -> None:
    wid = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    clock.advance(2.75)
    assert reg.expire() == []
    assert ids(reg.healthy(Role.DECODE)) == [wid]
    clock.advance(0.25)
    # healthy() checks the time itself: no expire() needed to stop placing.
    assert reg.healthy(Role.DECODE) == []
    assert reg.expire() == [wid]
    assert reg.get(wid).health is Health.UNHEALTHY
    assert reg.expire() == []  # reported once
    assert reg.heartbeat(wid, Load()) is True
    assert ids(reg.healthy(Role.DECODE)) == [wid]


def test_long_silence_removes_the_worker(reg: Registry, clock: FakeClock) -> None:
    wid = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    clock.advance(29.5)
    reg.expire()
    assert reg.get(wid) is not None
    clock.advance(0.5)
    reg.expire()
    assert reg.get(wid) is None
    assert reg.heartbeat(wid, Load()) is False
    # The address is free for a new registration.
    assert reg.register("again", make_info(Role.DECODE, "h:1"), Load()) == "again"


def test_mark_failed_is_unhealthy_until_next_heartbeat(reg: Registry) -> None:
    wid = reg.register(None, make_info(Role.PREFILL, "h:1"), Load())
    reg.mark_failed(wid)
    reg.mark_failed(wid)
    assert reg.get(wid).health is Health.UNHEALTHY and reg.get(wid).failures == 2
    assert reg.healthy(Role.PREFILL) == []
    reg.heartbeat(wid, Load())
    assert reg.get(wid).failures == 0
    assert ids(reg.healthy(Role.PREFILL)) == [wid]
    reg.mark_failed("nobody")  # ignored


def test_static_worker_never_expires_and_knows_no_fingerprint(
    reg: Registry, clock: FakeClock
) -> None:
    wid = reg.add_static(Role.PREFILL, "h:1")
    worker = reg.get(wid)
    assert worker.static and worker.info.model_fingerprint is None
    assert worker.info.compatible_with(make_info(Role.DECODE, "h:2", fingerprint="anything"))
    clock.advance(1000)
    assert reg.expire() == []
    assert ids(reg.healthy(Role.PREFILL)) == [wid]
    reg.mark_failed(wid)  # the router's Stats poll failed
    assert reg.healthy(Role.PREFILL) == []
    reg.heartbeat(wid, Load(num_pending_prefill_tokens=3))  # the next poll answered
    assert ids(reg.healthy(Role.PREFILL)) == [wid]


def test_add_static_twice_returns_the_same_id(reg: Registry) -> None:
    wid = reg.add_static(Role.DECODE, "h:1")
    assert reg.add_static(Role.DECODE, "h:1") == wid
    with pytest.raises(ValueError, match="already a decode worker"):
        reg.add_static(Role.PREFILL, "h:1")


def test_registering_at_a_static_address_replaces_the_static_record(
    reg: Registry, clock: FakeClock
) -> None:
    static = reg.add_static(Role.DECODE, "h:1")
    wid = reg.register("d", make_info(Role.DECODE, "h:1"), Load())
    assert reg.get(static) is None
    assert not reg.get(wid).static
    clock.advance(3)
    assert reg.expire() == [wid]  # a registered worker heartbeats, so it can expire


def test_in_flight_never_goes_below_zero(reg: Registry) -> None:
    wid = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    reg.begin(wid)
    reg.begin(wid)
    reg.finish(wid)
    assert reg.get(wid).in_flight == 1
    reg.finish(wid)
    reg.finish(wid)
    assert reg.get(wid).in_flight == 0
    reg.begin("nobody")
    reg.finish("nobody")


def test_incompatible_pairs_are_forgotten_when_either_reregisters(reg: Registry) -> None:
    p = reg.register("p", make_info(Role.PREFILL, "h:1"), Load())
    d = reg.register("d", make_info(Role.DECODE, "h:2"), Load())
    reg.incompatible(p, d)
    assert reg.is_incompatible(p, d) and not reg.is_incompatible(d, p)
    reg.register("d", make_info(Role.DECODE, "h:2"), Load())
    assert not reg.is_incompatible(p, d)
    reg.incompatible(p, d)
    reg.register("p2", make_info(Role.PREFILL, "h:1"), Load())  # p restarted as p2
    assert not reg.is_incompatible(p, d)
    reg.incompatible("ghost", d)  # unknown ids are ignored
    assert not reg.is_incompatible("ghost", d)


def test_remove_forgets_the_worker(reg: Registry) -> None:
    wid = reg.register(None, make_info(Role.DECODE, "h:1"), Load())
    reg.remove(wid)
    reg.remove(wid)
    assert reg.all() == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_running": -1}, "load.num_running"),
        ({"kv_num_total": 4, "kv_num_free": 5, "kv_block_size": 16}, "load.kv_num_free"),
        ({"kv_num_total": 4, "kv_num_free": 4}, "load.kv_block_size"),
    ],
)
def test_load_rejects_impossible_reports(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        Load(**kwargs)
    assert err.value.field == field


def test_worker_info_rejects_missing_address_and_empty_fingerprint() -> None:
    with pytest.raises(InvalidRequestError, match="address"):
        WorkerInfo(Role.DECODE, "", "m", "pp", "kv")
    with pytest.raises(InvalidRequestError, match="model_fingerprint"):
        WorkerInfo(Role.DECODE, "h:1", "", "pp", "kv")


@pytest.mark.parametrize("field", ["model_fingerprint", "preprocessing_version", "kv_layout"])
def test_worker_info_compatibility_needs_every_field_equal(field: str) -> None:
    same = {"model_fingerprint": "m", "preprocessing_version": "pp", "kv_layout": "kv"}
    a = WorkerInfo(Role.PREFILL, "h:1", **same)
    b = WorkerInfo(Role.DECODE, "h:2", **{**same, field: "other"})
    assert not a.compatible_with(b)
    assert a.compatible_with(WorkerInfo(Role.DECODE, "h:2", "m", "pp", "kv"))


def test_registry_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        Registry(heartbeat_interval_s=0)
    with pytest.raises(ValueError):
        Registry(missed_heartbeats=0)
    assert Registry(heartbeat_interval_s=0.5, missed_heartbeats=4).heartbeat_timeout_s == 2.0
