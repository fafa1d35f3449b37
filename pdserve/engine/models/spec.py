"""What pdserve's forward pass needs to know about a model, and which architectures it implements."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import IncompatibleError, InvalidRequestError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelSpec:
    """Everything our forward pass needs to know about a decoder-only model."""

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    qkv_bias: bool  # q/k/v projections carry a bias (qwen2); o_proj and the MLP never do
    tie_word_embeddings: bool  # the LM head reuses model.embed_tokens.weight
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]  # any of these ends a sequence

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise IncompatibleError(unsupported_message(self.architecture))
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError("model", f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidRequestError(
                "model", f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not self.rms_norm_eps > 0:
            raise InvalidRequestError("model", f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if any(token_id < 0 for token_id in self.eos_token_ids):
            raise InvalidRequestError("model", f"negative eos token id in {self.eos_token_ids}")


def unsupported_message(arch: object) -> str:
    return f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
