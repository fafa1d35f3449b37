"""Which KV blocks each sequence holds: allocation, prefix-cache hits, freeing, stats.

Pure bookkeeping over block ids; the tensors live in `kv_cache.KVCache`.
`allocate(seq, n)` makes room for the next n tokens of a sequence and returns
False (changing nothing) when the pool cannot: not fitting is control flow for
the scheduler, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.block_pool import Block, BlockPool, chain_hash
from pdserve.engine.sequence import Sequence


@dataclass(frozen=True)
class KVCacheStats:
    num_total: int
    num_free: int
    num_used: int
    # Free blocks that still hold a reusable prefix (counted in num_free).
    num_cached: int
    # Prompt tokens found in the prefix cache / prompt tokens looked up.
    prefix_hit_rate: float
    num_prefix_queries: int
    num_prefix_hits: int


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._num_prefix_queries = 0  # prompt tokens looked up
        self._num_prefix_hits = 0  # of those, found cached

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_prefix(self, seq: Sequence) -> list[Block]:
        """Cached blocks holding the start of seq's tokens (for a seq without blocks).

        They may cover every token; `allocate` then leaves the last one to recompute
        (its logits give the next token) without writing into the shared block.
        """
        if seq.block_table or seq.prompt_logprobs is not None:  # those need every prompt position's logits
            return []
        return self.cached_blocks(seq.token_ids)

    def cached_blocks(self, token_ids: list[int]) -> list[Block]:
        """Cached blocks holding the start of these tokens; the pool is not changed."""
        if not self.enable_prefix_caching:
            return []
        hits: list[Block] = []
        parent: int | None = None
        for i in range(len(token_ids) // self.block_size):
            tokens = token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = chain_hash(parent, tokens)
            block = self.pool.lookup(parent, tokens)
            if block is None:
                break
            hits.append(block)
        return hits

    def remote_prefix(self, token_ids: list[int]) -> list[Block]:
        """Cached blocks a prompt whose KV arrives from elsewhere may take: all but one holding its
        last token, whose KV always arrives (a shared block is never written)."""
        return self.cached_blocks(token_ids)[: (len(token_ids) - 1) // self.block_size]

    def start_after(self, seq: Sequence, prefix: list[Block]) -> int:
        """Where seq's computing starts once `prefix` is taken: past it, but never past its last token."""
        return max(seq.num_computed_tokens, min(len(prefix) * self.block_size, seq.num_tokens - 1))

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: list[Block] | None = None) -> bool:
        """Room for num_new_tokens more tokens of seq, after its computed ones.

        `prefix` (from find_prefix, first allocation only) is taken instead of
        computed: seq.num_computed_tokens moves past it, up to the last token, which
        is always computed (seq.num_cached_tokens marks the shared, immutable part).
        Returns False and changes nothing when the pool cannot hold it.
        """
        prefix = prefix or []
        num_hit_tokens = len(prefix) * self.block_size
        start = self.start_after(seq, prefix)
        end = start + num_new_tokens
        num_needed = self.num_blocks_for(end) - len(seq.block_table) - len(prefix)
        num_free_after_hits = self.pool.num_free - sum(1 for b in prefix if b.ref_count == 0)
        if num_needed > num_free_after_hits:
            return False
        if not seq.block_table:
            self._num_prefix_queries += seq.num_prompt_tokens
            self._num_prefix_hits += min(num_hit_tokens, seq.num_prompt_tokens)
            seq.num_cached_tokens = num_hit_tokens
        for block in prefix:
            self.pool.take(block)
            seq.block_table.append(block.block_id)
            seq.block_hashes.append(block.block_hash)
        seq.num_computed_tokens = start
        for _ in range(max(num_needed, 0)):
            seq.block_table.append(self.pool.allocate().block_id)
        return True

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int, int] | None:
        """Give child (a new sample of parent's prompt, nothing computed) parent's computed prompt KV.

        The full blocks are shared (one more reference each); a partly filled last block cannot be,
        since both will write their own tokens after it: child gets a fresh block for it. Returns
        (parent's block, child's block, tokens to copy) for that one, (-1, -1, 0) without one, or
        None (nothing changed) when the pool has no free block.
        """
        num_full, num_tail = divmod(parent.num_prompt_tokens, self.block_size)
        if num_tail and self.pool.num_free == 0:
            return None
        for block_id in parent.block_table[:num_full]:
            self.pool.take(self.pool.blocks[block_id])
        child.block_table = parent.block_table[:num_full]
        child.block_hashes = parent.block_hashes[:num_full]
        child.num_computed_tokens = parent.num_prompt_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        if not num_tail:
            return -1, -1, 0
        child.block_table.append(self.pool.allocate().block_id)
        return parent.block_table[num_full], child.block_table[-1], num_tail

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's newly full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = chain_hash(parent, tokens)
            self.pool.register(self.pool.blocks[seq.block_table[i]], parent, tokens)
            seq.block_hashes.append(parent)

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, and forget its progress."""
        for block_id in reversed(seq.block_table):
            self.pool.release(self.pool.blocks[block_id])
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def stats(self) -> KVCacheStats:
        pool = self.pool
        queries = self._num_prefix_queries
        return KVCacheStats(
            num_total=pool.num_blocks,
            num_free=pool.num_free,
            num_used=pool.num_used,
            num_cached=pool.num_cached_free,
            prefix_hit_rate=self._num_prefix_hits / queries if queries else 0.0,
            num_prefix_queries=queries,
            num_prefix_hits=self._num_prefix_hits,
        )
