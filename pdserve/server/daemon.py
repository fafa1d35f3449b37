"""Process lifecycle shared by the three daemons.

1. `apply_process_settings`: torch threads and CPU affinity, before any model work.
2. `start_server`: grpc.aio server on --listen with the standard health service
   and reflection; prints one JSON ready line with the bound address.
3. `run_until_signal`: serve until SIGTERM/SIGINT, then mark NOT_SERVING, run the
   drain hooks (tell the router), stop taking new calls and give running ones the
   grace period; shortly before it ends, the grace-end hooks end what still runs with a
   status of their choosing (decode: UNAVAILABLE, and the router moves the request).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.allocator import tune_malloc
from pdserve.observability import tracing
from pdserve.observability.metrics import Metrics
from pdserve.server.malformed import MalformedRequestInterceptor
from pdserve.server.tls import TlsFiles

log = logging.getLogger("pdserve")

_PR_SET_PDEATHSIG = 1  # from linux/prctl.h

# KV chunks are at most a few MiB; requests may carry long prompts.
MAX_MESSAGE_BYTES = 64 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
# The server accepts smaller requests than channels carry: a 10 MB prompt is refused
# by gRPC itself with RESOURCE_EXHAUSTED before any handler sees it.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 2**20),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]

# A launcher (LocalCluster) puts its pid here, for the daemon to end with it (die_with_parent).
PARENT_PID_ENV = "PDSERVE_PARENT_PID"


def setup_logging(role: str) -> None:
    faulthandler.enable()  # a fatal signal (SIGSEGV, SIGABRT, ...) leaves every thread's Python stack on stderr
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpc._cython.cygrpc").addFilter(_call_already_ended)


def _call_already_ended(record: logging.LogRecord) -> bool:
    """grpc.aio logs an ERROR with a traceback when a handler writes to, or ends, a call whose client
    has already left (cancelled, or past its deadline): for a server that is a normal end of a
    request, so it is kept only at DEBUG, as one line."""
    if not record.getMessage().startswith("ExecuteBatchError raised in core"):
        return True
    record.levelno, record.levelname, record.exc_info, record.exc_text = logging.DEBUG, "DEBUG", None, None
    return log.isEnabledFor(logging.DEBUG)


def log_request(**fields) -> None:
    """One structured line per finished request."""
    log.info("request %s", json.dumps(fields, separators=(",", ":"), default=str))


def apply_process_settings(threads: int | None, cpus: str | None) -> None:
    if cpus:
        os.sched_setaffinity(0, parse_cpus(cpus))
    if threads:
        import torch

        torch.set_num_threads(threads)


def parse_cpus(spec: str) -> set[int]:
    """'0,2-3' -> {0, 2, 3}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


# This process's TLS (None: plain text), set once at start-up by `configure_tls`.
_tls: TlsFiles | None = None


def configure_tls(tls: TlsFiles | None) -> None:
    global _tls
    _tls = tls


def channel(address: str) -> grpc.aio.Channel:
    """A channel to another daemon: TLS (with this daemon's certificate) when the process has TLS."""
    if _tls is not None:
        return grpc.aio.secure_channel(address, _tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


StubT = TypeVar("StubT")


class Stubs(Generic[StubT]):
    """Stubs to peer daemons, one per address over its own channel, made on first use and kept."""

    def __init__(self, make: Callable[[grpc.aio.Channel], StubT]) -> None:
        self._make = make
        self._stubs: dict[str, StubT] = {}

    def __call__(self, address: str) -> StubT:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = self._make(channel(address))
        return stub


class Daemon:
    """A grpc.aio server with health and reflection, and its graceful stop."""

    def __init__(self, role: str, listen: str, grace_s: float = 30.0, metrics: Metrics | None = None,
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> None:
        self.role = role
        self.metrics = metrics
        self.listen = listen
        self.grace_s = grace_s
        self.server = grpc.aio.server(options=SERVER_OPTIONS,
                                      interceptors=[*interceptors, MalformedRequestInterceptor()])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.address = ""
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self._on_drain: list[Callable[[], Awaitable[None]]] = []
        self._on_grace_end: list[Callable[[], object]] = []

    def on_drain(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run fn when a stop begins (before the grace period), e.g. to tell the router."""
        self._on_drain.append(fn)

    def on_grace_end(self, fn: Callable[[], object]) -> None:
        """Run fn shortly before the grace period ends, while calls can still end with a status."""
        self._on_grace_end.append(fn)

    async def start(self, service_names: Iterable[str], ready: dict | None = None) -> str:
        """Serve; print the JSON ready line (with `ready`'s fields added) and return the address."""
        names = list(service_names)
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        host = self.listen.rsplit(":", 1)[0]
        if _tls is not None:
            port = self.server.add_secure_port(self.listen, _tls.server_credentials())
        else:
            port = self.server.add_insecure_port(self.listen)
            if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
                log.warning("%s listens on %s without TLS: anyone who can reach it can use it "
                            "(--tls-cert/--tls-key/--tls-ca)", self.role, self.listen)
        if port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        self.address = f"{host}:{port}"
        await self.server.start()
        for name in ["", *names]:
            await self._set_health(name, health_pb2.HealthCheckResponse.SERVING)
        line = {"ready": True, "role": self.role, "address": self.address, "pid": os.getpid(), **(ready or {})}
        if self.metrics is not None and self.metrics.port is not None:
            line["metrics_port"] = self.metrics.port
        print(json.dumps(line), flush=True)
        log.info("%s serving on %s", self.role, self.address)
        return self.address

    async def _set_health(self, name: str, status) -> None:
        await self.health.set(name, status)

    def fail(self, reason: str) -> None:
        """Stop because this daemon cannot serve any more (e.g. its engine died): NOT_SERVING at once,
        the router told, then exit with status 1 so that a supervisor starts a fresh one."""
        log.critical("%s cannot serve: %s; stopping", self.role, reason)
        self.exit_code = 1
        self.stopping.set()

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        started = time.monotonic()
        log.info("%s draining (grace %.0f s)", self.role, self.grace_s)
        await self._set_health("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for fn in self._on_drain:
            try:
                await asyncio.wait_for(fn(), timeout=2.0)
            except Exception:  # the router may be gone; draining goes on
                log.warning("drain hook failed", exc_info=True)
        stop = asyncio.ensure_future(self.server.stop(self.grace_s))
        # What still runs just before the grace period ends is ended with a status (e.g. UNAVAILABLE,
        # so the router moves it), not cut off when the server cancels the remaining calls.
        done, _ = await asyncio.wait({stop}, timeout=self.grace_s - min(1.0, self.grace_s / 2))
        if not done:
            for fn in self._on_grace_end:
                fn()
        await stop
        if self.metrics is not None:
            self.metrics.shutdown()
        tracing.shutdown_tracing()  # flushes the exporters
        log.info("%s stopped after %.1f s", self.role, time.monotonic() - started)


def die_with_parent() -> None:
    """SIGTERM this daemon when the launcher named in PDSERVE_PARENT_PID ends (Linux; LocalCluster sets it).

    Set here rather than in a preexec_fn: code that runs between fork and exec in a launcher
    with threads (pytest, the benchmarks) can deadlock or abort there, e.g. in the dlopen a
    ctypes call makes while a thread the fork did not copy held the loader's lock.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it ended before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def run(main: Callable[[], Awaitable[int | None]]) -> None:
    """Run a daemon's async main on uvloop (asyncio where uvloop is missing), malloc tuned; a non-zero
    result is the process's exit status."""
    die_with_parent()
    tune_malloc()
    try:
        import uvloop
    except ImportError:
        code = asyncio.run(main())
    else:
        code = uvloop.run(main())
    if code:
        sys.exit(code)
