"""Sampling: the batched sampler.

Owns `SamplingRow` (one row of logits to sample, with its request's `SamplingParams`
(sampling_params.py) and the history penalties need), and `Sampler`, which turns a
batch of logits into one token (and optionally logprobs) per row.

The random draw of a token is a function of (seed, position) alone, through
`draw_uniforms`, so the same token comes out whichever batch, step or process
samples it: a request moved from one decode worker to another, or re-run after a
preemption, continues exactly as it would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.structured_output import GrammarMatcher, TokenMasks

_FLOAT32_MAX = torch.finfo(torch.float32).max
# Top-k / top-p sets are looked for among at most this many best tokens of a row,
# those within this many nats of its best logit (probability ratio e**-12 ~ 6e-6),
# before falling back to a full sort.
_MAX_CANDIDATES = 1024
_CANDIDATE_LOGIT_RANGE = 12.0

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplingRow:
    """One row of logits to sample and what the sampler needs to know about its request."""

    params: SamplingParams
    # Index in the sequence of the token being sampled (= len(prompt) + len(output so far)).
    position: int
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # The effective seed: params.seed, or one the engine drew at submission.
    seed: int
    # With params.structured_output: where the sequence is in its grammar (the row's mask).
    grammar: GrammarMatcher | None = None


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    # Top-n (token_id, logprob), best first; n = params.logprobs.
    top: list[tuple[int, float]]


@dataclass(slots=True)
class SampleOutput:
    # One entry per row, in row order.
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed` (n > 1): sample 0 keeps the
    request's own, so its tokens are those the request would get with n = 1."""
    return seed if index == 0 else _splitmix64(seed ^ _splitmix64(index)) >> 1


def draw_key(seed: int, position: int) -> int:
    """The generator seed for the token at `position` of a request seeded with `seed`."""
    key = _splitmix64(_splitmix64(seed) ^ position)
    # torch's CPU generator (mt19937) keeps only 32 bits of its seed; fold all 64 in so
    # that neither half of the key is ignored.
    return (key ^ (key >> 32)) & 0xFFFFFFFF


def draw_uniforms(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """A [V] float32 CPU tensor of uniforms in [0, 1), one per token id.

    A function of its arguments alone: no global RNG state, batch or device enters it.
    """
    return _fill_uniforms(torch.empty(vocab_size, dtype=torch.float32), seed, position)


def _fill_uniforms(out: torch.Tensor, seed: int, position: int) -> torch.Tensor:
    """Writes draw_uniforms(seed, position, len(out)) into the [V] float32 CPU tensor `out`."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(draw_key(seed, position))
    return torch.rand(out.shape, generator=generator, dtype=torch.float32, out=out)


class Sampler:
    """Samples one token per row of a batch of logits.

    Per row, in order: logit bias, repetition penalty, presence/frequency penalties, then either
    the greedy pick (first maximum) or temperature, top-k, top-p, min-p and a seeded
    draw. The draw is the exponential race: the token maximising prob / Exp(1), with
    the exponentials made from `draw_uniforms(seed, position, V)`, done in log space
    as a Gumbel-max over the filtered logits.

    Rows with a grammar then lose the tokens it forbids (-inf), before anything picks.
    Logprobs, when a row asks for them, are the log_softmax of the logits after the
    bias, penalties and grammar and before temperature, top-k, top-p and min-p: they
    describe the model's (penalised, constrained) distribution, not the filtered one
    the token was drawn from.
    """

    def __init__(self) -> None:
        self.masks = TokenMasks()

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleOutput:
        """logits: [B, V] in any float dtype, one row per entry of `rows`."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
        penalised = [i for i, r in enumerate(rows) if r.params.has_penalties]
        biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
        constrained = [(i, r.grammar) for i, r in enumerate(rows) if r.grammar is not None]
        # Biases, penalties and masks write in place: copy then, so the caller's float32 logits stay intact.
        logits = logits.to(torch.float32, copy=bool(penalised or biased or constrained))  # [B, V]
        for i in biased:
            ids, values = zip(*rows[i].params.logit_bias)
            logits[i, torch.tensor(ids, device=logits.device)] += torch.tensor(values, device=logits.device)
        for i in penalised:
            apply_penalties(logits[i], rows[i])
            # Extreme penalties overflow float32: +inf would make the filters' sums inf - inf.
            logits[i].nan_to_num_(nan=-math.inf, posinf=_FLOAT32_MAX, neginf=-math.inf)
        self.masks.apply(logits, constrained)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(random_rows) < len(rows):
            token_ids = logits.max(dim=-1).indices  # [B]; random rows are overwritten below
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if random_rows:
            index = torch.tensor(random_rows, device=logits.device)
            # Indexing with a tensor copies, so the draw may scale and mask in place.
            token_ids[index] = _draw(logits[index], [rows[i] for i in random_rows])
        chosen = token_ids.tolist()
        return SampleOutput(token_ids=chosen, logprobs=_logprobs(logits, rows, chosen))


def apply_penalties(row_logits: torch.Tensor, row: SamplingRow) -> None:
    """Applies the row's repetition, presence and frequency penalties to its [V] logits, in place.

    Builds the row's history as a tensor each call: cost grows with the sequence,
    which only rows that ask for penalties pay.
    """
    params, device = row.params, row_logits.device
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([*row.prompt_token_ids, *row.output_token_ids], dtype=torch.long, device=device)
        seen = seen.unique()
        values = row_logits[seen]
        penalty = params.repetition_penalty
        row_logits[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0) and len(row.output_token_ids):
        output = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=device)
        ids, counts = output.unique(return_counts=True)
        row_logits[ids] -= params.presence_penalty + params.frequency_penalty * counts.float()


def _draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Draws a token per non-greedy row from its penalised [b, V] logits; returns [b] ids.

    Overwrites `logits`, which must be the caller's own copy.
    """
    temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    # A temperature past float32's range would be inf, and -inf / inf is NaN: the largest finite one
    # gives the same (uniform) distribution.
    scaled = logits.div_(temperature.clamp_(max=_FLOAT32_MAX).unsqueeze(1))  # [b, V]
    scaled = _filter_top_k_top_p(scaled, rows)
    min_p = [r.params.min_p for r in rows]
    if any(min_p):
        # prob < min_p * max_prob  <=>  logit < max_logit + log(min_p); no softmax needed.
        log_min_p = torch.tensor([math.log(p) if p > 0 else -math.inf for p in min_p], device=logits.device)
        threshold = scaled.max(dim=-1, keepdim=True).values + log_min_p.unsqueeze(1)
        scaled.masked_fill_(scaled < threshold, -math.inf)
    vocab_size = logits.shape[1]
    # Filled in place: torch.stack of many [V] rows is far slower on CPU.
    uniforms = torch.empty(len(rows), vocab_size, dtype=torch.float32)  # [b, V]
    for i, r in enumerate(rows):
        _fill_uniforms(uniforms[i], r.seed, r.position)
    # argmax(p / E) with E = -log(U) ~ Exp(1)  <=>  argmax(logit - log(E)).
    log_exponentials = uniforms.log_().neg_().log_()
    return scaled.sub_(log_exponentials.to(scaled.device)).max(dim=-1).indices


def _filter_top_k_top_p(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Sets the [b, V] logits outside each row's top-k / top-p set to -inf, in place.

    A full sort of the vocabulary costs tens of ms per step on CPU, so each row's
    set is first looked for among its candidates: the tokens at or above its k-th
    best logit (top-k) or within `_CANDIDATE_LOGIT_RANGE` of its best (top-p). Tied
    logits are all in or all out, so the set found is the one a full stable sort
    gives; rows whose set may reach past their candidates get the full sort.
    Which way a row goes depends on that row alone, so a row gets bit-identical
    logits whatever else is in its batch.
    """
    device, vocab_size = scaled.device, scaled.shape[1]
    flags = [0 < r.params.top_k < vocab_size or r.params.top_p < 1.0 for r in rows]
    if not any(flags):
        return scaled
    filtered = torch.tensor(flags, device=device)
    logits = _take(scaled, filtered)  # [f, V]
    params = [r.params for r, flag in zip(rows, flags) if flag]
    # top_k 0 (off) or beyond the vocabulary: keep all V.
    top_k = torch.tensor([min(p.top_k or vocab_size, vocab_size) for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    count = _num_candidates(logits, top_k)  # [f]
    fast = count <= _MAX_CANDIDATES
    mask = torch.zeros_like(logits, dtype=torch.bool)
    settled = torch.zeros_like(fast)
    if fast.any():
        settled[fast] = _mark_kept(mask, logits, fast, top_k, top_p, count)
    if not settled.all():
        _mark_kept(mask, logits, ~settled, top_k, top_p, torch.full_like(count, vocab_size))
    logits.masked_fill_(~mask, -math.inf)
    if logits is not scaled:  # a copy of the filtered rows
        scaled[filtered] = logits
    return scaled


def _take(tensor: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """tensor[which] for a bool row mask, without copying when it selects every row."""
    return tensor if bool(which.all()) else tensor[which]


def _num_candidates(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Per row of [f, V] logits, how many tokens are candidates (see _filter_top_k_top_p)."""
    vocab_size = logits.shape[1]
    threshold = logits.amax(dim=-1) - _CANDIDATE_LOGIT_RANGE  # [f]
    small_k = top_k <= _MAX_CANDIDATES
    if small_k.any():
        # Only the k-th value is read, which does not depend on how topk orders ties.
        values = _take(logits, small_k).topk(int(top_k[small_k].max()), dim=-1).values
        threshold[small_k] = values.gather(1, (top_k[small_k] - 1).unsqueeze(1)).squeeze(1)
    count = (logits >= threshold.unsqueeze(1)).count_nonzero(dim=-1)
    # A top-k beyond the candidate limit needs the full sort.
    return torch.where((top_k > _MAX_CANDIDATES) & (top_k < vocab_size), vocab_size, count)


def _mark_kept(mask: torch.Tensor, logits: torch.Tensor, which: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Marks in the [f, V] `mask` the tokens kept by the rows `which` selects, among
    their best `count` tokens; returns, for those rows, whether that is final."""
    rows = _take(logits, which)
    values, ids = _best_first(rows, int(count[which].max()))
    keep, settled = _keep_best(values, top_k[which], top_p[which], rows.logsumexp(dim=-1), count[which])
    mask[which] = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, ids, keep)
    return settled


def _best_first(logits: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num` largest of each row of [n, V] logits and their ids, best first.

    Ties are ordered by token id, so rank 0 is the greedy token (the first maximum).
    """
    if num == logits.shape[1]:
        # A stable sort of logits in vocabulary order already breaks ties by id.
        return logits.sort(dim=-1, descending=True, stable=True)
    values, ids = logits.topk(num, dim=-1)  # [n, num]
    ids, by_id = ids.sort(dim=-1)
    values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    return values, ids.gather(1, order)


def _keep_best(
    values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, log_total: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the best-first [n, num] logits each row keeps, and whether that is final.

    Only the first `count` of a row are its candidates. The set is final when it
    holds the whole top-k, or (top-k off) the candidates' mass reaches top_p.
    """
    rank = torch.arange(values.shape[1], device=values.device).unsqueeze(0)
    keep = (rank < top_k.unsqueeze(1)) & (rank < count.unsqueeze(1))
    in_top_k = values.masked_fill(~keep, -math.inf)
    # top_p applies to the distribution renormalised over the top-k set.
    has_top_k = top_k <= count
    log_mass = torch.where(has_top_k, in_top_k.logsumexp(dim=-1), log_total)
    probs = (in_top_k - log_mass.unsqueeze(1)).exp()
    cumulative = probs.cumsum(dim=-1)
    # Rank 0 has no mass before it, so at least one token survives; top_p == 1 keeps all
    # even when rounding pushes the cumulative sum past 1 before the tail.
    keep &= (cumulative - probs < top_p.unsqueeze(1)) | (top_p.unsqueeze(1) >= 1.0)
    settled = has_top_k | ((top_p < 1.0) & (cumulative[:, -1] >= top_p))
    return keep, settled


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], num_top: int) -> list[TokenLogprobs]:
    """The logprob of token_ids[i] under row i of [N, V] logits, with the row's num_top best."""
    logprobs = logits.float().log_softmax(dim=-1)
    ids = torch.tensor(list(token_ids), device=logits.device)
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    if not num_top:
        return [TokenLogprobs(t, lp, []) for t, lp in zip(token_ids, chosen)]
    top_lp, top_ids = logprobs.topk(num_top, dim=-1)
    return [TokenLogprobs(t, lp, list(zip(i, p))) for t, lp, i, p in zip(token_ids, chosen, top_ids.tolist(),
                                                                         top_lp.tolist())]


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow], chosen: list[int]) -> list[TokenLogprobs | None]:
    """Logprobs of the chosen and top-n tokens, for the rows that asked for them."""
    wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return result
    index = torch.tensor(wanted, device=logits.device)
    num_top = max(rows[i].params.logprobs or 0 for i in wanted)
    for i, lp in zip(wanted, token_logprobs(logits[index], [chosen[i] for i in wanted], num_top)):
        lp.top = lp.top[: rows[i].params.logprobs or 0]  # each row its own n
        result[i] = lp
    return result
