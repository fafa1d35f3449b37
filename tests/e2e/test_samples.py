"""n samples, logprobs with token bytes, prompt logprobs and logit_bias through the daemons, on the wire
and through the SDK.

A cluster of one prefill and one decode worker on a tiny model, fp32. The disaggregated path
(router -> decode, KV from the prefill worker) is compared with the co-located one (the decode
worker alone) message by message: the samples, their logprobs and the prompt logprobs must agree.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.client import AsyncClient, Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import InvalidRequestError
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc, router_pb2_grpc
from tests.cluster_helpers import E2E_LOG, wait_kv_free
from tests.engine_helpers import hf_greedy, random_prompts

PROMPT = random_prompts([21], seed=9)[0]
PROMPT_IDS = [5, 9, 14, 22, 31, 40, 51, 63, 77, 90]


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", router_listen="127.0.0.1:0",
                       kv_cache_gib=0.05, heartbeat_s=0.5, log_path=E2E_LOG)
    with LocalCluster(spec) as c:
        yield c


@pytest.fixture(scope="module")
def stubs(cluster):
    decode = next(w for w in cluster.workers if w.role == "decode")
    with grpc.insecure_channel(cluster.address) as router, grpc.insecure_channel(decode.address) as local:
        yield router_pb2_grpc.RouterServiceStub(router), decode_pb2_grpc.DecodeServiceStub(local)


def request(**sampling) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(prompt_token_ids=common_pb2.TokenIds(token_ids=PROMPT),
                                      sampling_params=common_pb2.SamplingParams(**sampling))


def run(stubs, req, where: str = "router"):
    """(deltas by sample index, results by sample index, the stream's messages)."""
    router, decode = stubs
    if where == "router":
        messages = list(router.Generate(req, timeout=60))
    else:  # co-located: the decode worker prefills itself
        messages = list(decode.Generate(decode_pb2.DecodeGenerateRequest(request=req), timeout=60))
    deltas: dict[int, list] = {}
    results: dict[int, common_pb2.GenerateResult] = {}
    for m in messages:
        if m.WhichOneof("kind") == "delta":
            assert m.delta.index not in results, "a delta after its sample's result"
            deltas.setdefault(m.delta.index, []).append(m.delta)
        else:
            assert m.result.index not in results
            results[m.result.index] = m.result
    assert messages[-1].WhichOneof("kind") == "result"
    return deltas, results, messages


def tokens(deltas) -> dict[int, list[int]]:
    return {i: [t for d in ds for t in d.token_ids] for i, ds in deltas.items()}


def no_leak(cluster) -> None:
    for w in cluster.workers:
        assert wait_kv_free(w.address, w.role, timeout=2.0) == 0, f"{w.role} leaked KV blocks"


def test_greedy_samples_are_the_oracle_answer(cluster, stubs, tiny_oracles):
    deltas, results, _ = run(stubs, request(n=3, max_tokens=10, temperature=0.0, ignore_eos=True))
    ref = hf_greedy(tiny_oracles["llama"], PROMPT, 10)
    assert tokens(deltas) == {0: ref, 1: ref, 2: ref}
    assert sorted(results) == [0, 1, 2]
    assert all(r.usage.completion_tokens == 10 and r.prefill_mode == common_pb2.PREFILL_MODE_REMOTE
               for r in results.values())
    no_leak(cluster)


def test_seeded_samples_disaggregated_equal_colocated(cluster, stubs):
    req = request(n=4, max_tokens=12, temperature=1.2, seed=42, logprobs=2, ignore_eos=True)
    remote, remote_results, _ = run(stubs, req)
    local, local_results, _ = run(stubs, req, where="decode")
    assert remote_results[0].prefill_mode == common_pb2.PREFILL_MODE_REMOTE
    assert local_results[0].prefill_mode == common_pb2.PREFILL_MODE_LOCAL
    assert tokens(remote) == tokens(local)
    assert len({tuple(t) for t in tokens(remote).values()}) > 1  # not four copies of one sample
    single, _, _ = run(stubs, request(n=1, max_tokens=12, temperature=1.2, seed=42, ignore_eos=True))
    assert tokens(single)[0] == tokens(remote)[0]  # sample 0 is the n = 1 answer
    for i in range(4):  # logprobs on every token, the first (sampled by the prefill worker) included
        lps = [lp for d in remote[i] for lp in d.logprobs]
        assert [lp.chosen.token_id for lp in lps] == tokens(remote)[i]
        assert all(len(lp.top) == 2 and lp.chosen.token_bytes for lp in lps)
        local_lps = [lp for d in local[i] for lp in d.logprobs]
        assert [lp.chosen.logprob for lp in lps] == pytest.approx([lp.chosen.logprob for lp in local_lps], abs=1e-4)
        assert [d.completion_index for d in remote[i]] == [sum(len(x.token_ids) for x in remote[i][:k])
                                                           for k in range(len(remote[i]))]
    no_leak(cluster)


def test_prompt_logprobs_come_once_and_agree(cluster, stubs):
    req = request(max_tokens=3, temperature=0.0, prompt_logprobs=2, n=2)
    remote, _, _ = run(stubs, req)
    local, _, _ = run(stubs, req, where="decode")
    for deltas in (remote, local):
        carrying = [d for ds in deltas.values() for d in ds if d.prompt_logprobs]
        assert len(carrying) == 1 and carrying[0] is deltas[0][0]
    got, want = remote[0][0].prompt_logprobs, local[0][0].prompt_logprobs
    assert len(got) == len(PROMPT) and not got[0].HasField("chosen")
    assert [lp.chosen.token_id for lp in got[1:]] == PROMPT[1:]
    assert [lp.chosen.logprob for lp in got[1:]] == pytest.approx([lp.chosen.logprob for lp in want[1:]], abs=1e-4)
    assert all(len(lp.top) == 2 for lp in got[1:])
    no_leak(cluster)


def test_logit_bias_forces_a_token(stubs):
    deltas, _, _ = run(stubs, request(max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={300: 100.0}))
    assert tokens(deltas)[0] == [300] * 4


@pytest.mark.parametrize(("sampling", "field"), [
    (dict(n=0), "n"), (dict(n=129), "n"), (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(logit_bias={5: 101.0}), "logit_bias[5]"), (dict(logit_bias={10**6: 1.0}), "logit_bias"),
])
def test_bad_values_name_their_field(cluster, stubs, sampling, field):
    with pytest.raises(grpc.RpcError) as info:
        run(stubs, request(max_tokens=4, **sampling))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()
    no_leak(cluster)


def test_cancelling_a_many_sample_stream_frees_every_block(cluster, stubs):
    router, _ = stubs
    call = router.Generate(request(n=6, max_tokens=200, temperature=1.0, seed=1, ignore_eos=True), timeout=60)
    for i, _ in enumerate(call):
        if i == 20:
            break
    call.cancel()
    no_leak(cluster)


# -- through the SDK ----------------------------------------------------------------------------
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
