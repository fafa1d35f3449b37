"""A decode worker that holds the start of a prompt in its prefix cache asks the prefill worker to skip
it: only the rest of the KV moves, and the answer is the oracle's. With --local-prefill-below, what
counts is the part not cached: a long prompt whose new tail is short is prefilled where it is."""

from __future__ import annotations

import grpc
import pytest

from pdserve.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from tests.cluster_helpers import generate_via, start_worker, wait_kv_free
from tests.engine_helpers import hf_greedy, random_prompts

FIRST, OTHER = random_prompts([40, 6], seed=21)
SECOND = FIRST[:32] + OTHER  # a later turn: two full blocks (block size 16) shared with FIRST
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def prefill(tiny_dir):
    child = start_worker("prefill", tiny_dir, "--metrics-port", "0")
    yield child
    child.stop(5)


@pytest.fixture(scope="module")
def oracle(tiny_oracles):
    return lambda prompt: hf_greedy(tiny_oracles["llama"], prompt, MAX_TOKENS)


def sent_bytes(prefill) -> float:
    return prefill.metric_sum("pdserve_kv_transfer_bytes_total")


def test_a_cached_prefix_is_not_sent_again(tiny_dir, prefill, oracle):
    decode = start_worker("decode", tiny_dir)
    try:
        before = sent_bytes(prefill)
        tokens, result = generate_via(decode.address, [prefill.address], FIRST, MAX_TOKENS)
        first_bytes = sent_bytes(prefill) - before
        assert tokens == oracle(FIRST)
        assert result.prefill_mode == common_pb2.PREFILL_MODE_REMOTE and result.usage.cached_prompt_tokens == 0

        tokens, result = generate_via(decode.address, [prefill.address], SECOND, MAX_TOKENS)
        assert tokens == oracle(SECOND)
        assert result.prefill_mode == common_pb2.PREFILL_MODE_REMOTE and result.usage.cached_prompt_tokens == 32
        assert first_bytes > 0 and sent_bytes(prefill) - before - first_bytes == first_bytes / 40 * len(OTHER)
        assert wait_kv_free(decode.address, "decode") == 0
        assert wait_kv_free(prefill.address, "prefill") == 0
    finally:
        decode.stop(5)


def test_conditional_disaggregation_counts_only_the_uncached_tail(tiny_dir, prefill, oracle):
    decode = start_worker("decode", tiny_dir, "--local-prefill-below", "20")
    try:
        _, result = generate_via(decode.address, [prefill.address], FIRST, MAX_TOKENS)  # 40 new tokens
        assert result.prefill_mode == common_pb2.PREFILL_MODE_REMOTE
        tokens, result = generate_via(decode.address, [prefill.address], SECOND, MAX_TOKENS)  # 6 new tokens
        assert tokens == oracle(SECOND)
        assert result.prefill_mode == common_pb2.PREFILL_MODE_LOCAL and result.usage.cached_prompt_tokens == 32
    finally:
        decode.stop(5)


def test_prefill_refuses_to_skip_the_whole_prompt(prefill):
    request = prefill_pb2.PrefillRequest(
        request=common_pb2.GenerateRequest(request_id="skip-all", prompt_token_ids=common_pb2.TokenIds(
            token_ids=FIRST), sampling_params=common_pb2.SamplingParams(max_tokens=1)))
    messages = [prefill_pb2.PrefillMessage(request=request),
                prefill_pb2.PrefillMessage(skip=prefill_pb2.KVSkip(num_cached_tokens=len(FIRST)))]
    received = []
    with grpc.insecure_channel(prefill.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            for response in prefill_pb2_grpc.PrefillServiceStub(channel).Prefill(iter(messages), timeout=10):
                received.append(response.WhichOneof("kind"))
    assert received == ["header"]  # the prompt's ids came, then the refusal
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "skip.num_cached_tokens" in err.value.details()
    assert wait_kv_free(prefill.address, "prefill") == 0
