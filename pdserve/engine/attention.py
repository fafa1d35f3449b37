"""Paged attention for one step: decode rows batched, prefill chunks per sequence.

GQA is folded into the query dimension (the G query heads sharing a KV head
become G rows of one matrix product), and K/V are gathered block-wise into the
head-major [Hkv * B, L, D] layout; on CPU this beats SDPA with one query row per
head several times over (see PERF-NOTES). Scores stay in the model's dtype; softmax accumulates in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.kv_cache import KVCache

# Queries per matrix product in causal prefill: bounds the score matrix and lets
# each chunk skip the keys after its last query.
PREFILL_QUERY_CHUNK = 128


@dataclass(slots=True)
class PrefillSpan:
    """One sequence's prefill chunk in the step's token rows."""

    row_start: int  # first row of this chunk in the step's flattened tokens
    num_rows: int
    start_pos: int  # position of the first row in its sequence
    gather_index: torch.Tensor  # KVCache.gather_index of its block table, [Hkv * num_blocks]
    # Causal bias of each query chunk, built by the first layer and reused by the others.
    biases: list[torch.Tensor] = field(default_factory=list)


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go and what they attend to; built once, used by every layer."""

    slots: torch.Tensor  # [T] KV slot of each new token
    num_decode: int  # rows [0, num_decode) are decode tokens, one per sequence
    decode_gather_index: torch.Tensor | None  # [Hkv * num_decode * max_blocks]
    decode_bias: torch.Tensor | None  # [Hkv * num_decode, 1, max_blocks * block_size], 0 or -inf
    prefills: list[PrefillSpan]


def paged_attention(
    q: torch.Tensor,  # [T, H, D], rope applied
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H * D]
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if meta.num_decode:
        out[: meta.num_decode] = _decode(q[: meta.num_decode], kv_cache, layer, meta, scale)
    for span in meta.prefills:
        rows = slice(span.row_start, span.row_start + span.num_rows)
        out[rows] = _prefill(q[rows], kv_cache, layer, span, scale)
    return out


def _fold(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[N, H, D] -> [Hkv, N * G, D]: the G query heads of a KV head become rows."""
    n, h, d = q.shape
    return q.view(n, num_kv_heads, h // num_kv_heads, d).transpose(0, 1).reshape(num_kv_heads, -1, d)


def _decode(q: torch.Tensor, kv_cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    hkv = kv_cache.num_kv_heads
    group = num_heads // hkv
    k, v = kv_cache.gather(layer, meta.decode_gather_index, batch)  # [Hkv * B, L, D]
    qf = q.view(batch, hkv, group, head_dim).transpose(0, 1).reshape(hkv * batch, group, head_dim)
    scores = torch.baddbmm(meta.decode_bias, qf, k.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1)  # [Hkv * B, G, L]; CPU softmax accumulates in fp32
    out = torch.bmm(probs, v)  # [Hkv * B, G, D]
    return out.view(hkv, batch, group, head_dim).transpose(0, 1).reshape(batch, num_heads * head_dim)


def _prefill(q: torch.Tensor, kv_cache: KVCache, layer: int, span: PrefillSpan, scale: float) -> torch.Tensor:
    num_rows, num_heads, head_dim = q.shape
    hkv = kv_cache.num_kv_heads
    group = num_heads // hkv
    k, v = kv_cache.gather(layer, span.gather_index, 1)  # [Hkv, L, D]
    qf = _fold(q, hkv)  # [Hkv, rows * G, D]
    out = torch.empty_like(qf)
    if not span.biases:
        span.biases = _causal_biases(span, num_rows, group, q.dtype, q.device)
    for chunk, first in enumerate(range(0, num_rows, PREFILL_QUERY_CHUNK)):
        last = min(first + PREFILL_QUERY_CHUNK, num_rows)
        num_keys = span.start_pos + last
        qc = qf[:, first * group : last * group]
        scores = torch.baddbmm(span.biases[chunk], qc, k[:, :num_keys].transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        out[:, first * group : last * group] = torch.bmm(probs, v[:, :num_keys])
    # [Hkv, rows * G, D] -> [rows, H * D]
    return out.view(hkv, num_rows, group, head_dim).transpose(0, 1).reshape(num_rows, num_heads * head_dim)


def _causal_biases(span: PrefillSpan, num_rows: int, group: int, dtype, device) -> list[torch.Tensor]:
    """Per query chunk: 0 where a (token, group) row may see a key, -inf after its position."""
    biases = []
    for first in range(0, num_rows, PREFILL_QUERY_CHUNK):
        last = min(first + PREFILL_QUERY_CHUNK, num_rows)
        query_pos = torch.arange(span.start_pos + first, span.start_pos + last, device=device)
        key_pos = torch.arange(span.start_pos + last, device=device)
        bias = torch.zeros(last - first, key_pos.numel(), dtype=dtype, device=device)
        bias.masked_fill_(key_pos.view(1, -1) > query_pos.view(-1, 1), float("-inf"))
        biases.append(bias.repeat_interleave(group, dim=0))  # rows are (token, group) pairs
    return biases
