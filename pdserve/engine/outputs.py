"""What the engine reports per request per step, and the checks that finish a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class RequestOutput:
    """New tokens and text of one request since its last output."""

    request_id: str
    token_ids: list[int]
    text: str
    # One entry per token in token_ids when the request asked for logprobs, else None.
    logprobs: list[TokenLogprobs | None] | None
    # The request's last output: every one of its samples has finished.
    finished: bool = False
    # "stop" | "length" | "abort" when this output's sample has finished.
    finish_reason: str | None = None
    # Which sample (0 .. params.n - 1) these tokens belong to.
    index: int = 0
    # With params.prompt_logprobs, on sample 0's first output: one entry per prompt token (None for the first).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # Seconds: queued before first scheduled; arrival to first token.
    queue_s: float | None = None
    ttft_s: float | None = None
    num_preemptions: int = 0
    # Set when the output is an error instead of tokens (e.g. a failed remote KV import).
    error: Exception | None = field(default=None)


class OutputProcessor:
    """Turns sampled tokens into text deltas and decides when a request is done."""

    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._detok: dict[str, IncrementalDetokenizer] = {}

    def add(self, seq: Sequence) -> None:
        detok = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, stop=seq.params.stop
        )
        if seq.num_resumed_tokens:
            # Tokens already streamed elsewhere: feed them so the next delta continues the text.
            detok.add(seq.output_token_ids)
        self._detok[seq.seq_id] = detok

    def remove(self, seq_id: str) -> None:
        self._detok.pop(seq_id, None)

    def flush(self, seq: Sequence) -> str:
        """The text held back so far (an incomplete character's tokens), for a sequence that ends here."""
        return self._detok[seq.seq_id].flush()

    def on_token(self, seq: Sequence, token_id: int) -> tuple[str, SequenceStatus | None]:
        """Text delta for a newly appended token, and the finished state it causes, if any."""
        params = seq.params
        detok = self._detok[seq.seq_id]
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return detok.add([token_id]).text + detok.flush(), SequenceStatus.FINISHED_STOPPED
        delta = detok.add([token_id])
        if delta.stopped:
            return delta.text, SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return delta.text + detok.flush(), SequenceStatus.FINISHED_LENGTH
        return delta.text, None
