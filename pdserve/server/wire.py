"""Protobuf <-> engine types: the one place the daemons convert between them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from pdserve.engine.model_loader import Fingerprint, ModelSpec
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.sampling import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.kv_transfer.protocol import KVGeometry, payload_checksum
from pdserve.kv_transfer.receiver import KVHeaderData
from pdserve.kv_transfer.sender import KVChunkData
from pdserve.preprocess import ChatMessage, Preprocessor
from pdserve.server.malformed import read_varint
from pdserve.v1 import common_pb2, prefill_pb2

FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
# Sampling fields that are proto3 `optional` and map 1:1 onto SamplingParams.
_OPTIONAL_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed", "ignore_eos", "logprobs",
)


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Absent fields take SamplingParams' defaults (the proto documents the same ones)."""
    kwargs: dict = {name: getattr(pb, name) for name in _OPTIONAL_SAMPLING_FIELDS if pb.HasField(name)}
    kwargs["stop"] = tuple(pb.stop)
    kwargs["stop_token_ids"] = tuple(pb.stop_token_ids)
    return SamplingParams(**kwargs)


def prompt_ids_from_pb(request: common_pb2.GenerateRequest, pre: Preprocessor) -> list[int]:
    kind = request.WhichOneof("input")
    rid = request.request_id or None
    if kind == "prompt":
        return pre(prompt=request.prompt, request_id=rid)
    if kind == "messages":
        msgs = [ChatMessage(m.role, m.content) for m in request.messages.messages]
        return pre(messages=msgs, request_id=rid)
    if kind == "prompt_token_ids":
        return pre(prompt_token_ids=list(request.prompt_token_ids.token_ids), request_id=rid)
    raise InvalidRequestError("prompt", "give one of prompt, messages, prompt_token_ids", request_id=rid)


def fingerprint_to_pb(fp: Fingerprint) -> common_pb2.ModelFingerprint:
    return common_pb2.ModelFingerprint(architecture=fp.architecture, dtype=fp.dtype, weights_digest=fp.weights_digest)


def fingerprint_str(pb: common_pb2.ModelFingerprint) -> str:
    return f"{pb.architecture}/{pb.dtype}/{pb.weights_digest}"


def layout_to_pb(spec: ModelSpec, dtype: torch.dtype) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                               head_dim=spec.head_dim, dtype=str(dtype).removeprefix("torch."))


def kv_header_from_pb(h: prefill_pb2.KVHeader) -> KVHeaderData:
    lay = h.kv_layout
    return KVHeaderData(h.wire_version, h.request_id, tuple(h.prompt_token_ids), fingerprint_str(h.model),
                        KVGeometry(lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype), h.num_kv_bytes,
                        h.num_skipped_tokens)


def layout_str(pb: common_pb2.KVLayout) -> str:
    return f"{pb.num_layers}x{pb.num_kv_heads}x{pb.head_dim}/{pb.dtype}"


def logprobs_to_pb(lp: TokenLogprobs | None) -> common_pb2.TokenLogprobs:
    if lp is None:
        return common_pb2.TokenLogprobs()
    return common_pb2.TokenLogprobs(
        chosen=common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob),
        top=[common_pb2.TokenLogprob(token_id=t, logprob=p) for t, p in lp.top],
    )


def delta_to_pb(out: RequestOutput, completion_index: int) -> common_pb2.GenerateResponse:
    delta = common_pb2.TokenDelta(token_ids=out.token_ids, text=out.text, completion_index=completion_index)
    if out.logprobs is not None:
        delta.logprobs.extend(logprobs_to_pb(lp) for lp in out.logprobs)
    return common_pb2.GenerateResponse(delta=delta)


def result_to_pb(out: RequestOutput, timings: common_pb2.Timings, **fields) -> common_pb2.GenerateResponse:
    """The final message; fields: request_id, prefill/decode worker ids, prefill_mode, attempts."""
    usage = common_pb2.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                             cached_prompt_tokens=out.num_cached_tokens)
    result = common_pb2.GenerateResult(
        finish_reason=FINISH_REASONS.get(out.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        usage=usage, timings=timings, **fields)
    return common_pb2.GenerateResponse(result=result)


# -- KV chunks, encoded and decoded by hand ----------------------------------------------
# protobuf would copy K and V twice more on each side (into the message and out of it),
# which measured 2-5x the cost of the bare gRPC stream of the same bytes.
_CHUNK_FIELDS = prefill_pb2.KVChunk.DESCRIPTOR.fields_by_name
_RESPONSE_CHUNK = prefill_pb2.PrefillResponse.DESCRIPTOR.fields_by_name["chunk"].number
_VARINT, _I64, _LEN = 0, 1, 2  # protobuf wire types


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(name: str, wire_type: int, number: int | None = None) -> bytes:
    return _varint((number if number is not None else _CHUNK_FIELDS[name].number) << 3 | wire_type)


# Keys of the chunk's fields, made once (this runs per chunk, on the event loop).
_CHUNK_KEY = _key("chunk", _LEN, _RESPONSE_CHUNK)
_RID_KEY, _K_KEY, _V_KEY = _key("request_id", _LEN), _key("k_bytes", _LEN), _key("v_bytes", _LEN)
_INT_KEYS = [_key(name, _VARINT) for name in ("sequence_number", "layer_index", "token_start", "token_end")]
_NUM_LAYERS_KEY = _key("num_layers", _VARINT)
_CHECKSUM_KEY = _key("checksum", _I64)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _buffers(t: torch.Tensor) -> list:
    """The bytes of a [Hkv, T, D] tensor whose heads' rows are contiguous, head by head, uncopied.

    One numpy view of the whole (strided) tensor; its heads are contiguous sub-arrays.
    """
    a = t.view(_SAME_SIZE_INT[t.element_size()]).numpy()
    return [a] if a.flags.c_contiguous else list(a)


def kv_chunk_response(c: KVChunkData) -> bytes:
    """The serialized PrefillResponse{chunk}: byte for byte what protobuf would make (num_layers set
    when above 1, the payload's checksum), K and V copied once."""
    rid = c.request_id.encode()
    fields = [_RID_KEY + _varint(len(rid)) + rid] if rid else []
    for key, value in zip(_INT_KEYS, (c.sequence_number, c.layer, c.token_start, c.token_end)):
        if value:  # proto3 leaves zeros out
            fields.append(key + _varint(value))
    layers = c.layers()
    num_k = sum(k.numel() * k.element_size() for k, _ in layers)
    num_v = sum(v.numel() * v.element_size() for _, v in layers)
    k_key = _K_KEY + _varint(num_k)
    v_key = _V_KEY + _varint(num_v)
    k_parts = [b for k, _ in layers for b in _buffers(k)]
    v_parts = [b for _, v in layers for b in _buffers(v)]
    checksum = payload_checksum(k_parts + v_parts)
    tail = _NUM_LAYERS_KEY + _varint(c.num_layers) if c.num_layers > 1 else b""
    if checksum:
        tail += _CHECKSUM_KEY + checksum.to_bytes(8, "little")
    body = sum(map(len, fields)) + len(k_key) + num_k + len(v_key) + num_v + len(tail)
    return b"".join([_CHUNK_KEY, _varint(body), *fields, k_key, *k_parts, v_key, *v_parts, tail])


@dataclass(slots=True)
class KVChunkView:
    """A KVChunk read without copying: k_bytes and v_bytes are views of the received message."""

    request_id: str
    sequence_number: int
    layer_index: int
    token_start: int
    token_end: int
    k_bytes: memoryview
    v_bytes: memoryview
    num_layers: int = 0  # 0 (absent): 1
    checksum: int = 0


_VIEW_FIELDS = {f.number: (f.name, _LEN if f.type in (f.TYPE_STRING, f.TYPE_BYTES)
                             else _I64 if f.type == f.TYPE_FIXED64 else _VARINT)
                for f in _CHUNK_FIELDS.values()}


def _chunk_view(data: bytes) -> KVChunkView | None:
    """The chunk of a serialized PrefillResponse{chunk}; None for anything else or anything unusual."""
    buf = memoryview(data)
    if not data.startswith(_CHUNK_KEY):
        return None
    size, pos = read_varint(buf, len(_CHUNK_KEY))
    if pos + size != len(buf):
        return None
    values: dict = {name: memoryview(b"") if wire_type == _LEN else 0 for name, wire_type in _VIEW_FIELDS.values()}
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field = _VIEW_FIELDS.get(key >> 3)
        if field is None or field[1] != key & 7:
            return None  # unknown field or wire type: protobuf's parser decides
        name, wire_type = field
        if wire_type == _I64:
            if pos + 8 > len(buf):
                return None
            values[name], pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
            continue
        value, pos = read_varint(buf, pos)
        if wire_type == _LEN:
            if pos + value > len(buf):
                return None
            value, pos = buf[pos : pos + value], pos + value
        values[name] = value
    values["request_id"] = str(values["request_id"], "utf-8")
    return KVChunkView(**values)


def prefill_response_from_bytes(data: bytes) -> prefill_pb2.PrefillResponse | KVChunkView:
    """Deserializer of the Prefill stream: KV chunks as views of the message, the rest through protobuf."""
    try:
        view = _chunk_view(data)
    except (DecodeError, UnicodeDecodeError):
        view = None
    return view if view is not None else prefill_pb2.PrefillResponse.FromString(data)
