"""Soak: a local cluster under steady load for a long time; does memory grow, do KV blocks leak?

Usage: python bench/soak.py [--minutes 30] [--load 0.8] [--model PATH] [--dtype DTYPE]
                            [--prefill N] [--decode M] [--plot soak.png] [--capacity REQ_PER_S]
                            [--compile-max-batch N]

Starts a LocalCluster (router + N prefill + M decode workers, default 1 + 1 on SmolLM2) with
its logs in a temporary file named on stderr, then:
  1. capacity: a closed loop of --probe-concurrency clients (default 8) sends --probe-requests
     (default 24) requests of the mix below without the aborted kinds; its completed requests
     per second is the capacity (--capacity skips the probe);
  2. load: for --minutes, Poisson arrivals at --load x capacity of a mix of requests, random
     token ids, greedy, exactly max_tokens (ignore_eos):
       short     45%  16-128 prompt tokens, 16-128 output tokens
       long      15%  384-768 prompt tokens, 8-32 output tokens
       shared    20%  one of 4 fixed 256-token prefixes + 16-64 random tokens, 16-64 output
                      (prefix-cache hits, so cached blocks are soaked too)
       cancel    10%  128 output tokens asked, the client leaves the stream after 1-8
       deadline  10%  64-512 prompt tokens, 256 output tokens, a 0.3-3 s gRPC deadline
     The aborted kinds do less work than asked, so the real load is a bit under --load.
  3. drain: the runner waits for what is in flight (at most --drain-s), then every worker's
     KV is polled until it holds no block (at most 30 s).
Every --interval-s (default: the run / 300, at least 1 s), for the whole run: each daemon's
VmRSS from /proc/PID/status and each worker's KV blocks in use (its Stats rpc).

Figures (stderr: one line per daemon; stdout: one JSON line)
- warm-up: the first 20% of the load phase (allocator pools, torch caches, prefix caches
  filling); not judged. A --minutes 1 run checks the script, not the memory: 12 s of
  warm-up is too short for the daemons' RSS to settle.
- rss_start_mib / rss_end_mib: mean VmRSS over the first 10% of the load phase after the
  warm-up, and over its last 10%; rss_window_growth = end / start - 1.
- rss_growth (judged): from the end of the warm-up to the end of the load, the rise of the
  highest VmRSS of its second half over the highest of its first half, twice (the two halves
  are half the span apart), relative to the first: the growth over the span. glibc gives
  freed heap back in steps of up to its trim threshold (256 MiB here), so RSS is a sawtooth
  of a few percent (a tooth took ~400 s in a 30-minute SmolLM2 run) and two windows can fall
  on a foot and a top; peaks compare top with top. The drain is not included.
- max_kv_used: the most KV blocks in use at one sample (workers only; a prefill worker holds
  blocks only while it prefills and streams, so the samples rarely catch them).
- leaked_blocks: a worker's num_used once no request is left (should be 0).
- requests: {"ok": completed (a client-cancelled stream counts as ok), "failed": {status: n}};
  unexpected_failures: failures other than DEADLINE_EXCEEDED on the deadline kind.
- alive: the daemon still ran at the last sample.
- pass: every daemon alive with rss_growth < 5%, no leaked block, no unexpected failure, some ok.
The PNG (--plot) has two panels over time: RSS MiB per daemon (rss_growth in the legend),
and KV blocks used per worker; the warm-up is shaded, the end of the load is a dashed line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import pathlib
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pdserve.errors
from pdserve.client import AsyncClient
from pdserve.cluster import Child, ClusterSpec, LocalCluster
from pdserve.loadgen.arrivals import Arrivals
from pdserve.loadgen.backend import BenchRequest
from pdserve.loadgen.backends import PdserveBackend
from pdserve.loadgen.runner import run
from pdserve.loadgen.stats import RequestRecord, Slo, summarize
from pdserve.loadgen.workloads import DEFAULT_TOKEN_RANGE

WARMUP_FRACTION = 0.2
WINDOW_FRACTION = 0.1
RSS_GROWTH_LIMIT = 0.05
# kind: (share, prompt tokens, output tokens)
MIX = {"short": (0.45, (16, 128), (16, 128)), "long": (0.15, (384, 768), (8, 32)),
       "shared": (0.20, (16, 64), (16, 64)), "cancel": (0.10, (16, 128), (128, 128)),
       "deadline": (0.10, (64, 512), (256, 256))}
ABORTED_KINDS = ("cancel", "deadline")  # not in the capacity probe: they do less work than they ask
SHARED_PREFIX_LEN = 256


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_mix(n: int, seed: int, token_range: tuple[int, int], kinds: Sequence[str] = tuple(MIX)) -> list[BenchRequest]:
    """n requests of the mix (restricted to `kinds`, shares renormalized), reproducible from seed."""
    rng = random.Random(seed)
    lo, hi = token_range
    prefixes = [[rng.randrange(lo, hi) for _ in range(SHARED_PREFIX_LEN)] for _ in range(4)]
    weights = [MIX[k][0] for k in kinds]
    requests = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        _, (plo, phi), (olo, ohi) = MIX[kind]
        prompt = [rng.randrange(lo, hi) for _ in range(rng.randint(plo, phi))]
        if kind == "shared":
            prompt = rng.choice(prefixes) + prompt
        extra = {"cancel_after": rng.randint(1, 8)} if kind == "cancel" else \
            {"timeout_s": rng.uniform(0.3, 3.0)} if kind == "deadline" else {}
        requests.append(BenchRequest(i, rng.randint(olo, ohi), prompt_token_ids=tuple(prompt), kind=kind,
                                     extra=extra))
    return requests


class SoakBackend(PdserveBackend):
    """PdserveBackend that honours request.extra: leave after `cancel_after` tokens, `timeout_s` deadline."""

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        assert self._client is not None, "start() first"
        cancel_after = request.extra.get("cancel_after")
        received = 0
        async with self._client.generate(
                prompt_token_ids=request.prompt_token_ids, max_tokens=request.max_tokens, temperature=0.0,
                ignore_eos=request.ignore_eos, timeout=request.extra.get("timeout_s", self.timeout_s)) as deltas:
            async for delta in deltas:
                received += len(delta.token_ids)
                yield len(delta.token_ids)
                if cancel_after is not None and received >= cancel_after:
                    return  # leaving the `async with` cancels the call


def status_of(record: RequestRecord) -> str:
    """OK, the gRPC status name of the pdserve error the client raised, or the runner's own reason."""
    if record.ok:
        return "OK"
    error = record.error or "no output"
    cls = getattr(pdserve.errors, error.split(":", 1)[0], None)
    if isinstance(cls, type) and issubclass(cls, pdserve.errors.PdserveError):
        return cls.code
    return "TIME_LIMIT" if "time limit" in error else error.split(":", 1)[0]


def expected(record: RequestRecord) -> bool:
    return record.ok or (record.kind == "deadline" and status_of(record) == "DEADLINE_EXCEEDED")


def rss_mib(pid: int) -> float | None:
    """VmRSS of a live process in MiB (None once it is gone)."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def window_means(times: Sequence[float], values: Sequence[float], load_s: float) -> tuple[float, float]:
    """Mean over the first window after the warm-up and over the last window of [0, load_s]."""
    warm, width = WARMUP_FRACTION * load_s, WINDOW_FRACTION * load_s
    points = [(t, v) for t, v in zip(times, values) if v is not None and t <= load_s]
    after = [p for p in points if p[0] >= warm]
    if not after:
        raise ValueError("no sample after the warm-up: --interval-s is too long for --minutes")
    first = [v for t, v in after if t <= warm + width] or [after[0][1]]
    last = [v for t, v in after if t >= load_s - width] or [after[-1][1]]
    return sum(first) / len(first), sum(last) / len(last)


def peaks(times: Sequence[float], values: Sequence[float], load_s: float) -> tuple[float, float]:
    """The highest sample in the first and in the second half of [end of warm-up, load_s].

    The allocator gives freed heap back in steps (glibc trims past the M_TRIM_THRESHOLD set in
    pdserve/allocator.py), so RSS is a sawtooth and two short windows can fall on a tooth's foot
    and on its top; peaks compare top with top. Each half must be longer than a tooth."""
    warm = WARMUP_FRACTION * load_s
    middle = (warm + load_s) / 2
    first = [v for t, v in zip(times, values) if v is not None and warm <= t < middle]
    second = [v for t, v in zip(times, values) if v is not None and middle <= t <= load_s]
    if not (first and second):  # e.g. the daemon died: only the windows
        return window_means(times, values, load_s)
    return max(first), max(second)


@dataclass
class Samples:
    times: list[float] = field(default_factory=list)
    rss: dict[str, list[float | None]] = field(default_factory=dict)  # daemon -> MiB per sample
    kv_used: dict[str, list[int | None]] = field(default_factory=dict)  # worker -> blocks per sample


def daemon_names(cluster: LocalCluster) -> dict[str, Child]:
    """{"router": Child, "prefill0": Child, "decode0": Child, ...}."""
    names: dict[str, Child] = {"router": cluster.router}
    counts: Counter[str] = Counter()
    for w in cluster.workers:
        names[f"{w.role}{counts[w.role]}"] = w
        counts[w.role] += 1
    return names


async def kv_used_now(clients: dict[str, AsyncClient]) -> dict[str, int | None]:
    async def one(client: AsyncClient) -> int | None:
        try:
            return (await client.stats(timeout=5)).load.kv.num_used
        except pdserve.errors.PdserveError:
            return None
    values = await asyncio.gather(*(one(c) for c in clients.values()))
    return dict(zip(clients, values))


async def sample_until(stop: asyncio.Event, daemons: dict[str, Child], clients: dict[str, AsyncClient],
                       samples: Samples, t0: float, interval_s: float) -> None:
    while True:  # one last sample once stopped: the drained state
        stopped = stop.is_set()
        samples.times.append(time.perf_counter() - t0)
        for name, child in daemons.items():
            samples.rss.setdefault(name, []).append(rss_mib(child.process.pid))
        for name, used in (await kv_used_now(clients)).items():
            samples.kv_used.setdefault(name, []).append(used)
        if stopped:
            return
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


async def wait_drained(clients: dict[str, AsyncClient], timeout_s: float) -> dict[str, int | None]:
    """Each worker's blocks in use, once all are 0 or timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    used = await kv_used_now(clients)
    while any(u != 0 for u in used.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        used = await kv_used_now(clients)
    return used


@dataclass
class SoakRun:
    capacity: float  # req/s, probed or given
    rate: float  # req/s of the load
    load_s: float
    records: list[RequestRecord]
    samples: Samples
    leaked: dict[str, int | None]  # worker -> num_used after the drain (None: no answer)


async def probe_capacity(backend: SoakBackend, args: argparse.Namespace, token_range: tuple[int, int]) -> float:
    """Completed req/s of a closed loop over the mix without the aborted kinds (warm-up requests first)."""
    probe = build_mix(args.probe_requests, args.seed + 2, token_range, [k for k in MIX if k not in ABORTED_KINDS])
    log(f"capacity probe: {len(probe)} requests, closed loop at concurrency {args.probe_concurrency}")
    records = await run(backend, probe, Arrivals(concurrency=args.probe_concurrency), progress=False,
                        warmup=build_mix(4, args.seed + 1, token_range, ("short",)), time_limit_s=600)
    return summarize(records, Slo())["request_throughput"]


async def soak(cluster: LocalCluster, args: argparse.Namespace, token_range: tuple[int, int]) -> SoakRun:
    backend = SoakBackend(cluster.address)
    await backend.start()
    daemons = daemon_names(cluster)
    clients = {name: AsyncClient(c.address, service=c.role) for name, c in daemons.items() if name != "router"}
    try:
        capacity = args.capacity or await probe_capacity(backend, args, token_range)
        rate, load_s = args.load * capacity, args.minutes * 60
        if not rate > 0:
            raise SystemExit("soak: the capacity probe completed no request")
        arrivals = Arrivals(rate=rate, seed=args.seed)
        num = sum(1 for t in arrivals.offsets(math.ceil(rate * load_s * 2) + 10) if t < load_s)
        log(f"capacity {capacity:.3f} req/s; load: {num} requests, Poisson at {rate:.3f} req/s for {load_s:.0f} s")
        samples, stop, t0 = Samples(), asyncio.Event(), time.perf_counter()
        interval = args.interval_s or max(1.0, load_s / 300)
        sampler = asyncio.create_task(sample_until(stop, daemons, clients, samples, t0, interval))
        records = await run(backend, build_mix(num, args.seed, token_range), arrivals, progress=False,
                            time_limit_s=load_s + args.drain_s)
        log(f"load done after {time.perf_counter() - t0:.0f} s; waiting for every worker's KV to drain")
        leaked = await wait_drained(clients, 30.0)
        stop.set()
        await sampler
        return SoakRun(capacity, rate, load_s, records, samples, leaked)
    finally:
        await backend.close()
        for c in clients.values():
            await c.close()


def summary(r: SoakRun) -> dict:
    daemons = {}
    for name, rss in r.samples.rss.items():
        start, end = window_means(r.samples.times, rss, r.load_s)
        peak_start, peak_end = peaks(r.samples.times, rss, r.load_s)
        # The halves' peaks are half the judged span apart: their rise, over the whole span.
        d = {"rss_start_mib": round(start, 1), "rss_end_mib": round(end, 1),
             "rss_window_growth": round(end / start - 1, 4),
             "rss_growth": round(2 * (peak_end - peak_start) / peak_start, 4),
             "alive": rss[-1] is not None}
        if name in r.samples.kv_used:
            d["max_kv_used"] = max((u for u in r.samples.kv_used[name] if u is not None), default=None)
            d["leaked_blocks"] = r.leaked.get(name)
        daemons[name] = d
    statuses = Counter(status_of(x) for x in r.records)
    num_ok = statuses.pop("OK", 0)
    unexpected = sum(1 for x in r.records if not expected(x))
    ok = (all(d["rss_growth"] < RSS_GROWTH_LIMIT and d["alive"] and d.get("leaked_blocks", 0) == 0
              for d in daemons.values()) and unexpected == 0 and num_ok > 0)
    return {"minutes": round(r.load_s / 60, 3), "capacity_rps": round(r.capacity, 3), "rate_rps": round(r.rate, 3),
            "warmup_s": round(WARMUP_FRACTION * r.load_s, 1), "daemons": daemons,
            "requests": {"ok": num_ok, "failed": dict(statuses),
                         "by_kind": dict(Counter(x.kind for x in r.records))},
            "unexpected_failures": unexpected, "pass": ok}


def plot(path: str, samples: Samples, load_s: float, daemons: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7))
    colors = {name: f"C{i}" for i, name in enumerate(samples.rss)}  # one color per daemon in both panels
    for name, rss in samples.rss.items():
        top.plot(samples.times, rss, color=colors[name], label=f"{name} ({daemons[name]['rss_growth']:+.1%})")
    for name, used in samples.kv_used.items():
        bottom.plot(samples.times, used, color=colors[name], label=name)
    for ax, ylabel in ((top, "RSS (MiB)"), (bottom, "KV blocks used")):
        ax.axvspan(0, WARMUP_FRACTION * load_s, color="0.9", label="warm-up")
        ax.axvline(load_s, color="0.4", linestyle="--", label="load ends")
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    bottom.set_xlabel("seconds since the load started")
    top.set_title("pdserve soak: daemon memory and KV blocks in use")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def token_range_for(model: str | None) -> tuple[int, int]:
    """Ordinary token ids of the model: DEFAULT_TOKEN_RANGE, narrowed to a small vocabulary (tiny models)."""
    config = pathlib.Path(model or "", "config.json")
    if model is None or not config.is_file():
        return DEFAULT_TOKEN_RANGE
    vocab = json.loads(config.read_text())["vocab_size"]
    return min(DEFAULT_TOKEN_RANGE[0], vocab // 8), min(DEFAULT_TOKEN_RANGE[1], vocab)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load phase (fractions allowed)")
    p.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the measured capacity")
    p.add_argument("--model", default=None, help="model dir or GGUF (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--compile-max-batch", type=int, default=0,
                   help="decode workers run compiled decode steps up to this batch (engine/compiled_decode.py)")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="per worker (default: LocalCluster's split)")
    p.add_argument("--capacity", type=float, default=None, help="req/s; skips the capacity probe")
    p.add_argument("--probe-concurrency", type=int, default=8)
    p.add_argument("--probe-requests", type=int, default=24)
    p.add_argument("--interval-s", type=float, default=None, help="sampling period")
    p.add_argument("--drain-s", type=float, default=120.0, help="after the load, cancel what is still running")
    p.add_argument("--plot", default="soak.png")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.minutes > 0 and args.load > 0 and args.decode >= 1 and args.prefill >= 0):
        p.error("--minutes and --load must be > 0, --decode >= 1, --prefill >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = tempfile.NamedTemporaryFile("w", prefix="soak-", suffix=".log", delete=False).name
    log(f"daemons' logs: {logs}")
    spec = ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, model=args.model, dtype=args.dtype,
                       kv_cache_gib=args.kv_cache_gib, log_path=logs, compile_max_batch=args.compile_max_batch)
    with LocalCluster(spec) as cluster:
        soaked = asyncio.run(soak(cluster, args, token_range_for(args.model)))
    result = summary(soaked)
    for name, d in result["daemons"].items():
        kv = f"; KV max {d['max_kv_used']} blocks, leaked {d['leaked_blocks']}" if "leaked_blocks" in d else ""
        log(f"{name}: RSS {d['rss_start_mib']:.1f} -> {d['rss_end_mib']:.1f} MiB ({d['rss_growth']:+.2%}){kv}")
    plot(args.plot, soaked.samples, soaked.load_s, result["daemons"])
    log(f"wrote {args.plot}")
    print(json.dumps(result), flush=True)
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
