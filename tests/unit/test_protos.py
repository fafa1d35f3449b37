"""The pdserve.v1 protos: committed stubs are fresh, messages round-trip, proto3
`optional` keeps presence, and the API follows the naming and comment rules."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from pdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    tokenize_pb2,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_MODULES = (common_pb2, router_pb2, prefill_pb2, decode_pb2, tokenize_pb2)


def _load_gen_protos():
    path = REPO_ROOT / "scripts" / "gen_protos.py"
    spec = importlib.util.spec_from_file_location("gen_protos", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_protos", module)
    spec.loader.exec_module(module)
    return module


gen_protos = _load_gen_protos()


def _round_trip(message):
    copy = type(message)()
    copy.ParseFromString(message.SerializeToString())
    assert copy == message
    return copy


# --- generated stubs ---------------------------------------------------------------


def test_committed_stubs_are_fresh():
    stale = gen_protos.stale_files()
    assert stale == [], f"stale stubs {stale}: run `python scripts/gen_protos.py`"


def test_check_reports_changed_missing_and_extra_stubs(tmp_path):
    for path in (REPO_ROOT / "pdserve" / "v1").iterdir():
        if gen_protos.is_generated(path):
            shutil.copy(path, tmp_path / path.name)
    assert gen_protos.stale_files(tmp_path) == []

    (tmp_path / "router_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "decode_pb2.pyi").unlink()
    (tmp_path / "removed_pb2.py").write_text("# its proto is gone\n")
    assert gen_protos.stale_files(tmp_path) == ["decode_pb2.pyi", "removed_pb2.py", "router_pb2.py"]


def test_check_cli_exit_code(capsys):
    assert gen_protos.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_stubs_expose_services():
    for module, service in (
        (router_pb2_grpc, "RouterService"),
        (prefill_pb2_grpc, "PrefillService"),
        (decode_pb2_grpc, "DecodeService"),
    ):
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"{service}Servicer")
        assert hasattr(module, f"add_{service}Servicer_to_server")


def test_the_hand_registered_prefill_service_serves_every_rpc():
    """add_prefill_service lists PrefillService's methods by hand (its KV chunks go out pre-serialized)."""
    from types import SimpleNamespace

    from pdserve.kv_transfer.grpc_stream import add_prefill_service

    methods = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].methods
    registered = []
    add_prefill_service(SimpleNamespace(**{m.name: None for m in methods}),
                        SimpleNamespace(add_generic_rpc_handlers=registered.extend))
    for method in methods:
        details = SimpleNamespace(method=f"/{method.containing_service.full_name}/{method.name}")
        assert any(handler.service(details) is not None for handler in registered), method.name


@pytest.mark.parametrize(
    ("module", "service", "method", "server_streaming", "client_streaming"),
    [
        (router_pb2, "RouterService", "Generate", True, False),
        (router_pb2, "RouterService", "ClusterStatus", False, False),
        (router_pb2, "RouterService", "Register", False, False),
        (router_pb2, "RouterService", "Heartbeat", False, False),
        (prefill_pb2, "PrefillService", "Prefill", True, True),  # the request, then the skip
        (prefill_pb2, "PrefillService", "Stats", False, False),
        (decode_pb2, "DecodeService", "Generate", True, False),
        (decode_pb2, "DecodeService", "Stats", False, False),
        *((module, service, method, False, False)
          for module, service in ((router_pb2, "RouterService"), (prefill_pb2, "PrefillService"),
                                  (decode_pb2, "DecodeService"))
          for method in ("Tokenize", "Detokenize")),
    ],
)
def test_rpc_streaming_shape(module, service, method, server_streaming, client_streaming):
    rpc = module.DESCRIPTOR.services_by_name[service].methods_by_name[method]
    assert rpc.server_streaming is server_streaming
    assert rpc.client_streaming is client_streaming


# --- round trips and presence ------------------------------------------------------


def test_sampling_params_omitted_fields_are_absent_not_zero():
    params = _round_trip(common_pb2.SamplingParams(temperature=0.0))
    assert params.HasField("temperature")  # explicit 0 (greedy) survives the wire
    assert params.temperature == 0.0
    for name in (
        "max_tokens",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "ignore_eos",
        "logprobs",
    ):
        assert not params.HasField(name), name
    assert params.top_p == 0.0  # reading an absent field gives 0: check HasField first


def test_sampling_params_explicit_zero_is_present():
    params = _round_trip(common_pb2.SamplingParams(top_p=0.0, seed=0, logprobs=0, ignore_eos=False))
    for name in ("top_p", "seed", "logprobs", "ignore_eos"):
        assert params.HasField(name), name
    params.ClearField("top_p")
    assert not _round_trip(params).HasField("top_p")


def test_every_sampling_scalar_is_optional():
    for field in common_pb2.SamplingParams.DESCRIPTOR.fields:
        if not field.is_repeated:
            assert field.has_presence, field.name


def test_generate_request_round_trip_with_each_input_form():
    sampling = common_pb2.SamplingParams(
        max_tokens=32,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        seed=2**64 - 1,
        stop=["\n\n", "User:"],
        stop_token_ids=[2, 7],
        ignore_eos=True,
        logprobs=5,
    )
    inputs = {
        "prompt": {"prompt": "The capital of France is"},
        "messages": {
            "messages": common_pb2.Messages(
                messages=[
                    common_pb2.ChatMessage(role="system", content="Be brief."),
                    common_pb2.ChatMessage(role="user", content="Capital of France?"),
                ]
            )
        },
        "prompt_token_ids": {"prompt_token_ids": common_pb2.TokenIds(token_ids=[1, 504, 3, 2**32 - 1])},
    }
    for which, kwargs in inputs.items():
        request = common_pb2.GenerateRequest(request_id="req-1", sampling_params=sampling, **kwargs)
        copy = _round_trip(request)
        assert copy.WhichOneof("input") == which
        assert copy.sampling_params.temperature == 0.7
        assert copy.sampling_params.seed == 2**64 - 1


def test_generate_request_input_is_one_of():
    request = common_pb2.GenerateRequest(prompt="hi")
    request.prompt_token_ids.token_ids.extend([1, 2])
    assert request.WhichOneof("input") == "prompt_token_ids"
    assert request.prompt == ""
    assert common_pb2.GenerateRequest().WhichOneof("input") is None


def test_generate_response_stream_round_trip():
    logprobs = common_pb2.TokenLogprobs(
        chosen=common_pb2.TokenLogprob(token_id=9, logprob=-0.25),
        top=[common_pb2.TokenLogprob(token_id=9, logprob=-0.25), common_pb2.TokenLogprob(token_id=4, logprob=-1.5)],
    )
    delta = common_pb2.GenerateResponse(
        delta=common_pb2.TokenDelta(token_ids=[9], text=" Paris", logprobs=[logprobs], completion_index=3)
    )
    result = common_pb2.GenerateResponse(
        result=common_pb2.GenerateResult(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=12, completion_tokens=4, cached_prompt_tokens=8),
            timings=common_pb2.Timings(
                queue_ms=0.5,
                prefill_ms=20.25,
                kv_transfer_ms=3.0,
                decode_ms=40.0,
                total_ms=64.0,
                time_to_first_token_ms=24.0,
            ),
            prefill_worker_id="prefill-0",
            decode_worker_id="decode-0",
            prefill_mode=common_pb2.PREFILL_MODE_REMOTE,
            request_id="req-1",
            num_prefill_attempts=1,
            stop_token_id=2,
        )
    )
    assert _round_trip(delta).WhichOneof("kind") == "delta"
    final = _round_trip(result)
    assert final.WhichOneof("kind") == "result"
    assert final.result.WhichOneof("matched_stop") == "stop_token_id"
    assert final.result.timings.prefill_ms == 20.25


def test_prefill_stream_round_trip():
    layout = common_pb2.KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16")
    num_tokens, itemsize = 3, 2
    tensor_bytes = num_tokens * layout.num_kv_heads * layout.head_dim * itemsize
    k = bytes(range(tensor_bytes))
    v = bytes(reversed(k))
    header = prefill_pb2.PrefillResponse(
        header=prefill_pb2.KVHeader(
            wire_version=prefill_pb2.KV_WIRE_VERSION_1,
            request_id="req-1",
            prompt_token_ids=[1, 2, 3],
            num_prompt_tokens=3,
            model=common_pb2.ModelFingerprint(
                architecture="LlamaForCausalLM", dtype="float16", weights_digest="ab" * 32
            ),
            kv_layout=layout,
            num_kv_bytes=2 * layout.num_layers * tensor_bytes,
            chunk_tokens=3,
            num_chunks=2,
            prefill_worker_id="prefill-0",
        )
    )
    chunks = [
        prefill_pb2.PrefillResponse(
            chunk=prefill_pb2.KVChunk(
                request_id="req-1",
                sequence_number=layer,
                layer_index=layer,
                token_start=0,
                token_end=num_tokens,
                k_bytes=k,
                v_bytes=v,
            )
        )
        for layer in range(layout.num_layers)
    ]
    first = prefill_pb2.PrefillResponse(
        first_token=prefill_pb2.FirstToken(
            request_id="req-1",
            token_id=42,
            timings=prefill_pb2.PrefillTimings(queue_ms=1.0, prefill_ms=10.0, kv_send_ms=2.0, total_ms=13.0),
        )
    )
    stream = [_round_trip(m) for m in (header, *chunks, first)]
    assert [m.WhichOneof("kind") for m in stream] == ["header", "chunk", "chunk", "first_token"]
    assert sum(len(m.chunk.k_bytes) + len(m.chunk.v_bytes) for m in stream[1:3]) == header.header.num_kv_bytes
    assert stream[1].chunk.k_bytes == k and isinstance(stream[1].chunk.k_bytes, bytes)
    assert not stream[3].first_token.HasField("logprobs")


def test_prefill_request_hints_are_optional():
    request = _round_trip(prefill_pb2.PrefillRequest(request=common_pb2.GenerateRequest(request_id="r", prompt="x")))
    assert not request.HasField("block_size")
    assert not request.HasField("max_chunk_bytes")
    request = _round_trip(prefill_pb2.PrefillRequest(block_size=16, max_chunk_bytes=1 << 20))
    assert request.block_size == 16 and request.HasField("max_chunk_bytes")


def test_a_prefill_call_sends_the_request_then_the_skip():
    first = _round_trip(prefill_pb2.PrefillMessage(request=prefill_pb2.PrefillRequest(decode_worker_id="d")))
    second = _round_trip(prefill_pb2.PrefillMessage(skip=prefill_pb2.KVSkip(num_cached_tokens=32)))
    assert first.WhichOneof("kind") == "request" and first.request.decode_worker_id == "d"
    assert second.WhichOneof("kind") == "skip" and second.skip.num_cached_tokens == 32


def test_decode_generate_request_round_trip():
    request = decode_pb2.DecodeGenerateRequest(
        request=common_pb2.GenerateRequest(request_id="req-1", prompt="hi"),
        prefill_candidates=[
            decode_pb2.PrefillCandidate(worker_id="prefill-0", address="127.0.0.1:50061"),
            decode_pb2.PrefillCandidate(worker_id="prefill-1", address="127.0.0.1:50062"),
        ],
        generated_token_ids=[5, 6],
    )
    copy = _round_trip(request)
    assert [c.worker_id for c in copy.prefill_candidates] == ["prefill-0", "prefill-1"]


def test_tokenize_messages_round_trip_and_options_keep_presence():
    request = _round_trip(tokenize_pb2.TokenizeRequest(request_id="r", prompt=""))
    assert request.WhichOneof("input") == "prompt"  # an empty prompt is still a prompt
    assert not request.HasField("add_special_tokens") and not request.HasField("add_generation_prompt")
    chat = common_pb2.Messages(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    request = _round_trip(tokenize_pb2.TokenizeRequest(messages=chat, add_special_tokens=False,
                                                       add_generation_prompt=False, return_token_strs=True))
    assert request.HasField("add_special_tokens") and request.HasField("add_generation_prompt")
    response = _round_trip(tokenize_pb2.TokenizeResponse(token_ids=[1, 2**32 - 1], token_strs=["<s>", "x"],
                                                         max_model_len=2048, preprocessing_version="1",
                                                         worker_id="prefill-1"))
    assert list(response.token_ids) == [1, 2**32 - 1]
    assert _round_trip(tokenize_pb2.DetokenizeRequest(token_ids=[5, 6])).token_ids == [5, 6]
    assert _round_trip(tokenize_pb2.DetokenizeResponse(text="hé", worker_id="decode-1")).text == "hé"


def test_router_messages_round_trip():
    kv = common_pb2.KVStats(block_size=16, num_total=100, num_free=60, num_used=40, num_cached=10)
    load = common_pb2.WorkerLoad(num_running_requests=3, num_waiting_requests=1, num_pending_prefill_tokens=512, kv=kv)
    register = router_pb2.RegisterRequest(
        worker_id="decode-0",
        role=common_pb2.WORKER_ROLE_DECODE,
        address="127.0.0.1:50071",
        model=common_pb2.ModelFingerprint(architecture="LlamaForCausalLM", dtype="float32", weights_digest="00"),
        preprocessing_version="tok-abc/chat-def",
        kv_layout=common_pb2.KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32"),
        load=load,
    )
    _round_trip(register)
    _round_trip(router_pb2.RegisterResponse(worker_id="decode-0", heartbeat_interval_ms=500, heartbeat_timeout_ms=2000))
    _round_trip(router_pb2.HeartbeatRequest(worker_id="decode-0", load=load, draining=True))
    assert _round_trip(router_pb2.HeartbeatResponse(reregister=True)).reregister
    status = router_pb2.ClusterStatusResponse(
        workers=[
            router_pb2.WorkerStatus(
                worker_id="decode-0",
                role=common_pb2.WORKER_ROLE_DECODE,
                address=register.address,
                health=router_pb2.WORKER_HEALTH_HEALTHY,
                load=load,
                model=register.model,
                preprocessing_version=register.preprocessing_version,
                kv_layout=register.kv_layout,
                last_heartbeat_age_ms=120.5,
            )
        ]
    )
    assert _round_trip(status).workers[0].load.kv.num_free == 60
    stats = _round_trip(common_pb2.StatsResponse(worker_id="decode-0", role=common_pb2.WORKER_ROLE_DECODE, load=load))
    assert stats.load.kv.num_free + stats.load.kv.num_used == stats.load.kv.num_total


# --- API style ---------------------------------------------------------------------


def _snake_upper(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).upper()


def test_enum_values_are_prefixed_and_zero_is_unspecified():
    for module in PROTO_MODULES:
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            prefix = _snake_upper(enum.name) + "_"
            assert enum.values_by_number[0].name == prefix + "UNSPECIFIED"
            for value in enum.values:
                assert value.name.startswith(prefix), value.name


def test_every_element_has_a_comment(tmp_path):
    """Every message, field, enum, enum value, service and rpc carries a comment."""
    out = tmp_path / "descriptors.pb"
    sources = gen_protos.proto_files()
    args = ["protoc", f"-I{gen_protos.PROTO_ROOT}", "--include_source_info", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, *map(str, sources)]) == 0
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    undocumented = []
    for file in descriptors.file:
        commented = {
            tuple(loc.path)
            for loc in file.source_code_info.location
            if loc.leading_comments.strip() or loc.trailing_comments.strip()
        }
        undocumented += [f"{file.name}: {name}" for path, name in _elements(file) if path not in commented]
    assert undocumented == []


def _elements(file: descriptor_pb2.FileDescriptorProto):
    """(source-info path, name) of every documentable element of a file."""
    # Field numbers of FileDescriptorProto / DescriptorProto / ... in descriptor.proto.
    for i, message in enumerate(file.message_type):
        yield from _message_elements(message, (4, i))
    for i, enum in enumerate(file.enum_type):
        yield from _enum_elements(enum, (5, i))
    for i, service in enumerate(file.service):
        yield (6, i), service.name
        for j, method in enumerate(service.method):
            yield (6, i, 2, j), f"{service.name}.{method.name}"


def _message_elements(message, path):
    yield path, message.name
    for i, field in enumerate(message.field):
        yield (*path, 2, i), f"{message.name}.{field.name}"
    for i, oneof in enumerate(message.oneof_decl):
        if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
            yield (*path, 8, i), f"{message.name}.{oneof.name}"
    for i, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:  # synthetic entries of a `map<,>` field (documented on the field)
            yield from _message_elements(nested, (*path, 3, i))
    for i, enum in enumerate(message.enum_type):
        yield from _enum_elements(enum, (*path, 4, i))


def _enum_elements(enum, path):
    yield path, enum.name
    for i, value in enumerate(enum.value):
        yield (*path, 2, i), f"{enum.name}.{value.name}"
