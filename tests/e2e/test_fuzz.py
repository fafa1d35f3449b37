"""Fuzzing the gRPC services of a running cluster (router + 1 prefill + 1 decode, tiny model).

Each example is a batch of 1 to 4 concurrent calls (tests/fuzz_strategies.py: random and
boundary field values, wire-level damage, raw bytes, client cancellations, short
deadlines). Every call must end OK or with a documented status and a message, an OK
stream must be well formed, and after every batch each daemon is alive and SERVING and,
once idle, no worker holds a KV block. Derandomized, so CI sees the same examples.
The long run is `bench/fuzz.py`.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pdserve.cluster import ClusterSpec, LocalCluster
from tests.cluster_helpers import E2E_LOG
from tests.factories import TINY_VOCAB_SIZE
from pdserve.v1 import common_pb2, decode_pb2, prefill_pb2
from tests.fuzz_strategies import (
    GENERATE_RPCS,
    RPCS,
    FuzzCall,
    Targets,
    bad_addresses,
    calls,
    channels_for,
    check,
    cluster_problems,
    run_call,
)

# A call without its own short deadline that takes this long is a hang.
HANG_S = 20.0
# No shrinking: the daemons keep state between examples (a crash breaks every later
# one), so the first failing batch, reported whole, is the reproducer.
FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                         phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


@dataclass
class FuzzEnv:
    cluster: LocalCluster
    targets: Targets
    channels: dict[str, grpc.Channel]
    pool: ThreadPoolExecutor
    failure: str = ""  # the first failing batch and what it broke; later examples repeat it


@pytest.fixture(scope="module")
def env(tiny_dir):
    tarpit = socket.socket()  # listens, never accepts: a prefill candidate that stalls
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(1)
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.5, log_path=E2E_LOG, extra_args={"decode": ["--kv-stall-timeout-s", "1"]})
    with LocalCluster(spec) as cluster, ThreadPoolExecutor(8) as pool:
        prefill = next(w.address for w in cluster.workers if w.role == "prefill")
        # Concurrent calls sharing a request id are tested on their own (test_duplicate_request_id...).
        targets = Targets(prefill, bad_addresses(cluster, f"127.0.0.1:{tarpit.getsockname()[1]}"), TINY_VOCAB_SIZE,
                          unique_request_ids=True)
        channels = channels_for(cluster)
        yield FuzzEnv(cluster, targets, channels, pool)
        for ch in channels.values():
            ch.close()
    tarpit.close()


def run_batch(env: FuzzEnv, batch) -> None:
    assert not env.failure, env.failure
    outcomes = list(env.pool.map(lambda c: run_call(env.channels[RPCS[c.rpc].target], c, HANG_S), batch))
    problems = [f"{p} <- {o.call.describe()}" for o in outcomes for p in check(o, env.targets.vocab_size)]
    problems += cluster_problems(env.cluster, kv_wait_s=2.0)
    if problems:
        env.failure = "\n".join(["first failing batch:", *problems, "its calls:", *(c.describe() for c in batch)])
    assert not env.failure, env.failure


@settings(FUZZ_SETTINGS, max_examples=60)
@given(data=st.data())
def test_generate_calls_with_random_fields(env, data):
    batch = data.draw(st.lists(calls(env.targets, GENERATE_RPCS, ("structured",)), min_size=1, max_size=4))
    run_batch(env, batch)


@settings(FUZZ_SETTINGS, max_examples=150)
@given(data=st.data())
def test_damaged_and_random_bytes_on_every_rpc(env, data):
    batch = data.draw(st.lists(calls(env.targets, tuple(RPCS), ("mutated", "raw")), min_size=1, max_size=4))
    run_batch(env, batch)


def test_concurrent_requests_with_one_id_do_not_disturb_each_other(env):
    """Two requests sent at once with the same request id: each is served or refused
    (INVALID_ARGUMENT "already running"), at least one is served, and a served stream
    carries its own tokens only, and the refused one does not abort the served one."""
    assert not env.failure, env.failure
    long = common_pb2.GenerateRequest(request_id="same-id", prompt_token_ids=common_pb2.TokenIds(token_ids=[5, 6, 7]),
                                      sampling_params=common_pb2.SamplingParams(max_tokens=40, ignore_eos=True))
    short = common_pb2.GenerateRequest(request_id="same-id", prompt_token_ids=common_pb2.TokenIds(token_ids=[9]),
                                       sampling_params=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True))
    remote = [decode_pb2.PrefillCandidate(address=env.targets.prefill_address)]
    wraps = {"router.Generate": lambda r: r,
             "decode.Generate": lambda r: decode_pb2.DecodeGenerateRequest(request=r, prefill_candidates=remote),
             "prefill.Prefill": lambda r: prefill_pb2.PrefillMessage(request=prefill_pb2.PrefillRequest(request=r))}
    for rpc, wrap in wraps.items():
        for _ in range(3):
            pair = [FuzzCall(rpc, wrap(r).SerializeToString(), None, None, "structured") for r in (long, short)]
            outcomes = list(env.pool.map(lambda c: run_call(env.channels[RPCS[rpc].target], c, HANG_S), pair))
            codes = [(o.code, o.details) for o in outcomes]
            assert all(o.code in ("OK", "INVALID_ARGUMENT") for o in outcomes), (rpc, codes)
            assert any(o.code == "OK" for o in outcomes), (rpc, codes)
            assert not [p for o in outcomes for p in check(o, env.targets.vocab_size)], rpc
            assert not cluster_problems(env.cluster, kv_wait_s=2.0)


def test_cluster_survives_the_fuzzing(env):
    assert not env.failure, env.failure
    assert not cluster_problems(env.cluster, kv_wait_s=2.0)
