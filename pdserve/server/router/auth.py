"""API keys for the client-facing fronts: `Authorization: Bearer KEY` on HTTP, the same in gRPC metadata.

The router checks them (one gRPC interceptor, one HTTP middleware) on the calls a
client makes: RouterService.Generate, ClusterStatus, SetRollout, Tokenize and Detokenize,
every /v1/ HTTP route, and /tokenize and /detokenize (at the root, where vLLM serves them).
Health checks, reflection and the workers' Register/Heartbeat stay open (workers are
authenticated by mutual TLS, not by keys). Keys come from `--api-key` (repeatable)
and `--api-key-file` (one per line, # comments); none given: no check.
"""

from __future__ import annotations

import argparse
import hmac
import pathlib

import grpc

from pdserve.errors import AuthenticationError

PROTECTED_GRPC_METHODS = frozenset({"/pdserve.v1.RouterService/Generate", "/pdserve.v1.RouterService/ClusterStatus",
                                    "/pdserve.v1.RouterService/SetRollout", "/pdserve.v1.RouterService/Tokenize",
                                    "/pdserve.v1.RouterService/Detokenize"})


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", default=[], help="a key clients must send (repeatable)")
    p.add_argument("--api-key-file", default=None, help="a file of keys, one per line")


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ApiKeys:
        keys = list(args.api_key)
        if args.api_key_file:
            lines = pathlib.Path(args.api_key_file).read_text().splitlines()
            keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationError unless `authorization` is "Bearer <a known key>"."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode()
        # Compare with every key, whatever matches first: no timing hint of which key or prefix.
        if scheme.lower() != "bearer" or not any([hmac.compare_digest(given, k) for k in self._keys]):
            raise AuthenticationError("a valid API key is required (Authorization: Bearer KEY)")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for the protected methods called without a valid key."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in PROTECTED_GRPC_METHODS:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            self.keys.check(metadata.get("authorization"))
        except AuthenticationError as exc:
            message = str(exc)

            async def refuse(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            if handler.unary_stream is not None:
                async def refuse_stream(request, context):
                    await refuse(request, context)
                    yield  # never reached: makes this an async generator, as the handler's type requires

                return handler._replace(unary_stream=refuse_stream)
            return handler._replace(unary_unary=refuse)
        return handler
