"""What a request asks of sampling and stopping (`SamplingParams`), validated on construction.

Every bad value is an InvalidRequestError naming its field, so that the daemons answer it
with INVALID_ARGUMENT before anything is queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20
MAX_SEED = 2**63
MAX_N = 128  # OpenAI's limit on samples per request
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_LOGIT_BIAS = 100.0
MAX_STRUCTURED_OUTPUT_CHARS = 256 * 1024  # a schema, regex or grammar; the choices together
MAX_CHOICES = 1024
STRUCTURED_OUTPUT_KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# Below this temperature, logits / temperature can overflow float32; such rows are greedy.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: exactly one of a JSON Schema (JSON text), any JSON object, a
    regular expression, a grammar (Lark or GBNF) or one of a list of strings. Whether the spec
    compiles is `structured_output.GrammarCompiler`'s to say (it needs the tokenizer)."""

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False, ())]
        if len(given) != 1:
            raise InvalidRequestError("structured_output", f"give exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}"
                                      f" (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind == "choice":
            object.__setattr__(self, "choice", tuple(self.choice))
            if len(self.choice) > MAX_CHOICES or not all(isinstance(c, str) and c for c in self.choice):
                raise InvalidRequestError(self.field, f"at most {MAX_CHOICES} non-empty strings")
        elif kind != "json_object" and not isinstance(getattr(self, kind), str):
            raise InvalidRequestError(self.field, "must be a string")
        if self.num_chars > MAX_STRUCTURED_OUTPUT_CHARS:
            raise InvalidRequestError(self.field, f"{self.num_chars} characters, more than "
                                      f"{MAX_STRUCTURED_OUTPUT_CHARS}")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False, ()))

    @property
    def field(self) -> str:
        """The request field an error about it names."""
        return f"structured_output.{self.kind}"

    @property
    def num_chars(self) -> int:
        return sum(map(len, self.choice)) + len(self.json_schema or self.regex or self.grammar or "")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    # bool is an int subclass, but max_tokens=True is a bug in the caller, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(name, f"must be {bound}, got {value}")


def _check_float(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidRequestError(name, f"must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each generated token and when to stop; validated on construction."""

    max_tokens: int = 256
    # 0 means greedy (and so does anything below MIN_TEMPERATURE).
    temperature: float = 1.0
    # In (0, 1]: keep the smallest set of tokens whose probability mass reaches top_p.
    top_p: float = 1.0
    # 0 means off.
    top_k: int = 0
    # In [0, 1]: drop tokens with probability below min_p times the top probability.
    min_p: float = 0.0
    # > 0, HF semantics, over prompt and output tokens.
    repetition_penalty: float = 1.0
    # In [-2, 2], OpenAI semantics, over output tokens.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # None: the engine draws one at submission.
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: off; else the number of top alternatives (0..MAX_LOGPROBS) reported per token.
    logprobs: int | None = None
    # None: off; else report each prompt token's logprob (from the second on), with this many
    # top alternatives (0..MAX_LOGPROBS). Such a prompt is computed whole: no prefix-cache hit.
    prompt_logprobs: int | None = None
    # (token id, value) pairs added to those tokens' logits before anything else, values in [-100, 100]
    # (OpenAI's logit_bias; -100 all but bans a token). Ids are checked against the vocabulary at submission.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Independent samples of the same prompt: one prefill, n decodes sharing its KV blocks.
    n: int = 1
    # Constrain the output (JSON schema, regex, grammar, choices); None: unconstrained.
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("n", self.n, 1, MAX_N)
        _check_int("top_k", self.top_k, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"must be a bool, got {type(self.ignore_eos).__name__}")
        self._validate_floats()
        object.__setattr__(self, "stop", _validated_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _validated_stop_token_ids(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _validated_logit_bias(self.logit_bias))
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise InvalidRequestError("structured_output", f"must be a StructuredOutput, got "
                                      f"{type(self.structured_output).__name__}")

    def _validate_floats(self) -> None:
        # (name, lowest, highest, whether the lowest value itself is allowed)
        ranges = (
            ("temperature", 0.0, math.inf, True),
            ("top_p", 0.0, 1.0, False),
            ("min_p", 0.0, 1.0, True),
            ("repetition_penalty", 0.0, math.inf, False),
            ("presence_penalty", -2.0, 2.0, True),
            ("frequency_penalty", -2.0, 2.0, True),
        )
        for name, low, high, low_ok in ranges:
            value = _check_float(name, getattr(self, name))
            if value > high or value < low or (value == low and not low_ok):
                interval = f"{'[' if low_ok else '('}{low}, {high}]"
                raise InvalidRequestError(name, f"must be in {interval}, got {value}")
            # Store ints given for float fields as floats, so equal params compare and hash equal.
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _validated_stop(stop: object) -> tuple[str, ...]:
    # Not a bare string: taking it as one stop string, or as its characters, would be a guess.
    if not isinstance(stop, (tuple, list)):
        raise InvalidRequestError("stop", f"must be a tuple of strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                "stop", f"each stop string must be a non-empty str of at most {MAX_STOP_STRING_CHARS} chars"
            )
    return tuple(stop)


def _validated_logit_bias(pairs: object) -> tuple[tuple[int, float], ...]:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    if not isinstance(items, (tuple, list, type({}.items()))):
        raise InvalidRequestError("logit_bias", f"must map token ids to numbers, got {type(pairs).__name__}")
    items = list(items)
    if len(items) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidRequestError("logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(items)}")
    out = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise InvalidRequestError("logit_bias", "must map token ids to numbers")
        token_id, value = item
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise InvalidRequestError("logit_bias", f"token ids must be ints >= 0, got {token_id!r}")
        value = _check_float(f"logit_bias[{token_id}]", value)
        if abs(value) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias[{token_id}]", f"must be in [-100, 100], got {value}")
        out[token_id] = value
    return tuple(sorted(out.items()))


def _validated_stop_token_ids(ids: object) -> tuple[int, ...]:
    if not isinstance(ids, (tuple, list)):
        raise InvalidRequestError("stop_token_ids", f"must be a tuple of ints, got {type(ids).__name__}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InvalidRequestError("stop_token_ids", "each stop token id must be an int >= 0")
    return tuple(ids)
