"""The OpenAI HTTP API's request mapping (`openai_request.parse`) and answer shapes
(`openai_response.Choices`), on plain SDK types: no sockets, no cluster."""

from __future__ import annotations

import json
import math

import pytest

from pdserve.client.types import Delta, GenerationResult, Timings, TokenLogprob, Usage
from pdserve.errors import InvalidRequestError
from pdserve.server.router.openai_request import OpenAIRequest, parse
from pdserve.server.router.openai_response import Choices, Piece
from pdserve.server.router.tool_calls import ToolUse, tool_use

PROMPT = {"prompt": "Hi there"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _lp(token: bytes, logprob: float, token_id: int = 7, top: tuple[tuple[bytes, float], ...] = ()) -> TokenLogprob:
    return TokenLogprob(token_id, logprob, top=[TokenLogprob(token_id + 1 + i, p, token_bytes=b)
                                                for i, (b, p) in enumerate(top)], token_bytes=token)


def _delta(index: int, text: str, logprobs: list[TokenLogprob] | None = None,
           prompt_logprobs: list[TokenLogprob | None] | None = None) -> Delta:
    ids = [7] * (len(logprobs) if logprobs else 1)
    return Delta(text=text, token_ids=ids, logprobs=logprobs, index=index, prompt_logprobs=prompt_logprobs)


def _result(index: int, completion_tokens: int, finish_reason: str = "length") -> GenerationResult:
    return GenerationResult(finish_reason=finish_reason, usage=Usage(5, completion_tokens, 0),  # type: ignore[arg-type]
                            timings=Timings(0, 0, 0, 0, 0, 0), request_id="r", prefill_worker_id="p",
                            decode_worker_id="d", prefill_mode="remote", num_prefill_attempts=1,
                            stop_string=None, stop_token_id=None, index=index)


# -- requests -------------------------------------------------------------------------------------


def test_completions_fields_map_onto_sampling_params() -> None:
    pb, spec = parse({**PROMPT, "n": 3, "best_of": 3, "logprobs": 2, "echo": True,
                      "logit_bias": {"1000": 100, "5": -2.5}}, chat=False, request_id="r1")
    params = pb.sampling_params
    assert (params.n, params.logprobs, params.prompt_logprobs) == (3, 2, 2)
    assert dict(params.logit_bias) == {1000: 100.0, 5: -2.5}
    assert spec == OpenAIRequest(chat=False, n=3, logprobs=2, echo=True, prompt_text="Hi there",
                                 prompt_token_ids=None, stream=False, include_usage=False)
    pb, spec = parse({"prompt": [5, 6], "logprobs": 0}, chat=False, request_id="r2")
    assert pb.sampling_params.logprobs == 0 and not pb.sampling_params.HasField("prompt_logprobs")
    assert (spec.n, spec.echo, spec.prompt_token_ids) == (1, False, [5, 6])
    assert pb.sampling_params.n == 1 and not pb.sampling_params.logit_bias


def test_chat_logprobs_and_top_logprobs() -> None:
    pb, spec = parse({**CHAT, "logprobs": True, "top_logprobs": 4, "n": 2, "stream": True,
                      "stream_options": {"include_usage": True}}, chat=True, request_id="r")
    assert (pb.sampling_params.logprobs, pb.sampling_params.n, spec.logprobs) == (4, 2, 4)
    assert spec.stream and spec.include_usage
    pb, spec = parse({**CHAT, "logprobs": True}, chat=True, request_id="r")
    assert pb.sampling_params.logprobs == 0 and spec.logprobs == 0
    pb, spec = parse({**CHAT, "logprobs": False}, chat=True, request_id="r")
    assert not pb.sampling_params.HasField("logprobs") and spec.logprobs is None


@pytest.mark.parametrize(("chat", "fields", "param"), [
    (False, {"n": 0}, "n"),
    (False, {"n": 129}, "n"),
    (False, {"n": True}, "n"),
    (False, {"n": 1.5}, "n"),
    (True, {"n": "2"}, "n"),
    (False, {"n": 2, "best_of": 3}, "best_of"),
    (False, {"best_of": 2}, "best_of"),
    (False, {"logprobs": 21}, "logprobs"),
    (False, {"logprobs": -1}, "logprobs"),
    (False, {"logprobs": True}, "logprobs"),
    (False, {"top_logprobs": 2}, "top_logprobs"),
    (False, {"echo": "yes"}, "echo"),
    (False, {"suffix": "x"}, "suffix"),
    (True, {"logprobs": 2}, "logprobs"),
    (True, {"top_logprobs": 2}, "top_logprobs"),
    (True, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (True, {"echo": True}, "echo"),
    (True, {"tools": [{"type": "function"}]}, "tools[0].function"),
    (False, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (False, {"tool_choice": "none"}, "tool_choice"),
    (True, {"functions": [{"name": "f"}]}, "functions"),
    (True, {"function_call": "auto"}, "function_call"),
    (True, {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
     "messages[0].tool_calls"),
    (False, {"logit_bias": [1, 2]}, "logit_bias"),
    (False, {"logit_bias": {"abc": 1}}, "logit_bias"),
    (False, {"logit_bias": {"-5": 1}}, "logit_bias"),
    (False, {"logit_bias": {"4294967296": 1}}, "logit_bias"),
    (False, {"logit_bias": {"5": 101}}, "logit_bias"),
    (False, {"logit_bias": {"5": "1"}}, "logit_bias"),
    (False, {"logit_bias": {"5": True}}, "logit_bias"),
    (False, {"logit_bias": {"5": math.inf}}, "logit_bias"),
])
def test_bad_fields_name_the_body_field(chat: bool, fields: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse({**(CHAT if chat else PROMPT), **fields}, chat=chat, request_id="r")
    assert err.value.field == param


def test_worker_errors_are_renamed_to_the_body_fields_they_came_from() -> None:
    _, completions = parse({**PROMPT, "logprobs": 2, "echo": True}, chat=False, request_id="r")
    assert completions.body_field("prompt_logprobs") == "logprobs"
    assert completions.body_field("prompt_token_ids") == "prompt"
    assert completions.body_field("logit_bias") is None
    _, chat = parse({**CHAT, "logprobs": True, "top_logprobs": 3}, chat=True, request_id="r")
    assert chat.body_field("logprobs") == "top_logprobs" and chat.body_field("n") is None


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


def _structured(body: dict, chat: bool = False, parser: str | None = None) -> tuple[dict | None, str | None]:
    """(the request's structured_output as a dict, the body field its errors name)."""
    pb, spec = parse({**(CHAT if chat else PROMPT), **body}, chat=chat, request_id="r", tool_parser=parser)
    so = pb.sampling_params.structured_output
    kind = so.WhichOneof("kind") if pb.sampling_params.HasField("structured_output") else None
    value = None if kind is None else list(so.choice.choices) if kind == "choice" else getattr(so, kind)
    return ({kind: value} if kind else None), spec.structured_field


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(("body", "kind", "field"), [
    ({}, None, None),
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a-b_1", "schema": SCHEMA, "strict": True,
                                                                 "description": "d"}}},
     {"json_schema": json.dumps(SCHEMA)}, "response_format.json_schema.schema"),
    ({"structured_outputs": {"json": SCHEMA}}, {"json_schema": json.dumps(SCHEMA)}, "structured_outputs.json"),
    ({"structured_outputs": {"json": '{"type": "object"}'}}, {"json_schema": '{"type": "object"}'},
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "[a-z]+", "json": None, "json_object": False, "disable_any_whitespace": True}},
     {"regex": "[a-z]+"}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": 'start: "x"'}}, {"grammar": 'start: "x"'}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]}, "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": True}}, {"json_object": True}, "structured_outputs.json_object"),
    ({"response_format": {"type": "text"}, "structured_outputs": {"regex": "x"}}, {"regex": "x"},
     "structured_outputs.regex"),
])
def test_response_format_and_structured_outputs_map_onto_structured_output(body, kind, field, chat) -> None:
    assert _structured(body, chat) == (kind, field)


def test_tools_reach_the_template_and_constrain_a_named_or_required_call() -> None:
    named = {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    pb, spec = parse({**CHAT, **named}, chat=True, request_id="r")
    assert json.loads(pb.messages.tools_json) == [WEATHER] and pb.messages.tools_optional
    assert _structured(named, chat=True) == ({"json_schema": json.dumps(SCHEMA)}, "tools[0].function.parameters")
    assert spec.tool_use == tool_use(named, None)
    required, field = _structured({"tools": [WEATHER], "tool_choice": "required"}, chat=True)
    assert field == "tools" and json.loads(required["json_schema"])["minItems"] == 1  # type: ignore[index]
    pb, spec = parse({**CHAT, "tools": [WEATHER]}, chat=True, request_id="r", tool_parser="hermes")
    assert pb.messages.tools_json and not pb.messages.tools_optional  # auto: the template must take them
    assert spec.tool_use is not None and spec.tool_use.mode == "auto"
    assert not pb.sampling_params.HasField("structured_output")
    # auto leaves the output free, so a constraint of the caller's may go with it.
    assert _structured({"tools": [WEATHER], "structured_outputs": {"regex": "x"}}, True, "hermes")[0] == {"regex": "x"}
    pb, spec = parse({**CHAT, "tools": [WEATHER], "tool_choice": "none"}, chat=True, request_id="r")
    assert not pb.messages.tools_json and spec.tool_use is None


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "{}"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "extra": 1}}},
     "response_format.json_schema.extra"),
    ({"structured_outputs": "regex"}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"regex": "a", "disable_fallback": "no"}}, "structured_outputs.disable_fallback"),
    ({"structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": ""}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
    ({"structured_outputs": {"json_object": 1}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"choice": "yes"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["yes", ""]}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"guided_json": SCHEMA}, "guided_json"),
    ({"guided_regex": "a"}, "guided_regex"),
])
def test_bad_structured_output_fields_name_the_body_field(body: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse({**PROMPT, **body}, chat=False, request_id="r")
    assert err.value.field == param


@pytest.mark.parametrize("constraint", [{"response_format": {"type": "json_object"}},
                                        {"structured_outputs": {"regex": "a"}}])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_constrained_tool_call_goes_with_no_other_constraint(constraint: dict, choice) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse({**CHAT, "tools": [WEATHER], "tool_choice": choice, **constraint}, chat=True, request_id="r")
    assert err.value.field == "tool_choice"


@pytest.mark.parametrize(("body", "worker_field", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
     "structured_output.json_schema", "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}}, "structured_output.json_object", "response_format"),
    ({"structured_outputs": {"regex": "[a"}}, "structured_output.regex", "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"]}}, "structured_output", "structured_outputs.choice"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "structured_output.json_schema", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "structured_output.json_schema", "tools[1].function.parameters"),
])
def test_worker_errors_about_the_structured_output_name_the_field_it_came_from(body, worker_field, param) -> None:
    _, spec = parse({**CHAT, **body}, chat=True, request_id="r")
    assert spec.body_field(worker_field) == param
    assert spec.body_field("tools") is None and spec.body_field("n") is None


# -- answers --------------------------------------------------------------------------------------


def _spec(**fields) -> OpenAIRequest:
    base = dict(chat=False, n=1, logprobs=None, echo=False, prompt_text=None, prompt_token_ids=None,
                stream=False, include_usage=False)
    return OpenAIRequest(**{**base, **fields})


def test_chat_choices_by_index_with_logprobs_and_summed_usage() -> None:
    choices = Choices(_spec(chat=True, n=2, logprobs=1))
    pieces = []
    pieces += choices.add_delta(_delta(0, "He", [_lp(b"He", -0.5, top=((b"He", -0.5),))]))
    pieces += choices.add_delta(_delta(1, "Yo", [_lp(b"Yo", -1.0, top=((b"Hi", -0.25),))]))
    pieces += choices.add_delta(_delta(0, "", [_lp(b"\xe2\x82", -float("inf"), top=((b"\xe2\x82", -2.0),))]))
    assert choices.add_result(_result(1, 1, "stop")) == [Piece(1, "", None, "stop")]
    assert not choices.complete
    choices.add_result(_result(0, 2))
    assert choices.complete
    assert [p.index for p in pieces] == [0, 1, 0] and all(p.worth_sending() for p in pieces)
    assert pieces[1].logprobs == {"content": [{"token": "Yo", "logprob": -1.0, "bytes": [89, 111], "top_logprobs": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]}]}], "refusal": None}
    first, second = choices.whole()
    assert (first["index"], first["message"], first["finish_reason"]) == (
        0, {"role": "assistant", "content": "He"}, "length")
    partial = first["logprobs"]["content"][1]
    assert partial["token"] == "\ufffd" and partial["bytes"] == [0xE2, 0x82] and partial["logprob"] == -9999.0
    assert len(first["logprobs"]["content"]) == 2 and len(second["logprobs"]["content"]) == 1
    assert (second["message"]["content"], second["finish_reason"]) == ("Yo", "stop")
    assert choices.usage() == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_choices_without_logprobs_have_none() -> None:
    choices = Choices(_spec())
    [piece] = choices.add_delta(_delta(0, ""))
    assert piece == Piece(0, "", None) and not piece.worth_sending()
    choices.add_result(_result(0, 1))
    assert choices.whole() == [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]


def test_completions_echo_puts_the_prompt_and_its_logprobs_first() -> None:
    # "Hi there" in three tokens: "Hi", " th", "ere"; nothing predicts the first.
    prompt_logprobs = [None, _lp(b" th", -3.0, top=((b" the", -1.0),)), _lp(b"ere", -0.5, top=((b"ere", -0.5),))]
    choices = Choices(_spec(n=2, logprobs=1, echo=True, prompt_text="Hi there"), echo_text="Hi there")
    pieces = choices.add_delta(_delta(0, "!", [_lp(b"!", -0.1, top=((b".", -0.05),))], prompt_logprobs))
    assert [(p.index, p.text) for p in pieces] == [(0, "Hi there"), (0, "!")]
    assert pieces[0].logprobs == {"tokens": ["Hi", " th", "ere"], "token_logprobs": [None, -3.0, -0.5],
                                  "top_logprobs": [None, {" the": -1.0, " th": -3.0}, {"ere": -0.5}],
                                  "text_offset": [0, 2, 5]}
    assert pieces[1].logprobs == {"tokens": ["!"], "token_logprobs": [-0.1], "top_logprobs": [{".": -0.05, "!": -0.1}],
                                  "text_offset": [8]}
    # Sample 1 gets the prompt too, before its first token or, without one, before its result.
    assert [(p.text, p.finish_reason) for p in choices.add_result(_result(1, 0, "abort"))] == [
        ("Hi there", None), ("", "abort")]
    choices.add_result(_result(0, 1))
    first, second = choices.whole()
    assert first["text"] == "Hi there!" and second["text"] == "Hi there"
    assert first["logprobs"]["tokens"] == ["Hi", " th", "ere", "!"]
    assert first["logprobs"]["text_offset"] == [0, 2, 5, 8]
    assert second["logprobs"]["token_logprobs"] == [None, -3.0, -0.5]


def test_echo_of_a_prompt_with_a_bos_token_gives_it_no_text() -> None:
    choices = Choices(_spec(logprobs=0, echo=True), echo_text="ab")
    [echo, _] = choices.add_delta(_delta(0, "c", [_lp(b"c", -1.0)], [None, _lp(b"ab", -2.0)]))
    assert echo.logprobs is not None and echo.logprobs["tokens"] == ["", "ab"]
    assert echo.logprobs["text_offset"] == [0, 0]


def test_echo_without_logprobs_is_text_only() -> None:
    choices = Choices(_spec(echo=True), echo_text="Hi")
    assert choices.add_delta(_delta(0, " you")) == [Piece(0, "Hi", None), Piece(0, " you", None)]


def test_echo_with_logprobs_holds_other_samples_back_until_the_prompts_logprobs_come() -> None:
    choices = Choices(_spec(n=3, logprobs=0, echo=True), echo_text="ab")
    assert choices.add_delta(_delta(1, "x", [_lp(b"x", -1.0)])) == []
    assert choices.add_result(_result(1, 1)) == []
    pieces = choices.add_delta(_delta(0, "y", [_lp(b"y", -1.0)], [None, _lp(b"b", -2.0)]))
    assert [(p.index, p.text, p.finish_reason) for p in pieces] == [
        (0, "ab", None), (0, "y", None), (1, "ab", None), (1, "x", None), (1, "", "length")]
    assert pieces[2].logprobs == pieces[0].logprobs == {"tokens": ["a", "b"], "token_logprobs": [None, -2.0],
                                                        "top_logprobs": [None, {"b": -2.0}], "text_offset": [0, 1]}
    assert [p.text for p in choices.add_delta(_delta(2, "z", [_lp(b"z", -1.0)]))] == ["ab", "z"]  # no longer held


def test_sample_0_ending_without_prompt_logprobs_releases_what_was_held() -> None:
    choices = Choices(_spec(n=2, logprobs=0, echo=True), echo_text="ab")
    assert choices.add_delta(_delta(1, "x", [_lp(b"x", -1.0)])) == []
    pieces = choices.add_result(_result(0, 0, "abort"))
    assert [(p.index, p.text, p.finish_reason) for p in pieces] == [
        (1, "ab", None), (1, "x", None), (0, "ab", None), (0, "", "abort")]


def _tool_spec(use: ToolUse, n: int = 1) -> OpenAIRequest:
    return _spec(chat=True, n=n, tool_use=use)


def _streamed(pieces: list[Piece]) -> dict[int, dict]:
    """Each choice as a client joins the streamed chunks: content, tool calls, finish_reason."""
    out: dict[int, dict] = {}
    for piece in (p for p in pieces if p.worth_sending()):
        choice = out.setdefault(piece.index, {"content": "", "tool_calls": [], "finish_reason": None})
        choice["content"] += piece.text
        for part in piece.tool_calls or ():
            if "id" in part:
                choice["tool_calls"].append({"id": part["id"], "type": "function", "function": dict(part["function"])})
            else:
                choice["tool_calls"][part["index"]]["function"]["arguments"] += part["function"]["arguments"]
        choice["finish_reason"] = piece.finish_reason or choice["finish_reason"]
    return out


def test_a_named_call_streams_arguments_and_answers_tool_calls_with_null_content() -> None:
    use = tool_use({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                   None)
    assert use is not None
    choices = Choices(_tool_spec(use, n=2))
    pieces = []
    for index, text in ((0, '{"a": '), (1, '{"a"'), (0, "12}"), (1, ": 3"), (1, "}")):
        pieces += choices.add_delta(_delta(index, text))
    pieces += choices.add_result(_result(0, 3, "stop")) + choices.add_result(_result(1, 3, "length"))
    first = pieces[0]
    assert first.text == "" and first.tool_calls == [{"index": 0, "id": first.tool_calls[0]["id"], "type": "function",
                                                      "function": {"name": "get_weather", "arguments": '{"a": '}}]
    assert pieces[2].tool_calls == [{"index": 0, "function": {"arguments": "12}"}}]
    whole = choices.whole()
    assert whole[0]["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": first.tool_calls[0]["id"], "type": "function",
         "function": {"name": "get_weather", "arguments": '{"a": 12}'}}]}
    assert [c["finish_reason"] for c in whole] == ["tool_calls", "length"]  # cut short: still its reason
    assert whole[1]["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 3}'
    streamed = _streamed(pieces)
    assert {i: (c["content"], c["tool_calls"], c["finish_reason"]) for i, c in streamed.items()} == {
        c["index"]: (c["message"]["content"] or "", c["message"]["tool_calls"], c["finish_reason"]) for c in whole}


def test_required_calls_come_at_the_end_and_a_broken_array_is_content() -> None:
    use = tool_use({"tools": [WEATHER], "tool_choice": "required"}, None)
    assert use is not None
    choices = Choices(_tool_spec(use, n=2))
    assert choices.add_delta(_delta(0, '[{"name": "get_weather", ')) == [Piece(0, "", None)]
    choices.add_delta(_delta(0, '"parameters": {"a": 1}}]'))
    choices.add_delta(_delta(1, '[{"name": "get_w'))
    end = choices.add_result(_result(0, 2, "stop"))
    assert [p.finish_reason for p in end] == [None, "tool_calls"]
    assert end[0].tool_calls and end[0].tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"a": 1}'}
    assert [p.text for p in choices.add_result(_result(1, 1, "length"))] == ['[{"name": "get_w', ""]
    first, second = choices.whole()
    assert first["message"]["content"] is None and len(first["message"]["tool_calls"]) == 1
    assert second["message"] == {"role": "assistant", "content": '[{"name": "get_w'}
    assert second["finish_reason"] == "length"


def test_auto_streams_content_and_each_call_once_its_block_closes() -> None:
    use = tool_use({"tools": [WEATHER]}, "hermes")
    assert use is not None
    choices = Choices(_tool_spec(use))
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"a": 7}}\n</tool_call>\n'
    pieces = [p for i in range(0, len(text), 5) for p in choices.add_delta(_delta(0, text[i:i + 5]))]
    pieces += choices.add_result(_result(0, 20, "stop"))
    [call] = [p for p in pieces if p.tool_calls]
    assert call.tool_calls == [{"index": 0, "id": call.tool_calls[0]["id"], "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"a": 7}'}}]
    [whole] = choices.whole()
    assert whole["message"]["content"] == "Checking." and whole["finish_reason"] == "tool_calls"
    streamed = _streamed(pieces)[0]
    assert (streamed["content"], streamed["tool_calls"]) == ("Checking.", whole["message"]["tool_calls"])
    plain = Choices(_tool_spec(use))
    plain.add_delta(_delta(0, "No tools needed. "))
    plain.add_result(_result(0, 3, "stop"))
    assert plain.whole()[0]["message"] == {"role": "assistant", "content": "No tools needed. "}
    assert plain.whole()[0]["finish_reason"] == "stop"
