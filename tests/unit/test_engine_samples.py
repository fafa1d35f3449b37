"""n > 1: one prefill, n samples forked off it sharing the prompt's KV blocks (tiny models, fp32)."""

from __future__ import annotations

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from tests.engine_helpers import hf_greedy, make_engine, random_prompts, run_to_completion

PROMPT_LEN = 15  # not a multiple of the block size (4): the last block is copied, the 3 full ones shared


def by_sample(outputs) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for out in outputs:
        tokens.setdefault(out.index, []).extend(out.token_ids)
    return tokens


def finish_reasons(outputs) -> dict[int, str]:
    return {out.index: out.finish_reason for out in outputs if out.finish_reason}


@pytest.fixture(scope="module")
def prompt():
    return random_prompts([PROMPT_LEN], seed=7)[0]


def test_greedy_samples_all_match_transformers(tiny_loaded, tiny_oracles, prompt):
    engine = make_engine(tiny_loaded("llama"))
    engine.add_request("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, n=3))
    outputs = run_to_completion(engine)["r"]
    ref = hf_greedy(tiny_oracles["llama"], prompt, 12)
    assert by_sample(outputs) == {0: ref, 1: ref, 2: ref}
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished  # the request ends once
    assert finish_reasons(outputs) == {0: "length", 1: "length", 2: "length"}
    assert engine.stats().num_used == 0


def test_one_prefill_shares_the_full_blocks(tiny_loaded, prompt):
    engine = make_engine(tiny_loaded("llama"), prefix_caching=False)
    engine.add_request("r", prompt, SamplingParams(max_tokens=8, temperature=0.0, n=4))
    engine.step()  # the prefill; samples 1..3 fork off it
    assert engine.last_step_tokens == PROMPT_LEN
    samples = sorted(engine.requests["r"], key=lambda s: s.index)
    assert [s.index for s in samples] == [0, 1, 2, 3]
    shared = samples[0].block_table[:3]
    assert all(s.block_table[:3] == shared for s in samples)  # one copy of the full blocks
    assert len({s.block_table[3] for s in samples}) == 4  # each its own last block
    assert all(engine.kv.pool.blocks[b].ref_count == 4 for b in shared)
    engine.step()  # one decode row per sample, nothing recomputed
    assert engine.last_step_tokens == 4


def test_seeded_samples_differ_and_sample_zero_is_the_n1_answer(tiny_loaded, prompt):
    params = SamplingParams(max_tokens=16, temperature=1.5, seed=11)
    engine = make_engine(tiny_loaded("llama"))
    engine.add_request("one", prompt, params)
    engine.add_request("four", prompt, SamplingParams(max_tokens=16, temperature=1.5, seed=11, n=4))
    outs = run_to_completion(engine)
    samples = by_sample(outs["four"])
    assert samples[0] == by_sample(outs["one"])[0]
    assert len({tuple(s) for s in samples.values()}) == 4  # distinct seeds, distinct samples
    again = make_engine(tiny_loaded("llama"))
    again.add_request("four", prompt, SamplingParams(max_tokens=16, temperature=1.5, seed=11, n=4))
    assert by_sample(run_to_completion(again)["four"]) == samples


def test_preemption_and_a_fork_without_a_free_block_change_nothing(tiny_loaded, prompt):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=5, n=3)
    roomy = make_engine(tiny_loaded("llama"))
    roomy.add_request("r", prompt, params)
    expected = by_sample(run_to_completion(roomy)["r"])
    # All three at once would take 4 + 2 * 7 blocks: 13 makes forks wait and samples be preempted.
    tight = make_engine(tiny_loaded("llama"), num_blocks=13, prefix_caching=True)
    tight.add_request("r", prompt, params)
    outputs = run_to_completion(tight)["r"]
    assert by_sample(outputs) == expected
    assert sum(o.num_preemptions for o in outputs if o.finish_reason) > 0
    assert tight.stats().num_used == 0


def test_abort_frees_every_sample(tiny_loaded, prompt):
    engine = make_engine(tiny_loaded("llama"), prefix_caching=False)
    engine.add_request("r", prompt, SamplingParams(max_tokens=30, temperature=0.0, n=5))
    for _ in range(4):
        engine.step()
    engine.abort_request("r")
    finals = engine.step_outputs()
    assert finish_reasons(finals) == {i: "abort" for i in range(5)}
    assert [o.finished for o in finals] == [False] * 4 + [True]
    assert engine.stats().num_used == 0 and not engine.has_unfinished()


def test_remote_first_tokens_fork_on_the_decode_side(tiny_loaded, prompt):
    """A prefill worker samples the n first tokens (no KV forked: they end at once); the decode side imports
    the KV once and forks: the same samples as a local n = 3 request."""
    loaded = tiny_loaded("llama")
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=3)
    local = make_engine(loaded)
    local.add_request("r", prompt, params)
    expected = by_sample(run_to_completion(local)["r"])
    src, dst = make_engine(loaded, prefix_caching=False), make_engine(loaded, block_size=8)
    chunks = []
    src.kv_export_sink = lambda rid, layer, start, k, v: chunks.append((layer, start, k.clone(), v.clone()))
    src.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=1.0, seed=3, n=3), export_kv=True)
    firsts = by_sample(src.step())
    assert src.stats().num_used == 0 and not src.has_unfinished()  # samples ending at once took no blocks
    assert [firsts[i] for i in range(3)] == [[expected[i][0]] for i in range(3)]
    dst.add_remote_request("r", prompt, params)
    for layer, start, k, v in chunks:
        dst.write_kv("r", layer, start, k, v)
    with pytest.raises(InvalidRequestError, match="first_token"):
        dst.complete_remote_kv("r", [firsts[0][0]])  # one first token for three samples
    dst.complete_remote_kv("r", [firsts[i][0] for i in range(3)])
    assert by_sample(run_to_completion(dst)["r"]) == expected
    assert dst.stats().num_used == 0


def test_n_is_checked(tiny_loaded, prompt):
    engine = make_engine(tiny_loaded("llama"))
    with pytest.raises(InvalidRequestError, match="n"):
        SamplingParams(n=0)
    with pytest.raises(InvalidRequestError, match="n"):
        engine.add_request("r", prompt, SamplingParams(n=2, max_tokens=8), output_token_ids=[5, 6])


def test_sample_zero_speaks_first(tiny_loaded, prompt):
    """Sample 0's first output (which carries the prompt logprobs) comes before any other sample's."""
    engine = make_engine(tiny_loaded("llama"))
    engine.add_request("r", prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=2, n=3, prompt_logprobs=0))
    outputs = run_to_completion(engine)["r"]
    assert outputs[0].index == 0 and outputs[0].prompt_logprobs is not None
    assert all(o.prompt_logprobs is None for o in outputs[1:])
