"""The on-disk cache of GGUF files: dequantized through transformers, or quantized as stored.

Owns: where pdserve caches derived files (`cache_dir()`); identifying a GGUF by its
sha256; dequantizing it with transformers' own GGUF loader; reading the raw Q4_0/Q4_1/
Q8_0 blocks of its decoder linears and LM head (for `--quantization`, no detour through
a dense weight); and storing and reading the results. `model_loader` decides what a model is
and whether we support it; this module only makes a GGUF's second load cheap.

Layout, under `cache_dir()/weights/`, keyed by <digest> = the first 32 hex digits
of the GGUF file's sha256:
    <digest>/                      config.json and tokenizer files, written first
    <digest>-<dtype>.safetensors   the dequantized weights, written last
    <digest>-blocks.safetensors    the linears and LM head the file stores as Q4_0/Q4_1/Q8_0,
                                   as stored (HF names, q/k rows in HF order, the head as
                                   lm_head.weight): "<name>:packed|scale|offset" (int4),
                                   "<name>:q|scale" (int8)
Each is written under a temporary name and renamed into place, so a reader (or a
second process starting at the same moment) sees a whole entry or none. A weights
file carries the cache format and the digest in its metadata; a file whose metadata,
contents or shapes do not check out is a miss, never an error. (Parsing the GGUF again
costs about 5 s for SmolLM2, reading the blocks file well under a second.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pdserve.engine.host import cache_dir
from pdserve.engine.quantization import (
    GGUF_INT4_TYPES,
    GGUF_INT8_TYPES,
    LM_HEAD,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    int4_from_gguf_blocks,
    int8_from_gguf_blocks,
    select_rows,
)
from pdserve.errors import IncompatibleError, InvalidRequestError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

    ConfigAndTokenizer = tuple[PretrainedConfig, PreTrainedTokenizerBase]

logger = logging.getLogger(__name__)

_HASH_CHUNK_BYTES = 8 << 20
_CACHE_FORMAT = "1"  # bump when the cached file layout changes; older entries then read as misses
_BLOCKS_FORMAT = "blocks.1"  # the same, for <digest>-blocks.safetensors
_PARTS = {Int4Weight: ("packed", "scale", "offset"), Int8Weight: ("q", "scale")}
# llama.cpp's names of a decoder layer's linears (the same for llama, mistral, qwen2) -> HF's.
_GGUF_LINEARS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GgufCacheEntry:
    """The cache entry of one GGUF file."""

    gguf: pathlib.Path
    weights_dir: pathlib.Path  # cache_dir()/weights
    digest: str  # first 32 hex digits of the GGUF's sha256; also the model's weights_digest

    @classmethod
    def of(cls, gguf: pathlib.Path) -> GgufCacheEntry:
        """The entry of `gguf` under the current cache_dir(); reads the whole file to hash it."""
        return cls(gguf, cache_dir() / "weights", _file_sha256(gguf)[:32])

    @property
    def meta_dir(self) -> pathlib.Path:
        return self.weights_dir / self.digest

    def read_meta(self, load: Callable[[pathlib.Path], ConfigAndTokenizer]) -> ConfigAndTokenizer | None:
        """The cached config and tokenizer, read by `load`; None when absent or broken."""
        if not self.meta_dir.is_dir():
            return None
        try:
            return load(self.meta_dir)
        except InvalidRequestError as error:
            # Loading still works from the GGUF itself; only the speed-up is lost until it is deleted.
            logger.warning("ignoring the broken cache entry %s (delete it to rebuild): %s", self.meta_dir, error)
            return None

    def save_meta(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write config and tokenizer into a temporary directory, then rename it into place."""
        meta_dir = self.meta_dir
        tmp: pathlib.Path | None = None
        try:
            meta_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{meta_dir.name}.", dir=meta_dir.parent))
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, meta_dir)
        except OSError as error:
            if not meta_dir.is_dir():  # else another process won the race with an identical entry
                logger.warning("could not write the config cache %s: %s", meta_dir, error)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def weights(self, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """The weights in `dtype` on the CPU: from the cache, else dequantized once and cached."""
        cached = _cached_weights(self.weights_dir, self.digest, dtype, shapes)
        if cached is not None:
            return cached
        return _cast_and_save(_dequantize_gguf(self.gguf, shapes), self.weights_dir, self.digest, dtype)

    def quantized_weights(
        self, num_heads: int, num_kv_heads: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
    ) -> dict[str, QuantizedWeight]:
        """The linears and LM head the GGUF stores as Q4_0/Q4_1/Q8_0, exactly as stored, under HF names.

        From the cache, else read from the file's blocks and cached. Tensors of other types are
        absent: the caller quantizes those from the dense weights. `dtype`: the activations'.
        """
        file = self.weights_dir / f"{self.digest}-blocks.safetensors"
        tensors = _read_tensors(file, self.digest, _BLOCKS_FORMAT)
        weights = None if tensors is None else _quantized_from_tensors(tensors, _head_shapes(shapes), dtype)
        if weights is None:
            weights = _read_gguf_blocks(self.gguf, num_heads, num_kv_heads, _head_shapes(shapes), dtype)
            flat = {f"{name}:{part}": getattr(w, part) for name, w in weights.items() for part in _PARTS[type(w)]}
            _save_weights(flat, file, self.digest, _BLOCKS_FORMAT)
        return weights


def shape_problem(weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why `weights` does not hold exactly-shaped tensors for every name in `shapes`, or None."""
    missing = sorted(set(shapes) - set(weights))
    if missing:
        return f"{len(missing)} weights are missing, e.g. {missing[:3]}"
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            return f"{name} has shape {tuple(weights[name].shape)}, the config implies {shape}"
    return None


def _dequantize_gguf(path: pathlib.Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """fp32 weights exactly as transformers' dequantizing GGUF loader produces them."""
    from transformers import AutoModelForCausalLM, GgufConfig

    logger.info("dequantizing %s once; later loads read the cache under %s", path, cache_dir())
    # Going through from_pretrained (rather than its internals) keeps us equal to the oracle
    # model by construction, whichever GGUF code path transformers takes for this file.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name,
            dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError) as error:  # how transformers rejects a file it cannot load
        raise InvalidRequestError("model", f"cannot load {path.name}: {error}") from error
    weights = {name: param.detach().contiguous() for name, param in model.named_parameters() if name in shapes}
    problem = shape_problem(weights, shapes)
    if problem is not None:
        raise IncompatibleError(f"{path}: {problem}")
    return weights


def _head_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`shapes` with the LM head's, which a tied model lists only as the embedding."""
    return {LM_HEAD: shapes["model.embed_tokens.weight"], **shapes}


def _read_gguf_blocks(
    path: pathlib.Path, num_heads: int, num_kv_heads: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> dict[str, QuantizedWeight]:
    from gguf import GGUFReader

    logger.info("reading the quantized blocks of %s once; later loads read the cache under %s", path, cache_dir())
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise InvalidRequestError("model", f"cannot read {path.name}: {error}") from error
    field = reader.fields.get("general.architecture")
    # llama.cpp stores llama's q/k rows permuted for its rotary layout; transformers undoes it, so do we.
    permuted = field is not None and bytes(field.parts[field.data[0]]).decode() == "llama"
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # The LM head: output.weight, or the embedding when the two are tied.
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    weights: dict[str, QuantizedWeight] = {}
    for gguf_name, tensor in tensors.items():
        name = LM_HEAD if gguf_name == head else _hf_linear_name(gguf_name)
        type_name = tensor.tensor_type.name
        if name is None or name not in shapes or type_name not in GGUF_INT4_TYPES | GGUF_INT8_TYPES:
            continue
        blocks = np.asarray(tensor.data)
        make = int4_from_gguf_blocks if type_name in GGUF_INT4_TYPES else int8_from_gguf_blocks
        weight = make(blocks, type_name, dtype)
        if weight.shape != shapes[name]:
            raise IncompatibleError(f"{path}: {gguf_name} has shape {weight.shape}, the config implies "
                                    f"{shapes[name]}")
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = num_heads if name.endswith("q_proj.weight") else num_kv_heads
            weight = select_rows(weight, _unpermute_rows(weight.shape[0], heads))
        weights[name] = weight
    return weights


def _hf_linear_name(gguf_name: str) -> str | None:
    """model.layers.<i>.<module>.weight for blk.<i>.<linear>.weight, else None."""
    parts = gguf_name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in _GGUF_LINEARS:
        return None
    return f"model.layers.{parts[1]}.{_GGUF_LINEARS[parts[2]]}.weight"


def _unpermute_rows(num_rows: int, num_heads: int) -> torch.Tensor:
    """For each HF row of q or k, its row in llama.cpp's layout (per head: pairs interleaved)."""
    half = num_rows // num_heads // 2
    return torch.arange(num_rows).reshape(num_heads, half, 2).transpose(1, 2).reshape(-1)


def _quantized_from_tensors(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> dict[str, QuantizedWeight] | None:
    weights: dict[str, QuantizedWeight] = {}
    for name in {key.rsplit(":", 1)[0] for key in tensors}:
        kind = Int4Weight if f"{name}:packed" in tensors else Int8Weight
        parts = [tensors.get(f"{name}:{part}") for part in _PARTS[kind]]
        try:
            weight = None if any(p is None for p in parts) else kind(*parts, dtype)
        except IncompatibleError:
            weight = None
        if weight is None or name not in shapes or weight.shape != shapes[name]:
            logger.warning("ignoring the quantized-blocks cache: %s is incomplete or does not fit the config", name)
            return None
        weights[name] = weight
    return weights


def _cached_weights(
    weights_dir: pathlib.Path, digest: str, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    """The cached weights in `dtype`, derived from a cached fp32 copy if only that exists."""
    exact = _read_cached_file(_weights_file(weights_dir, digest, dtype), digest, shapes)
    if exact is not None or dtype == torch.float32:
        return exact
    full = _read_cached_file(_weights_file(weights_dir, digest, torch.float32), digest, shapes)
    return None if full is None else _cast_and_save(full, weights_dir, digest, dtype)


def _cast_and_save(
    full: dict[str, torch.Tensor], weights_dir: pathlib.Path, digest: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`full` (fp32) cast to `dtype`, which is also written to the cache."""
    weights = {name: tensor.to(dtype) for name, tensor in full.items()}
    _save_weights(weights, _weights_file(weights_dir, digest, dtype), digest)
    return weights


def _read_cached_file(
    file: pathlib.Path, digest: str, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    weights = _read_tensors(file, digest, _CACHE_FORMAT)
    if weights is None:
        return None
    problem = shape_problem(weights, shapes)
    if problem is not None:
        logger.warning("ignoring cache file %s: %s", file, problem)
        return None
    return weights


def _read_tensors(file: pathlib.Path, digest: str, fmt: str) -> dict[str, torch.Tensor] | None:
    """Every tensor of a cache file written in format `fmt` for `digest`; None when absent or not such a file."""
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != fmt or metadata.get("gguf_sha256") != digest:
                logger.warning("ignoring %s: written by another cache format", file)
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, SafetensorError) as error:
        logger.warning("ignoring unreadable cache file %s: %s", file, error)
        return None


def _save_weights(weights: dict[str, torch.Tensor], file: pathlib.Path, digest: str, fmt: str = _CACHE_FORMAT) -> None:
    """Write atomically; a failure only costs the next load a dequantization, so it is not fatal."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(tmp), metadata={"format": fmt, "gguf_sha256": digest})
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())  # the rename must never expose a file whose data is not on disk
        os.replace(tmp, file)
    except OSError as error:
        logger.warning("could not write the weights cache %s: %s", file, error)
    finally:
        tmp.unlink(missing_ok=True)


def _weights_file(weights_dir: pathlib.Path, digest: str, dtype: torch.dtype) -> pathlib.Path:
    # str(torch.bfloat16) is "torch.bfloat16": the suffix is model_loader.dtype_name's name for it.
    return weights_dir / f"{digest}-{str(dtype).removeprefix('torch.')}.safetensors"


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
