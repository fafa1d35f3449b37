"""Transfer semantics on the in-process transport: the decode side's pull loop against every way a
KV stream can go wrong, without processes (each test runs in milliseconds)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from pdserve.errors import CapacityError, IncompatibleError, KVTransferError
from pdserve.kv_transfer import transport
from pdserve.kv_transfer.in_process import InProcessKVSource
from pdserve.kv_transfer.protocol import WIRE_VERSION, KVGeometry
from pdserve.kv_transfer.receiver import KVHeaderData, KVReceiver
from pdserve.kv_transfer.sender import KVChunkData, KVSender
from pdserve.kv_transfer.transport import KVFirstToken

GEOMETRY = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32")
PROMPT = list(range(100, 120))
SMALL = 2 * 6 * GEOMETRY.bytes_per_token  # 6-token chunks, one layer each


def prompt_kv(num_tokens: int = len(PROMPT)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(num_tokens)
    shape = (GEOMETRY.num_kv_heads, num_tokens, GEOMETRY.head_dim)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(GEOMETRY.num_layers)]


def sent_chunks(kv, skip: int = 0, max_chunk_bytes: int = SMALL, rid: str = "r") -> list[KVChunkData]:
    """What a prefill worker's sender makes of the KV, computed in two steps as the engine exports it."""
    chunks: list[KVChunkData] = []
    sender = KVSender(rid, GEOMETRY, chunks.append, max_chunk_bytes, num_skipped_tokens=skip)
    cut = len(PROMPT) // 2
    for lo, hi in ((0, cut), (cut, len(PROMPT))):
        for layer, (k, v) in enumerate(kv):
            sender.on_kv(layer, lo, k[:, lo:hi], v[:, lo:hi])
    return chunks


def header(**changes) -> KVHeaderData:
    h = KVHeaderData(WIRE_VERSION, "r", tuple(PROMPT), "model-a", GEOMETRY, GEOMETRY.total_bytes(len(PROMPT)))
    return dataclasses.replace(h, **changes)


def holding(num_cached: int):
    """A decode side's reservation that finds `num_cached` leading tokens in its prefix cache."""
    async def reserve(prompt: list[int]) -> int:
        assert prompt == PROMPT  # the header's ids: the sender tokenized
        return num_cached
    return reserve


class Cache:
    """The decode side's KV cache, as far as a transfer sees it: what was written, per layer."""

    def __init__(self) -> None:
        self.written: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def write(self, parts) -> asyncio.Future:
        for layer, start, k, v in parts:
            self.written.setdefault(layer, []).append((start, k.clone(), v.clone()))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = sorted(self.written[i], key=lambda p: p[0])
        return torch.cat([k for _, k, _ in parts], 1), torch.cat([v for _, _, v in parts], 1)


def run(messages, skip: int = 0, stall_s: float = 1.0, close: bool = False, fingerprint: str = "model-a",
        reserve=None):
    """Feed messages to an in-process source and pull them: (result or raised error, source, cache)."""
    async def main():
        source = InProcessKVSource("r")
        for m in messages:
            source.post(m)
        if close:
            source.close()
        cache = Cache()
        receiver = KVReceiver("r", None, fingerprint, GEOMETRY, torch.float32)
        try:
            outcome = await transport.pull(source, receiver, reserve or holding(skip), cache.write, stall_s)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome = exc
        return outcome, source, cache

    return asyncio.run(main())


def test_a_whole_transfer_lands_in_the_cache_exactly():
    kv = prompt_kv()
    chunks = sent_chunks(kv)
    pulled, source, cache = run([header(), *chunks, KVFirstToken(7, prefill_ms=3.0)])
    assert isinstance(pulled, transport.PulledKV)
    assert pulled.first_token.token_id == 7 and pulled.num_chunks == len(chunks) == 12
    assert pulled.num_bytes == GEOMETRY.total_bytes(len(PROMPT)) and pulled.prompt_token_ids == PROMPT
    assert source.skipped == 0
    for i, (k, v) in enumerate(kv):
        assert torch.equal(cache.layer(i)[0], k) and torch.equal(cache.layer(i)[1], v)
    assert source.aborted  # released once over, whatever the outcome


@pytest.mark.parametrize("skip", [1, 6, 10, 19])
def test_skipped_prefix_tokens_are_neither_sent_nor_written(skip):
    kv = prompt_kv()
    pulled, source, cache = run([header(), *sent_chunks(kv, skip), KVFirstToken(7)], skip=skip)
    assert isinstance(pulled, transport.PulledKV), pulled
    assert source.skipped == pulled.num_cached_tokens == skip
    assert pulled.num_bytes == GEOMETRY.total_bytes(len(PROMPT) - skip)
    for i, (k, v) in enumerate(kv):
        assert min(start for start, _, _ in cache.written[i]) == skip
        assert torch.equal(cache.layer(i)[0], k[:, skip:]) and torch.equal(cache.layer(i)[1], v[:, skip:])


def test_chunks_that_do_not_leave_out_the_skipped_tokens_are_refused():
    out, _, cache = run([header(), *sent_chunks(prompt_kv(), 4), KVFirstToken(7)], skip=6)
    assert isinstance(out, KVTransferError) and "does not continue at 6" in str(out)
    assert not cache.written


def test_a_declined_transfer_ends_before_the_skip_with_the_prompt():
    async def decline(prompt: list[int]) -> int:
        raise transport.Declined(prompt)

    out, source, cache = run([header(), *sent_chunks(prompt_kv()), KVFirstToken(7)], reserve=decline)
    assert isinstance(out, transport.Declined) and out.prompt_token_ids == PROMPT
    assert source.skipped is None and source.aborted and not cache.written


def test_a_refused_reservation_ends_the_transfer_before_any_kv():
    async def full(prompt: list[int]) -> int:
        raise CapacityError("no room")

    out, source, cache = run([header(), *sent_chunks(prompt_kv()), KVFirstToken(7)], reserve=full)
    assert isinstance(out, CapacityError) and source.skipped is None and source.aborted and not cache.written


def test_chunks_out_of_order_are_refused_before_the_second_is_written():
    chunks = sent_chunks(prompt_kv())
    chunks[1], chunks[2] = chunks[2], chunks[1]
    out, source, cache = run([header(), *chunks, KVFirstToken(7)])
    assert isinstance(out, KVTransferError) and "chunk 2 where 1 was due" in str(out)
    assert sum(map(len, cache.written.values())) == 1 and source.aborted


class Damaging(InProcessKVSource):
    """Flips one bit of chunk 3's K payload between sender and receiver, after its checksum was taken."""

    async def next(self):
        msg = await super().next()
        if getattr(msg, "sequence_number", None) == 3:
            k = bytearray(msg.k_bytes)
            k[5] ^= 0x10
            msg = dataclasses.replace(msg, k_bytes=memoryview(bytes(k)))
        return msg


def test_a_damaged_payload_is_refused_by_its_checksum():
    async def main():
        source = Damaging("r")
        for m in [header(), *sent_chunks(prompt_kv()), KVFirstToken(7)]:
            source.post(m)
        receiver = KVReceiver("r", None, "model-a", GEOMETRY, torch.float32)
        cache = Cache()
        with pytest.raises(KVTransferError, match="chunk 3's payload does not match its checksum"):
            await transport.pull(source, receiver, holding(0), cache.write, 1.0)
        assert sum(map(len, cache.written.values())) == 3 and source.aborted

    asyncio.run(main())


def test_another_requests_chunk_is_refused():
    chunks = sent_chunks(prompt_kv())
    chunks[2] = dataclasses.replace(chunks[2], request_id="someone-else")
    out, _, _ = run([header(), *chunks, KVFirstToken(7)])
    assert isinstance(out, KVTransferError) and "chunk of request 'someone-else'" in str(out)


def test_a_short_chunk_is_refused():
    chunks = sent_chunks(prompt_kv())
    c = chunks[4]
    chunks[4] = dataclasses.replace(c, k=c.k[:, :-1], v=c.v[:, :-1])
    out, _, _ = run([header(), *chunks, KVFirstToken(7)])
    assert isinstance(out, KVTransferError) and "chunk 4 has" in str(out)


def test_a_missing_chunk_is_found_at_the_first_token():
    chunks = sent_chunks(prompt_kv())
    out, _, _ = run([header(), *chunks[:-1], KVFirstToken(7)])
    assert isinstance(out, KVTransferError) and "KV incomplete for layers [2]" in str(out)


def test_a_stream_that_ends_early_fails_at_once():
    out, _, _ = run([header(), *sent_chunks(prompt_kv())[:5]], close=True)
    assert isinstance(out, KVTransferError) and "ended before the first token" in str(out)


def test_a_stalled_stream_fails_within_the_stall_timeout():
    started = time.monotonic()
    out, source, _ = run([header(), *sent_chunks(prompt_kv())[:5]], stall_s=0.05)
    assert isinstance(out, KVTransferError) and "stalled: no KV message within 0.05 s" in str(out)
    assert time.monotonic() - started < 2.0 and source.aborted


def test_a_sender_that_aborts_fails_the_transfer_with_its_error():
    out, _, _ = run([header(), *sent_chunks(prompt_kv())[:3], CapacityError("prefill worker out of blocks")])
    assert isinstance(out, CapacityError)


def test_a_cancelled_pull_aborts_the_source():
    async def main():
        source = InProcessKVSource("r")
        source.post(header())
        receiver = KVReceiver("r", None, "model-a", GEOMETRY, torch.float32)
        task = asyncio.create_task(transport.pull(source, receiver, holding(0), Cache().write, 10.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return source

    assert asyncio.run(main()).aborted


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"fingerprint": "model-b"}, IncompatibleError, "prefill model model-b differs"),
    ({"geometry": dataclasses.replace(GEOMETRY, num_kv_heads=4)}, IncompatibleError, "KV layout"),
    ({"wire_version": WIRE_VERSION - 1}, IncompatibleError, "KV wire version"),
    ({"request_id": "other"}, KVTransferError, "header for request 'other'"),
    ({"num_kv_bytes": 8}, KVTransferError, "announces 8 KV bytes"),
])
def test_a_header_that_does_not_fit_stops_the_transfer_before_any_kv(changes, error, match):
    out, _, cache = run([header(**changes), *sent_chunks(prompt_kv()), KVFirstToken(7)])
    assert isinstance(out, error) and match in str(out), out
    assert not cache.written


def test_a_chunk_before_the_header_and_a_second_header_are_refused():
    chunks = sent_chunks(prompt_kv())
    out, _, _ = run([chunks[0], header(), *chunks[1:]])
    assert isinstance(out, KVTransferError) and "did not start with a header" in str(out)
    out, _, _ = run([header(), chunks[0], header(), *chunks[1:]])
    assert isinstance(out, KVTransferError) and "a second header" in str(out)


def test_a_sender_on_another_thread_feeds_the_source_through_its_loop():
    """The engine thread's side: a KVSender posting from another thread, as a prefill worker's does."""
    kv = prompt_kv()

    skip = 8

    async def main():
        def prefill(num_skipped: int) -> None:  # starts once told what to skip, as a prefill worker does
            sender = KVSender("r", GEOMETRY, source.post, SMALL, num_skipped_tokens=num_skipped)
            for layer, (k, v) in enumerate(kv):
                sender.on_kv(layer, 0, k, v)
            source.post(KVFirstToken(9))

        source = InProcessKVSource("r", asyncio.get_running_loop(),
                                   on_skip=lambda n: threading.Thread(target=prefill, args=(n,)).start())
        source.post(header())
        cache = Cache()
        receiver = KVReceiver("r", None, "model-a", GEOMETRY, torch.float32)
        return await transport.pull(source, receiver, holding(skip), cache.write, 5.0), cache

    pulled, cache = asyncio.run(main())
    assert pulled.first_token.token_id == 9 and pulled.num_cached_tokens == skip
    for i, (k, _) in enumerate(kv):
        assert torch.equal(cache.layer(i)[0], k[:, skip:])
