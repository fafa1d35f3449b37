"""The gRPC KV transport: the bidirectional Prefill call between decode worker and prefill worker.

Decode side: `PrefillStub.open` starts the call and returns a `GrpcKVSource`, which sends the
request with its first read and the skip when told. Its messages are the transport-free ones of
`transport` (KV chunks as views of the received messages); its failures are pdserve errors: the
prefill worker's refusals (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, FAILED_PRECONDITION) as the
errors they stand for, anything else (a dead peer, a cancelled or expired call) as
KVTransferError, which moves the request on to the next candidate. Prefill side: `add_prefill_service` registers the servicer so that KV chunks, made
into messages on the engine thread (`codec.kv_chunk_response`), go out as the bytes they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from pdserve.errors import KVTransferError
from pdserve.kv_transfer.codec import KVChunkView, kv_header_from_pb, logprobs_from_pb, prefill_response_from_bytes
from pdserve.kv_transfer.transport import KVFirstToken, KVMessage
from pdserve.status import error_from_status
from pdserve.v1 import common_pb2, prefill_pb2, tokenize_pb2

SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
# The prefill worker refused the request itself: retrying it elsewhere would not help.
_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.FAILED_PRECONDITION)


class GrpcKVSource:
    """A `KVSource` over one Prefill call."""

    def __init__(self, request: prefill_pb2.PrefillRequest, call: grpc.aio.StreamStreamCall) -> None:
        self.request_id = request.request.request_id
        self._request: prefill_pb2.PrefillRequest | None = request  # sent with the first read
        self._call = call

    async def next(self) -> KVMessage:
        rid = self.request_id
        try:
            if self._request is not None:
                request, self._request = self._request, None
                await self._call.write(prefill_pb2.PrefillMessage(request=request))
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None
        if msg is grpc.aio.EOF:
            raise KVTransferError("the prefill stream ended before the first token", request_id=rid)
        if isinstance(msg, KVChunkView):
            return msg
        kind = msg.WhichOneof("kind")
        if kind == "header":
            return kv_header_from_pb(msg.header)
        if kind == "chunk":  # one the hand decoder left to protobuf
            return msg.chunk
        if kind == "first_token":
            first = msg.first_token
            return KVFirstToken(
                first.token_id, first.timings.prefill_ms, first.num_cached_tokens, logprobs_from_pb(first.logprobs),
                tuple((s.token_id, logprobs_from_pb(s.logprobs)) for s in first.more_samples),
                [logprobs_from_pb(lp) for lp in first.prompt_logprobs] or None)
        raise KVTransferError(f"unexpected {kind} message on the prefill stream", request_id=rid)

    async def skip(self, num_cached_tokens: int) -> None:
        try:
            await self._call.write(prefill_pb2.PrefillMessage(skip=prefill_pb2.KVSkip(
                num_cached_tokens=num_cached_tokens)))
            await self._call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    def abort(self) -> None:
        self._call.cancel()

    def _error(self, exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() in _REFUSALS:
            return error_from_status(exc.code(), exc.details() or "")
        return KVTransferError(f"{exc.code().name}: {exc.details()}", request_id=self.request_id)


class PrefillStub:
    """The Prefill rpc as decode workers call it: KV chunks arrive as views of the messages, not copies."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.Prefill = channel.stream_stream(f"/{SERVICE_NAME}/Prefill",
                                             request_serializer=prefill_pb2.PrefillMessage.SerializeToString,
                                             response_deserializer=prefill_response_from_bytes)

    def open(self, request: prefill_pb2.PrefillRequest, *, timeout: float | None = None,
             metadata: Sequence[tuple[str, str]] | None = None) -> GrpcKVSource:
        return GrpcKVSource(request, self.Prefill(timeout=timeout, metadata=metadata))


def add_prefill_service(servicer, server: grpc.aio.Server) -> None:
    """Register a PrefillService servicer (Prefill, Stats, Tokenize, Detokenize) whose Prefill responses
    may come as bytes, serialized already (KV chunks)."""
    serialize = lambda m: m if isinstance(m, bytes) else m.SerializeToString()  # noqa: E731
    handlers = {
        "Prefill": grpc.stream_stream_rpc_method_handler(
            servicer.Prefill, request_deserializer=prefill_pb2.PrefillMessage.FromString,
            response_serializer=serialize),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats, request_deserializer=common_pb2.StatsRequest.FromString,
            response_serializer=common_pb2.StatsResponse.SerializeToString),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize, request_deserializer=tokenize_pb2.TokenizeRequest.FromString,
            response_serializer=tokenize_pb2.TokenizeResponse.SerializeToString),
        "Detokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Detokenize, request_deserializer=tokenize_pb2.DetokenizeRequest.FromString,
            response_serializer=tokenize_pb2.DetokenizeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
