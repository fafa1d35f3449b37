"""The SDK's n samples, logprobs with token bytes, prompt logprobs and logit_bias against real daemons."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import InvalidRequestError
from tests.cluster_helpers import E2E_LOG

PROMPT_IDS = [5, 9, 14, 22, 31, 40, 51, 63, 77, 90]


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", router_listen="127.0.0.1:0",
                       kv_cache_gib=0.05, heartbeat_s=0.5, log_path=E2E_LOG)
    with LocalCluster(spec) as c:
        yield c


def test_n_samples_stream_deltas_results_and_samples(cluster):
    kwargs = dict(prompt_token_ids=PROMPT_IDS, max_tokens=6, temperature=1.0, seed=3, logprobs=1)
    with Client(cluster.address, timeout=60) as client:
        alone = client.complete(**kwargs)
        stream = client.generate(**kwargs, n=3)
        deltas = list(stream)
        done = client.complete(**kwargs, n=3)
    assert {d.index for d in deltas} == {0, 1, 2}
    assert [r.index for r in stream.results] == [0, 1, 2] and stream.result is stream.results[0]
    by_index = {i: [t for d in deltas if d.index == i for t in d.token_ids] for i in range(3)}
    assert [r.usage.completion_tokens for r in stream.results] == [len(by_index[i]) for i in range(3)]
    assert [s.token_ids for s in done.samples] == [by_index[i] for i in range(3)]  # the same seed, again
    assert done.samples[0].token_ids == done.token_ids == alone.token_ids and done.text == alone.text
    assert alone.samples == [] and len(done.samples) == 3
    for sample in done.samples:
        assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
        assert all(lp.token_bytes and len(lp.top) == 1 and lp.top[0].token_bytes for lp in sample.logprobs)
        assert [lp.token_id for lp in sample.logprobs] == sample.token_ids


def test_prompt_logprobs_one_per_prompt_token_the_first_none(cluster):
    with Client(cluster.address, timeout=60) as client:
        done = client.complete(prompt_token_ids=PROMPT_IDS, max_tokens=2, temperature=0.0, prompt_logprobs=2, n=2)
        spelled = [client.detokenize([t]) for t in PROMPT_IDS]
    prompt = done.prompt_logprobs
    assert prompt is not None and len(prompt) == len(PROMPT_IDS) and prompt[0] is None
    assert [lp.token_id for lp in prompt[1:]] == PROMPT_IDS[1:]
    assert all(lp.token_bytes and len(lp.top) == 2 and lp.logprob <= 0 for lp in prompt[1:])
    assert [lp.token_bytes.decode("utf-8", "replace") for lp in prompt[1:]] == spelled[1:]
    assert done.samples[0].prompt_logprobs == prompt and done.samples[1].prompt_logprobs is None
    assert done.logprobs is None


def test_async_samples_and_logit_bias(cluster):
    forced = 300  # not EOS

    async def main():
        async with AsyncClient(cluster.address, timeout=60) as client:
            done = await client.complete(prompt_token_ids=PROMPT_IDS, max_tokens=3, temperature=0.0, n=2,
                                         logit_bias={forced: 100.0})
            stream = client.generate(prompt_token_ids=PROMPT_IDS, max_tokens=2, n=2)
            deltas = [d async for d in stream]
            with pytest.raises(InvalidRequestError) as err:
                await client.complete(prompt_token_ids=PROMPT_IDS, logit_bias={forced: 101.0})
            return done, stream, deltas, err.value

    done, stream, deltas, error = asyncio.run(main())
    assert [s.token_ids for s in done.samples] == [[forced] * 3] * 2
    assert [r.index for r in stream.results] == [0, 1] and {d.index for d in deltas} == {0, 1}
    assert error.field.startswith("logit_bias")
