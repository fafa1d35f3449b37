"""The engine against transformers' generate, and its scheduling behaviours (tiny models, fp32)."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import CapacityError, InvalidRequestError
from tests.engine_helpers import hf_greedy, make_engine, random_prompts, run_to_completion, tokens_of
from tests.factories import ARCHS

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
LENGTHS = (1, 3, 7, 12, 20, 33, 50, 64)


@pytest.fixture(scope="module")
def references(tiny_oracles):
    """Oracle outputs per arch for the 8 standard prompts."""
    prompts = random_prompts(LENGTHS)
    return prompts, {arch: [hf_greedy(tiny_oracles[arch], p, 32) for p in prompts] for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_transformers(arch, tiny_loaded, references):
    prompts, refs = references
    engine = make_engine(tiny_loaded(arch))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    outs = run_to_completion(engine)
    for i in range(len(prompts)):
        assert tokens_of(outs[str(i)]) == refs[arch][i], f"prompt {i} ({len(prompts[i])} tokens)"
        reason = "stop" if refs[arch][i][-1] == 2 else "length"
        assert outs[str(i)][-1].finish_reason == reason
    assert engine.stats().num_used == 0


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_both_attention_backends_match_transformers(backend, tiny_loaded, references, monkeypatch):
    """The compiled op and the forced PyTorch fallback give the oracle's tokens, mixed steps included."""
    if backend == "reference":
        monkeypatch.setenv("PDSERVE_ATTENTION", "reference")
    prompts, refs = references
    # A budget of 24 tokens chunks the longer prompts, so decode rows share steps with prefill chunks.
    engine = make_engine(tiny_loaded("llama"), max_num_batched_tokens=24)
    if backend == "kernel" and engine.runner.attention.name != "kernel":
        pytest.skip("the compiled attention op is not available on this machine")
    assert engine.runner.attention.name == backend
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    outs = run_to_completion(engine)
    for i in range(len(prompts)):
        assert tokens_of(outs[str(i)]) == refs["llama"][i], f"prompt {i} ({len(prompts[i])} tokens)"
    assert engine.stats().num_used == 0


def test_requests_arriving_while_others_decode(tiny_loaded, references):
    prompts, refs = references
    engine = make_engine(tiny_loaded("llama"))
    pending = list(enumerate(prompts))
    outputs: dict[str, list] = {}
    engine.add_request("0", prompts[0], GREEDY)
    pending.pop(0)
    steps = 0
    while engine.has_unfinished() or pending:
        if pending and steps % 3 == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        steps += 1
    for i in range(len(prompts)):
        assert tokens_of(outputs[str(i)]) == refs["llama"][i]


def test_preemption_keeps_output_unchanged(tiny_loaded, references):
    prompts, refs = references
    # 8 sequences of up to 96 tokens in blocks of 4 need ~160 blocks; give 40.
    engine = make_engine(tiny_loaded("llama"), num_blocks=40)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    outs = run_to_completion(engine)
    assert engine.scheduler.num_preemptions > 0
    assert sum(o[-1].num_preemptions for o in outs.values()) > 0
    for i in range(len(prompts)):
        assert tokens_of(outs[str(i)]) == refs["llama"][i]
    assert engine.stats().num_used == 0


def test_chunked_prefill_with_budget_smaller_than_prompt(tiny_loaded, references):
    prompts, refs = references
    engine = make_engine(tiny_loaded("llama"), max_num_batched_tokens=16)
    seen_partial = []

    def check(eng):
        seen_partial.extend(s for s in eng.scheduler.running if 0 < s.num_computed_tokens < s.num_prompt_tokens)

    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    outs = run_to_completion(engine, on_step=check)
    assert seen_partial, "no prompt was split across steps"
    for i in range(len(prompts)):
        assert tokens_of(outs[str(i)]) == refs["llama"][i]


def test_repeated_prompt_hits_prefix_cache(tiny_loaded, references):
    prompts, refs = references
    engine = make_engine(tiny_loaded("llama"))
    engine.add_request("a", prompts[-1], GREEDY)
    first = run_to_completion(engine)
    engine.add_request("b", prompts[-1], GREEDY)
    second = run_to_completion(engine)
    assert second["b"][-1].num_cached_tokens >= 60
    assert engine.stats().num_prefix_hits >= 60
    assert tokens_of(first["a"]) == tokens_of(second["b"]) == refs["llama"][-1]


def test_whole_prompt_hit_recomputes_one_token_and_leaves_shared_kv_untouched(tiny_loaded, references):
    """A prompt found whole in the cache, its logits not kept: only its last token runs, and the KV it
    exports is the cached KV. (With the logits kept nothing runs: tests/unit/test_logits_cache.py.)"""
    prompts, refs = references
    # Block size 4: the 64-token prompt fills 16 blocks.
    engine = make_engine(tiny_loaded("llama"), num_cached_logits=0)
    prompt = prompts[-1]
    exported: dict[str, dict[int, list]] = {}
    tables: dict[str, list[int]] = {}

    def sink(rid, layer, start, k, v):
        tables.setdefault(rid, list(engine.seqs[rid].block_table))  # as first exported
        exported.setdefault(rid, {}).setdefault(layer, []).append((start, k.clone()))

    engine.kv_export_sink = sink
    engine.add_request("cold", prompt, SamplingParams(max_tokens=1, temperature=0.0), export_kv=True)
    run_to_completion(engine)
    slots = torch.tensor(engine.kv_cache.slot_ids(tables["cold"], 0, len(prompt)))
    before = [t.index_select(1, slots) for t in engine.kv_cache.k + engine.kv_cache.v]
    engine.add_request("warm", prompt, GREEDY, export_kv=True)
    outs = run_to_completion(engine)
    assert tables["warm"] == tables["cold"]  # every block shared, none allocated for the prompt
    assert outs["warm"][-1].num_cached_tokens == len(prompt)
    assert tokens_of(outs["warm"]) == refs["llama"][-1]
    after = [t.index_select(1, slots) for t in engine.kv_cache.k + engine.kv_cache.v]
    assert all(torch.equal(b, a) for b, a in zip(before, after))  # the recompute wrote to scratch
    for layer, parts in exported["warm"].items():
        assert parts[0][0] == 0 and parts[0][1].shape[1] == len(prompt)  # sent whole, before the step
        assert torch.equal(parts[0][1], torch.cat([k for _, k in exported["cold"][layer]], dim=1))


def test_abort_mid_decode_frees_every_block(tiny_loaded, references):
    prompts, _ = references
    engine = make_engine(tiny_loaded("llama"), prefix_caching=False)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    for _ in range(5):
        engine.step()
    assert engine.stats().num_used > 0
    for i in range(len(prompts)):
        engine.abort_request(str(i))
    finals = engine.step_outputs()
    assert {o.request_id for o in finals if o.finished and o.finish_reason == "abort"} == {str(i) for i in range(8)}
    stats = engine.stats()
    assert stats.num_used == 0 and stats.num_free == stats.num_total
    assert not engine.has_unfinished()


def test_resumed_request_continues_identically(tiny_loaded, references):
    prompts, refs = references
    engine = make_engine(tiny_loaded("llama"))
    ref = refs["llama"][3]
    engine.add_request("r", prompts[3], GREEDY, output_token_ids=ref[:10])
    outs = run_to_completion(engine)
    assert tokens_of(outs["r"]) == ref[10:]


@pytest.mark.parametrize("budget", [512, 16])
def test_exported_kv_imported_elsewhere_gives_identical_output(tiny_loaded, references, budget):
    """KV exported layer by layer (chunked or not, cached prefix included) continues exactly like local prefill."""
    prompts, refs = references
    loaded = tiny_loaded("llama")
    src = make_engine(loaded, max_num_batched_tokens=budget)
    dst = make_engine(loaded, block_size=8)
    prompt = prompts[6]
    chunks = []
    src.kv_export_sink = lambda rid, layer, start, k, v: chunks.append((rid, layer, start, k, v))
    # Warm src's prefix cache with the first half of the prompt, so the export must include cached KV.
    src.add_request("warm", prompt[:24], SamplingParams(max_tokens=1, temperature=0.0))
    run_to_completion(src)
    src.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0), export_kv=True)
    first = tokens_of(run_to_completion(src)["p"])
    assert src.stats().num_prefix_hits > 0
    covered = {}
    for rid, layer, start, k, v in chunks:
        assert rid == "p"
        covered.setdefault(layer, []).append((start, start + k.shape[1]))
    assert all(sorted(r)[0][0] == 0 and sum(e - s for s, e in r) == len(prompt) for r in covered.values())
    dst.add_remote_request("p", prompt, GREEDY)
    assert dst.step() == []  # not scheduled while its KV is missing
    for _, layer, start, k, v in chunks:
        dst.write_kv("p", layer, start, k, v)
    dst.complete_remote_kv("p", first[:1])
    outs = run_to_completion(dst)
    assert tokens_of(outs["p"]) == refs["llama"][6]  # the first token streams from dst too
    assert first == refs["llama"][6][:1]


def test_a_remote_prompt_takes_its_cached_prefix_and_only_the_rest_is_written(tiny_loaded, references):
    """The decode side of prefix reuse: the reservation shares the cached blocks (never the one with the
    last token), writes into them are refused, and importing the rest continues like local prefill."""
    prompts, refs = references
    loaded = tiny_loaded("llama")
    src, dst = make_engine(loaded), make_engine(loaded, block_size=8)
    prompt = prompts[6]
    chunks = []
    src.kv_export_sink = lambda rid, layer, start, k, v: chunks.append((layer, start, k, v))
    src.add_request("p", prompt, SamplingParams(max_tokens=1, temperature=0.0), export_kv=True)
    first = tokens_of(run_to_completion(src)["p"])
    dst.add_request("warm", prompt[:20], SamplingParams(max_tokens=1, temperature=0.0))
    run_to_completion(dst)  # dst caches the first 16 tokens (two full blocks of 8)
    assert dst.num_cached_prefix_tokens(prompt) == 16
    assert dst.num_cached_prefix_tokens(prompt[:16]) == 8  # the block with the last token is not taken
    assert dst.stats().num_cached == 2
    assert dst.add_remote_request("p", prompt, GREEDY) == 16
    assert dst.stats().num_cached == 0  # the two cached blocks were taken, not copied
    layer, start, k, v = chunks[0]
    with pytest.raises(InvalidRequestError, match="out of range"):
        dst.write_kv("p", layer, 8, k[:, 8:16], v[:, 8:16])  # inside the shared blocks
    for layer, start, k, v in chunks:
        end = start + k.shape[1]
        if end > 16:
            cut = max(0, 16 - start)
            dst.write_kv("p", layer, start + cut, k[:, cut:], v[:, cut:])
    dst.complete_remote_kv("p", first[:1])
    assert tokens_of(run_to_completion(dst)["p"]) == refs["llama"][6]
    assert dst.stats().num_used == 0


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([], SamplingParams(), "prompt"),
        ([1, 2, 99999], SamplingParams(), "prompt_token_ids"),
        ([1] * 1100, SamplingParams(max_tokens=1), "prompt"),
        ([1] * 10, SamplingParams(max_tokens=1020), "max_tokens"),
    ],
)
def test_bad_requests_name_the_field(tiny_loaded, prompt, params, field):
    engine = make_engine(tiny_loaded("llama"))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("x", prompt, params)
    assert err.value.field == field
    assert not engine.has_unfinished()


def test_request_larger_than_the_pool_is_refused(tiny_loaded):
    engine = make_engine(tiny_loaded("llama"), num_blocks=4)
    with pytest.raises(CapacityError):
        engine.add_request("x", [5] * 10, SamplingParams(max_tokens=20))


def test_duplicate_request_id_is_refused(tiny_loaded):
    engine = make_engine(tiny_loaded("llama"))
    engine.add_request("x", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("x", [5, 6], SamplingParams(max_tokens=2))
    assert err.value.field == "request_id"


@pytest.mark.parametrize("budget", [512, 16])
def test_prompt_logprobs_match_transformers(tiny_loaded, tiny_oracles, references, budget):
    """Every prompt token's logprob (the first has none) and its top 3, whole or chunked, never from
    the prefix cache, and reported once, on the first output."""
    prompts, _ = references
    prompt = prompts[6]  # 50 tokens
    engine = make_engine(tiny_loaded("llama"), max_num_batched_tokens=budget)
    engine.add_request("warm", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    run_to_completion(engine)  # the prompt is in the prefix cache now: it must be computed anyway
    engine.add_request("p", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=3))
    outs = run_to_completion(engine)["p"]
    assert outs[0].num_cached_tokens == 0
    assert [o.prompt_logprobs is not None for o in outs] == [True, False, False]
    got = outs[0].prompt_logprobs
    with torch.no_grad():
        ref = tiny_oracles["llama"](torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert len(got) == len(prompt) and got[0] is None
    for pos in range(1, len(prompt)):
        lp = got[pos]
        assert lp.token_id == prompt[pos]
        assert lp.logprob == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[pos - 1].topk(3).indices.tolist()
