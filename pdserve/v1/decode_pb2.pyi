from pdserve.v1 import common_pb2 as _common_pb2
from pdserve.v1 import tokenize_pb2 as _tokenize_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillCandidate(_message.Message):
    __slots__ = ("worker_id", "address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class DecodeGenerateRequest(_message.Message):
    __slots__ = ("request", "prefill_candidates", "generated_token_ids")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PREFILL_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request: _common_pb2.GenerateRequest
    prefill_candidates: _containers.RepeatedCompositeFieldContainer[PrefillCandidate]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request: _Optional[_Union[_common_pb2.GenerateRequest, _Mapping]] = ..., prefill_candidates: _Optional[_Iterable[_Union[PrefillCandidate, _Mapping]]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
