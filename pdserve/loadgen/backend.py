"""What a load generator needs from a server: one streaming call per request.

A backend turns a BenchRequest into an async iterator of arrival events: each
yield is the number of output tokens that arrived together (usually 1). The
runner timestamps the yields; the backend does no timing of its own. A request
that fails raises; the runner records the error and goes on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class BenchRequest:
    index: int
    max_tokens: int
    # Exactly one of the two: token ids (synthetic, interference) or a conversation (chat).
    prompt_token_ids: tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] | None = None
    # The workload's label for this request, e.g. "short" or "long" in the interference mix.
    kind: str = "synthetic"
    # Ask the server to produce exactly max_tokens (ignore end-of-sequence) when it can.
    ignore_eos: bool = True
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def num_prompt_tokens(self) -> int | None:
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else None


class Backend(Protocol):
    name: str

    async def start(self) -> None:
        """Connect or load; called once before the first request."""

    def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        """Yield the number of output tokens in each arrival, in order, until the request is done."""

    async def close(self) -> None:
        """Release connections, threads and child processes."""
