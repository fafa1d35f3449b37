"""The pdserve client SDK: generate through a router (or one decode daemon) over gRPC.

    from pdserve.client import Client

    with Client("localhost:50051", timeout=60) as client:
        for delta in client.generate("Once upon a time", max_tokens=32):
            print(delta.text, end="")
        print(client.complete(messages=[{"role": "user", "content": "Hi"}]).usage)

Failed calls raise the `pdserve.errors` class of their gRPC status, so
`except InvalidRequestError as e: e.field` works here as it does in-process.
Imports only grpc, the pdserve.v1 stubs and the standard library: no torch,
transformers or numpy.
"""

from __future__ import annotations

from pdserve.client.async_client import AsyncClient, AsyncGenerateStream
from pdserve.client.client import Client, GenerateStream
from pdserve.client.types import (
    ChatMessage,
    Completion,
    Delta,
    GenerationResult,
    KVStats,
    Timings,
    TokenLogprob,
    Usage,
    WorkerInfo,
    WorkerLoad,
    WorkerStats,
)

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "ChatMessage",
    "Client",
    "Completion",
    "Delta",
    "GenerateStream",
    "GenerationResult",
    "KVStats",
    "Timings",
    "TokenLogprob",
    "Usage",
    "WorkerInfo",
    "WorkerLoad",
    "WorkerStats",
]
