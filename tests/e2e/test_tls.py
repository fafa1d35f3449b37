"""Mutual TLS: `pdserve up --tls` serves; a client without the CA, or a worker of another CA, is refused."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time

import grpc
import pytest

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.errors import PdserveError
from pdserve.server.tls import make_local_pki


@pytest.fixture(scope="module")
def secured(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.5, tls=True, http_port=0)
    with LocalCluster(spec) as cluster:  # started: the workers registered over mutual TLS
        yield cluster


def test_a_tls_cluster_serves_a_request_disaggregated(secured):
    with Client(secured.address, credentials=secured.credentials) as client:
        result = client.complete(prompt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
                                 max_tokens=3, temperature=0.0)
    assert result.finish_reason == "length" and result.prefill_mode == "remote"
    assert secured.describe()["http"].startswith("https://")


def test_clients_without_the_ca_or_without_a_certificate_are_refused(secured, tmp_path):
    other = make_local_pki(tmp_path / "other")
    attempts = {
        "plain text": None,
        "another CA": other.channel_credentials(),
        "right CA, no client certificate": grpc.ssl_channel_credentials(open(secured.tls.ca, "rb").read()),
    }
    for what, credentials in attempts.items():
        with Client(secured.address, credentials=credentials, timeout=5) as client:
            with pytest.raises(PdserveError):
                client.complete(prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0.0)
            print(what, "refused")


def test_a_worker_with_a_certificate_of_another_ca_never_joins(secured, tiny_dir, tmp_path):
    other = make_local_pki(tmp_path / "rogue")
    cmd = [sys.executable, "-m", "pdserve.server.decode", "--router", secured.address, "--model", tiny_dir,
           "--dtype", "float32", "--kv-cache-gib", "0.05", "--listen", "127.0.0.1:0", "--heartbeat-s", "0.3",
           "--tls-cert", other.cert, "--tls-key", other.key, "--tls-ca", other.ca]
    rogue = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in rogue.stderr], daemon=True).start()
    try:
        # Its start-up takes seconds (more on a loaded machine): wait for a refused registration.
        deadline, refused = time.monotonic() + 90, False
        while not refused and time.monotonic() < deadline and rogue.poll() is None:
            with contextlib.suppress(queue.Empty):
                refused = "UNAVAILABLE" in lines.get(timeout=1)
        assert refused, "the rogue worker never reported a failed registration"
        time.sleep(1)  # and a few more attempts (heartbeat 0.3 s)
        with Client(secured.address, credentials=secured.credentials) as client:
            assert len(client.cluster_status()) == 2
    finally:
        rogue.terminate()
        rogue.wait(timeout=20)


def test_the_command_line_clients_speak_mutual_tls(secured):
    t = secured.tls
    tls = ["--tls-ca", t.ca, "--tls-cert", t.cert, "--tls-key", t.key]
    pdserve = [sys.executable, "-m", "pdserve.cli"]
    gen = subprocess.run([*pdserve, "generate", "--router", secured.address, *tls, "--max-tokens", "3",
                          "--temperature", "0", "hello"], capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    top = subprocess.run([*pdserve, "top", "--router", secured.address, "--once", *tls],
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "decode" in top.stdout, top.stderr
    plain = subprocess.run([*pdserve, "top", "--router", secured.address, "--once"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 2  # without the files, the router is unreachable
