"""Prefix affinity: chained block keys of the request's bytes, a bounded per-worker index, and a
placement that follows a conversation to the worker holding it unless that worker is too busy."""

from __future__ import annotations

from pdserve.routing.prefix_affinity import BLOCK_BYTES, MIN_KEYS_PER_WORKER, PrefixIndex, block_keys
from pdserve.routing.registry import Role
from tests.unit.test_placement import Cluster, decode_load, prefill_load


def turn(n: int) -> bytes:
    """A conversation after n turns: each earlier one is a byte prefix of it."""
    return b"".join(f"user\nquestion {i} {'x' * 90}\x1eassistant\nanswer {i} {'y' * 70}\x1e".encode()
                    for i in range(n))


def test_keys_are_chained_over_full_blocks():
    data = bytes(range(256)) * 2
    keys = block_keys(data)
    assert len(keys) == len(data) // BLOCK_BYTES and len(set(keys)) == len(keys)
    assert block_keys(data[: 3 * BLOCK_BYTES + 5]) == keys[:3]  # a partial block has no key
    changed = bytearray(data)
    changed[BLOCK_BYTES + 1] ^= 1  # block 1 differs: every later key differs too (chained)
    other = block_keys(bytes(changed))
    assert other[0] == keys[0] and all(a != b for a, b in zip(other[1:], keys[1:]))
    assert block_keys(b"") == [] and block_keys(b"x" * (BLOCK_BYTES - 1)) == []


def test_index_matches_leading_keys_and_forgets_tails_first():
    index = PrefixIndex()
    first, longer = block_keys(turn(2)), block_keys(turn(3))
    assert longer[: len(first)] == first
    index.record("d1", first)
    assert index.match("d1", longer) == len(first) and index.match("d2", longer) == 0
    index.record("d1", block_keys(b"z" * BLOCK_BYTES * (MIN_KEYS_PER_WORKER - 2)))
    assert len(index) == MIN_KEYS_PER_WORKER  # bounded
    assert index.match("d1", first) == 2  # the oldest request's tail went first, its head stays
    index.forget("d1")
    assert index.match("d1", first) == 0


def test_a_conversation_follows_its_decode_worker_unless_it_is_much_busier():
    cluster = Cluster()
    for i in range(1, 5):
        cluster.add(f"d{i}", Role.DECODE, decode_load(free=500, running=2))
    cluster.add("p1", Role.PREFILL, prefill_load(0))
    cluster.add("p2", Role.PREFILL, prefill_load(0))
    placer = cluster.placer(seed=3, affinity_slack=4)
    first = placer.place(100, prefix_keys=block_keys(turn(1)))
    placer.placed(first, block_keys(turn(1)))
    home, home_prefill = first.decode.worker_id, first.prefills[0].worker_id
    for n in range(2, 12):  # later turns, whatever the random two choices say
        keys = block_keys(turn(n))
        placement = placer.place(100 * n, prefix_keys=keys)
        assert placement.decode.worker_id == home
        assert f"holds {len(block_keys(turn(n - 1)))} of {len(keys)} prefix blocks" in placement.reason
        assert placement.prefills[0].worker_id == home_prefill
        placer.placed(placement, keys)
    # Much busier than the others: load wins over the cached prefix.
    cluster.reg.heartbeat(home, decode_load(free=500, running=2 + 5))
    busy = {placer.place(1200, prefix_keys=block_keys(turn(12))).decode.worker_id for _ in range(20)}
    assert home not in busy
    # Without room for the prompt, neither.
    cluster.reg.heartbeat(home, decode_load(free=10, running=2))
    assert placer.place(1200, prefix_keys=block_keys(turn(12))).decode.worker_id != home
    # A restart empties its cache: the conversation is placed by load again.
    cluster.reg.heartbeat(home, decode_load(free=500, running=2))
    placer.forget(home)
    seen = {placer.place(1200, prefix_keys=block_keys(turn(12))).decode.worker_id for _ in range(30)}
    assert len(seen) > 1


def test_slack_below_zero_places_by_load_alone():
    cluster = Cluster()
    for i in range(1, 5):
        cluster.add(f"d{i}", Role.DECODE, decode_load(free=500, running=2))
    placer = cluster.placer(seed=5, affinity_slack=-1)
    assert not placer.uses_prefixes  # the router then computes no keys
    keys = block_keys(turn(3))
    first = placer.place(100, prefix_keys=keys)
    placer.placed(first, keys)
    assert placer.prefixes.match(first.decode.worker_id, keys) == 0  # nothing recorded
    assert len({placer.place(100, prefix_keys=keys).decode.worker_id for _ in range(30)}) > 1
