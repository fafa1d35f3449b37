"""A local cluster: a router and N prefill + M decode workers as child processes.

Used by `pdserve up`, `make run`, the benchmarks and the end-to-end tests.
1. the router starts first; each worker gets --router, its own --cpus, --threads
   and --kv-cache-gib (the cores and memory split between the workers);
2. every child prints a JSON ready line with its bound address (port 0 picks a free
   one); the cluster waits for all of them and for every worker to be registered
   and healthy at the router;
3. children die with the parent (they set PR_SET_PDEATHSIG themselves, told its pid in
   PDSERVE_PARENT_PID: server/daemon.py), and stop() sends SIGTERM, then SIGKILL after a
   grace period: no orphans.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from pdserve.errors import FatalError

def file_tail(file, chars: int = 4000) -> str:
    """The last chars bytes of an open file (a daemon's stderr), whatever its position."""
    fd = file.fileno()
    return os.pread(fd, chars, max(0, os.fstat(fd).st_size - chars)).decode(errors="replace")


@dataclass
class Child:
    role: str
    args: list[str]
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None
    address: str = ""
    ready: dict = field(default_factory=dict)  # the child's JSON ready line
    log_lines: list[str] = field(default_factory=list)

    def start(self, log_file) -> None:
        from pdserve.server.daemon import PARENT_PID_ENV  # the child ends with this process

        cmd = [sys.executable, "-m", f"pdserve.server.{self.role}", *self.args]
        env = {**(self.env if self.env is not None else os.environ), PARENT_PID_ENV: str(os.getpid())}
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env)

    def wait_ready(self, timeout: float) -> str:
        """Read stdout until the ready line; the address it names."""
        assert self.process is not None and self.process.stdout is not None
        result: dict = {}

        def read() -> None:
            for line in self.process.stdout:
                self.log_lines.append(line)
                if line.startswith("{") and '"ready"' in line:
                    result.update(json.loads(line))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not result:
            code = self.process.poll()
            raise FatalError(f"{self.role} exited with code {code} before it was ready" if code is not None
                             else f"{self.role} did not become ready within {timeout:.0f} s")
        self.address = result["address"]
        self.ready = result
        return self.address

    @property
    def metrics_port(self) -> int | None:
        return self.ready.get("metrics_port")

    def metric_sum(self, name: str) -> float:
        """The sum over all label sets of one Prometheus series on the child's /metrics (--metrics-port)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M))

    def stop(self, grace_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class ClusterSpec:
    num_prefill: int = 1
    num_decode: int = 1
    model: str | None = None
    dtype: str | None = None
    quantization: str | None = None  # "int4" | "int8": every worker's weight-only quantization
    compile_max_batch: int = 0  # decode workers' EngineConfig.compile_max_batch (0: eager)
    device: str = "cpu"
    router_listen: str = "127.0.0.1:0"
    http_port: int | None = None  # the router's OpenAI-compatible HTTP API (0: any free port)
    api_keys: tuple[str, ...] = ()  # the router requires one of these from clients
    tls: bool = False  # a throwaway CA and certificate: mutual TLS on every connection
    kv_cache_gib: float | None = None  # per worker; None: split a share of free memory
    heartbeat_s: float = 1.0
    # Extra flags per role ("prefill", "decode", "router"), e.g. {"decode": ["--kv-stall-timeout-s", "2"]}.
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    # Extra environment per worker index (prefill first), e.g. fault injection.
    worker_env: dict[int, dict[str, str]] = field(default_factory=dict)
    # Extra flags per worker index (prefill first), e.g. {1: ["--version", "v2"]}.
    worker_args: dict[int, list[str]] = field(default_factory=dict)
    log_path: str | None = None


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.router: Child | None = None
        self.workers: list[Child] = []
        self._log = None
        self._pki_dir: tempfile.TemporaryDirectory | None = None
        self.tls = None  # TlsFiles when spec.tls

    @property
    def api_key(self) -> str | None:
        """A key clients of this cluster can use (None: the router checks none)."""
        return self.spec.api_keys[0] if self.spec.api_keys else None

    @property
    def address(self) -> str:
        assert self.router is not None
        return self.router.address

    def start(self, timeout: float = 180.0) -> LocalCluster:
        spec = self.spec
        # Without a log path the daemons' stderr still goes somewhere readable: a worker that
        # dies says why in the error or in the warning stop() prints.
        self._log = open(spec.log_path, "a+") if spec.log_path else tempfile.TemporaryFile("a+")
        if spec.tls:
            from pdserve.server.tls import make_local_pki

            self._pki_dir = tempfile.TemporaryDirectory(prefix="pdserve-pki-")
            self.tls = make_local_pki(self._pki_dir.name)
        try:
            self.router = Child("router", [*self._tls_args(), "--listen", spec.router_listen,
                                           "--heartbeat-s", str(spec.heartbeat_s),
                                           "--grace-s", "5", *spec.extra_args.get("router", []),
                                           *(["--http-port", str(spec.http_port)] if spec.http_port is not None else []),
                                           *(a for key in spec.api_keys for a in ("--api-key", key))])
            self.router.start(self._log)
            self.router.wait_ready(30)
            roles = ["prefill"] * spec.num_prefill + ["decode"] * spec.num_decode
            for i, role in enumerate(roles):
                self.workers.append(self._worker(i, role, len(roles)))
                self.workers[-1].start(self._log)
            for w in self.workers:
                w.wait_ready(timeout)
            self.wait_registered(len(self.workers), timeout=30)
        except FatalError as exc:
            tail = self.log_tail()
            self.stop()
            raise FatalError(f"{exc}; the daemons' stderr ends with:\n{tail}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 4000) -> str:
        """The end of what the daemons wrote to stderr."""
        return file_tail(self._log, chars) if self._log is not None else ""

    def _worker(self, index: int, role: str, num_workers: int) -> Child:
        spec = self.spec
        mine = _cpus_for(index, num_workers)
        threads = len(mine)
        args = [*self._tls_args(), "--router", self.address, "--listen", "127.0.0.1:0",
                "--cpus", ",".join(map(str, mine)),
                "--threads", str(threads), "--kv-cache-gib", str(self._kv_gib(num_workers)),
                "--heartbeat-s", str(spec.heartbeat_s), "--device", spec.device, "--grace-s", "5"]
        if spec.model:
            args += ["--model", spec.model]
        if spec.dtype:
            args += ["--dtype", spec.dtype]
        if spec.quantization:
            args += ["--quantization", spec.quantization]
        if spec.compile_max_batch and role == "decode":
            args += ["--compile-max-batch", str(spec.compile_max_batch)]
        args += spec.extra_args.get(role, []) + spec.worker_args.get(index, [])
        env = dict(os.environ, **spec.worker_env[index]) if index in spec.worker_env else None
        return Child(role, args, env)

    def _tls_args(self) -> list[str]:
        t = self.tls
        return ["--tls-cert", t.cert, "--tls-key", t.key, "--tls-ca", t.ca] if t is not None else []

    @property
    def credentials(self):
        """What a client of this cluster connects with: None (plain text) or its mutual-TLS credentials."""
        return self.tls.channel_credentials() if self.tls is not None else None

    def _kv_gib(self, num_workers: int) -> float:
        if self.spec.kv_cache_gib is not None:
            return self.spec.kv_cache_gib
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        return round(max(0.1, min(2.0, available * 0.3 / num_workers)), 2)

    def wait_registered(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` workers are registered and healthy at the router."""
        from pdserve.client import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, api_key=self.api_key, credentials=self.credentials) as client:
            while time.monotonic() < deadline:
                healthy = [w for w in client.cluster_status() if w.health == "healthy"]
                if len(healthy) >= count:
                    return
                time.sleep(0.1)
        raise FatalError(f"fewer than {count} workers registered within {timeout:.0f} s")

    def stop(self, grace_s: float = 10.0) -> None:
        """The workers first, all at once, so that each tells the router it drains; the router last.

        A daemon that ended by itself other than cleanly or by SIGKILL/SIGTERM (a crash, a fatal
        signal, an engine thread that died) gets a warning on stderr with the log's tail.
        """
        crashed = [c for c in ([self.router] if self.router else []) + self.workers
                   if c.process is not None and c.process.poll() not in (None, 0, -signal.SIGKILL, -signal.SIGTERM)]
        if crashed:
            print(f"pdserve LocalCluster: {', '.join(f'{c.role} exited with {c.process.returncode}' for c in crashed)};"
                  f" the daemons' stderr ends with:\n{self.log_tail()}", file=sys.stderr)
        for child in self.workers:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self.workers:
            child.stop(grace_s)
        if self.router is not None:
            self.router.stop(grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._pki_dir is not None:
            self._pki_dir.cleanup()
            self._pki_dir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> dict:
        http = self.router.ready.get("http_port") if self.router else None
        scheme = "https" if self.tls is not None else "http"
        return {"ready": True, "router": self.address, "http": f"{scheme}://127.0.0.1:{http}" if http else None,
                "prefill": [w.address for w in self.workers if w.role == "prefill"],
                "decode": [w.address for w in self.workers if w.role == "decode"],
                "tls": {"ca": self.tls.ca, "cert": self.tls.cert, "key": self.tls.key} if self.tls else None}


def _cpus_for(index: int, num_workers: int) -> list[int]:
    """An equal share of this process's cores; one core each (round robin) when fewer cores than workers.

    Pinning keeps a long prefill from taking cycles from the decode worker's steps.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if num_workers >= len(cpus):
        return [cpus[index % len(cpus)]]
    per = len(cpus) // num_workers
    return cpus[index * per:(index + 1) * per]
