"""The compiled decode layer (engine/compiled_decode.py) against eager steps and transformers (tiny models, fp32)."""

from __future__ import annotations

import logging

import pytest
import torch

from pdserve.engine import compiled_decode
from pdserve.engine.compiled_decode import buckets_up_to
from pdserve.engine.sampling_params import SamplingParams
from tests.engine_helpers import hf_greedy, make_engine, random_prompts, run_to_completion, tokens_of

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
LENGTHS = (1, 5, 9, 17, 30, 41)
MAX_BATCH = 4


def test_buckets_are_powers_of_two_up_to_the_maximum():
    assert buckets_up_to(0) == []
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(8) == [1, 2, 4, 8]
    assert buckets_up_to(12) == [1, 2, 4, 8, 12]


def _compiled_engine(loaded, max_batch: int = MAX_BATCH, **kwargs):
    engine = make_engine(loaded, compile_max_batch=max_batch, **kwargs)
    if not engine.runner.compiled.enabled:
        pytest.skip("compiled decode is off here (no compiled attention op, or no compiler)")
    return engine


@pytest.mark.parametrize("arch", ["qwen2"])  # q/k/v biases; llama's layers: the tests below
def test_compiled_steps_give_the_oracles_tokens(arch, tiny_loaded, tiny_oracles):
    """Batches of 1 to 6 sequences (padded to buckets 1, 2, 4; 5 and 6 run eagerly), with
    requests joining while others decode, and prefill chunks beside decode rows."""
    prompts = random_prompts(LENGTHS, seed=7)
    refs = [hf_greedy(tiny_oracles[arch], p, GREEDY.max_tokens) for p in prompts]
    engine = _compiled_engine(tiny_loaded(arch), max_num_batched_tokens=16)
    pending = list(enumerate(prompts))
    outputs: dict[str, list] = {}
    batch_sizes = set()
    while pending or engine.has_unfinished():
        if pending and engine.num_steps % 5 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        batch_sizes.add(len(engine.scheduler.running))
    assert engine.runner.compiled.num_steps > 0
    assert {3, 5} & batch_sizes, batch_sizes  # a padded bucket and an eager batch both happened
    for i in range(len(prompts)):
        assert tokens_of(outputs[str(i)]) == refs[i], f"prompt {i}"
    assert engine.stats().num_used == 0


def test_compiled_and_eager_logits_agree(tiny_loaded):
    """Per step, the compiled layer's logits are the eager ones up to float rounding."""
    loaded = tiny_loaded("llama")
    prompts = random_prompts((6, 11, 3), seed=3)
    logits = {}
    for compiled in (False, True):
        engine = _compiled_engine(loaded) if compiled else make_engine(loaded)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(max_tokens=8, temperature=0.0))
        seen = []
        original = engine.runner.model.logits

        def record(hidden, original=original, seen=seen):
            out = original(hidden)
            seen.append(out.clone())
            return out

        engine.runner.model.logits = record
        run_to_completion(engine)
        logits[compiled] = seen
        if compiled:
            assert engine.runner.compiled.num_steps >= 6
    assert len(logits[True]) == len(logits[False])
    for eager, compiled in zip(logits[False], logits[True]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_a_failing_compiler_leaves_the_engine_eager(tiny_loaded, tiny_oracles, monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def raises(*args, **kw):
            raise RuntimeError("no compiler here")
        return raises

    monkeypatch.setattr(compiled_decode.torch, "compile", broken_compile)
    prompt = random_prompts((9,), seed=5)[0]
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.compiled_decode"):
        engine = make_engine(tiny_loaded("llama"), compile_max_batch=MAX_BATCH)
    assert not engine.runner.compiled.enabled
    assert "compiling failed" in caplog.text and "no compiler here" in caplog.text
    engine.add_request("a", prompt, GREEDY)
    assert tokens_of(run_to_completion(engine)["a"]) == hf_greedy(tiny_oracles["llama"], prompt, GREEDY.max_tokens)
    assert engine.runner.compiled.num_steps == 0


def test_without_the_attention_op_decode_stays_eager(tiny_loaded, monkeypatch):
    monkeypatch.setenv("PDSERVE_ATTENTION", "reference")
    engine = make_engine(tiny_loaded("llama"), compile_max_batch=MAX_BATCH)
    assert not engine.runner.compiled.enabled
    engine.add_request("a", random_prompts((4,))[0], GREEDY)
    assert len(tokens_of(run_to_completion(engine)["a"])) == GREEDY.max_tokens


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_quantized_models_decode_the_same_compiled(quantization, tiny_model_dirs):
    """The quantized linears (pdserve's ops, traced through their fake implementations) in the
    compiled layer; one bucket (batch 1) keeps the compile short."""
    from pdserve.engine.model_loader import load_model

    loaded = load_model(str(tiny_model_dirs["llama"]), dtype="float32", quantization=quantization)
    prompts = random_prompts((13,), seed=11)
    tokens = {}
    for compiled in (False, True):
        engine = _compiled_engine(loaded, max_batch=1) if compiled else make_engine(loaded)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        outs = run_to_completion(engine)
        tokens[compiled] = [tokens_of(outs[str(i)]) for i in range(len(prompts))]
        if compiled:
            assert engine.runner.compiled.num_steps > 0
    assert tokens[True] == tokens[False]


@pytest.mark.parametrize("value", [-1, 257])
def test_a_bad_compile_max_batch_names_the_field(value):
    from pdserve.engine.config import EngineConfig
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="compile_max_batch"):
        EngineConfig(compile_max_batch=value)
