"""The client SDK against an in-process fake router (and decode daemon) on port 0.

The fake streams canned deltas and a result, records every request it gets,
aborts with the status of a chosen pdserve exception, and records when a call
ends before it finished (the client cancelled it or its deadline passed).
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest

from pdserve.client import AsyncClient, ChatMessage, Client, Completion, TokenLogprob, WorkerInfo, WorkerStats
from pdserve.errors import (
    CancelledError,
    CapacityError,
    DeadlineError,
    FatalError,
    IncompatibleError,
    InvalidRequestError,
    KVTransferError,
    NotFoundError,
    PdserveError,
    UnavailableError,
)
from pdserve.status import status_code
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc

# Prompts that pick the fake's behaviour.
HANG = "hang"  # one delta, then nothing until the call ends
SLOW = "slow"  # nothing until the call ends
FAIL = "fail"  # aborts with FakeServer.error
FAIL_LATE = "fail-late"  # one delta, then aborts with FakeServer.error
SAMPLES = "samples"  # two samples, interleaved, with prompt logprobs and token bytes (_samples_stream)
MISSING = "missing"  # two samples' deltas, but only sample 1's result

CANCEL_WAIT_S = 1.0


def _logprobs_pb(token_id: int) -> common_pb2.TokenLogprobs:
    chosen = common_pb2.TokenLogprob(token_id=token_id, logprob=-0.5)
    return common_pb2.TokenLogprobs(chosen=chosen, top=[chosen, common_pb2.TokenLogprob(token_id=99, logprob=-1.5)])


def _canned_stream(request_id: str, logprobs: bool) -> list[common_pb2.GenerateResponse]:
    """Two deltas ("Hel" [11], "lo!" [12, 13]), then a result with every field set."""
    deltas = [common_pb2.TokenDelta(token_ids=ids, text=text, completion_index=index,
                                    logprobs=[_logprobs_pb(t) for t in ids] if logprobs else [])
              for index, ids, text in ((0, [11], "Hel"), (1, [12, 13], "lo!"))]
    result = common_pb2.GenerateResult(
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3, cached_prompt_tokens=2),
        timings=common_pb2.Timings(queue_ms=1.5, prefill_ms=2.5, kv_transfer_ms=3.5, decode_ms=4.5,
                                   total_ms=12.0, time_to_first_token_ms=6.0),
        prefill_worker_id="p0", decode_worker_id="d0", prefill_mode=common_pb2.PREFILL_MODE_REMOTE,
        request_id=request_id or "router-assigned", num_prefill_attempts=1, stop_token_id=2)
    return [common_pb2.GenerateResponse(delta=d) for d in deltas] + [common_pb2.GenerateResponse(result=result)]


def _samples_stream(request_id: str) -> list[common_pb2.GenerateResponse]:
    """n = 2 as a router streams it: sample 0's first delta (with the prompt's 3 tokens' logprobs,
    the first empty), sample 1's, sample 1's result, sample 0's second delta, sample 0's result."""
    def lp(token_id: int, token_bytes: bytes) -> common_pb2.TokenLogprobs:
        chosen = common_pb2.TokenLogprob(token_id=token_id, logprob=-0.5, token_bytes=token_bytes)
        return common_pb2.TokenLogprobs(chosen=chosen, top=[chosen])

    prompt = [common_pb2.TokenLogprobs(), lp(21, b" wor"), lp(22, b"ld")]
    deltas = [common_pb2.TokenDelta(token_ids=[11], text="A", logprobs=[lp(11, b"A")], index=0,
                                    prompt_logprobs=prompt),
              common_pb2.TokenDelta(token_ids=[12, 13], text="\u00e9", logprobs=[lp(12, b"\xc3"), lp(13, b"\xa9")],
                                    index=1),
              common_pb2.TokenDelta(token_ids=[14], text="B", logprobs=[lp(14, b"B")], index=0, completion_index=1)]
    results = [common_pb2.GenerateResult(finish_reason=reason, request_id=request_id or "router-assigned",
                                         usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=count), index=i)
               for i, reason, count in ((1, common_pb2.FINISH_REASON_STOP, 2), (0, common_pb2.FINISH_REASON_LENGTH, 2))]
    d = [common_pb2.GenerateResponse(delta=x) for x in deltas]
    r = [common_pb2.GenerateResponse(result=x) for x in results]
    return [d[0], d[1], r[0], d[2], r[1]]


@dataclass
class FakeServer:
    """State shared by the fake servicers and the tests (guarded by the GIL: appends and sets)."""

    address: str = ""
    requests: list[common_pb2.GenerateRequest] = field(default_factory=list)
    decode_requests: list[decode_pb2.DecodeGenerateRequest] = field(default_factory=list)
    error: BaseException | None = None
    # Set when a call ended before its handler finished the stream (the client
    # cancelled it or its deadline passed).
    interrupted: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        self.requests.clear()
        self.decode_requests.clear()
        self.error = None
        self.interrupted = threading.Event()

    def stream(self, request: common_pb2.GenerateRequest,
               context: grpc.ServicerContext) -> Iterator[common_pb2.GenerateResponse]:
        # The callback, not the handler, records the interruption: once a call
        # is cancelled, grpc stops resuming the handler's generator.
        finished, ended, interrupted = threading.Event(), threading.Event(), self.interrupted

        def on_end() -> None:
            ended.set()
            if not finished.is_set():
                interrupted.set()

        context.add_callback(on_end)
        canned = _canned_stream(request.request_id, request.sampling_params.HasField("logprobs"))
        if request.prompt in (SAMPLES, MISSING):
            canned = _samples_stream(request.request_id)
            canned = canned[:-1] if request.prompt == MISSING else canned
        if request.prompt in (HANG, FAIL_LATE):
            yield canned[0]
        if request.prompt in (FAIL, FAIL_LATE):
            assert self.error is not None
            finished.set()
            context.abort(status_code(self.error), str(self.error))
        if request.prompt in (HANG, SLOW):
            ended.wait(timeout=5.0)
            return
        yield from canned
        finished.set()


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, state: FakeServer) -> None:
        self.state = state

    def Generate(self, request: common_pb2.GenerateRequest,  # noqa: N802 (gRPC method name)
                 context: grpc.ServicerContext) -> Iterator[common_pb2.GenerateResponse]:
        self.state.requests.append(request)
        yield from self.state.stream(request, context)

    def ClusterStatus(self, request: router_pb2.ClusterStatusRequest,  # noqa: N802
                      context: grpc.ServicerContext) -> router_pb2.ClusterStatusResponse:
        load = common_pb2.WorkerLoad(num_running_requests=3, num_waiting_requests=1,
                                     num_pending_prefill_tokens=40,
                                     kv=common_pb2.KVStats(block_size=16, num_total=10, num_free=6,
                                                           num_used=4, num_cached=2,
                                                           prefix_cache_hit_rate=0.25))
        worker = router_pb2.WorkerStatus(
            worker_id="d0", role=common_pb2.WORKER_ROLE_DECODE, address="127.0.0.1:1",
            health=router_pb2.WORKER_HEALTH_DRAINING, load=load,
            model=common_pb2.ModelFingerprint(architecture="LlamaForCausalLM", dtype="float32",
                                              weights_digest="abc"),
            preprocessing_version="pp1",
            kv_layout=common_pb2.KVLayout(num_layers=2, num_kv_heads=4, head_dim=8, dtype="float32"),
            last_heartbeat_age_ms=12.5)
        return router_pb2.ClusterStatusResponse(workers=[worker])


class FakeDecode(decode_pb2_grpc.DecodeServiceServicer):
    def __init__(self, state: FakeServer) -> None:
        self.state = state

    def Generate(self, request: decode_pb2.DecodeGenerateRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> Iterator[common_pb2.GenerateResponse]:
        self.state.decode_requests.append(request)
        yield from self.state.stream(request.request, context)

    def Stats(self, request: common_pb2.StatsRequest,  # noqa: N802
              context: grpc.ServicerContext) -> common_pb2.StatsResponse:
        return common_pb2.StatsResponse(
            worker_id="d0", role=common_pb2.WORKER_ROLE_DECODE,
            load=common_pb2.WorkerLoad(num_running_requests=1, kv=common_pb2.KVStats(num_total=8)))


@pytest.fixture(scope="module")
def server_state() -> Iterator[FakeServer]:
    threads_before = set(threading.enumerate())
    state = FakeServer()
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-router")
    server = grpc.server(executor)
    router_pb2_grpc.add_RouterServiceServicer_to_server(FakeRouter(state), server)
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(FakeDecode(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    state.address = f"127.0.0.1:{port}"
    try:
        yield state
    finally:
        server.stop(grace=0).wait()
        executor.shutdown(wait=True)
        _assert_no_threads_left(threads_before)


def _assert_no_threads_left(threads_before: set[threading.Thread]) -> None:
    # grpc's threads (server polling, the asyncio poller) end once the last
    # server, channel and call is gone; calls held by reference cycles (an
    # exception's traceback) keep them alive until a collection.
    # pytest-timeout's per-test timer thread (thread mode) is the runner's, not a leak.
    gc.collect()
    new = lambda: [t for t in set(threading.enumerate()) - threads_before  # noqa: E731
                   if not t.name.startswith("pytest_timeout ")]
    for thread in new():
        thread.join(timeout=2.0)
    assert [t.name for t in new()] == []


@pytest.fixture
def fake(server_state: FakeServer) -> FakeServer:
    server_state.reset()
    return server_state


@pytest.fixture
def client(fake: FakeServer) -> Iterator[Client]:
    with Client(fake.address, timeout=5.0) as c:
        yield c


def _check_completion_fields(completion: Completion) -> None:
    assert completion.text == "Hello!"
    assert completion.token_ids == [11, 12, 13]
    assert completion.finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens,
            completion.usage.cached_prompt_tokens) == (5, 3, 2)
    t = completion.timings
    assert (t.queue_ms, t.prefill_ms, t.kv_transfer_ms, t.decode_ms, t.total_ms,
            t.time_to_first_token_ms) == (1.5, 2.5, 3.5, 4.5, 12.0, 6.0)
    assert (completion.prefill_worker_id, completion.decode_worker_id) == ("p0", "d0")
    assert completion.prefill_mode == "remote"
    assert (completion.stop_token_id, completion.stop_string) == (2, None)


def test_sync_generate_streams_deltas_and_keeps_the_result(client: Client) -> None:
    stream = client.generate("hello", request_id="r1")
    deltas = list(stream)
    assert [(d.text, d.token_ids, d.logprobs) for d in deltas] == [("Hel", [11], None), ("lo!", [12, 13], None)]
    assert stream.result is not None
    assert stream.result.request_id == "r1"
    assert stream.result.usage.completion_tokens == 3


def test_sync_complete_round_trips_everything(client: Client) -> None:
    completion = client.complete("hello", request_id="r2", logprobs=1)
    _check_completion_fields(completion)
    assert completion.request_id == "r2"
    assert completion.logprobs is not None and len(completion.logprobs) == 3
    assert completion.logprobs[0] == TokenLogprob(
        11, -0.5, top=[TokenLogprob(11, -0.5), TokenLogprob(99, -1.5)])


def test_async_generate_and_complete_round_trip(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.address, timeout=5.0) as client:
            stream = client.generate("hello")
            deltas = [d async for d in stream]
            assert [d.text for d in deltas] == ["Hel", "lo!"]
            assert stream.result is not None and stream.result.request_id == "router-assigned"
            completion = await client.complete("hello")
            _check_completion_fields(completion)
            assert completion.logprobs is None

    asyncio.run(main())


def test_request_sets_given_sampling_fields_and_omits_seed_and_logprobs(fake: FakeServer,
                                                                        client: Client) -> None:
    client.complete(messages=[{"role": "system", "content": "Be brief."}, ChatMessage("user", "Hi")],
                    max_tokens=7, temperature=0.0, top_k=5, stop="END", stop_token_ids=[2])
    params = fake.requests[0].sampling_params
    assert not params.HasField("seed") and not params.HasField("logprobs")
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p) == (7, 0.0, 5, 1.0)
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "ignore_eos"):
        assert params.HasField(name), name
    assert list(params.stop) == ["END"] and list(params.stop_token_ids) == [2]
    assert [(m.role, m.content) for m in fake.requests[0].messages.messages] == [
        ("system", "Be brief."), ("user", "Hi")]
    assert fake.requests[0].request_id == ""


def test_request_sets_seed_and_logprobs_when_given(fake: FakeServer, client: Client) -> None:
    client.complete(prompt_token_ids=[1, 2, 3], seed=0, logprobs=0)
    request = fake.requests[0]
    assert list(request.prompt_token_ids.token_ids) == [1, 2, 3]
    assert request.sampling_params.HasField("seed") and request.sampling_params.seed == 0
    assert request.sampling_params.HasField("logprobs") and request.sampling_params.logprobs == 0


def test_bad_arguments_fail_before_any_call(fake: FakeServer, client: Client) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.generate("a", prompt_token_ids=[1])
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        client.generate("a", max_tokens=-1)
    assert info.value.field == "max_tokens"
    with pytest.raises(InvalidRequestError) as info:
        client.generate(messages=[{"role": "user"}])
    assert info.value.field == "messages[0]"
    assert fake.requests == []


ERRORS: list[tuple[BaseException, type[PdserveError]]] = [
    (InvalidRequestError("temperature", "must be >= 0, got -1", request_id="r5"), InvalidRequestError),
    (CapacityError("no KV room"), CapacityError),
    (IncompatibleError("fingerprint differs"), IncompatibleError),
    (KVTransferError("prefill died"), UnavailableError),
    (UnavailableError("no decode worker"), UnavailableError),
    (DeadlineError("too slow"), DeadlineError),
    (CancelledError("operator"), CancelledError),
    (NotFoundError("no such request"), NotFoundError),
    (FatalError("bug"), FatalError),
    (ValueError("plain bug"), FatalError),
]


@pytest.mark.parametrize(("error", "expected"), ERRORS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("prompt", [FAIL, FAIL_LATE])
def test_statuses_map_to_pdserve_exceptions(fake: FakeServer, client: Client, error: BaseException,
                                            expected: type[PdserveError], prompt: str) -> None:
    fake.error = error
    stream = client.generate(prompt)
    if prompt == FAIL_LATE:
        assert next(stream).text == "Hel"
    with pytest.raises(expected) as info:
        next(stream)
    assert type(info.value) is expected
    assert str(info.value) == str(error)
    if isinstance(error, InvalidRequestError):
        assert (info.value.field, info.value.request_id) == ("temperature", "r5")
    assert list(stream) == []  # a failed stream is over


@pytest.mark.parametrize(("error", "expected"), ERRORS[:3], ids=lambda v: type(v).__name__)
def test_async_statuses_map_to_pdserve_exceptions(fake: FakeServer, error: BaseException,
                                                  expected: type[PdserveError]) -> None:
    fake.error = error

    async def main() -> None:
        async with AsyncClient(fake.address) as client:
            with pytest.raises(expected) as info:
                await client.complete(FAIL)
            assert str(info.value) == str(error)

    asyncio.run(main())


def test_breaking_out_of_the_sync_iterator_cancels_the_call(fake: FakeServer, client: Client) -> None:
    for delta in client.generate(HANG):
        assert delta.text == "Hel"
        break
    assert fake.interrupted.wait(CANCEL_WAIT_S)


def test_closing_a_sync_stream_cancels_the_call(fake: FakeServer, client: Client) -> None:
    stream = client.generate(HANG)
    next(stream)
    stream.close()
    assert fake.interrupted.wait(CANCEL_WAIT_S)
    assert list(stream) == []


def test_an_exception_in_the_callers_loop_cancels_the_call(fake: FakeServer, client: Client) -> None:
    with pytest.raises(RuntimeError):
        for _ in client.generate(HANG):
            raise RuntimeError("caller gave up")
    assert fake.interrupted.wait(CANCEL_WAIT_S)


def test_cancelling_an_async_task_cancels_the_call(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.address) as client:
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in client.generate(HANG):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 5.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await asyncio.to_thread(fake.interrupted.wait, CANCEL_WAIT_S)

    asyncio.run(main())


def test_breaking_out_of_an_async_iterator_cancels_the_call(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.address) as client:
            async for _ in client.generate(HANG):
                break
            assert await asyncio.to_thread(fake.interrupted.wait, CANCEL_WAIT_S)

    asyncio.run(main())


def test_timeout_raises_deadline_error(fake: FakeServer, client: Client) -> None:
    with pytest.raises(DeadlineError):
        client.complete(SLOW, timeout=0.2)
    assert fake.interrupted.wait(CANCEL_WAIT_S)


def test_async_timeout_raises_deadline_error(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.address, timeout=0.2) as client:
            with pytest.raises(DeadlineError):
                await client.complete(SLOW)

    asyncio.run(main())


def test_decode_service_wraps_the_request_without_candidates(fake: FakeServer) -> None:
    with Client(fake.address, service="decode") as client:
        completion = client.complete("hello", temperature=0.0)
        stats = client.stats()
    request = fake.decode_requests[0]
    assert list(request.prefill_candidates) == [] and list(request.generated_token_ids) == []
    assert request.request.request_id  # a decode daemon expects a named request
    assert completion.request_id == request.request.request_id
    assert stats == WorkerStats(worker_id="d0", role="decode", load=stats.load)
    assert (stats.load.num_running_requests, stats.load.kv.num_total) == (1, 8)


def test_cluster_status_returns_plain_worker_info(fake: FakeServer, client: Client) -> None:
    (worker,) = client.cluster_status()
    assert (worker.worker_id, worker.role, worker.health, worker.address) == (
        "d0", "decode", "draining", "127.0.0.1:1")
    assert worker.model_fingerprint == "LlamaForCausalLM/float32/abc"
    assert worker.preprocessing_version == "pp1"
    assert worker.kv_layout == "layers=2 kv_heads=4 head_dim=8 dtype=float32"
    assert worker.last_heartbeat_age_ms == 12.5
    load = worker.load
    assert (load.num_running_requests, load.num_waiting_requests, load.num_pending_prefill_tokens) == (3, 1, 40)
    assert (load.kv.num_free, load.kv.num_used, load.kv.prefix_cache_hit_rate) == (6, 4, 0.25)


def test_async_cluster_status(fake: FakeServer) -> None:
    async def main() -> list[WorkerInfo]:
        async with AsyncClient(fake.address) as client:
            return await client.cluster_status()

    assert [w.worker_id for w in asyncio.run(main())] == ["d0"]


def test_methods_the_target_lacks_are_refused(fake: FakeServer, client: Client) -> None:
    with pytest.raises(ValueError):
        client.stats()
    with Client(fake.address, service="prefill") as prefill:
        with pytest.raises(ValueError):
            prefill.generate("hello")


def test_importing_the_client_does_not_import_torch() -> None:
    code = ("import sys, pdserve.client; "
            "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- n samples, prompt logprobs, token bytes, logit bias ------------------------------------------


def _check_samples(deltas: list, results: list, completion: Completion) -> None:
    assert [(d.index, d.text) for d in deltas] == [(0, "A"), (1, "\u00e9"), (0, "B")]
    assert [(r.index, r.finish_reason, r.usage.completion_tokens) for r in results] == [
        (0, "length", 2), (1, "stop", 2)]
    assert completion.text == "AB" and completion.token_ids == [11, 14] and completion.finish_reason == "length"
    assert [(s.text, s.token_ids, s.finish_reason) for s in completion.samples] == [
        ("AB", [11, 14], "length"), ("\u00e9", [12, 13], "stop")]
    assert completion.samples[0].samples == []
    assert [lp.token_bytes for lp in completion.samples[1].logprobs] == [b"\xc3", b"\xa9"]
    prompt = completion.prompt_logprobs
    assert prompt is not None and len(prompt) == 3 and prompt[0] is None
    assert [(lp.token_id, lp.token_bytes) for lp in prompt[1:]] == [(21, b" wor"), (22, b"ld")]
    assert prompt[1].top == [TokenLogprob(21, -0.5, token_bytes=b" wor")]
    assert completion.samples[0].prompt_logprobs == prompt and completion.samples[1].prompt_logprobs is None


def test_n_samples_stream_interleaved_and_complete_keeps_each(fake: FakeServer, client: Client) -> None:
    stream = client.generate(SAMPLES, n=2, prompt_logprobs=1, logprobs=0)
    deltas = list(stream)
    assert stream.result is not None and stream.result.index == 0
    completion = client.complete(SAMPLES, n=2, prompt_logprobs=1, logprobs=0)
    _check_samples(deltas, stream.results, completion)
    params = fake.requests[0].sampling_params
    assert (params.n, params.prompt_logprobs, params.logprobs) == (2, 1, 0)


def test_async_n_samples(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.address, timeout=5.0) as client:
            stream = client.generate(SAMPLES, n=2)
            deltas = [d async for d in stream]
            _check_samples(deltas, stream.results, await client.complete(SAMPLES, n=2))

    asyncio.run(main())


def test_one_sample_has_no_samples_list(client: Client) -> None:
    completion = client.complete("hello")
    assert completion.samples == [] and completion.prompt_logprobs is None


def test_a_stream_missing_a_samples_result_is_fatal(client: Client) -> None:
    stream = client.generate(MISSING, n=2)
    with pytest.raises(FatalError):
        list(stream)
    assert [r.index for r in stream.results] == [1] and stream.result is None


def test_logit_bias_n_and_prompt_logprobs_are_sent_and_omitted_by_default(fake: FakeServer, client: Client) -> None:
    client.complete("hello", logit_bias={1000: 100, 5: -2.5}, n=3, prompt_logprobs=0)
    params = fake.requests[0].sampling_params
    assert dict(params.logit_bias) == {1000: 100.0, 5: -2.5}
    assert (params.n, params.HasField("prompt_logprobs"), params.prompt_logprobs) == (3, True, 0)
    client.complete("hello")
    params = fake.requests[1].sampling_params
    assert not params.logit_bias and not params.HasField("prompt_logprobs") and params.n == 1


@pytest.mark.parametrize("bias", [{-1: 1.0}, {"5": 1.0}, {5: "x"}, {True: 1.0}, {5: True}, [(5, 1.0)]])
def test_bad_logit_bias_fails_before_any_call(fake: FakeServer, client: Client, bias: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.generate("a", logit_bias=bias)  # type: ignore[arg-type]
    assert info.value.field == "logit_bias" and fake.requests == []


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]


@pytest.mark.parametrize(("spec", "kind", "value"), [
    ({"json_schema": SCHEMA}, "json_schema", json.dumps(SCHEMA)),
    ({"json_schema": '{"type": "object"}'}, "json_schema", '{"type": "object"}'),
    ({"json_object": True}, "json_object", True),
    ({"regex": "[a-z]+"}, "regex", "[a-z]+"),
    ({"grammar": 'start: "x"'}, "grammar", 'start: "x"'),
    ({"choice": ("yes", "no")}, "choice", ["yes", "no"]),
])
def test_structured_output_is_sent(fake: FakeServer, client: Client, spec: dict, kind: str, value: object) -> None:
    client.complete("hello", structured_output=spec)
    sent = fake.requests[0].sampling_params.structured_output
    assert sent.WhichOneof("kind") == kind
    assert (list(sent.choice.choices) if kind == "choice" else getattr(sent, kind)) == value
    client.complete("hello")
    assert not fake.requests[1].sampling_params.HasField("structured_output")


def test_async_structured_output_and_tools_are_sent(fake: FakeServer) -> None:
    async def main() -> None:
        async with AsyncClient(fake.address, timeout=5.0) as client:
            await client.complete(messages=[{"role": "user", "content": "hi"}], structured_output={"regex": "a"},
                                  tools=TOOLS)

    asyncio.run(main())
    request = fake.requests[0]
    assert request.sampling_params.structured_output.regex == "a"
    assert json.loads(request.messages.tools_json) == TOOLS and not request.messages.tools_optional


@pytest.mark.parametrize(("spec", "field"), [
    ("json", "structured_output"),
    ({}, "structured_output"),
    ({"regex": "a", "choice": ["a"]}, "structured_output"),
    ({"json": SCHEMA}, "structured_output"),
    ({"json_schema": 5}, "structured_output.json_schema"),
    ({"json_schema": {"x": {1, 2}}}, "structured_output.json_schema"),
    ({"json_object": False}, "structured_output.json_object"),
    ({"json_object": 1}, "structured_output.json_object"),
    ({"regex": ""}, "structured_output.regex"),
    ({"grammar": b"x"}, "structured_output.grammar"),
    ({"choice": "yes"}, "structured_output.choice"),
    ({"choice": []}, "structured_output.choice"),
    ({"choice": ["a", 5]}, "structured_output.choice"),
])
def test_bad_structured_output_fails_before_any_call(fake: FakeServer, client: Client, spec: object,
                                                     field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.generate("a", structured_output=spec)  # type: ignore[arg-type]
    assert info.value.field == field and fake.requests == []


@pytest.mark.parametrize("tools", ["get_weather", [TOOLS[0], "x"], [{"f": object()}]])
def test_bad_tools_fail_before_any_call(fake: FakeServer, client: Client, tools: object) -> None:
    with pytest.raises(InvalidRequestError) as info:
        client.generate(messages=[{"role": "user", "content": "hi"}], tools=tools)  # type: ignore[arg-type]
    assert info.value.field == "tools" and fake.requests == []
    with pytest.raises(InvalidRequestError) as info:
        client.generate("a prompt", tools=TOOLS)
    assert info.value.field == "tools" and fake.requests == []
