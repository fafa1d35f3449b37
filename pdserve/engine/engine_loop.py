"""The engine thread: the one owner of an LLMEngine, and the thread-safe door to it.

Callers (a CLI, gRPC handlers on an asyncio loop) never touch the engine: they
call the typed commands below, each queued to the engine thread and answered
through a future, and receive each request's outputs through a sink.
1. Requests: submit() a prompt to prefill and decode here; submit_export() one
   whose KV goes to a per-request KV sink as it is computed (a prefill worker's);
   reserve_remote(), write_kv() and complete_remote() import a prompt's KV
   computed elsewhere and start decoding it (a decode worker's). Outputs flow to
   the request's sink (a queue.Queue for threads, an asyncio.Queue fed with
   call_soon_threadsafe for the event loop), on the engine thread.
2. The thread drains the inbox, runs one step, dispatches outputs, publishes a
   `snapshot` of the engine's state, repeats; with no work it blocks on the inbox
   (no polling). Reading `snapshot` never waits for the thread.
3. abort() and a caller leaving an iterator early free the request's blocks
   within one step. validate_prompt() reads only what never changes: any thread.
   call(fn) runs fn(engine) on the thread, for tests and tools.
4. `nice` lowers the engine thread's (and its torch threads') OS priority below the
   caller's threads: in a daemon, KV and tokens in flight on the event loop go
   before compute. On one core a 1024-token KV transfer measured 45 ms at equal
   priority and 20-23 ms at nice 10 (bench/kv_transfer.py), the bare transport 9-15 ms.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from pdserve.engine.engine import EngineSnapshot, KVExportSink, LLMEngine
from pdserve.engine.models.llama import LayerHook
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import FatalError

log = logging.getLogger(__name__)

T = TypeVar("T")
Sink = Callable[[RequestOutput], None]
_STOP = object()


class EngineLoop:
    def __init__(self, engine: LLMEngine, layer_hook: LayerHook | None = None, nice: int = 0) -> None:
        self.engine = engine
        self.layer_hook = layer_hook
        self.nice = nice
        # The engine's state after its last step or batch of commands (one reference swap).
        self.snapshot: EngineSnapshot = engine.snapshot()
        # Called on the engine thread once, if the engine breaks (a daemon then stops: it cannot serve).
        self.on_failure: Callable[[BaseException], None] | None = None
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._kv_sinks: dict[str, KVExportSink] = {}  # requests whose KV is exported, by id
        engine.kv_export_sink = self._export_kv
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._failed: BaseException | None = None
        self._compiler = ThreadPoolExecutor(2, thread_name_prefix="pdserve-grammar")

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)
        self._compiler.shutdown(wait=False, cancel_futures=True)

    # -- commands (any thread) ---------------------------------------------------

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run fn(engine) on the engine thread; the future holds its result or error."""
        future: Future[T] = Future()
        if self._failed is not None:
            future.set_exception(FatalError(f"engine thread died: {self._failed!r}"))
            return future
        self._inbox.put((fn, future))
        return future

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: Sink,
               output_token_ids: list[int] | None = None) -> Future[None]:
        """Prefill and decode a request here; output_token_ids resumes one that began elsewhere."""
        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt_token_ids, params, output_token_ids)
            self._sinks[request_id] = sink

        return self.call(add)

    def submit_export(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: Sink,
                      kv_sink: KVExportSink) -> Future[None]:
        """Prefill a request whose KV (cached prefix included) goes to kv_sink, on this thread, as
        each layer computes; outputs go to sink as for submit()."""
        def add(engine: LLMEngine) -> None:
            engine.add_request(request_id, prompt_token_ids, params, export_kv=True)
            self._sinks[request_id] = sink
            self._kv_sinks[request_id] = kv_sink

        return self.call(add)

    def num_cached_prefix_tokens(self, prompt_token_ids: list[int]) -> Future[int]:
        """How many leading tokens of the prompt the prefix cache holds now (nothing reserved)."""
        return self.call(lambda engine: engine.num_cached_prefix_tokens(prompt_token_ids))

    def reserve_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Future[int]:
        """Reserve blocks for a prompt whose KV comes from elsewhere (CapacityError: no room); the
        future holds the leading tokens found in the prefix cache, whose KV is not to be written."""
        return self.call(lambda engine: engine.add_remote_request(request_id, prompt_token_ids, params))

    def write_kv(self, request_id: str, parts: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> Future[None]:
        """Write a reserved request's KV: (layer, start, k, v) per layer, k/v [Hkv, T, D]."""
        def write(engine: LLMEngine) -> None:
            for layer, start, k, v in parts:
                engine.write_kv(request_id, layer, start, k, v)

        return self.call(write)

    def complete_remote(self, request_id: str, first_token_ids: list[int], sink: Sink,
                        logprobs: list[TokenLogprobs | None] | None = None,
                        prompt_logprobs: list[TokenLogprobs | None] | None = None) -> Future[None]:
        """A reserved request's KV is all written and its first tokens (one per sample) sampled
        elsewhere: decode it here, its outputs (those first tokens first) to sink."""
        def complete(engine: LLMEngine) -> None:
            self._sinks[request_id] = sink
            engine.complete_remote_kv(request_id, first_token_ids, logprobs, prompt_logprobs)

        return self.call(complete)

    def abort(self, request_id: str) -> None:
        self.call(lambda engine: engine.abort_request(request_id))

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams, *,
                        request_id: str | None = None) -> None:
        """InvalidRequestError/CapacityError for a prompt this engine can never serve; any thread
        (it reads only the model's and the cache's sizes)."""
        self.engine.validate_prompt(prompt_token_ids, params, request_id=request_id)

    def compile_grammar(self, params: SamplingParams) -> Future[None]:
        """Compile the request's structured output (if any) into the engine's grammar cache, on a
        compile thread: a heavy schema never holds the engine thread. The future raises
        InvalidRequestError for a spec that does not compile; the caller bounds the wait."""
        spec = params.structured_output
        if spec is None:
            future: Future[None] = Future()
            future.set_result(None)
            return future
        return self._compiler.submit(self.engine.grammars.compile, spec)

    def refresh_snapshot(self) -> Future[EngineSnapshot]:
        """`snapshot` as of every command queued before this one."""
        def refresh(engine: LLMEngine) -> EngineSnapshot:
            self.snapshot = engine.snapshot()
            return self.snapshot

        return self.call(refresh)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 timeout: float | None = None) -> Iterator[RequestOutput]:
        """Outputs of one request, for a calling thread; leaving early aborts it."""
        outputs: queue.Queue[RequestOutput] = queue.Queue()
        self.submit(request_id, prompt_token_ids, params, outputs.put).result(timeout)
        finished = False
        try:
            while not finished:
                out = outputs.get(timeout=timeout)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    async def agenerate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                        output_token_ids: list[int] | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, for an asyncio task; cancellation aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        sink = lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)  # noqa: E731
        await asyncio.wrap_future(self.submit(request_id, prompt_token_ids, params, sink, output_token_ids))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        if self.nice:
            try:  # Linux: a thread's own nice value, inherited by the torch threads it starts
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
            except (AttributeError, OSError) as exc:
                log.warning("engine thread priority unchanged: %s", exc)
        try:
            while True:
                block = not self.engine.has_work()
                if not self._drain(block):
                    return
                if self.engine.has_work():
                    self._dispatch(self.engine.step(self.layer_hook))
                # After a step, and after commands (an abort while idle).
                self.snapshot = self.engine.snapshot()
        except BaseException as exc:  # the engine is broken: fail every request, loudly
            log.exception("engine thread died")
            self._failed = exc
            self._fail_all(exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    def _drain(self, block: bool) -> bool:
        """Run queued commands; wait for one first if block. False on stop."""
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # a bad command fails its caller, not the engine
                    future.set_exception(exc)
            self._dispatch(self.engine.step_outputs())
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _export_kv(self, request_id: str, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        kv_sink = self._kv_sinks.get(request_id)
        if kv_sink is not None:
            kv_sink(request_id, layer, start, k, v)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if out.finished:
                self._sinks.pop(out.request_id, None)
                self._kv_sinks.pop(out.request_id, None)
            if sink is not None:
                sink(out)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            sink(RequestOutput(request_id, [], "", None, finished=True, finish_reason="abort",
                               error=FatalError(f"engine failed: {exc!r}")))
        self._sinks.clear()
        self._kv_sinks.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item[1].set_exception(FatalError(f"engine failed: {exc!r}"))
