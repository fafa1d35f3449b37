"""OpenAI's answer shapes, built from a generate stream's deltas and results (SDK types).

`Choices` takes the stream's messages as they come, in any interleaving of the n samples, and
gives back `Piece`s, each a part of one choice: its text and its logprobs in the endpoint's shape,
or its end (finish_reason). A streamed answer writes each piece as a chunk; a whole answer is the
pieces joined per choice, so the two agree. The shapes (OpenAI's API reference, the `openai` package's types):
- chat: choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}]}], "refusal": null}; token is the token's bytes read as UTF-8
  (a partial character becomes U+FFFD), bytes the list of their values.
- completions: choices[i].logprobs = {"tokens", "token_logprobs", "top_logprobs" ({token:
  logprob}, the chosen token included), "text_offset"}; offsets count the characters of the
  tokens before, from the start of the choice's text (vLLM's rule).
- completions echo: the prompt's text starts each choice (its first chunk, when streamed); with
  logprobs the prompt's tokens come first, the first with token_logprobs and top_logprobs null
  (nothing predicts it). The prompt's logprobs come on sample 0's first delta, which the
  daemons send before any other sample's; a delta that came before it anyway would be held back
  until it comes (or sample 0's result does).
- usage: prompt_tokens once, completion_tokens summed over the choices.
- chat tool calls (`OpenAIRequest.tool_use`): each choice's text goes through its
  `tool_calls.ToolCallReader`; a piece carries the content it lets through and its
  `delta.tool_calls` entries, the whole message `content` (null when it is only whitespace beside
  tool calls) and `tool_calls` [{"id", "type": "function", "function": {"name", "arguments"}}].
  A choice with tool calls that stopped by itself (not by length) ends with finish_reason
  "tool_calls".
Logprobs below -9999 (a filtered token's -inf) are written as -9999.0, as OpenAI does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pdserve.client.types import Delta, GenerationResult, TokenLogprob
from pdserve.errors import FatalError
from pdserve.server.router.openai_request import OpenAIRequest
from pdserve.server.router.tool_calls import Content, ToolCallReader

_MIN_LOGPROB = -9999.0


@dataclass(frozen=True, slots=True)
class Piece:
    """A part of one choice."""

    index: int
    text: str
    # choices[i].logprobs of this part, in the endpoint's shape; None without logprobs.
    logprobs: dict | None
    # Set on the choice's last piece (no text then).
    finish_reason: str | None = None
    # chat with tools: this part's `delta.tool_calls` entries; None without.
    tool_calls: list[dict] | None = None

    def worth_sending(self) -> bool:
        return bool(self.text) or self.logprobs is not None or self.finish_reason is not None \
            or self.tool_calls is not None


@dataclass(slots=True)
class _Choice:
    """One choice so far."""

    text: list[str] = field(default_factory=list)
    logprobs: dict | None = None
    # Characters of the tokens so far (completions text_offset).
    offset: int = 0
    started: bool = False
    result: GenerationResult | None = None
    # chat with tools: reads the text as content and tool calls; None: the text is the content.
    reader: ToolCallReader | None = None
    # The calls so far, as the whole message lists them.
    tool_calls: list[dict] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        reason = self.result.finish_reason if self.result else None
        return "tool_calls" if self.tool_calls and reason == "stop" else reason


class Choices:
    """A request's choices, built up from its stream (see the module docstring)."""

    def __init__(self, request: OpenAIRequest, echo_text: str | None = None) -> None:
        """`echo_text`: the prompt's text, with completions echo."""
        self.request = request
        self.echo_text = echo_text or ""
        tools = request.tool_use
        self._choices = [_Choice(reader=tools.reader() if tools else None) for _ in range(request.n)]
        self._prompt_logprobs: list[TokenLogprob | None] = []
        # Echo with logprobs: what came before the prompt's logprobs, held back; None once they came.
        self._held: list[Delta | GenerationResult] | None = [] if request.echo and request.logprobs is not None \
            else None

    def add_delta(self, delta: Delta) -> list[Piece]:
        """The pieces a delta makes: the echoed prompt first, if it is its choice's first."""
        if self._held is not None and delta.prompt_logprobs is None:
            self._held.append(delta)
            return []
        return [*self._delta_pieces(delta), *self._release()]

    def add_result(self, result: GenerationResult) -> list[Piece]:
        """The echoed prompt, if no delta of that choice came before its result, then its end."""
        if self._held is not None and result.index != 0:
            self._held.append(result)
            return []
        return [*self._release(), *self._result_pieces(result)]  # sample 0 ended: no prompt logprobs to wait for

    @property
    def complete(self) -> bool:
        """Whether every choice has its result."""
        return all(c.result is not None for c in self._choices)

    def whole(self) -> list[dict]:
        """Every choice of the answer (call when `complete`)."""
        out = []
        for i, c in enumerate(self._choices):
            text = "".join(c.text)
            choice: dict[str, Any] = ({"index": i, "message": _message(text, c.tool_calls)}
                                      if self.request.chat else {"index": i, "text": text})
            choice["logprobs"] = c.logprobs
            choice["finish_reason"] = c.finish_reason
            out.append(choice)
        return out

    def usage(self) -> dict:
        results = [c.result for c in self._choices if c.result is not None]
        prompt = results[0].usage.prompt_tokens if results else 0
        completion = sum(r.usage.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _release(self) -> list[Piece]:
        held, self._held = self._held or [], None
        return [piece for item in held for piece in (
            self._delta_pieces(item) if isinstance(item, Delta) else self._result_pieces(item))]

    def _delta_pieces(self, delta: Delta) -> list[Piece]:
        if delta.prompt_logprobs is not None:
            self._prompt_logprobs = delta.prompt_logprobs
        choice = self._choice(delta.index)
        pieces = self._start(delta.index, choice)
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs_json(choice, delta.logprobs or [])
        text, tool_calls = _read(choice.reader, delta.text)
        pieces.append(self._add(choice, Piece(delta.index, text, logprobs, tool_calls=tool_calls)))
        return pieces

    def _result_pieces(self, result: GenerationResult) -> list[Piece]:
        choice = self._choice(result.index)
        pieces = self._start(result.index, choice)
        if choice.reader is not None:  # what it held back
            text, tool_calls = _read(choice.reader, None)
            if text or tool_calls:
                pieces.append(self._add(choice, Piece(result.index, text, None, tool_calls=tool_calls)))
        choice.result = result
        return [*pieces, Piece(result.index, "", None, choice.finish_reason)]

    def _choice(self, index: int) -> _Choice:
        if not 0 <= index < len(self._choices):
            raise FatalError(f"the stream sent sample {index}, outside the request's n = {len(self._choices)}")
        return self._choices[index]

    def _start(self, index: int, choice: _Choice) -> list[Piece]:
        if choice.started:
            return []
        choice.started = True
        if not self.request.echo:
            return []
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = self._logprobs_json(choice, self._prompt_logprobs, self._first_prompt_token())
        return [self._add(choice, Piece(index, self.echo_text, logprobs))]

    def _add(self, choice: _Choice, piece: Piece) -> Piece:
        choice.text.append(piece.text)
        for part in piece.tool_calls or ():
            if "id" in part:
                choice.tool_calls.append({"id": part["id"], "type": "function", "function": dict(part["function"])})
            else:
                choice.tool_calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
        if piece.logprobs is not None:
            if choice.logprobs is None:
                choice.logprobs = {key: [] if isinstance(value, list) else value
                                   for key, value in piece.logprobs.items()}
            for key, value in piece.logprobs.items():
                if isinstance(value, list):
                    choice.logprobs[key].extend(value)
        return piece

    def _logprobs_json(self, choice: _Choice, entries: list[TokenLogprob | None], first_token: str = "") -> dict:
        if self.request.chat:
            return {"content": [_chat_entry(e) for e in entries if e is not None], "refusal": None}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            token = first_token if entry is None else _token(entry)
            out["tokens"].append(token)
            out["token_logprobs"].append(None if entry is None else _logprob(entry))
            out["top_logprobs"].append(None if entry is None else _top_dict(entry))
            out["text_offset"].append(choice.offset)
            choice.offset += len(token)
        return out

    def _first_prompt_token(self) -> str:
        """The first prompt token's text: what the echoed prompt has before the other tokens' bytes
        (its id is not in the stream; nothing predicts it). "" when they do not line up."""
        rest = b"".join(e.token_bytes for e in self._prompt_logprobs[1:] if e is not None)
        whole = self.echo_text.encode()
        return whole[:len(whole) - len(rest)].decode("utf-8", "replace") if whole.endswith(rest) else ""


def _read(reader: ToolCallReader | None, text: str | None) -> tuple[str, list[dict] | None]:
    """The content and `delta.tool_calls` entries of more text (None: the end of the output)."""
    if reader is None:
        return text or "", None
    events = reader.feed(text) if text is not None else reader.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    tool_calls = [e.chunk() for e in events if not isinstance(e, Content)]
    return content, tool_calls or None


def _message(text: str, tool_calls: list[dict]) -> dict:
    if not tool_calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text if text and not text.isspace() else None, "tool_calls": tool_calls}


def _token(entry: TokenLogprob) -> str:
    return entry.token_bytes.decode("utf-8", "replace")


def _logprob(entry: TokenLogprob) -> float:
    return max(entry.logprob, _MIN_LOGPROB)


def _chat_entry(entry: TokenLogprob) -> dict:
    return {**_chat_top(entry), "top_logprobs": [_chat_top(alt) for alt in entry.top]}


def _chat_top(entry: TokenLogprob) -> dict:
    return {"token": _token(entry), "logprob": _logprob(entry), "bytes": list(entry.token_bytes)}


def _top_dict(entry: TokenLogprob) -> dict[str, float]:
    top = {_token(alt): _logprob(alt) for alt in entry.top}
    top.setdefault(_token(entry), _logprob(entry))  # OpenAI always includes the sampled token
    return top
