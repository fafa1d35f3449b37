"""The pool's count of cached free blocks, kept incrementally, equals a walk of the free queue."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.block_pool import BlockPool

ops = st.lists(st.tuples(st.sampled_from(["allocate", "register", "release", "take"]), st.integers(0, 50)),
               max_size=80)


def walked(pool: BlockPool) -> int:
    return sum(1 for b in pool._free if pool.blocks[b].block_hash is not None)


@settings(max_examples=300, deadline=None)
@given(ops=ops, num_blocks=st.integers(1, 8))
def test_cached_free_count_follows_every_operation(ops, num_blocks):
    pool = BlockPool(num_blocks)
    held: list = []  # one entry per reference
    for op, pick in ops:
        if op == "allocate" and pool.num_free:
            held.append(pool.allocate())
        elif op == "register" and held:
            block = held[pick % len(held)]
            if block.block_hash is None:
                pool.register(block, pick % 5, (pick % 5,))  # few hashes: some are taken already
        elif op == "release" and held:
            pool.release(held.pop(pick % len(held)))
        elif op == "take":
            block = pool.lookup(pick % 5, (pick % 5,))
            if block is not None:
                pool.take(block)
                held.append(block)
        assert pool.num_cached_free == walked(pool)
        assert pool.num_free + pool.num_used == pool.num_blocks
