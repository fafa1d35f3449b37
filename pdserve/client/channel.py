"""What the sync and async clients share: channel options, target services,
deadlines, the request each service expects and the `generate` that sends it,
and gRPC error translation."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

import grpc
from google.protobuf.message import Message

from pdserve.client.convert import MessageLike, decode_request_pb, request_pb
from pdserve.errors import CapacityError, PdserveError
from pdserve.status import error_from_status

try:
    from pdserve.observability.tracing import inject_metadata
except ModuleNotFoundError as exc:  # pdserve-client without its `tracing` extra (clients/python)
    if not (exc.name or "").startswith("opentelemetry"):
        raise

    def inject_metadata(metadata: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """Without opentelemetry-api the application has no trace to forward."""
        return list(metadata)

Service = Literal["router", "decode", "prefill"]
SERVICES: tuple[Service, ...] = ("router", "decode", "prefill")

# The RPCs each target answers; calling another is a programming error.
GENERATE_SERVICES: tuple[Service, ...] = ("router", "decode")
STATS_SERVICES: tuple[Service, ...] = ("decode", "prefill")
CLUSTER_SERVICES: tuple[Service, ...] = ("router",)

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # Detect a dead peer on a long, quiet stream (a request queued for minutes).
    # Without calls in flight no pings: servers punish idle pings with GOAWAY.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
]


def check_service(service: str) -> Service:
    if service not in SERVICES:
        raise ValueError(f"service must be one of {SERVICES}, got {service!r}")
    return service  # type: ignore[return-value]  # narrowed by the check above


def require(service: Service, allowed: tuple[Service, ...], method: str) -> None:
    if service not in allowed:
        raise ValueError(f"{method}() needs a client for service {' or '.join(allowed)}, "
                         f"this one targets {service!r}")


def deadline(call_timeout: float | None, default_timeout: float | None) -> float | None:
    """Seconds until the call's gRPC deadline: the call's own, else the client's."""
    return call_timeout if call_timeout is not None else default_timeout


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call sends when the router requires API keys."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate_request(
    service: Service,
    *,
    prompt: str | None,
    messages: Sequence[MessageLike] | None,
    prompt_token_ids: Sequence[int] | None,
    sampling: Mapping[str, object],
    request_id: str | None,
    version: str | None = None,
    tools: Sequence[Mapping[str, object]] | None = None,
) -> Message:
    """The request message `service`'s Generate takes (`version`: pin a rollout version, A/B)."""
    if service == "decode" and request_id is None:
        # A decode daemon expects the router to have named the request.
        request_id = uuid.uuid4().hex
    request = request_pb(prompt=prompt, messages=messages, prompt_token_ids=prompt_token_ids,
                         sampling=sampling, request_id=request_id, tools=tools)
    request.version = version or ""
    return decode_request_pb(request) if service == "decode" else request


def rpc_error(exc: grpc.RpcError) -> PdserveError:
    """The pdserve exception for a failed call (sync or asyncio).

    Every RpcError grpc raises from a call (the sync call objects, AioRpcError)
    carries code() and details(); the base class declares neither.
    """
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details()  # type: ignore[attr-defined]
    error = error_from_status(code or grpc.StatusCode.UNKNOWN, details or "")
    trailers = getattr(exc, "trailing_metadata", lambda: None)() or ()
    for key, value in trailers:
        if key == "grpc-retry-pushback-ms" and isinstance(error, CapacityError) and value.isdigit():
            error.retry_after_s = int(value) / 1e3  # the server's hint: when trying again makes sense
    return error


StreamT = TypeVar("StreamT")


class GenerateCalls(Generic[StreamT]):
    """`generate`, the same for Client and AsyncClient but for the stream type it returns."""

    service: Service
    _router: Any  # the RouterService and DecodeService stubs of the client's channel
    _decode: Any
    _timeout: float | None
    _metadata: tuple[tuple[str, str], ...]
    _stream: Callable[[Any], StreamT]  # wraps the started call

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[MessageLike] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        logprobs: int | None = None,
        n: int = 1,
        prompt_logprobs: int | None = None,
        logit_bias: Mapping[int, float] | None = None,
        structured_output: Mapping[str, object] | None = None,
        tools: Sequence[Mapping[str, object]] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> StreamT:
        """Starts a generation; iterate the returned stream (`async for` on an AsyncClient) for its
        `Delta`s. Not a coroutine, on either client: the call starts at once.

        Give exactly one of prompt, messages (ChatMessage or {"role", "content"}
        dicts) and prompt_token_ids. `timeout` (seconds) is the call's gRPC
        deadline, the client's default if None. Raises the pdserve exception
        of the call's status.

        `logprobs`: each token's logprob and this many top alternatives (Delta.logprobs);
        `prompt_logprobs`: the same for the prompt's tokens (sample 0's first Delta);
        `n`: independent samples, streamed interleaved (Delta.index), sample 0 being the
        n = 1 answer; `logit_bias`: {token id: value in [-100, 100]} added to the logits.

        `structured_output` constrains the output to exactly one of {"json_schema": a dict or
        its JSON text}, {"json_object": True}, {"regex": str}, {"grammar": Lark or GBNF text},
        {"choice": [str, ...]}; JSON comes on one line, with ", " and ": " separators. A spec that
        does not compile raises InvalidRequestError naming `structured_output.<kind>`.
        `tools` (with messages): tool definitions (OpenAI's {"type": "function", "function":
        {...}}) the chat template renders; a model whose template takes none refuses them
        (InvalidRequestError naming `tools`). The answer is the model's text: reading tool calls
        out of it is the caller's (or the HTTP API's).
        """
        require(self.service, GENERATE_SERVICES, "generate")
        sampling: Mapping[str, object] = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos, logprobs=logprobs, n=n, prompt_logprobs=prompt_logprobs,
            logit_bias=logit_bias, structured_output=structured_output)
        request = generate_request(self.service, prompt=prompt, messages=messages,
                                   prompt_token_ids=prompt_token_ids, sampling=sampling,
                                   request_id=request_id, version=version, tools=tools)
        stub = self._router if self.service == "router" else self._decode
        # The caller's trace (if any) continues in the daemons: W3C trace context in the metadata.
        call = stub.Generate(request, timeout=deadline(timeout, self._timeout),
                             metadata=inject_metadata(self._metadata))
        return self._stream(call)
