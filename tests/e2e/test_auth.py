"""API keys on the router: gRPC metadata and HTTP bearer tokens (/v1/, /tokenize); health and workers unaffected."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import AuthenticationError

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.5, http_port=0, api_keys=(KEY, "second-key"))
    with LocalCluster(spec) as cluster:  # starting it proves the workers registered without keys
        yield cluster


@pytest.mark.parametrize("key", [None, "wrong", "s3cret-ke", f"{KEY}x"])
def test_grpc_without_a_valid_key_is_unauthenticated(keyed, key):
    with Client(keyed.address, api_key=key) as client:
        with pytest.raises(AuthenticationError):
            client.complete(prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0.0)
        with pytest.raises(AuthenticationError):
            client.cluster_status()


def test_grpc_with_either_key_is_served_and_health_stays_open(keyed):
    for key in (KEY, "second-key"):
        with Client(keyed.address, api_key=key) as client:
            assert client.complete(prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0.0).finish_reason == "length"
            assert len(client.cluster_status()) == 2
    with grpc.insecure_channel(keyed.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_async_client_sends_its_key(keyed):
    async def complete(key: str):
        async with AsyncClient(keyed.address, api_key=key) as client:
            return await client.complete(prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0.0)

    assert asyncio.run(complete(KEY)).finish_reason == "length"
    with pytest.raises(AuthenticationError):
        asyncio.run(complete("wrong"))


def test_http_needs_the_key_but_health_does_not(keyed):
    http = keyed.describe()["http"]
    bad = openai.OpenAI(base_url=f"{http}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model="default", prompt=[5, 6, 7], max_tokens=2)
    assert err.value.status_code == 401
    good = openai.OpenAI(base_url=f"{http}/v1", api_key=KEY, max_retries=0, timeout=30)
    assert good.completions.create(model="default", prompt=[5, 6, 7], max_tokens=2).usage.completion_tokens == 2
    with urllib.request.urlopen(f"{http}/health", timeout=5) as r:
        assert r.status == 200


def test_the_command_line_clients_send_the_key_from_the_environment(keyed):
    import os
    import subprocess
    import sys

    top = [sys.executable, "-m", "pdserve.cli", "top", "--router", keyed.address, "--once"]
    with_key = subprocess.run(top, capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, PDSERVE_API_KEY=KEY))
    assert with_key.returncode == 0 and "prefill" in with_key.stdout, with_key.stderr
    without = subprocess.run(top, capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "PDSERVE_API_KEY"})
    assert without.returncode == 2 and "API key is required" in without.stderr


def test_tokenization_needs_the_key_on_http_and_grpc(keyed):
    http = keyed.describe()["http"]
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({"Authorization": f"Bearer {KEY}"}, 200)):
            request = urllib.request.Request(f"{http}{path}", data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    got = r.status
            except urllib.error.HTTPError as err:
                got = err.code
            assert got == status, (path, headers)
    with Client(keyed.address) as client:
        with pytest.raises(AuthenticationError):
            client.tokenize("hi")
    with Client(keyed.address, api_key=KEY) as client:
        assert client.detokenize(client.tokenize("hi")) == "hi"
