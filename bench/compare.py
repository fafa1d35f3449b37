"""What disaggregation buys, side by side, in one run on the same 2 cores and the same traces.

Usage: python bench/compare.py [--model GGUF] [--llama-server PATH] [--num-requests N]
                               [--json FILE] [--plot FILE.png] [--quick]

Configurations (one at a time, each given the whole machine):
  disagg        `pdserve up --prefill 1 --decode 1`: prefill on core 0, decode on core 1
                (LocalCluster pins each worker to its own core, one thread each)
  coloc         `pdserve up --prefill 0 --decode 1`: one worker prefills and decodes, both cores
  transformers  transformers' static-batch `generate` (batches of up to 32), 2 threads,
                served behind the same load generator (pdserve/loadgen/hf_backend.py)
  llama-server  llama.cpp's server on the same GGUF, 2 threads, 32 slots, continuous
                batching; only with --llama-server PATH (`make llama-server` builds one)

Phases:
  1. ramp: coloc, closed loop at concurrency 16 on the interference workload; its request
     throughput is taken as co-located pdserve's maximum; rate = 0.7 x that.
  2. interference: the same trace (Poisson at that rate, fixed seed) against every
     configuration. Mostly short prompts (128 tokens) decoding 128 tokens, and one prompt in
     ten of 2048 tokens (16 output tokens): the case disaggregation is for.
  3. throughput: the synthetic workload (128 in, 128 out) at concurrency 32 against coloc,
     transformers and llama-server.
  4. sharegpt (only with --phases ...,sharegpt): --sharegpt-requests ShareGPT conversations
     sampled as vLLM's serving benchmark does (pdserve/loadgen/sharegpt.py; prompt and output
     lengths from the data, prompts as ids of the model's tokenizer), closed loop at
     concurrency 16, against disagg, coloc and llama-server.
Every request asks for greedy output of exactly its max_tokens (ignore_eos).
--phases picks which run (default ramp,interference,throughput; interference needs ramp). The load
generator runs in this process, on the same cores as the servers, for every configuration.
Goodput SLOs: TTFT <= 3000 ms and TPOT <= 150 ms (--slo-ttft-ms, --slo-tpot-ms).

Prints one table per phase and the ratios; --json FILE writes
{"configs": {name: {every figure, "requests": [...]}}, "ratios": {...}} and --plot the
interference runs' latency CDFs and ITL over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass

from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.engine.model_loader import default_model_path, dtype_name, resolve_dtype
from pdserve.loadgen.arrivals import Arrivals
from pdserve.loadgen.backends import LlamaServerBackend, PdserveBackend
from pdserve.loadgen.cli import measure, report_run, warmup_requests
from pdserve.loadgen.stats import RequestRecord, Slo, summarize
from pdserve.loadgen.workloads import WorkloadSpec, build

RAMP_CONCURRENCY = 16
LOAD_FRACTION = 0.7
THROUGHPUT_CONCURRENCY = 32
SHAREGPT_CONCURRENCY = 16
PHASES = ("ramp", "interference", "throughput", "sharegpt")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Phase:
    name: str
    workload: WorkloadSpec
    arrivals: Arrivals


# -- servers -----------------------------------------------------------------------------------


class PdserveConfig:
    def __init__(self, name: str, num_prefill: int, args: argparse.Namespace, log_path: str) -> None:
        self.name = name
        self.spec = ClusterSpec(num_prefill=num_prefill, num_decode=1, model=args.model, dtype=args.dtype,
                                quantization=args.quantization, compile_max_batch=args.compile_max_batch,
                                kv_cache_gib=2.0, log_path=log_path)
        self.cluster: LocalCluster | None = None

    def __enter__(self) -> PdserveBackend:
        self.cluster = LocalCluster(self.spec).start()
        return PdserveBackend(self.cluster.address, name=self.name)

    def __exit__(self, *exc) -> None:
        if self.cluster is not None:
            self.cluster.stop()


class TransformersConfig:
    name = "transformers"

    def __init__(self, model: str | None, dtype: str | None) -> None:
        self.model, self.dtype = model, dtype

    def __enter__(self):
        from pdserve.loadgen.hf_backend import HFBackend

        return HFBackend(self.model, dtype=self.dtype, threads=2, max_batch_size=THROUGHPUT_CONCURRENCY, name=self.name)

    def __exit__(self, *exc) -> None:
        pass


class LlamaServerConfig:
    """llama-server on a free port: 2 threads, 32 slots with continuous batching (its default) over one
    shared KV pool of 32 x 2304 tokens (-kvu), as pdserve's workers share theirs."""

    name = "llama-server"

    def __init__(self, binary: str, gguf: str, log_path: str) -> None:
        self.binary, self.gguf, self.log_path = binary, gguf, log_path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServerBackend:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        slots, per_slot = THROUGHPUT_CONCURRENCY, 2304
        cmd = [self.binary, "-m", self.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-tb", "2",
               "-np", str(slots), "-c", str(slots * per_slot), "-kvu"]
        with open(self.log_path, "a") as log_file:
            self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return LlamaServerBackend(url, name=self.name)
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"llama-server did not become healthy in 120 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- phases ------------------------------------------------------------------------------------


def run_phase(config, phase: Phase, time_limit_s: float) -> list[RequestRecord]:
    log(f"[{phase.name}] {config.name}: {phase.workload.num_requests} requests, {phase.arrivals.describe()}")
    with config as backend:
        return asyncio.run(measure(backend, build(phase.workload), phase.arrivals,
                                   warmup=warmup_requests(phase.workload, 2), label=f"{phase.name}/{config.name}",
                                   progress=True, time_limit_s=time_limit_s))


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--llama-server", default=None, metavar="PATH", help="llama-server binary (`make llama-server`)")
    p.add_argument("--num-requests", type=int, default=60, help="interference requests")
    p.add_argument("--throughput-requests", type=int, default=64, help="synthetic requests at concurrency 32")
    p.add_argument("--slo-ttft-ms", type=float, default=Slo.ttft_ms)
    p.add_argument("--slo-tpot-ms", type=float, default=Slo.tpot_ms)
    p.add_argument("--time-limit-s", type=float, default=600.0, help="per configuration and phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None,
                   help="pdserve's and transformers' dtype (default: the engine's for this CPU: bfloat16 "
                        "where the CPU has native bf16, float32 where bf16 would be emulated)")
    p.add_argument("--quantization", choices=["int4", "int8"], default=None, help="pdserve's weights")
    p.add_argument("--compile-max-batch", type=int, default=0, help="pdserve decode's compiled buckets")
    p.add_argument("--phases", default="ramp,interference,throughput",
                   help="comma list of ramp, interference, throughput, sharegpt")
    p.add_argument("--sharegpt-requests", type=int, default=32, help="ShareGPT requests at concurrency 16")
    p.add_argument("--quick", action="store_true", help="small traces: checks the pipeline, not a measurement")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    phases = set(args.phases.split(","))
    if phases - set(PHASES) or ("interference" in phases and "ramp" not in phases):
        p.error(f"--phases: a comma list of {', '.join(PHASES)}; interference needs ramp")

    gguf = args.model or default_model_path()
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    n, n_tput = (12, 16) if args.quick else (args.num_requests, args.throughput_requests)
    interference = WorkloadSpec("interference", n, input_len=128, output_len=128, long_input_len=2048,
                                long_output_len=16, long_fraction=0.1, seed=args.seed)
    logs = tempfile.NamedTemporaryFile("w", prefix="compare-", suffix=".log", delete=False).name
    log(f"servers' logs: {logs}")
    dtype = dtype_name(resolve_dtype(args.dtype, "cpu"))
    log(f"dtype {dtype}")
    args.dtype = dtype
    disagg = PdserveConfig("disagg", 1, args, logs)
    coloc = PdserveConfig("coloc", 0, args, logs)
    others = [TransformersConfig(args.model, dtype)]
    if args.llama_server:
        others.append(LlamaServerConfig(args.llama_server, gguf, logs))
    else:
        log("llama-server: skipped (no --llama-server PATH; `make llama-server` builds one)")

    runs: dict[str, dict[str, list[RequestRecord]]] = {}  # phase -> config -> its requests
    summaries: dict[str, dict[str, dict]] = {}
    ratios: dict[str, float | None] = {}
    rate = None

    def run(phase: Phase, configs) -> None:
        runs[phase.name] = {c.name: run_phase(c, phase, args.time_limit_s) for c in configs}
        summaries[phase.name] = {name: summarize(rs, slo) for name, rs in runs[phase.name].items()}

    if "ramp" in phases:
        ramp = Phase("ramp", WorkloadSpec(**{**asdict(interference), "num_requests": max(n // 2, RAMP_CONCURRENCY),
                                             "seed": args.seed + 1}), Arrivals(concurrency=RAMP_CONCURRENCY))
        run(ramp, [coloc])
        ramp_summary = summaries["ramp"]["coloc"]
        rate = LOAD_FRACTION * ramp_summary["request_throughput"]
        log(f"co-located maximum {ramp_summary['request_throughput']:.3f} req/s at concurrency {RAMP_CONCURRENCY}; "
            f"interference rate {rate:.3f} req/s")
        print(f"== ramp (coloc, closed loop at {RAMP_CONCURRENCY}): {ramp_summary['request_throughput']:.3f} req/s, "
              f"{ramp_summary['output_throughput']:.1f} output tok/s; interference rate {rate:.3f} req/s")
    if "interference" in phases:
        run(Phase("interference", interference, Arrivals(rate=rate, seed=args.seed)), [disagg, coloc, *others])
        inter_summary = summaries["interference"]
        d, c = inter_summary["disagg"], inter_summary["coloc"]
        ratios.update({"p99_itl_disagg_over_coloc": ratio(d["itl_ms"]["p99"], c["itl_ms"]["p99"]),
                       "p99_ttft_disagg_over_coloc": ratio(d["ttft_ms"]["p99"], c["ttft_ms"]["p99"]),
                       "goodput_disagg_over_coloc": ratio(d["goodput"], c["goodput"])})
        # The (b)/(a) and (c)/(a): every other configuration over disagg on the interference trace.
        for name, s in inter_summary.items():
            if name != "disagg":
                ratios[f"p99_itl_{name}_over_disagg"] = ratio(s["itl_ms"]["p99"], d["itl_ms"]["p99"])
                ratios[f"p99_ttft_{name}_over_disagg"] = ratio(s["ttft_ms"]["p99"], d["ttft_ms"]["p99"])
                ratios[f"goodput_{name}_over_disagg"] = ratio(s["goodput"], d["goodput"])
        print("== interference")
        report_run(inter_summary, runs["interference"], None, args.plot)
    if "throughput" in phases:
        run(Phase("throughput", WorkloadSpec("synthetic", n_tput, input_len=128, output_len=128, seed=args.seed + 2),
                  Arrivals(concurrency=THROUGHPUT_CONCURRENCY)), [coloc, *others])
        out_tput = {name: s["output_throughput"] for name, s in summaries["throughput"].items()}
        ratios.update({"throughput_pdserve_over_hf": ratio(out_tput["coloc"], out_tput.get("transformers")),
                       "throughput_pdserve_over_llamacpp": ratio(out_tput["coloc"], out_tput.get("llama-server"))})
        print(f"== throughput: synthetic 128 in / 128 out, closed loop at {THROUGHPUT_CONCURRENCY}")
        report_run(summaries["throughput"], runs["throughput"], None, None)
    if "sharegpt" in phases:
        sharegpt = WorkloadSpec("sharegpt", 8 if args.quick else args.sharegpt_requests, seed=args.seed + 3,
                                tokenizer=gguf)
        run(Phase("sharegpt", sharegpt, Arrivals(concurrency=SHAREGPT_CONCURRENCY)),
            [disagg, coloc, *(o for o in others if o.name == "llama-server")])
        sg = summaries["sharegpt"]
        for name in sg:
            if name != "coloc":
                ratios[f"sharegpt_output_throughput_{name}_over_coloc"] = ratio(sg[name]["output_throughput"],
                                                                                sg["coloc"]["output_throughput"])
                ratios[f"sharegpt_p99_itl_{name}_over_coloc"] = ratio(sg[name]["itl_ms"]["p99"],
                                                                      sg["coloc"]["itl_ms"]["p99"])
        print(f"== sharegpt: {sharegpt.num_requests} ShareGPT requests, closed loop at {SHAREGPT_CONCURRENCY}")
        report_run(sg, runs["sharegpt"], None, None)
    print("== ratios")
    for name, value in ratios.items():
        print(f"{name:48s} {'-' if value is None else f'{value:.2f}'}")
    if args.json:
        configs = {f"{phase}/{k}": {**v, "requests": [r.to_json() for r in runs[phase][k]] if phase != "ramp" else []}
                   for phase, per in summaries.items() for k, v in per.items()}
        payload = {"configs": configs, "ratios": ratios, "rate": rate,
                   "workloads": {"interference": asdict(interference)}, "llama_server": args.llama_server,
                   "dtype": dtype, "quantization": args.quantization, "compile_max_batch": args.compile_max_batch}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
