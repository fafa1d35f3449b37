"""Tool calls on the chat endpoint: OpenAI's `tools` and `tool_choice` checked, and the model's output
read back as `message.tool_calls`.

How each `tool_choice` is served (`ToolUse`; with `tools` absent or `tool_choice: "none"` there is
none: the answer is plain text and the tools do not reach the chat template either):
- a named function: the output is constrained to that function's `parameters` (a JSON schema) and
  is its arguments, whatever the model; the tools reach the chat template when it takes tools.
- "required": the output is constrained to a JSON array (minItems 1; maxItems 1 with
  `parallel_tool_calls: false`) of {"name": one of the tools, "parameters": that tool's}, each
  item one call; the tools reach the chat template when it takes tools.
- "auto" (the default with tools): the output is free; the chat template must take tools (a
  worker whose template takes none refuses them) and the router reads the calls out of the
  model's own markup with the parser named by --tool-call-parser (hermes: Hermes and Qwen2.5's
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks).

A `ToolCallReader` per choice turns the output text, fed as it streams, into `Event`s: content
text and tool-call parts (the first part of a call carries its id, type and name, later ones
more of its arguments), which the caller writes as streamed deltas or joins into one message, so
both agree:
- named: each piece of text streams as more of the call's arguments.
- required: the array is read whole at the end (a truncated or broken one becomes content).
- hermes: text outside the blocks streams as content; a block is held from `<tool_call>` to
  `</tool_call>` (or the end of the output) and then sent as one call, or as content when its
  JSON does not parse. Content's trailing whitespace is held until more content follows; what is
  held at the end is dropped when there are tool calls (so a message of only tool calls has
  content null, and the answer is the same however the text was cut).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pdserve.errors import InvalidRequestError

_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    # A JSON schema of the arguments (an object with no properties when the body gave none).
    parameters: dict


@dataclass(frozen=True, slots=True)
class ToolUse:
    """How a chat request uses its tools (see the module docstring)."""

    mode: Literal["named", "required", "auto"]
    tools: tuple[Tool, ...]
    # mode "named": the function; mode "auto": the parser of the model's markup.
    name: str | None = None
    parser: str | None = None
    parallel: bool = True

    @property
    def schema(self) -> tuple[dict, str] | None:
        """The JSON schema the output is constrained to, and the body field its errors name; None for auto."""
        if self.mode == "named":
            index, tool = next((i, t) for i, t in enumerate(self.tools) if t.name == self.name)
            return tool.parameters, f"tools[{index}].function.parameters"
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
            array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
            return ({**array, "maxItems": 1} if not self.parallel else array), "tools"
        return None

    def reader(self) -> ToolCallReader:
        """A new reader of one choice's output."""
        if self.mode == "named":
            assert self.name is not None
            return NamedToolCall(name=self.name)
        if self.mode == "required":
            return RequiredToolCalls()
        return PARSERS[self.parser or ""]()


def tool_use(body: dict, parser: str | None) -> ToolUse | None:
    """The ToolUse of a chat body's `tools`, `tool_choice` and `parallel_tool_calls`; None when the
    tools are not used. `parser`: the router's --tool-call-parser. InvalidRequestError naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequestError("parallel_tool_calls", f"must be true or false, got {parallel!r:.100}")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "needs tools")
        return None
    checked = check_tools(tools)
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if choice == "required":
        return ToolUse("required", checked, parallel=parallel is not False)
    if choice == "auto":
        if parser is None:
            raise InvalidRequestError("tool_choice", '"auto" needs the router started with --tool-call-parser '
                                      '(or name a function, or "required")')
        return ToolUse("auto", checked, parser=parser)
    name = _chosen_name(choice)
    if name not in {t.name for t in checked}:
        raise InvalidRequestError("tool_choice", f"names {name!r:.100}, which is not among the tools")
    return ToolUse("named", checked, name=name)


def check_tools(tools: Any) -> tuple[Tool, ...]:
    """A body's `tools`, checked; InvalidRequestError naming the bad one's field."""
    if not isinstance(tools, list):
        raise InvalidRequestError("tools", "must be a list of {type: function, function: {name, parameters}}")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise InvalidRequestError(f"tools[{i}].type", 'must be "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequestError(f"tools[{i}].function", "must be an object {name, description?, parameters?}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"tools[{i}].function.name", f"must be 1 to 64 of a-z, A-Z, 0-9, _ and -, "
                                      f"got {name!r:.100}")
        if any(t.name == name for t in out):
            raise InvalidRequestError(f"tools[{i}].function.name", f"{name!r} names an earlier tool too")
        if not isinstance(function.get("description", ""), str):
            raise InvalidRequestError(f"tools[{i}].function.description", "must be a string")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters", "must be a JSON schema (an object)")
        out.append(Tool(name, parameters))
    return tuple(out)


def _chosen_name(choice: Any) -> str:
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return choice["function"]["name"]
    raise InvalidRequestError("tool_choice", 'must be "none", "auto", "required" or '
                              f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r:.100}')


# -- reading the output -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    """Text of the answer's content."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    """A part of the index-th call: the first carries id and name, each more of the arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def chunk(self) -> dict:
        """As a streamed `delta.tool_calls` entry."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Event = Content | ToolCallPart


@dataclass(slots=True)
class ToolCallReader:
    """Reads one choice's output as it streams (`feed`, then `finish` at its end)."""

    num_calls: int = 0

    def feed(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        return []

    def _call(self, name: str, arguments: str) -> ToolCallPart:
        self.num_calls += 1
        return ToolCallPart(self.num_calls - 1, arguments, id=new_call_id(), name=name)


@dataclass(slots=True)
class NamedToolCall(ToolCallReader):
    """The output is the arguments of one call of `name`."""

    name: str = ""

    def feed(self, text: str) -> list[Event]:
        if self.num_calls == 0:
            return [self._call(self.name, text)]
        return [ToolCallPart(0, text)] if text else []


@dataclass(slots=True)
class RequiredToolCalls(ToolCallReader):
    """The output is a JSON array of {"name", "parameters"}, read at its end."""

    text: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[Event]:
        self.text.append(text)
        return []

    def finish(self) -> list[Event]:
        text = "".join(self.text)
        try:
            calls = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            calls = None
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                                  for c in calls):
            return [Content(text)] if text else []
        return [self._call(c["name"], _arguments(c.get("parameters", {}))) for c in calls]


@dataclass(slots=True)
class HermesToolCalls(ToolCallReader):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5)."""

    OPEN = "<tool_call>"
    CLOSE = "</tool_call>"

    buffer: str = ""
    in_call: bool = False
    held_blank: str = ""  # the content's trailing whitespace, not sent yet

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while True:
            if self.in_call:
                end = self.buffer.find(self.CLOSE)
                if end < 0:
                    return events
                body, self.buffer = self.buffer[:end], self.buffer[end + len(self.CLOSE):]
                self.in_call = False
                events += self._block(body, closed=True)
            else:
                start = self.buffer.find(self.OPEN)
                if start < 0:  # hold back what may be the start of a tag
                    keep = _partial_tag(self.buffer, self.OPEN)
                    events += self._content(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return events
                events += self._content(self.buffer[:start])
                self.buffer = self.buffer[start + len(self.OPEN):]
                self.in_call = True

    def finish(self) -> list[Event]:
        events = self._block(self.buffer, closed=False) if self.in_call else self._content(self.buffer)
        self.buffer, self.in_call = "", False
        if self.held_blank and self.num_calls == 0:  # beside tool calls, trailing blanks are layout
            events.append(Content(self.held_blank))
        self.held_blank = ""
        return events

    def _block(self, body: str, closed: bool) -> list[Event]:
        try:
            call = json.loads(body)
        except (ValueError, RecursionError):
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            return [self._call(call["name"], _arguments(call.get("arguments", call.get("parameters", {}))))]
        return self._content(self.OPEN + body + (self.CLOSE if closed else ""))

    def _content(self, text: str) -> list[Event]:
        text = self.held_blank + text
        body = text.rstrip()
        self.held_blank = text[len(body):]
        return [Content(body)] if body else []


# --tool-call-parser's choices: the reader of each model family's markup.
PARSERS: dict[str, type[ToolCallReader]] = {"hermes": HermesToolCalls}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(value: Any) -> str:
    """A call's arguments as JSON text, laid out as constrained JSON is (", " and ": ")."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (0 if none)."""
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
