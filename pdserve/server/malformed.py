"""Requests that do not parse (bad UTF-8 in a string field, truncated bytes) become
INVALID_ARGUMENT naming the field, instead of gRPC's UNKNOWN.

A server interceptor wraps each method's deserializer so a parse failure yields a
`Malformed` value, and its behaviour so that value is refused before any handler runs
(for a stream of requests, when the handler reads it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import DecodeError

from pdserve.kv_transfer.codec import read_varint


@dataclass(frozen=True)
class Malformed:
    field: str
    reason: str


def bad_utf8_field(desc: pb_descriptor.Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Path of the first string field of `data` (a `desc` message) that is not valid UTF-8."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = read_varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            size, pos = read_varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
            field = desc.fields_by_number.get(number)
            if field is None:
                continue
            path = f"{prefix}{field.name}"
            if field.type == field.TYPE_STRING:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    return path
            elif field.type == field.TYPE_MESSAGE:
                found = bad_utf8_field(field.message_type, value, path + ".")
                if found:
                    return found
        else:
            return None
    return None


def _safe_deserializer(deserialize, desc: pb_descriptor.Descriptor | None):
    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:
            field = None
            if desc is not None:
                try:
                    field = bad_utf8_field(desc, data)
                except DecodeError:
                    pass
            reason = "is not valid UTF-8" if field else f"malformed request ({exc})"
            return Malformed(field or "request", reason)

    return parse


async def _refuse(request: Malformed, context: grpc.aio.ServicerContext):
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: {request.reason}")


class _CheckedReads:
    """A servicer context whose read() refuses a malformed message (streaming requests)."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    async def read(self):
        message = await self._context.read()
        if isinstance(message, Malformed):
            await _refuse(message, self._context)
        return message

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        desc = getattr(getattr(handler.request_deserializer, "__self__", None), "DESCRIPTOR", None)
        parse = _safe_deserializer(handler.request_deserializer, desc)
        if handler.unary_stream is not None:
            inner = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, Malformed):
                    await _refuse(request, context)
                async for item in inner(request, context):
                    yield item

            return handler._replace(request_deserializer=parse, unary_stream=stream)
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, Malformed):
                    await _refuse(request, context)
                result = inner_unary(request, context)
                return await result if inspect.isawaitable(result) else result

            return handler._replace(request_deserializer=parse, unary_unary=unary)
        if handler.stream_stream is not None:  # the servicer reads its messages with context.read()
            inner_bidi = handler.stream_stream

            async def bidi(requests, context):
                async for item in inner_bidi(requests, _CheckedReads(context)):
                    yield item

            return handler._replace(request_deserializer=parse, stream_stream=bidi)
        return handler
