"""The synchronous client: `Client` and the `GenerateStream` its generate returns.

A stream owns one server-streaming call. Leaving it early (break, close(),
garbage collection, an exception in the caller's loop) cancels the call, so
every daemon the request reached aborts it and frees its KV blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from pdserve.client.channel import (
    CHANNEL_OPTIONS,
    CLUSTER_SERVICES,
    STATS_SERVICES,
    GenerateCalls,
    Service,
    auth_metadata,
    check_service,
    deadline,
    require,
    rpc_error,
)
from pdserve.client.convert import (
    MessageLike,
    completion_from,
    delta_from_pb,
    request_pb,
    result_from_pb,
    stats_from_pb,
    worker_from_pb,
)
from pdserve.client.types import Completion, Delta, GenerationResult, WorkerInfo, WorkerStats
from pdserve.errors import FatalError, InvalidRequestError
from pdserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc, router_pb2, router_pb2_grpc, tokenize_pb2


class StreamResults:
    """The GenerationResults a generate stream has read, one per sample (n > 1 streams several)."""

    def __init__(self) -> None:
        self._results: dict[int, GenerationResult] = {}

    @property
    def results(self) -> list[GenerationResult]:
        """Every sample's result read so far, by index (all n once the stream has ended)."""
        return [self._results[index] for index in sorted(self._results)]

    @property
    def result(self) -> GenerationResult | None:
        """Sample 0's result (the only one with n = 1); None before it came, or if the call failed."""
        return self._results.get(0)

    def _keep(self, pb: common_pb2.GenerateResult) -> None:
        result = result_from_pb(pb)
        self._results[result.index] = result

    def _check_ended(self) -> None:
        """At the end of the call: a result for each of samples 0 .. n - 1, or FatalError."""
        if not self._results or sorted(self._results) != list(range(len(self._results))):
            raise FatalError(f"the generate stream ended with results for samples {sorted(self._results)}, "
                             "not one for each of 0 .. n - 1")


class GenerateStream(StreamResults, Iterator[Delta]):
    """Iterates the deltas of one generate call (with n > 1 every sample's, interleaved;
    `Delta.index` tells them apart); `.results` holds each sample's GenerationResult and
    `.result` sample 0's once they came (None before, or if the call failed)."""

    def __init__(self, call: grpc.Call) -> None:
        super().__init__()
        self._call = call
        self._done = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Delta:
        while not self._done:
            response = self._read()
            if response is None:
                self._done = True
                self._check_ended()
                break
            kind = response.WhichOneof("kind")
            if kind == "delta":
                return delta_from_pb(response.delta)
            if kind == "result":
                # Keep reading: other samples' deltas, or the stream's end (and its status), come next.
                self._keep(response.result)
        raise StopIteration

    def close(self) -> None:
        """Cancels the call if it is still running; idempotent."""
        if not self._done:
            self._done = True
            self._call.cancel()

    cancel = close

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned stream must not keep the request running on the servers.
        if getattr(self, "_call", None) is not None:
            self.close()

    def _read(self) -> common_pb2.GenerateResponse | None:
        try:
            return next(self._call)  # type: ignore[call-overload]  # the call is an iterator
        except StopIteration:
            return None
        except grpc.RpcError as exc:
            self._done = True
            raise rpc_error(exc) from None


class Client(GenerateCalls[GenerateStream]):
    """Blocking client of a RouterService (default) or, for tests and operators,
    of one daemon's DecodeService ("decode") or PrefillService ("prefill": stats and tokenization)."""

    _stream = GenerateStream

    def __init__(self, address: str, *, timeout: float | None = None, service: Service = "router",
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self._metadata = auth_metadata(api_key)
        self.service = check_service(service)
        self._timeout = timeout
        # credentials: TLS, e.g. grpc.ssl_channel_credentials(ca, key, cert) for a cluster with --tls-ca.
        self._channel = (grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials
                         else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        self._router = router_pb2_grpc.RouterServiceStub(self._channel)
        self._decode = decode_pb2_grpc.DecodeServiceStub(self._channel)
        self._prefill = prefill_pb2_grpc.PrefillServiceStub(self._channel)

    def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Runs a generation to its end; takes `generate`'s arguments. Sample 0's Completion,
        with every sample's in `.samples` when n > 1."""
        with self.generate(prompt, **kwargs) as stream:
            deltas = list(stream)
        return completion_from(deltas, stream.results)  # a stream that ends cleanly has them all, or raised

    def cluster_status(self, *, timeout: float | None = None) -> list[WorkerInfo]:
        """Every worker the router knows, sorted by worker_id."""
        require(self.service, CLUSTER_SERVICES, "cluster_status")
        try:
            response = self._router.ClusterStatus(router_pb2.ClusterStatusRequest(),
                                                  timeout=deadline(timeout, self._timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return [worker_from_pb(worker) for worker in response.workers]

    def set_rollout(self, weights: dict[str, int], *, shadow_version: str = "", shadow_fraction: float = 0.0,
                    timeout: float | None = None) -> None:
        """Split new requests over worker versions by weight ({} : any version); optionally copy a
        share of them to a shadow version whose answers are discarded."""
        require(self.service, CLUSTER_SERVICES, "set_rollout")
        request = router_pb2.RolloutRequest(weights=weights, shadow_version=shadow_version,
                                            shadow_fraction=shadow_fraction)
        try:
            self._router.SetRollout(request, timeout=deadline(timeout, self._timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    def stats(self, *, timeout: float | None = None) -> WorkerStats:
        """The target daemon's load and KV stats (service "decode" or "prefill")."""
        require(self.service, STATS_SERVICES, "stats")
        stub = self._decode if self.service == "decode" else self._prefill
        try:
            response = stub.Stats(common_pb2.StatsRequest(), timeout=deadline(timeout, self._timeout),
                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return stats_from_pb(response)

    def tokenize(self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None,
                 add_special_tokens: bool | None = None, add_generation_prompt: bool | None = None,
                 tools: Sequence[Mapping[str, object]] | None = None, timeout: float | None = None) -> list[int]:
        """The token ids a generate call with the same input gets (as many as its usage.prompt_tokens).
        The options are vLLM's /tokenize; None: as generation does. Any service answers."""
        request = tokenize_request(prompt, messages, add_special_tokens, add_generation_prompt, tools)
        try:
            response = self._target().Tokenize(request, timeout=deadline(timeout, self._timeout),
                                               metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return list(response.token_ids)

    def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        """The text of `token_ids`, special tokens written out. Any service answers."""
        request = detokenize_request(token_ids)
        try:
            response = self._target().Detokenize(request, timeout=deadline(timeout, self._timeout),
                                                 metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return response.text

    def _target(self):
        """The stub of the service this client targets."""
        return {"router": self._router, "decode": self._decode, "prefill": self._prefill}[self.service]


def tokenize_request(prompt: str | None, messages: Sequence[MessageLike] | None, add_special_tokens: bool | None,
                     add_generation_prompt: bool | None,
                     tools: Sequence[Mapping[str, object]] | None = None) -> tokenize_pb2.TokenizeRequest:
    """The TokenizeRequest of `tokenize(...)`'s arguments; the input is checked and converted as generate's."""
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("prompt", "give exactly one of prompt, messages")
    generate = request_pb(prompt=prompt, messages=messages, prompt_token_ids=None, sampling={}, request_id=None,
                          tools=tools)
    request = tokenize_pb2.TokenizeRequest()
    if prompt is not None:
        request.prompt = generate.prompt
    else:
        request.messages.CopyFrom(generate.messages)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    if add_generation_prompt is not None:
        request.add_generation_prompt = add_generation_prompt
    return request


def detokenize_request(token_ids: Sequence[int]) -> tokenize_pb2.DetokenizeRequest:
    try:
        return tokenize_pb2.DetokenizeRequest(token_ids=token_ids)
    except (TypeError, ValueError) as exc:  # a negative or non-integer id
        raise InvalidRequestError("token_ids", str(exc)) from None
