"""Tool calls on the chat endpoint (`pdserve.server.router.tool_calls`): `tools` and `tool_choice` checked
and mapped, and the readers that turn output text, fed in any cut, into content and tool calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pdserve.errors import InvalidRequestError
from pdserve.server.router.tool_calls import (
    Content,
    HermesToolCalls,
    NamedToolCall,
    RequiredToolCalls,
    ToolCallPart,
    ToolCallReader,
    tool_use,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock"}}


def read(reader: ToolCallReader, pieces: list[str]) -> tuple[str | None, list[dict], list]:
    """(content, tool calls as the whole message has them, every event) of output fed in `pieces`."""
    events = [e for piece in pieces for e in reader.feed(piece)] + reader.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: list[dict] = []
    for e in events:
        if isinstance(e, ToolCallPart) and e.id is not None:
            assert e.index == len(calls) and e.id.startswith("call_")
            calls.append({"name": e.name, "arguments": e.arguments})
        elif isinstance(e, ToolCallPart):
            calls[e.index]["arguments"] += e.arguments
    return (content or None), calls, events


def cuts(text: str) -> list[list[str]]:
    """`text` whole, one character at a time, and in pieces of 3 and 7."""
    return [[text], list(text), *([text[i:i + n] for i in range(0, len(text), n)] for n in (3, 7))]


# -- tools and tool_choice ---------------------------------------------------------------------------------


def test_no_tools_or_tool_choice_none_uses_none() -> None:
    assert tool_use({}, None) is None
    assert tool_use({"tools": [], "tool_choice": "none"}, None) is None
    assert tool_use({"tools": [WEATHER], "tool_choice": "none"}, None) is None


def test_a_named_function_constrains_to_its_parameters() -> None:
    use = tool_use({"tools": [CLOCK, WEATHER], "tool_choice": {"type": "function",
                                                                "function": {"name": "get_weather"}}}, None)
    assert use is not None and use.mode == "named" and use.name == "get_weather"
    assert use.schema == (WEATHER["function"]["parameters"], "tools[1].function.parameters")
    clock = tool_use({"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "clock"}}}, None)
    assert clock is not None and clock.schema == ({"type": "object", "properties": {}}, "tools[0].function.parameters")


@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_is_an_array_of_calls_of_the_tools(parallel: bool | None) -> None:
    body = {"tools": [WEATHER, CLOCK], "tool_choice": "required"}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    use = tool_use(body, None)
    assert use is not None and use.schema is not None
    schema, field = use.schema
    assert field == "tools"
    jsonschema.Draft202012Validator.check_schema(schema)
    one = [{"name": "get_weather", "parameters": {"city": "Paris"}}]
    jsonschema.validate(one, schema)
    two = [*one, {"name": "clock", "parameters": {}}]
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "nope", "parameters": {}}],
                *([two] if parallel is False else [])):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    if parallel is not False:
        jsonschema.validate(two, schema)


def test_auto_is_the_default_with_tools_and_needs_a_parser() -> None:
    use = tool_use({"tools": [WEATHER]}, "hermes")
    assert use is not None and (use.mode, use.parser, use.schema) == ("auto", "hermes", None)
    with pytest.raises(InvalidRequestError) as err:
        tool_use({"tools": [WEATHER], "tool_choice": "auto"}, None)
    assert err.value.field == "tool_choice" and "--tool-call-parser" in str(err.value)


@pytest.mark.parametrize(("body", "field"), [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [WEATHER, {"type": "code"}]}, "tools[1].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "x" * 65}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, CLOCK, WEATHER]}, "tools[2].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 5}}]}, "tools[0].function.description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "clock"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tools_and_tool_choice_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        tool_use(body, "hermes")
    assert err.value.field == field


# -- reading the output ------------------------------------------------------------------------------------


def test_a_named_call_streams_its_arguments_as_they_come() -> None:
    reader = NamedToolCall(name="get_weather")
    first, *rest = reader.feed('{"city": ') + reader.feed("") + reader.feed('"Paris"}') + reader.finish()
    assert first.name == "get_weather" and first.id and first.arguments == '{"city": '
    assert first.chunk() == {"index": 0, "id": first.id, "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": '}}
    assert rest == [ToolCallPart(0, '"Paris"}')] and rest[0].chunk() == {"index": 0,
                                                                         "function": {"arguments": '"Paris"}'}}


@pytest.mark.parametrize("pieces", cuts('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                                        '{"name": "clock", "parameters": {}}]'))
def test_required_calls_come_whole_at_the_end(pieces: list[str]) -> None:
    reader = RequiredToolCalls()
    assert all(reader.feed(piece) == [] for piece in pieces)
    assert read(RequiredToolCalls(), pieces)[:2] == (None, [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                                            {"name": "clock", "arguments": "{}"}])


def test_a_truncated_required_array_is_content() -> None:
    assert read(RequiredToolCalls(), ['[{"name": "clock", "para'])[:2] == ('[{"name": "clock", "para', [])


HERMES = ('I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>{"name": "clock"}</tool_call>')


@pytest.mark.parametrize("pieces", cuts(HERMES))
def test_hermes_blocks_become_calls_in_any_cut(pieces: list[str]) -> None:
    content, calls, events = read(HermesToolCalls(), pieces)
    assert content == "I will look."  # beside tool calls, trailing whitespace is layout
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "clock", "arguments": "{}"}]
    assert all(e.id is not None for e in events if isinstance(e, ToolCallPart))  # each call sent whole


@pytest.mark.parametrize(("text", "content", "calls"), [
    ("just an answer", "just an answer", []),
    ("  spaced  answer \n", "  spaced  answer \n", []),
    ("\n\n", "\n\n", []),  # no calls: whitespace is the content
    ('<tool_call>{"name": "clock", "arguments": {}}</tool_call>\n\n', None, [{"name": "clock", "arguments": "{}"}]),
    ('Sure. \n<tool_call>{"name": "clock"}</tool_call> \n', "Sure.", [{"name": "clock", "arguments": "{}"}]),
    ('\n<tool_call>{"name": "clock", "arguments": {"a": [1, 2]}}</tool_call> and then',
     "\n and then", [{"name": "clock", "arguments": '{"a": [1, 2]}'}]),
    ('<tool_call>{"name": "clock", "arguments": {}}', None, [{"name": "clock", "arguments": "{}"}]),  # unclosed at EOS
    ('<tool_call>{"name": "clock", "argu', '<tool_call>{"name": "clock", "argu', []),  # cut off
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>["clock"]</tool_call>', '<tool_call>["clock"]</tool_call>', []),
    ('<tool_call>{"name": "clock", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
     [{"name": "clock", "arguments": '{"a": 1}'}]),  # arguments already as JSON text
    ("a <tool_cal b", "a <tool_cal b", []),
    ("ends with <tool_c", "ends with <tool_c", []),
])
@pytest.mark.parametrize("cut", [0, 1])
def test_hermes_content_and_calls(text: str, content: str | None, calls: list[dict], cut: int) -> None:
    assert read(HermesToolCalls(), cuts(text)[cut])[:2] == (content, calls)


def test_hermes_holds_back_only_what_may_be_a_tag_and_trailing_blanks() -> None:
    reader = HermesToolCalls()
    assert reader.feed("Sure <tool") == [Content("Sure")]
    assert reader.feed(" no") == [Content(" <tool no")]
    assert reader.feed("\n ") == []
    assert reader.feed("x") == [Content("\n x")]
    assert reader.feed(" ") == [] and reader.finish() == [Content(" ")]  # no calls: the blank is content


def test_hermes_arguments_are_reserialized_on_one_line() -> None:
    text = '<tool_call>{"name":"f","arguments":{\n  "x" :1,"y":["\u00e9"]}}</tool_call>'
    [call] = read(HermesToolCalls(), [text])[1]
    assert call["arguments"] == '{"x": 1, "y": ["\u00e9"]}' and json.loads(call["arguments"]) == {"x": 1, "y": ["é"]}
