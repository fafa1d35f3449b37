"""The gRPC KV transport: the Prefill server stream from prefill worker to decode worker.

Decode side: `PrefillStub.open` starts the stream and returns a `GrpcKVSource`, whose messages
are the transport-free ones of `transport` (KV chunks as views of the received messages) and
whose failures are pdserve errors: the prefill worker's refusals (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION) as the errors they stand for, anything else (a dead
peer, a cancelled or expired call) as KVTransferError, which moves the request on to the next
candidate. Prefill side: `add_prefill_service` registers the servicer so that KV chunks, made
into messages on the engine thread (`codec.kv_chunk_response`), go out as the bytes they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from pdserve.errors import KVTransferError
from pdserve.kv_transfer.codec import KVChunkView, kv_header_from_pb, prefill_response_from_bytes
from pdserve.kv_transfer.transport import KVFirstToken, KVMessage
from pdserve.status import error_from_status
from pdserve.v1 import common_pb2, prefill_pb2

SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
# The prefill worker refused the request itself: retrying it elsewhere would not help.
_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.FAILED_PRECONDITION)


class GrpcKVSource:
    """A `KVSource` over one Prefill call."""

    def __init__(self, request_id: str, call: grpc.aio.UnaryStreamCall) -> None:
        self.request_id = request_id
        self._call = call
        self._stream = call.__aiter__()

    async def next(self) -> KVMessage:
        rid = self.request_id
        try:
            msg = await self._stream.__anext__()
        except StopAsyncIteration:
            raise KVTransferError("the prefill stream ended before the first token", request_id=rid) from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REFUSALS:
                raise error_from_status(exc.code(), exc.details() or "") from None
            raise KVTransferError(f"{exc.code().name}: {exc.details()}", request_id=rid) from None
        if isinstance(msg, KVChunkView):
            return msg
        kind = msg.WhichOneof("kind")
        if kind == "header":
            return kv_header_from_pb(msg.header)
        if kind == "chunk":  # one the hand decoder left to protobuf
            return msg.chunk
        if kind == "first_token":
            first = msg.first_token
            return KVFirstToken(first.token_id, first.timings.prefill_ms, first.num_cached_tokens)
        raise KVTransferError(f"unexpected {kind} message on the prefill stream", request_id=rid)

    def abort(self) -> None:
        self._call.cancel()


class PrefillStub:
    """The Prefill rpc as decode workers call it: KV chunks arrive as views of the messages, not copies."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Prefill = channel.unary_stream(f"/{SERVICE_NAME}/Prefill",
                                            request_serializer=prefill_pb2.PrefillRequest.SerializeToString,
                                            response_deserializer=prefill_response_from_bytes)

    def open(self, request: prefill_pb2.PrefillRequest, *, timeout: float | None = None,
             metadata: Sequence[tuple[str, str]] | None = None) -> GrpcKVSource:
        return GrpcKVSource(request.request.request_id, self.Prefill(request, timeout=timeout, metadata=metadata))


def add_prefill_service(servicer, server: grpc.aio.Server) -> None:
    """Register a PrefillService servicer (Prefill and Stats) whose Prefill responses may come as
    bytes, serialized already (KV chunks)."""
    serialize = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    handlers = {
        "Prefill": grpc.unary_stream_rpc_method_handler(
            servicer.Prefill, request_deserializer=prefill_pb2.PrefillRequest.FromString,
            response_serializer=serialize),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=common_pb2.StatsRequest.FromString,
            response_serializer=common_pb2.StatsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
