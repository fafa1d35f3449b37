"""Structured-output libraries side by side: xgrammar, llguidance and outlines-core on SmolLM2.

Usage: HF_HUB_OFFLINE=1 python bench/grammar_backends.py [--steps 100] [--batch 1,32]
           [--libs xgrammar,llguidance,outlines-core] [--step-grammars json_schema,json_object]
           [--engine-steps 32] [--skip-engine] [--json PATH]

Chooses pdserve's grammar-constrained decoding library by measurement. Every library runs
in this one process, on the same inputs, with SmolLM2-135M-Instruct's tokenizer (vocab
49152), read from pdserve's GGUF cache entry (config and tokenizer files only; the model
hub is never asked). Tables go to stdout, progress to stderr; --json writes every raw figure.

What is measured
1. Import and tokenizer info, one-off per process: the library's vocabulary object built
   from the HF tokenizer (xgrammar TokenizerInfo.from_huggingface, llguidance
   llguidance.hf.from_tokenizer, outlines-core Vocabulary from the byte-decoded vocab).
   "import ms" covers the library's modules with its torch kernels; torch._dynamo, which
   llguidance's and outlines-core's torch.compile'd kernels import (about 3 s), is imported
   beforehand, untimed: pdserve's compiled decode path loads it anyway. "apply 1st call":
   the first call of the library's logits-masking function (llguidance's and
   outlines-core's are torch.compile'd: that call compiles them).
2. Compile, per grammar kind of GRAMMARS: a JSON schema of 11 properties (a nested object,
   an enum, arrays of numbers and strings, integers, a boolean, required fields), any JSON
   object ({"type": "object"}), a date regex, an arithmetic grammar as GBNF-style EBNF and
   as Lark, and a choice among three strings:
   - cold: the first compile in the process;
   - again: the same source once more (xgrammar's compiler caches; the other two do not, so
     "again" is what a second request with the schema pays unless pdserve caches it);
   - matcher: a per-request matcher from the compiled grammar (xgrammar GrammarMatcher,
     llguidance deep_copy of a compiled template LLMatcher, outlines-core Guide);
   - first mask: the first bitmask of that fresh matcher.
   JSON is compact for every library (no free whitespace, separators "," and ":") with JSON
   Schema's semantics (xgrammar strict_mode=False), so all three constrain one language.
   outlines-core is regex-only: no EBNF or Lark, and any JSON object is its regex
   approximation (objects nested at most 3 deep).
3. Per decode step, for each grammar of --step-grammars at each --batch size B: B
   independent matchers, first staggered (row i advances alone by 0..STAGGER_MAX random
   tokens), then each step:
   (a) fill: the [B, 1536] int32 bitmask of every row;
   (b) apply: that bitmask onto float32 logits [B, 49152] with the library's own function
       (xgrammar's C++ CPU kernel; llguidance's and outlines-core's torch.compile'd ones);
   (c) accept: every row's token.
   The token is the argmax of the masked logits: fresh N(0, 1) logits each step, plus a bias
   on the tokens holding `"`, `,`, `}` or `]` in a random quarter of the rows, so strings and
   arrays close after a few tokens as a model's would. A row that takes EOS is a finished
   request and a fresh matcher takes its place (untimed: the compile table's "matcher").
   Modes: "batch", the library's batch API on every core (xgrammar BatchGrammarMatcher,
   llguidance LLExecutor), and "serial", one matcher after another on this thread
   (outlines-core has only that). After WARMUP_STEPS untimed steps, the --steps timed steps
   of all libraries and modes are interleaved (one step each, in rotating order), so they
   share the machine's noise; the table gives means, and the total's median. "rejected"
   counts tokens a library refused although its own mask allowed them (should be 0).
4. The reference: pdserve's LLMEngine on SmolLM2 in fp32, B requests of 128-token random
   prompts, greedy; seconds per engine.step() once all B decode, measured before and after
   the grammar work; the lower of the two medians is used (other processes only add time).
   The issue's target: mask work (fill + apply + accept) under 10% of one batch-32 decode
   step. Every timed block first waits (at most QUIET_MAX_WAIT_S) for a quiet machine;
   "busy" is the share of the CPUs other processes took meanwhile.
5. JSON-schema keywords: a small schema per keyword, one valid and one invalid instance
   (compact JSON, tokenized by the HF tokenizer, then EOS): "ok" when the valid one is
   accepted and the invalid one refused, "ignored" when both pass, "rejects valid", or the
   compile error. And the exception each library raises on a bad schema.

A library that fails to import, or cannot compile a kind, is reported as such, not a crash.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import pathlib
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pdserve.engine.gguf_cache import GgufCacheEntry
from pdserve.engine.model_loader import default_model_path, load_model
from pdserve.errors import InvalidRequestError

from engine import OtherLoad, wait_until_quiet  # bench/engine.py, beside this script

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

LIBS = ("xgrammar", "llguidance", "outlines-core")
# What "import ms" times: each library's modules, its torch kernels included.
MODULES = {"xgrammar": ("xgrammar",), "llguidance": ("llguidance", "llguidance.hf", "llguidance.torch"),
           "outlines-core": ("outlines_core", "outlines_core.kernels.torch")}
JSON_KINDS = ("json_schema", "json_object")
PROMPT_LEN = 128
BLOCK_SIZE = 16
ENGINE_WARMUP_STEPS = 2
WARMUP_STEPS = 8
STAGGER_MAX = 24
STRUCTURAL_CHARS = ('"', ",", "}", "]")
STRUCTURAL_BIAS = 8.0  # lifts an allowed structural token above every N(0, 1) logit
BIASED_ROW_SHARE = 0.25
TARGET_SHARE = 0.10  # the issue's budget: mask work per step / one batch-32 decode step
AGAIN_MAX_S = 2.0  # a cold compile slower than this is not repeated
MATCHER_REPEATS = 5
# Before each timed block, wait (at most QUIET_MAX_WAIT_S) for other processes to use at most 10% of the CPUs
# (bench/engine.py's wait_until_quiet): on these shared 2-core VMs they slow OpenMP-threaded torch ops by up to 50x.
QUIET_MAX_WAIT_S = 30.0
APPLY_REFERENCE_REPEATS = 50

JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string"},
        "email": {"type": "string"},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number"},
        "ratings": {"type": "array", "items": {"type": "number"}},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "age": {"type": "integer"},
        "notes": {"type": "string"},
    },
    "required": ["id", "name", "active", "role", "ratings", "address"],
    "additionalProperties": False,
}
EBNF_GRAMMAR = """root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""
LARK_GRAMMAR = """start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
GRAMMARS: dict[str, Any] = {
    "json_schema": JSON_SCHEMA,
    "json_object": {"type": "object"},
    "regex": r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "ebnf": EBNF_GRAMMAR,
    "lark": LARK_GRAMMAR,
    "choice": ["positive", "negative", "neutral"],
}

_NODE = {"type": "object", "properties": {"v": {"type": "integer"},
                                          "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
         "required": ["v", "next"], "additionalProperties": False}
# (keyword, schema, a valid instance, an invalid one); instances are dumped as compact JSON.
FEATURES: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("$ref/$defs", {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"]},
     {"a": {"x": 1}}, {"a": {"x": "s"}}),
    ("recursive $ref", {"$defs": {"node": _NODE}, "$ref": "#/$defs/node"},
     {"v": 1, "next": {"v": 2, "next": None}}, {"v": 1, "next": {"v": "x", "next": None}}),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "hi", True),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     {"a": 1, "b": "x"}, {"a": 1}),
    ("const", {"const": "fixed"}, "fixed", "other"),
    ("pattern", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "abc-12"),
    ("format: date", {"type": "string", "format": "date"}, "2024-05-01", "May 1st"),
    ("format: email", {"type": "string", "format": "email"}, "a@b.com", "not an email"),
    ("minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdefg"),
    ("minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 10}, 7, 42),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    ("minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     [1, 2], [1, 2, 3]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [1, "a"], ["a", 1]),
    ("additionalProperties: schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"k": 1}, {"k": "v"}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x_": {"type": "integer"}},
                           "additionalProperties": False}, {"x_a": 1}, {"y": 1}),
    ("required (of several)", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                               "required": ["b"]}, {"b": 1}, {"a": 1}),
    ("not", {"not": {"type": "string"}}, 1, "s"),
]
BAD_SCHEMAS: dict[str, Any] = {
    "malformed JSON": '{"type": "object", "properties": ',
    "unknown type": {"type": "foo"},
    "dangling $ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    "bad pattern": {"type": "string", "pattern": "[unclosed"},
}


class Unsupported(Exception):
    """The library has no way to compile this kind of grammar."""


class GrammarError(Exception):
    """A grammar the library refused without raising (llguidance reports errors through is_error())."""


@dataclass(frozen=True)
class Vocab:
    tokenizer: PreTrainedTokenizerBase
    size: int  # the LM head's rows: every bitmask covers this many tokens
    eos_ids: tuple[int, ...]

    @property
    def num_words(self) -> int:
        return -(-self.size // 32)


# -- the libraries ---------------------------------------------------------------------


class Backend:
    """One library behind the operations a constrained decode step needs."""

    name = ""
    has_batch_api = False
    caches_compiles = False

    def __init__(self, vocab: Vocab, threads: int) -> None:
        self.vocab, self.threads = vocab, threads
        self.eager_apply = False  # set when the library's own apply failed (e.g. torch.compile)

    def compile(self, kind: str, source: Any) -> Any:
        raise NotImplementedError

    def new_matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matchers: list[Any], bitmask: torch.Tensor, parallel: bool) -> None:
        """bitmask[i] = the allowed tokens of matchers[i]; bitmask is [len(matchers), words] int32."""
        raise NotImplementedError

    def own_apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def accept(self, matchers: list[Any], tokens: list[int], parallel: bool) -> list[bool]:
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """-inf into logits [B, V] wherever bitmask [B, words] has a 0 bit."""
        if self.eager_apply:
            torch_apply(logits, bitmask)
        else:
            self.own_apply(logits, bitmask)

    def accepts_text(self, compiled: Any, token_ids: list[int]) -> bool:
        """Whether a fresh matcher takes all of token_ids and then EOS."""
        matcher = self.new_matcher(compiled)
        return all(self.accept([matcher], [t], False)[0] for t in [*token_ids, self.vocab.eos_ids[0]])


class XGrammarBackend(Backend):
    name = "xgrammar"
    has_batch_api = True
    caches_compiles = True

    def __init__(self, vocab: Vocab, threads: int) -> None:
        import xgrammar

        super().__init__(vocab, threads)
        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            vocab.tokenizer, vocab_size=vocab.size, stop_token_ids=list(vocab.eos_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)  # "auto" would be half the cores

    def compile(self, kind: str, source: Any) -> Any:
        if kind in JSON_KINDS:
            return self.compiler.compile_json_schema(
                schema_text(source), any_whitespace=False, separators=(",", ":"), strict_mode=False)
        if kind == "regex":
            return self.compiler.compile_regex(source)
        if kind == "ebnf":
            return self.compiler.compile_grammar(source)
        if kind == "lark":
            return self.compiler.compile_lark(source)
        if kind == "choice":
            return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in source))
        raise Unsupported(kind)

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor, parallel: bool) -> None:
        if parallel:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)
        else:
            for i, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, i)

    def own_apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list[Any], tokens: list[int], parallel: bool) -> list[bool]:
        if parallel:
            return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        return [matcher.accept_token(token) for matcher, token in zip(matchers, tokens)]


class LLGuidanceBackend(Backend):
    name = "llguidance"
    has_batch_api = True

    def __init__(self, vocab: Vocab, threads: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        super().__init__(vocab, threads)
        self.llg, self.kernels = llguidance, llguidance.torch
        self.tokenizer = llguidance.hf.from_tokenizer(vocab.tokenizer, n_vocab=vocab.size,
                                                      eos_token=list(vocab.eos_ids))
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def _grammar(self, kind: str, source: Any) -> str:
        matcher = self.llg.LLMatcher
        if kind in JSON_KINDS:
            return matcher.grammar_from_json_schema(schema_text(source), overrides={"whitespace_flexible": False})
        if kind == "regex":
            return matcher.grammar_from_regex(source)
        if kind == "ebnf":
            return self.llg.grammar_from("ebnf", source)  # GBNF, converted to Lark
        if kind == "lark":
            return matcher.grammar_from_lark(source)
        if kind == "choice":
            return self.llg.grammar_from("choice", json.dumps(source))
        raise Unsupported(kind)

    def compile(self, kind: str, source: Any) -> Any:
        # No compiled-grammar object: the matcher is built from the grammar text. It is kept as
        # the template each request's matcher is deep-copied from.
        template = self.llg.LLMatcher(self.tokenizer, self._grammar(kind, source), log_level=0)
        if template.is_error():
            raise GrammarError(f"LLMatcher.is_error(); get_error(): {template.get_error()}")
        return template

    def new_matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matchers: list[Any], bitmask: torch.Tensor, parallel: bool) -> None:
        if parallel:
            self.kernels.fill_next_token_bitmask_par(self.executor, list(zip(matchers, range(len(matchers)))), bitmask)
        else:
            for i, matcher in enumerate(matchers):
                self.kernels.fill_next_token_bitmask(matcher, bitmask, i)

    def own_apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.kernels.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list[Any], tokens: list[int], parallel: bool) -> list[bool]:
        if parallel:
            return self.kernels.consume_token_par(self.executor, list(zip(matchers, tokens)))
        return [matcher.consume_token(token) for matcher, token in zip(matchers, tokens)]


class OutlinesBackend(Backend):
    name = "outlines-core"

    def __init__(self, vocab: Vocab, threads: int) -> None:
        import outlines_core
        import outlines_core.kernels.torch

        super().__init__(vocab, threads)
        self.oc, self.kernels = outlines_core, outlines_core.kernels.torch
        self.vocabulary = outlines_core.Vocabulary(vocab.eos_ids[0], byte_vocabulary(vocab))

    def _regex(self, kind: str, source: Any) -> str:
        if kind in JSON_KINDS:
            return self.oc.json_schema.build_regex_from_schema(schema_text(source), whitespace_pattern="")
        if kind == "regex":
            return source
        if kind == "choice":
            return "|".join(re.escape(choice) for choice in source)
        raise Unsupported("regex-only library: no context-free grammars")

    def compile(self, kind: str, source: Any) -> Any:
        return self.oc.Index(self._regex(kind, source), self.vocabulary)

    def new_matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor, parallel: bool) -> None:
        for i, guide in enumerate(matchers):
            self.kernels.fill_next_token_bitmask(guide, bitmask[i : i + 1])  # one row at a time only

    def own_apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.kernels.apply_token_bitmask_inplace(logits, bitmask)

    def accept(self, matchers: list[Any], tokens: list[int], parallel: bool) -> list[bool]:
        return [self._advance(guide, token) for guide, token in zip(matchers, tokens)]

    def _advance(self, guide: Any, token: int) -> bool:
        # EOS is in the mask of a final state, but Guide.advance(eos) raises: it has no transition.
        if token in self.vocab.eos_ids:
            return guide.is_finished()
        try:
            guide.advance(token, return_tokens=False)
        except ValueError:  # "No next state found for the current state"
            return False
        return True


BACKENDS: dict[str, type[Backend]] = {
    "xgrammar": XGrammarBackend, "llguidance": LLGuidanceBackend, "outlines-core": OutlinesBackend,
}


def schema_text(source: Any) -> str:
    return source if isinstance(source, str) else json.dumps(source)


def byte_vocabulary(vocab: Vocab) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes (byte-level BPE's stand-in characters mapped back); special tokens left out."""
    decoder = byte_level_decoder()
    special = set(vocab.tokenizer.all_special_ids)
    tokens: dict[bytes, list[int]] = {}
    for token, token_id in vocab.tokenizer.get_vocab().items():
        if token_id in special or token_id >= vocab.size:
            continue
        try:
            raw = bytes(decoder[char] for char in token)
        except KeyError as error:
            raise Unsupported(f"token {token!r} is not byte-level BPE; only those vocabularies are handled") from error
        tokens.setdefault(raw, []).append(token_id)
    return tokens


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [byte for byte in range(256) if byte not in printable]
    decoder = {chr(byte): byte for byte in printable}
    decoder |= {chr(256 + n): byte for n, byte in enumerate(others)}
    return decoder


_BITS = torch.arange(32, dtype=torch.int32)


def torch_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """The reference apply in eager torch: unpack 32 bits per int32 word, -inf where a bit is 0."""
    rows = bitmask.shape[0]
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).bool().view(rows, -1)[:, : logits.shape[1]]  # [B, V]
    logits.masked_fill_(~allowed, float("-inf"))


# -- measurements ----------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def dependencies(dist: str) -> dict[str, Any]:
    """The distribution's version, its requirements, and those pdserve does not already require, with sizes."""
    own = {_req_name(r) for r in importlib.metadata.requires("pdserve") or [] if "extra ==" not in r}
    requires = sorted({_req_name(r) for r in importlib.metadata.requires(dist) or [] if "extra ==" not in r})
    return {
        "version": importlib.metadata.version(dist),
        "requires": requires,
        "installed_mb": _installed_mb(dist),
        "new_dependencies_mb": {name: _installed_mb(name) for name in requires if name not in own},
    }


def _req_name(requirement: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _installed_mb(dist: str) -> float | None:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return round(sum(f.size or 0 for f in files) / 1e6, 1)


def open_backend(lib: str, vocab: Vocab, threads: int) -> tuple[Backend | None, dict[str, Any]]:
    """The library's backend with its one-off costs, or None and why it is unavailable."""
    record: dict[str, Any] = {"available": False}
    try:
        record |= dependencies(lib)
        record["import_ms"] = timed(lambda: [importlib.import_module(m) for m in MODULES[lib]])[0] * 1e3
        seconds, backend = timed(lambda: BACKENDS[lib](vocab, threads))
    except Exception as error:  # an import or a tokenizer the library cannot take: reported, not fatal
        record["error"] = describe(error)
        return None, record
    record |= {"available": True, "tokenizer_info_ms": seconds * 1e3}
    logits, bitmask = torch.zeros(1, vocab.size), torch.full((1, vocab.num_words), -1, dtype=torch.int32)
    try:
        record["apply_first_call_ms"] = timed(lambda: backend.own_apply(logits, bitmask))[0] * 1e3
    except Exception as error:  # torch.compile'd kernels need a working C++ toolchain
        backend.eager_apply = True
        record["apply_note"] = f"own apply failed ({describe(error)}); eager torch used"
    return backend, record


def measure_compile(backend: Backend, kind: str, source: Any, num_words: int) -> tuple[dict[str, Any], Any]:
    """Cold and repeated compile, new matcher and first mask of one grammar; and the compiled grammar."""
    try:
        cold, compiled = timed(lambda: backend.compile(kind, source))
    except Unsupported as error:
        return {"status": "unsupported", "note": str(error)}, None
    except Exception as error:  # the library's own refusal, whatever its type
        return {"status": "error", "error": describe(error)}, None
    again = timed(lambda: backend.compile(kind, source))[0] if cold < AGAIN_MAX_S else None
    matcher_s = min(timed(lambda: backend.new_matcher(compiled))[0] for _ in range(MATCHER_REPEATS))
    bitmask = torch.full((1, num_words), -1, dtype=torch.int32)
    first_mask = timed(lambda: backend.fill([backend.new_matcher(compiled)], bitmask, False))[0]
    figures = {
        "status": "ok", "cold_ms": cold * 1e3, "again_ms": None if again is None else again * 1e3,
        "cached": backend.caches_compiles, "matcher_us": matcher_s * 1e6, "first_mask_us": first_mask * 1e6,
    }
    if backend.name == "outlines-core" and kind == "json_object":
        figures["note"] = "regex approximation, objects nested <= 3 deep"
    return figures, compiled


def probe_features(backend: Backend, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """Per JSON-schema keyword: ok, ignored, rejects valid, or the compile error."""
    results = {}
    for keyword, schema, valid, invalid in FEATURES:
        try:
            compiled = backend.compile("json_schema", schema)
            passes = [backend.accepts_text(compiled, tokenizer.encode(compact(instance), add_special_tokens=False))
                      for instance in (valid, invalid)]
        except Exception as error:
            results[keyword] = "error: " + describe(error)
            continue
        results[keyword] = "rejects valid" if not passes[0] else "ignored" if passes[1] else "ok"
    return results


def probe_errors(backend: Backend) -> dict[str, str]:
    """What compiling each of BAD_SCHEMAS raises (type: first line of the message)."""
    results = {}
    for case, schema in BAD_SCHEMAS.items():
        try:
            backend.compile("json_schema", schema)
            results[case] = "accepted (no error)"
        except Exception as error:
            results[case] = describe(error)
    return results


def compact(instance: Any) -> str:
    return json.dumps(instance, separators=(",", ":"))


def structural_tokens(vocab: Vocab) -> torch.Tensor:
    """[V] float: STRUCTURAL_BIAS on the tokens holding one of STRUCTURAL_CHARS, else 0."""
    bias = torch.zeros(vocab.size)
    for token, token_id in vocab.tokenizer.get_vocab().items():
        if token_id < vocab.size and any(char in token for char in STRUCTURAL_CHARS):
            bias[token_id] = STRUCTURAL_BIAS
    return bias


class StepDriver:
    """`batch` matchers of one compiled grammar, each driven along its own valid token path."""

    def __init__(self, backend: Backend, compiled: Any, batch: int, parallel: bool, bias: torch.Tensor,
                 seed: int) -> None:
        self.backend, self.compiled, self.parallel, self.bias = backend, compiled, parallel, bias
        self.eos_ids = backend.vocab.eos_ids
        self.matchers = [backend.new_matcher(compiled) for _ in range(batch)]
        self.bitmask = torch.full((batch, backend.vocab.num_words), -1, dtype=torch.int32)  # [B, words]
        self.rng, self.generator = random.Random(seed), torch.Generator().manual_seed(seed)
        self.times: list[tuple[int, int, int]] = []  # ns of fill, apply, accept per timed step
        self.num_finished = self.num_rejected = 0

    def prepare(self) -> None:
        """Stagger the rows into different states, then run WARMUP_STEPS untimed steps."""
        for row in range(len(self.matchers)):
            for _ in range(self.rng.randrange(STAGGER_MAX + 1)):
                self.step([row], parallel=False)
        for _ in range(WARMUP_STEPS):
            self.step()
        self.num_finished = self.num_rejected = 0

    def timed_step(self) -> None:
        self.times.append(self.step())

    def figures(self) -> dict[str, Any]:
        fill, apply, accept = ([t[i] / 1e3 for t in self.times] for i in range(3))
        return {
            "fill_us": summary(fill), "apply_us": summary(apply), "accept_us": summary(accept),
            "total_us": summary([sum(t) / 1e3 for t in self.times]),
            "num_finished": self.num_finished, "num_rejected": self.num_rejected,
        }

    def step(self, rows: list[int] | None = None, parallel: bool | None = None) -> tuple[int, int, int]:
        """One decode step of `rows` (all by default); nanoseconds of fill, apply and accept."""
        rows = list(range(len(self.matchers))) if rows is None else rows
        parallel = self.parallel if parallel is None else parallel
        matchers, bitmask = [self.matchers[i] for i in rows], self.bitmask[: len(rows)]
        start = time.perf_counter_ns()
        self.backend.fill(matchers, bitmask, parallel)
        filled = time.perf_counter_ns()
        logits = self._logits(len(rows))  # [B, V], untimed: the model's part
        start_apply = time.perf_counter_ns()
        self.backend.apply(logits, bitmask)
        applied = time.perf_counter_ns()
        tokens = logits.argmax(dim=-1).tolist()
        start_accept = time.perf_counter_ns()
        accepted = self.backend.accept(matchers, tokens, parallel)
        done = time.perf_counter_ns()
        self._retire(rows, tokens, accepted)
        return filled - start, applied - start_apply, done - start_accept

    def _logits(self, num_rows: int) -> torch.Tensor:
        logits = torch.randn(num_rows, self.bias.shape[0], generator=self.generator)  # [B, V]
        biased = torch.rand(num_rows, generator=self.generator) < BIASED_ROW_SHARE  # [B]
        logits[biased] += self.bias
        return logits

    def _retire(self, rows: list[int], tokens: list[int], accepted: list[bool]) -> None:
        """A finished request (EOS taken) or a refused token: a fresh matcher takes the row."""
        for row, token, ok in zip(rows, tokens, accepted):
            if not ok:
                self.num_rejected += 1
            elif token in self.eos_ids:
                self.num_finished += 1
            else:
                continue
            self.matchers[row] = self.backend.new_matcher(self.compiled)


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": statistics.fmean(values), "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def reference_apply_us(vocab: Vocab, batch: int) -> float:
    """Median microseconds of torch_apply on [batch, V] logits and a random bitmask."""
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, vocab.num_words), dtype=torch.int32)
    logits = torch.randn(batch, vocab.size)
    samples = []
    for _ in range(APPLY_REFERENCE_REPEATS):
        work = logits.clone()
        samples.append(timed(lambda: torch_apply(work, bitmask))[0])
    return statistics.median(samples) * 1e6


class EngineReference:
    """pdserve's LLMEngine on the default SmolLM2 in fp32: seconds per decode step at a batch size."""

    def __init__(self, max_batch: int, steps: int) -> None:
        from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
        from pdserve.engine.engine import LLMEngine
        from pdserve.engine.sampling_params import SamplingParams

        loaded = load_model(dtype="float32")
        max_tokens = ENGINE_WARMUP_STEPS + steps + 2
        blocks_per_seq = -(-(PROMPT_LEN + max_tokens) // BLOCK_SIZE)
        config = EngineConfig(
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=max_batch * blocks_per_seq + 1,
                              enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_batch * PROMPT_LEN, max_num_seqs=max_batch),
        )
        self.engine = LLMEngine(config, loaded)
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.vocab_size, self.steps, self.num_rounds = loaded.spec.vocab_size, steps, 0

    def measure(self, batch: int) -> list[float]:
        """Seconds of each of `steps` engine steps, every one decoding all `batch` sequences."""
        generator = torch.Generator().manual_seed(self.num_rounds)
        prompts = torch.randint(3, self.vocab_size, (batch, PROMPT_LEN), generator=generator).tolist()
        seqs = [self.engine.add_request(f"r{self.num_rounds}-{i}", prompt, self.params)
                for i, prompt in enumerate(prompts)]
        self.num_rounds += 1
        while any(seq.num_output_tokens == 0 for seq in seqs):
            self.engine.step()
        for _ in range(ENGINE_WARMUP_STEPS):
            self.engine.step()
        before = [seq.num_output_tokens for seq in seqs]
        times = [timed(self.engine.step)[0] for _ in range(self.steps)]
        if any(seq.num_output_tokens - n != self.steps for seq, n in zip(seqs, before)):
            raise RuntimeError("a timed engine step did not decode every sequence")
        for seq in seqs:
            self.engine.abort_request(seq.request_id)
        self.engine.step_outputs()
        return times


# -- the run ---------------------------------------------------------------------------


def load_vocab() -> Vocab:
    """SmolLM2's tokenizer from pdserve's cache entry of the default GGUF (no weights read, no hub)."""
    entry = GgufCacheEntry.of(pathlib.Path(default_model_path()))
    meta = entry.read_meta(_read_meta)
    if meta is None:  # no cache entry yet: load_model writes it (and dequantizes once)
        loaded = load_model()
        config, tokenizer = loaded.hf_config, loaded.tokenizer
    else:
        config, tokenizer = meta
    eos = (tokenizer.eos_token_id, config.eos_token_id)
    eos_ids = tuple(dict.fromkeys(i for item in eos for i in (item if isinstance(item, list) else [item])
                                  if i is not None))
    return Vocab(tokenizer, config.vocab_size, eos_ids)


def _read_meta(directory: pathlib.Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        return (AutoConfig.from_pretrained(directory, local_files_only=True),
                AutoTokenizer.from_pretrained(directory, local_files_only=True))
    except (OSError, ValueError) as error:
        raise InvalidRequestError("model", f"cannot read the cached tokenizer in {directory}: {error}") from error


def measure_engine(engine: EngineReference | None, batches: Iterable[int], into: dict[str, Any], phase: str) -> None:
    if engine is None:
        return
    for batch in batches:
        wait_until_quiet(QUIET_MAX_WAIT_S)
        other_load = OtherLoad()
        try:
            into.setdefault(str(batch), {})[phase + "_ms"] = [t * 1e3 for t in engine.measure(batch)]
        except Exception as error:  # the engine is being worked on elsewhere; the grammar figures still stand
            into.setdefault(str(batch), {})["error"] = describe(error)
        into[str(batch)][phase + "_other_load_share"] = other_load.share()
        log(f"engine batch {batch} ({phase}): {_engine_line(into[str(batch)])}")


def _engine_line(figures: dict[str, Any]) -> str:
    return figures.get("error") or ", ".join(
        f"{k}: {statistics.median(v):.2f} ms" for k, v in figures.items() if k.endswith("_ms"))


def engine_median_ms(figures: dict[str, Any], batch: int) -> float | None:
    """The lower of the before and after medians: other processes only ever add time."""
    row = figures.get(str(batch), {})
    medians = [statistics.median(values) for key, values in row.items() if key.endswith("_ms")]
    return min(medians) if medians else None


def run_steps(backends: dict[str, Backend], compiled: dict[str, dict[str, Any]], args: argparse.Namespace,
              bias: torch.Tensor) -> list[dict[str, Any]]:
    """Per grammar and batch: every library and mode, their timed steps interleaved in rotating order."""
    rows = []
    for grammar in args.step_grammars:
        for batch in args.batch:
            drivers = {
                (lib, parallel): StepDriver(backend, compiled[lib][grammar], batch, parallel, bias, seed=batch)
                for lib, backend in backends.items() if compiled[lib].get(grammar) is not None
                for parallel in ((True, False) if backend.has_batch_api else (False,))
            }
            for driver in drivers.values():
                driver.prepare()
            wait_until_quiet(QUIET_MAX_WAIT_S)
            other_load, order = OtherLoad(), list(drivers.values())
            for step in range(args.steps):
                shift = step % len(order)
                for driver in order[shift:] + order[:shift]:
                    driver.timed_step()
            share = other_load.share()
            for (lib, parallel), driver in drivers.items():
                rows.append({"lib": lib, "grammar": grammar, "batch": batch, "mode": "batch" if parallel else "serial",
                             **driver.figures(), "other_load_share": share})
                log(f"{grammar} B={batch} {lib} {rows[-1]['mode']}: {rows[-1]['total_us']['mean']:.0f} us/step mean")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps per library, batch and mode")
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, of {', '.join(LIBS)}")
    parser.add_argument("--step-grammars", default="json_schema,json_object",
                        help=f"grammars of the per-step measurement, of {', '.join(GRAMMARS)}")
    parser.add_argument("--engine-steps", type=int, default=32, help="engine decode steps timed per batch and phase")
    parser.add_argument("--skip-engine", action="store_true", help="leave out the engine reference")
    parser.add_argument("--json", type=pathlib.Path, help="write the raw figures here")
    args = parser.parse_args()
    args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
    args.libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    args.step_grammars = [g.strip() for g in args.step_grammars.split(",") if g.strip()]
    unknown = [x for x in args.libs if x not in LIBS] + [g for g in args.step_grammars if g not in GRAMMARS]
    if unknown or args.steps < 1 or args.engine_steps < 1 or not args.batch or min(args.batch) < 1:
        raise SystemExit(f"bad arguments: unknown {unknown}, or --steps, --engine-steps, --batch below 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))
        log(f"wrote {args.json}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    other_load, started = OtherLoad(), time.perf_counter()
    threads = len(os.sched_getaffinity(0))
    vocab = load_vocab()
    log(f"tokenizer: vocab {vocab.size}, eos {vocab.eos_ids}, {threads} threads, torch {torch.__version__}")
    engine_batches = sorted({*args.batch, 32})
    engine = None if args.skip_engine else EngineReference(max(engine_batches), args.engine_steps)
    engine_figures: dict[str, Any] = {}
    measure_engine(engine, engine_batches, engine_figures, "before")
    importlib.import_module("torch._dynamo")  # see "import ms" in the module docstring
    libraries, backends, compiled = {}, {}, {}
    for lib in args.libs:
        backend, libraries[lib] = open_backend(lib, vocab, threads)
        log(f"{lib}: {libraries[lib].get('error') or 'ready'}")
        if backend is not None:
            backends[lib], compiled[lib] = backend, {}
    compile_figures: dict[str, dict[str, Any]] = {kind: {} for kind in GRAMMARS}
    for kind, source in GRAMMARS.items():  # libraries side by side per grammar
        for lib, backend in backends.items():
            compile_figures[kind][lib], compiled[lib][kind] = measure_compile(backend, kind, source, vocab.num_words)
    for lib, backend in backends.items():
        libraries[lib]["features"] = probe_features(backend, vocab.tokenizer)
        libraries[lib]["bad_schema_errors"] = probe_errors(backend)
    steps = run_steps(backends, compiled, args, structural_tokens(vocab))
    measure_engine(engine, engine_batches, engine_figures, "after")
    return {
        "config": {"steps": args.steps, "batch": args.batch, "libs": args.libs, "step_grammars": args.step_grammars,
                   "engine_steps": args.engine_steps, "threads": threads, "torch": torch.__version__,
                   "vocab_size": vocab.size, "eos_ids": list(vocab.eos_ids)},
        "libraries": libraries, "compile": compile_figures, "steps": steps, "engine": engine_figures,
        "reference_apply_us": {str(b): reference_apply_us(vocab, b) for b in args.batch},
        "wall_s": time.perf_counter() - started, "other_load_share": other_load.share(),
    }


# -- printing --------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    libs = report["config"]["libs"]
    print_table("Libraries (one-off per process)",
                ["lib", "version", "import ms", "tokenizer info ms", "apply 1st call ms", "new deps (MB)"],
                [_library_row(lib, report["libraries"][lib]) for lib in libs])
    print_table("Compile (per grammar; again = same source once more; matcher = a new per-request matcher)",
                ["grammar", "lib", "cold ms", "again ms", "cached", "matcher us", "first mask us", "note"],
                [_compile_row(kind, lib, report["compile"][kind].get(lib)) for kind in report["compile"]
                 for lib in libs if lib in report["compile"][kind]])
    engine = report["engine"]
    print_table("Engine reference (LLMEngine, SmolLM2 fp32, 128-token prompts; ms per decode step, medians)",
                ["batch", "before", "after", "used", "busy before/after"],
                [[b, _median(f.get("before_ms")), _median(f.get("after_ms")),
                  f.get("error") or _fmt(engine_median_ms(engine, int(b))),
                  f"{f.get('before_other_load_share', 0):.0%}/{f.get('after_other_load_share', 0):.0%}"]
                 for b, f in engine.items()])
    b32 = engine_median_ms(engine, 32)
    print_table(f"Per decode step, us (mean over {report['config']['steps']} steps, p50 where marked); "
                f"% of one batch-32 engine step ({_fmt(b32)} ms), target < {TARGET_SHARE:.0%}; % B: of the "
                f"same-batch engine step",
                ["grammar", "B", "lib", "mode", "fill", "apply", "accept", "total", "total p50", "% B32",
                 "% B32 p50", "% B", "fill p95", "finished", "rejected", "busy"],
                [_step_row(row, b32, engine_median_ms(engine, row["batch"])) for row in report["steps"]])
    reference = ", ".join(f"B={b}: {us:.0f} us" for b, us in report["reference_apply_us"].items())
    print(f"eager torch apply (unpack bits + masked_fill_), for comparison: {reference}")
    print_table("JSON-schema keywords (ok = valid accepted, invalid refused)", ["keyword", *libs],
                [[keyword, *(report["libraries"][lib].get("features", {}).get(keyword, "-") for lib in libs)]
                 for keyword, *_ in FEATURES])
    print_table("Errors on a bad schema", ["case", "lib", "raised"],
                [[case, lib, report["libraries"][lib].get("bad_schema_errors", {}).get(case, "-")]
                 for case in BAD_SCHEMAS for lib in libs])
    print(f"\nwall {report['wall_s']:.0f} s; other processes used {report['other_load_share']:.0%} of the CPUs")


def _library_row(lib: str, record: dict[str, Any]) -> list[Any]:
    if not record.get("available"):
        return [lib, record.get("version", "-"), f"unavailable: {record.get('error')}", "", "", ""]
    deps = ", ".join(f"{name} ({mb})" for name, mb in record["new_dependencies_mb"].items()) or "none"
    apply = record.get("apply_note") or _fmt(record.get("apply_first_call_ms"))
    return [lib, record["version"], _fmt(record["import_ms"]), _fmt(record["tokenizer_info_ms"]), apply,
            f"{record['installed_mb']} own; {deps}"]


def _compile_row(kind: str, lib: str, figures: dict[str, Any] | None) -> list[Any]:
    if figures is None or figures["status"] != "ok":
        what = "-" if figures is None else figures["status"] + ": " + (figures.get("error") or figures.get("note", ""))
        return [kind, lib, what, "", "", "", "", ""]
    return [kind, lib, _fmt(figures["cold_ms"]), _fmt(figures["again_ms"]), "yes" if figures["cached"] else "no",
            _fmt(figures["matcher_us"]), _fmt(figures["first_mask_us"]), figures.get("note", "")]


def _step_row(row: dict[str, Any], b32_ms: float | None, same_ms: float | None) -> list[Any]:
    mean, p50 = row["total_us"]["mean"], row["total_us"]["p50"]
    return [row["grammar"], row["batch"], row["lib"], row["mode"], _fmt(row["fill_us"]["mean"]),
            _fmt(row["apply_us"]["mean"]), _fmt(row["accept_us"]["mean"]), _fmt(mean), _fmt(p50),
            _pct(mean, b32_ms), _pct(p50, b32_ms), _pct(mean, same_ms), _fmt(row["fill_us"]["p95"]),
            row["num_finished"], row["num_rejected"], f"{row['other_load_share']:.0%}"]


def _pct(us: float, ms: float | None) -> str:
    return "-" if ms is None else f"{us / 1e3 / ms:.1%}"


def _median(values: list[float] | None) -> str:
    return "-" if not values else _fmt(statistics.median(values))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n== {title}")
    for n, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
