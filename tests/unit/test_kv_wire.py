"""KV chunks on the wire: the hand-made encoding is protobuf's, and what the sender cuts the receiver rebuilds."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import xxhash

from pdserve.errors import IncompatibleError, KVTransferError
from pdserve.kv_transfer import codec
from pdserve.kv_transfer.protocol import WIRE_VERSION, KVGeometry
from pdserve.kv_transfer.receiver import KVHeaderData, KVReceiver
from pdserve.kv_transfer.sender import KVChunkData, KVSender
from pdserve.v1 import prefill_pb2

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=3, head_dim=4, dtype="bfloat16")


def protobuf_encoding(c: KVChunkData) -> bytes:
    as_bytes = lambda t: t.contiguous().view(torch.int16).numpy().tobytes()  # noqa: E731
    k_bytes = b"".join(as_bytes(k) for k, _ in c.layers())
    v_bytes = b"".join(as_bytes(v) for _, v in c.layers())
    return prefill_pb2.PrefillResponse(chunk=prefill_pb2.KVChunk(
        request_id=c.request_id, sequence_number=c.sequence_number, layer_index=c.layer,
        token_start=c.token_start, token_end=c.token_end, k_bytes=k_bytes, v_bytes=v_bytes,
        num_layers=c.num_layers if c.num_layers > 1 else 0, checksum=xxhash.xxh3_64_intdigest(k_bytes + v_bytes),
    )).SerializeToString()


@pytest.mark.parametrize("rid", ["", "r", "x" * 300])
@pytest.mark.parametrize(("seq", "layer", "start", "num_tokens"), [(0, 0, 0, 1), (1, 1, 5, 7), (300, 129, 70000, 200)])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_hand_encoding_is_byte_identical_to_protobufs(rid, seq, layer, start, num_tokens, contiguous, num_layers):
    full = torch.randn(3, num_tokens + 5, 4).to(torch.bfloat16)
    k = full[:, :num_tokens].contiguous() if contiguous else full[:, 2 : 2 + num_tokens]
    v = (full * 2)[:, 1 : 1 + num_tokens]
    assert k.is_contiguous() == contiguous and not v.is_contiguous()
    more = tuple((k + i, v - i) for i in range(1, num_layers))
    c = KVChunkData(rid, seq, layer, start, start + num_tokens, k, v, more)
    encoded = codec.kv_chunk_response(c)
    assert encoded == protobuf_encoding(c)
    parsed = prefill_pb2.PrefillResponse.FromString(encoded).chunk
    assert parsed.k_bytes[: len(parsed.k_bytes) // num_layers] == k.contiguous().view(torch.int16).numpy().tobytes()
    assert parsed.num_layers == (num_layers if num_layers > 1 else 0)


def run_sender(max_chunk_bytes: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[KVChunkData]:
    """Each layer's KV through a KVSender, as the engine thread hands it over; the queued chunks."""
    chunks: list[KVChunkData] = []
    sender = KVSender("r", GEOMETRY, chunks.append, max_chunk_bytes)
    for layer, (k, v) in enumerate(kv):
        sender.on_kv(layer, 0, k, v)
    assert sender.num_bytes == GEOMETRY.total_bytes(kv[0][0].shape[1])
    return chunks


def receiver(prompt: list[int]) -> KVReceiver:
    r = KVReceiver("r", prompt, "fp", GEOMETRY, torch.bfloat16)
    r.on_header(KVHeaderData(WIRE_VERSION, "r", tuple(prompt), "fp", GEOMETRY, GEOMETRY.total_bytes(len(prompt))))
    r.skip(0)
    return r


# 10 tokens x 2 layers x 24 bytes each of K and V: 1 byte cuts a layer into 1-token chunks, 240 bytes
# into 5-token ones, 480 bytes hold one layer, 960 or more both (one chunk for the two layers).
@pytest.mark.parametrize(("max_chunk_bytes", "num_chunks"), [(1, 20), (240, 4), (480, 2), (960, 1), (2**20, 1)])
def test_chunks_cut_grouped_encoded_and_parsed_rebuild_each_layer(max_chunk_bytes, num_chunks):
    prompt = list(range(10))
    # Non-contiguous heads, as KVCache.read hands them out.
    kv = [(torch.randn(3, 12, 4).to(torch.bfloat16)[:, 1:11], torch.randn(3, 10, 4).to(torch.bfloat16))
          for _ in range(GEOMETRY.num_layers)]
    chunks = run_sender(max_chunk_bytes, kv)
    assert [c.sequence_number for c in chunks] == list(range(len(chunks)))
    assert len(chunks) == num_chunks and all(c.num_bytes <= max(max_chunk_bytes, 48) for c in chunks)
    r = receiver(prompt)
    got: dict[int, list] = {}
    for c in chunks:
        msg = codec.prefill_response_from_bytes(codec.kv_chunk_response(c))
        assert isinstance(msg, codec.KVChunkView)
        for layer, start, k, v in r.on_chunk(msg):
            assert k.shape == (3, msg.token_end - msg.token_start, 4)
            got.setdefault(layer, []).append((start, k, v))
    r.check_complete()
    for layer, (k, v) in enumerate(kv):
        assert [s for s, _, _ in got[layer]] == sorted(s for s, _, _ in got[layer])
        assert torch.equal(torch.cat([x for _, x, _ in got[layer]], dim=1), k)
        assert torch.equal(torch.cat([x for _, _, x in got[layer]], dim=1), v)


def test_receiver_refuses_a_chunk_with_the_wrong_byte_count_or_layers():
    r = receiver(list(range(4)))
    k = torch.zeros(3, 4, 4, dtype=torch.bfloat16)
    msg = codec.prefill_response_from_bytes(codec.kv_chunk_response(KVChunkData("r", 0, 0, 0, 4, k, k)))
    with pytest.raises(KVTransferError, match="bytes"):
        r.on_chunk(dataclasses.replace(msg, token_end=3))  # 4 tokens of bytes for a 3-token range
    with pytest.raises(KVTransferError, match="bytes"):
        r.on_chunk(dataclasses.replace(msg, num_layers=2))  # one layer's bytes for two
    with pytest.raises(KVTransferError, match="layers"):  # past the last layer
        r.on_chunk(dataclasses.replace(msg, layer_index=1, num_layers=2, k_bytes=bytes(msg.k_bytes) * 2,
                                       v_bytes=bytes(msg.v_bytes) * 2))
    assert r.on_chunk(msg)  # the refusals left the receiver where it was


@pytest.mark.parametrize("field", ["k_bytes", "v_bytes"])
@pytest.mark.parametrize("position", [0, 47, 95])
def test_receiver_refuses_a_payload_that_does_not_match_its_checksum(field, position):
    r = receiver(list(range(4)))
    k = torch.randn(3, 4, 4).to(torch.bfloat16)
    msg = codec.prefill_response_from_bytes(codec.kv_chunk_response(KVChunkData("r", 0, 0, 0, 4, k, k * 2)))
    damaged = bytearray(getattr(msg, field))
    damaged[position] ^= 0x10
    with pytest.raises(KVTransferError, match="checksum"):
        r.on_chunk(dataclasses.replace(msg, **{field: memoryview(damaged)}))
    with pytest.raises(KVTransferError, match="checksum"):  # a sender that sent none
        r.on_chunk(dataclasses.replace(msg, checksum=0))
    # K and V swapped: each intact, the pair not what was sent.
    with pytest.raises(KVTransferError, match="checksum"):
        r.on_chunk(dataclasses.replace(msg, k_bytes=msg.v_bytes, v_bytes=msg.k_bytes))
    assert r.on_chunk(msg)


def test_decoder_views_chunks_and_hands_everything_else_to_protobuf():
    k = torch.randn(3, 5, 4).to(torch.bfloat16)
    c = KVChunkData("req", 7, 1, 10, 15, k, k * 2)
    encoded = codec.kv_chunk_response(c)
    view = codec.prefill_response_from_bytes(encoded)
    assert isinstance(view, codec.KVChunkView)
    expected = prefill_pb2.PrefillResponse.FromString(encoded).chunk
    assert expected.checksum != 0
    for name in ("request_id", "sequence_number", "layer_index", "token_start", "token_end", "k_bytes", "v_bytes",
                 "checksum"):
        assert bytes(getattr(view, name)) == bytes(getattr(expected, name)) if name.endswith("bytes") \
            else getattr(view, name) == getattr(expected, name)
    first = prefill_pb2.PrefillResponse(first_token=prefill_pb2.FirstToken(request_id="req", token_id=3))
    assert codec.prefill_response_from_bytes(first.SerializeToString()) == first
    zeros = codec.prefill_response_from_bytes(codec.kv_chunk_response(KVChunkData("", 0, 0, 0, 1, k[:, :1], k[:, :1])))
    assert (zeros.request_id, zeros.sequence_number, zeros.token_start, zeros.token_end) == ("", 0, 0, 1)


def test_decoder_leaves_unusual_chunks_to_protobuf():
    k = torch.zeros(3, 2, 4, dtype=torch.bfloat16)
    encoded = codec.kv_chunk_response(KVChunkData("r", 1, 0, 0, 2, k, k))
    assert encoded[1] < 0x80  # a one-byte length: the chunk's body starts at offset 2
    # An unknown field (number 15, varint) appended inside the chunk: protobuf keeps it, we do not guess.
    body = encoded[2:] + bytes([15 << 3, 1])
    with_unknown = bytes([encoded[0], len(body)]) + body
    parsed = codec.prefill_response_from_bytes(with_unknown)
    assert isinstance(parsed, prefill_pb2.PrefillResponse) and parsed.chunk.sequence_number == 1
    with pytest.raises(Exception, match="(?i)pars|decod|truncat"):
        codec.prefill_response_from_bytes(encoded[:-5])  # truncated: protobuf's error, not a silent short chunk


def test_receiver_refuses_another_wire_version():
    r = KVReceiver("r", None, "fp", GEOMETRY, torch.bfloat16)
    with pytest.raises(IncompatibleError, match="wire version 3"):  # v3 sent no checksums
        r.on_header(KVHeaderData(3, "r", (1, 2), "fp", GEOMETRY, GEOMETRY.total_bytes(2)))


@pytest.mark.parametrize("max_chunk_bytes", [1, 240, 2**20])
def test_skipped_tokens_are_left_out_and_the_receiver_expects_exactly_that(max_chunk_bytes):
    prompt, skip = list(range(10)), 4
    kv = [(torch.randn(3, 10, 4).to(torch.bfloat16), torch.randn(3, 10, 4).to(torch.bfloat16))
          for _ in range(GEOMETRY.num_layers)]
    chunks: list[KVChunkData] = []
    sender = KVSender("r", GEOMETRY, chunks.append, max_chunk_bytes, num_skipped_tokens=skip)
    for layer, (k, v) in enumerate(kv):  # as the engine exports a cached prefix: [0, 6), then [6, 10)
        sender.on_kv(layer, 0, k[:, :6], v[:, :6])
    for layer, (k, v) in enumerate(kv):
        sender.on_kv(layer, 6, k[:, 6:], v[:, 6:])
    assert sender.num_bytes == GEOMETRY.total_bytes(len(prompt) - skip)
    header = KVHeaderData(WIRE_VERSION, "r", tuple(prompt), "fp", GEOMETRY, GEOMETRY.total_bytes(len(prompt)))
    unskipped = KVReceiver("r", prompt, "fp", GEOMETRY, torch.bfloat16)  # expects every token
    unskipped.on_header(header)
    unskipped.skip(0)
    with pytest.raises(KVTransferError, match="does not continue at 0"):
        unskipped.on_chunk(codec.prefill_response_from_bytes(codec.kv_chunk_response(chunks[0])))
    r = KVReceiver("r", prompt, "fp", GEOMETRY, torch.bfloat16)
    r.on_header(header)
    with pytest.raises(KVTransferError, match="10 skipped tokens leave none of the 10-token prompt"):
        r.skip(10)
    r.skip(skip)
    got: dict[int, list] = {}
    for c in chunks:
        for layer, start, k, v in r.on_chunk(codec.prefill_response_from_bytes(codec.kv_chunk_response(c))):
            got.setdefault(layer, []).append((start, k, v))
    r.check_complete()
    for layer, (k, v) in enumerate(kv):
        assert got[layer][0][0] == skip
        assert torch.equal(torch.cat([x for _, x, _ in got[layer]], dim=1), k[:, skip:])
        assert torch.equal(torch.cat([x for _, _, x in got[layer]], dim=1), v[:, skip:])
