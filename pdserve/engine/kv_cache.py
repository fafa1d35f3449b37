"""The KV cache tensors: one K and one V tensor per layer, paged in blocks.

Layout per layer: [num_kv_heads, num_blocks * block_size, head_dim], head-major:
each block of a head is block_size contiguous rows, which the compiled attention
op reads in place, and gathering blocks (the PyTorch path, export) is one
`index_select` on dim 0 of a [num_kv_heads * num_blocks, block_size, head_dim]
view. A token's slot is block_id * block_size + offset.
One block past the pool's (`scratch_slot`) takes writes that must not land:
the recomputed last token of a prompt found whole in the prefix cache, whose
shared block already holds its KV and stays immutable.
Which blocks belong to whom is `kv_cache_manager`'s business, not this module's.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.scratch_slot = num_blocks * block_size
        blocks_per_head = num_blocks + 1  # the pool's blocks and the scratch block
        shape = (num_kv_heads, blocks_per_head * block_size, head_dim)
        # Zeroed, not empty: padding slots are read (then masked) and must not hold NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * block_size * itemsize

    def write_head_major(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of tokens at their slots. slots: [T]; k, v: [Hkv, T, D] (the cache's, and the wire's, layout)."""
        write_kv_head_major(self.k[layer], self.v[layer], slots, k, v)

    def slot_ids(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Slots of token positions [start, end) of a sequence, as plain ints (cheap for one token)."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slots of token positions [start, end) of a sequence, as a tensor on the cache's device."""
        return torch.tensor(self.slot_ids(block_table, start, end), dtype=torch.long, device=self.k[0].device)

    def copy_prefix(self, src_block: int, dst_block: int, num_tokens: int) -> None:
        """Copy the first num_tokens slots of a block into another, in every layer (a forked sample's
        own copy of the partly filled block it shares with its parent)."""
        src, dst = src_block * self.block_size, dst_block * self.block_size
        for cache in (*self.k, *self.v):
            cache[:, dst : dst + num_tokens].copy_(cache[:, src : src + num_tokens])

    def read(self, layer: int, block_table: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [start, end) as [Hkv, T, D], for export.

        Views of new tensors (not of the cache), each
        head's [T, D] rows contiguous: one block-granular copy out of the cache.
        """
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        table = torch.tensor([block_table[first:last]], dtype=torch.long, device=self.k[0].device)
        lo, hi = start - first * bs, end - first * bs
        k = gather_blocks(self.k[layer], table, bs)[:, lo:hi]
        v = gather_blocks(self.v[layer], table, bs)[:, lo:hi]
        return k, v

    def export_view(self, layer: int, block_table: list[int], start: int,
                    end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [start, end) as [Hkv, T, D], each head's rows contiguous, for export.

        When the range's blocks are consecutive (the usual case: the pool hands out
        fresh blocks in order) these are views of the cache itself, valid only until the
        engine next writes: the exporter copies them once, into its message. Else a `read`.
        """
        bs = self.block_size
        first, last = start // bs, -(-end // bs)
        ids = block_table[first:last]
        if ids != list(range(ids[0], ids[0] + len(ids))):
            return self.read(layer, block_table, start, end)
        lo = ids[0] * bs + start - first * bs
        return self.k[layer][:, lo : lo + end - start], self.v[layer][:, lo : lo + end - start]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """Store K/V of tokens in one layer's cache at their slots. slots: [T]; k, v: [T, Hkv, D] (the model's layout)."""
    write_kv_head_major(k_cache, v_cache, slots, k.transpose(0, 1), v.transpose(0, 1))


def write_kv_head_major(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor) -> None:
    """Store K/V of tokens in one layer's cache at their slots.

    k, v: [Hkv, T, D] (the cache's, and the wire's, layout)."""
    k_cache.index_copy_(1, slots, k.to(k_cache.dtype))
    v_cache.index_copy_(1, slots, v.to(v_cache.dtype))


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
    """The blocks of block_tables [B, M] from one layer's cache [Hkv, S, D], as [Hkv * B, M * block_size, D].

    One `index_select` on dim 0 of the cache seen as [Hkv * blocks, block_size, D]: several
    times faster on CPU than advanced indexing, and no transpose copy.
    """
    hkv, num_slots, head_dim = cache.shape
    blocks_per_head = num_slots // block_size
    heads = torch.arange(hkv, device=cache.device).view(-1, 1, 1) * blocks_per_head
    index = (heads + block_tables.to(device=cache.device, dtype=torch.long).unsqueeze(0)).reshape(-1)
    rows = cache.view(hkv * blocks_per_head, block_size, head_dim)
    return rows.index_select(0, index).view(hkv * block_tables.shape[0], -1, head_dim)
