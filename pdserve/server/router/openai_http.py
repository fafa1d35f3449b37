"""OpenAI-compatible HTTP on the router: /v1/completions, /v1/chat/completions, /v1/models, /health,
and vLLM's /tokenize and /detokenize.

aiohttp, on the router's own event loop. A request body becomes the GenerateRequest
the SDK would send (`openai_request.parse`, through `pdserve.client.convert.request_pb`) and goes
through the router's own placement (`RouterServicer.generate`); the responses come back as SDK
types, are shaped into OpenAI's choices (`openai_response.Choices`: n samples, logprobs, echo) and
written as OpenAI JSON, or as server-sent events with `stream: true` (`data: {chunk}` lines, each
chunk one choice's part with its index, then `data: [DONE]`). The caller's W3C `traceparent`
header continues its trace, as gRPC metadata does. Echo of a token-id prompt asks a worker to
detokenize it first (the router has no tokenizer).

Errors are OpenAI's error object, {"error": {"message", "type", "param", "code"}}:
a bad field is 400 with `param` naming it; no valid API key 401 (when the router has
keys: `Authorization: Bearer KEY`); an unknown model 404; no room 429; no
worker 503; a deadline 504. An error after the stream began is one `data:
{"error": ...}` event before [DONE]. Not supported (400, named): best_of other than n,
suffix, functions and function_call (use tools), tool calls in a conversation's earlier messages,
echo on chat, top_logprobs on completions (its `logprobs: N` says it).

Structured output (`response_format`, vLLM's `structured_outputs`; openai_request) on both
endpoints; tool calls (`tools`, `tool_choice`; tool_calls.py) on chat: a named function or
"required" constrain the output to the call, "auto" reads the model's own markup with the router's
--tool-call-parser. Streamed, a named function's arguments come as they are generated
(`delta.tool_calls[0].function.arguments`, the first chunk with id, type and name); "required"
sends its calls whole once the output ends; "auto" streams content and sends each call whole when
its block closes.

/tokenize and /detokenize take vLLM's bodies and answer its shapes, from a worker's own
preprocessing (`pdserve.server.router.tokenization`), so `count` is the `usage.prompt_tokens` a
completion of the same input reports:
  POST /tokenize {"prompt": str, "add_special_tokens"?: bool} or {"messages": [...],
    "add_generation_prompt"?: bool, "add_special_tokens"?: bool}, either with "model"? and
    "return_token_strs"?: bool -> {"count", "max_model_len", "tokens": [id], "token_strs": [str] | null}
  POST /detokenize {"tokens": [id], "model"?} -> {"prompt": str}
An omitted flag means what generation does (special tokens: the worker's setting for a prompt, none
added to a chat template's; the generation prompt added). Not supported (400, named):
continue_final_message, chat_template, chat_template_kwargs, media_io_kwargs, mm_processor_kwargs.
`tools` (with messages) are rendered as a chat completion's are (tool_choice "auto"). They need an
API key as the /v1/ routes do.

Every request has an id: the caller's `X-Request-Id` header (1-128 printable ASCII characters,
no spaces; 400 otherwise) or a new one. It is the request's id through the cluster (so
also in the response's `id`) and comes back in the response's `X-Request-Id` header, errors
and event streams included.
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
import time
import uuid
from collections.abc import AsyncIterator

from aiohttp import web

from pdserve.client.convert import delta_from_pb, result_from_pb
from pdserve.errors import (AuthenticationError, CapacityError, DeadlineError, InvalidRequestError, NotFoundError,
                            PdserveError, UnavailableError)
from pdserve.observability import tracing
from pdserve.routing.registry import Role
from pdserve.server.router import openai_request
from pdserve.server.router.auth import ApiKeys
from pdserve.server.router.openai_request import OpenAIRequest, flag, message
from pdserve.server.router.openai_response import Choices, Piece
from pdserve.server.router.tool_calls import check_tools
from pdserve.server.streams import Watch
from pdserve.v1 import tokenize_pb2

log = logging.getLogger("pdserve.http")

_STATUS = [(InvalidRequestError, 400, "invalid_request_error"), (AuthenticationError, 401, "invalid_request_error"),
           (NotFoundError, 404, "invalid_request_error"),
           (CapacityError, 429, "rate_limit_error"), (UnavailableError, 503, "service_unavailable"),
           (DeadlineError, 504, "timeout")]
# vLLM /tokenize fields that do not map onto pdserve's preprocessing.
_TOKENIZE_UNSUPPORTED = ("continue_final_message", "chat_template", "chat_template_kwargs",
                         "media_io_kwargs", "mm_processor_kwargs")
# Routes outside /v1/ that need an API key all the same (vLLM serves these at the root).
_KEYED_ROOT_PATHS = frozenset({"/tokenize", "/detokenize"})
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces


class OpenAIServer:
    def __init__(self, router, model_name: str, host: str = "127.0.0.1", port: int = 0,
                 timeout_s: float | None = 600.0, keys: ApiKeys | None = None,
                 ssl_context: ssl.SSLContext | None = None, tool_call_parser: str | None = None) -> None:
        self.router = router  # a RouterServicer
        self.tool_call_parser = tool_call_parser  # reads tool calls out of the output (tool_choice "auto")
        self.model_name = model_name
        self.host, self.port = host, port
        self.timeout_s = timeout_s
        self.keys = keys or ApiKeys([])
        self.ssl_context = ssl_context
        app = web.Application(client_max_size=8 * 2**20, middlewares=[_request_id, self._authenticate])
        app.on_response_prepare.append(_echo_request_id)
        app.add_routes([web.get("/health", self._health), web.get("/v1/models", self._models),
                        web.post("/v1/completions", self._completions),
                        web.post("/v1/chat/completions", self._chat),
                        web.post("/tokenize", self._tokenize), web.post("/detokenize", self._detokenize)])
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> int:
        """Listen; the bound port."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("OpenAI-compatible HTTP on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    @web.middleware
    async def _authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        """/v1/ routes, /tokenize and /detokenize need an API key when the router has keys; /health stays open."""
        if request.path.startswith("/v1/") or request.path in _KEYED_ROOT_PATHS:
            try:
                self.keys.check(request.headers.get("Authorization"))
            except AuthenticationError as exc:
                return _error_response(exc)
        return await handler(request)

    # -- routes --------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        ok = bool(self.router.registry.healthy(Role.DECODE))
        return web.json_response({"status": "ok" if ok else "no healthy decode worker"}, status=200 if ok else 503)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "pdserve"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, http: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await _json_body(http)
            self._check_model(body)
            pb, spec = openai_request.parse(body, chat, http["request_id"], self.tool_call_parser)
        except PdserveError as exc:
            return _error_response(exc)
        pb.version = http.headers.get("X-Pdserve-Version", "")  # A/B: pin a rollout version
        rid = pb.request_id
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": int(time.time()), "model": self.model_name,
                "object": "chat.completion.chunk" if chat else "text_completion"}
        readers = self.router.readers
        with tracing.attach(_trace_parent(http)):
            try:
                choices = Choices(spec, await self._echo_text(spec, rid))
            except PdserveError as exc:
                return _error_response(exc)
            watch = readers.watch("HTTP request")
            try:
                responses = self.router.generate(pb, self.timeout_s, watch).__aiter__()
                try:
                    first = await responses.__anext__()  # errors before any output keep their HTTP status
                except PdserveError as exc:
                    return _error_response(_in_body_terms(exc, spec))
                except StopAsyncIteration:
                    return _error_response(UnavailableError("the request ended without an answer", request_id=rid))
                stream = _chain(first, responses)
                if spec.stream:
                    return await _sse(http, stream, meta, choices, watch)
                return await _whole(stream, meta, choices)
            finally:
                readers.release(watch)

    async def _echo_text(self, spec: OpenAIRequest, request_id: str) -> str | None:
        """The prompt's text for echo: as given, or a worker's detokenization of the given ids."""
        if not spec.echo or spec.prompt_token_ids is None:
            return spec.prompt_text if spec.echo else None
        request = tokenize_pb2.DetokenizeRequest(request_id=request_id, token_ids=spec.prompt_token_ids)
        try:
            return (await self.router.tokenization.detokenize(request, self.timeout_s)).text
        except InvalidRequestError as exc:
            raise _renamed(exc, "token_ids", "prompt") from None

    async def _tokenize(self, http: web.Request) -> web.Response:
        try:
            body = await _json_body(http)
            self._check_model(body)
            pb = _tokenize_pb(body, http["request_id"])
            with tracing.attach(_trace_parent(http)):
                response = await self.router.tokenization.tokenize(pb, self.timeout_s)
        except PdserveError as exc:
            return _error_response(exc)
        token_strs = list(response.token_strs) if pb.return_token_strs else None
        return web.json_response({"count": len(response.token_ids), "max_model_len": response.max_model_len,
                                  "tokens": list(response.token_ids), "token_strs": token_strs})

    async def _detokenize(self, http: web.Request) -> web.Response:
        try:
            body = await _json_body(http)
            self._check_model(body)
            pb = _detokenize_pb(body, http["request_id"])
            with tracing.attach(_trace_parent(http)):
                response = await self.router.tokenization.detokenize(pb, self.timeout_s)
        except InvalidRequestError as exc:
            return _error_response(_renamed(exc, "token_ids", "tokens"))  # the worker names the proto's field
        except PdserveError as exc:
            return _error_response(exc)
        return web.json_response({"prompt": response.text})

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model not in (None, "", self.model_name):
            raise NotFoundError(f"model: {model!r} is not served here (GET /v1/models lists {self.model_name!r})")


@web.middleware
async def _request_id(request: web.Request, handler) -> web.StreamResponse:
    """The request's id, from the caller's header or new; `_echo_request_id` sends it back."""
    given = request.headers.get(REQUEST_ID_HEADER)
    request["request_id"] = given if given is not None else uuid.uuid4().hex
    if given is not None and not _REQUEST_ID.fullmatch(given):
        request["request_id"] = uuid.uuid4().hex  # the refusal still carries an id
        return _error_response(InvalidRequestError(REQUEST_ID_HEADER, "must be 1 to 128 printable ASCII "
                                                                      "characters without spaces"))
    return await handler(request)


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "request_id" in request:
        response.headers[REQUEST_ID_HEADER] = request["request_id"]


# -- responses ---------------------------------------------------------------------------------


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


async def _whole(stream: AsyncIterator, meta: dict, choices: Choices) -> web.Response:
    try:
        async for pb in stream:
            if pb.WhichOneof("kind") == "delta":
                choices.add_delta(delta_from_pb(pb.delta))
            else:
                choices.add_result(result_from_pb(pb.result))
    except PdserveError as exc:
        return _error_response(_in_body_terms(exc, choices.request))
    if not choices.complete:
        return _error_response(UnavailableError("the decode worker's stream ended without a result for each choice"))
    chat = choices.request.chat
    body = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices.whole(),
            "usage": choices.usage()}
    return web.json_response(body)


async def _sse(http: web.Request, stream: AsyncIterator, meta: dict, choices: Choices, watch: Watch):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(http)
    chat = choices.request.chat

    async def send(payload: dict) -> None:
        watch.sending()  # blocks while the client does not read (see pdserve.server.streams)
        await resp.write(b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n")
        watch.sent()

    async def send_pieces(pieces: list[Piece]) -> None:
        for piece in pieces:
            if piece.worth_sending():
                await send({**meta, "choices": [_chunk_choice(chat, piece)]})

    if chat:
        for index in range(choices.request.n):
            await send({**meta, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]})
    try:
        async for pb in stream:
            if pb.WhichOneof("kind") == "delta":
                await send_pieces(choices.add_delta(delta_from_pb(pb.delta)))
            else:
                await send_pieces(choices.add_result(result_from_pb(pb.result)))
        if choices.request.include_usage and choices.complete:
            await send({**meta, "choices": [], "usage": choices.usage()})
    except PdserveError as exc:
        await send(_error_body(exc))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _chunk_choice(chat: bool, piece: Piece) -> dict:
    if chat:
        delta: dict = {"content": piece.text} if piece.text else {}
        if piece.tool_calls:
            delta["tool_calls"] = piece.tool_calls
        return {"index": piece.index, "delta": delta, "logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
    return {"index": piece.index, "text": piece.text, "logprobs": piece.logprobs,
            "finish_reason": piece.finish_reason}


# -- errors --------------------------------------------------------------------------------------


def _classify(exc: PdserveError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of a pdserve error."""
    return next(((status, kind) for cls, status, kind in _STATUS if isinstance(exc, cls)), (500, "server_error"))


def _error_body(exc: PdserveError) -> dict:
    return {"error": {"message": str(exc), "type": _classify(exc)[1], "param": getattr(exc, "field", None),
                      "code": None}}


def _error_response(exc: PdserveError) -> web.Response:
    status = _classify(exc)[0]
    retry_after = getattr(exc, "retry_after_s", None) or 1.0  # when coming back makes sense
    headers = {"Retry-After": str(math.ceil(retry_after))} if status == 429 else None
    return web.json_response(_error_body(exc), status=status, headers=headers)


async def _json_body(http: web.Request) -> dict:
    try:
        body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError("body", f"is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    return body


def _trace_parent(http: web.Request):
    """The caller's trace (W3C `traceparent` header), continued in the workers; None without one."""
    return tracing.extract_context([(k.lower(), v) for k, v in http.headers.items()])


def _tokenize_pb(body: dict, request_id: str) -> tokenize_pb2.TokenizeRequest:
    """vLLM's /tokenize body as a TokenizeRequest; the worker checks the rest (roles, lengths, flags that
    apply to messages only)."""
    for name in _TOKENIZE_UNSUPPORTED:
        if body.get(name) not in (None, False, {}, [], ""):
            raise InvalidRequestError(name, "is not supported by pdserve's /tokenize")
    pb = tokenize_pb2.TokenizeRequest(request_id=request_id, return_token_strs=bool(flag(body, "return_token_strs")))
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("prompt", "give exactly one of prompt (a string) and messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", "must be a string")
        pb.prompt = prompt
    else:
        if not isinstance(messages, list):
            raise InvalidRequestError("messages", "must be a list of {role, content}")
        pb.messages.SetInParent()
        for i, m in enumerate(messages):
            pb.messages.messages.add(**message(m, i))
    tools = body.get("tools")
    if tools not in (None, []):
        if prompt is not None:
            raise InvalidRequestError("tools", "need messages (the chat template renders them)")
        check_tools(tools)
        pb.messages.tools_json = json.dumps(tools, ensure_ascii=False)
    for name in ("add_special_tokens", "add_generation_prompt"):
        value = flag(body, name)
        if value is not None:
            setattr(pb, name, value)  # set, even to false: absent means generation's rule
    return pb


def _detokenize_pb(body: dict, request_id: str) -> tokenize_pb2.DetokenizeRequest:
    tokens = body.get("tokens")
    if not isinstance(tokens, list):
        raise InvalidRequestError("tokens", "must be a list of token ids")
    for i, token in enumerate(tokens):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < 2**32:
            raise InvalidRequestError(f"tokens[{i}]", f"{token!r} is not a token id (an integer from 0)")
    return tokenize_pb2.DetokenizeRequest(request_id=request_id, token_ids=tokens)


def _in_body_terms(exc: PdserveError, spec: OpenAIRequest) -> PdserveError:
    """A worker's error naming a proto field, renamed to the body's field it came from."""
    if not isinstance(exc, InvalidRequestError):
        return exc
    proto_field = exc.field.partition("[")[0]
    body_field = spec.body_field(proto_field)
    return exc if body_field is None else _renamed(exc, proto_field, body_field)


def _renamed(exc: InvalidRequestError, proto_field: str, json_field: str) -> InvalidRequestError:
    """`exc` naming the JSON body's field where it names the proto's (token_ids[3] -> tokens[3])."""
    if not exc.field.startswith(proto_field):
        return exc
    message = str(exc).partition(f"{exc.field}: ")[2]
    return InvalidRequestError(json_field + exc.field[len(proto_field):], message, request_id=exc.request_id)
