"""OpenAI request bodies (/v1/completions, /v1/chat/completions) as GenerateRequests.

`parse` checks the OpenAI fields the router maps (n, logprobs, top_logprobs, echo, logit_bias,
best_of) and refuses the ones it does not, each with an InvalidRequestError naming the body's
field (HTTP 400 with `param`); the sampling values are checked again by the workers, whose
errors name the proto's fields, which `OpenAIRequest.body_field` turns back into the body's.
It returns, beside the request, what shaping the answer needs (`OpenAIRequest`).

How the fields map onto SamplingParams:
- `n` (1..128) -> n; `best_of` must be absent or equal n (no server-side ranking).
- chat `logprobs: true` with `top_logprobs` (0..20, default 0) -> logprobs = top_logprobs;
  `top_logprobs` without `logprobs: true` is refused.
- completions `logprobs: N` (0..20; OpenAI stops at 5, vLLM at 20) -> logprobs = N; with `echo`
  also prompt_logprobs = N (the prompt's tokens come first in the answer's logprobs).
- completions `echo` prepends the prompt's text; chat has no `echo`.
- `logit_bias` {"token id": number in [-100, 100]} -> the logit_bias map.
- `response_format` {"type": "text"} -> nothing; {"type": "json_object"} -> structured_output
  json_object; {"type": "json_schema", "json_schema": {"name", "schema", "strict"?,
  "description"?}} -> json_schema (the `schema` as JSON text).
- vLLM's `structured_outputs` {exactly one of "json" (a schema, object or JSON text), "regex",
  "grammar", "choice" ([str]), "json_object": true} -> the same kind of structured_output
  ("disable_fallback" and "disable_any_whitespace" are taken and change nothing: JSON never has
  free whitespace here). Not both of response_format and structured_outputs.
- chat `tools`, `tool_choice`, `parallel_tool_calls` -> `tool_calls.tool_use`: the tools reach the
  chat template (Messages.tools_json), and a named function or "required" becomes a json_schema
  (so neither goes with response_format or structured_outputs).
A worker's error about the structured output (`structured_output.<kind>`) is renamed to the field
it came from: `response_format.json_schema.schema`, `structured_outputs.regex`,
`tools[i].function.parameters`, ...
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from pdserve.client.convert import request_pb
from pdserve.errors import InvalidRequestError
from pdserve.server.router.tool_calls import ToolUse, tool_use
from pdserve.v1 import common_pb2

MAX_N = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
# OpenAI fields passed to SamplingParams as they are (the last four are pdserve/vLLM extensions).
_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
             "top_k", "min_p", "repetition_penalty", "ignore_eos")
_UNSUPPORTED = ("suffix", "functions", "function_call")
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
_SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# vLLM's structured_outputs keys and the StructuredOutput kind each sets.
_VLLM_KINDS = {"json": "json_schema", "regex": "regex", "grammar": "grammar", "choice": "choice",
               "json_object": "json_object"}
# vLLM options that change nothing here (JSON is always laid out without free whitespace).
_VLLM_IGNORED = ("disable_fallback", "disable_any_whitespace")
# vLLM's older spellings, refused rather than silently dropped.
_VLLM_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """What writing the answer needs to know of the body."""

    chat: bool
    # Choices asked for (SamplingParams.n).
    n: int
    # Top alternatives per token in the answer's logprobs; None: no logprobs.
    logprobs: int | None
    # completions `echo`: the prompt's text starts each choice's text.
    echo: bool
    # The completions prompt as given: text, or token ids (the caller detokenizes them for echo).
    prompt_text: str | None
    prompt_token_ids: list[int] | None
    stream: bool
    include_usage: bool
    # The body field the structured output came from (its errors' name); None: unconstrained.
    structured_field: str | None = None
    # chat: how the tools are used (tool_choice); None: they are not.
    tool_use: ToolUse | None = None

    def body_field(self, proto_field: str) -> str | None:
        """The body's name of a field a worker's error names, when it differs (else None)."""
        if proto_field.startswith("structured_output") and self.structured_field is not None:
            return self.structured_field
        if self.chat:
            return "top_logprobs" if proto_field == "logprobs" and self.logprobs else None
        return {"prompt_logprobs": "logprobs", "prompt_token_ids": "prompt"}.get(proto_field)


def parse(body: dict, chat: bool, request_id: str,
          tool_parser: str | None = None) -> tuple[common_pb2.GenerateRequest, OpenAIRequest]:
    """The GenerateRequest of an OpenAI body, and what its answer needs; InvalidRequestError naming
    the body's field. `tool_parser`: the router's --tool-call-parser (needed by tool_choice "auto")."""
    for name in (*_UNSUPPORTED, *_VLLM_GUIDED, *(("echo",) if chat else ("top_logprobs", "tools", "tool_choice"))):
        if body.get(name) not in (None, False, 0, {}, [], ""):
            hint = (" (use logprobs: N)" if name == "top_logprobs" else
                    " (use structured_outputs or response_format)" if name in _VLLM_GUIDED else "")
            raise InvalidRequestError(name, f"is not supported by pdserve's HTTP API{hint}")
    n = _int(body, "n", 1, MAX_N)
    n = 1 if n is None else n
    best_of = _int(body, "best_of", 1, MAX_N)
    if best_of is not None and best_of != n:
        raise InvalidRequestError("best_of", f"must equal n ({n}) or be absent: pdserve does not rank samples")
    logprobs = _chat_logprobs(body) if chat else _int(body, "logprobs", 0, MAX_LOGPROBS)
    echo = False if chat else bool(flag(body, "echo"))
    sampling: dict[str, Any] = {name: body.get(name) for name in _SAMPLING}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling.update(max_tokens=16 if max_tokens is None and not chat else max_tokens,  # OpenAI's default
                    stop=body.get("stop"), n=n, logprobs=logprobs,
                    prompt_logprobs=logprobs if echo else None, logit_bias=_logit_bias(body.get("logit_bias")))
    tools = tool_use(body, tool_parser) if chat else None
    sampling["structured_output"], structured_field = _structured_output(body, tools)
    prompt = messages = token_ids = None
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
        messages = [message(m, i) for i, m in enumerate(messages)]
    else:
        prompt, token_ids = _prompt(body.get("prompt"))
    pb = request_pb(prompt=prompt, messages=messages, prompt_token_ids=token_ids, sampling=sampling,
                    request_id=request_id, tools=body["tools"] if tools is not None else None)
    if tools is not None:
        pb.messages.tools_optional = tools.mode != "auto"  # a constrained call needs no template's help
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
    return pb, OpenAIRequest(chat=chat, n=n, logprobs=logprobs, echo=echo, prompt_text=prompt,
                             prompt_token_ids=token_ids, stream=stream, include_usage=include_usage,
                             structured_field=structured_field, tool_use=tools)


def _structured_output(body: dict, tools: ToolUse | None) -> tuple[dict[str, Any] | None, str | None]:
    """The SDK's structured_output of a body (response_format, structured_outputs, or the tool call
    it must make), and the body field its errors name; (None, None) when the output is free."""
    given = [found for found in (_response_format(body.get("response_format")),
                                 _structured_outputs(body.get("structured_outputs"))) if found is not None]
    if len(given) > 1:
        raise InvalidRequestError("structured_outputs", "give response_format or structured_outputs, not both")
    schema = tools.schema if tools is not None else None
    if schema is not None:
        if given:
            raise InvalidRequestError("tool_choice", "a named function or \"required\" constrains the output to tool "
                                      "calls: it does not go with response_format or structured_outputs")
        return {"json_schema": json.dumps(schema[0], ensure_ascii=False)}, schema[1]
    return given[0] if given else (None, None)


def _response_format(value: Any) -> tuple[dict[str, Any], str] | None:
    """OpenAI's response_format as (structured_output, field); None for text."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}, "response_format"
    if kind != "json_schema":
        raise InvalidRequestError("response_format", 'must be {"type": "text"}, {"type": "json_object"} or '
                                  f'{{"type": "json_schema", "json_schema": {{...}}}}, got {value!r:.100}')
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError("response_format.json_schema", "must be an object {name, schema, strict?, "
                                  "description?}")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise InvalidRequestError(f"response_format.json_schema.{unknown[0]}", "is not a field of json_schema")
    if not isinstance(spec.get("name"), str) or not _SCHEMA_NAME.fullmatch(spec["name"]):
        raise InvalidRequestError("response_format.json_schema.name", "must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
    for name, kind_of, what in (("strict", bool, "true or false"), ("description", str, "a string")):
        if spec.get(name) is not None and not isinstance(spec[name], kind_of):
            raise InvalidRequestError(f"response_format.json_schema.{name}", f"must be {what}")
    if not isinstance(spec.get("schema"), dict):
        raise InvalidRequestError("response_format.json_schema.schema", "must be a JSON schema (an object)")
    return {"json_schema": json.dumps(spec["schema"], ensure_ascii=False)}, "response_format.json_schema.schema"


def _structured_outputs(value: Any) -> tuple[dict[str, Any], str] | None:
    """vLLM's structured_outputs as (structured_output, field); None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("structured_outputs", f"must be an object with one of {', '.join(_VLLM_KINDS)}")
    given: dict[str, Any] = {}
    for key, spec in value.items():
        if spec is None or (key == "json_object" and spec is False):
            continue  # unset, as vLLM's own client sends them
        if key in _VLLM_IGNORED:
            if not isinstance(spec, bool):
                raise InvalidRequestError(f"structured_outputs.{key}", "must be true or false")
        elif key in _VLLM_KINDS:
            given[key] = spec
        else:
            raise InvalidRequestError(f"structured_outputs.{key}", "is not supported by pdserve")
    if len(given) != 1:
        raise InvalidRequestError("structured_outputs", f"give exactly one of {', '.join(_VLLM_KINDS)} "
                                  f"(got {', '.join(given) or 'none'})")
    [(key, spec)] = given.items()
    field = f"structured_outputs.{key}"
    if key == "json" and isinstance(spec, dict):
        spec = json.dumps(spec, ensure_ascii=False)
    if key == "json_object":
        if spec is not True:
            raise InvalidRequestError(field, "must be true")
    elif key == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
            raise InvalidRequestError(field, "must be a non-empty list of non-empty strings")
    elif not isinstance(spec, str) or not spec:
        what = "a JSON schema (an object or its JSON text)" if key == "json" else "a non-empty string"
        raise InvalidRequestError(field, f"must be {what}")
    return {_VLLM_KINDS[key]: spec}, field


def message(m: Any, index: int) -> dict[str, str]:
    """One chat message of a body as {role, content} (content parts: text only)."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise InvalidRequestError(f"messages[{index}]", "must be an object with a role and a content")
    if m.get("tool_calls"):  # the proto's ChatMessage carries role and content only
        raise InvalidRequestError(f"messages[{index}].tool_calls", "earlier tool calls in the conversation are not "
                                  "supported yet (write them into the content)")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise InvalidRequestError(f"messages[{index}].content", "only text parts are supported")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise InvalidRequestError(f"messages[{index}].content", "must be a string")
    return {"role": m["role"], "content": content}


def _prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    """(text, None) or (None, token ids) of a completions prompt."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, prompt
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", "must be a string or a list of token ids (one prompt)")
    return prompt, None


def _chat_logprobs(body: dict) -> int | None:
    """Top alternatives per token for chat's `logprobs: true` + `top_logprobs`; None: off."""
    wanted = flag(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    return (top or 0) if wanted else None


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} as {id: bias}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("logit_bias", f"must map token ids to numbers, got {type(value).__name__}")
    biases: dict[int, float] = {}
    for key, bias in value.items():
        if not _TOKEN_ID.fullmatch(key) or int(key) >= 2**32:
            raise InvalidRequestError("logit_bias", f"key {key!r} is not a token id (an integer from 0)")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"the bias of token {key} must be a number in "
                                                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}")
        biases[int(key)] = float(bias)
    return biases


def _int(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return value


def flag(body: dict, name: str) -> bool | None:
    """A boolean field; None when absent."""
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError(name, f"must be true or false, got {value!r}")
    return value
