"""pdserve-decode: imports prompt KV from prefill workers and decodes in one continuous batch.

Request lifecycle (one Generate stream):
1. sampling parameters validated; the prompt goes remote when prefill candidates
   are given, else it is preprocessed and prefilled here;
2. remote: open the first candidate's Prefill call and send it the request, which
   the prefill worker preprocesses (the request's one tokenization). On its header,
   check the fingerprint and layout (FAILED_PRECONDITION on mismatch), look the
   header's token ids up in the prefix cache and reserve blocks for the rest
   (RESOURCE_EXHAUSTED when there is no room, before any KV moves), then tell the
   prefill worker how many leading tokens to skip. A prompt whose uncached part is
   shorter than --local-prefill-below is declined there and prefilled here from
   the header's token ids;
3. write each verified KV chunk into the reserved blocks; no chunk within
   --kv-stall-timeout-s, a dead peer or a chunk that does not check out drops the
   partial KV (its blocks freed) and the next candidate is tried after a bounded
   exponential backoff; when all fail, the prompt is preprocessed and prefilled here;
4. the first token (sampled by the prefill worker) is streamed at once, and the
   request joins the running batch;
5. each step's tokens stream back as deltas; the last message carries finish
   reason, usage and timings. Cancellation aborts the request within one step.

Tokenize and Detokenize (for the router's /tokenize when no prefill worker is up)
answer from the local path's preprocessing, on the event loop, without the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import (CapacityError, DeadlineError, IncompatibleError, InvalidRequestError, KVTransferError,
                            PdserveError, UnavailableError)
from pdserve.kv_transfer import transport as kv_transport
from pdserve.kv_transfer.grpc_stream import PrefillStub
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.observability import tracing
from pdserve.observability.tracing import Attr, SpanName
from pdserve.server import daemon, observe, streams, wire
from pdserve.server.streams import SlowReaders
from pdserve.server.worker import Worker, WorkerRpcs
from pdserve.status import abort_with
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2

log = logging.getLogger("pdserve.decode")

BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 1.0


@dataclass(frozen=True)
class DecodeOptions:
    kv_stall_timeout_s: float = 5.0
    local_prefill_below: int = 0
    slow_reader_timeout_s: float = streams.DEFAULT_TIMEOUT_S
    max_output_backlog: int = 1024  # outputs produced but not yet sent; beyond it the reader is too slow


@dataclass
class _Attempt:
    """Progress of one request's remote prefill, for timings and the result."""

    prefill_worker_id: str = ""
    num_attempts: int = 0
    kv_bytes: int = 0
    kv_transfer_ms: float = 0.0
    prefill_ms: float = 0.0
    errors: list[str] = field(default_factory=list)


class DecodeServicer(WorkerRpcs, decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, worker: Worker, options: DecodeOptions) -> None:
        self.worker = worker
        self.options = options
        self._stub = daemon.Stubs(PrefillStub)
        self.readers = SlowReaders(options.slow_reader_timeout_s, worker.metrics.inc_slow_reader_abort)
        self._active: dict[str, Callable[[PdserveError], None]] = {}  # request id -> end it with an error

    async def Generate(self, request: decode_pb2.DecodeGenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request.request_id or uuid.uuid4().hex
        attrs = {Attr.REQUEST_ID: rid, Attr.WORKER_ID: self.worker.worker_id,
                 Attr.REQUEST_MAX_TOKENS: request.request.sampling_params.max_tokens or None}
        with observe.server_span(SpanName.DECODE_REQUEST, context, attrs):
            async for response in self._generate(rid, request, context):
                yield response

    async def _generate(self, rid: str, request: decode_pb2.DecodeGenerateRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        w = self.worker
        metrics = w.metrics
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        watch = self.readers.watch(f"decode request {rid}")

        def end_with(error: PdserveError) -> None:
            """Abort the request here (its blocks freed within a step); the stream ends with `error`."""
            w.loop.abort(rid)
            queue.put_nowait(RequestOutput(rid, [], "", None, finished=True, error=error))

        def deliver(out: RequestOutput) -> None:  # on the event loop
            queue.put_nowait(out)
            if queue.qsize() > self.options.max_output_backlog:
                watch.stall(f"{queue.qsize()} outputs not sent (--max-output-backlog)")

        watch.on_stall = lambda: end_with(watch.error(rid))
        sink = lambda out: loop.call_soon_threadsafe(deliver, out)  # noqa: E731
        attempt = _Attempt()
        finished = False
        owned = rid not in self._active  # one id, one running request: a duplicate never touches it
        try:
            if not owned:
                raise InvalidRequestError("request_id", f"{rid!r} is already running on this worker")
            self._active[rid] = end_with
            params = wire.sampling_from_pb(request.request.sampling_params)
            await w.compile_grammar(params, rid)
            generated = list(request.generated_token_ids)
            remote, prompt = False, None
            if request.prefill_candidates and not generated:
                remote, prompt = await self._prefill_remotely(rid, request, params, sink, attempt, context)
            if not remote:
                if prompt is None:
                    prompt = wire.prompt_ids_from_pb(request.request, w.preprocessor)
                await asyncio.wrap_future(w.loop.submit(rid, prompt, params, sink, generated or None))
            num_sent = [len(generated)] * params.n  # completion tokens streamed, per sample
            ttft_ms = None
            decode_start_ns, last_token = time.time_ns(), 0.0
            while not finished:
                out = await queue.get()
                finished = out.finished
                if out.error is not None:
                    raise out.error
                if out.token_ids or out.text:
                    now = time.monotonic()
                    if ttft_ms is None:
                        ttft_ms = (now - started) * 1e3
                    else:
                        metrics.record_itl(now - last_token)
                    last_token = now
                    watch.sending()
                    yield wire.delta_to_pb(out, num_sent[out.index], w.preprocessor.token_bytes)
                    watch.sent()
                    num_sent[out.index] += len(out.token_ids)
                if out.finish_reason is not None:  # this sample's end (with n = 1, the request's)
                    metrics.inc_preemptions(out.num_preemptions)
                    if finished:
                        self._observe_finished(out, attempt, remote, started, ttft_ms, decode_start_ns)
                    yield self._result(rid, out, attempt, remote, started, ttft_ms)
        except PdserveError as exc:
            observe.failed(metrics, exc)
            if isinstance(exc, DeadlineError):
                metrics.inc_decode_timeout()
            await abort_with(context, exc)
        finally:
            self.readers.release(watch)
            if owned:
                self._active.pop(rid, None)
                if not finished:
                    w.loop.abort(rid)

    def evict_all(self) -> None:
        """Shutdown, at the end of the grace period: end every running request with UNAVAILABLE, which
        makes the router resume it on another decode worker (after the tokens already sent)."""
        if self._active:
            log.warning("grace period ending: %d running requests move to other decode workers", len(self._active))
        for end_with in list(self._active.values()):
            end_with(UnavailableError(f"decode worker {self.worker.worker_id} is shutting down"))

    def _observe_finished(self, out: RequestOutput, attempt: _Attempt, remote: bool, started: float,
                          ttft_ms: float | None, decode_start_ns: int) -> None:
        """Metrics and span attributes of a finished request: once per request, never per token."""
        m = self.worker.metrics
        m.record_request(out.finish_reason or "unknown", "OK", e2e_s=time.monotonic() - started,
                         ttft_s=ttft_ms / 1e3 if ttft_ms is not None else None, queue_s=out.queue_s,
                         num_prompt_tokens=out.num_prompt_tokens, num_output_tokens=out.num_output_tokens)
        if remote:
            m.record_kv_transfer(attempt.kv_transfer_ms / 1e3, attempt.kv_bytes)
        else:
            m.record_prefill(out.num_prompt_tokens - out.num_cached_tokens)
        if not tracing.enabled():
            return
        tracing.set_attributes({
            Attr.PREFILL_MODE: "remote" if remote else "local", Attr.USAGE_INPUT_TOKENS: out.num_prompt_tokens,
            Attr.USAGE_OUTPUT_TOKENS: out.num_output_tokens, Attr.RESPONSE_FINISH_REASONS: [out.finish_reason or ""],
            Attr.NUM_CACHED_TOKENS: out.num_cached_tokens, Attr.NUM_PREEMPTIONS: out.num_preemptions,
            Attr.KV_RETRIES: max(0, attempt.num_attempts - 1)})
        if not remote and out.queue_s:
            queue_ns = int(out.queue_s * 1e9)
            tracing.record_span(SpanName.DECODE_QUEUE, decode_start_ns, decode_start_ns + queue_ns)
            decode_start_ns += queue_ns
        tracing.record_span(SpanName.DECODE, decode_start_ns, time.time_ns(), {
            Attr.USAGE_OUTPUT_TOKENS: out.num_output_tokens, Attr.NUM_PREEMPTIONS: out.num_preemptions,
            Attr.RESPONSE_FINISH_REASONS: [out.finish_reason or ""]})

    # -- remote prefill -------------------------------------------------------------

    async def _prefill_remotely(self, rid, request, params: SamplingParams, sink, attempt: _Attempt,
                                context) -> tuple[bool, list[int] | None]:
        """Import the prompt's KV from the first candidate that delivers it: (True, None). (False, the
        prompt's token ids or None): prefill locally, the ids learned from a declined transfer."""
        w = self.worker
        for i, candidate in enumerate(request.prefill_candidates):
            if i:
                await asyncio.sleep(min(BACKOFF_BASE_S * 2 ** (i - 1), BACKOFF_MAX_S))
            attempt.num_attempts += 1
            attempt.prefill_worker_id = candidate.worker_id or candidate.address
            try:
                await self._pull(rid, request.request, params, candidate.address, sink, attempt, context)
                return True, None
            except kv_transport.Declined as declined:
                attempt.prefill_worker_id = w.worker_id
                return False, declined.prompt_token_ids
            except (IncompatibleError, CapacityError):
                raise
            except KVTransferError as exc:
                reason = str(exc)
                attempt.errors.append(f"{candidate.address}: {reason}")
                self.worker.metrics.inc_kv_retry()
                last = i + 1 == len(request.prefill_candidates)
                tracing.add_event("kv_transfer.retry", {Attr.KV_PEER: candidate.address, "pdserve.reason": reason,
                                                        "pdserve.next": "local prefill" if last else "next candidate"})
                log.warning("request %s: prefill from %s failed (%s); %s", rid, candidate.address, reason,
                            "prefilling locally" if last else "trying the next candidate")
                # Drop whatever KV arrived; its blocks are freed before the next attempt's reservation.
                w.loop.abort(rid)
        attempt.prefill_worker_id = w.worker_id
        return False, None

    async def _pull(self, rid, gen_request, params, address: str, sink, attempt: _Attempt, context) -> None:
        w = self.worker
        with tracing.span(SpanName.KV_RECEIVE, {Attr.REQUEST_ID: rid, Attr.KV_PEER: address},
                          kind=tracing.SpanKind.CLIENT):
            request = prefill_pb2.PrefillRequest(request=gen_request, decode_worker_id=w.worker_id)
            request.request.request_id = rid
            source = self._stub(address).open(request, timeout=context.time_remaining(),
                                              metadata=tracing.inject_metadata())
            # The prefill worker tokenizes: the header's token ids are the prompt.
            receiver = KVReceiver(rid, None, w.fingerprint, w.geometry, w.engine.dtype)

            async def reserve(prompt: list[int]) -> int:
                """Blocks reserved before any KV moves (RESOURCE_EXHAUSTED otherwise); the prefix this
                worker holds in its cache is taken from there, and the prefill worker told to skip it."""
                if self.options.local_prefill_below:  # what is left once the prefix cache is counted
                    num_cached = await asyncio.wrap_future(w.loop.num_cached_prefix_tokens(prompt))
                    if len(prompt) - num_cached < self.options.local_prefill_below:
                        raise kv_transport.Declined(prompt)
                return await asyncio.wrap_future(w.loop.reserve_remote(rid, prompt, params))

            write = lambda parts: asyncio.wrap_future(w.loop.write_kv(rid, parts))  # noqa: E731
            pulled = await kv_transport.pull(source, receiver, reserve, write, self.options.kv_stall_timeout_s)
            attempt.kv_bytes = pulled.num_bytes
            attempt.kv_transfer_ms = pulled.transfer_s * 1e3
            attempt.prefill_ms = pulled.first_token.prefill_ms
            tracing.set_attributes({Attr.KV_BYTES: pulled.num_bytes, Attr.KV_CHUNKS: pulled.num_chunks})
            first = pulled.first_token
            await asyncio.wrap_future(w.loop.complete_remote(rid, first.token_ids, sink, first.all_logprobs,
                                                             first.prompt_logprobs))

    def _result(self, rid, out: RequestOutput, attempt: _Attempt, remote: bool, started: float,
                ttft_ms: float | None):
        total_ms = (time.monotonic() - started) * 1e3
        queue_ms = (out.queue_s or 0.0) * 1e3 if not remote else 0.0
        first_ms = ttft_ms or total_ms
        timings = common_pb2.Timings(
            queue_ms=queue_ms, prefill_ms=attempt.prefill_ms if remote else first_ms - queue_ms,
            kv_transfer_ms=attempt.kv_transfer_ms, decode_ms=total_ms - first_ms, total_ms=total_ms,
            time_to_first_token_ms=first_ms)
        mode = common_pb2.PREFILL_MODE_REMOTE if remote else common_pb2.PREFILL_MODE_LOCAL
        daemon.log_request(role="decode", request_id=rid, mode="remote" if remote else "local",
                           prompt_tokens=out.num_prompt_tokens, output_tokens=out.num_output_tokens,
                           finish=out.finish_reason, attempts=attempt.num_attempts, errors=attempt.errors,
                           kv_bytes=attempt.kv_bytes, ttft_ms=round(first_ms, 1), ms=round(total_ms, 1))
        return wire.result_to_pb(out, timings, request_id=rid, prefill_worker_id=attempt.prefill_worker_id
                                 or self.worker.worker_id, decode_worker_id=self.worker.worker_id,
                                 prefill_mode=mode, num_prefill_attempts=attempt.num_attempts)
