"""Configuration of the engine's components: one frozen dataclass each, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.errors import InvalidRequestError

# Weight-only quantizations (engine/quantization.py implements them).
QUANTIZATIONS = ("int4", "int8")
# Largest batch compiled_decode compiles for (its buckets are powers of two up to it).
MAX_COMPILE_BATCH = 256


@dataclass(frozen=True)
class CacheConfig:
    """Size and shape of the paged KV cache."""

    # Tokens per KV block.
    block_size: int = 16
    # Exact number of blocks; wins over kv_cache_gib when set (tests use it).
    num_blocks: int | None = None
    # Memory for the KV cache; None: a quarter of the memory available at start-up.
    kv_cache_gib: float | None = None
    # Share KV blocks between requests with the same prompt prefix.
    enable_prefix_caching: bool = True
    # Prompts whose last position's logits are kept, so that a prompt found whole in the
    # prefix cache samples without computing anything (engine/logits_cache.py); 0: off.
    num_cached_logits: int = 32

    def __post_init__(self) -> None:
        if self.num_cached_logits < 0:
            raise InvalidRequestError("num_cached_logits", f"must be >= 0, got {self.num_cached_logits}")
        if self.block_size < 1 or self.block_size > 1024:
            raise InvalidRequestError("block_size", f"must be in [1, 1024], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidRequestError("num_blocks", f"must be >= 1, got {self.num_blocks}")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            raise InvalidRequestError("kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step budgets of the continuous-batching scheduler."""

    # Tokens computed in one step, prefill chunks and decode tokens together.
    max_num_batched_tokens: int = 2048
    # Requests in the running batch.
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise InvalidRequestError(
                "max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise InvalidRequestError("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class EngineConfig:
    """What an engine runs and how: model source, numerics, cache and scheduler."""

    # A Hugging Face model directory or a GGUF file; None: the default SmolLM2.
    model: str | None = None
    # "bfloat16" | "float32" | "float16"; None: bfloat16, or float32 on a CPU without native bf16.
    dtype: str | None = None
    device: str = "cpu"
    # Weight-only quantization: "int4" | "int8" decoder linears, with an int8 LM head; None: dense.
    # CPU only for now (torch's CUDA int4/int8 matmuls take other packed layouts; not wired up).
    quantization: str | None = None
    # Longest sequence (prompt + output); None: the model's max_position_embeddings.
    max_model_len: int | None = None
    # Decode steps of up to this many sequences run one torch.compile'd decoder layer,
    # compiled for each batch bucket at start-up (engine/compiled_decode.py); 0: eager only.
    compile_max_batch: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise InvalidRequestError("device", f"must be cpu or cuda, got {self.device!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise InvalidRequestError("quantization",
                                      f"must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.quantization is not None and self.device.split(":")[0] != "cpu":
            raise InvalidRequestError("quantization", f"{self.quantization} runs on the CPU only, not on {self.device}")
        if not 0 <= self.compile_max_batch <= MAX_COMPILE_BATCH:
            raise InvalidRequestError("compile_max_batch",
                                      f"must be in [0, {MAX_COMPILE_BATCH}], got {self.compile_max_batch}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise InvalidRequestError("max_model_len", f"must be >= 2, got {self.max_model_len}")
