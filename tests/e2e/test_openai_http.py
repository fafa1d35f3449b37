"""The router's OpenAI-compatible HTTP API through the real `openai` client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster

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
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"logit_bias": {"5": 1}}}, "logit_bias"),
])
def test_bad_fields_are_400_naming_the_field_and_the_next_request_is_served(served, kwargs, param):
    _, oai, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=kwargs.pop("max_tokens", 4), **kwargs)
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
