"""What carries a KV transfer, seen from the decode side, and the pull loop that drives it.

A transfer is one stream of messages from the sender: a header (`KVHeaderData`), numbered
chunks (`KVChunkFields`), then the first token (`KVFirstToken`). A backend opens it (start),
hands over its messages one at a time (next chunk, awaited with the stall timeout: poll), and
drops it (abort). Two backends implement `KVSource`: the gRPC Prefill stream
(`grpc_stream.GrpcKVSource`) and a queue in the same process (`in_process.InProcessKVSource`).

`pull` is the same for both: every message goes through a `KVReceiver`'s checks before its
tensors reach `write`; no message within `stall_s`, a stream that ends early or a message out
of place fails the transfer with KVTransferError (a refusal by the sender, with its own error),
and the source is aborted on every way out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.errors import KVTransferError
from pdserve.kv_transfer.receiver import KVChunkFields, KVHeaderData, KVReceiver


@dataclass(frozen=True)
class KVFirstToken:
    """The last message of a transfer: the token the sender sampled from the prompt."""

    token_id: int
    prefill_ms: float = 0.0  # the sender's queue and compute time
    num_cached_tokens: int = 0  # prompt tokens the sender found in its own prefix cache


KVMessage = KVHeaderData | KVChunkFields | KVFirstToken
# Verified KV of one chunk, (layer, start, k, v) per layer, to the cache: a future that the pull
# awaits before it returns (writes run elsewhere, e.g. on the engine thread, while chunks arrive).
KVWrite = Callable[[list[tuple[int, int, torch.Tensor, torch.Tensor]]], "asyncio.Future[object]"]


class KVSource(Protocol):
    """One request's incoming transfer, whatever carries it."""

    async def next(self) -> KVMessage:
        """The next message. Raises KVTransferError when the stream fails or ends before the first
        token, and the sender's own error (a `PdserveError`) when it refused the request."""
        ...

    def abort(self) -> None:
        """Drop the transfer; the sender stops. Idempotent, and harmless once it is over."""
        ...


@dataclass(frozen=True)
class PulledKV:
    first_token: KVFirstToken
    num_bytes: int  # K + V bytes received
    num_chunks: int
    transfer_s: float  # from the header to the first token


async def pull(source: KVSource, receiver: KVReceiver, write: KVWrite, stall_s: float) -> PulledKV:
    """Receive a whole transfer into `write`, every message checked by `receiver`; see the module docstring."""
    rid = receiver.request_id
    writes: list[asyncio.Future] = []
    try:
        header = await _next(source, stall_s, rid)
        if not isinstance(header, KVHeaderData):
            raise KVTransferError("the KV stream did not start with a header", request_id=rid)
        receiver.on_header(header)
        header_at = time.monotonic()
        while True:
            msg = await _next(source, stall_s, rid)
            if isinstance(msg, KVFirstToken):
                receiver.check_complete()
                for done in writes:
                    await done
                return PulledKV(msg, header.num_kv_bytes, len(writes), time.monotonic() - header_at)
            if isinstance(msg, KVHeaderData):
                raise KVTransferError("a second header", request_id=rid)
            writes.append(write(receiver.on_chunk(msg)))
    finally:
        source.abort()
        for done in writes:  # on a failure, the writes' own errors are not news
            done.add_done_callback(_consume)


async def _next(source: KVSource, stall_s: float, rid: str) -> KVMessage:
    try:
        return await asyncio.wait_for(source.next(), stall_s)
    except asyncio.TimeoutError:
        raise KVTransferError(f"stalled: no KV message within {stall_s:g} s", request_id=rid) from None


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
