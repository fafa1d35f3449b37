"""Runs one scheduled step on the model: builds the batch, the forward, the sampling.

Rows of a step: decode tokens first (one row per sequence, attended in one
batched paged-attention call), then each prefill chunk. Only the last row of a
sequence whose step reaches its last token is turned into logits and sampled.
"""

from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionBackend, AttentionMetadata
from pdserve.engine.compiled_decode import CompiledDecode
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.models.llama import LayerHook, LlamaModel
from pdserve.engine.sampling import Sampler, SampleOutput, SamplingRow, token_logprobs
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence


# Prompt logprobs: rows turned into [rows, V] logits at a time (2048 x 49152 floats would be 400 MB).
_PROMPT_LOGITS_ROWS = 256


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device, max_model_len: int,
                 compile_max_batch: int = 0) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.sampler = Sampler()
        self.attention = AttentionBackend(kv_cache)
        self.compiled = CompiledDecode(model, kv_cache, self.attention, compile_max_batch, max_model_len)

    def execute(
        self, scheduled: list[ScheduledSeq], layer_hook: LayerHook | None = None
    ) -> tuple[list[ScheduledSeq], SampleOutput | None, torch.Tensor | None]:
        """Forward the step; returns the sequences that sampled, their samples and their [N, V] logits, in order."""
        ordered = [s for s in scheduled if s.num_new_tokens == 1] + [s for s in scheduled if s.num_new_tokens > 1]
        num_tokens = sum(s.num_new_tokens for s in ordered)
        bucket = None if layer_hook is not None else self.compiled.bucket(len(ordered), num_tokens)
        input_ids, positions, meta = self._prepare(ordered, bucket)
        layer_fn = None if bucket is None else self.compiled.layer_fn
        hidden = self.model.forward(input_ids, positions, meta, self.kv_cache, layer_hook, layer_fn)
        if any(s.seq.prompt_logprobs is not None for s in ordered):
            self._record_prompt_logprobs(ordered, hidden)
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
        return self.sampler(logits, [self.sampling_row(seq) for seq in seqs])

    def _record_prompt_logprobs(self, ordered: list[ScheduledSeq], hidden: torch.Tensor) -> None:
        """Append to each asking sequence's prompt_logprobs those of the prompt tokens its rows predict.

        Row j (position p) predicts the token at p + 1. Positions already recorded (a preempted sequence
        computes its prompt again) are skipped; logits are made _PROMPT_LOGITS_ROWS rows at a time.
        """
        row = 0
        for s in ordered:
            seq, start, first_row = s.seq, s.seq.num_computed_tokens, row
            row += s.num_new_tokens
            if seq.prompt_logprobs is None:
                continue
            lo = max(start, len(seq.prompt_logprobs) - 1)
            hi = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            for a in range(lo, hi, _PROMPT_LOGITS_ROWS):
                b = min(a + _PROMPT_LOGITS_ROWS, hi)
                logits = self.model.logits(hidden[first_row + a - start : first_row + b - start])
                seq.prompt_logprobs.extend(token_logprobs(logits, seq.token_ids[a + 1 : b + 1],
                                                          seq.params.prompt_logprobs or 0))

    def _prepare(self, ordered: list[ScheduledSeq],
                 bucket: int | None = None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The step's input ids, positions and attention metadata; a compiled decode step's
        padded to its bucket (compiled_decode: padding rows write to scratch, attend one key)."""
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
        num_decode = sum(1 for s in ordered if s.num_new_tokens == 1)
        decode, prefill = ordered[:num_decode], ordered[num_decode:]
        context_lens = [s.seq.num_computed_tokens + 1 for s in decode]
        table_rows, table_width = self._block_table_rows(decode), None
        if bucket is not None:
            pad = bucket - num_decode
            token_ids += [0] * pad
            positions += [0] * pad
            slots += [self.kv_cache.scratch_slot] * pad
            context_lens += [1] * pad
            table_rows += [[]] * pad
            table_width, num_decode = self.compiled.table_width, bucket
        meta = AttentionMetadata(
            slots=self._tensor(slots, torch.long),
            num_decode=num_decode,
            decode_block_tables=self._pad_tables(table_rows, table_width) if decode else None,
            decode_context_lens=self._tensor(context_lens) if decode else None,
            prefill_block_tables=self._pad_tables(self._block_table_rows(prefill)) if prefill else None,
            prefill_query_start=self._tensor(_cumsum(s.num_new_tokens for s in prefill)) if prefill else None,
            prefill_start_pos=self._tensor([s.seq.num_computed_tokens for s in prefill]) if prefill else None,
            backend=self.attention,
        )
        return self._tensor(token_ids, torch.long), self._tensor(positions, torch.long), meta

    def _block_table_rows(self, scheduled: list[ScheduledSeq]) -> list[list[int]]:
        """The blocks each sequence attends this step."""
        bs = self.kv_cache.block_size
        return [s.seq.block_table[: -(-(s.seq.num_computed_tokens + s.num_new_tokens) // bs)] for s in scheduled]

    def _pad_tables(self, rows: list[list[int]], width: int | None = None) -> torch.Tensor:
        """[N, width] int32 (width: the longest row's by default), padded with block 0."""
        width = width or max(len(r) for r in rows)
        return self._tensor([r + [0] * (width - len(r)) for r in rows])

    def _tensor(self, values: list, dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @staticmethod
    def sampling_row(seq: Sequence) -> SamplingRow:
        """What the sampler needs of a sequence for its next token."""
        return SamplingRow(
            params=seq.params,
            position=seq.num_tokens,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            seed=seq.seed,
            grammar=seq.grammar,
        )


def _cumsum(counts) -> list[int]:
    """[0, c0, c0 + c1, ...]: where each chunk's rows start, and the end."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out
