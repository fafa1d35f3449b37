"""The in-process KV transport: what a sender posts is what the receiver reads, with no process between.

A `KVSender` given `InProcessKVSource.post` as its outlet hands its chunks straight to the pull
loop, read as views of the chunk's payload (the same fields and checksum a message carries).
The receiver's skip goes to `on_skip`, where an in-process sender starts. Tests post headers,
first tokens and errors themselves, and may reorder, damage, drop or withhold anything in
between: every transfer rule is tested here in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from pdserve.errors import KVTransferError, PdserveError
from pdserve.kv_transfer.codec import chunk_view
from pdserve.kv_transfer.sender import KVChunkData
from pdserve.kv_transfer.transport import KVMessage

_END = object()


class InProcessKVSource:
    """A `KVSource` fed by `post` (from any thread when given the event loop that reads it)."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None,
                 on_skip: Callable[[int], None] | None = None) -> None:
        self.request_id = request_id
        self.aborted = False
        self.skipped: int | None = None  # what the receiver said it holds
        self.on_skip = on_skip
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def post(self, item: KVMessage | KVChunkData | PdserveError) -> None:
        """Deliver a message (a sender's chunk is read as a received one), or fail the stream with an error."""
        if self._loop is None:
            self._queue.put_nowait(item)
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def close(self) -> None:
        """End the stream, as a sender that goes away does."""
        self.post(_END)  # type: ignore[arg-type]

    async def next(self) -> KVMessage:
        if self.aborted:
            raise KVTransferError("the transfer was aborted", request_id=self.request_id)
        item = await self._queue.get()
        if item is _END:
            raise KVTransferError("the KV stream ended before the first token", request_id=self.request_id)
        if isinstance(item, PdserveError):
            raise item
        return chunk_view(item) if isinstance(item, KVChunkData) else item

    async def skip(self, num_cached_tokens: int) -> None:
        self.skipped = num_cached_tokens
        if self.on_skip is not None:
            self.on_skip(num_cached_tokens)

    def abort(self) -> None:
        self.aborted = True
