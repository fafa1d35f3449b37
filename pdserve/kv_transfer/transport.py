"""What carries a KV transfer, seen from the decode side, and the pull loop that drives it.

A transfer is a short exchange: the sender announces the prompt (`KVHeaderData`: its token ids,
for the sender tokenizes), the receiver answers how many leading tokens it holds already
(`skip`), then the sender streams numbered chunks (`KVChunkFields`) and the first token
(`KVFirstToken`). A backend opens it (start), hands over the sender's messages one at a time
(next chunk, awaited with the stall timeout: poll), carries the skip back, and drops it (abort).
Two backends implement `KVSource`: the gRPC Prefill stream (`grpc_stream.GrpcKVSource`) and a
queue in the same process (`in_process.InProcessKVSource`).

`pull` is the same for both: every message goes through a `KVReceiver`'s checks before its
tensors reach `write`; `reserve` sees the prompt first and says what to skip (blocks reserved),
or declines the transfer (`Declined`: the receiver will prefill the prompt itself); no message
within `stall_s`, a stream that ends early or a message out of place fails the transfer with
KVTransferError (a refusal by the sender, with its own error), and the source is aborted on
every way out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.engine.sampling import TokenLogprobs
from pdserve.errors import KVTransferError
from pdserve.kv_transfer.receiver import KVChunkFields, KVHeaderData, KVReceiver


@dataclass(frozen=True)
class KVFirstToken:
    """The last message of a transfer: the token the sender sampled from the prompt (one per sample)."""

    token_id: int
    prefill_ms: float = 0.0  # the sender's queue and compute time
    num_cached_tokens: int = 0  # prompt tokens the sender found in its own prefix cache
    logprobs: TokenLogprobs | None = None
    # n > 1: the first tokens of samples 1.. and their logprobs.
    more_samples: tuple[tuple[int, TokenLogprobs | None], ...] = ()
    # The request's prompt logprobs, when it asked for them.
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return [self.token_id, *(t for t, _ in self.more_samples)]

    @property
    def all_logprobs(self) -> list[TokenLogprobs | None]:
        return [self.logprobs, *(lp for _, lp in self.more_samples)]


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

    async def skip(self, num_cached_tokens: int) -> None:
        """Tell the sender, after its header, how many leading prompt tokens not to send."""
        ...

    def abort(self) -> None:
        """Drop the transfer; the sender stops. Idempotent, and harmless once it is over."""
        ...


class Declined(Exception):
    """Raised by `reserve`: the receiver will not take this prompt's KV (it prefills the prompt
    itself, e.g. one short enough); the prompt's token ids, as the sender made them, go with it."""

    def __init__(self, prompt_token_ids: list[int]) -> None:
        super().__init__(f"declined a {len(prompt_token_ids)}-token prompt")
        self.prompt_token_ids = prompt_token_ids


# The announced prompt's token ids -> how many leading ones the receiver holds (blocks reserved for
# the rest); raises Declined, or the receiver's own error (e.g. CapacityError: no room).
Reserve = Callable[[list[int]], Awaitable[int]]


@dataclass(frozen=True)
class PulledKV:
    first_token: KVFirstToken
    prompt_token_ids: list[int]  # as the sender made them
    num_cached_tokens: int  # leading ones the receiver held: not sent
    num_bytes: int  # K + V bytes received
    num_chunks: int
    transfer_s: float  # from the header to the first token


async def pull(source: KVSource, receiver: KVReceiver, reserve: Reserve, write: KVWrite,
               stall_s: float) -> PulledKV:
    """Receive a whole transfer into `write`, every message checked by `receiver`; see the module docstring."""
    rid = receiver.request_id
    writes: list[asyncio.Future] = []
    try:
        header = await _next(source, stall_s, rid)
        if not isinstance(header, KVHeaderData):
            raise KVTransferError("the KV stream did not start with a header", request_id=rid)
        prompt = receiver.on_header(header)
        header_at = time.monotonic()
        num_cached = await reserve(prompt)
        receiver.skip(num_cached)
        await source.skip(num_cached)
        while True:
            msg = await _next(source, stall_s, rid)
            if isinstance(msg, KVFirstToken):
                receiver.check_complete()
                for done in writes:
                    await done
                return PulledKV(msg, prompt, num_cached, receiver.num_received_bytes, len(writes),
                                time.monotonic() - header_at)
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
