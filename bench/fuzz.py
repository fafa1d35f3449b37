"""Long fuzz run against a local cluster: `python bench/fuzz.py --requests 10000`.

Starts a router, a prefill and a decode worker (the tiny random model of the tests by
default, or --model PATH), sends N fuzzed calls (tests/fuzz_strategies.py) with some
concurrency, checks the cluster every --check-every calls, and prints a table of
(rpc, status) counts and one JSON line: crashes, leaked KV blocks and violations (each
with a few example calls) must all be 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from pdserve.cluster import ClusterSpec, LocalCluster  # noqa: E402
from tests.fuzz_strategies import (  # noqa: E402
    RPCS,
    Targets,
    bad_addresses,
    calls,
    channels_for,
    check,
    cluster_problems,
    run_call,
)

MAX_EXAMPLES_PER_KIND = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10000, help="fuzzed calls to send")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", default=None, help="model directory (default: the tests' tiny random llama)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-gib", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed: the same seed, the same calls")
    p.add_argument("--hang-s", type=float, default=60.0, help="default deadline; reaching it is a violation")
    p.add_argument("--check-every", type=int, default=250, help="calls between cluster checks (idle KV)")
    p.add_argument("--unique-ids", action="store_true",
                   help="no two calls share a request id (by default some do, on purpose)")
    p.add_argument("--max-clusters", type=int, default=10, help="stop after this many crashed clusters")
    p.add_argument("--log", default=None, help="append the daemons' logs to this file")
    return p.parse_args(argv)


def vocab_size(model_dir: str) -> int:
    config = pathlib.Path(model_dir) / "config.json"
    return int(json.loads(config.read_text())["vocab_size"]) if config.exists() else 2**32


class Tally:
    """Outcomes, violations and cluster problems, from many threads."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.lock = threading.Lock()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.violations: dict[str, list[str]] = collections.defaultdict(list)
        self.num_violations = 0
        self.cluster: list[str] = []
        self.recent: collections.deque[str] = collections.deque(maxlen=16)
        self.sent = 0
        self.num_rounds = 0

    def add(self, outcome) -> None:
        problems = check(outcome, self.vocab)
        with self.lock:
            self.counts[(outcome.call.rpc, outcome.code)] += 1
            self.recent.append(f"{outcome.code} {outcome.call.describe(300)}")
            for problem in problems:
                self.num_violations += 1
                key = problem.split(":")[0][:60]
                if len(self.violations[key]) < MAX_EXAMPLES_PER_KIND:
                    self.violations[key].append(f"{problem[:200]} <- {outcome.call.describe(400)}")


class _Crashed(Exception):
    """A daemon died or its engine stopped: this round's cluster is done."""


def is_crash(problem: str) -> bool:
    return " died " in problem or "Stats failed" in problem or " health " in problem


def fuzz_round(cluster: LocalCluster, targets: Targets, args: argparse.Namespace, tally: Tally, num_calls: int,
               round_seed: int) -> int:
    """Up to `num_calls` calls against one cluster; stops early when a daemon crashes. The calls sent."""
    channels = channels_for(cluster)
    slots = threading.Semaphore(args.concurrency)
    in_flight: list = []
    suspicious = threading.Event()  # a call ended INTERNAL/UNKNOWN/UNAVAILABLE: check the cluster now
    crashed = False
    sent = 0

    def one(call) -> None:
        try:
            outcome = run_call(channels[RPCS[call.rpc].target], call, args.hang_s)
            if outcome.code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE"):
                suspicious.set()
            tally.add(outcome)
        finally:
            slots.release()

    def checkpoint() -> None:
        nonlocal crashed
        for future in in_flight:
            future.result()
        in_flight.clear()
        suspicious.clear()
        problems = cluster_problems(cluster, kv_wait_s=2.0)
        tally.cluster += [f"after {tally.sent + sent} calls: {p}" for p in problems]
        if problems:
            tally.cluster.append("calls just before: " + " | ".join(r[:200] for r in tally.recent))
        crashed = any(is_crash(p) for p in problems)

    with ThreadPoolExecutor(args.concurrency) as pool:
        @seed(round_seed)
        @settings(max_examples=num_calls, deadline=None, database=None, phases=(Phase.generate,),
                  suppress_health_check=list(HealthCheck))
        @given(call=calls(targets))
        def send(call) -> None:
            nonlocal sent
            if crashed:
                raise _Crashed
            slots.acquire()
            in_flight.append(pool.submit(one, call))
            sent += 1
            if sent % args.check_every == 0 or suspicious.is_set():
                checkpoint()
                if crashed:
                    raise _Crashed
            if sent % args.check_every == 0:
                print(f"{tally.sent + sent} calls, {tally.num_violations} violations", file=sys.stderr, flush=True)

        try:
            send()
        except BaseException as exc:  # _Crashed, as itself or wrapped by hypothesis
            if not crashed:
                raise
            del exc
        if not crashed:
            checkpoint()
    for ch in channels.values():
        ch.close()
    return sent


def report(tally: Tally, seconds: float) -> dict:
    sent = tally.sent
    rpcs = sorted({rpc for rpc, _ in tally.counts})
    codes = sorted({code for _, code in tally.counts})
    width = max(map(len, rpcs), default=10)
    print(f"{'rpc':<{width}}  " + "  ".join(f"{c:>19}" for c in codes))
    for rpc in rpcs:
        print(f"{rpc:<{width}}  " + "  ".join(f"{tally.counts[(rpc, c)]:>19}" for c in codes))
    crashes = [p for p in tally.cluster if is_crash(p)]
    leaks = [p for p in tally.cluster if "KV blocks" in p]
    leaked = sum(int(p.split(" holds ")[1].split()[0]) for p in leaks)
    summary = {
        "requests": sent, "seconds": round(seconds, 1), "requests_per_s": round(sent / seconds, 1) if seconds else 0,
        "counts": {rpc: {c: tally.counts[(rpc, c)] for c in codes if tally.counts[(rpc, c)]} for rpc in rpcs},
        "crashes": len(crashes), "leaked_kv_blocks": leaked, "num_leak_checks_failed": len(leaks),
        "violations": tally.num_violations, "violation_examples": dict(tally.violations),
        "clusters_started": tally.num_rounds, "cluster_problems": [p[:400] for p in tally.cluster[:12]],
    }
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pdserve-fuzz-") as tmp:
        model = args.model
        if model is None:
            from tests.factories import save_tiny_model_dir

            model = str(save_tiny_model_dir(pathlib.Path(tmp) / "tiny-llama", arch="llama"))
        tally = Tally(vocab_size(model))
        tarpit = socket.socket()  # listens, never accepts: a prefill candidate that stalls
        tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(1)
        spec = ClusterSpec(num_prefill=1, num_decode=1, model=model, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
                           heartbeat_s=0.5, log_path=args.log, extra_args={"decode": ["--kv-stall-timeout-s", "1"]})
        # A crash ends a round; the next one starts a fresh cluster and goes on with new calls.
        while tally.sent < args.requests and tally.num_rounds < args.max_clusters:
            with LocalCluster(spec) as cluster:
                prefill = next(w.address for w in cluster.workers if w.role == "prefill")
                targets = Targets(prefill, bad_addresses(cluster, f"127.0.0.1:{tarpit.getsockname()[1]}"),
                                  tally.vocab, unique_request_ids=args.unique_ids)
                tally.sent += fuzz_round(cluster, targets, args, tally, args.requests - tally.sent,
                                         args.seed + tally.num_rounds)
                tally.num_rounds += 1
        tarpit.close()
    summary = report(tally, time.monotonic() - started)
    ok = not (summary["crashes"] or summary["leaked_kv_blocks"] or summary["violations"] or tally.cluster)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
