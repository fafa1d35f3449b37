"""Versioned rollout: weighted split, pinned (A/B) and shadow requests, weight changes under load,
and preprocessing reloaded on SIGHUP without disturbing running requests."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster

TEMPLATE_A = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TEMPLATE_B = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }} <<end>>{% endfor %}"
CHAT = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def versions(tiny_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("pre") / "preprocess.json"
    config.write_text(json.dumps({"chat_template": TEMPLATE_A}))
    spec = ClusterSpec(num_prefill=0, num_decode=2, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, worker_args={
                           0: ["--version", "v1", "--preprocess-config", str(config)],
                           1: ["--version", "v2", "--metrics-port", "0"]})
    with LocalCluster(spec) as cluster:
        with Client(cluster.address) as client:
            ids = {w.version: w.worker_id for w in client.cluster_status()}
        yield cluster, ids, config


def served_by(cluster, n: int, concurrency: int = 32, **kwargs) -> list:
    async def main():
        sem = asyncio.Semaphore(concurrency)
        async with AsyncClient(cluster.address) as client:
            async def one(i):
                async with sem:
                    return await client.complete(prompt_token_ids=[5 + i % 50, 6, 7], max_tokens=1, temperature=0.0,
                                                 **kwargs)
            return await asyncio.gather(*(one(i) for i in range(n)))
    return asyncio.run(main())


def test_weights_split_the_requests_and_a_pinned_request_goes_to_its_version(versions):
    cluster, ids, _ = versions
    with Client(cluster.address) as client:
        client.set_rollout({"v1": 80, "v2": 20})
    try:
        results = served_by(cluster, 500)
        share = sum(r.decode_worker_id == ids["v1"] for r in results) / len(results)
        assert 0.74 <= share <= 0.86, share  # 80% +- 3.4 standard deviations of 500 draws
        pinned = served_by(cluster, 20, version="v2")
        assert {r.decode_worker_id for r in pinned} == {ids["v2"]}
    finally:
        with Client(cluster.address) as client:
            client.set_rollout({})


def test_changing_weights_under_load_loses_no_request(versions):
    cluster, ids, _ = versions

    async def main():
        stop = asyncio.Event()

        async def flip():
            settings = [{"v1": 1}, {"v2": 1}, {"v1": 1, "v2": 3}, {}]
            i = 0
            while not stop.is_set():
                await asyncio.to_thread(lambda s=settings[i % 4]: Client(cluster.address).set_rollout(s))
                i += 1
                await asyncio.sleep(0.05)
            return i

        flipper = asyncio.create_task(flip())
        async with AsyncClient(cluster.address) as client:
            async def one(i):
                await asyncio.sleep(i * 0.015)  # arrivals spread over the weight changes
                return await client.complete(prompt_token_ids=[9, 8, 7, i], max_tokens=6, temperature=0.0,
                                             ignore_eos=True)

            results = await asyncio.gather(*(one(i) for i in range(80)))
        stop.set()
        return results, await flipper

    results, flips = asyncio.run(main())
    assert flips >= 3
    assert all(r.finish_reason == "length" and len(r.token_ids) == 6 for r in results)
    assert {r.decode_worker_id for r in results} == set(ids.values())


def test_shadow_copies_requests_to_the_shadow_version_and_discards_its_answers(versions):
    cluster, ids, _ = versions
    v2 = next(w for w in cluster.workers if "v2" in w.args)

    def v2_requests() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{v2.metrics_port}/metrics", timeout=5).read().decode()
        return sum(float(m.group(1)) for m in re.finditer(r'pdserve_requests_total\{[^}]*status_code="OK"[^}]*\} (\S+)', text))

    before = v2_requests()
    with Client(cluster.address) as client:
        client.set_rollout({"v1": 1}, shadow_version="v2", shadow_fraction=1.0)
        try:
            results = [client.complete(prompt_token_ids=[4, 4, i], max_tokens=2, temperature=0.0) for i in range(5)]
        finally:
            client.set_rollout({})
    assert {r.decode_worker_id for r in results} == {ids["v1"]}  # answers come from v1 only
    deadline = time.monotonic() + 10
    while v2_requests() - before < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert v2_requests() - before == 5


def test_sighup_reloads_the_template_for_new_requests_only(versions):
    cluster, ids, config = versions
    v1 = next(w for w in cluster.workers if "v1" in w.args)

    def version_of_v1() -> str:
        with Client(cluster.address) as client:
            return next(w.preprocessing_version for w in client.cluster_status() if w.worker_id == ids["v1"])

    with Client(cluster.address) as client:
        before = client.complete(messages=CHAT, max_tokens=1, temperature=0.0, version="v1")
        old_version = version_of_v1()
        running = client.generate(messages=CHAT, max_tokens=150, temperature=0.0, ignore_eos=True, version="v1")
        first = next(running)  # the running request is tokenized and decoding
        config.write_text(json.dumps({"chat_template": TEMPLATE_B}))
        v1.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while version_of_v1() == old_version:
            assert time.monotonic() < deadline, "the worker did not re-register with its new version"
            time.sleep(0.1)
        after = client.complete(messages=CHAT, max_tokens=1, temperature=0.0, version="v1")
        rest = list(running)
    assert after.usage.prompt_tokens > before.usage.prompt_tokens  # the new template's markers
    assert running.result.usage.prompt_tokens == before.usage.prompt_tokens  # the running one kept its prompt
    assert len(first.token_ids) + sum(len(d.token_ids) for d in rest) == 150
