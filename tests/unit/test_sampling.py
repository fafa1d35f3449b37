"""Unit tests of pdserve.engine.sampling_params (parameter validation) and pdserve.engine.sampling (the sampler)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from pdserve.engine import sampling
from pdserve.engine.sampling import Sampler, SamplingRow, apply_penalties, draw_uniforms
from pdserve.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams
from pdserve.errors import InvalidRequestError

VOCAB_SIZE = 1000


def row(params: SamplingParams | None = None, *, position: int = 7, seed: int = 1234,
        prompt: tuple[int, ...] = (), output: tuple[int, ...] = ()) -> SamplingRow:
    return SamplingRow(params=params or SamplingParams(), position=position,
                       prompt_token_ids=list(prompt), output_token_ids=list(output), seed=seed)


def random_logits(batch: int, vocab_size: int = VOCAB_SIZE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab_size, generator=generator) * 3.0


# ---------------------------------------------------------------- validation

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.0), ("max_tokens", True), ("max_tokens", "8"),
    ("max_tokens", None),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("temperature", True), ("temperature", None),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan), ("top_p", -math.inf), ("top_p", False),
    ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan), ("min_p", "0"),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", math.nan),
    ("presence_penalty", math.inf),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.01), ("frequency_penalty", -math.inf),
    ("frequency_penalty", [0.1]),
    ("seed", -1), ("seed", 2**63), ("seed", 2**64), ("seed", 1.0), ("seed", True), ("seed", "7"),
    ("stop", "###"), ("stop", ("",)), ("stop", ("x" * (MAX_STOP_STRING_CHARS + 1),)),
    ("stop", tuple(f"s{i}" for i in range(MAX_STOP_STRINGS + 1))), ("stop", (1,)), ("stop", None),
    ("stop", ("ok", None)),
    ("stop_token_ids", (-1,)), ("stop_token_ids", (1.0,)), ("stop_token_ids", (True,)), ("stop_token_ids", 5),
    ("stop_token_ids", None),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 1.0), ("logprobs", True),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}"[:40] for f, v in BAD_VALUES])
def test_invalid_field_raises_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_boundary_values_are_valid() -> None:
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, min_p=1.0, repetition_penalty=1e-3,
                   presence_penalty=-2.0, frequency_penalty=2.0, seed=0, logprobs=0)
    SamplingParams(temperature=100.0, top_p=1e-9, top_k=10**9, min_p=0.0, presence_penalty=2,
                   frequency_penalty=-2, seed=2**63 - 1, logprobs=MAX_LOGPROBS,
                   stop=tuple("x" * MAX_STOP_STRING_CHARS for _ in range(MAX_STOP_STRINGS)),
                   stop_token_ids=(0, 2), ignore_eos=True)


def test_sequences_are_normalised_to_tuples_and_ints_to_floats() -> None:
    lists: dict[str, object] = {"stop": ["a", "b"], "stop_token_ids": [3]}
    params = SamplingParams(temperature=1, presence_penalty=1, **lists)  # type: ignore[arg-type]
    assert params.stop == ("a", "b") and params.stop_token_ids == (3,)
    assert isinstance(params.temperature, float) and isinstance(params.presence_penalty, float)
    assert params == SamplingParams(stop=("a", "b"), stop_token_ids=(3,), presence_penalty=1.0)
    hash(params)


def test_params_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_greedy_property() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams().greedy


# ---------------------------------------------------------------- the draw


def test_same_seed_and_position_give_the_same_draw() -> None:
    first = draw_uniforms(42, 17, VOCAB_SIZE)
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    assert torch.equal(first, draw_uniforms(42, 17, VOCAB_SIZE))
    assert first.shape == (VOCAB_SIZE,) and first.dtype == torch.float32
    assert bool(((first >= 0) & (first < 1)).all())


def test_different_positions_and_seeds_give_different_draws() -> None:
    draws = [draw_uniforms(seed, position, 64) for seed in (0, 1, 2**62) for position in range(50)]
    distinct = {tuple(d.tolist()) for d in draws}
    assert len(distinct) == len(draws)


def test_draw_is_not_the_identity_of_the_global_generator() -> None:
    torch.manual_seed(5)
    assert not torch.equal(draw_uniforms(5, 0, 64), torch.rand(64))


# ---------------------------------------------------------------- sampler


def test_greedy_is_the_first_maximum() -> None:
    logits = random_logits(3)
    logits[1, 10] = logits[1, 500] = 100.0  # a tie: the lower index wins
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(3)])
    assert out.token_ids == logits.max(dim=-1).indices.tolist()
    assert out.token_ids[1] == 10
    assert out.logprobs == [None, None, None]


def test_greedy_on_bf16_uses_float32_max() -> None:
    logits = random_logits(4).to(torch.bfloat16)
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0)) for _ in range(4)])
    assert out.token_ids == logits.float().max(dim=-1).indices.tolist()


def test_greedy_rows_do_not_pay_for_a_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> torch.Tensor:
        raise AssertionError("greedy rows must not draw")

    monkeypatch.setattr(sampling, "_fill_uniforms", fail)
    Sampler()(random_logits(2), [row(SamplingParams(temperature=0.0, logprobs=2)) for _ in range(2)])


def test_the_draw_is_the_exponential_race_over_draw_uniforms() -> None:
    logits = random_logits(6, seed=11)
    rows = [row(SamplingParams(temperature=0.7), position=p, seed=99) for p in range(6)]
    out = Sampler()(logits, rows)
    for i, r in enumerate(rows):
        exponentials = -draw_uniforms(r.seed, r.position, VOCAB_SIZE).log()
        probs = (logits[i] / 0.7).softmax(dim=-1)
        assert out.token_ids[i] == int((probs / exponentials).argmax())


MIXED_PARAMS = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(temperature=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.8, min_p=0.01),
    SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2, logprobs=3),
    SamplingParams(temperature=0.0, repetition_penalty=0.8),
    SamplingParams(temperature=0.8, top_p=0.95, seed=3),
    SamplingParams(top_k=2000, top_p=0.9, logprobs=1),
]


@pytest.mark.parametrize(("trial", "vocab_size"), [(t, v) for t in range(3) for v in (VOCAB_SIZE, 4096)])
def test_a_row_samples_the_same_token_alone_or_in_any_batch(trial: int, vocab_size: int) -> None:
    # Rows from flat to peaked, so some top-k/top-p sets need the full sort and some not.
    scales = torch.linspace(0.3, 8.0, len(MIXED_PARAMS)).unsqueeze(1)
    logits = random_logits(len(MIXED_PARAMS), vocab_size, seed=trial) * scales
    rows = [row(p, position=trial * 10 + i, seed=trial * 7919 + i, prompt=(1, 2, 3), output=(4, 4, 5))
            for i, p in enumerate(MIXED_PARAMS)]
    batched = Sampler()(logits, rows)
    for i in range(len(rows)):
        alone = Sampler()(logits[i : i + 1], [rows[i]])
        assert alone.token_ids == [batched.token_ids[i]]
        assert alone.logprobs == [batched.logprobs[i]]
    order = list(reversed(range(len(rows))))
    reordered = Sampler()(logits[order], [rows[i] for i in order])
    assert reordered.token_ids == [batched.token_ids[i] for i in order]


def test_sampling_ignores_the_global_rng() -> None:
    logits, rows = random_logits(2), [row(position=3), row(position=4)]
    torch.manual_seed(0)
    first = Sampler()(logits, rows).token_ids
    torch.manual_seed(1)
    assert Sampler()(logits, rows).token_ids == first


def test_different_positions_draw_different_tokens() -> None:
    logits = torch.zeros(200, VOCAB_SIZE)  # uniform: every token equally likely
    out = Sampler()(logits, [row(position=p) for p in range(200)])
    assert len(set(out.token_ids)) > 150


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=1), SamplingParams(top_p=1e-6),
    SamplingParams(temperature=2.0, top_k=1, top_p=0.5), SamplingParams(temperature=1e-7),
], ids=["top_k=1", "top_p_tiny", "top_k=1_hot", "temperature_tiny"])
def test_degenerate_filters_equal_greedy(params: SamplingParams) -> None:
    logits = random_logits(64, seed=3)
    logits[5, 100] = logits[5, 900] = 50.0  # a tie: the greedy pick is the first
    out = Sampler()(logits, [row(params, position=p) for p in range(64)])
    assert out.token_ids == logits.max(dim=-1).indices.tolist()


def test_min_p_one_keeps_only_the_maxima() -> None:
    logits = random_logits(64, seed=3)
    logits[5, 100] = logits[5, 900] = 50.0  # tied maxima both have prob == max prob
    out = Sampler()(logits, [row(SamplingParams(min_p=1.0), position=p) for p in range(64)])
    expected = logits.max(dim=-1).indices.tolist()
    assert [t for i, t in enumerate(out.token_ids) if i != 5] == [t for i, t in enumerate(expected) if i != 5]
    assert out.token_ids[5] in (100, 900)


def draws_for(params: SamplingParams, logits_row: torch.Tensor, num: int = 300) -> list[int]:
    logits = logits_row.unsqueeze(0).expand(num, -1)
    return Sampler()(logits, [row(params, position=p) for p in range(num)]).token_ids


def test_top_k_keeps_only_the_k_best() -> None:
    logits = random_logits(1, seed=4)[0] * 0.1  # flat, so a wrong filter would show
    allowed = set(logits.topk(5).indices.tolist())
    drawn = draws_for(SamplingParams(top_k=5), logits)
    assert set(drawn) == allowed


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    # 0.4 + 0.3 < 0.75, so the third token is needed to reach top_p; the fourth is not.
    drawn = draws_for(SamplingParams(top_p=0.75), probs.log())
    assert set(drawn) == {0, 1, 2}
    assert set(draws_for(SamplingParams(top_p=0.7), probs.log())) == {0, 1}


def reference_top_k_top_p_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The plain definition: full stable sort, top-k, renormalise, smallest set reaching top_p."""
    values, order = logits.sort(descending=True, stable=True)
    k = top_k or logits.numel()
    values[k:] = -math.inf
    probs = values.softmax(dim=-1)
    keep = torch.arange(logits.numel()) < k
    if top_p < 1.0:
        keep &= (probs.cumsum(dim=-1) - probs) < top_p
    return torch.zeros_like(keep).scatter_(0, order, keep)


LARGE_VOCAB_CASES = [
    (0, 0.9, 0.2), (0, 0.9, 20.0), (0, 0.5, 1.0), (50, 1.0, 1.0), (50, 0.8, 0.1), (3000, 1.0, 1.0),
    (3000, 0.95, 1.0), (1023, 0.99, 0.05), (1024, 1.0, 1.0), (1, 0.3, 1.0), (10**9, 0.9, 0.5),
    (10**9, 1.0, 1.0), (5, 0.5, 0.0), (0, 0.2, 0.0),
]


def test_top_k_top_p_sets_on_a_large_vocab_match_the_definition() -> None:
    """Peaked rows settle among the best candidates, flat rows and big top-k need the full sort."""
    vocab_size = 4096
    logits = torch.cat([random_logits(1, vocab_size, seed=i) * scale
                        for i, (_, _, scale) in enumerate(LARGE_VOCAB_CASES)])
    rows = [row(SamplingParams(top_k=k, top_p=p)) for k, p, _ in LARGE_VOCAB_CASES]
    filtered = sampling._filter_top_k_top_p(logits.clone(), rows)
    for i, (k, p, _) in enumerate(LARGE_VOCAB_CASES):
        expected = reference_top_k_top_p_mask(logits[i], k, p)
        assert torch.equal(filtered[i] > -math.inf, expected), LARGE_VOCAB_CASES[i]
    # Each row alone gets the very same logits as in the batch.
    for i in range(len(rows)):
        alone = sampling._filter_top_k_top_p(logits[i : i + 1].clone(), rows[i : i + 1])
        assert torch.equal(alone[0], filtered[i])


def test_min_p_drops_tokens_below_the_fraction_of_the_top() -> None:
    probs = torch.tensor([0.5, 0.26, 0.24, 0.0])  # the zero-prob token is -inf
    drawn = draws_for(SamplingParams(min_p=0.5), probs.log())
    assert set(drawn) == {0, 1}


def test_min_p_is_applied_after_temperature() -> None:
    probs = torch.tensor([0.5, 0.26, 0.24])
    # At temperature 2 the ratios are sqrt'd: 0.24/0.5 -> 0.69, so min_p 0.6 keeps all three.
    drawn = draws_for(SamplingParams(temperature=2.0, min_p=0.6), probs.log())
    assert set(drawn) == {0, 1, 2}


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    num = 6000
    counts = Counter(draws_for(SamplingParams(), probs.log(), num))
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / num - p) < 0.03


def test_temperature_sharpens_and_flattens() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    cold = Counter(draws_for(SamplingParams(temperature=0.25), probs.log(), 2000))
    hot = Counter(draws_for(SamplingParams(temperature=4.0), probs.log(), 2000))
    assert cold[0] > 1800  # 0.6^4 / (0.6^4 + 0.3^4 + 0.1^4) ~ 0.94
    assert hot[2] > 400  # 0.1^0.25 / sum ~ 0.25


# ---------------------------------------------------------------- penalties


PENALTY_LOGITS = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor(PENALTY_LOGITS)
    apply_penalties(logits, row(SamplingParams(repetition_penalty=2.0), prompt=(0, 1, 0), output=(2, 2)))
    assert logits.tolist() == [1.0, -2.0, 0.25, -0.5, 3.0, 0.0]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor(PENALTY_LOGITS)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, row(params, prompt=(3, 4), output=(1, 2, 2)))
    assert logits.tolist() == [2.0, -1.75, -0.5, -0.5, 3.0, 0.0]


def test_all_penalties_compose_in_order() -> None:
    logits = torch.tensor(PENALTY_LOGITS)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, row(params, prompt=(0, 1), output=(1, 2, 2)))
    # rep: 0 -> 1.0, 1 -> -2.0, 2 -> 0.25; then 1 -= 0.5 + 0.25, 2 -= 0.5 + 0.5
    assert logits.tolist() == [1.0, -2.75, -0.75, -0.5, 3.0, 0.0]


def test_negative_presence_penalty_encourages_repeats() -> None:
    logits = torch.tensor(PENALTY_LOGITS)
    apply_penalties(logits, row(SamplingParams(presence_penalty=-2.0), output=(5,)))
    assert logits[5].item() == 2.0


def test_sampler_applies_penalties_before_greedy_and_keeps_callers_logits() -> None:
    logits = torch.tensor([PENALTY_LOGITS])
    before = logits.clone()
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=6)
    out = Sampler()(logits, [row(params, prompt=(4,), output=())])  # 3.0 -> 1.5, so token 0 wins
    assert out.token_ids == [0]
    assert torch.equal(logits, before)
    expected = torch.tensor([2.0, -1.0, 0.5, -0.5, 1.5, 0.0]).log_softmax(-1)
    assert out.logprobs[0] is not None
    assert out.logprobs[0].logprob == pytest.approx(expected[0].item(), abs=1e-6)


# ---------------------------------------------------------------- logprobs


def test_logprobs_top_n_sorted_and_consistent_with_log_softmax() -> None:
    logits = random_logits(3, seed=9)
    params = [SamplingParams(logprobs=5), SamplingParams(temperature=0.0, logprobs=0), SamplingParams()]
    out = Sampler()(logits, [row(p, position=i) for i, p in enumerate(params)])
    reference = logits.log_softmax(dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(reference[0, first.token_id].item(), abs=1e-5)
    assert [t for t, _ in first.top] == reference[0].topk(5).indices.tolist()
    values = [lp for _, lp in first.top]
    assert values == sorted(values, reverse=True)
    for token, lp in first.top:
        assert lp == pytest.approx(reference[0, token].item(), abs=1e-5)
    second = out.logprobs[1]
    assert second is not None and second.top == []
    assert second.logprob == pytest.approx(reference[1].max().item(), abs=1e-5)
    assert out.logprobs[2] is None


def test_logprobs_are_taken_before_temperature() -> None:
    logits = random_logits(1, seed=2)
    hot = Sampler()(logits, [row(SamplingParams(temperature=3.0, top_k=3, logprobs=2))])
    cold = Sampler()(logits, [row(SamplingParams(temperature=0.0, logprobs=2))])
    assert hot.logprobs[0] is not None and cold.logprobs[0] is not None
    assert hot.logprobs[0].top == cold.logprobs[0].top


def test_logits_shape_must_match_rows() -> None:
    with pytest.raises(ValueError):
        Sampler()(random_logits(2), [row()])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logits_sample_the_same_tokens_as_cpu() -> None:
    logits = random_logits(len(MIXED_PARAMS))
    rows = [row(p, position=i) for i, p in enumerate(MIXED_PARAMS)]
    assert Sampler()(logits.cuda(), rows).token_ids == Sampler()(logits, rows).token_ids


@pytest.mark.parametrize("temperature", [1e-5, 1.0, 1e38, 1e308])
@pytest.mark.parametrize("repetition_penalty", [5e-324, 1.0, 1e308])
@pytest.mark.parametrize(("presence_penalty", "frequency_penalty"), [(0.0, 0.0), (-2.0, 2.0), (2.0, -2.0)])
@pytest.mark.parametrize(("top_k", "top_p", "min_p"), [(0, 1.0, 0.0), (1, 1.0, 0.0), (40, 0.5, 0.1), (0, 1e-300, 1.0)])
def test_values_past_float32s_range_never_break_the_draw(temperature, repetition_penalty, presence_penalty,
                                                          frequency_penalty, top_k, top_p, min_p):
    """Found by the fuzzer: temperature 1e308 (inf in float32) over logits a tiny repetition penalty made
    inf gave NaN rows, and the top-k filter failed on them, killing the engine thread."""
    params = SamplingParams(temperature=temperature, repetition_penalty=repetition_penalty,
                            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                            top_k=top_k, top_p=top_p, min_p=min_p, logprobs=2)
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(5)) * 4
    rows = [row(params, prompt=[1, 2, 3], output=[3, 9], seed=s) for s in (1, 2, 3)]
    first = Sampler()(logits, rows)
    assert all(0 <= t < 64 for t in first.token_ids)
    assert Sampler()(logits, rows).token_ids == first.token_ids  # still a function of (seed, position)
