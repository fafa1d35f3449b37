"""The engine: scheduler, KV-cache manager and model runner driven step by step.

Single-threaded by design: `engine_loop.EngineLoop` owns the one thread that
calls it, so nothing here takes a lock. Request lifecycle:
1. add_request: validated against the context and the pool, queued WAITING
   (or add_remote_request: blocks reserved, WAITING_FOR_REMOTE_KV).
2. step: the scheduler picks tokens, the runner computes and samples them (a
   prompt found whole in the prefix cache whose logits are kept samples without
   computing: logits_cache.py), the output processor detokenizes and checks stop conditions.
3. finished (stop, length, abort): blocks freed, a last RequestOutput emitted.
A request with params.n > 1 prefills once: when its first token is sampled, from the
same logits, samples 1..n-1 fork off it (`_fork`), sharing its prompt's full KV blocks and
copying the partly filled last one; each then decodes, and finishes, on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.kv_cache_manager import KVCacheManager, KVCacheStats
from pdserve.engine.logits_cache import PromptLogitsCache
from pdserve.engine.model_loader import LoadedModel, load_model
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.models.llama import LayerHook, LlamaModel
from pdserve.engine.outputs import OutputProcessor, RequestOutput
from pdserve.engine.sampling import SampleOutput, TokenLogprobs, sample_seed
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus
from pdserve.engine.structured_output import GrammarCompiler
from pdserve.errors import CapacityError, InvalidRequestError, NotFoundError

log = logging.getLogger(__name__)

# Receives KV computed for export: (request_id, layer, start position, k, v), k/v [Hkv, T, D]
# with each head's rows contiguous, possibly views of the cache itself: valid only during
# the call (copy what is kept). Called on the engine thread, layer by layer, while later
# layers compute.
KVExportSink = Callable[[str, int, int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state between steps, for load reports and metrics (made on the engine thread)."""

    block_size: int
    kv: KVCacheStats
    num_running: int  # decoding or prefilling, plus those whose KV is arriving from elsewhere
    num_waiting: int
    # Fraction of the slots in allocated blocks that hold no token (each sequence's last block's tail).
    kv_fragmentation: float
    batch_fill_rate: float  # tokens the last step computed / the step's token budget


def _default_kv_gib() -> float:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(0.25, available / 4 / 2**30)
    except (ValueError, OSError, AttributeError):
        return 1.0


class LLMEngine:
    def __init__(self, config: EngineConfig, model: LoadedModel | None = None) -> None:
        self.config = config
        if model is None:
            model = load_model(config.model, dtype=config.dtype, device=config.device,
                               quantization=config.quantization)
        self.loaded = model
        spec = model.spec
        self.spec = spec
        self.tokenizer = model.tokenizer
        self.device = torch.device(config.device)
        self.dtype = next(iter(model.weights.values())).dtype
        self.max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        self.kv_cache = KVCache(
            spec.num_layers, spec.num_kv_heads, spec.head_dim,
            self._num_blocks(), config.cache.block_size, self.dtype, self.device,
        )
        self.kv = KVCacheManager(self.kv_cache.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        model_fn = LlamaModel(spec, model.hf_config, model.weights, self.max_model_len)
        self.runner = ModelRunner(model_fn, self.kv_cache, self.device, self.max_model_len, config.compile_max_batch)
        self.runner.compiled.warm_up()
        capacity = config.cache.num_cached_logits if config.cache.enable_prefix_caching else 0
        self.logits_cache = PromptLogitsCache(capacity)
        self.outputs = OutputProcessor(self.tokenizer, spec.eos_token_ids, self.max_model_len)
        self.grammars = GrammarCompiler(self.tokenizer, spec.vocab_size, spec.eos_token_ids)
        self.seqs: dict[str, Sequence] = {}  # by seq_id
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its unfinished samples
        self._pending: list[RequestOutput] = []
        self.num_steps = 0
        self.kv_export_sink: KVExportSink | None = None
        self.last_step_tokens = 0  # tokens the last step computed (batch fill = this / the budget)

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        gib = cache.kv_cache_gib if cache.kv_cache_gib is not None else _default_kv_gib()
        per_block = KVCache.bytes_per_block(
            self.spec.num_layers, self.spec.num_kv_heads, self.spec.head_dim, cache.block_size, self.dtype
        )
        return max(1, int(gib * 2**30 // per_block))

    # -- requests ---------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        output_token_ids: list[int] | None = None,
        export_kv: bool = False,
    ) -> Sequence:
        """Queue a request; output_token_ids resumes one whose first tokens came from elsewhere.

        export_kv: hand every token's KV (cached prefix included) to kv_export_sink as it is computed.
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, output_token_ids)
        seq.export_kv = export_kv
        self.scheduler.add(seq)
        self._track(seq)
        return seq

    def add_remote_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Reserve blocks for a prompt whose KV will be written by write_kv; CapacityError if no room.

        Returns how many leading prompt tokens the prefix cache already holds (a multiple of
        the block size, below the prompt's length): their KV must not be written.
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params, None)
        if not self.scheduler.add_remote(seq):
            raise CapacityError(
                f"no room for {seq.num_tokens} tokens of KV ({self.kv.pool.num_free} blocks free)",
                request_id=request_id,
            )
        self._track(seq)
        return seq.num_cached_tokens

    def num_cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        """What add_remote_request would find cached of this prompt now (nothing is reserved)."""
        return len(self.kv.remote_prefix(prompt_token_ids)) * self.kv.block_size

    def write_kv(self, request_id: str, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V ([Hkv, T, D]) of positions [start, start + T) of a remote request's prompt, past
        the tokens its reservation found cached."""
        seq = self._remote_seq(request_id)
        end = start + k.shape[1]
        if not (seq.num_cached_tokens <= start < end <= seq.num_prompt_tokens) or not (0 <= layer < self.spec.num_layers):
            raise InvalidRequestError("kv_chunk", f"layer {layer} tokens [{start}, {end}) out of range",
                                      request_id=request_id)
        slots = self.kv_cache.slots(seq.block_table, start, end)
        self.kv_cache.write_head_major(layer, slots, k.to(self.device), v.to(self.device))

    def complete_remote_kv(self, request_id: str, first_token_ids: list[int],
                           logprobs: list[TokenLogprobs | None] | None = None,
                           prompt_logprobs: list[TokenLogprobs | None] | None = None) -> None:
        """The prompt's KV is written and its first token sampled remotely (one per sample, params.n),
        with its prompt logprobs when params.prompt_logprobs asks: start decoding."""
        seq = self._remote_seq(request_id)
        if (prompt_logprobs is None) != (seq.params.prompt_logprobs is None) or (
                prompt_logprobs is not None and len(prompt_logprobs) != seq.num_prompt_tokens):
            raise InvalidRequestError("prompt_logprobs", f"{len(prompt_logprobs or ())} entries for a "
                                      f"{seq.num_prompt_tokens}-token prompt", request_id=request_id)
        if len(first_token_ids) != seq.params.n or not all(0 <= t < self.spec.vocab_size for t in first_token_ids):
            raise InvalidRequestError("first_token", f"{len(first_token_ids)} first token ids for "
                                      f"n = {seq.params.n} samples, or one out of the vocabulary", request_id=request_id)
        seq.prompt_logprobs = prompt_logprobs
        logprobs = logprobs or [None] * len(first_token_ids)
        self.scheduler.remote_complete(seq)
        forks = self._fork(seq, list(zip(first_token_ids[1:], logprobs[1:])))
        self._emit_token(seq, first_token_ids[0], logprobs[0])
        self._emit_forks(forks)

    def read_kv(self, request_id: str, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ([Hkv, T, D]) of positions [start, end) of a request still holding its blocks."""
        seq = self.seqs.get(request_id)
        if seq is None:
            raise NotFoundError(f"unknown request {request_id!r}")
        return self.kv_cache.read(layer, seq.block_table, start, end)

    def abort_request(self, request_id: str) -> None:
        for seq in list(self.requests.get(request_id, ())):
            self._finish(seq, SequenceStatus.FINISHED_ABORTED, "")

    def has_unfinished(self) -> bool:
        return bool(self.seqs) or bool(self._pending)

    def has_work(self) -> bool:
        """Whether a step would compute anything."""
        return self.scheduler.has_work

    def stats(self) -> KVCacheStats:
        return self.kv.stats()

    def snapshot(self) -> EngineSnapshot:
        stats, s = self.kv.stats(), self.scheduler
        slots = stats.num_used * self.kv.block_size
        # Shared prefix blocks count once per sequence, hence the clamp.
        tokens = sum(seq.num_computed_tokens for seq in s.running)
        return EngineSnapshot(
            block_size=self.kv.block_size, kv=stats, num_running=len(s.running) + len(s.remote),
            num_waiting=len(s.waiting), kv_fragmentation=max(0.0, 1.0 - tokens / slots) if slots else 0.0,
            batch_fill_rate=self.last_step_tokens / self.config.scheduler.max_num_batched_tokens)

    # -- the step ---------------------------------------------------------------

    def step(self, layer_hook: LayerHook | None = None) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.scheduled:
            now = time.monotonic()
            for s in sched.scheduled:
                if s.seq.first_scheduled_time is None:
                    s.seq.first_scheduled_time = now
            # Prompts found whole in the prefix cache whose logits are kept: nothing to compute.
            kept = {s.seq.request_id: lg for s in sched.scheduled if (lg := self._cached_logits(s)) is not None}
            computed = [s for s in sched.scheduled if s.seq.request_id not in kept]
            self.last_step_tokens = sum(s.num_new_tokens for s in computed)
            exports = [s for s in sched.scheduled if s.seq.export_kv] if self.kv_export_sink else []
            if exports:
                self._export_cached_prefix(exports)
                layer_hook = self._export_hook(exports, layer_hook)
            sampled, samples, logits = self.runner.execute(computed, layer_hook) if computed else ([], None, None)
            for s in sched.scheduled:
                s.seq.num_computed_tokens += s.num_new_tokens
                # max: a preempted sequence recomputes KV it has already exported.
                s.seq.num_exported_tokens = max(s.seq.num_exported_tokens, s.seq.num_computed_tokens)
                self.kv.cache_computed_blocks(s.seq)
            self.num_steps += 1
            if samples is not None:
                self._keep_prompt_logits(sampled, logits)
                self._process_samples([s.seq for s in sampled], samples, logits)
            if kept:
                seqs = [s.seq for s in sched.scheduled if s.seq.request_id in kept]
                logits = torch.stack([kept[q.request_id] for q in seqs])
                self._process_samples(seqs, self.runner.sample(seqs, logits), logits)
        else:
            self.last_step_tokens = 0
        return self.step_outputs()

    def _cached_logits(self, s: ScheduledSeq) -> torch.Tensor | None:
        """The kept logits of s's tokens when s only recomputes the last token of a prompt found whole in the cache."""
        seq = s.seq
        if s.num_new_tokens != 1 or not s.completes or seq.num_cached_tokens < seq.num_tokens:
            return None
        return self.logits_cache.get(seq.token_ids)

    def _keep_prompt_logits(self, sampled: list[ScheduledSeq], logits: torch.Tensor) -> None:
        """Keep the logits ending block-aligned prompts (the only ones the prefix cache can hold whole)."""
        for i, s in enumerate(sampled):
            seq = s.seq
            if seq.num_output_tokens == seq.num_resumed_tokens and seq.num_tokens % self.kv.block_size == 0:
                self.logits_cache.put(seq.token_ids, logits[i])

    def step_outputs(self) -> list[RequestOutput]:
        """Outputs produced since the last call (by steps, aborts or remote KV completion)."""
        outputs, self._pending = self._pending, []
        return outputs

    def _export_cached_prefix(self, exports: list[ScheduledSeq]) -> None:
        """Hand out KV already in the cache (a prefix hit) at once, before the step computes the rest.

        A prompt found whole in the cache is sent whole: its kept logits, or else its last
        token's recompute (which leaves the KV its shared block holds), give the next token.
        """
        for s in exports:
            start = s.seq.num_exported_tokens
            end = max(s.seq.num_computed_tokens, min(s.seq.num_cached_tokens, s.seq.num_prompt_tokens))
            if start >= end:
                continue
            for layer in range(self.spec.num_layers):
                k, v = self.kv_cache.export_view(layer, s.seq.block_table, start, end)
                self.kv_export_sink(s.seq.request_id, layer, start, k, v)
            s.seq.num_exported_tokens = end

    def _export_hook(self, exports: list[ScheduledSeq], inner: LayerHook | None) -> LayerHook:
        sink = self.kv_export_sink

        def hook(layer: int) -> None:
            for s in exports:
                start, end = s.seq.num_exported_tokens, s.seq.num_computed_tokens + s.num_new_tokens
                if start >= end:
                    continue
                k, v = self.kv_cache.export_view(layer, s.seq.block_table, start, end)
                sink(s.seq.request_id, layer, start, k, v)
            if inner is not None:
                inner(layer)

        return hook

    def _process_samples(self, seqs: list[Sequence], samples: SampleOutput, logits: torch.Tensor) -> None:
        for i, (seq, token_id, logprobs) in enumerate(zip(seqs, samples.token_ids, samples.logprobs)):
            forks = []
            if seq.params.n > 1 and seq.index == 0 and seq.num_output_tokens == 0:
                forks = self._fork(seq, self._sample_first_tokens(seq, logits[i]))
            self._emit_token(seq, token_id, logprobs)
            self._emit_forks(forks)

    def _sample_first_tokens(self, parent: Sequence, logits: torch.Tensor) -> list[tuple[int, TokenLogprobs | None]]:
        """The first tokens of samples 1..n-1, drawn from the [V] logits parent's first token came from."""
        # Parent's row but for the seed: its grammar has not taken its first token yet, so its mask is every sample's.
        row = self.runner.sampling_row(parent)
        rows = [dataclasses.replace(row, seed=sample_seed(parent.seed, index)) for index in range(1, parent.params.n)]
        samples = self.runner.sampler(logits.unsqueeze(0).repeat(len(rows), 1), rows)
        return list(zip(samples.token_ids, samples.logprobs))

    def _fork(self, parent: Sequence, first_tokens: list[tuple[int, TokenLogprobs | None]]
              ) -> list[tuple[Sequence, int, TokenLogprobs | None]]:
        """Samples 1.. of parent's request, which has just computed its prompt: placed, and returned with
        their first tokens, to emit after parent's (so that sample 0's first output comes first)."""
        forks = []
        for index, (token_id, logprobs) in enumerate(first_tokens, start=1):
            child = Sequence(parent.request_id, parent.prompt_token_ids, parent.params,
                             sample_seed(parent.seed, index), index=index)
            child.arrival_time, child.first_scheduled_time = parent.arrival_time, parent.first_scheduled_time
            if parent.params.structured_output is not None:
                child.grammar = self.grammars.matcher(parent.params.structured_output)
            self._track(child)
            # A sample that ends at its first token needs no KV.
            copy = self.kv.fork(parent, child) if parent.params.max_tokens > 1 else None
            if copy is None:  # (or no free block: it computes its own KV, from the prefix cache, when it runs)
                self.scheduler.add(child)
            else:
                src, dst, num_tokens = copy
                if num_tokens:
                    self.kv_cache.copy_prefix(src, dst, num_tokens)
                self.scheduler.add_forked(child)
            forks.append((child, token_id, logprobs))
        return forks

    def _emit_forks(self, forks: list[tuple[Sequence, int, TokenLogprobs | None]]) -> None:
        for child, token_id, logprobs in forks:
            self._emit_token(child, token_id, logprobs)

    def _emit_token(self, seq: Sequence, token_id: int, logprobs) -> None:
        seq.append_token(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text, finished = self.outputs.on_token(seq, token_id)
        if seq.grammar is not None and finished is None:
            if not seq.grammar.consume(token_id):  # the mask allowed it: a token from elsewhere, or a bug
                log.error("request %s: token %d breaks its structured output (%s); aborting it", seq.request_id,
                          token_id, seq.grammar.error)
                finished = SequenceStatus.FINISHED_ABORTED
            elif seq.grammar.is_finished:  # complete: only EOS could follow
                text += self.outputs.flush(seq)
                finished = SequenceStatus.FINISHED_STOPPED
        lp = [logprobs] if seq.params.logprobs is not None else None
        if finished is not None:
            self._finish(seq, finished, text, [token_id], lp)
        else:
            self._pending.append(self._output(seq, [token_id], text, lp))

    def _finish(self, seq: Sequence, status: SequenceStatus, text: str,
                token_ids: list[int] | None = None, logprobs=None) -> None:
        self.scheduler.finish(seq, status)
        self.outputs.remove(seq.seq_id)
        del self.seqs[seq.seq_id]
        samples = self.requests[seq.request_id]
        samples.remove(seq)
        if not samples:
            del self.requests[seq.request_id]
        out = self._output(seq, token_ids or [], text, logprobs)
        out.finished = not samples
        out.finish_reason = status.value
        self._pending.append(out)

    def _output(self, seq: Sequence, token_ids: list[int], text: str, logprobs) -> RequestOutput:
        queue_s = ttft_s = None
        if seq.first_scheduled_time is not None:
            queue_s = seq.first_scheduled_time - seq.arrival_time
        if seq.first_token_time is not None:
            ttft_s = seq.first_token_time - seq.arrival_time
        first = seq.index == 0 and token_ids and seq.num_output_tokens - seq.num_resumed_tokens == len(token_ids)
        return RequestOutput(
            request_id=seq.request_id, token_ids=token_ids, text=text, logprobs=logprobs,
            prompt_logprobs=seq.prompt_logprobs if first else None,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens, queue_s=queue_s, ttft_s=ttft_s,
            num_preemptions=seq.num_preemptions, index=seq.index,
        )

    # -- checks -----------------------------------------------------------------

    def _new_sequence(self, request_id: str, prompt: list[int], params: SamplingParams,
                      output: list[int] | None) -> Sequence:
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        self.validate_prompt(prompt, params, num_output_tokens=len(output or ()), request_id=request_id)
        if output:
            self._validate_resumed(output, params, request_id)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(request_id, list(prompt), params, seed, output)
        if params.structured_output is not None:
            seq.grammar = self.grammars.matcher(params.structured_output)
            if output and not all(seq.grammar.consume(t) for t in output):
                raise InvalidRequestError("generated_token_ids", "do not follow the structured output",
                                          request_id=request_id)
        return seq

    def _validate_resumed(self, output: list[int], params: SamplingParams, request_id: str) -> None:
        """Tokens generated elsewhere (a resumed request): real token ids, and room for one more."""
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in output):
            raise InvalidRequestError("generated_token_ids", f"token ids must be in [0, {vocab})",
                                      request_id=request_id)
        if params.n > 1:
            raise InvalidRequestError("n", "a request resumed from its generated tokens has one sample",
                                      request_id=request_id)
        if len(output) >= params.max_tokens:
            raise InvalidRequestError("generated_token_ids", f"{len(output)} tokens already reach max_tokens "
                                      f"{params.max_tokens}: nothing is left to generate", request_id=request_id)

    def validate_prompt(self, prompt: list[int], params: SamplingParams, *, num_output_tokens: int = 0,
                        request_id: str | None = None) -> None:
        """Raise InvalidRequestError/CapacityError for a prompt this engine can never serve."""
        if not prompt:
            raise InvalidRequestError("prompt", "is empty", request_id=request_id)
        vocab = self.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError("prompt_token_ids", f"token ids must be in [0, {vocab})", request_id=request_id)
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted by id
            raise InvalidRequestError("logit_bias", f"token id {params.logit_bias[-1][0]} is not in [0, {vocab})",
                                      request_id=request_id)
        total = len(prompt) + num_output_tokens
        if total >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{total} tokens leave no room in the context of {self.max_model_len}",
                request_id=request_id)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                "max_tokens", f"{len(prompt)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                f"context of {self.max_model_len}", request_id=request_id)
        # One sample at a time suffices (with n > 1, the others wait or are preempted while one runs).
        needed = self.kv.num_blocks_for(len(prompt) + params.max_tokens)
        if needed > self.kv.pool.num_blocks:
            raise CapacityError(
                f"needs {needed} KV blocks, more than the {self.kv.pool.num_blocks} this worker has",
                request_id=request_id)

    def _track(self, seq: Sequence) -> None:
        self.seqs[seq.seq_id] = seq
        self.requests.setdefault(seq.request_id, []).append(seq)
        self.outputs.add(seq)

    def _remote_seq(self, request_id: str) -> Sequence:
        seq = self.scheduler.remote.get(request_id)
        if seq is None:
            raise NotFoundError(f"no request {request_id!r} is waiting for remote KV")
        return seq
