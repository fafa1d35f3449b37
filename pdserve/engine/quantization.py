"""Weight-only quantization for the memory-bound decode regime: 4-bit and 8-bit linears.

Owns: the quantized weight formats (`Int4Weight`, `Int8Weight`), making them from a
GGUF file's Q4_0/Q4_1/Q8_0 blocks (no detour through a dense weight) or from a dense weight,
their linears (`Int4Linear`, `Int8Linear`, called like `layers.Linear`), the pure-PyTorch
reference of each, and the choice of kernel. Activations stay in the model's dtype
(fp32 or bf16); only the weights are quantized, and every product accumulates in fp32.
Which tensors are quantized, and how, is `quantize_weights`: the decoder linears in int4 or
int8, the LM head in int8; embeddings and norms stay dense.

Kernels, in order of preference (see `Int4Linear`):
1. pdserve's own (kernels/csrc/quant_linear.cpp): fp32 accumulation, fp32 scales, so a
   Q4_1 weight multiplies exactly as the file defines it, for fp32 and bf16 activations.
2. torch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`, for bf16 activations
   only: their scales must have the activations' dtype (bf16 rounds the file's fp16 d
   and m), and on an AVX2-only host their fp32 path is 10-25x slower than a dense fp32
   F.linear (measured on Zen 3), against about as fast as dense for bf16.
3. Neither: the weight dequantized once and kept dense (correct, but no gain).
From a few dozen rows on (prefill chunks) the GEMM is compute-bound: every backend then
runs one dense GEMM over the weight dequantized for that call.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.engine.config import QUANTIZATIONS
from pdserve.errors import IncompatibleError, InvalidRequestError

logger = logging.getLogger(__name__)

# Bumped when what a quantization computes changes (formats, rounding): workers of different
# versions then compute different KV, and their fingerprints must differ (model_loader).
QUANTIZATION_VERSION = 1
INT4_GROUP_SIZE = 32  # weights per (scale, offset) pair along the input dimension, as GGUF Q4_*

# GGUF block layouts (ggml), 32 weights per block: Q4_0 = fp16 d, 16 bytes of nibbles
# (w = d (q - 8)); Q4_1 = fp16 d, fp16 m, 16 bytes of nibbles (w = d q + m); Q8_0 = fp16 d,
# 32 int8 (w = d q). Type name -> bytes per block.
GGUF_INT4_TYPES = {"Q4_0": 18, "Q4_1": 20}
GGUF_INT8_TYPES = {"Q8_0": 34}
INT8_HEAD_GROUP_SIZE = 32  # the LM head's int8 scales: per 32 weights, as Q8_0


def validate_quantization(name: str | None) -> str | None:
    """The canonical name of a quantization ("int4" | "int8"), or None for none."""
    if name is None:
        return None
    canonical = name.strip().lower() if isinstance(name, str) else None
    if canonical not in QUANTIZATIONS:
        raise InvalidRequestError("quantization", f"unsupported quantization {name!r}; choose one of {QUANTIZATIONS}")
    return canonical


# The decoder layers' linears, by HF name suffix: these are quantized under either scheme.
LAYER_LINEAR_SUFFIXES = tuple(
    f"{module}.weight" for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                      "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
)
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def quantize_weights(
    weights: dict[str, torch.Tensor], quantization: str, dtype: torch.dtype,
    from_file: dict[str, Int4Weight] | None = None,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """A model's weights (HF names) with its decoder linears quantized and its LM head in int8.

    `from_file`: weights a GGUF stores quantized, under HF names (its LM head as "lm_head.weight"
    even when tied), taken as they are where their kind is the one asked for (int8 for the head).
    Embeddings and norms stay dense in `dtype`: a lookup reads one row per token, and norms
    are tiny. The LM head is int8 with a scale per 32 weights under both schemes (GGUF Q8_0's
    layout), a copy of the embedding when the two are tied: SmolLM2's [49152, 576] head at
    batch 1, fp32, Zen 3 takes 9.7 ms dense against 2.8 ms in int8, beside 12.7 ms for all 30
    layers' int4 linears (int4 would cost the logits more accuracy for little more speed).
    """
    from_file = from_file or {}
    kind = Int4Weight if quantization == "int4" else Int8Weight
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name, weight in weights.items():
        if name.endswith(LAYER_LINEAR_SUFFIXES):
            given = from_file.get(name)
            out[name] = given if isinstance(given, kind) else quantize(weight, quantization, dtype)
        elif name != LM_HEAD:
            out[name] = weight
    head = from_file.get(LM_HEAD)
    if not isinstance(head, Int8Weight):
        head = quantize_int8(weights.get(LM_HEAD, weights[EMBEDDING]), dtype, INT8_HEAD_GROUP_SIZE)
    out[LM_HEAD] = head
    return out


# ---------------------------------------------------------------------------------------------
# Weight formats


@dataclass(frozen=True)
class Int4Weight:
    """w[n, k] = scale[n, g] * q[n, k] + offset[n, g] with g = k // 32 and q in 0..15.

    GGUF Q4_1's formula and nibble order: in each group's 16 bytes, byte i holds q of the
    group's column i (low nibble) and of column i + 16 (high nibble). So a Q4_1 tensor's
    blocks are this format without arithmetic, and row-wise concatenation (fused q/k/v,
    gate/up) is exact, since groups run along the input dimension.
    """

    packed: torch.Tensor  # [N, K / 2] uint8
    scale: torch.Tensor  # [N, K / 32] float16 (from a GGUF) or float32
    offset: torch.Tensor  # [N, K / 32], scale's dtype
    dtype: torch.dtype  # of the activations it multiplies: the model's dtype

    def __post_init__(self) -> None:
        n, k = self.shape
        if (self.packed.dtype != torch.uint8 or self.packed.dim() != 2 or self.scale.dtype != self.offset.dtype
                or tuple(self.scale.shape) != (n, k // INT4_GROUP_SIZE) or self.offset.shape != self.scale.shape):
            raise IncompatibleError(f"inconsistent int4 weight: packed {tuple(self.packed.shape)} "
                                    f"{self.packed.dtype}, scale {tuple(self.scale.shape)}, offset "
                                    f"{tuple(self.offset.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def device(self) -> torch.device:
        return self.packed.device


@dataclass(frozen=True)
class Int8Weight:
    """w[n, k] = scale[n, k // (K / G)] * q[n, k]: symmetric, G scales per output channel.

    G = 1 (a scale per channel) for the linears; 32 weights per scale (GGUF Q8_0) for the LM head.
    """

    q: torch.Tensor  # [N, K] int8, in -127..127
    scale: torch.Tensor  # [N, G] float16 (from a GGUF) or float32
    dtype: torch.dtype  # of the activations it multiplies: the model's dtype

    def __post_init__(self) -> None:
        if (self.q.dtype != torch.int8 or self.q.dim() != 2 or self.scale.dim() != 2
                or self.scale.shape[0] != self.q.shape[0] or self.q.shape[1] % max(self.scale.shape[1], 1)):
            raise IncompatibleError(f"inconsistent int8 weight: q {tuple(self.q.shape)} {self.q.dtype}, "
                                    f"scale {tuple(self.scale.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def device(self) -> torch.device:
        return self.q.device


QuantizedWeight = Int4Weight | Int8Weight


def quantize(weight: torch.Tensor, quantization: str, dtype: torch.dtype) -> QuantizedWeight:
    """A dense [N, K] weight quantized by name ("int4" | "int8")."""
    return quantize_int4(weight, dtype) if quantization == "int4" else quantize_int8(weight, dtype)


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
    """Group-wise min/max to 16 levels (what GGUF's Q4_1 does, in fp32 scales)."""
    n, k = weight.shape
    _check_int4_width(k)
    groups = weight.detach().float().reshape(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low, high = groups.amin(-1), groups.amax(-1)  # [N, G]
    scale = (high - low) / 15
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = ((groups - low[..., None]) * inverse[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Weight(_pack_nibbles(q.reshape(n, k)), scale, low, dtype)


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype, group_size: int | None = None) -> Int8Weight:
    """Symmetric, scale = max |w| / 127 per output channel, or per `group_size` weights of one."""
    n, k = weight.shape
    group = k if group_size is None else group_size
    if k % group or group % 16:
        raise InvalidRequestError("quantization", f"int8 groups of {group} do not tile in_features {k} by 16s")
    groups = weight.detach().float().reshape(n, k // group, group)
    scale = groups.abs().amax(-1) / 127  # [N, G]
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = (groups * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.reshape(n, k), scale, dtype)


def int4_from_gguf_blocks(blocks: np.ndarray, type_name: str, dtype: torch.dtype) -> Int4Weight:
    """A GGUF Q4_0/Q4_1 tensor's raw blocks ([N, K / 32 * bytes per block] uint8) as it stores them."""
    block_bytes = GGUF_INT4_TYPES[type_name]
    n = blocks.shape[0]
    # A copy: a GGUF's tensors are views of a read-only memory map.
    raw = torch.from_numpy(np.array(blocks, dtype=np.uint8)).reshape(n, -1, block_bytes)  # [N, G, bytes]
    scale = raw[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [N, G]
    if type_name == "Q4_1":
        offset = raw[..., 2:4].contiguous().view(torch.float16)[..., 0]
    else:  # Q4_0: d (q - 8) = d q + (-8 d), computed in fp32 (where it cannot overflow)
        scale = scale.float()
        offset = -8 * scale
    packed = raw[..., block_bytes - INT4_GROUP_SIZE // 2 :].reshape(n, -1).contiguous()
    return Int4Weight(packed, scale, offset, dtype)


def int8_from_gguf_blocks(blocks: np.ndarray, type_name: str, dtype: torch.dtype) -> Int8Weight:
    """A GGUF Q8_0 tensor's raw blocks ([N, K / 32 * 34] uint8) as it stores them."""
    block_bytes = GGUF_INT8_TYPES[type_name]
    n = blocks.shape[0]
    raw = torch.from_numpy(np.array(blocks, dtype=np.uint8)).reshape(n, -1, block_bytes)  # [N, G, bytes], a copy
    scale = raw[..., 0:2].contiguous().view(torch.float16)[..., 0]  # [N, G]
    q = raw[..., 2:].contiguous().view(torch.int8).reshape(n, -1)
    return Int8Weight(q, scale, dtype)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The dense fp32 weight [N, K] a quantized one stands for (the reference of every kernel)."""
    if isinstance(weight, Int8Weight):
        n, k = weight.shape
        groups = weight.q.float().reshape(n, weight.scale.shape[1], -1)
        return (groups * weight.scale.float()[..., None]).reshape(n, k)
    n, k = weight.shape
    q = _unpack_nibbles(weight.packed).float().reshape(n, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    return (q * weight.scale.float()[..., None] + weight.offset.float()[..., None]).reshape(n, k)


def concat_rows(weights: list[torch.Tensor] | list[QuantizedWeight]) -> torch.Tensor | QuantizedWeight:
    """Weights stacked along the output dimension (fusing q/k/v or gate/up); exact for every format."""
    first = weights[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(weights)
    same = all(w.scale.dtype == first.scale.dtype for w in weights)
    common = first.scale.dtype if same else torch.float32  # fp16 (a GGUF's) into fp32 is exact
    if isinstance(first, Int8Weight):
        if len({w.scale.shape[1] for w in weights}) > 1:
            raise IncompatibleError("int8 weights with different scale groups cannot be fused")
        return Int8Weight(torch.cat([w.q for w in weights]), torch.cat([w.scale.to(common) for w in weights]),
                          first.dtype)
    return Int4Weight(
        torch.cat([w.packed for w in weights]),
        torch.cat([w.scale.to(common) for w in weights]),
        torch.cat([w.offset.to(common) for w in weights]),
        first.dtype,
    )


def select_rows(weight: QuantizedWeight, index: torch.Tensor) -> QuantizedWeight:
    """Rows `index` of a weight, in that order (for GGUF's q/k row permutation)."""
    if isinstance(weight, Int8Weight):
        return Int8Weight(weight.q[index], weight.scale[index], weight.dtype)
    return Int4Weight(weight.packed[index], weight.scale[index], weight.offset[index], weight.dtype)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:  # [N, K] uint8 0..15 -> [N, K / 2]
    n, k = q.shape
    halves = q.reshape(n, k // INT4_GROUP_SIZE, 2, INT4_GROUP_SIZE // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:  # [N, K / 2] -> [N, K] uint8 0..15
    n, half = packed.shape
    groups = packed.reshape(n, half // (INT4_GROUP_SIZE // 2), 1, INT4_GROUP_SIZE // 2)
    return torch.cat((groups & 0x0F, groups >> 4), dim=2).reshape(n, half * 2)


def _check_int4_width(in_features: int) -> None:
    if in_features % INT4_GROUP_SIZE:
        raise InvalidRequestError(
            "quantization", f"int4 needs in_features divisible by {INT4_GROUP_SIZE}, got {in_features}"
        )


# ---------------------------------------------------------------------------------------------
# Kernels


@functools.cache
def _load_native_kernels() -> None:
    """Load pdserve's kernel library once; without it the torch paths still work."""
    try:
        from pdserve.engine import kernels

        kernels.load()
    except Exception as error:  # not built, no compiler, another ISA: never fatal
        logger.info("pdserve's quantized-linear kernels are unavailable (%s); using torch's", error)


def native_ops_available() -> bool:
    """Whether torch.ops.pdserve has the int4/int8 linears (from kernels.load() or a test's build)."""
    _load_native_kernels()
    try:
        torch.ops.pdserve.int4_linear, torch.ops.pdserve.int8_linear  # noqa: B018 (a lookup that may raise)
    except (AttributeError, RuntimeError):
        return False
    return True


def int4_linear_reference(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What every int4 kernel computes: x times the dequantized weight, in fp32, cast back."""
    y = F.linear(x.float(), dequantize(weight), None if bias is None else bias.float())
    return y.to(x.dtype)


def int8_linear_reference(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = F.linear(x.float(), dequantize(weight), None if bias is None else bias.float())
    return y.to(x.dtype)


class _QuantizedLinear:
    """What Int4Linear and Int8Linear share: the row count that picks kernel or dense GEMM, bias, shapes."""

    out_features: int
    in_features: int
    bias: torch.Tensor | None
    dense: torch.Tensor | None  # the weight dequantized once (backend "dense"), else None
    dense_min_rows: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [T, K]
        if self.dense is not None or rows.shape[0] >= self.dense_min_rows:
            return F.linear(rows, self.dense_weight(rows.dtype), self.bias).reshape(*x.shape[:-1], self.out_features)
        y = self._kernel(rows)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight [N, K] in `dtype`: the kept one, else dequantized for this call."""
        if self.dense is not None:
            return self.dense.to(dtype)
        return self._dequantize(dtype)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N], no bias
        raise NotImplementedError

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class Int4Linear(_QuantizedLinear):
    """y = x W^T + b with W an Int4Weight; the same interface as layers.Linear.

    Backends: "pdserve" (our kernel), "torch" (bf16 activations, no kernel of ours), or
    "dense" (neither: the weight dequantized once and kept, so never slower than dense,
    but no memory saved). From `dense_min_rows` rows on (prefill chunks) the kernels give
    way to one dense GEMM over the weight dequantized for that call.
    """

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.scale = weight.scale.float().contiguous()  # [N, G]: fp32 whatever the activations
        self.offset = weight.offset.float().contiguous()
        self.backend = _pick_backend(weight, torch_ok=self.out_features % 16 == 0)
        # Measured on Zen 3 (fp32, SmolLM2 shapes): our kernel unpacks the weight once per 4
        # rows and loses to dequantize + dense GEMM from about 32 rows; torch's too (PERF-NOTES).
        self.dense_min_rows = 32
        self.dense: torch.Tensor | None = None
        if self.backend == "torch":
            q = _unpack_nibbles(weight.packed).to(torch.int32)
            self.torch_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            # torch's kernel computes (q - 8) * scale + zero, with both in the activations' dtype.
            zero = self.offset + 8 * self.scale
            self.scales_and_zeros = torch.stack((self.scale.t(), zero.t()), dim=-1).to(weight.dtype).contiguous()
        elif self.backend == "dense":
            self.dense = dequantize(weight).to(weight.dtype)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if self.backend == "pdserve":
            return torch.ops.pdserve.int4_linear(rows, self.weight.packed, self.scale, self.offset)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.torch_packed, INT4_GROUP_SIZE,
                                                          self.scales_and_zeros)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.backend == "pdserve":
            return torch.ops.pdserve.int4_dequantize(self.weight.packed, self.scale, self.offset, dtype)
        return dequantize(self.weight).to(dtype)


class Int8Linear(_QuantizedLinear):
    """y = x W^T + b with W an Int8Weight; the same interface and backends as Int4Linear."""

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.scale = weight.scale.float().contiguous()  # [N, G]
        # torch's kernel has one scale per channel; ours wants groups of a multiple of 16 weights.
        native_ok = self.in_features % (16 * weight.scale.shape[1]) == 0
        self.backend = _pick_backend(weight, torch_ok=weight.scale.shape[1] == 1, native_ok=native_ok)
        # Our int8 kernel still beats dense fp32 at 32 rows on Zen 3 (no nibbles to unpack).
        self.dense_min_rows = 64 if self.backend == "pdserve" else 32
        self.dense: torch.Tensor | None = None
        if self.backend == "torch":
            self.scale_lowp = weight.scale[:, 0].to(weight.dtype)  # torch's kernel wants the activations' dtype
        elif self.backend == "dense":
            self.dense = dequantize(weight).to(weight.dtype)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if self.backend == "pdserve":
            return torch.ops.pdserve.int8_linear(rows, self.weight.q, self.scale)
        return torch.ops.aten._weight_int8pack_mm(rows, self.weight.q, self.scale_lowp)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight).to(dtype)


def _pick_backend(weight: QuantizedWeight, torch_ok: bool, native_ok: bool = True) -> str:
    """"pdserve" | "torch" | "dense" for a weight (see Int4Linear)."""
    if weight.device.type != "cpu":
        raise InvalidRequestError("quantization", f"quantized linears run on the CPU only, not on {weight.device}")
    if native_ok and native_ops_available():
        return "pdserve"
    if torch_ok and weight.dtype == torch.bfloat16:
        return "torch"
    _warn_dense_once(weight.dtype)
    return "dense"


@functools.cache
def _warn_dense_once(dtype: torch.dtype) -> None:
    logger.warning("pdserve's quantized-linear kernels are not loaded and torch's are slower than dense "
                   "for %s activations on this CPU: quantized weights run dequantized (dense speed and memory)",
                   str(dtype).removeprefix("torch."))
