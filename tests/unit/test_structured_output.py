"""Structured output in the engine: every kind constrains a random tiny model's output, bad specs name
their field, the compile cache is bounded, and constrained rows leave the others' tokens alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdserve.engine.sampling_params import SamplingParams, StructuredOutput
from pdserve.engine.structured_output import GrammarCompiler
from pdserve.errors import InvalidRequestError
from tests.engine_helpers import make_engine, random_prompts, run_to_completion, tokens_of

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 4},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "pet": {"enum": ["cat", "dog"]},
    "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
PROMPTS = random_prompts([6, 11, 17], seed=4)


def texts(outputs) -> dict[int, str]:
    out: dict[int, str] = {}
    for o in outputs:
        out[o.index] = out.get(o.index, "") + o.text
    return out


def finished_by_stop(outputs) -> dict[int, bool]:
    return {o.index: o.finish_reason == "stop" for o in outputs if o.finish_reason}


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    return make_engine(tiny_loaded("llama"))


def generate(engine, spec: StructuredOutput, *, n: int = 1, seed: int = 0, max_tokens: int = 96, prompt=None):
    engine.add_request("r", prompt or PROMPTS[seed % 3], SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed, n=n, structured_output=spec))
    return run_to_completion(engine)["r"]


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_outputs_validate(engine, seed):
    outputs = generate(engine, StructuredOutput(json_schema=json.dumps(SCHEMA)), seed=seed, n=2)
    for index, text in texts(outputs).items():
        assert finished_by_stop(outputs)[index], f"sample {index} ran out of tokens: {text!r}"
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(("spec", "check"), [
    (StructuredOutput(regex=r"[a-c]{2}-\d{3}"), lambda t: re.fullmatch(r"[a-c]{2}-[0-9]{3}", t)),
    (StructuredOutput(choice=("alpha", "beta", "gamma delta")), lambda t: t in ("alpha", "beta", "gamma delta")),
    (StructuredOutput(grammar='start: "x" ("+" "x")* "=" NUM\nNUM: /[0-9]/'),
     lambda t: re.fullmatch(r"x(\+x)*=[0-9]", t)),
    (StructuredOutput(grammar='root ::= "(" [ab]+ ")"'), lambda t: re.fullmatch(r"\([ab]+\)", t)),  # GBNF
    (StructuredOutput(json_object=True), lambda t: isinstance(json.loads(t), dict)),
])
def test_each_kind_constrains_the_output(engine, spec, check):
    judged = 0
    for seed in range(4):
        outputs = generate(engine, spec, seed=seed, max_tokens=200)
        text = texts(outputs)[0]
        if spec.json_object and not finished_by_stop(outputs)[0]:
            continue  # a random model may wander in a string for long: only complete answers are judged
        assert finished_by_stop(outputs)[0] and check(text), text
        judged += 1
    assert judged >= 2


@pytest.mark.parametrize(("spec", "field", "words"), [
    (StructuredOutput(json_schema='{"type": "object", "properties": '), "structured_output.json_schema", "EOF"),
    (StructuredOutput(json_schema='{"type": "foo"}'), "structured_output.json_schema", "foo"),
    (StructuredOutput(json_schema='{"$ref": "#/$defs/missing"}'), "structured_output.json_schema", "missing"),
    (StructuredOutput(regex="[unclosed"), "structured_output.regex", "unclosed"),
    (StructuredOutput(grammar="start: foo"), "structured_output.grammar", "foo"),
])
def test_specs_that_do_not_compile_name_their_field(engine, spec, field, words):
    with pytest.raises(InvalidRequestError, match=re.escape(field)) as info:
        engine.grammars.compile(spec)
    assert words in str(info.value)
    with pytest.raises(InvalidRequestError, match=re.escape(field)):
        engine.add_request("bad", PROMPTS[0], SamplingParams(structured_output=spec))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(("kwargs", "field"), [
    ({}, "structured_output"), ({"regex": "a", "choice": ("b",)}, "structured_output"),
    ({"choice": ("a", "")}, "structured_output.choice"), ({"regex": "a" * 300_000}, "structured_output.regex"),
])
def test_malformed_specs_are_refused_at_construction(kwargs, field):
    with pytest.raises(InvalidRequestError, match=re.escape(field)):
        StructuredOutput(**kwargs)


def test_the_compile_cache_is_bounded_and_reused(tiny_loaded):
    engine = make_engine(tiny_loaded("llama"))
    compiler = GrammarCompiler(engine.tokenizer, engine.spec.vocab_size, engine.spec.eos_token_ids, max_entries=2,
                               max_chars=10_000)
    specs = [StructuredOutput(regex=f"a{{{i}}}") for i in range(1, 4)]
    for spec in specs:
        compiler.compile(spec)
    assert len(compiler) == 2 and compiler.num_compiled == 3
    compiler.compile(specs[2])  # a hit: nothing compiled
    assert compiler.num_compiled == 3
    compiler.compile(StructuredOutput(regex="b" * 6000))  # over the character budget: older entries go
    assert compiler.num_cached_chars <= 10_000 or len(compiler) == 1
    assert compiler.matcher(specs[0]) is not None and compiler.num_compiled == 5  # evicted: compiled again


def test_constrained_rows_leave_the_others_alone(tiny_loaded):
    engine = make_engine(tiny_loaded("llama"))
    plain = SamplingParams(max_tokens=24, temperature=1.0, seed=9)
    engine.add_request("alone", PROMPTS[1], plain)
    alone = tokens_of(run_to_completion(engine)["alone"])
    engine.add_request("plain", PROMPTS[1], plain)
    for i in range(3):
        engine.add_request(f"c{i}", PROMPTS[i], SamplingParams(
            max_tokens=24, temperature=1.0, seed=i, structured_output=StructuredOutput(regex="[xyz]+")))
    outs = run_to_completion(engine)
    assert tokens_of(outs["plain"]) == alone
    assert all(re.fullmatch("[xyz]+", "".join(o.text for o in outs[f"c{i}"])) for i in range(3))


def test_samples_and_preemption_keep_to_the_schema(tiny_loaded):
    """n = 3 in a pool so small that samples wait for blocks and are preempted: each still validates."""
    engine = make_engine(tiny_loaded("llama"), num_blocks=40)
    spec = StructuredOutput(json_schema=json.dumps(SCHEMA))
    for r in range(3):
        engine.add_request(f"r{r}", PROMPTS[r], SamplingParams(max_tokens=96, temperature=1.0, seed=r, n=3,
                                                               structured_output=spec))
    outs = run_to_completion(engine)
    assert sum(o.num_preemptions for v in outs.values() for o in v if o.finish_reason) > 0
    for outputs in outs.values():
        for index, text in texts(outputs).items():
            assert finished_by_stop(outputs)[index], text
            jsonschema.validate(json.loads(text), SCHEMA)
    assert engine.stats().num_used == 0


def test_a_resumed_request_continues_its_grammar(engine):
    spec = StructuredOutput(regex="[ab]{3}c")
    tokenizer = engine.tokenizer
    engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=10, temperature=1.0, seed=1, structured_output=spec),
                       output_token_ids=tokenizer.encode("ab"))
    text = "ab" + "".join(o.text for o in run_to_completion(engine)["r"])
    assert re.fullmatch("[ab]{3}c", text), text
    with pytest.raises(InvalidRequestError, match="generated_token_ids"):
        engine.add_request("r", PROMPTS[0], SamplingParams(max_tokens=10, structured_output=spec),
                           output_token_ids=tokenizer.encode("zz"))
    assert not engine.has_unfinished()


@pytest.mark.parametrize("vocab", [70, 96, 512])
def test_the_compiled_mask_op_equals_the_reference(vocab):
    """Rows in any order, words all set, all clear and mixed, a vocabulary wider than the mask."""
    import torch

    from pdserve.engine import kernels
    from pdserve.engine.structured_output import apply_token_bitmask_reference

    if kernels.load() is None:
        pytest.skip("the compiled ops are not built")
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    words = min(3, (vocab + 31) // 32)  # 70 tokens with a 2- or 3-word mask: the tail is forbidden
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=g, dtype=torch.int32)
    bitmask[0, 0], bitmask[1, -1] = -1, 0
    rows = torch.tensor([4, 0, 2])
    want, got = logits.clone(), logits.clone()
    apply_token_bitmask_reference(want, rows, bitmask)
    torch.ops.pdserve.apply_token_bitmask_(got, rows, bitmask)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3]], logits[[1, 3]])  # rows without a grammar untouched


def test_a_spec_that_compiles_too_long_is_refused_by_the_worker():
    """The worker waits for the compile thread at most --grammar-compile-timeout-s, then refuses, naming the field."""
    import asyncio
    from concurrent.futures import Future
    from types import SimpleNamespace

    from pdserve.server.worker import Worker

    never: Future = Future()  # a compile that does not end in time
    worker = SimpleNamespace(loop=SimpleNamespace(compile_grammar=lambda params: never), grammar_compile_timeout_s=0.05)
    params = SamplingParams(structured_output=StructuredOutput(json_schema='{"type": "object"}'))
    with pytest.raises(InvalidRequestError, match=r"structured_output.json_schema: did not compile within 0.05 s"):
        asyncio.run(Worker.compile_grammar(worker, params, "r1"))
    asyncio.run(Worker.compile_grammar(worker, SamplingParams(), "r2"))  # nothing to compile: no wait
