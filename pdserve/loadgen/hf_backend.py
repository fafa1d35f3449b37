"""The transformers baseline: serving BenchRequests with `model.generate`, static batching.

This is how a user without a serving engine would serve a model: one thread owns it,
and whenever that thread is idle it takes every waiting request (up to
max_batch_size, in arrival order) and runs one left-padded, greedy `generate` over
them. Requests arriving meanwhile wait for the whole batch to finish, and a row that
finishes early keeps its slot until the longest row is done: static batching, whose
head-of-line blocking is exactly what continuous batching removes.

Per-token timing comes from a streamer: in this transformers version `generate` hands
a streamer each decoding step's tokens ([batch]) right after choosing them (`StopCheck`
in generation/utils.py), so one arrival is sent per still-active row per step.
"""

from __future__ import annotations

import asyncio
import pathlib
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from pdserve.engine.model_loader import default_model_path, resolve_dtype
from pdserve.loadgen.backend import BenchRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_Event = int | RuntimeError | None  # tokens in one arrival, the batch's failure, or the end of the stream


@dataclass(eq=False)
class _Job:
    """One request between `stream()` on the event loop and the model thread."""

    request: BenchRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)  # generated so far; also HFBackend.outputs[index]
    done: bool = False
    abandoned: bool = False  # its stream was closed before the end: nobody reads it any more

    def arrive(self, token: int) -> None:
        self.tokens.append(token)
        self.loop.call_soon_threadsafe(self.events.put_nowait, 1)

    def finish(self, error: RuntimeError | None = None) -> None:
        if not self.done:
            self.done = True
            self.loop.call_soon_threadsafe(self.events.put_nowait, error)


class _Abandoned(StoppingCriteria):
    """Ends generate early once every stream of its batch is finished or abandoned."""

    def __init__(self, jobs: list[_Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        stop = all(job.done or job.abandoned for job in self.jobs)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


class _ArrivalStreamer(BaseStreamer):
    """Turns each decoding step's tokens into one arrival per row still within its max_tokens."""

    def __init__(self, jobs: list[_Job], eos_ids: set[int]) -> None:
        self.jobs, self.eos_ids, self.prompt_seen = jobs, eos_ids, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt batch, not a step
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.tolist()):
            if not job.done:
                job.arrive(token)
                # EOS only shows up when some row may stop at it; generate pads that row afterwards.
                if len(job.tokens) == job.request.max_tokens or token in self.eos_ids:
                    job.finish()

    def end(self) -> None:
        """Nothing: HFBackend ends every stream of the batch once generate returns or fails."""


class HFBackend:
    """A `Backend` over transformers' static-batch `generate` (see the module docstring)."""

    def __init__(self, model: str | None = None, *, dtype: str | None = None, threads: int | None = None,
                 max_batch_size: int = 32, name: str = "transformers") -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.name = name
        self.num_batches = 0  # generate calls so far
        self.outputs: dict[int, list[int]] = {}  # request index -> the token ids streamed for it
        self.model: PreTrainedModel | None = None  # set by start()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._path, self._dtype, self._threads = model, resolve_dtype(dtype, "cpu"), threads
        self._max_batch_size = max_batch_size
        self._pending: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # None: stop
        self._thread: threading.Thread | None = None
        self._closed = False

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._serve, name=f"{self.name}-generate", daemon=True)
        self._thread.start()

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        if self._thread is None or self._closed:
            raise RuntimeError(f"{self.name}: request {request.index} sent before start() or after close()")
        job = _Job(request, asyncio.get_running_loop())
        self.outputs[request.index] = job.tokens
        self._pending.put(job)
        try:
            while (event := await job.events.get()) is not None:
                if isinstance(event, RuntimeError):
                    raise event
                yield event
        finally:
            job.abandoned = not job.done  # cancelled (e.g. the run's time limit): not started, or stopped early

    async def close(self) -> None:
        if self._thread is not None and not self._closed:
            self._closed = True
            self._pending.put(None)  # after every request already queued
            await asyncio.to_thread(self._thread.join)

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        path = pathlib.Path(self._path or default_model_path()).expanduser()
        source, extra = (str(path), {}) if path.is_dir() else (str(path.parent), {"gguf_file": path.name})
        self.tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        # Dense weights in `dtype`, as pdserve serves them, not transformers' packed GGUF matmuls.
        quantization = {"quantization_config": GgufConfig(dequantize=True)} if extra else {}
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=self._dtype, **extra, **quantization).eval()

    def _serve(self) -> None:
        if self._threads is not None:
            # Here, not in _load: torch's OpenMP thread count is per calling thread.
            torch.set_num_threads(self._threads)
        while (batch := self._next_batch()) is not None:
            failure: RuntimeError | None = None
            try:
                self._generate(batch)
            except Exception as error:  # noqa: BLE001 - fails this batch's requests, not the thread
                failure = RuntimeError(f"{self.name}: generate failed for a batch of {len(batch)}: {error!r}")
            for job in batch:
                job.finish(failure)

    def _next_batch(self) -> list[_Job] | None:
        """Block for the first request, then take whatever else is already waiting."""
        batch: list[_Job] = []
        while (not batch or not self._pending.empty()) and len(batch) < self._max_batch_size:
            job = self._pending.get()
            if job is None:  # close(): serve what came before it, then stop
                self._pending.put(None)
                return batch or None
            if not job.abandoned:
                batch.append(job)
        return batch

    def _generate(self, batch: list[_Job]) -> None:
        assert self.model is not None and self.tokenizer is not None
        prompts = [self._prompt_ids(job.request) for job in batch]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # [B, S], left-padded
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, S]
        max_new_tokens = max(job.request.max_tokens for job in batch)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        self.num_batches += 1
        with torch.inference_mode():
            self.model.generate(
                input_ids, attention_mask=attention_mask, pad_token_id=pad_id, do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if all(job.request.ignore_eos for job in batch) else None,
                streamer=_ArrivalStreamer(batch, eos_ids),
                stopping_criteria=StoppingCriteriaList([_Abandoned(batch)]),
            )

    def _prompt_ids(self, request: BenchRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.messages is None:
            raise ValueError(f"request {request.index} has neither prompt_token_ids nor messages")
        return self.tokenizer.apply_chat_template(
            list(request.messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
