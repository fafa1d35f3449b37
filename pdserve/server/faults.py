"""Test-only fault injection, read once at start-up from PDSERVE_FAULT.

`PDSERVE_FAULT=kill_after_chunks=K` makes a prefill daemon SIGKILL itself when
it is about to send its K-th KV chunk (counted over the process's life);
`pause_after_chunks=K` makes it stall there forever instead. Tests use it so
that a fault lands at an exact point of a transfer, not by a race.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

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
        action = {"kill_after_chunks": "kill", "pause_after_chunks": "pause"}.get(key)
        if action is None:
            raise ValueError(f"PDSERVE_FAULT: unknown fault {key!r}")
        log.warning("fault injection armed: %s after %s chunks", action, value)
        return cls(action, int(value))

    async def on_chunk(self, sequence_number: int) -> None:
        if self.action is None:
            return
        self._sent += 1
        if self._sent < self.after_chunks:
            return
        if self.action == "kill":
            log.warning("fault injection: SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            log.warning("fault injection: stalling")
            await asyncio.Event().wait()
