"""Paged attention for one step: decode rows batched, prefill chunks varlen, read in place.

Two implementations share one signature (`pdserve/engine/kernels/`):
- the compiled CPU op, which reads each sequence's K/V blocks where they lie in the
  cache (no gather copy), GQA folded, online softmax in fp32, split across heads,
  sequences and KV partitions (flash-decoding) and, for prefill, tiled causally;
- the PyTorch reference (`kernels/reference.py`), which gathers blocks and runs folded
  matrix products: the path on CUDA, for shapes or CPUs the op does not support, and
  when `PDSERVE_ATTENTION=reference` asks for it.
The backend is chosen once per model runner; the metadata is built once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace

import torch

from pdserve.engine import kernels
from pdserve.engine.kernels import reference
from pdserve.engine.kv_cache import KVCache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AttentionMetadata:
    """Where this step's tokens go and what they attend to; built once, used by every layer.

    Rows [0, num_decode) are decode tokens, one per sequence; the rest are prefill chunks,
    back to back. Block tables are int32, padded with block 0 past a sequence's blocks.
    """

    slots: torch.Tensor  # [T] KV slot of each new token
    num_decode: int
    decode_block_tables: torch.Tensor | None  # [B, max_blocks]
    decode_context_lens: torch.Tensor | None  # [B] keys each decode row attends (its own included)
    prefill_block_tables: torch.Tensor | None  # [N, max_blocks]
    prefill_query_start: torch.Tensor | None  # [N + 1] first row of each chunk, relative to num_decode
    prefill_start_pos: torch.Tensor | None  # [N] position of each chunk's first row in its sequence
    backend: AttentionBackend


class AttentionBackend:
    """The compiled op or the PyTorch reference, picked for one cache's device, dtype and head size."""

    def __init__(self, kv_cache: KVCache) -> None:
        device = kv_cache.k[0].device
        impl: ModuleType | SimpleNamespace = reference
        self.name = "reference"
        if kernels.supports(kv_cache.head_dim, kv_cache.dtype, device):
            ops = kernels.attention_ops()
            if ops is not None:
                impl, self.name = ops, "kernel"
        elif device.type == "cpu":
            logger.info("paged attention: the compiled op does not support head_dim=%d dtype=%s; "
                        "using the PyTorch reference", kv_cache.head_dim, kv_cache.dtype)
        self._decode = impl.paged_attention_decode
        self._prefill = impl.paged_attention_prefill
        self._block_size = kv_cache.block_size

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D] (rope applied) -> [T, H * D]."""
        num_tokens, num_heads, head_dim = q.shape
        nd = meta.num_decode
        decode = prefill = None
        if nd:
            decode = self._decode(q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                  self._block_size, scale)
        if nd < num_tokens:
            prefill = self._prefill(q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start,
                                    meta.prefill_start_pos, self._block_size, scale)
        if prefill is None or decode is None:
            out = decode if prefill is None else prefill
        else:
            out = torch.cat([decode, prefill])
        return out.view(num_tokens, num_heads * head_dim)
