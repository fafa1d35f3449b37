"""The router's OpenAI-compatible HTTP API through the real `openai` client, and vLLM's /tokenize."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request

import grpc
import jsonschema
import openai
import pytest

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.routing.registry import Registry, Role
from pdserve.server.router.tokenization import Tokenization
from pdserve.v1 import prefill_pb2_grpc, tokenize_pb2

PROMPT_IDS = [5, 9, 14, 22, 31, 40, 51, 63]


@pytest.fixture(scope="module")
def served(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.5, http_port=0)
    with LocalCluster(spec) as cluster:
        http = cluster.describe()["http"]
        yield cluster, openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=60), http


def test_completion_equals_the_sdks_for_the_same_seed(served):
    cluster, oai, _ = served
    got = oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=8, temperature=1.0, seed=7)
    with Client(cluster.address) as sdk:
        want = sdk.complete(prompt_token_ids=PROMPT_IDS, max_tokens=8, temperature=1.0, seed=7)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(PROMPT_IDS), len(want.token_ids))
    streamed = oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=8, temperature=1.0, seed=7,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_chat_streaming_and_whole_equal_the_sdks(served):
    cluster, oai, _ = served
    messages = [{"role": "user", "content": "hello there"}]
    with Client(cluster.address) as sdk:
        want = sdk.complete(messages=messages, max_tokens=6, temperature=0.0)
    whole = oai.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0)
    assert whole.choices[0].message.content == want.text and whole.choices[0].message.role == "assistant"
    chunks = list(oai.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {"five": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),  # out of the vocabulary: told by the worker
    ({"echo": True, "logprobs": 2, "prompt": [5, 100_000]}, "prompt[1]"),  # told by the worker's detokenize
])
def test_bad_fields_are_400_naming_the_field_and_the_next_request_is_served(served, kwargs, param):
    _, oai, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="default", **{"prompt": PROMPT_IDS, "max_tokens": 4, **kwargs})
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and param in err.value.body["message"]
    ok = oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_unknown_model_is_404_and_models_lists_the_served_one(served):
    _, oai, http = served
    assert [m.id for m in oai.models.list()] == ["default"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-9", prompt=PROMPT_IDS, max_tokens=2)
    with urllib.request.urlopen(f"{http}/health", timeout=5) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    request = urllib.request.Request(f"{http}/v1/completions", data=b"{not json", method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["param"] == "body"


def post(http: str, path: str, body: dict, headers: dict | None = None):
    """(status, response headers, body text) of a JSON POST."""
    request = urllib.request.Request(f"{http}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def test_the_callers_request_id_is_the_requests_and_comes_back(served):
    _, _, http = served
    body = {"model": "default", "prompt": PROMPT_IDS, "max_tokens": 3}
    status, headers, text = post(http, "/v1/completions", body, {"X-Request-Id": "caller-id-1"})
    assert status == 200 and headers["X-Request-Id"] == "caller-id-1"
    assert json.loads(text)["id"] == "cmpl-caller-id-1"
    status, headers, text = post(http, "/v1/completions", {**body, "stream": True}, {"X-Request-Id": "caller-id-2"})
    assert status == 200 and headers["X-Request-Id"] == "caller-id-2" and text.rstrip().endswith("data: [DONE]")
    status, headers, text = post(http, "/v1/completions", body)  # none given: a new one, echoed
    generated = headers["X-Request-Id"]
    assert status == 200 and len(generated) == 32 and json.loads(text)["id"] == f"cmpl-{generated}"


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "caf\u00e9"])
def test_a_bad_request_id_is_400_naming_the_header(served, bad):
    _, oai, http = served
    header = bad.encode("utf-8").decode("latin-1")  # as it crosses HTTP
    status, headers, text = post(http, "/v1/completions", {"prompt": PROMPT_IDS, "max_tokens": 2},
                                 {"X-Request-Id": header})
    assert status == 400 and json.loads(text)["error"]["param"] == "X-Request-Id"
    assert len(headers["X-Request-Id"]) == 32  # the refusal carries an id of its own
    assert oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=2).choices[0].text is not None


# -- vLLM's /tokenize and /detokenize ---------------------------------------------------------


def post_json(http: str, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    status, _, text = post(http, path, body, headers)
    return status, json.loads(text)


def test_tokenize_counts_what_a_completion_reports_for_a_prompt_and_a_chat(served):
    _, oai, http = served
    prompt, messages = "the cat sat on the mat", [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": "hello there"}]
    status, tokenized = post_json(http, "/tokenize", {"model": "default", "prompt": prompt})
    assert status == 200 and set(tokenized) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokenized["count"] == len(tokenized["tokens"]) > 0 and tokenized["token_strs"] is None
    assert tokenized["max_model_len"] > tokenized["count"]
    completion = oai.completions.create(model="default", prompt=prompt, max_tokens=1)
    assert completion.usage.prompt_tokens == tokenized["count"]

    status, chat = post_json(http, "/tokenize", {"messages": messages, "return_token_strs": True})
    assert status == 200 and len(chat["token_strs"]) == chat["count"]
    answer = oai.chat.completions.create(model="default", messages=messages, max_tokens=1)
    assert answer.usage.prompt_tokens == chat["count"]
    _, without = post_json(http, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert without["tokens"] == chat["tokens"][:without["count"]] and without["count"] < chat["count"]
    assert post_json(http, "/tokenize", {"prompt": ""}) == (200, {"count": 0, "max_model_len": chat["max_model_len"],
                                                                  "tokens": [], "token_strs": None})


def test_detokenize_round_trips(served):
    _, _, http = served
    _, tokenized = post_json(http, "/tokenize", {"prompt": "hello there, world"})
    status, headers, text = post(http, "/detokenize", {"model": "default", "tokens": tokenized["tokens"]},
                                 {"X-Request-Id": "detok-1"})
    assert status == 200 and headers["X-Request-Id"] == "detok-1"
    assert json.loads(text) == {"prompt": "hello there, world"}
    # A chat's tokens read back as the rendered template, which tokenizes to the same ids.
    _, chat = post_json(http, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    _, rendered = post_json(http, "/detokenize", {"tokens": chat["tokens"]})
    assert "hi" in rendered["prompt"]
    _, again = post_json(http, "/tokenize", {"prompt": rendered["prompt"], "add_special_tokens": False})
    assert again["tokens"] == chat["tokens"]
    assert post_json(http, "/detokenize", {"tokens": []}) == (200, {"prompt": ""})


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": ["a", "b"]}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),  # told by the worker
    ("/tokenize", {"messages": [{"role": "robot", "content": "b"}]}, "messages[0].role"),  # told by the worker
    ("/tokenize", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "continue_final_message": True},
     "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "chat_template": "{{ x }}"}, "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "b"}], "tools": [{"type": "function"}]},
     "tools[0].function"),
    ("/tokenize", {"prompt": "b", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": [5, -1]}, "tokens[1]"),
    ("/detokenize", {"tokens": [5, 6, 1.5]}, "tokens[2]"),
    ("/detokenize", {"tokens": [5, 6, 7, 100_000]}, "tokens[3]"),  # out of the vocabulary: told by the worker
])
def test_bad_tokenization_fields_are_400_naming_the_param(served, path, body, param):
    _, _, http = served
    status, answer = post_json(http, path, body)
    assert status == 400 and answer["error"]["param"] == param and param in answer["error"]["message"]


def test_tokenization_of_an_unknown_model_is_404(served):
    _, _, http = served
    assert post_json(http, "/tokenize", {"model": "gpt-9", "prompt": "a"})[0] == 404
    assert post_json(http, "/detokenize", {"model": "gpt-9", "tokens": [5]})[0] == 404


def test_workers_answer_tokenize_with_invalid_argument_naming_the_field(served):
    cluster, _, _ = served
    described = cluster.describe()
    with grpc.insecure_channel(described["prefill"][0]) as channel:
        with pytest.raises(grpc.RpcError) as err:
            prefill_pb2_grpc.PrefillServiceStub(channel).Detokenize(
                tokenize_pb2.DetokenizeRequest(request_id="r-7", token_ids=[5, 6, 7, 100_000]), timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request r-7: token_ids[3]: 100000 is not a token id")
    with Client(described["decode"][0], service="decode") as decode:
        with pytest.raises(InvalidRequestError) as invalid:
            decode.tokenize(messages=[{"role": "user", "content": "hi"}, {"role": "robot", "content": "yo"}])
        assert invalid.value.field == "messages[1].role"
        with pytest.raises(InvalidRequestError) as invalid:
            decode.tokenize("hi", add_generation_prompt=False)
        assert invalid.value.field == "add_generation_prompt"
        # Both roles, and the router, tokenize alike.
        with Client(described["prefill"][0], service="prefill") as prefill, Client(cluster.address) as router:
            for kwargs in ({"prompt": "the cat"}, {"messages": [{"role": "user", "content": "the cat"}]}):
                assert decode.tokenize(**kwargs) == prefill.tokenize(**kwargs) == router.tokenize(**kwargs)
            assert router.detokenize(router.tokenize("the cat")) == "the cat"


def test_the_router_falls_back_to_a_decode_worker_and_says_unavailable_without_one(served):
    cluster, _, _ = served
    registry = Registry()
    dead = registry.add_static(Role.PREFILL, "127.0.0.1:1")
    registry.add_static(Role.DECODE, cluster.describe()["decode"][0])
    request = tokenize_pb2.TokenizeRequest(prompt="the cat")

    async def tokenize(registry: Registry) -> tokenize_pb2.TokenizeResponse:
        return await Tokenization(registry).tokenize(request, 30.0)

    answer = asyncio.run(tokenize(registry))
    assert answer.worker_id and list(answer.token_ids) and registry.unresponsive(dead)
    with pytest.raises(UnavailableError):
        asyncio.run(tokenize(Registry()))


# -- n, logprobs, echo, logit_bias -----------------------------------------------------------------


def test_chat_n_samples_with_logprobs(served):
    cluster, oai, _ = served
    messages = [{"role": "user", "content": "hello there"}]
    with Client(cluster.address) as sdk:
        greedy = sdk.complete(messages=messages, max_tokens=6, temperature=0.0)
        seeded = sdk.complete(messages=messages, max_tokens=6, temperature=1.0, seed=11)
    answer = oai.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0, n=3,
                                         logprobs=True, top_logprobs=2)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert {c.message.content for c in answer.choices} == {greedy.text}
    for choice in answer.choices:
        content = choice.logprobs.content
        assert len(content) == len(greedy.token_ids) and choice.finish_reason == greedy.finish_reason
        for entry in content:
            assert entry.bytes and entry.token == bytes(entry.bytes).decode("utf-8", "replace")
            assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely was chosen
    assert answer.usage.completion_tokens == 3 * len(greedy.token_ids)
    assert answer.usage.prompt_tokens == greedy.usage.prompt_tokens
    sampled = oai.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=1.0,
                                          seed=11, n=3)
    assert sampled.choices[0].message.content == seeded.text and sampled.choices[0].logprobs is None


def test_completions_echo_with_logprobs_puts_the_prompt_first(served):
    cluster, oai, http = served
    prompt = "the cat sat on"
    _, tokenized = post_json(http, "/tokenize", {"prompt": prompt})
    with Client(cluster.address) as sdk:
        want = sdk.complete(prompt, max_tokens=4, temperature=0.0, logprobs=2)
    got = oai.completions.create(model="default", prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    choice = got.choices[0]
    assert choice.text == prompt + want.text
    lp, num_prompt = choice.logprobs, tokenized["count"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
        == num_prompt + len(want.token_ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:num_prompt]) == prompt  # ASCII: every token is whole characters
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[num_prompt:] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
    assert all(lp.tokens[i] in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 3 for i in range(1, len(lp.tokens)))
    # A token-id prompt is echoed as the worker detokenizes it; streamed, the first chunk is the prompt.
    _, detokenized = post_json(http, "/detokenize", {"tokens": PROMPT_IDS})
    chunks = [c for c in oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=3, temperature=0,
                                                echo=True, stream=True) if c.choices]
    whole = oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=3, temperature=0, echo=True)
    assert chunks[0].choices[0].text == detokenized["prompt"]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].text.startswith(detokenized["prompt"]) and whole.choices[0].logprobs is None


def test_streamed_echo_of_n_samples_starts_each_choice_with_the_prompt(served):
    _, oai, _ = served
    prompt = "the cat sat on"
    kwargs = dict(model="default", prompt=prompt, max_tokens=4, temperature=1.0, seed=2, n=2, logprobs=1, echo=True)
    whole = oai.completions.create(**kwargs)
    firsts, joined, tokens = {}, {0: "", 1: ""}, {0: [], 1: []}
    for chunk in oai.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            firsts.setdefault(choice.index, choice)
            joined[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens if choice.logprobs else []
    for index in (0, 1):
        assert firsts[index].text == prompt and firsts[index].logprobs.token_logprobs[0] is None
        assert "".join(firsts[index].logprobs.tokens) == prompt
    assert joined == {c.index: c.text for c in whole.choices}
    assert tokens == {c.index: c.logprobs.tokens for c in whole.choices}


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_of_n_samples_join_per_index_to_the_whole_answer(served, chat):
    _, oai, _ = served
    kwargs = dict(model="default", max_tokens=8, temperature=1.0, seed=5, n=2)
    if chat:
        create, kwargs["messages"] = oai.chat.completions.create, [{"role": "user", "content": "hi"}]
        text = lambda choice: choice.delta.content or ""  # noqa: E731
        whole_text = lambda choice: choice.message.content  # noqa: E731
    else:
        create, kwargs["prompt"] = oai.completions.create, PROMPT_IDS
        text = lambda choice: choice.text  # noqa: E731
        whole_text = lambda choice: choice.text  # noqa: E731
    whole = create(**kwargs)
    chunks = list(create(**kwargs, stream=True, stream_options={"include_usage": True}))
    joined, finish = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert len(chunk.choices) == 1
            joined[choice.index] += text(choice)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert joined == {c.index: whole_text(c) for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_logit_bias_forces_a_token(served):
    cluster, oai, _ = served
    forced = 300  # a merge of two letters, not EOS
    with Client(cluster.address) as sdk:
        spelled = sdk.detokenize([forced])
    got = oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=3, temperature=0,
                                 logit_bias={str(forced): 100}, logprobs=0)
    assert got.choices[0].text == spelled * 3 and got.choices[0].finish_reason == "length"
    assert got.choices[0].logprobs.tokens == [spelled] * 3
    chat = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0, logit_bias={str(forced): 100})
    assert chat.choices[0].message.content == spelled * 3


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"extra_body": {"echo": True}}, "echo"),
])
def test_bad_chat_fields_are_400_naming_the_field(served, kwargs, param):
    _, oai, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param


# -- structured output and tool calls ---------------------------------------------------------------

CHAT = [{"role": "user", "content": "hello there"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "pet"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_response_format_json_schema_answers_validate_for_each_choice(served):
    _, oai, _ = served
    for chat in (True, False):
        kwargs = dict(model="default", max_tokens=200, temperature=1.0, seed=3, n=2)
        answer = (oai.chat.completions.create(messages=CHAT, response_format=JSON_SCHEMA_FORMAT, **kwargs) if chat
                  else oai.completions.create(prompt=PROMPT_IDS, extra_body={"response_format": JSON_SCHEMA_FORMAT},
                                              **kwargs))  # the client's completions do not know the field
        assert len(answer.choices) == 2
        for choice in answer.choices:
            text = choice.message.content if chat else choice.text
            assert choice.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), PERSON)
            assert "\n" not in text  # JSON on one line


def test_response_format_json_object_answers_are_objects(served):
    _, oai, _ = served
    answer = oai.chat.completions.create(model="default", messages=CHAT, max_tokens=300, temperature=1.0, seed=1, n=4,
                                         response_format={"type": "json_object"})
    complete = [c.message.content for c in answer.choices if c.finish_reason == "stop"]
    assert complete, "a random model may wander in an object for long, but not in all four samples"
    assert all(isinstance(json.loads(text), dict) for text in complete)


@pytest.mark.parametrize(("constraint", "check"), [
    ({"regex": r"[a-c]{2}-\d{3}"}, lambda t: re.fullmatch(r"[a-c]{2}-[0-9]{3}", t)),
    ({"choice": ["alpha", "beta", "gamma delta"]}, lambda t: t in ("alpha", "beta", "gamma delta")),
    ({"grammar": 'start: "x" ("+" "x")* "=" NUM\nNUM: /[0-9]/'}, lambda t: re.fullmatch(r"x(\+x)*=[0-9]", t)),
    ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
])
def test_structured_outputs_constrain_both_endpoints(served, constraint, check):
    _, oai, _ = served
    body = {"structured_outputs": constraint}
    for seed in (0, 1):
        chat = oai.chat.completions.create(model="default", messages=CHAT, max_tokens=100, temperature=1.0, seed=seed,
                                           extra_body=body)
        assert chat.choices[0].finish_reason == "stop" and check(chat.choices[0].message.content)
        text = oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=100, temperature=1.0, seed=seed,
                                      extra_body=body)
        assert text.choices[0].finish_reason == "stop" and check(text.choices[0].text)


def test_streamed_structured_chunks_join_to_the_whole_answer(served):
    _, oai, _ = served
    kwargs = dict(model="default", messages=CHAT, max_tokens=200, temperature=1.0, seed=9, n=2,
                  response_format=JSON_SCHEMA_FORMAT)
    whole = oai.chat.completions.create(**kwargs)
    joined = {0: "", 1: ""}
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            joined[choice.index] += choice.delta.content or ""
    assert joined == {c.index: c.message.content for c in whole.choices}


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/no"}}}},
     "response_format.json_schema.schema"),
    ({"extra_body": {"structured_outputs": {"regex": "[unclosed"}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: undefined_rule"}}}, "structured_outputs.grammar"),
    ({"extra_body": {"structured_outputs": {"json": '{"type": "object", '}}}, "structured_outputs.json"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "structural_tag": "x"}}},
     "structured_outputs.structural_tag"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "structured_outputs"),
    ({"tools": [WEATHER, {**CLOCK, "function": {**CLOCK["function"], "parameters": {"type": "foo"}}}],
      "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tools[1].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tool_choice"),
    ({"tools": [WEATHER]}, "tool_choice"),  # "auto" needs --tool-call-parser, which this router lacks
    ({"tools": [{"type": "function", "function": {"name": "has space"}}], "tool_choice": "required"},
     "tools[0].function.name"),
])
def test_bad_structured_output_and_tools_are_400_naming_the_field(served, kwargs, param):
    _, oai, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="default", messages=CHAT, max_tokens=8, **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    assert param in err.value.body["message"]


def test_a_named_tool_call_whatever_the_model(served):
    _, oai, _ = served
    kwargs = dict(model="default", messages=CHAT, max_tokens=200, temperature=1.0, seed=4, n=2, tools=[CLOCK, WEATHER],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = oai.chat.completions.create(**kwargs)
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # Streamed: the first chunk of a choice names the call, the next ones add to its arguments.
    calls: dict[int, dict] = {}
    finish = {}
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or ():
                assert part.index == 0
                if part.id is not None:
                    assert choice.index not in calls and part.type == "function"
                    calls[choice.index] = {"name": part.function.name, "arguments": part.function.arguments}
                else:
                    assert part.function.name is None
                    calls[choice.index]["arguments"] += part.function.arguments
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert calls == {c.index: {"name": "get_weather", "arguments": c.message.tool_calls[0].function.arguments}
                     for c in whole.choices}
    assert finish == {0: "tool_calls", 1: "tool_calls"}


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_choice_required_calls_the_tools(served, parallel):
    _, oai, _ = served
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    kwargs = dict(model="default", messages=CHAT, max_tokens=300, temperature=1.0, seed=2, n=3, tools=[WEATHER, CLOCK],
                  tool_choice="required", parallel_tool_calls=parallel)
    whole = oai.chat.completions.create(**kwargs)
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert 1 <= len(calls) and (parallel or len(calls) == 1)
        assert len({call.id for call in calls}) == len(calls)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])
    streamed: dict[int, list] = {}
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            for part in choice.delta.tool_calls or ():  # "required" sends each call whole
                streamed.setdefault(choice.index, []).append((part.index, part.function.name, part.function.arguments))
    assert streamed == {c.index: [(i, call.function.name, call.function.arguments)
                                  for i, call in enumerate(c.message.tool_calls)] for c in whole.choices}


def test_structured_output_through_the_sdk(served):
    cluster, _, _ = served
    with Client(cluster.address) as sdk:
        done = sdk.complete(prompt_token_ids=PROMPT_IDS, max_tokens=200, temperature=1.0, seed=5, n=2,
                            structured_output={"json_schema": PERSON})
        for sample in done.samples:
            assert sample.finish_reason == "stop"
            jsonschema.validate(json.loads(sample.text), PERSON)
        assert sdk.complete("the cat", max_tokens=20, structured_output={"choice": ["yes", "no"]}).text in ("yes", "no")
        with pytest.raises(InvalidRequestError) as err:
            sdk.complete("the cat", max_tokens=4, structured_output={"regex": "(unclosed"})
        assert err.value.field == "structured_output.regex" and "does not compile" in str(err.value)


def test_a_template_without_tools_refuses_them(served):
    cluster, oai, http = served
    with Client(cluster.address) as sdk:
        with pytest.raises(InvalidRequestError) as err:
            sdk.complete(messages=CHAT, tools=[WEATHER], max_tokens=4)
    assert err.value.field == "tools" and "this model's chat template takes no tools" in str(err.value)
    assert post_json(http, "/tokenize", {"messages": CHAT, "tools": [WEATHER]})[1]["error"]["param"] == "tools"
    # tool_choice "none" leaves the tools out; a named function needs no template's help.
    plain = oai.chat.completions.create(model="default", messages=CHAT, max_tokens=4, temperature=0, tools=[WEATHER],
                                        tool_choice="none")
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content


# -- tool_choice "auto": a Hermes-style template and the router's --tool-call-parser ------------------------

HERMES_TEMPLATE = (
    "{% if tools %}<s>system\nYou may call these tools:\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}</tools>\nAnswer <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call> to call one.</s>\n"
    "{% endif %}{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tool_served(tiny_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("tools") / "preprocess.json"
    config.write_text(json.dumps({"chat_template": HERMES_TEMPLATE}))
    spec = ClusterSpec(num_prefill=0, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.5, http_port=0,
                       extra_args={"decode": ["--preprocess-config", str(config)],
                                   "router": ["--tool-call-parser", "hermes"]})
    with LocalCluster(spec) as cluster:
        http = cluster.describe()["http"]
        yield cluster, openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=60), http


# The model's output, forced: text, a call, a block that is not JSON (stays content), another call.
FORCED = (r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-7]\}\}'
          r'</tool_call>\n<tool_call>oops</tool_call>\n<tool_call>\{"name": "clock", "arguments": \{"zone": "UTC"\}\}'
          r'</tool_call>')


def test_auto_reads_the_models_tool_call_markup(tool_served):
    _, oai, http = tool_served
    kwargs = dict(model="default", messages=CHAT, max_tokens=300, temperature=1.0, seed=6, tools=[WEATHER, CLOCK],
                  extra_body={"structured_outputs": {"regex": FORCED}})
    whole = oai.chat.completions.create(**kwargs)
    [choice] = whole.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Sure. \n<tool_call>oops</tool_call>"
    weather, clock = choice.message.tool_calls
    assert weather.function.name == "get_weather" and clock.function.name == "clock"
    assert json.loads(weather.function.arguments)["city"] in ("Paris", "Rome")
    assert clock.function.arguments == '{"zone": "UTC"}'
    # The tools reached the template: the prompt is what /tokenize counts with them, longer than without.
    _, with_tools = post_json(http, "/tokenize", {"messages": CHAT, "tools": [WEATHER, CLOCK]})
    _, without = post_json(http, "/tokenize", {"messages": CHAT})
    assert whole.usage.prompt_tokens == with_tools["count"] > without["count"]
    # Streamed: content as it comes, each call whole once its block closes.
    content, calls, finish = "", [], None
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += [(p.index, p.function.name, p.function.arguments) for p in c.delta.tool_calls or ()]
            finish = c.finish_reason or finish
    assert content == choice.message.content and finish == "tool_calls"
    assert calls == [(i, call.function.name, call.function.arguments)
                     for i, call in enumerate(choice.message.tool_calls)]


def test_auto_without_a_call_is_a_plain_answer(tool_served):
    _, oai, _ = tool_served
    answer = oai.chat.completions.create(model="default", messages=CHAT, max_tokens=30, temperature=0,
                                         tools=[WEATHER], tool_choice="auto",
                                         extra_body={"structured_outputs": {"choice": ["It is sunny."]}})
    assert answer.choices[0].message.content == "It is sunny." and answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason == "stop"
