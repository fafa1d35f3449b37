"""The router's Tokenize and Detokenize (gRPC, and HTTP /tokenize and /detokenize): a worker answers.

The router has no tokenizer. A call goes to the workers that tokenize generate requests:
1. the healthy prefill workers, in random order (the load is small and spread);
2. then, as a fallback, the healthy decode workers (co-located mode has no prefill worker,
   and a decode worker preprocesses with the same rules);
3. a worker that does not answer (UNAVAILABLE) is marked failed in the registry and the next
   one is tried; any other status (INVALID_ARGUMENT naming the field, DEADLINE_EXCEEDED)
   is the call's answer. No worker left: UNAVAILABLE.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from pdserve.errors import UnavailableError
from pdserve.observability import tracing
from pdserve.routing.registry import Registry, Role, Worker
from pdserve.server import daemon
from pdserve.status import error_from_status
from pdserve.v1 import decode_pb2_grpc, prefill_pb2_grpc, tokenize_pb2

log = logging.getLogger("pdserve.router")

ResponseT = TypeVar("ResponseT")
# One worker call: (the worker's PrefillService or DecodeService stub, timeout in seconds) -> its answer.
WorkerCall = Callable[[Any, float | None], Awaitable[ResponseT]]


class Tokenization:
    def __init__(self, registry: Registry, rng: random.Random | None = None,
                 decode_stubs: daemon.Stubs[decode_pb2_grpc.DecodeServiceStub] | None = None) -> None:
        """decode_stubs: the router's own, so that a decode worker is reached over the one channel."""
        self.registry = registry
        self._rng = rng or random.Random()
        self._prefill_stub = daemon.Stubs(prefill_pb2_grpc.PrefillServiceStub)
        self._decode_stub = decode_stubs or daemon.Stubs(decode_pb2_grpc.DecodeServiceStub)

    async def tokenize(self, request: tokenize_pb2.TokenizeRequest,
                       timeout_s: float | None) -> tokenize_pb2.TokenizeResponse:
        """A worker's TokenizeResponse; raises PdserveError (InvalidRequestError naming the field)."""
        return await self._call(lambda stub, timeout: stub.Tokenize(
            request, timeout=timeout, metadata=tracing.inject_metadata()), timeout_s, request.request_id)

    async def detokenize(self, request: tokenize_pb2.DetokenizeRequest,
                         timeout_s: float | None) -> tokenize_pb2.DetokenizeResponse:
        """A worker's DetokenizeResponse; raises PdserveError (an id out of the vocabulary names its index)."""
        return await self._call(lambda stub, timeout: stub.Detokenize(
            request, timeout=timeout, metadata=tracing.inject_metadata()), timeout_s, request.request_id)

    def workers(self) -> list[Worker]:
        """Who to ask, in order: healthy prefill workers (shuffled), then healthy decode workers (shuffled)."""
        ordered: list[Worker] = []
        for role in (Role.PREFILL, Role.DECODE):
            workers = self.registry.healthy(role)
            self._rng.shuffle(workers)
            ordered += workers
        return ordered

    async def _call(self, call: WorkerCall[ResponseT], timeout_s: float | None, request_id: str) -> ResponseT:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        unreachable: list[str] = []
        for worker in self.workers():
            stub = (self._prefill_stub if worker.role is Role.PREFILL else self._decode_stub)(worker.address)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await call(stub, remaining)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise error_from_status(exc.code(), exc.details() or "") from None
                log.warning("worker %s (%s) did not answer a tokenization call: %s; trying the next",
                            worker.worker_id, worker.address, exc.details())
                self.registry.mark_failed(worker.worker_id)
                unreachable.append(worker.worker_id)
        detail = f" ({', '.join(unreachable)} did not answer)" if unreachable else ""
        raise UnavailableError(f"no healthy prefill or decode worker to tokenize with{detail}",
                               request_id=request_id or None)
