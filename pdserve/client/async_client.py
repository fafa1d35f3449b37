"""The asyncio client: `AsyncClient` and the `AsyncGenerateStream` its generate returns.

Same contract as the sync client: leaving a stream early (break then garbage
collection, aclose(), cancelling the task that reads it) cancels the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
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
from pdserve.client.client import StreamResults, detokenize_request, tokenize_request
from pdserve.client.convert import (
    MessageLike,
    completion_from,
    delta_from_pb,
    stats_from_pb,
    worker_from_pb,
)
from pdserve.client.types import Completion, Delta, WorkerInfo, WorkerStats
from pdserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc, router_pb2, router_pb2_grpc


class AsyncGenerateStream(StreamResults, AsyncIterator[Delta]):
    """Async-iterates the deltas of one generate call, as `GenerateStream` does (`.results`,
    `.result`)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        super().__init__()
        self._call = call
        self._done = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Delta:
        while not self._done:
            response = await self._read()
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
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Cancels the call if it is still running; idempotent and safe from sync code."""
        if not self._done:
            self._done = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.cancel()

    def __del__(self) -> None:
        # An abandoned stream must not keep the request running on the servers.
        if getattr(self, "_call", None) is None:
            return
        try:
            self.cancel()
        except RuntimeError:
            pass  # the event loop is already closed; so is the call

    async def _read(self) -> common_pb2.GenerateResponse | None:
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            # The reading task was cancelled: the call must end with it.
            self.cancel()
            raise
        except grpc.RpcError as exc:
            self._done = True
            raise rpc_error(exc) from None
        return None if response is grpc.aio.EOF else response


class AsyncClient(GenerateCalls[AsyncGenerateStream]):
    """asyncio client of a RouterService (default) or, for tests and operators,
    of one daemon's DecodeService ("decode") or PrefillService ("prefill": stats and tokenization).

    Create it inside the event loop that uses it.
    """

    _stream = AsyncGenerateStream

    def __init__(self, address: str, *, timeout: float | None = None, service: Service = "router",
                 api_key: str | None = None, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.address = address
        self._metadata = auth_metadata(api_key)
        self.service = check_service(service)
        self._timeout = timeout
        # credentials: TLS, e.g. grpc.ssl_channel_credentials(ca, key, cert) for a cluster with --tls-ca.
        self._channel = (grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials
                         else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        self._router = router_pb2_grpc.RouterServiceStub(self._channel)
        self._decode = decode_pb2_grpc.DecodeServiceStub(self._channel)
        self._prefill = prefill_pb2_grpc.PrefillServiceStub(self._channel)

    async def close(self) -> None:
        """Closes the channel; calls still running are cancelled."""
        await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Runs a generation to its end; takes `generate`'s arguments. As `Client.complete`."""
        async with self.generate(prompt, **kwargs) as stream:
            deltas = [delta async for delta in stream]
        return completion_from(deltas, stream.results)  # a stream that ends cleanly has them all, or raised

    async def cluster_status(self, *, timeout: float | None = None) -> list[WorkerInfo]:
        """Every worker the router knows, sorted by worker_id."""
        require(self.service, CLUSTER_SERVICES, "cluster_status")
        try:
            response = await self._router.ClusterStatus(router_pb2.ClusterStatusRequest(),
                                                        timeout=deadline(timeout, self._timeout), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return [worker_from_pb(worker) for worker in response.workers]

    async def stats(self, *, timeout: float | None = None) -> WorkerStats:
        """The target daemon's load and KV stats (service "decode" or "prefill")."""
        require(self.service, STATS_SERVICES, "stats")
        stub = self._decode if self.service == "decode" else self._prefill
        try:
            response = await stub.Stats(common_pb2.StatsRequest(), timeout=deadline(timeout, self._timeout),
                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return stats_from_pb(response)

    async def tokenize(self, prompt: str | None = None, *, messages: Sequence[MessageLike] | None = None,
                       add_special_tokens: bool | None = None, add_generation_prompt: bool | None = None,
                       tools: Sequence[Mapping[str, object]] | None = None,
                       timeout: float | None = None) -> list[int]:
        """As `Client.tokenize`."""
        request = tokenize_request(prompt, messages, add_special_tokens, add_generation_prompt, tools)
        try:
            response = await self._target().Tokenize(request, timeout=deadline(timeout, self._timeout),
                                                     metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, timeout: float | None = None) -> str:
        """As `Client.detokenize`."""
        request = detokenize_request(token_ids)
        try:
            response = await self._target().Detokenize(request, timeout=deadline(timeout, self._timeout),
                                                       metadata=self._metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None
        return response.text

    def _target(self):
        """The stub of the service this client targets."""
        return {"router": self._router, "decode": self._decode, "prefill": self._prefill}[self.service]
