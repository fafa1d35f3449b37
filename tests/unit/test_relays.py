"""Relays: a decode call is cancelled only when its worker stopped heartbeating and its stream went quiet."""

from __future__ import annotations

from pdserve.routing.registry import Load, Registry, Role
from pdserve.routing.relays import Relays
from tests.unit.test_registry import FakeClock, make_info


def setup():
    clock = FakeClock()
    registry = Registry(heartbeat_interval_s=1.0, missed_heartbeats=3, now=clock)
    for worker_id, address in (("d1", "h:1"), ("d2", "h:2")):
        registry.register(worker_id, make_info(Role.DECODE, address), Load())
    return clock, registry, Relays(registry, now=clock)


def test_a_silent_stream_on_a_silent_worker_is_cancelled_once():
    clock, registry, relays = setup()
    cancelled = []
    with relays.track("d1", lambda: cancelled.append("d1")) as relay:
        clock.advance(2.9)
        registry.heartbeat("d2", Load())
        assert relays.sweep() == [] and not relay.lost  # d1 not yet past the heartbeat timeout
        clock.advance(0.2)
        assert relays.sweep() == [relay] and relay.lost and cancelled == ["d1"]
        assert relays.sweep() == [] and cancelled == ["d1"]  # cancelled once


def test_a_worker_that_misses_heartbeats_but_streams_keeps_its_requests():
    clock, registry, relays = setup()
    with relays.track("d1", lambda: None) as relay:
        for _ in range(10):
            clock.advance(1.0)
            relay.received()
            assert relays.sweep() == []
        assert registry.unresponsive("d1")  # 10 s without a heartbeat, but tokens kept coming
        assert not relay.lost


def test_a_quiet_stream_on_a_heartbeating_worker_is_left_alone():
    clock, registry, relays = setup()
    with relays.track("d1", lambda: None) as relay:  # e.g. a long local prefill, no token yet
        for _ in range(10):
            clock.advance(1.0)
            registry.heartbeat("d1", Load())
            assert relays.sweep() == []
        assert not relay.lost


def test_finished_relays_are_forgotten_and_a_removed_or_failed_worker_counts_as_silent():
    clock, registry, relays = setup()
    with relays.track("d1", lambda: None):
        pass
    with relays.track("d2", lambda: None) as relay:
        registry.mark_failed("d2")  # the router could not reach it
        clock.advance(3.0)
        registry.heartbeat("d1", Load())
        assert relays.sweep() == [relay]  # the finished d1 relay is not swept
    assert registry.unresponsive("gone")
    assert not registry.unresponsive("d1")
