from pdserve.v1 import common_pb2 as _common_pb2
from pdserve.v1 import tokenize_pb2 as _tokenize_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVWireVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_WIRE_VERSION_UNSPECIFIED: _ClassVar[KVWireVersion]
    KV_WIRE_VERSION_1: _ClassVar[KVWireVersion]
    KV_WIRE_VERSION_2: _ClassVar[KVWireVersion]
    KV_WIRE_VERSION_3: _ClassVar[KVWireVersion]
    KV_WIRE_VERSION_4: _ClassVar[KVWireVersion]
    KV_WIRE_VERSION_5: _ClassVar[KVWireVersion]
KV_WIRE_VERSION_UNSPECIFIED: KVWireVersion
KV_WIRE_VERSION_1: KVWireVersion
KV_WIRE_VERSION_2: KVWireVersion
KV_WIRE_VERSION_3: KVWireVersion
KV_WIRE_VERSION_4: KVWireVersion
KV_WIRE_VERSION_5: KVWireVersion

class PrefillMessage(_message.Message):
    __slots__ = ("request", "skip")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    request: PrefillRequest
    skip: KVSkip
    def __init__(self, request: _Optional[_Union[PrefillRequest, _Mapping]] = ..., skip: _Optional[_Union[KVSkip, _Mapping]] = ...) -> None: ...

class KVSkip(_message.Message):
    __slots__ = ("num_cached_tokens",)
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_cached_tokens: int
    def __init__(self, num_cached_tokens: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "block_size", "max_chunk_bytes", "decode_worker_id")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.GenerateRequest
    block_size: int
    max_chunk_bytes: int
    decode_worker_id: str
    def __init__(self, request: _Optional[_Union[_common_pb2.GenerateRequest, _Mapping]] = ..., block_size: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., decode_worker_id: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("header", "chunk", "first_token")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    chunk: KVChunk
    first_token: FirstToken
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ...) -> None: ...

class KVHeader(_message.Message):
    __slots__ = ("wire_version", "request_id", "prompt_token_ids", "num_prompt_tokens", "model", "kv_layout", "num_kv_bytes", "chunk_tokens", "num_chunks", "prefill_worker_id")
    WIRE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    wire_version: KVWireVersion
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    model: _common_pb2.ModelFingerprint
    kv_layout: _common_pb2.KVLayout
    num_kv_bytes: int
    chunk_tokens: int
    num_chunks: int
    prefill_worker_id: str
    def __init__(self, wire_version: _Optional[_Union[KVWireVersion, str]] = ..., request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., model: _Optional[_Union[_common_pb2.ModelFingerprint, _Mapping]] = ..., kv_layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., num_kv_bytes: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ..., prefill_worker_id: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("request_id", "sequence_number", "layer_index", "token_start", "token_end", "k_bytes", "v_bytes", "num_layers", "checksum")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_END_FIELD_NUMBER: _ClassVar[int]
    K_BYTES_FIELD_NUMBER: _ClassVar[int]
    V_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequence_number: int
    layer_index: int
    token_start: int
    token_end: int
    k_bytes: bytes
    v_bytes: bytes
    num_layers: int
    checksum: int
    def __init__(self, request_id: _Optional[str] = ..., sequence_number: _Optional[int] = ..., layer_index: _Optional[int] = ..., token_start: _Optional[int] = ..., token_end: _Optional[int] = ..., k_bytes: _Optional[bytes] = ..., v_bytes: _Optional[bytes] = ..., num_layers: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class PrefillTimings(_message.Message):
    __slots__ = ("queue_ms", "prefill_ms", "kv_send_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    KV_SEND_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    prefill_ms: float
    kv_send_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., kv_send_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("request_id", "token_id", "logprobs", "timings", "num_cached_tokens", "more_samples", "prompt_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MORE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_id: int
    logprobs: _common_pb2.TokenLogprobs
    timings: PrefillTimings
    num_cached_tokens: int
    more_samples: _containers.RepeatedCompositeFieldContainer[SampledToken]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    def __init__(self, request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., timings: _Optional[_Union[PrefillTimings, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., more_samples: _Optional[_Iterable[_Union[SampledToken, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ...) -> None: ...

class SampledToken(_message.Message):
    __slots__ = ("token_id", "logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprobs: _common_pb2.TokenLogprobs
    def __init__(self, token_id: _Optional[int] = ..., logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ...) -> None: ...
