"""Paged attention: the compiled CPU op against the PyTorch reference, a memory floor and SDPA.

Usage: python bench/attention_kernel.py [--rounds N] [--threads N] [--dtypes float32,bfloat16]
                                        [--batches 1,32,64] [--contexts 256,1024,4096]
                                        [--prefill 512,2048] [--isa auto]

One layer of SmolLM2-135M's attention (9 query heads, 3 KV heads, head dim 64), block
size 16, blocks allocated in order (consecutive ids, as a fresh pool hands them out),
random contents. Prints one JSON object per row on stdout (setup goes to stderr).
Every figure is a median over --rounds rounds (default 7); within a round the
contenders run back to back, in an order that rotates from round to round, each
repeated enough times to last about 20 ms: these VMs drift between processes and over
seconds, so only ratios measured side by side, in one process, mean much.

Decode rows (one query row per sequence, every sequence at the same context):
    {"op": "decode", "dtype", "batch", "context", "kv_mb", "kernel_ms", "reference_ms",
     "floor_ms", "kernel_gb_s", "ratio_reference", "ratio_bandwidth"}
  - kv_mb: the K and V bytes the step must read, once.
  - floor_ms: `torch.sum` over a float32 buffer of kv_mb (the machine's read floor).
  - ratio_reference = reference_ms / kernel_ms (> 1: the op is faster);
    ratio_bandwidth = floor_ms / kernel_ms (1.0: the op reads K/V at the floor's speed).
Prefill rows (one sequence, causal, start_pos 0):
    {"op": "prefill", "dtype", "tokens", "kernel_ms", "reference_ms", "sdpa_ms",
     "kernel_gflop_s", "ratio_reference", "ratio_sdpa"}
  - sdpa_ms: `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` on the same
    values as dense [1, H, T, D] / [1, Hkv, T, D] tensors (torch's CPU flash attention).
  - ratio_sdpa = sdpa_ms / kernel_ms; kernel_gflop_s counts the causal half's 4*T*T/2*H*D.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine import kernels
from pdserve.engine.kernels import reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
SCALE = HEAD_DIM**-0.5
TARGET_S = 0.02  # each timed measurement runs about this long


def _time(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def measure(contenders: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, over interleaved, rotating rounds."""
    reps = {}
    for name, fn in contenders.items():
        fn()  # warm-up: first-touch pages, scratch buffers
        reps[name] = max(1, round(TARGET_S / max(_time(fn, 1), 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(_time(contenders[name], reps[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def _cache(num_slots: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (NUM_KV_HEADS, num_slots, HEAD_DIM)
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)


def decode_row(ops, dtype: torch.dtype, batch: int, context: int, rounds: int) -> dict:
    blocks_per_seq = -(-context // BLOCK_SIZE)
    k_cache, v_cache = _cache((batch * blocks_per_seq + 1) * BLOCK_SIZE, dtype)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM).to(dtype)
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32)
    kv_bytes = 2 * NUM_KV_HEADS * batch * context * HEAD_DIM * k_cache.element_size()
    floor_buffer = torch.randn(kv_bytes // 4)
    args = (q, k_cache, v_cache, tables, lens, BLOCK_SIZE, SCALE)
    t = measure({
        "kernel": lambda: ops.paged_attention_decode(*args),
        "reference": lambda: reference.paged_attention_decode(*args),
        "floor": lambda: floor_buffer.sum(),
    }, rounds)
    return {"op": "decode", "dtype": str(dtype).removeprefix("torch."), "batch": batch, "context": context,
            "kv_mb": round(kv_bytes / 1e6, 2), "kernel_ms": _ms(t["kernel"]), "reference_ms": _ms(t["reference"]),
            "floor_ms": _ms(t["floor"]), "kernel_gb_s": round(kv_bytes / t["kernel"] / 1e9, 1),
            "ratio_reference": round(t["reference"] / t["kernel"], 2),
            "ratio_bandwidth": round(t["floor"] / t["kernel"], 2)}


def prefill_row(ops, dtype: torch.dtype, tokens: int, rounds: int) -> dict:
    num_blocks = -(-tokens // BLOCK_SIZE)
    k_cache, v_cache = _cache((num_blocks + 1) * BLOCK_SIZE, dtype)
    q = torch.randn(tokens, NUM_HEADS, HEAD_DIM).to(dtype)
    tables = torch.arange(num_blocks, dtype=torch.int32).view(1, -1)
    query_start = torch.tensor([0, tokens], dtype=torch.int32)
    start_pos = torch.zeros(1, dtype=torch.int32)
    dense_q = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, D]
    dense_k = k_cache[:, :tokens].unsqueeze(0).contiguous()  # [1, Hkv, T, D]
    dense_v = v_cache[:, :tokens].unsqueeze(0).contiguous()
    args = (q, k_cache, v_cache, tables, query_start, start_pos, BLOCK_SIZE, SCALE)
    t = measure({
        "kernel": lambda: ops.paged_attention_prefill(*args),
        "reference": lambda: reference.paged_attention_prefill(*args),
        "sdpa": lambda: F.scaled_dot_product_attention(dense_q, dense_k, dense_v, is_causal=True, enable_gqa=True),
    }, rounds)
    flops = 4 * tokens * tokens / 2 * NUM_HEADS * HEAD_DIM
    return {"op": "prefill", "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
            "kernel_ms": _ms(t["kernel"]), "reference_ms": _ms(t["reference"]), "sdpa_ms": _ms(t["sdpa"]),
            "kernel_gflop_s": round(flops / t["kernel"] / 1e9, 1),
            "ratio_reference": round(t["reference"] / t["kernel"], 2), "ratio_sdpa": round(t["sdpa"] / t["kernel"], 2)}


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", type=_ints, default=[1, 32, 64])
    parser.add_argument("--contexts", type=_ints, default=[256, 1024, 4096])
    parser.add_argument("--prefill", type=_ints, default=[512, 2048], help="prompt lengths; empty for none")
    parser.add_argument("--isa", default="auto", help="the op's instruction set: auto, avx512, avx2, generic")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = kernels.load()
    if ops is None:
        print("the compiled op is unavailable (see the log line above)", file=sys.stderr)
        return 1
    isa = torch.ops.pdserve.select_isa(args.isa)
    print(f"op {ops.path} isa={isa} threads={torch.get_num_threads()}", file=sys.stderr)
    torch.manual_seed(0)
    with torch.inference_mode():
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            for batch in args.batches:
                for context in args.contexts:
                    print(json.dumps(decode_row(ops, dtype, batch, context, args.rounds)), flush=True)
            for tokens in args.prefill:
                print(json.dumps(prefill_row(ops, dtype, tokens, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
