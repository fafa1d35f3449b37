"""Helpers for end-to-end tests: real daemon processes on 127.0.0.1, free ports."""

from __future__ import annotations

import os
import time

from pdserve.client import Client
from pdserve.cluster import Child

E2E_LOG = os.environ.get("PDSERVE_TEST_LOG")  # set to a path to keep the daemons' logs


def start_worker(role: str, model: str, *extra: str, env: dict[str, str] | None = None,
                 dtype: str = "float32") -> Child:
    """A standalone worker (no router), ready to serve."""
    child = Child(role, ["--model", model, "--dtype", dtype, "--kv-cache-gib", "0.05", "--threads", "1",
                         "--grace-s", "2", *extra], dict(os.environ, **env) if env else None)
    log = open(E2E_LOG, "a") if E2E_LOG else None
    child.start(log if log else open(os.devnull, "w"))
    child.wait_ready(120)
    return child


def kv_used(address: str, service: str) -> int:
    with Client(address, service=service, timeout=10) as client:
        return client.stats().load.kv.num_used


def wait_kv_free(address: str, service: str, timeout: float = 1.0) -> int:
    """Blocks in use at the worker after waiting up to `timeout` for them to drop to 0."""
    deadline = time.monotonic() + timeout
    used = kv_used(address, service)
    while used and time.monotonic() < deadline:
        time.sleep(0.05)
        used = kv_used(address, service)
    return used
