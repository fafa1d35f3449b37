"""A request inside the engine: its tokens, its KV blocks and its state.

Lifecycle:
1. WAITING: queued; no blocks (or, after a preemption, blocks freed and KV to recompute).
2. WAITING_FOR_REMOTE_KV: blocks reserved, KV arriving from a prefill worker; not scheduled.
3. RUNNING: in the continuous batch; each step computes its uncomputed tokens.
4. FINISHED_*: blocks freed; the engine forgets it after the last output.
"""

from __future__ import annotations

import enum
import time

from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.structured_output import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset(
    {SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED}
)


class Sequence:
    """Token ids, block table and progress of one request."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        output_token_ids: list[int] | None = None,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        # Which of the request's params.n samples this is; sample 0 is the one that prefills.
        self.index = index
        # The engine's key: the request's id for sample 0, made unique for the others.
        self.seq_id = request_id if index == 0 else f"{request_id}\x00{index}"
        self.params = params
        # The effective sampling seed: params.seed, or one drawn at submission.
        self.seed = seed
        self.num_prompt_tokens = len(prompt_token_ids)
        # Prompt then output: one list, so a step reads any range without concatenation.
        self.token_ids: list[int] = list(prompt_token_ids) + list(output_token_ids or ())
        # Output tokens given at submission (a request resumed elsewhere); not streamed again.
        self.num_resumed_tokens = len(output_token_ids or ())
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose KV is in this sequence's blocks.
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at the last allocation.
        self.num_cached_tokens = 0
        # Chained hashes of the leading full, computed blocks (prefix-cache keys).
        self.block_hashes: list[int] = []
        self.num_preemptions = 0
        # params.structured_output: where the output is in its grammar (follows every token taken).
        self.grammar: GrammarMatcher | None = None
        # params.prompt_logprobs: one entry per prompt token computed so far (None for the first).
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None if params.prompt_logprobs is None else [None]
        # Prefill-worker requests: stream this sequence's KV out as it is computed.
        self.export_kv = False
        self.num_exported_tokens = 0
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
