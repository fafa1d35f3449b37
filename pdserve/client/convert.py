"""Protobuf conversion for the client SDK, one function per direction and message.

Requests are built only by `request_pb` (and wrapped for a decode daemon by
`decode_request_pb`); responses become plain types only through the
`*_from_pb` functions. Nothing else in the SDK touches protobuf fields.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from pdserve.client.types import (
    ChatMessage,
    Completion,
    Delta,
    FinishReason,
    GenerationResult,
    KVStats,
    PrefillMode,
    Timings,
    TokenLogprob,
    Usage,
    WorkerHealth,
    WorkerInfo,
    WorkerLoad,
    WorkerRole,
    WorkerStats,
)
from pdserve.errors import InvalidRequestError
from pdserve.v1 import common_pb2, decode_pb2, router_pb2

_FINISH_REASONS: dict[int, FinishReason] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}
_PREFILL_MODES: dict[int, PrefillMode] = {
    common_pb2.PREFILL_MODE_REMOTE: "remote",
    common_pb2.PREFILL_MODE_LOCAL: "local",
}
_ROLES: dict[int, WorkerRole] = {
    common_pb2.WORKER_ROLE_PREFILL: "prefill",
    common_pb2.WORKER_ROLE_DECODE: "decode",
}
_HEALTH: dict[int, WorkerHealth] = {
    router_pb2.WORKER_HEALTH_HEALTHY: "healthy",
    router_pb2.WORKER_HEALTH_DRAINING: "draining",
    router_pb2.WORKER_HEALTH_UNHEALTHY: "unhealthy",
}

MessageLike = ChatMessage | Mapping[str, str]
# `generate(structured_output=...)`: a mapping with exactly one of these keys (StructuredOutput's oneof).
STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")


def request_pb(
    *,
    prompt: str | None,
    messages: Sequence[MessageLike] | None,
    prompt_token_ids: Sequence[int] | None,
    sampling: Mapping[str, object],
    request_id: str | None,
    tools: Sequence[Mapping[str, object]] | None = None,
) -> common_pb2.GenerateRequest:
    """The GenerateRequest for `generate(...)`'s arguments.

    `sampling` maps SamplingParams field names to values; a None value leaves
    the field absent (how seed and logprobs say "off"), anything else is set
    explicitly (`logit_bias`: a mapping of token id to bias; `structured_output`:
    a mapping with one of STRUCTURED_OUTPUT_KINDS). Values protobuf rejects (a
    negative max_tokens, a str seed) raise InvalidRequestError naming the field,
    as the server would. `tools` (with messages): JSON-serializable tool
    definitions the chat template gets.
    """
    request = common_pb2.GenerateRequest(request_id=request_id or "")
    _set_input(request, prompt, messages, prompt_token_ids)
    if tools:
        _set_tools(request, tools)
    params = request.sampling_params
    params.SetInParent()  # present even if every value were None
    for name, value in sampling.items():
        if value is None:
            continue
        try:
            if name in ("stop", "stop_token_ids"):
                getattr(params, name).extend([value] if isinstance(value, str) else value)
            elif name == "logit_bias":
                _set_logit_bias(params, value)
            elif name == "structured_output":
                _set_structured_output(params.structured_output, value, request_id)
            else:
                setattr(params, name, value)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(name, str(exc), request_id=request_id) from None
    return request


def decode_request_pb(request: common_pb2.GenerateRequest) -> decode_pb2.DecodeGenerateRequest:
    """Wraps a request for DecodeService.Generate: no prefill candidates, so it prefills locally."""
    return decode_pb2.DecodeGenerateRequest(request=request)


def delta_from_pb(pb: common_pb2.TokenDelta) -> Delta:
    return Delta(
        text=pb.text,
        token_ids=list(pb.token_ids),
        logprobs=[_logprob_from_pb(entry) for entry in pb.logprobs] or None,
        completion_index=pb.completion_index,
        index=pb.index,
        # The first prompt token's entry is empty: nothing predicts it.
        prompt_logprobs=[_logprob_from_pb(entry) if entry.HasField("chosen") else None
                         for entry in pb.prompt_logprobs] or None,
    )


def result_from_pb(pb: common_pb2.GenerateResult) -> GenerationResult:
    matched = pb.WhichOneof("matched_stop")
    return GenerationResult(
        finish_reason=_FINISH_REASONS.get(pb.finish_reason),
        usage=Usage(
            prompt_tokens=pb.usage.prompt_tokens,
            completion_tokens=pb.usage.completion_tokens,
            cached_prompt_tokens=pb.usage.cached_prompt_tokens,
        ),
        timings=Timings(
            queue_ms=pb.timings.queue_ms,
            prefill_ms=pb.timings.prefill_ms,
            kv_transfer_ms=pb.timings.kv_transfer_ms,
            decode_ms=pb.timings.decode_ms,
            total_ms=pb.timings.total_ms,
            time_to_first_token_ms=pb.timings.time_to_first_token_ms,
        ),
        request_id=pb.request_id,
        prefill_worker_id=pb.prefill_worker_id,
        decode_worker_id=pb.decode_worker_id,
        prefill_mode=_PREFILL_MODES.get(pb.prefill_mode),
        num_prefill_attempts=pb.num_prefill_attempts,
        stop_string=pb.stop_string if matched == "stop_string" else None,
        stop_token_id=pb.stop_token_id if matched == "stop_token_id" else None,
        index=pb.index,
    )


def completion_from(deltas: Sequence[Delta], results: GenerationResult | Sequence[GenerationResult]) -> Completion:
    """Joins a stream's deltas with its results, one per sample in index order (plain types in,
    no protobuf): sample 0's Completion, with every sample's in `samples` when there are several."""
    if isinstance(results, GenerationResult):
        results = [results]
    samples = [_sample_from([d for d in deltas if d.index == result.index], result) for result in results]
    if len(samples) == 1:
        return samples[0]
    return dataclasses.replace(samples[0], samples=samples)


def _sample_from(deltas: Sequence[Delta], result: GenerationResult) -> Completion:
    logprobs = [entry for delta in deltas for entry in (delta.logprobs or ())]
    has_logprobs = any(delta.logprobs is not None for delta in deltas)
    prompt_logprobs = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None)
    return Completion(
        text="".join(delta.text for delta in deltas),
        token_ids=[token_id for delta in deltas for token_id in delta.token_ids],
        logprobs=logprobs if has_logprobs else None,
        finish_reason=result.finish_reason,
        usage=result.usage,
        timings=result.timings,
        request_id=result.request_id,
        prefill_worker_id=result.prefill_worker_id,
        decode_worker_id=result.decode_worker_id,
        prefill_mode=result.prefill_mode,
        num_prefill_attempts=result.num_prefill_attempts,
        stop_string=result.stop_string,
        stop_token_id=result.stop_token_id,
        prompt_logprobs=prompt_logprobs,
    )


def worker_from_pb(pb: router_pb2.WorkerStatus) -> WorkerInfo:
    model, layout = pb.model, pb.kv_layout
    return WorkerInfo(
        worker_id=pb.worker_id,
        role=_ROLES.get(pb.role),
        address=pb.address,
        health=_HEALTH.get(pb.health),
        load=_load_from_pb(pb.load),
        model_fingerprint=f"{model.architecture}/{model.dtype}/{model.weights_digest}",
        preprocessing_version=pb.preprocessing_version,
        kv_layout=(f"layers={layout.num_layers} kv_heads={layout.num_kv_heads} "
                   f"head_dim={layout.head_dim} dtype={layout.dtype}"),
        last_heartbeat_age_ms=pb.last_heartbeat_age_ms,
        version=pb.version,
    )


def stats_from_pb(pb: common_pb2.StatsResponse) -> WorkerStats:
    return WorkerStats(worker_id=pb.worker_id, role=_ROLES.get(pb.role), load=_load_from_pb(pb.load))


def _set_input(
    request: common_pb2.GenerateRequest,
    prompt: str | None,
    messages: Sequence[MessageLike] | None,
    prompt_token_ids: Sequence[int] | None,
) -> None:
    given = [name for name, value in (("prompt", prompt), ("messages", messages),
                                      ("prompt_token_ids", prompt_token_ids)) if value is not None]
    if len(given) != 1:
        raise InvalidRequestError(
            "prompt", f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})",
            request_id=request.request_id or None)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt", f"must be a str, got {type(prompt).__name__}",
                                      request_id=request.request_id or None)
        request.prompt = prompt
    elif messages is not None:
        request.messages.SetInParent()
        for i, message in enumerate(messages):
            role, content = _role_and_content(message, i, request.request_id or None)
            request.messages.messages.add(role=role, content=content)
    else:
        try:
            request.prompt_token_ids.token_ids.extend(prompt_token_ids or ())
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError("prompt_token_ids", str(exc), request_id=request.request_id or None) from None
        request.prompt_token_ids.SetInParent()


def _role_and_content(message: MessageLike, index: int, request_id: str | None) -> tuple[str, str]:
    if isinstance(message, ChatMessage):
        return message.role, message.content
    if isinstance(message, Mapping) and isinstance(message.get("role"), str) \
            and isinstance(message.get("content"), str):
        return message["role"], message["content"]
    raise InvalidRequestError(
        f"messages[{index}]", "must be a ChatMessage or a dict with str 'role' and 'content'",
        request_id=request_id)


def _set_tools(request: common_pb2.GenerateRequest, tools: Sequence[Mapping[str, object]]) -> None:
    rid = request.request_id or None
    if request.WhichOneof("input") != "messages":
        raise InvalidRequestError("tools", "need messages (the chat template renders them)", request_id=rid)
    if isinstance(tools, (str, bytes, Mapping)) or not all(isinstance(tool, Mapping) for tool in tools):
        raise InvalidRequestError("tools", "must be a list of dicts", request_id=rid)
    try:
        request.messages.tools_json = json.dumps([dict(tool) for tool in tools], ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError("tools", f"must be JSON-serializable ({exc})", request_id=rid) from None


def _set_structured_output(pb: common_pb2.StructuredOutput, value: object, request_id: str | None) -> None:
    """`value`: {"json_schema": dict or JSON text} | {"json_object": True} | {"regex": str} | {"grammar": str}
    | {"choice": [str, ...]}."""
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in STRUCTURED_OUTPUT_KINDS:
        raise InvalidRequestError("structured_output", f"must be a dict with exactly one of "
                                  f"{', '.join(STRUCTURED_OUTPUT_KINDS)}, got {value!r:.200}", request_id=request_id)
    [(kind, spec)] = value.items()
    field = f"structured_output.{kind}"
    if kind == "json_schema" and isinstance(spec, Mapping):
        try:
            spec = json.dumps(spec, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(field, f"must be JSON-serializable ({exc})", request_id=request_id) from None
    if kind == "json_object":
        if spec is not True:
            raise InvalidRequestError(field, f"must be True, got {spec!r:.200}", request_id=request_id)
        pb.json_object = True
    elif kind == "choice":
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence) or not spec \
                or not all(isinstance(c, str) and c for c in spec):
            raise InvalidRequestError(field, "must be a non-empty list of non-empty strings", request_id=request_id)
        pb.choice.choices.extend(spec)
    elif not isinstance(spec, str) or not spec:
        what = "a dict or JSON text" if kind == "json_schema" else "a non-empty string"
        raise InvalidRequestError(field, f"must be {what}, got {type(spec).__name__}", request_id=request_id)
    else:
        setattr(pb, kind, spec)


def _set_logit_bias(params: common_pb2.SamplingParams, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"must map token ids to biases, got {type(value).__name__}")
    for token_id, bias in value.items():
        if isinstance(token_id, bool) or isinstance(bias, bool):  # protobuf would take them as 0/1
            raise TypeError(f"{token_id!r}: {bias!r} is not a token id and a number")
        params.logit_bias[token_id] = bias


def _logprob_from_pb(pb: common_pb2.TokenLogprobs) -> TokenLogprob:
    return TokenLogprob(
        token_id=pb.chosen.token_id,
        logprob=pb.chosen.logprob,
        top=[TokenLogprob(token_id=alt.token_id, logprob=alt.logprob, token_bytes=alt.token_bytes)
             for alt in pb.top],
        token_bytes=pb.chosen.token_bytes,
    )


def _load_from_pb(pb: common_pb2.WorkerLoad) -> WorkerLoad:
    kv = pb.kv
    return WorkerLoad(
        num_running_requests=pb.num_running_requests,
        num_waiting_requests=pb.num_waiting_requests,
        num_pending_prefill_tokens=pb.num_pending_prefill_tokens,
        kv=KVStats(
            block_size=kv.block_size,
            num_total=kv.num_total,
            num_free=kv.num_free,
            num_used=kv.num_used,
            num_cached=kv.num_cached,
            prefix_cache_hit_rate=kv.prefix_cache_hit_rate,
        ),
        output_tokens_per_s=pb.output_tokens_per_s,
        prefill_tokens_per_s=pb.prefill_tokens_per_s,
        p99_ttft_ms=pb.p99_ttft_ms,
        p99_itl_ms=pb.p99_itl_ms,
    )
