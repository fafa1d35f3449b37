"""Paged attention in PyTorch: the path on CUDA, the fallback on CPU, the compiled op's oracle.

The two functions have the signatures of the ops in `csrc/paged_attention.cpp`.
Blocks are gathered with one `index_select` on dim 0 of the cache seen as
[Hkv * blocks, block_size, D] (several times faster on CPU than advanced indexing),
GQA is folded (the G query heads of a KV head become G rows of one matrix product),
and the softmax runs in fp32; on CPU the products do too (bf16 matrix products are
emulated, several times slower than fp32, on CPUs without AVX512-BF16). Prefill walks each sequence's queries in chunks of
`QUERY_CHUNK` tokens, so the score matrix stays bounded and each chunk skips the keys
after its last query.
"""

from __future__ import annotations

import torch

from pdserve.engine.kv_cache import gather_blocks

QUERY_CHUNK = 128


def paged_attention_decode(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [Hkv, S, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M] int32
    context_lens: torch.Tensor,  # [B] int32
    block_size: int,
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    batch, num_heads, head_dim = q.shape
    hkv = k_cache.shape[0]
    group = num_heads // hkv
    dtype = _compute_dtype(q)
    k = gather_blocks(k_cache, block_tables, block_size).to(dtype)  # [Hkv * B, M * bs, D]
    v = gather_blocks(v_cache, block_tables, block_size).to(dtype)
    qf = q.reshape(batch, hkv, group, head_dim).transpose(0, 1).reshape(hkv * batch, group, head_dim).to(dtype)
    scores = torch.bmm(qf, k.transpose(1, 2)).float().mul_(scale)  # [Hkv * B, G, L]
    key_pos = torch.arange(k.shape[1], device=q.device)
    masked = key_pos.view(1, -1) >= context_lens.to(torch.long).view(-1, 1)  # [B, L]
    scores.masked_fill_(masked.repeat(hkv, 1).unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.bmm(probs, v).to(q.dtype)  # [Hkv * B, G, D]
    return out.view(hkv, batch, group, head_dim).transpose(0, 1).reshape(batch, num_heads, head_dim)


def paged_attention_prefill(
    q: torch.Tensor,  # [T, H, D], N chunks back to back
    k_cache: torch.Tensor,  # [Hkv, S, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [N, M] int32
    query_start: torch.Tensor,  # [N + 1] int32
    start_pos: torch.Tensor,  # [N] int32
    block_size: int,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    starts = query_start.tolist()
    for n, first_pos in enumerate(start_pos.tolist()):
        rows = slice(starts[n], starts[n + 1])
        if rows.start == rows.stop:
            continue
        num_keys = first_pos + rows.stop - rows.start
        num_blocks = -(-num_keys // block_size)
        table = block_tables[n : n + 1, :num_blocks]
        dtype = _compute_dtype(q)
        k = gather_blocks(k_cache, table, block_size).to(dtype)
        v = gather_blocks(v_cache, table, block_size).to(dtype)
        out[rows] = _prefill_one(q[rows].to(dtype), k, v, first_pos, scale)
    return out


def _prefill_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float) -> torch.Tensor:
    """One sequence's chunk: q [rows, H, D] at positions first_pos.., k and v [Hkv, L, D] -> [rows, H, D]."""
    num_rows, num_heads, head_dim = q.shape
    hkv = k.shape[0]
    group = num_heads // hkv
    qf = q.reshape(num_rows, hkv, group, head_dim).transpose(0, 1).reshape(hkv, num_rows * group, head_dim)
    out = torch.empty_like(qf)
    for first in range(0, num_rows, QUERY_CHUNK):
        last = min(first + QUERY_CHUNK, num_rows)
        num_keys = first_pos + last
        scores = torch.bmm(qf[:, first * group : last * group], k[:, :num_keys].transpose(1, 2))
        scores = scores.float().mul_(scale)  # [Hkv, (last - first) * G, keys]
        query_pos = torch.arange(first_pos + first, first_pos + last, device=q.device)
        key_pos = torch.arange(num_keys, device=q.device)
        masked = (key_pos.view(1, -1) > query_pos.view(-1, 1)).repeat_interleave(group, dim=0)
        scores.masked_fill_(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out[:, first * group : last * group] = torch.bmm(probs, v[:, :num_keys])
    return out.view(hkv, num_rows, group, head_dim).transpose(0, 1).reshape(num_rows, num_heads, head_dim)


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float32 if q.device.type == "cpu" else q.dtype
