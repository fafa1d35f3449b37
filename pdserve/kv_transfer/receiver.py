"""Decode side: check a KV transfer message by message before any byte reaches the cache.

Checks, each failing with KVTransferError (the transfer is dropped and retried)
or IncompatibleError (a model or layout mismatch: retrying the same pair is pointless):
1. header: wire version, request id, prompt tokens (equal to what the decode side
   expects, when it tokenized the prompt itself), model fingerprint and KV
   geometry equal to its own, byte count consistent;
2. skip: the leading tokens the decode side holds (`skip`, after the header) are
   fewer than the prompt's;
3. every chunk: request id, sequence number exactly the next one, layer and
   token range inside the prompt and past the skipped tokens, byte lengths equal
   to the range's, payload checksum equal to the one the sender computed;
4. completion: every layer received every prompt token past the skipped ones
   exactly once, and no more bytes than those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from pdserve.errors import IncompatibleError, KVTransferError
from pdserve.kv_transfer.protocol import WIRE_VERSION, KVGeometry, payload_checksum, tensor_from_bytes


@dataclass(frozen=True)
class KVHeaderData:
    wire_version: int
    request_id: str
    prompt_token_ids: tuple[int, ...]
    fingerprint: str
    geometry: KVGeometry
    num_kv_bytes: int  # of the whole prompt


class KVChunkFields(Protocol):
    """A received KV chunk, as the transport parsed it (the wire's KVChunk fields)."""

    request_id: str
    sequence_number: int
    layer_index: int
    token_start: int
    token_end: int
    k_bytes: bytes | memoryview
    v_bytes: bytes | memoryview
    num_layers: int  # 0: 1
    checksum: int


class KVReceiver:
    def __init__(self, request_id: str, prompt_token_ids: list[int] | None, fingerprint: str,
                 geometry: KVGeometry, torch_dtype: torch.dtype) -> None:
        self.request_id = request_id
        # None: the prefill side tokenizes; its header's token ids are taken as the prompt.
        self.expected_prompt = tuple(prompt_token_ids) if prompt_token_ids is not None else None
        self.fingerprint = fingerprint
        self.geometry = geometry
        self.torch_dtype = torch_dtype
        self.header: KVHeaderData | None = None
        self.num_cached_tokens: int | None = None  # told to the sender after the header: not to be sent
        self._next_seq = 0
        self.num_received_bytes = 0  # K + V payload of the chunks so far
        self._layer_tokens: list[int] = []  # tokens held per layer, in order

    @property
    def num_prompt_tokens(self) -> int:
        assert self.header is not None
        return len(self.header.prompt_token_ids)

    def on_header(self, header: KVHeaderData) -> list[int]:
        """Check the header; returns the prompt token ids to reserve blocks for."""
        rid = self.request_id
        if header.wire_version != WIRE_VERSION:
            raise IncompatibleError(f"KV wire version {header.wire_version}, expected {WIRE_VERSION}",
                                    request_id=rid)
        if header.fingerprint != self.fingerprint:
            raise IncompatibleError(f"prefill model {header.fingerprint} differs from decode model "
                                    f"{self.fingerprint}", request_id=rid)
        if header.geometry != self.geometry:
            raise IncompatibleError(f"KV layout {header.geometry} differs from {self.geometry}", request_id=rid)
        if header.request_id != rid:
            raise KVTransferError(f"header for request {header.request_id!r}", request_id=rid)
        if not header.prompt_token_ids:
            raise KVTransferError("header has no prompt tokens", request_id=rid)
        if self.expected_prompt is not None and header.prompt_token_ids != self.expected_prompt:
            raise KVTransferError("header's prompt tokens differ from the request's", request_id=rid)
        num_bytes = self.geometry.total_bytes(len(header.prompt_token_ids))
        if header.num_kv_bytes != num_bytes:
            raise KVTransferError(f"header announces {header.num_kv_bytes} KV bytes, layout needs {num_bytes}",
                                  request_id=rid)
        self.header = header
        return list(header.prompt_token_ids)

    def skip(self, num_cached_tokens: int) -> None:
        """The leading prompt tokens this side holds (told to the sender): the chunks start after them."""
        if self.header is None:
            raise KVTransferError("skip before the header", request_id=self.request_id)
        if not 0 <= num_cached_tokens < self.num_prompt_tokens:
            raise KVTransferError(f"{num_cached_tokens} skipped tokens leave none of the "
                                  f"{self.num_prompt_tokens}-token prompt to send", request_id=self.request_id)
        self.num_cached_tokens = num_cached_tokens
        self._layer_tokens = [num_cached_tokens] * self.geometry.num_layers

    def on_chunk(self, c: KVChunkFields) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Check a chunk; returns (layer, start, k, v) per layer it covers, k, v [Hkv, T, D] ready to write."""
        rid = self.request_id
        layer, token_start, token_end, k, v = c.layer_index, c.token_start, c.token_end, c.k_bytes, c.v_bytes
        num_layers = c.num_layers or 1
        if self.num_cached_tokens is None:
            raise KVTransferError("KV chunk before the header and the skip", request_id=rid)
        if c.request_id != rid:
            raise KVTransferError(f"chunk of request {c.request_id!r}", request_id=rid)
        if c.sequence_number != self._next_seq:
            raise KVTransferError(f"chunk {c.sequence_number} where {self._next_seq} was due", request_id=rid)
        layers = range(layer, layer + num_layers)
        if not 0 <= layer < layer + num_layers <= self.geometry.num_layers:
            raise KVTransferError(f"chunk for layers [{layer}, {layer + num_layers})", request_id=rid)
        for i in layers:
            if token_start != self._layer_tokens[i] or not token_start < token_end <= self.num_prompt_tokens:
                raise KVTransferError(f"layer {i} chunk [{token_start}, {token_end}) does not continue at "
                                      f"{self._layer_tokens[i]}", request_id=rid)
        per_layer = (token_end - token_start) * self.geometry.bytes_per_token
        if len(k) != num_layers * per_layer or len(v) != num_layers * per_layer:
            raise KVTransferError(f"chunk {c.sequence_number} has {len(k)}/{len(v)} bytes, expected "
                                  f"{num_layers * per_layer}", request_id=rid)
        if payload_checksum((k, v)) != c.checksum:
            raise KVTransferError(f"chunk {c.sequence_number}'s payload does not match its checksum",
                                  request_id=rid)
        self._next_seq += 1
        self.num_received_bytes += len(k) + len(v)
        shape = (self.geometry.num_kv_heads, token_end - token_start, self.geometry.head_dim)
        out = []
        for n, i in enumerate(layers):
            self._layer_tokens[i] = token_end
            lo, hi = n * per_layer, (n + 1) * per_layer
            out.append((i, token_start, tensor_from_bytes(k[lo:hi], self.torch_dtype, shape),
                        tensor_from_bytes(v[lo:hi], self.torch_dtype, shape)))
        return out

    def check_complete(self) -> None:
        rid = self.request_id
        if self.num_cached_tokens is None:  # set by skip(), which needs the header
            raise KVTransferError("stream ended before the header and the skip", request_id=rid)
        missing = [i for i, n in enumerate(self._layer_tokens) if n != self.num_prompt_tokens]
        if missing:
            raise KVTransferError(f"KV incomplete for layers {missing[:5]}", request_id=rid)
        expected = self.geometry.total_bytes(self.num_prompt_tokens - self.num_cached_tokens)
        if self.num_received_bytes != expected:
            raise KVTransferError(f"received {self.num_received_bytes} KV bytes, {expected} were due", request_id=rid)
