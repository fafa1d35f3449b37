"""Structured output: sampling constrained to a JSON schema, a regular expression, a grammar or a
list of choices.

Owns the grammar library (llguidance: chosen by measurement, bench/grammar_backends.py and the
README), behind three things:
- `GrammarCompiler`: a request's `StructuredOutput` compiled against the model's tokenizer, once
  per distinct spec: the compiled matcher is kept as a template (LRU, bounded in count and in the
  characters of the specs and grammars it holds) and each sequence gets a copy. Any thread may
  call it: the daemons compile before submitting, off the engine thread and under a deadline
  (`EngineLoop.compile_grammar`), so a heavy schema never stalls a step. A spec that does not
  compile is an InvalidRequestError naming its field. llguidance's parser limits bound the work
  of one compile and of one mask.
- `GrammarMatcher`: one sequence's position in its grammar; it follows every token the sequence
  takes (sampled here, sampled by a prefill worker, or resumed).
- `TokenMasks`: the tokens each constrained row of a batch may take next, as a bitmask, applied to
  the logits before anything samples: masked tokens get -inf. Rows without a grammar are not touched.
The library is imported on first use, so an engine that never sees a constrained request does not
load it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from pdserve.engine.sampling_params import StructuredOutput
from pdserve.errors import InvalidRequestError

log = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256
# JSON is written on one line with these separators: free whitespace lets a model spin in blanks
# (a random one always does) until max_tokens, and buys nothing a parser reads.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_CACHED_CHARS = 64 * 2**20


def _llguidance() -> Any:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    return llguidance


class GrammarMatcher:
    """One sequence's state in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def consume(self, token_id: int) -> bool:
        """Advance past a token; False if the grammar does not allow it (the matcher is then broken)."""
        return bool(self._matcher.consume_token(token_id))

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and allows nothing more (EOS aside)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer; thread-safe (see the module docstring)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 max_entries: int = MAX_CACHED_GRAMMARS, max_chars: int = MAX_CACHED_CHARS) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self.max_entries, self.max_chars = max_entries, max_chars
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # llguidance's view of the vocabulary, built on first use (~1 s)
        self._cache: OrderedDict[StructuredOutput, tuple[Any, int]] = OrderedDict()  # -> (template, chars)
        self._num_chars = 0
        self.num_compiled = 0  # misses, for tests and metrics

    def compile(self, spec: StructuredOutput) -> None:
        """Compile `spec` into the cache (a no-op when it is there); InvalidRequestError if it does not compile."""
        self._template(spec)

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A new matcher at the start of `spec`'s grammar (compiled here if it is not cached)."""
        return GrammarMatcher(self._template(spec).deep_copy())

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def num_cached_chars(self) -> int:
        return self._num_chars

    def _template(self, spec: StructuredOutput) -> Any:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit[0]
            tokenizer = self._llg_tokenizer()
        lib = _llguidance()
        grammar = _grammar(lib, spec)
        template = lib.LLMatcher(tokenizer, grammar, log_level=0)  # the compile; drops the GIL
        if template.is_error():
            raise InvalidRequestError(spec.field, f"does not compile: {_short(template.get_error())}")
        chars = spec.num_chars + len(grammar)
        with self._lock:
            self.num_compiled += 1
            if spec not in self._cache:
                self._cache[spec] = (template, chars)
                self._num_chars += chars
            while len(self._cache) > self.max_entries or (self._num_chars > self.max_chars and len(self._cache) > 1):
                _, (_, evicted) = self._cache.popitem(last=False)
                self._num_chars -= evicted
        return template

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = _llguidance().hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=self._eos)
        return self._tokenizer


def _grammar(lib: Any, spec: StructuredOutput) -> str:
    """llguidance's grammar text for a spec; InvalidRequestError for a spec that is not even well formed."""
    try:
        if spec.json_schema is not None or spec.json_object:
            schema = spec.json_schema if spec.json_schema is not None else '{"type": "object"}'
            return lib.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_LAYOUT)
        if spec.regex is not None:  # \d and \w in ASCII, as JSON Schema's `pattern` reads them
            return lib.LLMatcher.grammar_from_lark(f"start: /{lib.regex_to_lark(spec.regex, 'dw')}/")
        if spec.grammar is not None:  # Lark, or GBNF (llama.cpp's), which the library turns into Lark
            return lib.grammar_from("grammar", spec.grammar)
        return lib.grammar_from("choice", list(spec.choice))
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(spec.field, _short(str(exc))) from None


def _short(message: str, limit: int = 300) -> str:
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


class TokenMasks:
    """Applies the grammars of a batch's constrained rows to its logits (see the module docstring).

    The masks are filled one row after another (on 2 cores llguidance's thread pool measured
    slower than that, bench/grammar_backends.py), then applied in place by the compiled op
    `pdserve::apply_token_bitmask_` (csrc/token_mask.cpp) on CPU float32 logits, or by
    `apply_token_bitmask_reference` elsewhere.
    """

    def __init__(self) -> None:
        self._op: Any = None  # the compiled op, once looked up (False: not available)

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, GrammarMatcher]]) -> None:
        """Set to -inf, in place, the [B, V] float logits of the tokens each (row, matcher) forbids."""
        if not rows:
            return
        fill = _llguidance().torch.fill_next_token_bitmask
        bitmask = torch.empty(len(rows), (logits.shape[1] + 31) // 32, dtype=torch.int32)
        for i, (_, matcher) in enumerate(rows):
            fill(matcher._matcher, bitmask, i)
        index = torch.tensor([row for row, _ in rows], dtype=torch.long)
        on_cpu = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous()
        if on_cpu and (op := self._compiled_op()):  # (never looked up for CUDA: no CPU library built there)
            op(logits, index, bitmask)
        else:
            apply_token_bitmask_reference(logits, index.to(logits.device), bitmask.to(logits.device))

    def _compiled_op(self) -> Any:
        if self._op is None:
            from pdserve.engine import kernels

            self._op = kernels.load() is not None and torch.ops.pdserve.apply_token_bitmask_.default
        return self._op


def apply_token_bitmask_reference(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits[rows[r], t] = -inf where bit t % 32 of bitmask[r, t // 32] is clear (and past the mask)."""
    vocab_size = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1).bool()  # [R, 32 W]
    if allowed.shape[1] < vocab_size:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab_size - allowed.shape[1])], dim=1)
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab_size], float("-inf"))
