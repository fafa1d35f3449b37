"""The KV stream's messages as bytes: KV chunks encoded and decoded by hand, the rest through protobuf.

protobuf would copy K and V twice more on each side (into the message and out of it), which
measured 2-5x the cost of the bare gRPC stream of the same bytes. So the sender's chunks become
serialized `PrefillResponse{chunk}` messages with K and V copied once, and the receiver reads a
chunk as views of the received message (`KVChunkView`); anything unusual goes to protobuf's parser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from pdserve.engine.sampling import TokenLogprobs
from pdserve.kv_transfer.protocol import KVGeometry, payload_checksum
from pdserve.kv_transfer.receiver import KVHeaderData
from pdserve.kv_transfer.sender import KVChunkData
from pdserve.v1 import common_pb2, prefill_pb2

_CHUNK_FIELDS = prefill_pb2.KVChunk.DESCRIPTOR.fields_by_name
_RESPONSE_CHUNK = prefill_pb2.PrefillResponse.DESCRIPTOR.fields_by_name["chunk"].number
_VARINT, _I64, _LEN = 0, 1, 2  # protobuf wire types


def read_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The protobuf varint at data[pos:], and the position after it; DecodeError when truncated."""
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(name: str, wire_type: int, number: int | None = None) -> bytes:
    return _varint((number if number is not None else _CHUNK_FIELDS[name].number) << 3 | wire_type)


# Keys of the chunk's fields, made once (this runs per chunk).
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


def _payload(c: KVChunkData) -> tuple[list, list, int]:
    """A chunk's K buffers and V buffers (every layer's, in order, uncopied), and their checksum."""
    k_parts = [b for k, _ in c.layers() for b in _buffers(k)]
    v_parts = [b for _, v in c.layers() for b in _buffers(v)]
    return k_parts, v_parts, payload_checksum(k_parts + v_parts)


def kv_chunk_response(c: KVChunkData) -> bytes:
    """The serialized PrefillResponse{chunk}: byte for byte what protobuf would make (num_layers set
    when above 1, the payload's checksum), K and V copied once."""
    rid = c.request_id.encode()
    fields = [_RID_KEY + _varint(len(rid)) + rid] if rid else []
    for key, value in zip(_INT_KEYS, (c.sequence_number, c.layer, c.token_start, c.token_end)):
        if value:  # proto3 leaves zeros out
            fields.append(key + _varint(value))
    k_parts, v_parts, checksum = _payload(c)
    num_k, num_v = sum(b.nbytes for b in k_parts), sum(b.nbytes for b in v_parts)
    k_key = _K_KEY + _varint(num_k)
    v_key = _V_KEY + _varint(num_v)
    tail = _NUM_LAYERS_KEY + _varint(c.num_layers) if c.num_layers > 1 else b""
    if checksum:
        tail += _CHECKSUM_KEY + checksum.to_bytes(8, "little")
    body = sum(map(len, fields)) + len(k_key) + num_k + len(v_key) + num_v + len(tail)
    return b"".join([_CHUNK_KEY, _varint(body), *fields, k_key, *k_parts, v_key, *v_parts, tail])


@dataclass(slots=True)
class KVChunkView:
    """A received KVChunk (a `KVChunkFields`) whose k_bytes and v_bytes are views, not copies."""

    request_id: str
    sequence_number: int
    layer_index: int
    token_start: int
    token_end: int
    k_bytes: memoryview
    v_bytes: memoryview
    num_layers: int = 0  # 0 (absent): 1
    checksum: int = 0


def chunk_view(c: KVChunkData) -> KVChunkView:
    """A sent chunk as the receiver reads it, with no message in between (the in-process transport)."""
    k_parts, v_parts, checksum = _payload(c)
    k, v = (memoryview(b"".join(memoryview(b).cast("B") for b in parts)) for parts in (k_parts, v_parts))
    return KVChunkView(c.request_id, c.sequence_number, c.layer, c.token_start, c.token_end, k, v,
                       c.num_layers if c.num_layers > 1 else 0, checksum)


_VIEW_FIELDS = {f.number: (f.name, _LEN if f.type in (f.TYPE_STRING, f.TYPE_BYTES)
                             else _I64 if f.type == f.TYPE_FIXED64 else _VARINT)
                for f in _CHUNK_FIELDS.values()}


def _read_chunk_view(data: bytes) -> KVChunkView | None:
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
        view = _read_chunk_view(data)
    except (DecodeError, UnicodeDecodeError):
        view = None
    return view if view is not None else prefill_pb2.PrefillResponse.FromString(data)


def fingerprint_str(pb: common_pb2.ModelFingerprint) -> str:
    return f"{pb.architecture}/{pb.dtype}/{pb.weights_digest}"


def kv_header_from_pb(h: prefill_pb2.KVHeader) -> KVHeaderData:
    lay = h.kv_layout
    return KVHeaderData(h.wire_version, h.request_id, tuple(h.prompt_token_ids), fingerprint_str(h.model),
                        KVGeometry(lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype), h.num_kv_bytes)


def logprobs_from_pb(pb: common_pb2.TokenLogprobs) -> TokenLogprobs | None:
    """An empty message (a position nothing predicts, or logprobs not asked for) is None."""
    if not pb.HasField("chosen"):
        return None
    return TokenLogprobs(pb.chosen.token_id, pb.chosen.logprob, [(t.token_id, t.logprob) for t in pb.top])
