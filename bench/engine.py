"""Engine throughput against its floors, transformers and llama.cpp, SmolLM2-135M.

Usage: python bench/engine.py [--rows decode:64:256,prefill:2048,decode:1:256@int4]
                              [--dtype bfloat16|float32] [--quantization int4,int8]
                              [--rounds N] [--steps N] [--threads N]
                              [--skip-hf] [--skip-llamacpp] [--profile]
                              [--compile-max-batch N]

Rows: `decode:BATCH:CONTEXT` and `prefill:CONTEXT` run the dense model in the run's
dtype (--dtype; default: the engine's own default for this host,
`pdserve.engine.host.default_cpu_dtype()`: bf16 where the CPU computes it natively,
else fp32). A suffix `@int8` or `@int4` runs the same row with weight-only quantized
weights (`load_model(..., quantization=...)`, and `EngineConfig(quantization=...)`
where EngineConfig has that field; activations and KV stay in the run's dtype).
`--quantization int4,int8` adds an `@int4` and an `@int8` copy of every row of --rows
that has no suffix. Rows of a quantization the engine does not offer are skipped
with a line on stderr.

Prints one JSON object per row on stdout (diagnostics go to stderr):
    {"kind", "batch", "context", "quantization", "tokens_per_s", "floor_tokens_per_s",
     "read_gbps", "step_floor_tokens_per_s", "hf_tokens_per_s", "llamacpp_tokens_per_s",
     "compiled_tokens_per_s", "ratio_floor", "ratio_step_floor", "ratio_hf", "ratio_llamacpp",
     "ratio_compiled", "ratio_compiled_llamacpp"}
Every measurement of a row is taken in this one process, interleaved: each round
times the engine, the GEMM floor, the read bandwidth, transformers and llama.cpp once
each (the order rotating between rounds), and every column is the median over the
rounds. These VMs drift 10-15% between processes, so only ratios measured side by
side mean anything.
Other processes on 2 cores slow OpenMP kernels by up to 50x, so each round first
waits (up to 2 minutes, sleeping) until other processes use at most 10% of the CPUs
(read from /proc/stat; llama-bench, our child, counts as ours), and a round during
which they took more is discarded and repeated. stderr shows every round and how
much CPU other processes used per row.

Columns
- kind, batch, context: "decode" rows run `batch` sequences whose first `context`
  tokens are in the KV cache; "prefill" rows compute one prompt of `context` tokens
  (batch 1).
- quantization: what the weights run as: "int8" or "int4" for quantized rows, else
  the dense dtype ("bf16", "fp32", "fp16").
- tokens_per_s (pdserve's LLMEngine, greedy, ignore_eos, block size 16):
  decode: the batch's prompts are prefilled once, untimed (one step, so no
  sequence decodes early). Each round re-admits the same prompts, which then hit the
  prefix cache: an untimed step recomputes each prompt's last partial block and
  samples its first token, then `--steps` calls of `engine.step()`, every one
  decoding all `batch` sequences (checked), are timed. tokens_per_s =
  batch * steps / time. The attended context runs from context + 1 to
  context + steps. The KV pool (CacheConfig.num_blocks) holds the batch at
  context + steps, plus twice the blocks a round adds, so that re-admitting never
  evicts another sequence's cached prompt.
  prefill: prefix cache off, max_num_batched_tokens = context; a fresh prompt
  each round; the one `engine.step()` that computes the prompt and samples its
  token is timed. tokens_per_s = context / time.
- floor_tokens_per_s: the model's weight GEMMs alone, in a bare loop, called through
  the row's engine's own layer objects (`LlamaModel.layers[i].qkv / o_proj / gate_up /
  down` and `lm_head`), so the floor runs exactly the GEMM path the engine runs for
  its dtype and quantization: oneDNN with prepacked bf16 weights where bf16 is
  native, F.linear otherwise (`pdserve.engine.models.layers.Linear`), and for @int8 /
  @int4 rows the engine's quantized GEMMs (so a quantized row's floor is its own, not
  the dense row's). Inputs are random, in the engine's activation dtype. Decode:
  `batch` rows for every GEMM, one pass per step, timed over `--steps` passes;
  floor_tokens_per_s = batch / (time per pass). Prefill: `context` rows for the
  layers and 1 row for the LM head (a prefill needs only its last token's logits,
  as the engine and transformers compute it); floor_tokens_per_s = context / time.
  No engine can beat it: it omits attention, norms, rotary, sampling and Python.
- read_gbps (decode rows; null for prefill): the host's read bandwidth, 1e9 bytes/s,
  measured as `torch.sum` on all threads over an fp32 buffer of max(KV bytes, 64 MiB),
  repeated until a round has read at least 1 GiB. KV bytes = what one decode step of
  the row reads from the KV cache: batch x (context + (steps + 1) / 2) tokens (the
  mean attended length over the timed steps) x layers x 2 (K and V) x Hkv x head dim
  x the KV dtype's size. The buffer costs that much memory besides the engine's KV
  (and transformers' copy of it): about 3 GB at batch 64, context 1024 in fp32.
- step_floor_tokens_per_s (decode rows; null for prefill): batch / (weight-GEMM time
  per step + KV bytes / read bandwidth), the GEMM time being batch /
  floor_tokens_per_s. A decode step must do both; at long context the KV read dominates.
- hf_tokens_per_s: transformers `generate` (greedy, sdpa attention, DynamicCache,
  under torch.inference_mode) on the same dense weights in the run's dtype (for
  @int8 / @int4 rows too: transformers runs dense), a static batch of `batch`
  unpadded sequences. Decode: the DynamicCache is built once, untimed, from the
  engine's KV of the first context - 1 prompt tokens (same model, same values; the
  first tokens of both are compared and the agreement printed to stderr). Each
  round calls generate(prompt, cache, max_new_tokens = n + 1) and crops the cache
  back afterwards; a LogitsProcessor stamps the time at every step, and the decode
  time is the last stamp minus the first, which spans n whole decode iterations
  (forward, logits processing, greedy pick, cache growth) and no prefill.
  hf_tokens_per_s = batch * n / time. n = --steps up to batch * context = 8192, then
  scaled down in proportion (at least 4): transformers is slow there.
  Prefill: the wall time of generate(prompt, max_new_tokens=1) with an empty cache;
  hf_tokens_per_s = context / time.
- llamacpp_tokens_per_s (decode rows at batch 1 and prefill rows; else null):
  llama.cpp's `llama-bench` (build/llama-server/bin/llama-bench, built for this host
  by scripts/build_llama_server.sh) on the GGUF the engine loads (its Q4_1 weights as
  they are), `--threads` threads, run once per round as a child process:
  `-r 1 -o json` after llama-bench's own warm-up run; decode: `-p 0 -n 128 -d CONTEXT`
  (128 tokens generated one at a time after CONTEXT tokens were prefilled, untimed, so
  both sides attend about the same context); prefill: `-p CONTEXT -n 0`. The value is
  llama-bench's own tokens / time of the timed part (its avg_ns), without model load.
  llama.cpp runs its own Q4_1 kernels whatever the row's quantization: compare
  it with the @int4 row for like weights, with the dense rows for what serving dense costs.
- compiled_tokens_per_s (decode rows of batch <= --compile-max-batch; else null): the
  same as tokens_per_s with a second engine built with
  EngineConfig(compile_max_batch=N) (engine/compiled_decode.py: one torch.compile'd
  decoder layer per batch bucket, compiled before the row starts), timed in the same
  rounds; ratio_compiled = compiled_tokens_per_s / tokens_per_s (compiled against
  eager, side by side), ratio_compiled_llamacpp = compiled_tokens_per_s /
  llamacpp_tokens_per_s.
- ratio_floor = tokens_per_s / floor_tokens_per_s; ratio_step_floor = tokens_per_s /
  step_floor_tokens_per_s; ratio_hf = tokens_per_s / hf_tokens_per_s; ratio_llamacpp =
  tokens_per_s / llamacpp_tokens_per_s (null where the other side is).

--profile runs torch.profiler (CPU, record_shapes) over the engine's timed work of
each selected row (decode: --steps steps; prefill: one step) and prints the top ops
by self CPU time, overall and by input shape, instead of the JSON rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_loader import LoadedModel, default_model_path, load_model
from pdserve.engine.models.llama import LlamaModel
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import Sequence
from pdserve.errors import IncompatibleError, InvalidRequestError

DEFAULT_ROWS = (
    "decode:1:256,decode:8:256,decode:32:256,decode:64:256,"
    "decode:1:1024,decode:8:1024,decode:32:1024,decode:64:1024,"
    "decode:1:256@int8,decode:32:256@int8,decode:1:256@int4,decode:32:256@int4,"
    "prefill:512,prefill:2048"
)
QUANTIZATIONS = ("int8", "int4")
DTYPE_LABELS = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
BLOCK_SIZE = 16
WARMUP_STEPS = 2
# transformers decodes fewer steps per round above this many cached tokens per batch (it is slow there).
HF_FULL_STEPS_TOKENS = 8192
HF_MIN_STEPS = 4
# The read-bandwidth buffer is at least this large (well past the caches), and a round reads at least READ_ROUND_BYTES.
READ_MIN_BYTES = 64 << 20
READ_ROUND_BYTES = 1 << 30
LLAMA_BENCH = pathlib.Path(__file__).resolve().parents[1] / "build" / "llama-server" / "bin" / "llama-bench"
LLAMA_DECODE_TOKENS = 128
# Rounds during which other processes took more of the CPUs than this are repeated.
MAX_OTHER_LOAD = 0.10
# Before each round, wait (at most QUIET_MAX_WAIT_S) for a QUIET_WINDOW_S window that quiet.
QUIET_WINDOW_S = 1.0
QUIET_MAX_WAIT_S = 120.0
FIRST_TOKEN_ID = 3  # prompts avoid the special tokens 0-2

# One timed measurement: (amount done: tokens, or 1e9 bytes for the read; seconds).
Measurement = Callable[[], tuple[float, float]]


@dataclass(frozen=True)
class Row:
    kind: str  # "decode" | "prefill"
    batch: int
    context: int
    quantization: str | None = None  # "int8" | "int4"; None: dense weights in the run's dtype

    @property
    def name(self) -> str:
        base = f"decode:{self.batch}:{self.context}" if self.kind == "decode" else f"prefill:{self.context}"
        return base if self.quantization is None else f"{base}@{self.quantization}"


def parse_rows(text: str, add_quantizations: list[str]) -> list[Row]:
    """The rows of --rows, then an @q copy of each unsuffixed one per q in add_quantizations; no duplicates."""
    rows = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        spec, _, quantization = item.partition("@")
        fields = spec.split(":")
        if quantization and quantization not in QUANTIZATIONS:
            raise SystemExit(f"bad row {item!r}: quantization must be one of {', '.join(QUANTIZATIONS)}")
        if fields[0] == "decode" and len(fields) == 3:
            rows.append(Row("decode", int(fields[1]), int(fields[2]), quantization or None))
        elif fields[0] == "prefill" and len(fields) == 2:
            rows.append(Row("prefill", 1, int(fields[1]), quantization or None))
        else:
            raise SystemExit(f"bad row {item!r}: expected decode:BATCH:CONTEXT or prefill:CONTEXT, "
                             f"optionally followed by @int8 or @int4")
    rows += [dataclasses.replace(row, quantization=q) for q in add_quantizations for row in rows
             if row.quantization is None]
    return list(dict.fromkeys(rows))


def parse_quantizations(text: str) -> list[str]:
    schemes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [q for q in schemes if q not in QUANTIZATIONS]
    if unknown:
        raise SystemExit(f"--quantization: unknown {', '.join(unknown)}; choose from {', '.join(QUANTIZATIONS)}")
    return schemes


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN_ID, vocab_size, (num, length), generator=generator).tolist()


def interleave(measurements: dict[str, Measurement], rounds: int) -> dict[str, float]:
    """Median rate (amount / second) of each measurement over `rounds` rounds, run alternately.

    Each round starts once the machine is quiet (see wait_until_quiet); a round
    during which other processes still took more than MAX_OTHER_LOAD of the CPUs is
    discarded and repeated, up to `rounds` extra attempts.
    """
    samples: dict[str, list[float]] = {name: [] for name in measurements}
    names = list(measurements)
    max_attempts, attempts = 2 * rounds, 0
    while len(samples[names[0]]) < rounds:
        wait_until_quiet()
        shift = attempts % len(names)
        other_load = OtherLoad()
        rates = {}
        for name in names[shift:] + names[:shift]:
            amount, seconds = measurements[name]()
            rates[name] = amount / seconds
        attempts += 1
        share = other_load.share()
        if share > MAX_OTHER_LOAD:
            if max_attempts - attempts >= rounds - len(samples[names[0]]):
                log(f"  round discarded: other processes used {share:.0%} of the CPUs")
                continue
            log(f"  round kept although other processes used {share:.0%} of the CPUs (no attempts left)")
        for name, rate in rates.items():
            samples[name].append(rate)
    for name, values in samples.items():
        spread = (max(values) - min(values)) / statistics.median(values)
        unit = "GB/s" if name == "read" else "tok/s"
        log(f"  {name:8s} {unit} per round: {', '.join(f'{v:.1f}' for v in values)} (spread {spread:.0%})")
    return {name: statistics.median(values) for name, values in samples.items()}


def wait_until_quiet(max_seconds: float = QUIET_MAX_WAIT_S) -> None:
    """Sleep (using no CPU) until other processes leave the CPUs alone, at most max_seconds."""
    deadline = time.perf_counter() + max_seconds
    waited = False
    while True:
        other_load = OtherLoad()
        time.sleep(QUIET_WINDOW_S)
        share = other_load.share()
        if share <= MAX_OTHER_LOAD or time.perf_counter() > deadline:
            break
        if not waited:
            log(f"  waiting for other processes to leave the CPUs ({share:.0%} busy)")
            waited = True
    if waited:
        log(f"  {'quiet' if share <= MAX_OTHER_LOAD else 'still busy, going on'}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class OtherLoad:
    """Share of the machine's CPU time that other processes used since creation (Linux).

    Other processes on these 2-core VMs slow OpenMP kernels far more than their share
    suggests (threads wait at barriers for a descheduled peer): a row measured while
    this is above a few percent is noisy.
    """

    def __init__(self) -> None:
        self.wall, self.busy, self.own = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()

    def share(self) -> float:
        wall = time.perf_counter() - self.wall
        others = (_busy_cpu_seconds() - self.busy) - (_own_cpu_seconds() - self.own)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def _busy_cpu_seconds() -> float:
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """This process's CPU time and that of its finished children (llama-bench runs)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# -- models ------------------------------------------------------------------------


def quantization_supported() -> bool:
    """Whether this engine's load_model quantizes (load_model(quantization=...))."""
    return "quantization" in inspect.signature(load_model).parameters


def quantization_config(quantization: str | None) -> dict[str, str]:
    """EngineConfig's quantization argument, where EngineConfig has the field (the loaded model carries it too)."""
    has_field = "quantization" in {f.name for f in dataclasses.fields(EngineConfig)}
    return {"quantization": quantization} if quantization is not None and has_field else {}


class Models:
    """The dense model in the run's dtype, and each quantized one a row asks for, loaded once each."""

    def __init__(self, dtype: str | None) -> None:
        self.dense = load_model(dtype=dtype)
        self.dtype = next(iter(self.dense.weights.values())).dtype
        self._quantized: dict[str, LoadedModel | None] = {}

    def get(self, quantization: str | None) -> LoadedModel | None:
        """The model for rows of `quantization`; None (logged) when the engine does not offer it."""
        if quantization is None:
            return self.dense
        if quantization not in self._quantized:
            self._quantized[quantization] = self._load_quantized(quantization)
        return self._quantized[quantization]

    def _load_quantized(self, quantization: str) -> LoadedModel | None:
        if not quantization_supported():
            log(f"skipping @{quantization} rows: this engine's load_model has no quantization yet")
            return None
        try:
            return load_model(dtype=self.dtype, quantization=quantization)  # type: ignore[call-arg]
        except (InvalidRequestError, IncompatibleError, NotImplementedError) as error:
            log(f"skipping @{quantization} rows: the engine refused it: {error}")
            return None

    def label(self, row: Row) -> str:
        return row.quantization or DTYPE_LABELS[self.dtype]


def engine_config(row: Row, cache: CacheConfig, scheduler: SchedulerConfig, compile_max_batch: int = 0) -> EngineConfig:
    compiled = {"compile_max_batch": compile_max_batch} if compile_max_batch else {}
    return EngineConfig(cache=cache, scheduler=scheduler, **quantization_config(row.quantization), **compiled)


# -- pdserve ---------------------------------------------------------------------


class EngineDecode:
    """`batch` sequences with `context` tokens in the KV cache; times `steps` decode steps."""

    def __init__(self, loaded: LoadedModel, row: Row, steps: int, seed: int, compile_max_batch: int = 0) -> None:
        self.batch, self.context, self.steps = row.batch, row.context, steps
        blocks_per_seq = -(-(row.context + steps + WARMUP_STEPS + 1) // BLOCK_SIZE)
        # A round allocates blocks for its recomputed last prompt block and its decode
        # steps while the other sequences' cached prompt blocks sit in the free queue.
        blocks_per_round = -(-(BLOCK_SIZE + steps + WARMUP_STEPS + 1) // BLOCK_SIZE) + 1
        config = engine_config(
            row,
            CacheConfig(block_size=BLOCK_SIZE, num_blocks=row.batch * (blocks_per_seq + 2 * blocks_per_round)),
            SchedulerConfig(max_num_batched_tokens=row.batch * row.context, max_num_seqs=row.batch),
            compile_max_batch,
        )
        self.engine = LLMEngine(config, loaded)
        self.prompts = random_prompts(row.batch, row.context, loaded.spec.vocab_size, seed)
        self.params = SamplingParams(max_tokens=steps + WARMUP_STEPS + 2, temperature=0.0, ignore_eos=True)
        self.num_admissions = 0

    def start(self) -> list[Sequence]:
        """Admit the batch and step (untimed) until every sequence has sampled its first token."""
        seqs = [
            self.engine.add_request(f"a{self.num_admissions}-{i}", prompt, self.params)
            for i, prompt in enumerate(self.prompts)
        ]
        self.num_admissions += 1
        while any(seq.num_output_tokens == 0 for seq in seqs):
            self.engine.step()
        return seqs

    def decode(self, seqs: list[Sequence], steps: int) -> float:
        """Seconds for `steps` engine steps, each of which must decode every sequence."""
        before = [seq.num_output_tokens for seq in seqs]
        start = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        elapsed = time.perf_counter() - start
        if any(seq.num_output_tokens - n != steps for seq, n in zip(seqs, before)):
            raise RuntimeError("a timed step did not decode every sequence of the batch")
        return elapsed

    def stop(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.engine.abort_request(seq.request_id)
        self.engine.step_outputs()

    def warm_up(self, export_kv: bool) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Prefill the prompts (filling the prefix cache) and run a few steps.

        Returns each sequence's first token and, when asked, the KV of the first
        context - 1 prompt tokens per layer as [B, Hkv, T, D] (transformers' layout).
        """
        seqs = self.start()
        first_tokens = [seq.output_token_ids[0] for seq in seqs]
        kv = self._export_kv(seqs) if export_kv else None
        self.decode(seqs, WARMUP_STEPS)
        self.stop(seqs)
        return first_tokens, kv

    def kv_bytes_per_step(self) -> int:
        """Bytes of KV one timed decode step reads, at the mean attended length of the timed steps."""
        spec, cache = self.engine.spec, self.engine.kv_cache
        mean_tokens = self.context + (self.steps + 1) / 2
        per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * cache.dtype.itemsize
        return int(self.batch * mean_tokens * per_token)

    def _export_kv(self, seqs: list[Sequence]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv = []
        for layer in range(self.engine.spec.num_layers):
            pairs = [self.engine.read_kv(seq.request_id, layer, 0, self.context - 1) for seq in seqs]
            k = torch.stack([p[0] for p in pairs])  # [B, Hkv, T, D]
            v = torch.stack([p[1] for p in pairs])
            kv.append((k, v))
        return kv

    def __call__(self) -> tuple[float, float]:
        seqs = self.start()
        elapsed = self.decode(seqs, self.steps)
        self.stop(seqs)
        return self.batch * self.steps, elapsed


class EnginePrefill:
    """One prompt of `context` tokens computed in one step; prefix cache off."""

    def __init__(self, loaded: LoadedModel, row: Row, seed: int) -> None:
        self.context = row.context
        config = engine_config(
            row,
            CacheConfig(block_size=BLOCK_SIZE, num_blocks=-(-(row.context + 1) // BLOCK_SIZE) + 1,
                        enable_prefix_caching=False),
            SchedulerConfig(max_num_batched_tokens=row.context, max_num_seqs=1),
        )
        self.engine = LLMEngine(config, loaded)
        self.vocab_size = loaded.spec.vocab_size
        self.seed = seed
        self.params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self.num_calls = 0

    def __call__(self) -> tuple[float, float]:
        prompt = random_prompts(1, self.context, self.vocab_size, self.seed + self.num_calls)[0]
        self.engine.add_request(f"p{self.num_calls}", prompt, self.params)
        self.num_calls += 1
        start = time.perf_counter()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - start
        if not (len(outputs) == 1 and outputs[0].finished and len(outputs[0].token_ids) == 1):
            raise RuntimeError("the prefill step did not compute the whole prompt")
        return self.context, elapsed


# -- the floors --------------------------------------------------------------------


class GemmFloor:
    """The weight GEMMs of one forward pass, called through the engine's own layer objects."""

    def __init__(self, engine: LLMEngine, num_rows: int, num_head_rows: int, passes: int) -> None:
        model: LlamaModel = engine.runner.model
        spec, dtype = engine.spec, engine.kv_cache.dtype
        self.num_rows, self.passes = num_rows, passes
        x_hidden = torch.randn(num_rows, spec.hidden_size, dtype=dtype)  # [rows, hidden]
        x_attn = torch.randn(num_rows, spec.num_heads * spec.head_dim, dtype=dtype)  # [rows, H * D]
        x_mlp = torch.randn(num_rows, spec.intermediate_size, dtype=dtype)  # [rows, I]
        x_head = torch.randn(num_head_rows, spec.hidden_size, dtype=dtype)  # [head rows, hidden]
        self.gemms: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = []
        for layer in model.layers:
            self.gemms += [(layer.qkv, x_hidden), (layer.o_proj, x_attn), (layer.gate_up, x_hidden),
                           (layer.down, x_mlp)]
        self.gemms.append((model.lm_head, x_head))

    @torch.inference_mode()
    def one_pass(self) -> None:
        for gemm, x in self.gemms:
            gemm(x)

    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        for _ in range(self.passes):
            self.one_pass()
        return self.num_rows * self.passes, time.perf_counter() - start


class ReadBandwidth:
    """A streaming read on all threads: torch.sum over max(kv_bytes, READ_MIN_BYTES) of fp32."""

    def __init__(self, kv_bytes: int) -> None:
        self.kv_bytes = kv_bytes
        num_bytes = max(kv_bytes, READ_MIN_BYTES)
        self.buffer = torch.ones(num_bytes // 4, dtype=torch.float32)  # written, so every page is mapped
        self.passes = -(-READ_ROUND_BYTES // self.buffer.nbytes)

    @torch.inference_mode()
    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        for _ in range(self.passes):
            self.buffer.sum()
        return self.buffer.nbytes * self.passes / 1e9, time.perf_counter() - start


# -- llama.cpp ---------------------------------------------------------------------


class LlamaBench:
    """One llama-bench run (-r 1, after its own warm-up run) of the row's work on the GGUF."""

    def __init__(self, row: Row, gguf: str, threads: int) -> None:
        if row.kind == "decode":
            work = ["-p", "0", "-n", str(LLAMA_DECODE_TOKENS), "-d", str(row.context)]
        else:
            work = ["-p", str(row.context), "-n", "0"]
        self.command = [str(LLAMA_BENCH), "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json", *work]

    def __call__(self) -> tuple[float, float]:
        done = subprocess.run(self.command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            raise RuntimeError(f"llama-bench exited with {done.returncode}: {' | '.join(tail)}")
        result = json.loads(done.stdout)[0]
        return result["n_prompt"] + result["n_gen"], result["avg_ns"] / 1e9


def llama_bench(row: Row, threads: int) -> LlamaBench | None:
    """llama-bench for a decode row at batch 1 or a prefill row, checked once; None (logged) if unusable."""
    if row.kind == "decode" and row.batch != 1:
        return None
    if not LLAMA_BENCH.is_file():
        log(f"  no llama.cpp column: {LLAMA_BENCH} is missing (scripts/build_llama_server.sh builds it)")
        return None
    bench = LlamaBench(row, default_model_path(), threads)
    try:
        tokens, seconds = bench()  # also the warm-up: the GGUF in the page cache
    except (RuntimeError, OSError, ValueError, KeyError, IndexError) as error:
        log(f"  no llama.cpp column: {error}")
        return None
    log(f"  llama-bench: {' '.join(bench.command[3:])}: {tokens / seconds:.1f} tok/s (warm-up)")
    return bench


# -- transformers ------------------------------------------------------------------


def build_hf_model(loaded: LoadedModel) -> torch.nn.Module:
    """transformers' model holding our loaded (dense) weights (shared, not copied), in their dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = next(iter(loaded.weights.values())).dtype
    model = AutoModelForCausalLM.from_config(loaded.hf_config, dtype=dtype)
    state = dict(loaded.weights)
    if loaded.spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _StepStamps:
    """A LogitsProcessor that records the time at every generation step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


class HFDecode:
    """transformers generate continuing from a prefilled DynamicCache; times `steps` decode steps."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]],
                 kv: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        from transformers import DynamicCache

        self.model, self.steps = model, steps
        self.input_ids = torch.tensor(prompts)  # [B, context]
        self.cache = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(kv):
            self.cache.update(k, v, layer)
        self.cached_len = self.cache.get_seq_length()

    @torch.inference_mode()
    def generate(self, steps: int) -> tuple[torch.Tensor, list[float]]:
        from transformers import LogitsProcessorList

        stamps = _StepStamps()
        out = self.model.generate(
            self.input_ids, attention_mask=torch.ones_like(self.input_ids), cache=self.cache,
            max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
            logits_processor=LogitsProcessorList([stamps]), pad_token_id=0,
        )
        self.cache.crop(-(steps + 1))
        if self.cache.get_seq_length() != self.cached_len or len(stamps.times) != steps + 1:
            raise RuntimeError("transformers generate did not run the expected steps")
        return out, stamps.times

    def __call__(self) -> tuple[float, float]:
        _, times = self.generate(self.steps)
        return self.input_ids.shape[0] * self.steps, times[-1] - times[0]


class HFPrefill:
    """transformers generate of one token from a `context`-token prompt, empty cache."""

    def __init__(self, model: torch.nn.Module, row: Row, vocab_size: int, seed: int) -> None:
        self.model = model
        self.input_ids = torch.tensor(random_prompts(1, row.context, vocab_size, seed))  # [1, context]

    @torch.inference_mode()
    def __call__(self) -> tuple[float, float]:
        start = time.perf_counter()
        self.model.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                            max_new_tokens=1, do_sample=False, pad_token_id=0)
        return self.input_ids.shape[1], time.perf_counter() - start


def hf_decode_steps(row: Row, steps: int) -> int:
    scaled = steps * HF_FULL_STEPS_TOKENS // (row.batch * row.context)
    return min(steps, max(HF_MIN_STEPS, scaled))


# -- rows --------------------------------------------------------------------------


def decode_measurements(row: Row, loaded: LoadedModel, hf: torch.nn.Module | None,
                        args: argparse.Namespace, seed: int) -> dict[str, Measurement]:
    engine = EngineDecode(loaded, row, args.steps, seed)
    start = time.perf_counter()
    first_tokens, kv = engine.warm_up(export_kv=hf is not None)
    log(f"  engine prefill of {row.batch} x {row.context} tokens + warm-up: {time.perf_counter() - start:.1f} s")
    floor = GemmFloor(engine.engine, row.batch, row.batch, args.steps)
    floor.one_pass()
    read = ReadBandwidth(engine.kv_bytes_per_step())
    read()
    log(f"  KV read per step {read.kv_bytes / 1e6:.1f} MB; bandwidth buffer {read.buffer.nbytes / 1e6:.1f} MB")
    measurements: dict[str, Measurement] = {"engine": engine, "floor": floor, "read": read}
    if row.batch <= args.compile_max_batch:
        start = time.perf_counter()
        compiled = EngineDecode(loaded, row, args.steps, seed, args.compile_max_batch)
        compiled.warm_up(export_kv=False)
        log(f"  compiled engine (compile_max_batch {args.compile_max_batch}) ready: "
            f"{time.perf_counter() - start:.1f} s")
        measurements["compiled"] = compiled
    if hf is not None:
        hf_decode = HFDecode(hf, engine.prompts, kv, hf_decode_steps(row, args.steps))
        del kv
        out, _ = hf_decode.generate(WARMUP_STEPS)
        agree = sum(int(a == b) for a, b in zip(out[:, row.context].tolist(), first_tokens))
        log(f"  first token, transformers vs engine: {agree}/{row.batch} agree; "
            f"transformers decodes {hf_decode.steps} steps per round")
        measurements["hf"] = hf_decode
    llama = None if args.skip_llamacpp else llama_bench(row, args.threads)
    if llama is not None:
        measurements["llamacpp"] = llama
    return measurements


def prefill_measurements(row: Row, loaded: LoadedModel, hf: torch.nn.Module | None,
                         args: argparse.Namespace, seed: int) -> dict[str, Measurement]:
    engine = EnginePrefill(loaded, row, seed)
    engine()  # warm-up
    floor = GemmFloor(engine.engine, row.context, 1, 1)
    floor.one_pass()
    measurements: dict[str, Measurement] = {"engine": engine, "floor": floor}
    if hf is not None:
        measurements["hf"] = HFPrefill(hf, row, loaded.spec.vocab_size, seed)
        measurements["hf"]()  # warm-up
    llama = None if args.skip_llamacpp else llama_bench(row, args.threads)
    if llama is not None:
        measurements["llamacpp"] = llama
    return measurements


def run_row(row: Row, loaded: LoadedModel, label: str, hf: torch.nn.Module | None,
            args: argparse.Namespace, seed: int) -> dict[str, object]:
    log(row.name)
    other_load, started = OtherLoad(), time.perf_counter()
    if row.kind == "decode":
        measurements = decode_measurements(row, loaded, hf, args, seed)
    else:
        measurements = prefill_measurements(row, loaded, hf, args, seed)
    read = measurements.get("read")
    kv_bytes = read.kv_bytes if isinstance(read, ReadBandwidth) else None
    rates = interleave(measurements, args.rounds)
    del measurements, read
    gc.collect()
    log(f"  {time.perf_counter() - started:.0f} s; other processes used {other_load.share():.0%} of the CPUs")
    engine, floor = rates["engine"], rates["floor"]
    read_gbps, hf_rate, llama_rate = rates.get("read"), rates.get("hf"), rates.get("llamacpp")
    compiled = rates.get("compiled")
    step_floor = None
    if read_gbps is not None and kv_bytes is not None:
        step_floor = row.batch / (row.batch / floor + kv_bytes / 1e9 / read_gbps)
    return {
        "kind": row.kind, "batch": row.batch, "context": row.context, "quantization": label,
        "tokens_per_s": round(engine, 1),
        "floor_tokens_per_s": round(floor, 1),
        "read_gbps": _rounded(read_gbps, 2),
        "step_floor_tokens_per_s": _rounded(step_floor, 1),
        "hf_tokens_per_s": _rounded(hf_rate, 1),
        "llamacpp_tokens_per_s": _rounded(llama_rate, 1),
        "compiled_tokens_per_s": _rounded(compiled, 1),
        "ratio_floor": round(engine / floor, 3),
        "ratio_step_floor": None if step_floor is None else round(engine / step_floor, 3),
        "ratio_hf": None if hf_rate is None else round(engine / hf_rate, 3),
        "ratio_llamacpp": None if llama_rate is None else round(engine / llama_rate, 3),
        "ratio_compiled": None if compiled is None else round(compiled / engine, 3),
        "ratio_compiled_llamacpp": None if compiled is None or llama_rate is None else round(compiled / llama_rate, 3),
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def profile_row(row: Row, loaded: LoadedModel, steps: int, seed: int, compile_max_batch: int) -> None:
    """Print the top ops by self CPU time of the engine's timed work on `row`."""
    from torch.profiler import ProfilerActivity, profile

    if row.kind == "decode":
        engine = EngineDecode(loaded, row, steps, seed, compile_max_batch)
        engine.warm_up(export_kv=False)
        seqs = engine.start()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            elapsed = engine.decode(seqs, steps)
        engine.stop(seqs)
        what = f"{steps} engine decode steps, {elapsed / steps * 1e3:.1f} ms per step"
    else:
        prefill = EnginePrefill(loaded, row, seed)
        prefill()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _, elapsed = prefill()
        what = f"one engine prefill step, {elapsed * 1e3:.1f} ms"
    print(f"== {row.name}: {what} (under the profiler)")
    print_breakdown(prof, elapsed, steps if row.kind == "decode" else 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))


# Where a step's time goes, by the profiler's event names (first match wins); the rest of the
# wall time, outside every op, is Python: scheduler, batch preparation, sampling, outputs.
PROFILE_CATEGORIES = (
    ("weight GEMMs", ("aten::mm", "aten::addmm", "pdserve::int4_linear", "pdserve::int8_linear",
                      "mkldnn::_linear_pointwise", "pdserve::int4_dequantize")),
    ("paged attention", ("pdserve::paged_attention",)),
    ("fused kernels of the compiled layer", ("## Call CompiledFxGraph",)),
    ("torch.compile entry (guards, wrappers)", ("TorchDynamo Cache Lookup", "Torch-Compiled Region",
                                                 "Pregraph bytecode", "AOTDispatcher")),
    ("other ATen ops (norms, rope, residuals, KV write, sampling)", ("aten::",)),
)


def print_breakdown(prof, elapsed: float, steps: int) -> None:
    """Milliseconds per step by PROFILE_CATEGORIES (self time), and the wall time outside any op."""
    totals = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    other = 0.0
    for event in prof.key_averages():
        name = next((cat for cat, prefixes in PROFILE_CATEGORIES if event.key.startswith(prefixes)), None)
        if name is None:
            other += event.self_cpu_time_total
        else:
            totals[name] += event.self_cpu_time_total
    wall_ms = elapsed / steps * 1e3
    in_ops = (sum(totals.values()) + other) / 1e3 / steps
    print(f"ms per step (wall {wall_ms:.2f}):")
    for name, micros in totals.items():
        print(f"  {micros / 1e3 / steps:7.2f}  {name}")
    print(f"  {other / 1e3 / steps:7.2f}  other profiled events")
    print(f"  {wall_ms - in_ops:7.2f}  outside any op (Python)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS,
                        help="decode:BATCH:CONTEXT and prefill:CONTEXT, optionally @int8 or @int4; comma-separated")
    parser.add_argument("--dtype", default=None,
                        help="dense dtype (bfloat16, float32, ...); default: the engine's default for this host")
    parser.add_argument("--quantization", default="",
                        help="comma-separated int4,int8: add an @q copy of every unsuffixed row")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row; columns are medians")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers")
    parser.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp's llama-bench")
    parser.add_argument("--profile", action="store_true", help="profile the engine's timed work instead")
    parser.add_argument("--compile-max-batch", type=int, default=0,
                        help="also time decode rows of at most this batch with EngineConfig(compile_max_batch=N) "
                             "(compiled_tokens_per_s); with --profile, profile that engine")
    args = parser.parse_args()
    rows = parse_rows(args.rows, parse_quantizations(args.quantization))
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        raise SystemExit("--rounds, --steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    started, other_load = time.perf_counter(), OtherLoad()
    models = Models(args.dtype)
    if args.profile:
        for i, row in enumerate(rows):
            loaded = models.get(row.quantization)
            if loaded is not None:
                profile_row(row, loaded, args.steps, 1000 * i, args.compile_max_batch)
        return
    hf = None if args.skip_hf else build_hf_model(models.dense)
    log(f"threads {args.threads}, rounds {args.rounds}, steps {args.steps}, dense dtype {models.dtype}, "
        f"torch {torch.__version__}")
    for i, row in enumerate(rows):
        loaded = models.get(row.quantization)
        if loaded is None:
            log(f"{row.name}: skipped (no {row.quantization} in this engine)")
            continue
        print(json.dumps(run_row(row, loaded, models.label(row), hf, args, seed=1000 * i)), flush=True)
    log(f"total {time.perf_counter() - started:.0f} s; other processes used {other_load.share():.0%} of the CPUs")


if __name__ == "__main__":
    main()
