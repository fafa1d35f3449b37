"""Block pool and KV-cache manager: exact block ids, prefix hits, and invariants under random use."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.block_pool import BlockPool, chain_hash
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(max_tokens=8), seed=0)


def assert_invariants(kv: KVCacheManager, seqs: list[Sequence]) -> None:
    pool = kv.pool
    assert pool.num_free + pool.num_used == pool.num_blocks
    held: dict[int, int] = {}
    for s in seqs:
        assert len(set(s.block_table)) == len(s.block_table), "a sequence holds a block twice"
        for b in s.block_table:
            held[b] = held.get(b, 0) + 1
    for block in pool.blocks:
        assert block.ref_count == held.get(block.block_id, 0)
        # A block that someone holds is never on the free queue.
        assert (block.block_id in pool._free) == (block.ref_count == 0)


def test_allocate_hands_out_blocks_in_order_and_frees_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    seq = make_seq(list(range(10)))
    assert kv.allocate(seq, 10)
    assert seq.block_table == [0, 1, 2]
    kv.free(seq)
    assert list(kv.pool._free) == [3, 2, 1, 0]
    assert kv.stats().num_free == 4


def test_allocate_refuses_without_changing_anything():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = make_seq(list(range(12)))
    assert not kv.allocate(seq, 12)
    assert seq.block_table == [] and kv.pool.num_free == 2


def test_prefix_hit_shares_full_blocks_and_is_confirmed_by_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(10)), "a")
    assert kv.allocate(a, 10)
    a.num_computed_tokens = 10
    kv.cache_computed_blocks(a)
    b = make_seq(list(range(10)) + [99], "b")
    prefix = kv.find_prefix(b)
    assert [blk.block_id for blk in prefix] == [0, 1]
    assert kv.allocate(b, 3, prefix)
    assert b.block_table[:2] == [0, 1] and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert kv.pool.blocks[0].ref_count == 2
    # Same hash, other tokens: no hit.
    c = make_seq([5, 5, 5, 5, 1], "c")
    kv.pool._cached[chain_hash(None, [5, 5, 5, 5])] = 0
    assert kv.find_prefix(c) == []


def test_freed_blocks_keep_their_prefix_until_reused():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3, 4, 5], "a")
    assert kv.allocate(a, 5)
    a.num_computed_tokens = 5
    kv.cache_computed_blocks(a)
    kv.free(a)
    assert kv.stats().num_cached == 2
    b = make_seq([1, 2, 3, 4, 9], "b")
    prefix = kv.find_prefix(b)
    assert len(prefix) == 2
    assert kv.allocate(b, 1, prefix)
    assert kv.stats().num_used == 3
    assert kv.stats().prefix_hit_rate == 4 / 10


def test_whole_prompt_hit_shares_every_block_and_recomputes_only_the_last_token():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4], "a")
    assert kv.allocate(a, 4)
    a.num_computed_tokens = 4
    kv.cache_computed_blocks(a)
    b = make_seq([1, 2, 3, 4], "b")
    prefix = kv.find_prefix(b)
    assert len(prefix) == 2
    assert kv.allocate(b, 1, prefix)
    assert b.block_table == a.block_table  # shared, no new block
    assert (b.num_computed_tokens, b.num_cached_tokens) == (3, 4)  # token 4 recomputed, its KV kept
    assert kv.stats().num_used == 2


ops = st.lists(
    st.tuples(st.sampled_from(["add", "append", "fork", "free"]), st.integers(0, 7), st.integers(1, 40)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, block_size=st.sampled_from([1, 2, 4, 16]), num_blocks=st.integers(1, 24))
def test_random_use_keeps_pool_consistent(ops, block_size, num_blocks):
    kv = KVCacheManager(num_blocks=num_blocks, block_size=block_size)
    live: list[Sequence] = []
    for i, (op, pick, n) in enumerate(ops):
        if op == "add" or (op != "add" and not live):
            # Prompts drawn from few tokens so prefixes repeat and hit the cache.
            seq = make_seq([(pick + j // 3) % 3 for j in range(n)], f"s{i}")
            prefix = kv.find_prefix(seq)
            if kv.allocate(seq, seq.num_tokens - len(prefix) * block_size, prefix):
                seq.num_computed_tokens = seq.num_tokens
                kv.cache_computed_blocks(seq)
                live.append(seq)
        elif op == "append":
            seq = live[pick % len(live)]
            seq.append_token(pick % 3)
            if kv.allocate(seq, 1):
                seq.num_computed_tokens += 1
                kv.cache_computed_blocks(seq)
            else:
                seq.token_ids.pop()
        elif op == "fork":
            parent = live[pick % len(live)]
            child = make_seq(list(parent.token_ids), f"f{i}")
            prefix = kv.find_prefix(child)
            if kv.allocate(child, child.num_tokens - len(prefix) * block_size, prefix):
                child.num_computed_tokens = child.num_tokens
                kv.cache_computed_blocks(child)
                live.append(child)
        else:
            kv.free(live.pop(pick % len(live)))
        assert_invariants(kv, live)
    for seq in live:
        kv.free(seq)
    stats = kv.stats()
    assert stats.num_free == stats.num_total and stats.num_used == 0


def test_block_pool_counts():
    pool = BlockPool(3)
    b = pool.allocate()
    assert (pool.num_free, pool.num_used) == (2, 1)
    pool.take(b)
    pool.release(b)
    pool.release(b)
    assert (pool.num_free, pool.num_used) == (3, 0)
