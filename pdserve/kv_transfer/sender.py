"""Prefill side: KV computed layer by layer becomes numbered chunks on a queue.

`on_kv` is called on the engine thread as each layer's KV is computed; it cuts
the token range into chunks of at most max_chunk_bytes, converts them to bytes
and posts them to the request's queue on the event loop, where the Prefill
handler streams them. Chunks are numbered from 0 without gaps.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from pdserve.kv_transfer.protocol import MAX_CHUNK_BYTES, KVGeometry, tensor_to_bytes


@dataclass(slots=True)
class KVChunkData:
    request_id: str
    sequence_number: int
    layer: int
    token_start: int
    token_end: int
    k: bytes
    v: bytes


class KVSender:
    def __init__(self, request_id: str, geometry: KVGeometry, loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
        self.request_id = request_id
        self.chunk_tokens = geometry.chunk_tokens(max_chunk_bytes)
        self._loop = loop
        self._queue = queue
        self._next_seq = 0
        self.num_bytes = 0

    def on_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine thread: k, v [T, Hkv, D] of positions [start, start + T) of one layer."""
        for lo in range(0, k.shape[0], self.chunk_tokens):
            hi = min(lo + self.chunk_tokens, k.shape[0])
            chunk = KVChunkData(self.request_id, self._next_seq, layer, start + lo, start + hi,
                                tensor_to_bytes(k[lo:hi]), tensor_to_bytes(v[lo:hi]))
            self._next_seq += 1
            self.num_bytes += len(chunk.k) + len(chunk.v)
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
