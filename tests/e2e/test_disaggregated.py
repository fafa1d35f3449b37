"""A real cluster (router, 2 prefill, 2 decode processes) on a tiny model, fp32, through the SDK."""

from __future__ import annotations

import asyncio
import time

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import CapacityError, InvalidRequestError, PdserveError
from tests.cluster_helpers import E2E_LOG, wait_kv_free
from tests.engine_helpers import hf_greedy, random_prompts

NUM_REQUESTS = 32
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    spec = ClusterSpec(num_prefill=2, num_decode=2, model=tiny_dir, dtype="float32", router_listen="127.0.0.1:0",
                       kv_cache_gib=0.05, heartbeat_s=0.5, log_path=E2E_LOG)
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([5 + (i * 7) % 60 for i in range(NUM_REQUESTS)], seed=3)


def _workers(cluster, role):
    return [w for w in cluster.workers if w.role == role]


def assert_no_leak(cluster) -> None:
    for w in cluster.workers:
        assert wait_kv_free(w.address, w.role, timeout=2.0) == 0, f"{w.role} {w.address} leaked KV blocks"


def test_concurrent_requests_match_colocated_and_transformers(cluster, prompts, tiny_oracles):
    async def run_all():
        async with AsyncClient(cluster.address, timeout=60) as client:
            return await asyncio.gather(*(client.complete(prompt_token_ids=p, max_tokens=MAX_TOKENS,
                                                          temperature=0.0) for p in prompts))

    results = asyncio.run(run_all())
    # Co-located: the same prompts prefilled and decoded by one decode daemon alone.
    decode = _workers(cluster, "decode")[0]
    with Client(decode.address, service="decode", timeout=60) as client:
        local = [client.complete(prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0) for p in prompts]
    for p, r, loc in zip(prompts, results, local):
        assert r.prefill_mode == "remote" and loc.prefill_mode == "local"
        assert r.token_ids == loc.token_ids == hf_greedy(tiny_oracles["llama"], p, MAX_TOKENS)
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(r.token_ids)
    assert {r.decode_worker_id for r in results} == {w for w in _worker_ids(cluster, "decode")}
    assert {r.prefill_worker_id for r in results} == {w for w in _worker_ids(cluster, "prefill")}
    assert_no_leak(cluster)


def _worker_ids(cluster, role):
    with Client(cluster.address) as client:
        return {w.worker_id for w in client.cluster_status() if w.role == role}


def test_chat_messages_and_text(cluster):
    with Client(cluster.address, timeout=60) as client:
        c = client.complete(messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0)
        d = client.complete(messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0.0)
    assert c.token_ids == d.token_ids and c.text == d.text
    assert c.usage.completion_tokens == len(c.token_ids) > 0


BAD_INPUTS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "prompt"),
    (dict(prompt="hello " * 600), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=5000), "max_tokens"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", top_k=-1), "top_k"),
    (dict(prompt="hi", stop=["x"] * 1000), "stop"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_names_the_field_and_the_cluster_keeps_serving(cluster, kwargs, field):
    with Client(cluster.address, timeout=30) as client:
        with pytest.raises(InvalidRequestError) as err:
            client.complete(**kwargs)
        assert err.value.field == field, str(err.value)
        assert client.complete(prompt="ok", max_tokens=2, temperature=0.0).usage.completion_tokens == 2


def test_huge_prompt_is_refused_not_crashing(cluster):
    with Client(cluster.address, timeout=30) as client:
        with pytest.raises((CapacityError, InvalidRequestError)):
            client.complete(prompt="x" * 10_000_000, max_tokens=2)
        assert client.complete(prompt="ok", max_tokens=2, temperature=0.0).usage.completion_tokens == 2


def test_client_cancellation_frees_blocks_everywhere(cluster, prompts):
    with Client(cluster.address, timeout=60) as client:
        stream = client.generate(prompt_token_ids=prompts[-1], max_tokens=900, temperature=0.0, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 5:
                break
        stream.close()
    started = time.monotonic()
    assert_no_leak(cluster)
    assert time.monotonic() - started < 3.0


def test_cluster_status_lists_every_worker(cluster):
    with Client(cluster.address) as client:
        workers = client.cluster_status()
    assert sorted(w.role for w in workers) == ["decode", "decode", "prefill", "prefill"]
    assert all(w.health == "healthy" and w.model_fingerprint.startswith("llama/float32/") for w in workers)
    assert all(w.load.kv.num_total > 0 and w.preprocessing_version for w in workers)


def test_unknown_errors_do_not_leak_as_ok(cluster):
    with Client(cluster.address, timeout=30) as client:
        with pytest.raises(PdserveError):
            client.complete(prompt_token_ids=[999_999], max_tokens=2)
