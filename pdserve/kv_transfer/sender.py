"""Prefill side: KV computed layer by layer becomes numbered chunks on a queue.

`on_kv` is called on the engine thread as each layer's KV is computed; it cuts
the token range into chunks of at most max_chunk_bytes and posts them to the
request's queue on the event loop, where the Prefill handler streams them.
With an `encode` function (the transport's message encoder) each chunk is posted
as its encoded message, made here on the engine thread: the event loop, which
paces the stream, then only hands bytes to the transport. Without one the chunk
itself is posted, for the handler to encode (or damage, under fault injection).
The engine's KV may be views of its cache, valid only during on_kv: encoded, each
head's rows are copied once, into the message; posted unencoded, they are copied first.
Chunks are numbered from 0 without gaps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.kv_transfer.protocol import MAX_CHUNK_BYTES, KVGeometry


@dataclass(slots=True)
class KVChunkData:
    request_id: str
    sequence_number: int
    layer: int
    token_start: int
    token_end: int
    k: torch.Tensor  # [Hkv, T, D], each head's rows contiguous
    v: torch.Tensor

    @property
    def num_bytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


# A chunk as the transport's message (the daemon's wire encoding); runs on the engine thread.
ChunkEncoder = Callable[[KVChunkData], bytes]


class KVSender:
    def __init__(self, request_id: str, geometry: KVGeometry, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue, max_chunk_bytes: int = MAX_CHUNK_BYTES,
                 encode: ChunkEncoder | None = None) -> None:
        self.request_id = request_id
        self.chunk_tokens = geometry.chunk_tokens(max_chunk_bytes)
        self._loop = loop
        self._queue = queue
        self._encode = encode
        self.num_chunks = 0  # chunks posted so far; the next one's sequence number
        self.num_bytes = 0

    def on_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine thread: k, v [Hkv, T, D] of positions [start, start + T) of one layer."""
        for lo in range(0, k.shape[1], self.chunk_tokens):
            hi = min(lo + self.chunk_tokens, k.shape[1])
            k_part, v_part = k[:, lo:hi].cpu(), v[:, lo:hi].cpu()
            if self._encode is None:  # kept past this call: a copy of the engine's memory
                k_part, v_part = k_part.clone(), v_part.clone()
            chunk = KVChunkData(self.request_id, self.num_chunks, layer, start + lo, start + hi, k_part, v_part)
            self.num_chunks += 1
            self.num_bytes += chunk.num_bytes
            item = chunk if self._encode is None else self._encode(chunk)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
