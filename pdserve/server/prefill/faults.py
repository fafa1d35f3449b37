"""Test-only fault injection, read once at start-up from PDSERVE_FAULT.

`PDSERVE_FAULT=kill_after_chunks=K` makes a prefill daemon SIGKILL itself when
it is about to send its K-th KV chunk (counted over the process's life);
`pause_after_chunks=K` makes it stall there forever instead, and `stop_after_chunks=K`
SIGSTOPs the whole process there, once (a test SIGCONTs it later). Tests use it so
that a fault lands at an exact point of a transfer, not by a race.
The K-th chunk can also be sent damaged, for the receiver's checks to catch:
`truncate_chunk=K` (fewer bytes than its token range needs), `reorder_chunk=K`
(a sequence number out of order), `foreign_chunk=K` (another request's id),
`misplace_chunk=K` (a layer index past the model's), `corrupt_chunk=K` (one bit of its K
payload flipped after encoding, so only the payload checksum can tell).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from collections.abc import Callable

from pdserve.kv_transfer.sender import KVChunkData
from pdserve.v1 import prefill_pb2

log = logging.getLogger("pdserve.faults")


class FaultInjector:
    def __init__(self, action: str | None = None, after_chunks: int = 0) -> None:
        self.action = action
        self.after_chunks = after_chunks
        self._sent = 0

    @classmethod
    def from_env(cls) -> FaultInjector:
        spec = os.environ.get("PDSERVE_FAULT", "")
        if not spec:
            return cls()
        key, _, value = spec.partition("=")
        action = {"kill_after_chunks": "kill", "pause_after_chunks": "pause",
                  "stop_after_chunks": "stop", "truncate_chunk": "truncate",
                  "reorder_chunk": "reorder", "foreign_chunk": "foreign", "misplace_chunk": "misplace",
                  "corrupt_chunk": "corrupt"}.get(key)
        if action is None:
            raise ValueError(f"PDSERVE_FAULT: unknown fault {key!r}")
        log.warning("fault injection armed: %s after %s chunks", action, value)
        return cls(action, int(value))

    async def encode(self, chunk: KVChunkData, encode: Callable[[KVChunkData], bytes]) -> bytes:
        """The chunk's message, damaged when armed for it; may kill or stall the process instead."""
        if self.action is None:
            return encode(chunk)
        self._sent += 1
        if self._sent < self.after_chunks:
            return encode(chunk)
        if self.action in _DAMAGE:  # the K-th chunk only
            if self._sent > self.after_chunks:
                return encode(chunk)
            log.warning("fault injection: %s chunk %d", self.action, chunk.sequence_number)
            return _DAMAGE[self.action](chunk, encode)
        if self.action == "kill":
            log.warning("fault injection: SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "stop":
            if self._sent == self.after_chunks:
                log.warning("fault injection: SIGSTOP")
                os.kill(os.getpid(), signal.SIGSTOP)  # frozen here until SIGCONT, then goes on
            return encode(chunk)
        log.warning("fault injection: stalling")
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _flip_payload_bit(message: bytes) -> bytes:
    response = prefill_pb2.PrefillResponse.FromString(message)
    k = bytearray(response.chunk.k_bytes)
    k[len(k) // 2] ^= 1
    response.chunk.k_bytes = bytes(k)
    return response.SerializeToString()


# The K-th chunk's message, damaged: (chunk, encode) -> bytes.
_DAMAGE = {
    "truncate": lambda c, encode: encode(dataclasses.replace(c, k=c.k[:, :-1], v=c.v[:, :-1])),
    "reorder": lambda c, encode: encode(dataclasses.replace(c, sequence_number=c.sequence_number + 1)),
    "foreign": lambda c, encode: encode(dataclasses.replace(c, request_id="another-request")),
    "misplace": lambda c, encode: encode(dataclasses.replace(c, layer=c.layer + 1000)),
    # After encoding, where the sender's own checks no longer apply.
    "corrupt": lambda c, encode: _flip_payload_bit(encode(c)),
}
