"""Protobuf <-> engine types: the one place the daemons convert between them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pdserve.engine.model_loader import Fingerprint
from pdserve.engine.models.spec import ModelSpec
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput
from pdserve.errors import InvalidRequestError
from pdserve.preprocess import ChatMessage, Preprocessor
from pdserve.v1 import common_pb2, tokenize_pb2

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
# Sampling fields that are proto3 `optional` and map 1:1 onto SamplingParams.
_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "logprobs", "n", "prompt_logprobs",
)
# A vocabulary's bytes of each token id, for logprobs (Preprocessor.token_bytes).
TokenBytes = Callable[[Sequence[int]], list[bytes]]


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Absent fields take SamplingParams' defaults (the proto documents the same ones)."""
    kwargs: dict = {name: getattr(pb, name) for name in _OPTIONAL_SAMPLING_FIELDS if pb.HasField(name)}
    kwargs["stop"] = tuple(pb.stop)
    kwargs["stop_token_ids"] = tuple(pb.stop_token_ids)
    kwargs["logit_bias"] = tuple(pb.logit_bias.items())
    if pb.HasField("structured_output"):
        kwargs["structured_output"] = structured_output_from_pb(pb.structured_output)
    return SamplingParams(**kwargs)


def structured_output_from_pb(pb: common_pb2.StructuredOutput) -> StructuredOutput:
    kind = pb.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError("structured_output", "set one of json_schema, json_object, regex, grammar, choice")
    if kind == "choice":
        return StructuredOutput(choice=tuple(pb.choice.choices))
    if kind == "json_object" and not pb.json_object:
        raise InvalidRequestError("structured_output.json_object", "must be true when set")
    return StructuredOutput(**{kind: getattr(pb, kind)})


def prompt_ids_from_pb(request: common_pb2.GenerateRequest, pre: Preprocessor) -> list[int]:
    kind = request.WhichOneof("input")
    rid = request.request_id or None
    if kind == "prompt":
        return pre(prompt=request.prompt, request_id=rid)
    if kind == "messages":
        return pre(messages=_chat_from_pb(request.messages), **_tools_from_pb(request.messages), request_id=rid)
    if kind == "prompt_token_ids":
        return pre(prompt_token_ids=list(request.prompt_token_ids.token_ids), request_id=rid)
    raise InvalidRequestError("prompt", "give one of prompt, messages, prompt_token_ids", request_id=rid)


def tokenize_to_pb(request: tokenize_pb2.TokenizeRequest, pre: Preprocessor, *, max_model_len: int,
                   worker_id: str) -> tokenize_pb2.TokenizeResponse:
    """A Tokenize call's answer: the input through `pre` the way a generate request's goes, unless an
    option of the request says otherwise."""
    rid = request.request_id or None
    kind = request.WhichOneof("input")
    special = request.add_special_tokens if request.HasField("add_special_tokens") else None
    if kind == "prompt":
        if request.HasField("add_generation_prompt"):
            raise InvalidRequestError("add_generation_prompt", "applies to messages only", request_id=rid)
        ids = pre.token_ids(prompt=request.prompt, add_special_tokens=special, request_id=rid)
    elif kind == "messages":
        generation_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        ids = pre.token_ids(messages=_chat_from_pb(request.messages), **_tools_from_pb(request.messages),
                            add_special_tokens=special,
                            add_generation_prompt=generation_prompt, request_id=rid)
    else:
        raise InvalidRequestError("prompt", "give one of prompt, messages", request_id=rid)
    return tokenize_pb2.TokenizeResponse(
        token_ids=ids, token_strs=pre.token_strs(ids) if request.return_token_strs else (),
        max_model_len=max_model_len, preprocessing_version=pre.version, worker_id=worker_id)


def _chat_from_pb(messages: common_pb2.Messages) -> list[ChatMessage]:
    return [ChatMessage(m.role, m.content) for m in messages.messages]


def _tools_from_pb(messages: common_pb2.Messages) -> dict:
    """The Preprocessor's tools arguments of a conversation."""
    return {"tools_json": messages.tools_json or None, "tools_optional": messages.tools_optional}


def fingerprint_to_pb(fp: Fingerprint) -> common_pb2.ModelFingerprint:
    return common_pb2.ModelFingerprint(architecture=fp.architecture, dtype=fp.dtype, weights_digest=fp.weights_digest)


def layout_to_pb(spec: ModelSpec, dtype: torch.dtype) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                               head_dim=spec.head_dim, dtype=str(dtype).removeprefix("torch."))


def layout_str(pb: common_pb2.KVLayout) -> str:
    return f"{pb.num_layers}x{pb.num_kv_heads}x{pb.head_dim}/{pb.dtype}"


def logprobs_to_pb(lp: TokenLogprobs | None, token_bytes: TokenBytes | None = None) -> common_pb2.TokenLogprobs:
    """token_bytes: fill each token's bytes (what a client shows); None leaves them empty (KV wire)."""
    if lp is None:
        return common_pb2.TokenLogprobs()
    ids = [lp.token_id, *(t for t, _ in lp.top)]
    spelled = token_bytes(ids) if token_bytes is not None else [b""] * len(ids)
    return common_pb2.TokenLogprobs(
        chosen=common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token_bytes=spelled[0]),
        top=[common_pb2.TokenLogprob(token_id=t, logprob=p, token_bytes=b)
             for (t, p), b in zip(lp.top, spelled[1:])],
    )


def delta_to_pb(out: RequestOutput, completion_index: int, token_bytes: TokenBytes | None = None
                ) -> common_pb2.GenerateResponse:
    delta = common_pb2.TokenDelta(token_ids=out.token_ids, text=out.text, completion_index=completion_index,
                                  index=out.index)
    if out.logprobs is not None:
        delta.logprobs.extend(logprobs_to_pb(lp, token_bytes) for lp in out.logprobs)
    if out.prompt_logprobs is not None:
        delta.prompt_logprobs.extend(logprobs_to_pb(lp, token_bytes) for lp in out.prompt_logprobs)
    return common_pb2.GenerateResponse(delta=delta)


def result_to_pb(out: RequestOutput, timings: common_pb2.Timings, **fields) -> common_pb2.GenerateResponse:
    """The final message; fields: request_id, prefill/decode worker ids, prefill_mode, attempts."""
    usage = common_pb2.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                             cached_prompt_tokens=out.num_cached_tokens)
    result = common_pb2.GenerateResult(
        finish_reason=FINISH_REASONS.get(out.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        usage=usage, timings=timings, index=out.index, **fields)
    return common_pb2.GenerateResponse(result=result)
