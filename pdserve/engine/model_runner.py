"""Runs one scheduled step on the model: builds the batch, the forward, the sampling.

Rows of a step: decode tokens first (one row per sequence, attended in one
batched paged-attention call), then each prefill chunk. Only the last row of a
sequence whose step reaches its last token is turned into logits and sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionMetadata, PrefillSpan
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.models.llama import LayerHook, LlamaModel
from pdserve.engine.sampling import Sampler, SampleOutput, SamplingRow
from pdserve.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    # Tokens computed this step, from seq.num_computed_tokens on.
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """Whether this step reaches the sequence's last token (so it samples)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.sampler = Sampler()

    def execute(
        self, scheduled: list[ScheduledSeq], layer_hook: LayerHook | None = None
    ) -> tuple[list[ScheduledSeq], SampleOutput | None, torch.Tensor | None]:
        """Forward the step; returns the sequences that sampled, their samples and their [N, V] logits, in order."""
        ordered = [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens > 1]
        input_ids, positions, meta = self._prepare(ordered)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_cache, layer_hook)
        sampling, rows = [], []
        row = 0
        for s in ordered:
            row += s.num_new_tokens
            if s.completes:
                sampling.append(s)
                rows.append(row - 1)
        if not sampling:
            return [], None, None
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)])
        return sampling, self.sample([s.seq for s in sampling], logits), logits

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SampleOutput:
        """One token per sequence from its [N, V] logits (those of its last position)."""
        return self.sampler(logits, [self._sampling_row(seq) for seq in seqs])

    def _prepare(self, ordered: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for s in ordered:
            start, end = s.seq.num_computed_tokens, s.seq.num_computed_tokens + s.num_new_tokens
            token_ids.extend(s.seq.token_ids[start:end])
            positions.extend(range(start, end))
            ids = self.kv_cache.slot_ids(s.seq.block_table, start, end)
            # Positions in shared cached blocks (the recomputed last token of a prompt found
            # whole in the prefix cache) keep the KV they hold: their write goes to scratch.
            num_shared = max(0, min(end, s.seq.num_cached_tokens) - start)
            ids[:num_shared] = [self.kv_cache.scratch_slot] * num_shared
            slots.extend(ids)
        decode = [s.seq for s in ordered if s.num_new_tokens == 1]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        meta = AttentionMetadata(
            slots=as_tensor(slots),
            num_decode=len(decode),
            decode_gather_index=None,
            decode_bias=None,
            prefills=self._prefill_spans(ordered[len(decode) :], len(decode)),
        )
        if decode:
            meta.decode_gather_index, meta.decode_bias = self._decode_tables(decode)
        return as_tensor(token_ids), as_tensor(positions), meta

    def _decode_tables(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.kv_cache
        context_lens = [s.num_computed_tokens + 1 for s in seqs]
        max_blocks = -(-max(context_lens) // cache.block_size)
        # Pad with block 0: whatever it holds is masked out below.
        table = [s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table[:max_blocks])) for s in seqs]
        tables = torch.tensor(table, dtype=torch.long, device=self.device)
        key_pos = torch.arange(max_blocks * cache.block_size, device=self.device)
        lens = torch.tensor(context_lens, device=self.device)
        bias = torch.zeros(len(seqs), key_pos.numel(), dtype=cache.dtype, device=self.device)
        bias.masked_fill_(key_pos.view(1, -1) >= lens.view(-1, 1), float("-inf"))
        bias = bias.unsqueeze(0).expand(cache.num_kv_heads, -1, -1).reshape(-1, 1, key_pos.numel())
        return cache.gather_index(tables), bias

    def _prefill_spans(self, ordered: list[ScheduledSeq], row_start: int) -> list[PrefillSpan]:
        spans = []
        for s in ordered:
            end = s.seq.num_computed_tokens + s.num_new_tokens
            num_blocks = -(-end // self.kv_cache.block_size)
            table = torch.tensor(s.seq.block_table[:num_blocks], dtype=torch.long, device=self.device)
            spans.append(PrefillSpan(row_start, s.num_new_tokens, s.seq.num_computed_tokens,
                                     self.kv_cache.gather_index(table)))
            row_start += s.num_new_tokens
        return spans

    @staticmethod
    def _sampling_row(seq: Sequence) -> SamplingRow:
        return SamplingRow(
            params=seq.params,
            position=seq.num_tokens,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            seed=seq.seed,
        )
