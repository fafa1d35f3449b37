"""Plain result types of the client SDK: what a caller gets instead of protobuf.

Every type is a frozen, slotted dataclass built by `pdserve.client.convert`.
Token id and logprob sequences are lists, so they compare equal to the lists
a caller (or a test oracle) holds; do not mutate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
PrefillMode = Literal["remote", "local"]
WorkerRole = Literal["prefill", "decode"]
WorkerHealth = Literal["healthy", "draining", "unhealthy"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn; `generate(messages=...)` also accepts {"role", "content"} dicts."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's natural-log probability (after temperature and filtering)."""

    token_id: int
    logprob: float
    # For a generated token: the most likely alternatives at its position, most
    # likely first (empty for the alternatives themselves, and with logprobs=0).
    top: list[TokenLogprob] = field(default_factory=list)
    # The token's bytes in the vocabulary (possibly part of a UTF-8 character);
    # b"" when the server did not fill them.
    token_bytes: bytes = b""


@dataclass(frozen=True, slots=True)
class Delta:
    """New completion tokens, as streamed."""

    # The text these tokens add; may be empty while a character is incomplete.
    text: str
    token_ids: list[int]
    # One entry per token id; None unless the request asked for logprobs.
    logprobs: list[TokenLogprob] | None
    # Position of token_ids[0] in the completion.
    completion_index: int = 0
    # Which sample (0 .. n - 1) these tokens extend.
    index: int = 0
    # With prompt_logprobs, on sample 0's first delta only: one entry per prompt
    # token, None for the first (nothing predicts it); None otherwise.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens whose KV came from a prefix cache instead of being computed.
    cached_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Timings:
    """Where a request's time went, in milliseconds; stages that did not happen are 0."""

    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    decode_ms: float
    total_ms: float
    time_to_first_token_ms: float


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The end of one sample of a generate stream; the stream iterator keeps them as
    `.results` (by index) and sample 0's as `.result`."""

    # None only if a server broke the protocol and left it unset.
    finish_reason: FinishReason | None
    usage: Usage
    timings: Timings
    request_id: str
    prefill_worker_id: str
    decode_worker_id: str
    prefill_mode: PrefillMode | None
    # Prefill candidates the decode daemon tried (0 when it prefilled locally at once).
    num_prefill_attempts: int
    # With finish_reason "stop": what matched; both None otherwise.
    stop_string: str | None
    stop_token_id: int | None
    # Which sample this result ends; usage counts that sample's completion tokens.
    index: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole generation: the concatenated deltas plus the stream's result, of sample 0;
    with n > 1 every sample is in `samples`."""

    text: str
    token_ids: list[int]
    # One entry per token id; None unless the request asked for logprobs.
    logprobs: list[TokenLogprob] | None
    finish_reason: FinishReason | None
    usage: Usage
    timings: Timings
    request_id: str
    prefill_worker_id: str
    decode_worker_id: str
    prefill_mode: PrefillMode | None
    num_prefill_attempts: int
    stop_string: str | None
    stop_token_id: int | None
    # With n > 1: every sample's Completion in index order (samples[0] is this one
    # without `samples`); empty for n = 1.
    samples: list[Completion] = field(default_factory=list)
    # With prompt_logprobs: one entry per prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass(frozen=True, slots=True)
class KVStats:
    """A worker's KV block pool; num_free + num_used == num_total."""

    block_size: int
    num_total: int
    num_free: int
    num_used: int
    # Free blocks still holding a prefix-cache entry.
    num_cached: int
    prefix_cache_hit_rate: float


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """The load a worker reports; the router places on it."""

    num_running_requests: int
    num_waiting_requests: int
    num_pending_prefill_tokens: int
    kv: KVStats
    # Over the worker's last 60 s (0 without a sample): tokens per second, p99 latencies.
    output_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    p99_ttft_ms: float = 0.0
    p99_itl_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the router knows about one worker (`Client.cluster_status()`)."""

    worker_id: str
    role: WorkerRole | None
    address: str
    health: WorkerHealth | None
    load: WorkerLoad
    # "architecture/dtype/weights_digest", compared as an opaque string.
    model_fingerprint: str
    preprocessing_version: str
    # "layers=L kv_heads=H head_dim=D dtype=T".
    kv_layout: str
    last_heartbeat_age_ms: float
    # The worker's rollout label (--version); "" when not given.
    version: str = ""


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """A worker's own statistics (`Client.stats()` against a prefill or decode daemon)."""

    # Empty if the worker has not registered with a router.
    worker_id: str
    role: WorkerRole | None
    load: WorkerLoad
