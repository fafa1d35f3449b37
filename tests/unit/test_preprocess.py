"""Preprocessing: input validation naming the field, chat template, and the versioned cache."""

from __future__ import annotations

import pytest

from pdserve.errors import InvalidRequestError
from pdserve.preprocess import MAX_PROMPT_CHARS, ChatMessage, PreprocessCache, Preprocessor
from tests.factories import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(prompt=""), "prompt"),
        (dict(), "prompt"),
        (dict(prompt="a", prompt_token_ids=[1]), "prompt"),
        (dict(prompt_token_ids=[]), "prompt_token_ids"),
        (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), "prompt"),
        (dict(prompt="bad \ud800 surrogate"), "prompt"),
        (dict(messages=[]), "messages"),
        (dict(messages=[ChatMessage("robot", "hi")]), "messages[0].role"),
        (dict(messages=[ChatMessage("user", "ok"), ChatMessage("user", "\udfff")]), "messages[1].content"),
    ],
)
def test_invalid_input_names_the_field(tokenizer, kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        Preprocessor(tokenizer)(**kwargs)
    assert err.value.field == field


def test_chat_template_is_applied_without_double_special_tokens(tokenizer):
    pre = Preprocessor(tokenizer)
    ids = pre(messages=[ChatMessage("user", "hello")])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert ids == tokenizer.encode(text, add_special_tokens=False)


def test_token_ids_with_default_options_are_the_generate_path_and_share_its_cache(tokenizer):
    pre = Preprocessor(tokenizer)
    chat = [ChatMessage("user", "hello")]
    assert pre.token_ids(messages=chat) == pre(messages=chat) and pre.cache.num_hits == 1
    assert pre.token_ids(prompt="hello there") == pre(prompt="hello there") == tokenizer.encode("hello there")
    assert pre.token_ids(prompt="") == tokenizer.encode("")  # tokenizing an empty prompt is no error
    full, hits = pre(messages=chat), pre.cache.num_hits
    without = pre.token_ids(messages=chat, add_generation_prompt=False)  # not what generate gets: not cached
    assert without == full[:len(without)] and len(without) < len(full)
    assert pre.cache.num_hits == hits and pre(messages=chat) == full
    with pytest.raises(InvalidRequestError) as err:
        pre.token_ids(messages=[ChatMessage("robot", "hi")])
    assert err.value.field == "messages[0].role"


def test_detokenize_round_trips_and_names_an_id_out_of_the_vocabulary(tokenizer):
    pre = Preprocessor(tokenizer)
    ids = pre(prompt="hello there")
    assert pre.detokenize(ids) == "hello there" and pre.detokenize([]) == ""
    assert "".join(pre.token_strs(ids)).replace("\u0120", " ") == "hello there"
    with pytest.raises(InvalidRequestError) as err:
        pre.detokenize([*ids, len(tokenizer)], request_id="r1")
    assert err.value.field == f"token_ids[{len(ids)}]" and str(err.value).startswith("request r1: ")


def test_cache_hits_on_repeat_and_never_across_versions(tokenizer):
    cache = PreprocessCache()
    v1, v2 = Preprocessor(tokenizer, "1", cache), Preprocessor(tokenizer, "2", cache)
    first = v1(prompt="hello there")
    assert v1(prompt="hello there") == first and cache.num_hits == 1
    v2(prompt="hello there")
    assert cache.num_hits == 1 and cache.num_misses == 2


def test_cache_entries_expire_and_are_bounded():
    clock = [0.0]
    cache = PreprocessCache(max_entries=2, ttl_s=10, now=lambda: clock[0])
    cache.put("a", [1])
    cache.put("b", [2])
    cache.put("c", [3])
    assert cache.get("a") is None and cache.get("b") == [2]
    clock[0] = 11.0
    assert cache.get("b") is None


def test_cache_is_bounded_in_tokens_and_keys_by_a_digest_of_the_input(tokenizer):
    cache = PreprocessCache(max_tokens=10)
    cache.put("a", list(range(6)))
    cache.put("b", list(range(4)))
    assert len(cache) == 2 and cache.get("a") == list(range(6))
    cache.put("c", [7, 8])  # 12 tokens held: the least recently used ("b") goes
    assert cache.get("b") is None and cache.get("a") == list(range(6)) and cache.get("c") == [7, 8]
    pre = Preprocessor(tokenizer, "1", PreprocessCache())
    chat = [ChatMessage("user", "hi"), ChatMessage("assistant", "yo")]
    first = pre(messages=chat)
    assert pre(messages=[ChatMessage("user", "hi"), ChatMessage("assistant", "yo")]) == first
    assert pre.cache.num_hits == 1
    # The same characters split differently between fields are another input.
    pre(messages=[ChatMessage("user", "hiassistant"), ChatMessage("user", "yo")])
    assert pre.cache.num_hits == 1
    key, (_, stored) = next(iter(pre.cache._entries.items()))
    assert len(key[1]) == 16 and stored.itemsize == 4  # a digest, and 4 bytes per token id


def test_preprocess_config_sets_template_limits_and_a_content_derived_version(tokenizer, tmp_path):
    import json

    from pdserve.preprocess import load_preprocessor

    config = tmp_path / "pre.json"
    config.write_text(json.dumps({"chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
                                  "max_prompt_chars": 10}))
    a = load_preprocessor(tokenizer, str(config))
    assert a.apply_chat_template([ChatMessage("user", "hi")]) == "[hi]"
    with pytest.raises(InvalidRequestError, match="more than 10"):
        a(prompt="x" * 11)
    config.write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!", "max_prompt_chars": 10}))
    b = load_preprocessor(tokenizer, str(config))
    assert b.version != a.version  # another file, another version: no cache entry is shared
    assert load_preprocessor(tokenizer, None).version == Preprocessor(tokenizer).version
    config.write_text("{not json")
    with pytest.raises(InvalidRequestError) as err:
        load_preprocessor(tokenizer, str(config))
    assert err.value.field == "preprocess_config"


TOOLS_TEMPLATE = ("{% if tools %}[tools {{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
                  "{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
TOOLS = '[{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "f"}}]'


def test_tools_reach_a_template_that_takes_them_and_key_the_cache(tokenizer):
    pre = Preprocessor(tokenizer, chat_template=TOOLS_TEMPLATE)
    chat = [ChatMessage("user", "hi")]
    assert pre.apply_chat_template(chat, tools_json=TOOLS) == "[tools get_weather,f][hi]"
    assert pre.apply_chat_template(chat) == pre.apply_chat_template(chat, tools_json="[]") == "[hi]"
    with_tools = pre(messages=chat, tools_json=TOOLS)
    assert with_tools == tokenizer.encode("[tools get_weather,f][hi]", add_special_tokens=False)
    without = pre(messages=chat)
    assert without != with_tools and pre.cache.num_hits == 0  # the tools are part of the key
    assert pre(messages=chat, tools_json=TOOLS) == with_tools and pre.cache.num_hits == 1
    assert pre.token_ids(messages=chat, tools_json=TOOLS) == with_tools  # what /tokenize counts
    for bad in ("{not json", '{"name": "f"}', "[1, 2]"):
        with pytest.raises(InvalidRequestError) as err:
            pre(messages=chat, tools_json=bad)
        assert err.value.field == "tools"


def test_a_template_that_takes_no_tools_refuses_them_unless_optional(tokenizer):
    pre = Preprocessor(tokenizer)  # the tiny model's template never mentions tools
    chat = [ChatMessage("user", "hi")]
    with pytest.raises(InvalidRequestError) as err:
        pre(messages=chat, tools_json=TOOLS, request_id="r1")
    assert err.value.field == "tools"
    assert str(err.value) == "request r1: tools: this model's chat template takes no tools"
    assert pre(messages=chat, tools_json=TOOLS, tools_optional=True) == pre(messages=chat)
    with pytest.raises(InvalidRequestError) as err:
        pre(prompt="hi", tools_json=TOOLS)
    assert err.value.field == "tools"


def test_what_a_template_refuses_names_the_field(tokenizer):
    chat = [ChatMessage("user", "hi")]
    pre = Preprocessor(tokenizer, chat_template="{% for t in tools %}{{ t.function.name.upper() }}{% endfor %}")
    assert pre.apply_chat_template(chat, tools_json=TOOLS) == "GET_WEATHERF"
    with pytest.raises(InvalidRequestError) as err:
        pre(messages=chat, tools_json='[{"name": "f"}]')
    assert err.value.field == "tools" and "no attribute 'function'" in str(err.value)
    pre = Preprocessor(tokenizer, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate") as err:
        pre(messages=chat)
    assert err.value.field == "messages"


def test_smollm2s_template_takes_no_tools():
    from tests.unit.test_detokenizer import load_smollm2_tokenizer

    pre = Preprocessor(load_smollm2_tokenizer())
    with pytest.raises(InvalidRequestError, match="takes no tools"):
        pre(messages=[ChatMessage("user", "hi")], tools_json=TOOLS)
