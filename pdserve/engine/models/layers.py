"""Building blocks of the forward pass: linear layers, RMSNorm, rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.host import cpu_has_fast_bf16
from pdserve.engine.quantization import Int4Linear, Int4Weight, Int8Linear, Int8Weight, QuantizedWeight
from pdserve.errors import IncompatibleError


def _onednn_bf16_prepack_available() -> bool:
    return cpu_has_fast_bf16() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear:
    """y = x W^T + b, with W prepacked for oneDNN on CPU in bf16.

    Prepacking removes the weight reorder from every call; on these CPUs it makes
    the decode GEMMs 1.2-1.5x faster than F.linear (PERF-NOTES). fp32 stays on
    F.linear so the oracle comparison runs the same kernel as transformers.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack_batch: int = 32) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.packed: torch.Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _onednn_bf16_prepack_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, prepack_batch)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


AnyLinear = Linear | Int4Linear | Int8Linear


def make_linear(weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> AnyLinear:
    """The linear layer for a weight: dense, or quantized when the loader quantized it."""
    if isinstance(weight, Int4Weight):
        return Int4Linear(weight, bias)
    if isinstance(weight, Int8Weight):
        return Int8Linear(weight, bias)
    return Linear(weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32:
        # One fused kernel (fp32 accumulation) instead of two dtype copies and five ops.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # fp32: the same order of operations as transformers' Llama RMSNorm, so greedy
    # output matches the reference token for token.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RotaryEmbedding:
    """cos/sin tables for every position, from the model config's rope parameters."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype, device) -> None:
        inv_freq, scaling = _inv_freq(hf_config, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = (emb.cos() * scaling).to(dtype=dtype, device=device)
        self.sin = (emb.sin() * scaling).to(dtype=dtype, device=device)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of a step's positions ([T] -> [T, 1, D]); looked up once, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, D] rotated by its positions' angles."""
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def _inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type in ("dynamic", "longrope"):
        # Their frequencies depend on the sequence length: not a fixed table.
        raise IncompatibleError(f"rope_type {rope_type!r} is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise IncompatibleError(f"rope_type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(scaling)
