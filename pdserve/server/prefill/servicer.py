"""pdserve-prefill: preprocessing and prefill; streams each prompt's KV and first token.

Request lifecycle (one bidirectional Prefill call):
1. the request arrives; preprocess: sampling parameters validated, chat template
   applied, prompt tokenized (through the preprocessing cache) and checked against
   the context. This is the request's one tokenization: the decode worker takes
   the token ids from the header;
2. header sent: prompt token ids, model fingerprint, KV layout and byte count;
3. the decode worker answers with the leading tokens it holds (the skip), within
   SKIP_TIMEOUT_S;
4. queued in the engine as a one-token request that exports its KV: the
   scheduler batches it with other pending prompts (chunked to the budget);
5. as each layer's KV is computed (or at once, for a cached prefix), the engine
   thread hands it to the request's KVSender, which leaves out the skipped tokens,
   cuts the rest into numbered chunks, encodes them there and posts them to the
   stream (transfer overlaps compute);
6. the sampled first token ends the stream. A cancelled stream (the decode
   worker gave up) aborts the request, freeing its blocks within one step.

Tokenize and Detokenize (for the router's /tokenize) answer from the same
preprocessing, on the event loop, without the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future

import grpc

from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import DeadlineError, FatalError, InvalidRequestError, PdserveError
from pdserve.kv_transfer.codec import kv_chunk_response
from pdserve.kv_transfer.protocol import MAX_CHUNK_BYTES, WIRE_VERSION
from pdserve.kv_transfer.sender import KVOutbox, KVSender
from pdserve.observability import tracing
from pdserve.observability.tracing import Attr, SpanName
from pdserve.server import daemon, observe, wire
from pdserve.server.prefill.faults import FaultInjector
from pdserve.server.worker import Worker, WorkerRpcs
from pdserve.status import abort_with
from pdserve.v1 import prefill_pb2, prefill_pb2_grpc

# The decode worker's skip follows the header after one round trip and its reservation, which
# waits for its engine thread's step in progress: seconds at worst (a long local prefill).
SKIP_TIMEOUT_S = 30.0


class PrefillServicer(WorkerRpcs, prefill_pb2_grpc.PrefillServiceServicer):
    def __init__(self, worker: Worker, faults: FaultInjector | None = None,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.worker = worker
        self.faults = faults or FaultInjector.from_env()
        self.max_chunk_bytes = max_chunk_bytes  # a decode worker may ask for smaller chunks, not larger
        self._running: set[str] = set()  # ids of the prefills in progress; touched only on the event loop

    async def Prefill(self, messages, context: grpc.aio.ServicerContext):
        """`messages` is left unread: the call's messages are read one at a time (context.read)."""
        first = await context.read()
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "request":
            await abort_with(context, InvalidRequestError("request", "a Prefill call starts with the request"))
        request = first.request
        rid = request.request.request_id or uuid.uuid4().hex
        with observe.server_span(SpanName.PREFILL_REQUEST, context, {Attr.REQUEST_ID: rid,
                                                                     Attr.WORKER_ID: self.worker.worker_id}):
            async for response in self._prefill(rid, request, context):
                yield response

    def _preprocess(self, rid: str, request: prefill_pb2.PrefillRequest):
        """Sampling parameters and prompt token ids, checked against the context; in its own span."""
        w = self.worker
        cache = w.preprocessor.cache
        hits = cache.num_hits
        with tracing.span(SpanName.PREPROCESS, {Attr.PREPROCESS_TEMPLATE: request.request.HasField("messages")}):
            try:
                params = wire.sampling_from_pb(request.request.sampling_params)
                prompt = wire.prompt_ids_from_pb(request.request, w.preprocessor)
                w.loop.validate_prompt(prompt, params, request_id=rid)
            except PdserveError:
                w.metrics.inc_preprocessing_failure()
                raise
            tracing.set_attributes({Attr.PREPROCESS_CACHE_HIT: cache.num_hits > hits,
                                    Attr.USAGE_INPUT_TOKENS: len(prompt)})
        return params, prompt

    async def _prefill(self, rid: str, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        w = self.worker
        try:
            params, prompt = self._preprocess(rid, request)
            await w.compile_grammar(params, rid)
            if rid in self._running:  # one id, one prefill: a duplicate never touches the running one
                raise InvalidRequestError("request_id", f"{rid!r} is already being prefilled on this worker")
        except PdserveError as exc:
            observe.failed(w.metrics, exc)
            await abort_with(context, exc)
        self._running.add(rid)
        w.pending_prefill_tokens += len(prompt)
        finished = False
        try:
            yield prefill_pb2.PrefillResponse(header=self._header(rid, request, prompt))
            num_skipped = await self._read_skip(rid, context, len(prompt))
            submitted_ns = time.time_ns()
            submitted, sender, outbox = self._submit(rid, request, params, prompt, num_skipped)
            await asyncio.wrap_future(submitted)
            async for chunk in outbox.chunks():
                yield chunk if isinstance(chunk, bytes) else await self.faults.encode(chunk, kv_chunk_response)
            samples: list[RequestOutput] = outbox.end  # one per sample, by index
            item = samples[0]
            finished = True
            for out in samples:
                if out.error is not None or out.finish_reason == "abort" or not out.token_ids:
                    raise out.error or FatalError("prefill aborted", request_id=rid)
            first = self._first_token(rid, samples, started)
            first.timings.kv_send_ms = outbox.send_ms
            self._observe_finished(item, sender, submitted_ns, first.timings.kv_send_ms, started)
            yield prefill_pb2.PrefillResponse(first_token=first)
            daemon.log_request(role="prefill", request_id=rid, prompt_tokens=len(prompt),
                               cached_tokens=item.num_cached_tokens, kv_bytes=sender.num_bytes,
                               ms=round((time.monotonic() - started) * 1e3, 1))
        except PdserveError as exc:
            observe.failed(w.metrics, exc)
            await abort_with(context, exc)
        finally:
            self._running.discard(rid)
            w.pending_prefill_tokens -= len(prompt)
            if not finished:
                w.loop.abort(rid)

    async def _read_skip(self, rid: str, context: grpc.aio.ServicerContext, num_prompt_tokens: int) -> int:
        """The decode worker's second message: how many leading prompt tokens not to send."""
        try:
            msg = await asyncio.wait_for(context.read(), SKIP_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise DeadlineError(f"no skip within {SKIP_TIMEOUT_S:g} s of the header", request_id=rid) from None
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "skip":
            raise InvalidRequestError("skip", "a Prefill call's second message is the skip", request_id=rid)
        num_skipped = msg.skip.num_cached_tokens
        if num_skipped >= num_prompt_tokens:
            raise InvalidRequestError("skip.num_cached_tokens", f"{num_skipped} leaves none of the "
                                      f"{num_prompt_tokens}-token prompt to send", request_id=rid)
        return num_skipped

    def _submit(self, rid: str, request: prefill_pb2.PrefillRequest, params: SamplingParams,
                prompt: list[int], num_skipped: int) -> tuple[Future[None], KVSender, KVOutbox]:
        """Queue the request in the engine, its KV and outputs routed to a new outbox: (future, sender, outbox)."""
        w = self.worker
        outbox = KVOutbox(asyncio.get_running_loop())
        # Chunks are encoded on the engine thread, unless fault injection may damage them first.
        encode = kv_chunk_response if self.faults.action is None else None
        sender = KVSender(rid, w.geometry, outbox.post, self._chunk_bytes(request), encode,
                          num_skipped_tokens=num_skipped)
        # The first token is sampled here with the request's own parameters; the rest is decode's.
        first_params = dataclasses.replace(params, max_tokens=1, stop=())
        kv_sink = lambda _rid, layer, start, k, v: sender.on_kv(layer, start, k, v)  # noqa: E731
        return w.loop.submit_export(rid, prompt, first_params, _gathered(outbox.post), kv_sink), sender, outbox

    def _observe_finished(self, out: RequestOutput, sender: KVSender, submitted_ns: int, kv_send_ms: float,
                          started: float) -> None:
        """Metrics and spans of a prefill done (first token sampled, KV sent): once per request."""
        total_s = time.monotonic() - started
        self.worker.metrics.record_request("prefilled", "OK", e2e_s=total_s, ttft_s=total_s, queue_s=out.queue_s,
                                           num_prompt_tokens=out.num_prompt_tokens)
        self.worker.metrics.record_kv_transfer(kv_send_ms / 1e3, sender.num_bytes)
        self.worker.metrics.record_prefill(out.num_prompt_tokens - out.num_cached_tokens)
        if not tracing.enabled():
            return
        now_ns = time.time_ns()
        queued_ns = submitted_ns + int((out.queue_s or 0.0) * 1e9)
        tracing.record_span(SpanName.PREFILL_QUEUE, submitted_ns, queued_ns)
        tracing.record_span(SpanName.PREFILL_COMPUTE, queued_ns, now_ns, {
            Attr.USAGE_INPUT_TOKENS: out.num_prompt_tokens, Attr.NUM_CACHED_TOKENS: out.num_cached_tokens})
        tracing.record_span(SpanName.KV_SEND, now_ns - int(kv_send_ms * 1e6), now_ns, {
            Attr.KV_BYTES: sender.num_bytes, Attr.KV_CHUNKS: sender.num_chunks})

    def _chunk_bytes(self, request: prefill_pb2.PrefillRequest) -> int:
        return min(request.max_chunk_bytes or self.max_chunk_bytes, self.max_chunk_bytes)

    def _header(self, rid: str, request: prefill_pb2.PrefillRequest, prompt: list[int]) -> prefill_pb2.KVHeader:
        w = self.worker
        return prefill_pb2.KVHeader(
            wire_version=WIRE_VERSION, request_id=rid, prompt_token_ids=prompt, num_prompt_tokens=len(prompt),
            model=w.fingerprint_pb, kv_layout=w.layout_pb, num_kv_bytes=w.geometry.total_bytes(len(prompt)),
            chunk_tokens=w.geometry.chunk_tokens(self._chunk_bytes(request)), prefill_worker_id=w.worker_id)

    def _first_token(self, rid: str, samples: list[RequestOutput], started: float) -> prefill_pb2.FirstToken:
        out = samples[0]
        total_ms = (time.monotonic() - started) * 1e3
        queue_ms = (out.queue_s or 0.0) * 1e3
        first = prefill_pb2.FirstToken(
            request_id=rid, token_id=out.token_ids[0], num_cached_tokens=out.num_cached_tokens,
            timings=prefill_pb2.PrefillTimings(queue_ms=queue_ms, prefill_ms=total_ms - queue_ms, total_ms=total_ms),
            more_samples=[prefill_pb2.SampledToken(token_id=s.token_ids[0], logprobs=wire.logprobs_to_pb(
                s.logprobs[0] if s.logprobs else None)) for s in samples[1:]])
        if out.logprobs and out.logprobs[0] is not None:
            first.logprobs.CopyFrom(wire.logprobs_to_pb(out.logprobs[0]))
        if out.prompt_logprobs is not None:
            first.prompt_logprobs.extend(wire.logprobs_to_pb(lp) for lp in out.prompt_logprobs)
        return first


def _gathered(post: Callable[[list[RequestOutput]], None]) -> Callable[[RequestOutput], None]:
    """A sink that posts a request's outputs together, by sample index, once the last has come (with
    n > 1 every sample ends at its first token, in the same step)."""
    outputs: list[RequestOutput] = []

    def sink(out: RequestOutput) -> None:
        outputs.append(out)
        if out.finished:
            post(sorted(outputs, key=lambda o: o.index))

    return sink
