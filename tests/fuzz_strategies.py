"""Fuzzing pdserve's gRPC services: hypothesis strategies for calls, running one, checking it.

Shared by the CI fuzz test (tests/e2e/test_fuzz.py) and the long run (bench/fuzz.py).
1. `calls(targets)`: a `FuzzCall` is an rpc, the exact request bytes (and, for the
   bidirectional Prefill, the bytes of the skip sent once the header arrived), a deadline
   and a client cancellation point. The bytes come from a structured message with random and
   boundary values (NaN/inf floats, huge and out-of-vocab ids, long lists, bad roles,
   prefill candidates at bad addresses or at the real prefill daemon), optionally mutated
   on the wire (invalid UTF-8 in a string field, huge varints in uint32 fields, unknown
   fields, wrong wire types, truncation), or are plain random bytes;
2. `run_call`: sends it over a plain channel with identity (de)serializers;
3. `check`: the properties every call must keep; violations as strings (empty: fine).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field

import grpc
import xxhash
from hypothesis import strategies as st

from pdserve.v1 import common_pb2, decode_pb2, prefill_pb2, router_pb2

# -- the rpcs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    name: str
    path: str
    target: str  # "router", "decode" or "prefill"
    request_type: type
    response_type: type
    streaming: bool
    bidi: bool = False  # the request is a first message; a follow-up goes after the first response


RPCS = {rpc.name: rpc for rpc in (
    Rpc("router.Generate", "/pdserve.v1.RouterService/Generate", "router", common_pb2.GenerateRequest,
        common_pb2.GenerateResponse, True),
    Rpc("decode.Generate", "/pdserve.v1.DecodeService/Generate", "decode", decode_pb2.DecodeGenerateRequest,
        common_pb2.GenerateResponse, True),
    Rpc("prefill.Prefill", "/pdserve.v1.PrefillService/Prefill", "prefill", prefill_pb2.PrefillMessage,
        prefill_pb2.PrefillResponse, True, bidi=True),
    Rpc("router.ClusterStatus", "/pdserve.v1.RouterService/ClusterStatus", "router",
        router_pb2.ClusterStatusRequest, router_pb2.ClusterStatusResponse, False),
    # Heartbeat for an unknown worker only answers reregister. Register and SetRollout are
    # not fuzzed: a request that parses legitimately changes the cluster for later calls.
    Rpc("router.Heartbeat", "/pdserve.v1.RouterService/Heartbeat", "router", router_pb2.HeartbeatRequest,
        router_pb2.HeartbeatResponse, False),
    Rpc("decode.Stats", "/pdserve.v1.DecodeService/Stats", "decode", common_pb2.StatsRequest,
        common_pb2.StatsResponse, False),
    Rpc("prefill.Stats", "/pdserve.v1.PrefillService/Stats", "prefill", common_pb2.StatsRequest,
        common_pb2.StatsResponse, False),
)}
GENERATE_RPCS = ("router.Generate", "decode.Generate", "prefill.Prefill")


@dataclass(frozen=True)
class Targets:
    """What the strategies point at: the real prefill daemon, addresses that fail, the vocabulary."""

    prefill_address: str
    bad_addresses: tuple[str, ...]
    vocab_size: int
    # Every non-empty request id unique, so concurrent calls never share one.
    unique_request_ids: bool = False


@dataclass(frozen=True)
class FuzzCall:
    rpc: str
    request: bytes
    timeout_s: float | None  # None: the runner's long default (a hang detector)
    cancel_after: int | None  # leave the stream after this many messages (None: read it all)
    kind: str  # "structured", "mutated" or "raw"
    followup: bytes | None = None  # a bidi call's second message (None: a skip of 0)

    def describe(self, limit: int = 600) -> str:
        text = f"{self.rpc} kind={self.kind} timeout={self.timeout_s} cancel_after={self.cancel_after} "
        parsed = parse(RPCS[self.rpc].request_type, self.request)
        body = (f"message={_short(parsed)}" if parsed is not None else "") + f" bytes={self.request[:200]!r}"
        return (text + body)[:limit] + (f"... ({len(self.request)} bytes)" if len(text + body) > limit else "")


def _short(msg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(msg, as_one_line=True, as_utf8=True)[:300]


# -- scalar strategies --------------------------------------------------------------------

U32_EDGES = [0, 1, 2, 3, 15, 16, 17, 255, 256, 511, 512, 513, 1023, 1024, 1025, 4096, 2**31 - 1, 2**31, 2**32 - 1]
U64_EDGES = [0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-300, 1e-6, 1e-5, 0.5, 1.0, 1.0000001,
               2.0, 2.0000001, -2.0, -2.0000001, -1.0, 1e308, -1e308]

u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
floats = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(), st.floats(-3, 3))
texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "<s>", "</s>", "<unk>", "\x00", "\n", "é",
                                                         "\U0001f600", "\u200b", "a" * 300]))
# Mostly short generations, so CI stays fast; the edges too.
max_tokens = st.one_of(st.integers(1, 8), st.integers(0, 40), st.sampled_from([0, 1, 1023, 1024, 2**31, 2**32 - 1]))


def token_ids(vocab: int):
    return st.one_of(st.integers(0, vocab - 1), st.sampled_from([0, 1, 2, vocab - 1, vocab, vocab + 1, 2**31, 2**32 - 1]),
                     st.integers(0, 2**32 - 1))


def token_lists(vocab: int, max_size: int = 24):
    """Short lists, and long ones at and beyond the context (1024) and in bulk."""
    long = st.builds(lambda n, t: [t] * n, st.sampled_from([1022, 1023, 1024, 1025, 4096, 100_000]),
                     st.integers(3, vocab - 1))
    return st.one_of(st.lists(token_ids(vocab), max_size=max_size), st.lists(st.integers(3, vocab - 1), max_size=8),
                     long)


# -- messages ----------------------------------------------------------------------------


# Valid values, at and near the edges of their ranges (tiny, huge, exactly the bound).
VALID = {
    "max_tokens": st.one_of(st.integers(1, 12), st.just(1)),
    "temperature": st.one_of(st.sampled_from([0.0, 5e-324, 1e-6, 1e-5, 0.7, 1.0, 2.0, 100.0, 1e308]), st.floats(0, 5)),
    "top_p": st.one_of(st.sampled_from([5e-324, 1e-9, 0.01, 0.5, 1.0]), st.floats(0, 1, exclude_min=True)),
    "top_k": st.sampled_from([0, 1, 2, 50, 511, 512, 513, 2**31, 2**32 - 1]),
    "min_p": st.one_of(st.sampled_from([0.0, 5e-324, 0.5, 1.0]), st.floats(0, 1)),
    "repetition_penalty": st.one_of(st.sampled_from([5e-324, 1e-300, 0.5, 1.0, 2.0, 1e300, 1e308]),
                                    st.floats(0, 10, exclude_min=True)),
    "presence_penalty": st.one_of(st.sampled_from([-2.0, 2.0, 0.0]), st.floats(-2, 2)),
    "frequency_penalty": st.one_of(st.sampled_from([-2.0, 2.0, 0.0]), st.floats(-2, 2)),
    "seed": st.one_of(st.sampled_from([0, 2**63 - 1]), st.integers(0, 2**63 - 1)),
    "ignore_eos": st.booleans(),
    "logprobs": st.sampled_from([0, 1, 5, 20]),
    "n": st.sampled_from([1, 2, 3]),
    "prompt_logprobs": st.sampled_from([0, 2, 20]),
}
# Specs that compile, of every kind, and ones that do not (or are not even JSON).
SCHEMAS = ['{"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"]}',
           '{"enum": ["x", "y"]}', '{"type": "array", "items": {"type": "boolean"}, "maxItems": 2}',
           '{"type": "foo"}', '{"$ref": "#/$defs/none"}', "{", "[]", "null"]
REGEXES = ["[ab]{1,3}", r"\d{2}", "x|yz", "(", "[z-a]", "a{99999999}", ".*"]
GRAMMARS = ['start: "a" | "b"', 'root ::= "x" [0-9]', "start: undefined_rule", "::=", ""]


def structured_outputs(valid: bool):
    choices = st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4)
    kinds = [st.builds(lambda t: common_pb2.StructuredOutput(json_schema=t), st.sampled_from(SCHEMAS[:3])),
             st.just(common_pb2.StructuredOutput(json_object=True)),
             st.builds(lambda t: common_pb2.StructuredOutput(regex=t), st.sampled_from(REGEXES[:3])),
             st.builds(lambda t: common_pb2.StructuredOutput(grammar=t), st.sampled_from(GRAMMARS[:2])),
             st.builds(lambda c: common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=c)), choices)]
    if not valid:
        kinds += [st.builds(lambda t: common_pb2.StructuredOutput(json_schema=t), st.one_of(st.sampled_from(SCHEMAS),
                                                                                          texts)),
                  st.builds(lambda t: common_pb2.StructuredOutput(regex=t), st.one_of(st.sampled_from(REGEXES), texts)),
                  st.builds(lambda t: common_pb2.StructuredOutput(grammar=t), st.one_of(st.sampled_from(GRAMMARS),
                                                                                      texts)),
                  st.builds(lambda c: common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=c)),
                            st.lists(texts, max_size=3)),
                  st.just(common_pb2.StructuredOutput()), st.just(common_pb2.StructuredOutput(json_object=False))]
    return st.one_of(*kinds)


def logit_biases(vocab: int, valid: bool):
    if valid:
        return st.dictionaries(st.integers(0, vocab - 1), st.floats(-100, 100), max_size=4)
    return st.dictionaries(token_ids(vocab), floats, max_size=4)


@st.composite
def sampling_params(draw, vocab: int, valid: bool = False) -> common_pb2.SamplingParams:
    if valid:
        fields = draw(st.fixed_dictionaries({}, optional=VALID))
        stops = st.lists(st.one_of(st.text(min_size=1, max_size=8), st.sampled_from(["e", " t", "a" * 256, "\n"])),
                         max_size=16)
        return common_pb2.SamplingParams(
            **fields, stop=draw(stops), stop_token_ids=draw(st.lists(st.integers(0, vocab - 1), max_size=8)),
            logit_bias=draw(logit_biases(vocab, valid=True)),
            structured_output=draw(st.one_of(st.none(), structured_outputs(valid=True))))
    optional = {"max_tokens": max_tokens, "temperature": floats, "top_p": floats, "top_k": u32, "min_p": floats,
                "repetition_penalty": floats, "presence_penalty": floats, "frequency_penalty": floats,
                "seed": u64, "ignore_eos": st.booleans(), "logprobs": st.one_of(st.integers(0, 21), u32),
                "n": st.one_of(st.integers(0, 4), st.sampled_from([128, 129]), u32),
                "prompt_logprobs": st.one_of(st.integers(0, 21), u32)}
    fields = draw(st.fixed_dictionaries({}, optional=optional))
    stops = st.one_of(st.lists(texts, max_size=20), st.builds(lambda n: ["x"] * n, st.sampled_from([16, 17, 5000])),
                      st.lists(st.sampled_from(["a" * 256, "a" * 257, "", "e", " t"]), max_size=3))
    stop_ids = st.one_of(st.lists(token_ids(vocab), max_size=8), st.builds(lambda n: list(range(n)),
                                                                           st.sampled_from([64, 5000])))
    return common_pb2.SamplingParams(**fields, stop=draw(stops), stop_token_ids=draw(stop_ids),
                                     logit_bias=draw(logit_biases(vocab, valid=False)),
                                     structured_output=draw(st.one_of(st.none(), structured_outputs(valid=False))))


ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "", "USER", "bot", "user\x00"]), texts)
VALID_ROLES = st.sampled_from(["system", "user", "assistant", "tool"])


def prompts():
    huge = st.sampled_from([1_000_001, 9 * 2**20])  # beyond MAX_PROMPT_CHARS; beyond the server's 8 MiB
    return st.one_of(texts, st.text(max_size=200), st.builds(lambda n: "hello world " * n, st.sampled_from([100, 400])),
                     st.builds(lambda n: "a" * n, huge))


_unique = itertools.count()


def request_ids(unique: bool = False):
    # "dup" and the other constants recur, so concurrent calls of a batch share ids.
    ids = st.one_of(st.just(""), st.sampled_from(["dup", "dup", "x" * 5000]), texts)
    return st.builds(lambda rid: f"{rid}#{next(_unique)}" if rid else "", ids) if unique else ids


@st.composite
def generate_requests(draw, vocab: int, valid: bool | None = None,
                      unique_ids: bool = False) -> common_pb2.GenerateRequest:
    """Any request; with `valid` (drawn when None), one every daemon should serve."""
    if valid is None:
        valid = draw(st.booleans())
    if valid:
        req = common_pb2.GenerateRequest(request_id=draw(st.one_of(st.just(""), st.just(""), request_ids(unique_ids))))
        kind = draw(st.sampled_from(["prompt", "messages", "prompt_token_ids", "prompt_token_ids"]))
        if kind == "prompt":
            req.prompt = draw(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]),
                                      min_size=1, max_size=100).filter(str.strip))
        elif kind == "messages":
            msgs = st.builds(common_pb2.ChatMessage, role=VALID_ROLES, content=st.text(max_size=40))
            req.messages.CopyFrom(common_pb2.Messages(messages=draw(st.lists(msgs, min_size=1, max_size=4))))
        else:
            ids = st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40),
                            st.builds(lambda n, t: [t] * n, st.sampled_from([1000, 1010]), st.integers(0, vocab - 1)))
            req.prompt_token_ids.CopyFrom(common_pb2.TokenIds(token_ids=draw(ids)))
        req.sampling_params.CopyFrom(draw(sampling_params(vocab, valid=True)))
        return req
    req = common_pb2.GenerateRequest(request_id=draw(request_ids(unique_ids)), version=draw(st.one_of(st.just(""), texts)))
    kind = draw(st.sampled_from(["none", "prompt", "messages", "prompt_token_ids", "prompt_token_ids"]))
    if kind == "prompt":
        req.prompt = draw(prompts())
    elif kind == "messages":
        msgs = draw(st.lists(st.builds(common_pb2.ChatMessage, role=ROLES, content=st.one_of(texts, st.text())),
                             max_size=6))
        req.messages.CopyFrom(common_pb2.Messages(messages=msgs))  # set even when empty
    elif kind == "prompt_token_ids":
        req.prompt_token_ids.CopyFrom(common_pb2.TokenIds(token_ids=draw(token_lists(vocab))))
    if draw(st.booleans()):
        req.sampling_params.CopyFrom(draw(sampling_params(vocab)))
    return req


@st.composite
def decode_requests(draw, targets: Targets) -> decode_pb2.DecodeGenerateRequest:
    addresses = st.sampled_from([targets.prefill_address, *targets.bad_addresses])
    candidate = st.builds(decode_pb2.PrefillCandidate, worker_id=texts, address=st.one_of(addresses, addresses, texts))
    req = decode_pb2.DecodeGenerateRequest(
        prefill_candidates=draw(st.lists(candidate, max_size=4)),
        generated_token_ids=draw(st.one_of(st.just([]), st.just([]), token_lists(targets.vocab_size, 12),
                                           st.lists(st.integers(0, targets.vocab_size - 1), max_size=6))))
    if draw(st.integers(0, 9)):
        req.request.CopyFrom(draw(generate_requests(targets.vocab_size, unique_ids=targets.unique_request_ids)))
    return req


@st.composite
def prefill_requests(draw, targets: Targets) -> prefill_pb2.PrefillMessage:
    req = prefill_pb2.PrefillRequest(decode_worker_id=draw(texts))
    if draw(st.integers(0, 9)):
        req.request.CopyFrom(draw(generate_requests(targets.vocab_size, unique_ids=targets.unique_request_ids)))
    for name in ("block_size", "max_chunk_bytes"):
        if draw(st.booleans()):
            setattr(req, name, draw(st.one_of(u32, st.integers(0, 64))))
    return prefill_pb2.PrefillMessage(request=req)


@st.composite
def prefill_skips(draw) -> bytes:
    """The Prefill call's second message: mostly a prefix a decode worker could hold (0 to a few
    blocks), sometimes anything; now and then another request instead, or nothing parseable."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=16))
    if kind == 1:
        return prefill_pb2.PrefillMessage(request=prefill_pb2.PrefillRequest()).SerializeToString()
    skip = draw(st.one_of(st.just(0), st.just(0), st.integers(0, 64), u32))
    return prefill_pb2.PrefillMessage(skip=prefill_pb2.KVSkip(num_cached_tokens=skip)).SerializeToString()


SKIP_NONE = prefill_pb2.PrefillMessage(skip=prefill_pb2.KVSkip()).SerializeToString()


# -- wire-level mutations -------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as protobuf writes them: ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def nested_field(path: tuple[int, ...], wire_type: int, payload: bytes) -> bytes:
    """Field path[-1] (in the messages path[:-1] lead to) with `payload`, ready to append:
    protobuf merges a repeated submessage field into the one already there."""
    data = varint(path[-1] << 3 | wire_type) + payload
    for number in reversed(path[:-1]):
        data = varint(number << 3 | 2) + varint(len(data)) + data
    return data


_GEN_STRINGS = [(1,), (2,), (3, 1, 1), (3, 1, 2), (5, 10), (6,)]
_GEN_INTS = [(4, 1), (5, 1), (5, 4), (5, 9), (5, 11), (5, 13), (5, 12)]
STRING_PATHS = {
    "router.Generate": _GEN_STRINGS,
    "decode.Generate": [(1, *p) for p in _GEN_STRINGS] + [(2, 1), (2, 2)],
    "prefill.Prefill": [(1, 1, *p) for p in _GEN_STRINGS] + [(1, 5)],
    "router.Heartbeat": [(1,)],
}
INT_PATHS = {
    "router.Generate": _GEN_INTS,
    "decode.Generate": [(1, *p) for p in _GEN_INTS] + [(3,)],
    "prefill.Prefill": [(1, 1, *p) for p in _GEN_INTS] + [(1, 2), (1, 3)],
    "router.Heartbeat": [(3,), (2, 1), (2, 3)],
}
BAD_UTF8 = [b"\xff", b"\xc3", b"a\xc3(", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\x80", b"\xe2\x82", b"\x80abc"]


@st.composite
def mutation(draw, rpc: str):
    """A function bytes -> bytes that damages a request on the wire."""
    kinds = ["unknown_field", "wrong_wire_type", "truncate", "flip"]
    if rpc in STRING_PATHS:
        kinds += ["bad_utf8", "bad_utf8"]
    if rpc in INT_PATHS:
        kinds += ["huge_varint"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bad_utf8":
        path = draw(st.sampled_from(STRING_PATHS[rpc]))
        bad = draw(st.one_of(st.sampled_from(BAD_UTF8), st.binary(min_size=1, max_size=8)))
        extra = nested_field(path, 2, varint(len(bad)) + bad)
        return lambda data: data + extra
    if kind == "huge_varint":
        path = draw(st.sampled_from(INT_PATHS[rpc]))
        value = draw(st.sampled_from([-1, -2**31, 2**32, 2**32 + 5, 2**63, 2**64 - 1]))
        extra = nested_field(path, 0, varint(value))
        return lambda data: data + extra
    if kind == "unknown_field":
        number = draw(st.one_of(st.integers(50, 1000), st.just(2**29 - 1)))
        wire_type = draw(st.sampled_from([0, 1, 2, 5]))
        payload = {0: varint(draw(u64)), 1: bytes(8), 5: bytes(4)}.get(wire_type)
        if payload is None:
            blob = draw(st.binary(max_size=16))
            payload = varint(len(blob)) + blob
        extra = varint(number << 3 | wire_type) + payload
        return lambda data: extra + data
    if kind == "wrong_wire_type":
        number = draw(st.integers(1, 13))
        extra = varint(number << 3 | draw(st.sampled_from([0, 1, 3, 4, 5, 6, 7]))) + draw(st.binary(max_size=8))
        return lambda data: data + extra
    if kind == "truncate":
        cut = draw(st.integers(1, 64))
        return lambda data: data[:max(0, len(data) - cut)]
    position, byte = draw(st.integers(0, 2**16)), draw(st.integers(0, 255))
    return lambda data: (data[:position % len(data)] + bytes([byte]) + data[position % len(data) + 1:]) if data else data


# -- calls ----------------------------------------------------------------------------------

timeouts = st.one_of(st.none(), st.none(), st.none(), st.sampled_from([0.001, 0.01, 0.05, 0.2, 0.5, 1.0]))
cancel_points = st.one_of(st.none(), st.none(), st.integers(0, 4))


def structured_messages(rpc: str, targets: Targets):
    if rpc == "router.Generate":
        return generate_requests(targets.vocab_size, unique_ids=targets.unique_request_ids)
    if rpc == "decode.Generate":
        return decode_requests(targets)
    if rpc == "prefill.Prefill":
        return prefill_requests(targets)
    if rpc == "router.Heartbeat":
        return st.builds(router_pb2.HeartbeatRequest, worker_id=texts, draining=st.booleans())
    return st.builds(RPCS[rpc].request_type)


@st.composite
def calls(draw, targets: Targets, rpcs: tuple[str, ...] = tuple(RPCS), kinds=("structured", "mutated", "raw")):
    rpc = draw(st.sampled_from(rpcs))
    kind = draw(st.sampled_from(kinds))
    if kind == "raw":
        request = draw(st.one_of(st.binary(max_size=64), st.binary(max_size=2000)))
    else:
        request = draw(structured_messages(rpc, targets)).SerializeToString()
        if kind == "mutated":
            for mutate in draw(st.lists(mutation(rpc), min_size=1, max_size=3)):
                request = mutate(request)
    streaming = RPCS[rpc].streaming
    followup = draw(prefill_skips()) if RPCS[rpc].bidi else None
    return FuzzCall(rpc, request, draw(timeouts), draw(cancel_points) if streaming else None, kind, followup)


# -- running and checking -------------------------------------------------------------------


@dataclass
class Outcome:
    call: FuzzCall
    code: str
    details: str
    responses: list[bytes] = field(default_factory=list)
    seconds: float = 0.0
    cancelled_by_us: bool = False


def run_call(channel: grpc.Channel, call: FuzzCall, default_timeout_s: float) -> Outcome:
    rpc = RPCS[call.rpc]
    timeout = call.timeout_s if call.timeout_s is not None else default_timeout_s
    started = time.monotonic()
    out = Outcome(call, "", "")
    if not rpc.streaming:
        method = channel.unary_unary(rpc.path, request_serializer=None, response_deserializer=None)
        try:
            out.responses.append(method(call.request, timeout=timeout))
            out.code = "OK"
        except grpc.RpcError as exc:
            out.code, out.details = exc.code().name, exc.details() or ""
    else:
        answered = threading.Event()  # a bidi call's first response (or its end) came

        def messages():
            yield call.request
            if answered.wait(timeout) and not out.responses[1:]:  # after the header, before anything else
                yield call.followup if call.followup is not None else SKIP_NONE

        if rpc.bidi:
            stream = channel.stream_stream(rpc.path, request_serializer=None, response_deserializer=None)(
                messages(), timeout=timeout)
        else:
            stream = channel.unary_stream(rpc.path, request_serializer=None, response_deserializer=None)(
                call.request, timeout=timeout)
        try:
            if call.cancel_after == 0:
                out.cancelled_by_us = stream.cancel()
            else:
                for response in stream:
                    out.responses.append(response)
                    answered.set()
                    if call.cancel_after is not None and len(out.responses) >= call.cancel_after:
                        out.cancelled_by_us = stream.cancel()
                        break
        except grpc.RpcError:
            pass
        finally:
            answered.set()
        out.code, out.details = stream.code().name, stream.details() or ""
    out.seconds = time.monotonic() - started
    return out


def parse(message_type, data: bytes):
    try:
        return message_type.FromString(data)
    except Exception:
        return None


ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "DEADLINE_EXCEEDED",
           "CANCELLED", "UNAVAILABLE"}


def check(out: Outcome, vocab: int) -> list[str]:
    """The properties one call must keep; each violation as a short string."""
    call, rpc = out.call, RPCS[out.call.rpc]
    code = out.code
    if code not in ALLOWED:
        return [f"status {code}: {out.details[:200]!r}"]
    problems = []
    if code != "OK" and not out.details.strip():
        problems.append(f"status {code} with an empty message")
    if code == "CANCELLED" and not out.cancelled_by_us:
        problems.append(f"CANCELLED without a client cancellation: {out.details[:200]!r}")
    if code == "DEADLINE_EXCEEDED" and call.timeout_s is None:
        problems.append(f"hang: no answer within the default deadline ({out.seconds:.1f} s)")
    request = parse(rpc.request_type, call.request)
    if code == "UNAVAILABLE" and not _unavailable_justified(call.rpc, request):
        problems.append(f"UNAVAILABLE: {out.details[:200]!r}")
    if code == "OK" and request is None:
        problems.append("a request that does not parse was accepted")
    if code == "OK" and not out.cancelled_by_us and request is not None:
        if call.rpc in ("router.Generate", "decode.Generate"):
            problems += check_generate_stream(out.responses, request, vocab)
        elif call.rpc == "prefill.Prefill":
            skip = parse(prefill_pb2.PrefillMessage, call.followup if call.followup is not None else SKIP_NONE)
            problems += check_prefill_stream(out.responses, skip.skip.num_cached_tokens if skip else 0, vocab)
        elif parse(rpc.response_type, out.responses[0]) is None:
            problems.append("response does not parse")
    return problems


def _unavailable_justified(rpc: str, request) -> bool:
    # A router request pinned to a version no worker has: no worker can serve it.
    return rpc == "router.Generate" and request is not None and request.version != ""


def check_generate_stream(responses: list[bytes], request, vocab: int) -> list[str]:
    generated = list(request.generated_token_ids) if isinstance(request, decode_pb2.DecodeGenerateRequest) else []
    gen = request.request if isinstance(request, decode_pb2.DecodeGenerateRequest) else request
    msgs = [parse(common_pb2.GenerateResponse, r) for r in responses]
    if any(m is None for m in msgs):
        return ["a response does not parse"]
    kinds = [m.WhichOneof("kind") for m in msgs]
    sp = gen.sampling_params
    n = sp.n if sp.HasField("n") else 1
    if kinds.count("result") != n or kinds[-1] != "result" or None in kinds:
        return [f"stream kinds {kinds[:5]}...{kinds[-3:]}: want deltas then one result per sample (n = {n})"]
    problems = []
    sent = [len(generated)] * n  # completion tokens per sample
    ended: set[int] = set()
    for m in msgs:
        if m.WhichOneof("kind") == "result":
            result = m.result
            if result.index >= n or result.index in ended:
                problems.append(f"result for sample {result.index} (n = {n}), or twice")
                break
            ended.add(result.index)
            if result.usage.completion_tokens != sent[result.index]:
                problems.append(f"sample {result.index}: usage.completion_tokens {result.usage.completion_tokens} != "
                                f"resumed {len(generated)} + streamed {sent[result.index] - len(generated)}")
            if result.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
                problems.append("finish_reason UNSPECIFIED")
            if sp.HasField("max_tokens") and sent[result.index] > max(sp.max_tokens, len(generated)):
                problems.append(f"{sent[result.index]} completion tokens > max_tokens {sp.max_tokens}")
            if gen.request_id and result.request_id != gen.request_id:
                problems.append(f"result.request_id {result.request_id!r} != {gen.request_id!r}")
            continue
        d = m.delta
        if d.index >= n or d.index in ended:
            problems.append(f"delta for sample {d.index} (n = {n}) after its result, or out of range")
            break
        if d.completion_index != sent[d.index]:
            problems.append(f"delta completion_index {d.completion_index}, expected {sent[d.index]}")
            break
        if any(t >= vocab for t in d.token_ids):
            problems.append(f"delta token id out of vocab: {list(d.token_ids)}")
        if d.logprobs and len(d.logprobs) != len(d.token_ids):
            problems.append("delta logprobs do not match its token ids")
        sent[d.index] += len(d.token_ids)
    return problems


def check_prefill_stream(responses: list[bytes], num_skipped: int, vocab: int) -> list[str]:
    msgs = [parse(prefill_pb2.PrefillResponse, r) for r in responses]
    if any(m is None for m in msgs):
        return ["a response does not parse"]
    kinds = [m.WhichOneof("kind") for m in msgs]
    if not kinds or kinds[0] != "header" or kinds[-1] != "first_token" or set(kinds[1:-1]) - {"chunk"}:
        return [f"prefill stream kinds {kinds[:3]}...{kinds[-2:]}: want header, chunks, first token"]
    header, first = msgs[0].header, msgs[-1].first_token
    problems = []
    if header.num_prompt_tokens != len(header.prompt_token_ids):
        problems.append("header num_prompt_tokens != len(prompt_token_ids)")
    chunks = [m.chunk for m in msgs[1:-1]]
    if [c.sequence_number for c in chunks] != list(range(len(chunks))):
        problems.append("chunk sequence numbers are not 0, 1, 2, ...")
    if header.num_chunks and header.num_chunks != len(chunks):
        problems.append(f"header num_chunks {header.num_chunks} but {len(chunks)} chunks")
    num_bytes = sum(len(c.k_bytes) + len(c.v_bytes) for c in chunks)
    due = header.num_kv_bytes // max(1, header.num_prompt_tokens) * (header.num_prompt_tokens - num_skipped)
    if num_bytes != due:
        problems.append(f"{num_bytes} KV bytes sent, {due} due (header: {header.num_kv_bytes} for the prompt)")
    if any(c.layer_index >= header.kv_layout.num_layers or c.token_end <= c.token_start
           or c.token_end > header.num_prompt_tokens for c in chunks):
        problems.append("a chunk's layer or token range is out of bounds")
    if any(c.token_start < num_skipped for c in chunks):
        problems.append("a chunk carries skipped tokens")
    if any(c.checksum != xxhash.xxh3_64_intdigest(c.k_bytes + c.v_bytes) for c in chunks):
        problems.append("a chunk's checksum does not match its payload")
    if first.token_id >= vocab or any(t.token_id >= vocab for t in first.more_samples):
        problems.append(f"first token {first.token_id} (or another sample's) out of vocab")
    return problems


# -- the cluster ----------------------------------------------------------------------------

GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)]
_WORKER_SERVICES = {"prefill": "prefill", "decode": "decode"}


def channels_for(cluster) -> dict[str, grpc.Channel]:
    """One plain channel per target: "router", "decode", "prefill" (the first worker of each role)."""
    out = {"router": grpc.insecure_channel(cluster.address, options=GRPC_OPTIONS)}
    for w in cluster.workers:
        out.setdefault(w.role, grpc.insecure_channel(w.address, options=GRPC_OPTIONS))
    return out


def cluster_problems(cluster, kv_wait_s: float = 2.0) -> list[str]:
    """Every daemon alive and SERVING; once idle, no worker holds a KV block."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.cluster_helpers import wait_kv_free

    problems = []
    for child in [cluster.router, *cluster.workers]:
        if child.process.poll() is not None:
            problems.append(f"{child.role} at {child.address} died (exit code {child.process.poll()})")
            continue
        try:
            with grpc.insecure_channel(child.address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"{child.role} at {child.address} health {status}")
        except grpc.RpcError as exc:
            problems.append(f"{child.role} at {child.address} health check: {exc.code().name}")
    for w in cluster.workers:
        if w.process.poll() is None:
            try:
                used = wait_kv_free(w.address, _WORKER_SERVICES[w.role], timeout=kv_wait_s)
            except Exception as exc:  # e.g. the engine thread died: Stats fails
                problems.append(f"{w.role} at {w.address} Stats failed: {str(exc)[:300]}")
                continue
            if used:
                problems.append(f"{w.role} at {w.address} holds {used} KV blocks after {kv_wait_s} s idle")
    return problems


def bad_addresses(cluster, tarpit_address: str) -> tuple[str, ...]:
    """Prefill candidates that fail: refused, unresolvable, malformed, a stalled listener,
    daemons that do not serve PrefillService."""
    decode = next(w.address for w in cluster.workers if w.role == "decode")
    return ("127.0.0.1:1", "", "no-such-host.invalid:50051", "127.0.0.1:99999", "unix:/nonexistent/socket",
            "[::1", ":::", tarpit_address, cluster.address, decode)
