"""Kept prompt logits: a prompt found whole in the prefix cache samples without any forward, exactly as cold."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.logits_cache import PromptLogitsCache
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from tests.engine_helpers import hf_greedy, random_prompts, run_to_completion, tokens_of

BLOCK = 4


def engine_with(loaded, num_cached_logits: int = 32, num_blocks: int = 256) -> LLMEngine:
    config = EngineConfig(cache=CacheConfig(num_blocks=num_blocks, block_size=BLOCK,
                                            num_cached_logits=num_cached_logits),
                          scheduler=SchedulerConfig(max_num_batched_tokens=512))
    return LLMEngine(config, loaded)


def count_forwards(engine: LLMEngine) -> list[int]:
    """Tokens of each forward the engine's runner makes, from now on."""
    calls: list[int] = []
    execute = engine.runner.execute

    def counting(scheduled, layer_hook=None):
        calls.append(sum(s.num_new_tokens for s in scheduled))
        return execute(scheduled, layer_hook)

    engine.runner.execute = counting
    return calls


def test_lru_keeps_the_most_recently_used_and_keys_on_every_token():
    cache = PromptLogitsCache(2)
    a, b, c = torch.zeros(5), torch.ones(5), torch.full((5,), 2.0)
    cache.put([1, 2], a)
    cache.put([3, 4], b)
    assert torch.equal(cache.get([1, 2]), a)  # [1, 2] is now the most recent
    cache.put([5, 6], c)
    assert cache.get([3, 4]) is None and len(cache) == 2
    assert cache.get([1, 2, 0]) is None and cache.get([2, 1]) is None
    a.fill_(9.0)
    assert torch.equal(cache.get([1, 2]), torch.zeros(5))  # a copy was kept
    assert cache.num_hits == 2
    off = PromptLogitsCache(0)
    off.put([1], a)
    assert off.get([1]) is None and len(off) == 0


def test_negative_capacity_is_refused():
    with pytest.raises(InvalidRequestError) as err:
        CacheConfig(num_cached_logits=-1)
    assert err.value.field == "num_cached_logits"


def test_whole_prompt_hit_runs_no_forward_and_matches_transformers(tiny_loaded, tiny_oracles):
    prompt = random_prompts([16 * BLOCK])[0]
    engine = engine_with(tiny_loaded("llama"))
    exported: dict[str, list] = {}
    engine.kv_export_sink = lambda rid, layer, start, k, v: exported.setdefault(rid, []).append((layer, start, k))
    engine.add_request("cold", prompt, SamplingParams(max_tokens=1, temperature=0.0), export_kv=True)
    cold = run_to_completion(engine)
    forwards = count_forwards(engine)
    engine.add_request("warm", prompt, SamplingParams(max_tokens=1, temperature=0.0), export_kv=True)
    warm = run_to_completion(engine)
    assert forwards == []  # the first token came from the kept logits
    assert warm["warm"][-1].num_cached_tokens == len(prompt)
    assert tokens_of(warm["warm"]) == tokens_of(cold["cold"]) == hf_greedy(tiny_oracles["llama"], prompt, 1)
    assert [(layer, start) for layer, start, _ in exported["warm"]] == [(i, 0) for i in range(engine.spec.num_layers)]
    for layer, _, k in exported["warm"]:  # the whole prompt's KV, as the cold prefill exported it
        assert torch.equal(k, torch.cat([kc for lc, _, kc in exported["cold"] if lc == layer], dim=1))
    assert engine.stats().num_used == 0


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, seed=7, logprobs=3),
    SamplingParams(max_tokens=1, temperature=1.3, top_k=5, seed=123, repetition_penalty=1.3),
    SamplingParams(max_tokens=1, temperature=0.0, presence_penalty=1.0, repetition_penalty=0.7, logprobs=2),
])
def test_sampling_on_kept_logits_equals_the_cold_prefill(tiny_loaded, params):
    prompt = random_prompts([8 * BLOCK], seed=3)[0]
    engine = engine_with(tiny_loaded("llama"))
    engine.add_request("warmup", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    run_to_completion(engine)  # keeps the logits; the cold request below samples from a fresh forward
    cold_engine = engine_with(tiny_loaded("llama"), num_cached_logits=0)
    cold_engine.add_request("cold", prompt, params)
    cold = run_to_completion(cold_engine)["cold"]
    forwards = count_forwards(engine)
    engine.add_request("warm", prompt, params)
    warm = run_to_completion(engine)["warm"]
    assert forwards == []
    assert tokens_of(warm) == tokens_of(cold)
    assert warm[0].logprobs == cold[0].logprobs


def test_decode_continues_identically_after_a_kept_logits_hit(tiny_loaded, tiny_oracles):
    prompt = random_prompts([12 * BLOCK], seed=5)[0]
    engine = engine_with(tiny_loaded("llama"))
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    engine.add_request("a", prompt, greedy)
    run_to_completion(engine)
    forwards = count_forwards(engine)
    engine.add_request("b", prompt, greedy)
    outs = run_to_completion(engine)
    assert tokens_of(outs["b"]) == hf_greedy(tiny_oracles["llama"], prompt, 12)
    assert len(forwards) == len(tokens_of(outs["b"])) - 1 and set(forwards) == {1}  # decode steps only
    assert len(engine.logits_cache) == 1  # the prompt's, none of decode's positions
    assert engine.stats().num_used == 0


def test_not_used_without_the_whole_prompt_in_the_prefix_cache(tiny_loaded):
    prompt = random_prompts([8 * BLOCK], seed=9)[0]
    # 10 blocks: the second prompt of 8 blocks evicts most of the first one's.
    engine = engine_with(tiny_loaded("llama"), num_blocks=10)
    once = SamplingParams(max_tokens=1, temperature=0.0)
    engine.add_request("a", prompt, once)
    first = run_to_completion(engine)
    engine.add_request("other", random_prompts([8 * BLOCK], seed=10)[0], once)
    run_to_completion(engine)
    forwards = count_forwards(engine)
    engine.add_request("b", prompt, once)
    again = run_to_completion(engine)
    assert again["b"][-1].num_cached_tokens < len(prompt)
    assert forwards and forwards[0] > 1  # recomputed, not read from the kept logits
    assert tokens_of(again["b"]) == tokens_of(first["a"])
    assert engine.stats().num_used == 0


def test_unaligned_prompts_and_disabled_prefix_caching_keep_nothing(tiny_loaded):
    engine = engine_with(tiny_loaded("llama"))
    engine.add_request("a", random_prompts([4 * BLOCK + 1])[0], SamplingParams(max_tokens=1))
    run_to_completion(engine)
    assert len(engine.logits_cache) == 0
    config = EngineConfig(cache=CacheConfig(num_blocks=64, block_size=BLOCK, enable_prefix_caching=False))
    off = LLMEngine(config, tiny_loaded("llama"))
    off.add_request("a", random_prompts([4 * BLOCK])[0], SamplingParams(max_tokens=1))
    run_to_completion(off)
    assert len(off.logits_cache) == 0
