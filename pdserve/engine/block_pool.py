"""The pool of KV blocks: reference counts, the free queue and the prefix-cache index.

A block is *used* while some sequence holds it (ref_count > 0) and *free* otherwise.
A free block keeps its hash and token ids until it is handed out again (lazy
eviction), so a later request with the same prefix can take it back from the free
queue. Blocks are handed out from the head of the free queue (least recently freed
first); sequences free their blocks tail first, so the end of a prefix chain is
evicted before its beginning. Invariant: num_free + num_used == num_blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Chained hash of this block's tokens and its parent's hash; None: not cacheable.
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_count}, hash={self.block_hash})"


def chain_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Hash of a full block: its tokens chained with its parent's hash.

    A hit is always confirmed against the stored token ids, so a collision can
    cost a cache miss but never return another prompt's KV.
    """
    return hash((parent_hash, tuple(token_ids)))


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered set of free block ids: O(1) pop from the head and
        # O(1) removal from the middle (a cache hit on a free block).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks that hold a hash: kept as a count, since stats are read after every
        # step and a walk of the free queue costs milliseconds with thousands of blocks.
        self._num_cached_free = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return self._num_cached_free

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> Block | None:
        """The cached block with this hash and exactly these tokens, if any."""
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != tuple(token_ids):
            return None
        return block

    def allocate(self) -> Block:
        """A fresh block, evicting the least recently freed one's cached prefix."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self._num_cached_free -= 1
        self._evict(block)
        block.ref_count = 1
        return block

    def take(self, block: Block) -> None:
        """Add a reference to a cached block (a prefix-cache hit)."""
        if block.ref_count == 0:
            del self._free[block.block_id]
            if block.block_hash is not None:
                self._num_cached_free -= 1
        block.ref_count += 1

    def release(self, block: Block) -> None:
        block.ref_count -= 1
        if block.ref_count < 0:
            raise AssertionError(f"{block} released more often than taken")
        if block.ref_count == 0:
            self._free[block.block_id] = None
            if block.block_hash is not None:
                self._num_cached_free += 1

    def register(self, block: Block, block_hash: int, token_ids: Sequence[int]) -> None:
        """Make a full, computed block findable by later requests."""
        if block_hash in self._cached:
            return  # another block holds the same prefix already; keep that one
        if block.ref_count == 0 and block.block_hash is None:
            self._num_cached_free += 1
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block.block_id

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block.block_id:
                del self._cached[block.block_hash]
            block.block_hash = None
            block.token_ids = None
