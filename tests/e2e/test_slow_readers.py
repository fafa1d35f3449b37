"""Slow readers: a client that stops reading does not stall the batch; past --slow-reader-timeout-s its
request is aborted, its blocks freed, and the stream ends RESOURCE_EXHAUSTED when it reads again."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pdserve.client import Client
from pdserve.client.convert import decode_request_pb, request_pb
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.v1 import decode_pb2_grpc, router_pb2_grpc
from tests.cluster_helpers import wait_kv_free

TIMEOUT_S = 1.0
MAX_TOKENS = 1000  # the tiny model's context is 1024
OTHERS = 3
# A reader's receive window of 1 KiB, never grown: a few dozen token deltas fill it.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    flag = ["--slow-reader-timeout-s", str(TIMEOUT_S)]
    spec = ClusterSpec(num_prefill=0, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3, extra_args={"router": flag, "decode": flag})
    with LocalCluster(spec) as c:
        c.decode = next(w for w in c.workers if w.role == "decode")
        yield c


def long_request():
    return request_pb(prompt=None, messages=None, prompt_token_ids=[5, 6, 7, 8, 9], request_id=None,
                      sampling={"max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True})


@pytest.mark.parametrize("front", ["router", "decode"])
def test_a_client_that_stops_reading_is_aborted_and_frees_its_blocks(cluster, front):
    address = cluster.address if front == "router" else cluster.decode.address
    with grpc.insecure_channel(address, options=SMALL_WINDOW) as channel:
        if front == "router":
            stream = router_pb2_grpc.RouterServiceStub(channel).Generate(long_request(), timeout=60)
        else:
            stream = decode_pb2_grpc.DecodeServiceStub(channel).Generate(decode_request_pb(long_request()),
                                                                         timeout=60)
        received = len(next(stream).delta.token_ids)  # the request runs; this client reads no more
        # The batch goes on meanwhile: other clients are served in full (and keep the slow request
        # from finishing its 1000 tokens before the timeout).
        with Client(cluster.address) as client, ThreadPoolExecutor(OTHERS) as pool:
            others = list(pool.map(lambda i: client.complete(
                prompt_token_ids=[11, 12, i], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                timeout=60), range(OTHERS)))
        assert all(r.usage.completion_tokens == MAX_TOKENS for r in others)
        # The slow request was aborted and its blocks freed, while its stream was still unread.
        assert wait_kv_free(cluster.decode.address, "decode", timeout=TIMEOUT_S + 5) == 0
        with pytest.raises(grpc.RpcError) as err:  # reading again: what was buffered, then the status
            for response in stream:
                received += len(response.delta.token_ids)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "stopped reading" in err.value.details()
    assert received < MAX_TOKENS  # cut short, not run to its end
    with Client(cluster.address) as client:  # and the cluster serves the next request
        assert client.complete(prompt_token_ids=[5, 6], max_tokens=3, temperature=0.0).finish_reason == "length"


def test_a_slow_but_steady_reader_is_not_aborted(cluster):
    with grpc.insecure_channel(cluster.address, options=SMALL_WINDOW) as channel:
        request = long_request()
        request.sampling_params.max_tokens = 60
        stream = router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=60)
        tokens, started = 0, time.monotonic()
        for response in stream:
            if response.WhichOneof("kind") == "delta":
                tokens += len(response.delta.token_ids)
                time.sleep(0.02)  # reads, slowly: each send completes well within the timeout
            else:
                assert response.result.usage.completion_tokens == 60
        assert tokens == 60 and time.monotonic() - started > TIMEOUT_S
