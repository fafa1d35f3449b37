"""`pdserve bench --up`: a short real run on a tiny model completes and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_up_runs_and_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pdserve.cli", "bench", "--up", f"--prefill 1 --decode 1 --model {tiny_dir} --dtype float32",
           "--workload", "interference", "--num-requests", "6", "--input-len", "12", "--output-len", "6",
           "--long-input-len", "40", "--long-output-len", "3", "--long-fraction", "0.34", "--token-range", "3,500",
           "--rate", "20", "--warmup", "1", "--json", str(out), "--no-progress", "--label", "tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TTFT p99 ms" in done.stdout
    data = json.loads(out.read_text())
    run = data["configs"]["tiny"]
    assert run["num_completed"] == 6 and run["num_failed"] == 0
    kinds = [r["kind"] for r in run["requests"]]
    assert kinds.count("long") == 2
    assert all(r["output_tokens"] == r["max_tokens"] for r in run["requests"])  # ignore_eos: exact lengths
    assert data["workload"]["name"] == "interference" and data["arrivals"]["rate"] == 20
