"""The sending side of a KV transfer: the engine's exported KV, cut into numbered chunks.

`on_kv` is called on the engine thread as each layer's KV is computed, every
layer in order for one token range at a time (a cached prefix, then each compute
step); tokens the receiver said it holds (`num_skipped_tokens`) are left out.
A range longer than one chunk holds is cut into chunks of at most
max_chunk_bytes, one layer each; a shorter one is sent for several consecutive
layers in one chunk, as many as fit (always ending a chunk at the last layer):
fewer, larger messages cost less per byte on both sides. Chunks are numbered
from 0 without gaps and handed to the request's outlet, `post` (called on the
engine thread): a `KVOutbox`, which the Prefill handler streams from on the
event loop, or the in-process transport.
With an `encode` function (the transport's message encoder) each chunk is posted
as its encoded message, made here on the engine thread: the event loop, which
paces the stream, then only hands bytes to the transport. Without one the chunk
itself is posted, for the handler to encode (or damage, under fault injection).
The engine's KV may be views of its cache, valid until its step ends (a layer's
forward writes only its own layer): encoded, each head's rows are copied once,
into the message; posted unencoded, they are copied first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from pdserve.kv_transfer.protocol import MAX_CHUNK_BYTES, KVGeometry


@dataclass(slots=True)
class KVChunkData:
    request_id: str
    sequence_number: int
    layer: int
    token_start: int
    token_end: int
    k: torch.Tensor  # [Hkv, T, D] of `layer`, each head's rows contiguous
    v: torch.Tensor
    # (k, v) of the next layers, layer + 1, layer + 2, ..., for the same tokens.
    more_layers: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    @property
    def num_layers(self) -> int:
        return 1 + len(self.more_layers)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.k, self.v), *self.more_layers]

    @property
    def num_bytes(self) -> int:
        return sum((k.numel() + v.numel()) * k.element_size() for k, v in self.layers())


# A chunk as the transport's message (the daemon's wire encoding); runs on the engine thread.
ChunkEncoder = Callable[[KVChunkData], bytes]


class KVSender:
    def __init__(self, request_id: str, geometry: KVGeometry, post: Callable[[KVChunkData | bytes], None],
                 max_chunk_bytes: int = MAX_CHUNK_BYTES,
                 encode: ChunkEncoder | None = None, num_skipped_tokens: int = 0) -> None:
        self.request_id = request_id
        self.num_skipped_tokens = num_skipped_tokens  # leading tokens the receiver has: not sent
        self.chunk_tokens = geometry.chunk_tokens(max_chunk_bytes)
        self.num_layers = geometry.num_layers
        self._pending: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []  # (layer, start, k, v) to group
        self._post = post
        self._encode = encode
        self.num_chunks = 0  # chunks posted so far; the next one's sequence number
        self.num_bytes = 0

    def on_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine thread: k, v [Hkv, T, D] of positions [start, start + T) of one layer."""
        if start < self.num_skipped_tokens:  # the receiver holds these already
            if start + k.shape[1] <= self.num_skipped_tokens:
                return
            cut = self.num_skipped_tokens - start
            start, k, v = self.num_skipped_tokens, k[:, cut:], v[:, cut:]
        num_tokens = k.shape[1]
        if self._pending:
            last_layer, last_start, last_k, _ = self._pending[-1]
            if (layer, start, num_tokens) != (last_layer + 1, last_start, last_k.shape[1]):
                self._flush()  # not the next layer of the same range (the engine never does this)
        if num_tokens > self.chunk_tokens // 2:  # one layer's range fills a chunk, or more: cut it
            for lo in range(0, num_tokens, self.chunk_tokens):
                hi = min(lo + self.chunk_tokens, num_tokens)
                self._emit(layer, start + lo, start + hi, [(k[:, lo:hi], v[:, lo:hi])])
            return
        self._pending.append((layer, start, k, v))
        if len(self._pending) == self.chunk_tokens // num_tokens or layer == self.num_layers - 1:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            first, start, k, _ = self._pending[0]
            self._emit(first, start, start + k.shape[1], [(k, v) for _, _, k, v in self._pending])
            self._pending = []

    def _emit(self, layer: int, start: int, end: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        parts = [(k.cpu(), v.cpu()) for k, v in kv]
        if self._encode is None:  # kept past this step: a copy of the engine's memory
            parts = [(k.clone(), v.clone()) for k, v in parts]
        (k, v), *more = parts
        chunk = KVChunkData(self.request_id, self.num_chunks, layer, start, end, k, v, tuple(more))
        self.num_chunks += 1
        self.num_bytes += chunk.num_bytes
        item = chunk if self._encode is None else self._encode(chunk)
        self._post(item)


class KVOutbox:
    """The event-loop end of one request's sending side: what the engine thread posts, in order.

    `post` (any thread) takes the sender's chunks, encoded or not, and then the request's end
    (its output); `chunks()` yields the chunks as they come and stops at the end, kept in `end`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.end: Any = None
        self.first_sent: float | None = None  # monotonic times the first and the last chunk were sent
        self.last_sent = 0.0
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def post(self, item: Any) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def chunks(self) -> AsyncIterator[KVChunkData | bytes]:
        while isinstance(item := await self._queue.get(), (KVChunkData, bytes)):
            yield item  # the consumer resumes this once it has sent the chunk
            self.last_sent = time.monotonic()
            self.first_sent = self.first_sent or self.last_sent
        self.end = item

    @property
    def send_ms(self) -> float:
        return (self.last_sent - self.first_sent) * 1e3 if self.first_sent else 0.0
