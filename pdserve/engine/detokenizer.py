"""Incremental detokenization of one request's output, with stop strings.

Owns turning a stream of generated token ids into text deltas that
 - concatenate exactly to `tokenizer.decode(output_ids, skip_special_tokens=True)`,
 - never contain half of a multi-byte character (byte-level BPE and byte-fallback
   tokenizers spread one Chinese character or emoji over several tokens),
 - never contain a stop string or anything after it, and never emit text that a
   stop string completed later would have to retract,
at a cost per token that does not grow with the length of the output.

How the window works: only the last few tokens are ever decoded. The first
`num_context` of them were already emitted and are kept only as context, so that
decoders that treat the first token of a string specially (SentencePiece strips
its leading space) decode the new tokens as they would mid-text. Once the
window's text grows and ends in a complete character, the tokens read since the
last time become the next window's context and everything before them is
forgotten. A window that cannot settle for `_MAX_HELD_TOKENS` tokens (invalid
bytes, skipped special tokens) is cut at its last settled token boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REPLACEMENT_CHAR = "\ufffd"
# No UTF-8 character is longer than 4 bytes, and every token carries at least one
# byte, so a window still unsettled after this many new tokens holds invalid bytes
# or characters already complete somewhere inside it: release what is settled
# rather than let the window, and the cost of decoding it, grow without bound.
_MAX_HELD_TOKENS = 8


@dataclass(slots=True)
class DetokenizerOutput:
    # New text to stream (may be "").
    text: str
    # A stop string matched; text is cut right before it.
    stopped: bool


class IncrementalDetokenizer:
    """Streams the text of one request's generated tokens.

    `prompt_token_ids` is accepted for the engine's convenience but does not take
    part in decoding: the contract is the text of the output tokens alone (as an
    OpenAI-style completion and the transformers oracle define it), and prefixing
    prompt tokens would change it (e.g. a SentencePiece leading space, or a prompt
    that ends inside a multi-byte character).

    Replacement characters (U+FFFD) at the end of the decoded text are held back
    while a later token may still turn them into a character. `flush` drops the
    last one, the incomplete character (so an output that ends in a literal U+FFFD
    loses that one character), and releases the rest.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        # The tokens decoded each step; the first `_num_context` are already emitted context.
        self._window: list[int] = []
        self._num_context = 0
        # Characters of decode(self._window) already passed on (to the stop check).
        self._num_window_chars = 0
        # Decoded text held back because it could be the beginning of a stop string.
        self._pending = ""
        self._emitted: list[str] = []
        self._stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._emitted) > 1:
            # Joined on read, not per token: the engine streams deltas and rarely reads this.
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string matched (in `add` or in `flush`)."""
        return self._stopped

    def add(self, token_ids: Sequence[int]) -> DetokenizerOutput:
        """Takes newly generated token(s); returns the text now safe to stream."""
        if self._stopped:
            return DetokenizerOutput(text="", stopped=True)
        if not token_ids:
            return DetokenizerOutput(text="", stopped=False)
        self._window.extend(token_ids)
        return self._release(self._decode_new(), final=False)

    def flush(self) -> str:
        """At finish: releases held-back text, minus a still incomplete last character."""
        if self._stopped:
            return ""
        window_text = self._decode(self._window)
        # A lossy UTF-8 decoder (byte-level BPE) replaces an incomplete last character
        # by exactly one U+FFFD; any before it stand for invalid bytes, which the full
        # decode shows too.
        if window_text.endswith(REPLACEMENT_CHAR):
            window_text = window_text[:-1]
        new = window_text[self._num_window_chars :]
        self._num_window_chars = max(self._num_window_chars, len(window_text))
        return self._release(new, final=True).text

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_new(self) -> str:
        """Newly decoded text of the window, up to its last complete character."""
        window_text = self._decode(self._window)
        stable_end = len(window_text.rstrip(REPLACEMENT_CHAR))
        complete = stable_end == len(window_text)
        if complete and stable_end > self._num_window_chars:
            new = window_text[self._num_window_chars :]
            self._advance(len(self._window), window_text)
            return new
        # Either the trailing U+FFFD may be a character whose remaining bytes are still
        # to come, or the new tokens decoded to nothing (skipped special tokens) and
        # must not become context on their own: a SentencePiece decoder would then
        # strip the next token's leading space.
        new = window_text[self._num_window_chars : stable_end]
        self._num_window_chars = max(self._num_window_chars, stable_end)
        if len(self._window) - self._num_context <= _MAX_HELD_TOKENS:
            return new
        if complete:
            # That many tokens decoding to nothing are skipped special tokens, which
            # the decoder never sees: dropping them changes no text.
            del self._window[self._num_context :]
            return new
        return new + self._release_settled(window_text)

    def _release_settled(self, window_text: str) -> str:
        """Releases what is settled of a window whose text ends in U+FFFD for too long.

        Reads up to the last token boundary that is settled: one where the text so
        far ends in a complete character, else (a run of invalid bytes) one where
        decoding the two sides apart gives the same text as decoding them together,
        so that a character the last tokens may still complete stays held.
        """
        boundaries = range(len(self._window) - 1, self._num_context, -1)
        heads: dict[int, str] = {}
        for num_read in boundaries:
            heads[num_read] = head = self._decode(self._window[:num_read])
            if not head.endswith(REPLACEMENT_CHAR):
                return self._read_up_to(num_read, head)
        for num_read in boundaries:
            if heads[num_read] + self._decode(self._window[num_read:]) == window_text:
                return self._read_up_to(num_read, heads[num_read])
        return self._read_up_to(len(self._window), window_text)

    def _read_up_to(self, num_read: int, head: str) -> str:
        """Advances past window[:num_read], whose text is `head`; returns its unsent text."""
        new = head[self._num_window_chars :]
        self._advance(num_read, head, overshoot=max(0, self._num_window_chars - len(head)))
        return new

    def _advance(self, num_read: int, read_text: str, overshoot: int = 0) -> None:
        """Marks window[:num_read] as read: the tokens read since the last advance
        become the context of the next window, and the old context is forgotten.

        `read_text` is the decoded text of window[:num_read]; `overshoot` counts the
        characters already passed on beyond it.
        """
        if self._num_context:
            del self._window[: self._num_context]
            num_read -= self._num_context
            read_text = self._decode(self._window[:num_read])
        self._num_context = num_read
        self._num_window_chars = len(read_text) + overshoot

    def _release(self, new: str, *, final: bool) -> DetokenizerOutput:
        """Passes new text through the stop-string check and records what is emitted."""
        if not self._stop:
            self._record(new)
            return DetokenizerOutput(text=new, stopped=False)
        text = self._pending + new
        cut = _first_stop(text, self._stop)
        if cut is not None:
            self._stopped = True
            self._pending = ""
            self._record(text[:cut])
            return DetokenizerOutput(text=text[:cut], stopped=True)
        num_held = 0 if final else _stop_prefix_len(text, self._stop)
        out, self._pending = text[: len(text) - num_held], text[len(text) - num_held :]
        self._record(out)
        return DetokenizerOutput(text=out, stopped=False)

    def _record(self, emitted: str) -> None:
        if emitted:
            self._emitted.append(emitted)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index of the earliest stop-string occurrence in `text`, if any."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string.

    Everything held back this way is at most one character shorter than the longest
    stop string, which bounds both the hold-back and the cost of this search.
    """
    longest = 0
    for s in stop:
        start = max(0, len(text) - len(s) + 1)
        i = text.find(s[0], start)
        while i != -1 and len(text) - i > longest:
            if s.startswith(text[i:]):
                longest = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return longest
