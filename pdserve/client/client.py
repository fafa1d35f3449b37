"""The synchronous client: `Client` and the `GenerateStream` its generate returns.

A stream owns one server-streaming call. Leaving it early (break, close(),
garbage collection, an exception in the caller's loop) cancels the call, so
every daemon the request reached aborts it and frees its KV blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    completion_from,
    delta_from_pb,
    result_from_pb,
    stats_from_pb,
    worker_from_pb,
)
from pdserve.client.types import Completion, Delta, GenerationResult, WorkerInfo, WorkerStats
from pdserve.errors import FatalError
from pdserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc, router_pb2, router_pb2_grpc


class GenerateStream(Iterator[Delta]):
    """Iterates the deltas of one generate call; `.result` holds its GenerationResult
    once the stream has ended (None before, or if the call failed)."""

    def __init__(self, call: grpc.Call) -> None:
        self.result: GenerationResult | None = None
        self._call = call
        self._done = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Delta:
        while not self._done:
            response = self._read()
            if response is None:
                self._done = True
                if self.result is None:
                    raise FatalError("the generate stream ended without a GenerateResult")
                break
            kind = response.WhichOneof("kind")
            if kind == "delta":
                return delta_from_pb(response.delta)
            if kind == "result":
                # Keep reading: the stream's end (and its status) comes next.
                self.result = result_from_pb(response.result)
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
    of one daemon's DecodeService ("decode") or PrefillService ("prefill", stats only)."""

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
        """Runs a generation to its end; takes `generate`'s arguments."""
        with self.generate(prompt, **kwargs) as stream:
            deltas = list(stream)
        assert stream.result is not None  # a stream that ends cleanly has one, or raised
        return completion_from(deltas, stream.result)

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
