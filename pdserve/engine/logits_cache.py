"""The last position's logits of recent block-aligned prompts, for prompts found whole in the prefix cache.

A prompt whose every block is in the prefix cache still needs its last position's
logits to sample the next token; without this cache the engine recomputes that
position through every layer (a batch-1 forward: milliseconds of compute, and on a
prefill daemon a stall of the KV stream it competes with for the CPU and the GIL).
The logits depend on the token ids alone, so they are kept keyed by them: an entry is
used only when the prefix cache holds the whole prompt (its KV is needed anyway), and
the key is the whole token tuple, so no hash collision can hand out another prompt's
logits. Sampling then runs on them with the request's own parameters and seed.
Least recently used entries go first; capacity 0 turns the cache off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


class PromptLogitsCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()  # tokens -> [V]
        self.num_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, token_ids: Sequence[int]) -> torch.Tensor | None:
        """The [V] logits following exactly these tokens, if kept (the caller must not modify them)."""
        if not self.capacity:
            return None
        key = tuple(token_ids)
        logits = self._entries.get(key)
        if logits is not None:
            self._entries.move_to_end(key)
            self.num_hits += 1
        return logits

    def put(self, token_ids: Sequence[int], logits: torch.Tensor) -> None:
        """Keep a copy of the [V] logits that follow token_ids."""
        if not self.capacity:
            return
        key = tuple(token_ids)
        self._entries[key] = logits.detach().clone()
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
