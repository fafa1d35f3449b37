"""KV export without extra copies: cache views for consecutive blocks, chunks encoded on the engine thread."""

from __future__ import annotations


import pytest
import torch

from pdserve.engine.kv_cache import KVCache
from pdserve.kv_transfer.codec import kv_chunk_response
from pdserve.kv_transfer.protocol import KVGeometry
from pdserve.kv_transfer.sender import KVChunkData, KVSender
from pdserve.v1 import prefill_pb2

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=3, head_dim=4, dtype="bfloat16")


def filled_cache() -> KVCache:
    cache = KVCache(2, 3, 4, num_blocks=12, block_size=4, dtype=torch.bfloat16, device="cpu")
    for layer in range(2):
        cache.k[layer].copy_(torch.randn_like(cache.k[layer], dtype=torch.float32))
        cache.v[layer].copy_(torch.randn_like(cache.v[layer], dtype=torch.float32))
    return cache


@pytest.mark.parametrize(("table", "start", "end", "is_view"), [
    ([3, 4, 5], 0, 12, True),
    ([3, 4, 5], 2, 11, True),
    ([7], 1, 3, True),
    ([5, 4, 3], 0, 12, False),
    ([1, 2, 9, 10], 3, 14, False),
    ([1, 2, 9, 10], 0, 8, True),  # only the range's own blocks need to be consecutive
])
def test_export_view_equals_read_and_shares_memory_only_when_blocks_are_consecutive(table, start, end, is_view):
    cache = filled_cache()
    for layer in range(2):
        k, v = cache.export_view(layer, table, start, end)
        rk, rv = cache.read(layer, table, start, end)
        assert torch.equal(k, rk) and torch.equal(v, rv)
        assert (k.untyped_storage().data_ptr() == cache.k[layer].untyped_storage().data_ptr()) == is_view
        assert all(k[h].is_contiguous() and v[h].is_contiguous() for h in range(3))  # what the encoder needs


def sent(encode) -> tuple[list, torch.Tensor]:
    """Chunks a KVSender posts for one layer of cache views, the views overwritten right after on_kv."""
    cache = filled_cache()
    posted: list = []
    sender = KVSender("r", GEOMETRY, posted.append, max_chunk_bytes=2 * 5 * GEOMETRY.bytes_per_token, encode=encode)
    k, v = cache.export_view(0, [2, 3, 4], 0, 12)
    expected = k.clone()
    sender.on_kv(0, 0, k, v)
    cache.k[0].zero_()  # the engine moves on: the views' memory is reused
    return posted, expected


def test_chunks_encoded_on_the_engine_thread_are_the_messages_of_the_original_kv():
    items, expected = sent(kv_chunk_response)
    assert all(isinstance(item, bytes) for item in items)
    chunks = [prefill_pb2.PrefillResponse.FromString(item).chunk for item in items]
    assert [(c.sequence_number, c.token_start, c.token_end) for c in chunks] == [(0, 0, 5), (1, 5, 10), (2, 10, 12)]
    k = torch.cat([torch.frombuffer(bytearray(c.k_bytes), dtype=torch.bfloat16).view(3, -1, 4) for c in chunks], 1)
    assert torch.equal(k, expected)


def test_chunks_posted_unencoded_are_copies():
    items, expected = sent(None)
    assert all(isinstance(item, KVChunkData) for item in items)
    assert torch.equal(torch.cat([c.k for c in items], dim=1), expected)
