"""Daemon lifecycle and edges: static router lists, conditional disaggregation, malformed
requests, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest

from pdserve.client import Client
from pdserve.cluster import Child, ClusterSpec, LocalCluster
from pdserve.errors import FatalError, InvalidRequestError, PdserveError
from tests.cluster_helpers import generate_via, start_worker
from tests.engine_helpers import random_prompts

SHORT, LONG, UNSEEN = random_prompts([10, 60, 60], seed=4)


@pytest.fixture(scope="module")
def prefill(tiny_dir):
    child = start_worker("prefill", tiny_dir)
    yield child
    child.stop(5)


@pytest.fixture(scope="module")
def decode(tiny_dir):
    child = start_worker("decode", tiny_dir, "--local-prefill-below", "30")
    yield child
    child.stop(5)


@pytest.fixture(scope="module")
def static_router(prefill, decode):
    import os

    child = Child("router", ["--listen", "127.0.0.1:0", "--heartbeat-s", "0.5", "--prefill-addr", prefill.address,
                             "--decode-addr", decode.address])
    child.start(open(os.devnull, "w"))
    child.wait_ready(60)
    yield child
    child.stop(5)


def test_router_with_static_worker_lists(static_router):
    with Client(static_router.address, timeout=60) as client:
        result = client.complete(prompt_token_ids=LONG, max_tokens=4, temperature=0.0)
        workers = client.cluster_status()
    assert result.prefill_mode == "remote" and result.usage.completion_tokens == 4
    assert sorted(w.role for w in workers) == ["decode", "prefill"]


def test_short_prompts_prefill_locally(decode, prefill):
    _, short = generate_via(decode.address, [prefill.address], SHORT, 3)
    _, long = generate_via(decode.address, [prefill.address], UNSEEN, 3)  # none of it in the prefix cache
    assert short.prefill_mode == 2 and long.prefill_mode == 1  # LOCAL, REMOTE


def _raw_generate(address: str, payload: bytes):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream("/pdserve.v1.RouterService/Generate",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return list(call(payload, timeout=10))


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"\x12\x02\xff\xfe", "prompt"),  # field 2 (prompt), invalid UTF-8
        (b"\x1a\x08\x0a\x06\x12\x04\xc3\x28ab", "messages.messages.content"),  # messages[0].content
        (b"\x12\x09abc", "request"),  # truncated
    ],
)
def test_malformed_requests_are_invalid_argument(static_router, payload, field):
    with pytest.raises(grpc.RpcError) as err:
        _raw_generate(static_router.address, payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    with Client(static_router.address, timeout=30) as client:
        assert client.complete(prompt_token_ids=LONG, max_tokens=2).usage.completion_tokens == 2


def test_sigterm_drains_running_requests(tiny_dir):
    worker = start_worker("decode", tiny_dir, "--grace-s", "20")
    with Client(worker.address, service="decode", timeout=60) as client:
        stream = client.generate(prompt_token_ids=LONG, max_tokens=300, ignore_eos=True, temperature=0.0)
        first = next(iter(stream))
        worker.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(PdserveError):
            client.complete(prompt_token_ids=SHORT, max_tokens=2)
        rest = list(stream)
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 300
    assert stream.result.finish_reason == "length"
    assert worker.process.wait(30) == 0


def test_invalid_field_through_decode_service(decode):
    with Client(decode.address, service="decode", timeout=30) as client:
        with pytest.raises(InvalidRequestError) as err:
            client.complete(prompt_token_ids=SHORT, top_p=2.0)
    assert err.value.field == "top_p"


def test_a_worker_that_cannot_start_fails_the_cluster_with_its_stderr(tmp_path):
    missing = tmp_path / "no-such-model"
    spec = ClusterSpec(num_prefill=1, num_decode=0, model=str(missing), kv_cache_gib=0.05)
    with pytest.raises(FatalError) as failed:
        LocalCluster(spec).start(timeout=60)
    message = str(failed.value)
    assert "prefill exited with code" in message
    assert str(missing) in message.split("stderr ends with:", 1)[1]  # the worker's own words


def _ended(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_daemons_end_with_the_process_that_launched_them():
    launcher_code = ("import subprocess, time\nfrom pdserve.cluster import Child\n"
                     "child = Child('router', ['--listen', '127.0.0.1:0'])\nchild.start(subprocess.DEVNULL)\n"
                     "child.wait_ready(60)\nprint(child.process.pid, flush=True)\ntime.sleep(120)\n")
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True)
    try:
        daemon = int(launcher.stdout.readline())
        assert not _ended(daemon)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 15
    while not _ended(daemon) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ended(daemon), "the router outlived its launcher"
