"""A restarted prefill or decode worker rejoins without any other restart; a client deadline frees every block."""

from __future__ import annotations

import subprocess
import time

import pytest

from pdserve.client import Client
from pdserve.cluster import Child, ClusterSpec, LocalCluster
from pdserve.errors import DeadlineError
from tests.cluster_helpers import wait_kv_free

LONG_PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3)
    with LocalCluster(spec) as c:
        yield c


@pytest.mark.parametrize("role,same_address", [("prefill", False), ("decode", True)])
def test_a_worker_killed_and_started_again_gets_work_without_other_restarts(cluster, role, same_address):
    old = next(w for w in cluster.workers if w.role == role)
    with Client(cluster.address) as client:
        assert client.complete(prompt_token_ids=LONG_PROMPT, max_tokens=2, temperature=0.0).prefill_mode == "remote"
        old_id = next(w.worker_id for w in client.cluster_status() if w.address == old.address)
        old.process.kill()
        old.process.wait()
        # A new process with the same flags, as a supervisor would start it: on the same address, or
        # on a new one (port 0).
        args = list(old.args)
        if same_address:
            args[args.index("--listen") + 1] = old.address
        new = Child(role, args)
        new.start(subprocess.DEVNULL)
        try:
            new.wait_ready(60)
            assert (new.address == old.address) == same_address
            deadline = time.monotonic() + 10
            while True:  # registered and healthy within a few heartbeats
                status = client.cluster_status()
                joined = [w.worker_id for w in status
                          if w.address == new.address and w.health == "healthy" and w.worker_id != old_id]
                if joined:
                    break
                assert time.monotonic() < deadline, f"the restarted {role} worker did not rejoin"
                time.sleep(0.1)
            for _ in range(3):  # gets work again: remote prefill, on the new worker
                result = client.complete(prompt_token_ids=LONG_PROMPT, max_tokens=2, temperature=0.0)
                assert result.prefill_mode == "remote"
                assert joined[0] in (result.prefill_worker_id, result.decode_worker_id)
        finally:
            cluster.workers[cluster.workers.index(old)] = new  # stopped with the cluster


def test_a_200_ms_deadline_aborts_everywhere_and_frees_the_blocks(cluster):
    with Client(cluster.address) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineError):
            client.complete(prompt_token_ids=LONG_PROMPT, max_tokens=900, temperature=0.0, ignore_eos=True,
                            timeout=0.2)
        assert time.monotonic() - started < 2.0
    for w in cluster.workers:
        assert wait_kv_free(w.address, w.role, timeout=2.0) == 0, f"{w.role} still holds blocks"
