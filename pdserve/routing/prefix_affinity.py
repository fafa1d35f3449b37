"""Which worker probably holds a request's prefix in its KV cache, as the router can tell without a tokenizer.

The router never tokenizes (the workers own preprocessing), so it keys requests by their input
bytes: the prompt text, the token ids, or the chat messages written one after another (role,
content, separator), which makes every earlier turn of a conversation a byte prefix of the
next. The bytes are cut into blocks of BLOCK_BYTES and each block's key hashes the block and
the key before it, so two requests share their first n keys exactly when their first n blocks
are equal: the same chained-hash scheme the workers' prefix caches use over tokens.

For each worker the index keeps the keys of the requests the router sent it, least recently
used first, bounded by about as many keys as the worker's KV cache holds blocks of tokens:
an estimate of its cache, which forgets what the worker may have evicted. A worker that
registers again (a restart) starts empty.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import xxhash

BLOCK_BYTES = 64  # about 16 tokens of text, or 16 token ids of 4 bytes
TOKENS_PER_KEY = 16  # for sizing a worker's share of the index from its KV stats
MIN_KEYS_PER_WORKER = 1024


def block_keys(data: bytes, block_bytes: int = BLOCK_BYTES) -> list[int]:
    """Chained keys of the full blocks of `data` (a trailing partial block has none)."""
    keys: list[int] = []
    key = 0
    view = memoryview(data)
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        key = xxhash.xxh3_64_intdigest(view[start : start + block_bytes], seed=key)
        keys.append(key)
    return keys


class PrefixIndex:
    def __init__(self) -> None:
        self._keys: dict[str, OrderedDict[int, None]] = {}

    def match(self, worker_id: str, keys: Sequence[int]) -> int:
        """How many leading keys the worker is thought to hold."""
        held = self._keys.get(worker_id)
        if not held:
            return 0
        n = 0
        for key in keys:
            if key not in held:
                break
            n += 1
        return n

    def record(self, worker_id: str, keys: Sequence[int], capacity_tokens: int = 0) -> None:
        """The worker was sent a request with these keys; it holds at most `capacity_tokens` (0: unknown)."""
        if not keys:
            return
        held = self._keys.setdefault(worker_id, OrderedDict())
        for key in reversed(keys):  # the first block most recent: the tail is forgotten first, as caches evict
            held[key] = None
            held.move_to_end(key)
        limit = max(MIN_KEYS_PER_WORKER, capacity_tokens // TOKENS_PER_KEY)
        while len(held) > limit:
            held.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        self._keys.pop(worker_id, None)

    def __len__(self) -> int:
        return sum(map(len, self._keys.values()))
