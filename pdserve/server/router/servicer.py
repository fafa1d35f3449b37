"""pdserve-router: the client-facing front; places every request on a (prefill, decode) pair.

Request lifecycle (one RouterService.Generate stream):
1. cheap validation (sampling parameters, an input present); a request id assigned;
2. admission (`pdserve.routing.admission`): at most --max-inflight requests in the
   cluster, up to --max-queue more wait; beyond, RESOURCE_EXHAUSTED with a retry hint;
3. placement (`pdserve.routing.placement`): a decode worker by KV room and load, or
   one holding the prompt's prefix (`pdserve.routing.prefix_affinity`), and its ordered
   prefill candidates, from the load the workers report; when every
   decode worker is unhealthy for now (missed heartbeats, a restart), the request waits
   for one, at most --placement-wait-s;
4. DecodeService.Generate on the chosen worker; its stream is relayed as is,
   with the router's own queue, time-to-first-token and total times in the result;
5. a decode worker that refuses (RESOURCE_EXHAUSTED), cannot pair
   (FAILED_PRECONDITION: the pair is remembered and never chosen again) or is
   unreachable before the first token: the request is placed again elsewhere.
6. a decode worker that dies mid-generation (UNAVAILABLE after tokens went out): the
   request resumes on another decode worker with the tokens already sent
   (`generated_token_ids`), which prefills prompt + those tokens and continues from the
   next one; the client sees one stream. At most --migration-limit moves per request.
   Any other error after the first token ends the stream with its status. A decode
   worker that drains (SIGTERM) ends what it cannot finish in its grace period the same way,
   and one that freezes (missed heartbeats and a silent stream, `pdserve.routing.relays`)
   is treated as dead.
7. a client that stops reading (`pdserve.server.streams`): past --slow-reader-timeout-s
   the decode call is cancelled, freeing its blocks, and the stream ends RESOURCE_EXHAUSTED.
Workers register and heartbeat here (`pdserve.server.router.membership`); a worker that misses
heartbeats is not placed on. Tokenize and Detokenize are answered by a worker's preprocessing
(`pdserve.server.router.tokenization`).
"""

from __future__ import annotations

import array
import asyncio
import logging
import random
import time
import uuid

import grpc

from pdserve.errors import InvalidRequestError, PdserveError, UnavailableError
from pdserve.observability import tracing
from pdserve.observability.metrics import Metrics
from pdserve.observability.tracing import Attr, SpanName
from pdserve.routing.admission import Admission
from pdserve.routing.placement import Placement, Placer
from pdserve.routing.prefix_affinity import block_keys
from pdserve.routing.registry import Registry
from pdserve.routing.relays import Relays
from pdserve.routing.rollout import Rollout
from pdserve.routing.route import CallFailed, Relayed, Route, RouteLimits
from pdserve.server import daemon, observe, streams, wire
from pdserve.server.router.membership import Membership
from pdserve.server.router.tokenization import Tokenization
from pdserve.server.streams import SlowReaders
from pdserve.status import abort_with, error_from_status
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc, tokenize_pb2

log = logging.getLogger("pdserve.router")


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, registry: Registry, placer: Placer, metrics: Metrics | None = None,
                 rng: random.Random | None = None, migration_limit: int = 3, admission: Admission | None = None,
                 slow_reader_timeout_s: float = streams.DEFAULT_TIMEOUT_S, placement_wait_s: float = 5.0) -> None:
        self.registry = registry
        self.limits = RouteLimits(migration_limit=migration_limit, placement_wait_s=placement_wait_s)
        self.admission = admission or Admission()
        self.placer = placer
        self.metrics = metrics or Metrics("router")
        self.readers = SlowReaders(slow_reader_timeout_s, self.metrics.inc_slow_reader_abort)
        self.rollout = Rollout()
        self._rng = rng or random.Random()
        self._shadows: set[asyncio.Task] = set()
        self._running: set[str] = set()  # ids of the requests in flight: a duplicate id is refused
        self._decode_stub = daemon.Stubs(decode_pb2_grpc.DecodeServiceStub)
        self.membership = Membership(registry)
        self.relays = Relays(registry)
        self.tokenization = Tokenization(registry, self._rng, self._decode_stub)

    # -- worker membership (pdserve.server.router.membership) ------------------------------------

    async def Register(self, request: router_pb2.RegisterRequest, context):
        try:
            response = self.membership.register(request)
        except PdserveError as exc:
            await abort_with(context, exc)
        self.placer.forget(response.worker_id)  # a (re)started worker holds no prefix yet
        return response

    async def Heartbeat(self, request: router_pb2.HeartbeatRequest, context):
        try:
            return self.membership.heartbeat(request)
        except PdserveError as exc:
            await abort_with(context, exc)

    async def ClusterStatus(self, request, context):
        return self.membership.status()

    async def SetRollout(self, request: router_pb2.RolloutRequest, context):
        try:
            self.rollout = Rollout(dict(request.weights), request.shadow_version, request.shadow_fraction)
        except PdserveError as exc:
            await abort_with(context, exc)
        log.info("rollout: weights %s, shadow %s at %.2f", dict(request.weights) or "none",
                 request.shadow_version or "none", request.shadow_fraction)
        return router_pb2.RolloutResponse(rollout=request)

    # -- tokenization (pdserve.server.router.tokenization) ---------------------------------------

    async def Tokenize(self, request: tokenize_pb2.TokenizeRequest, context):
        try:
            return await self.tokenization.tokenize(request, context.time_remaining())
        except PdserveError as exc:
            await abort_with(context, exc)

    async def Detokenize(self, request: tokenize_pb2.DetokenizeRequest, context):
        try:
            return await self.tokenization.detokenize(request, context.time_remaining())
        except PdserveError as exc:
            await abort_with(context, exc)

    # -- requests -------------------------------------------------------------------------

    async def Generate(self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        with tracing.attach(tracing.extract_context(context.invocation_metadata())):
            watch = self.readers.watch("router request")
            try:
                async for response in self.generate(request, context.time_remaining(), watch):
                    watch.sending()
                    yield response
                    watch.sent()
            except PdserveError as exc:
                await abort_with(context, exc)
            finally:
                self.readers.release(watch)

    async def generate(self, request: common_pb2.GenerateRequest, timeout_s: float | None,
                       watch: streams.Watch | None = None):
        """One request's responses, from the decode worker that serves it, for every front (gRPC, HTTP).

        `watch`: the front's sends to its client; when the client stops reading, the decode call is
        cancelled (its blocks freed) and the stream ends with RESOURCE_EXHAUSTED.
        Raises PdserveError when it fails (counted, and marked on the request's span).
        """
        started = time.monotonic()
        request.request_id = request.request_id or uuid.uuid4().hex
        rid = request.request_id
        try:
            _validate(request)  # a bad request is told at once, never queued
            if rid in self._running:
                raise InvalidRequestError("request_id", f"{rid!r} is already in flight")
            self._running.add(rid)
            try:
                await self.admission.acquire(rid, timeout_s)
            except BaseException:
                self._running.discard(rid)
                raise
        except PdserveError as exc:
            observe.failed(self.metrics, exc)
            raise
        try:
            if timeout_s is not None:
                timeout_s -= time.monotonic() - started  # what the admission queue left of it
            async for response in self._traced(request, timeout_s, started, watch):
                yield response
        finally:
            self._running.discard(rid)
            self.admission.release()

    async def _traced(self, request: common_pb2.GenerateRequest, timeout_s: float | None, started: float,
                      watch: streams.Watch | None):
        """An admitted request, in its span: rollout version, shadow copy, placement and relay."""
        attrs = {Attr.REQUEST_ID: request.request_id, Attr.OPERATION: _operation(request),
                 Attr.REQUEST_MAX_TOKENS: request.sampling_params.max_tokens or None}
        with tracing.span(SpanName.ROUTER_REQUEST, attrs, kind=tracing.SpanKind.SERVER):
            try:
                rollout = self.rollout  # one setting for the whole request, whatever changes meanwhile
                version = rollout.choose(self._rng, request.version)
                shadow = rollout.shadow(self._rng, version)
                if shadow is not None:
                    self._start_shadow(request, shadow, timeout_s)
                async for response in self._generate(request, timeout_s, started, version, watch):
                    yield response
            except PdserveError as exc:
                observe.failed(self.metrics, exc)
                raise

    def _start_shadow(self, request: common_pb2.GenerateRequest, version: str, timeout_s: float | None) -> None:
        """A copy of the request on `version`, answers discarded (that worker's metrics count it)."""
        copy = common_pb2.GenerateRequest()
        copy.CopyFrom(request)
        copy.request_id, copy.version = f"{request.request_id}-shadow", version

        async def run() -> None:
            try:
                async for _ in self._generate(copy, timeout_s, time.monotonic(), version):
                    pass
            except PdserveError as exc:
                log.info("shadow request %s on %s failed: %s", copy.request_id, version, exc)

        task = asyncio.create_task(run())
        self._shadows.add(task)  # kept referenced until done
        task.add_done_callback(self._shadows.discard)

    async def _generate(self, request: common_pb2.GenerateRequest, timeout_s: float | None, started: float,
                        version: str | None = None, watch: streams.Watch | None = None):
        """The request's route over decode workers (`pdserve.routing.route`), each attempt a DecodeService call."""
        rid = request.request_id
        prefix_keys = block_keys(_prefix_bytes(request)) if self.placer.uses_prefixes else []
        route = Route(rid, self.placer, lambda excluded, attempt: self._place(request, prefix_keys, excluded,
                                                                              attempt, version),
                      prefix_keys=prefix_keys, version=version, resumable=request.sampling_params.n <= 1,
                      deadline=None if timeout_s is None else started + timeout_s, limits=self.limits,
                      on_retry=_log_retry, on_migrate=lambda placement, num_sent, error: self._log_migration(
                          rid, placement, num_sent, error))
        first_ms = 0.0

        async def call_decode(placement: Placement, generated: list[int]):
            nonlocal first_ms
            queue_ms = (time.monotonic() - started) * 1e3
            log.debug("request %s: %s", rid, placement.reason)
            remaining = None if timeout_s is None else timeout_s - (time.monotonic() - started)
            call = self._decode_stub(placement.decode.address).Generate(
                _decode_request(request, placement, generated), timeout=remaining, metadata=tracing.inject_metadata())
            if watch is not None:
                watch.on_stall = call.cancel  # the decode worker aborts the request and frees its blocks
            relay = None
            num_results = 0
            try:
                with self.relays.track(placement.decode.worker_id, call.cancel) as relay:
                    async for response in call:
                        relay.received()
                        if response.WhichOneof("kind") == "result":
                            _stamp(response.result, started, queue_ms, first_ms)
                            num_results += 1
                            if num_results == max(1, request.sampling_params.n):  # the request's last
                                self._observe_finished(response.result, started, first_ms)
                            yield Relayed(response, final=True)
                        else:
                            first_ms = first_ms or (time.monotonic() - started) * 1e3
                            yield Relayed(response, response.delta.token_ids)
            except asyncio.CancelledError:
                if watch is not None and watch.stalled:  # we cancelled the decode call: the reader is gone
                    raise watch.error(rid) from None
                if relay is None or not relay.lost or _task_cancelled():
                    raise
                # Relays.sweep cancelled the call: the worker stopped answering. As if it had died.
                raise CallFailed("UNAVAILABLE", UnavailableError(
                    "stopped answering (missed heartbeats, stream silent)", request_id=rid)) from None
            except grpc.aio.AioRpcError as exc:
                if watch is not None and watch.stalled:
                    raise watch.error(rid) from None
                raise CallFailed(exc.code().name, error_from_status(exc.code(), exc.details() or "")) from None
            finally:
                call.cancel()  # a no-op once it has ended; frees the decode worker when the caller left
                if watch is not None:
                    watch.on_stall = None

        async for response in route.run(call_decode):
            yield response

    def _log_migration(self, rid: str, placement: Placement, num_sent: int, error: PdserveError) -> None:
        self.metrics.inc_migration()
        tracing.add_event("decode.migrate", {Attr.PLACEMENT_DECODE_WORKER: placement.decode.worker_id,
                                             "pdserve.tokens_sent": num_sent})
        log.warning("request %s: decode %s stopped mid-generation after %d tokens (%s); resuming elsewhere",
                    rid, placement.decode.worker_id, num_sent, error)

    def _place(self, request: common_pb2.GenerateRequest, prefix_keys: list[int], excluded: set[str],
               attempt: int, version: str | None) -> Placement:
        with tracing.span(SpanName.PLACEMENT, {Attr.PLACEMENT_ATTEMPT: attempt, "pdserve.version": version}):
            placement = self.placer.place(_estimate_tokens(request), exclude_decode=excluded, version=version,
                                          prefix_keys=prefix_keys)
            tracing.set_attributes({
                Attr.PLACEMENT_DECODE_WORKER: placement.decode.worker_id, Attr.PLACEMENT_REASON: placement.reason,
                Attr.PLACEMENT_PREFILL_CANDIDATES: [w.worker_id for w in placement.prefills]})
            return placement

    def _observe_finished(self, result: common_pb2.GenerateResult, started: float, first_ms: float) -> None:
        finish = common_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_").lower()
        self.metrics.record_request(finish, "OK", e2e_s=time.monotonic() - started,
                                    ttft_s=first_ms / 1e3 if first_ms else None,
                                    num_prompt_tokens=result.usage.prompt_tokens,
                                    num_output_tokens=result.usage.completion_tokens)
        tracing.set_attributes({Attr.USAGE_INPUT_TOKENS: result.usage.prompt_tokens,
                                Attr.USAGE_OUTPUT_TOKENS: result.usage.completion_tokens,
                                Attr.RESPONSE_FINISH_REASONS: [finish]})


def _log_retry(placement: Placement, code: str, error: PdserveError) -> None:
    decode = placement.decode
    tracing.add_event("placement.retry", {Attr.PLACEMENT_DECODE_WORKER: decode.worker_id, "pdserve.status_code": code})
    log.warning("decode %s failed before the first token (%s: %s); placing elsewhere", decode.worker_id, code, error)


def _task_cancelled() -> bool:
    """Whether the running task itself is being cancelled (Python 3.11+ can tell; 3.10 cannot)."""
    task = asyncio.current_task()
    return task is not None and getattr(task, "cancelling", lambda: 0)() > 0


def _validate(request: common_pb2.GenerateRequest) -> None:
    """The checks the router can make without the tokenizer (the workers make the rest)."""
    wire.sampling_from_pb(request.sampling_params)
    if request.WhichOneof("input") is None:
        raise InvalidRequestError("prompt", "give one of prompt, messages, prompt_token_ids")


def _decode_request(request: common_pb2.GenerateRequest, placement: Placement,
                    generated: list[int]) -> decode_pb2.DecodeGenerateRequest:
    """`generated`: tokens a failed decode worker already streamed; the new one resumes after them."""
    candidates = [decode_pb2.PrefillCandidate(worker_id=w.worker_id, address=w.address) for w in placement.prefills]
    if generated and request.sampling_params.HasField("prompt_logprobs"):  # the client has them already
        resumed = common_pb2.GenerateRequest()
        resumed.CopyFrom(request)
        resumed.sampling_params.ClearField("prompt_logprobs")
        request = resumed
    return decode_pb2.DecodeGenerateRequest(request=request, prefill_candidates=candidates,
                                            generated_token_ids=generated)


def _stamp(result: common_pb2.GenerateResult, started: float, queue_ms: float, first_ms: float) -> None:
    """The router's own view of the request's times (the client's clock is closest to it)."""
    result.timings.total_ms = (time.monotonic() - started) * 1e3
    result.timings.queue_ms += queue_ms
    if first_ms:
        result.timings.time_to_first_token_ms = first_ms


def _operation(request: common_pb2.GenerateRequest) -> str:
    return "chat" if request.WhichOneof("input") == "messages" else "text_completion"


def _prefix_bytes(request: common_pb2.GenerateRequest) -> bytes:
    """The request's input as bytes, each earlier turn of a conversation a prefix of the next's."""
    kind = request.WhichOneof("input")
    if kind == "prompt_token_ids":
        return array.array("I", request.prompt_token_ids.token_ids).tobytes()
    if kind == "messages":
        return b"".join(f"{m.role}\n{m.content}\x1e".encode() for m in request.messages.messages)
    return request.prompt.encode()


def _estimate_tokens(request: common_pb2.GenerateRequest) -> int:
    kind = request.WhichOneof("input")
    if kind == "prompt_token_ids":
        return len(request.prompt_token_ids.token_ids)
    if kind == "messages":
        return sum(len(m.content) for m in request.messages.messages) // 4 + 8 * len(request.messages.messages)
    return len(request.prompt) // 4 + 1
