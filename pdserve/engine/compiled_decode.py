"""Decode steps without per-op overhead: one decoder layer compiled by torch.compile, run for every layer.

Owns: which steps run compiled, the batch buckets the compiled layer is specialized to,
the padded shape of a compiled step's inputs, compiling every bucket at start-up, and
where Inductor keeps what it compiled (across restarts).

At small batches a decode step is dominated not by its GEMMs but by the ~25 small ops
around them in each layer (norms, rope, residuals, SiLU, the KV write), each a separate
ATen call with its own overhead. Inductor fuses them into a few C++ loops, and its C++
wrapper (`cpp_wrapper`) calls the GEMMs, the paged-attention op and the quantized linears
without going back to Python. One layer is compiled, not the whole model: every layer has
the same shapes, so one graph serves all of them (weights are graph inputs), and it
compiles in about 10 s per bucket on 2 cores instead of minutes for the unrolled model.

Which steps: pure decode steps (no prefill chunk, no layer hook) of at most `max_batch`
sequences, on CPU with the compiled attention op. Each is padded to the next bucket
(powers of two up to `max_batch`): padding rows write their K/V to the scratch slot and
attend one key, and their hidden states are dropped. Block tables are padded to the width
of the longest sequence allowed (max_model_len), so one graph serves every context.
Everything else runs the same layers eagerly. Compiled and eager layers differ in float
rounding only (fused reductions), about 1e-5 in fp32.

Inductor's cache lives in pdserve's cache directory (TORCHINDUCTOR_CACHE_DIR, unless set):
a restart finds every bucket there and only traces. It holds one entry per (model shape,
dtype, quantization, bucket), so it stays bounded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from pdserve.engine.attention import AttentionBackend, AttentionMetadata
from pdserve.engine.host import cache_dir
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.models.llama import DecoderLayer, LlamaModel

logger = logging.getLogger(__name__)

# Each CompiledDecode compiles its own entries (isolate_recompiles), for one engine's layers,
# whose weights and attributes never change. So guards on the layer (its weights' shapes,
# dtypes, strides; its attributes) and on the identity of modules, functions and closures
# are skipped: checking them cost 35-60 us per layer call (1-2 ms a step at batch 1).
# Guards on the step's inputs (hidden states, rope, attention metadata, the cache) and on
# global state stay: they choose the bucket's graph.
_SKIPPED_GUARD_TYPES = frozenset({"CLOSURE_MATCH", "MODULE_MATCH", "BUILTIN_MATCH", "NOT_PRESENT_IN_GENERIC_DICT"})


def _keep_guard(entries) -> list[bool]:
    return [entry.guard_type not in _SKIPPED_GUARD_TYPES and not entry.name.startswith("L['layer']")
            for entry in entries]


INDUCTOR_OPTIONS = {
    # The generated C++ calls the GEMMs and pdserve's ops directly, without Python between kernels.
    "cpp_wrapper": True,
    # The fused kernels of a decode step touch a few KB: one thread beats an OpenMP fork and
    # join per kernel (measured 84 against 115 us per layer at batch 1 on 2 cores, Zen 3).
    "cpp.threads": 1,
    "guard_filter_fn": _keep_guard,
}


def buckets_up_to(max_batch: int) -> list[int]:
    """The batch sizes compiled for: powers of two below max_batch, and max_batch."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch] if max_batch >= 1 else []


def _run_layer(layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    return layer(h, cos, sin, meta, k_cache, v_cache)


class CompiledDecode:
    """The compiled layer and its buckets, for one model runner."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, attention: AttentionBackend, max_batch: int,
                 max_model_len: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attention = attention
        self.buckets = buckets_up_to(max_batch)
        self.table_width = -(-max_model_len // kv_cache.block_size)
        self.enabled = False
        self.num_steps = 0  # steps run compiled
        self.layer_fn: Callable[..., torch.Tensor] | None = None
        if not self.buckets:
            return
        why_not = self._unsupported_reason()
        if why_not:
            logger.info("compiled decode: off (%s); decode steps run eagerly", why_not)
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        # The cache's size (its slot dimension) varies with the memory given to it: not specialized on.
        for cache in kv_cache.k + kv_cache.v:
            torch._dynamo.mark_dynamic(cache, 1)
        # One graph per bucket (the int4 linears' row-count branch may add one more each).
        self.layer_fn = torch.compile(_run_layer, fullgraph=True, dynamic=False, options=INDUCTOR_OPTIONS,
                                      isolate_recompiles=True, recompile_limit=2 * len(self.buckets) + 2)
        self.enabled = True

    def _unsupported_reason(self) -> str | None:
        if self.kv_cache.k[0].device.type != "cpu":
            return "CPU only for now (CUDA would want CUDA graphs)"
        if self.attention.name != "kernel":
            return "the compiled attention op is not in use"
        return None

    def bucket(self, num_seqs: int, num_tokens: int) -> int | None:
        """The bucket a step runs in, or None when it runs eagerly."""
        if not self.enabled or num_seqs != num_tokens or num_tokens > self.buckets[-1]:
            return None
        self.num_steps += 1
        return next(b for b in self.buckets if b >= num_tokens)

    def warm_up(self) -> float:
        """Compile (or load from Inductor's cache) every bucket, on padding rows only; returns seconds.

        A failure turns the compiled path off, with one log line: eager steps are always correct.
        """
        if not self.enabled:
            return 0.0
        started = time.perf_counter()
        try:
            for batch in self.buckets:
                self._run_padding_batch(batch)
        except Exception as error:  # noqa: BLE001 - any compiler failure: stay eager, say why
            self.enabled = False
            logger.warning("compiled decode: compiling failed (%s: %s); decode steps run eagerly",
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return time.perf_counter() - started
        elapsed = time.perf_counter() - started
        logger.info("compiled decode: buckets %s ready in %.1f s (Inductor cache: %s)", self.buckets, elapsed,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return elapsed

    def _run_padding_batch(self, batch: int) -> None:
        device = self.kv_cache.k[0].device
        ints = dict(dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            slots=torch.full((batch,), self.kv_cache.scratch_slot, dtype=torch.long, device=device),
            num_decode=batch,
            decode_block_tables=torch.zeros(batch, self.table_width, **ints),
            decode_context_lens=torch.ones(batch, **ints),
            prefill_block_tables=None, prefill_query_start=None, prefill_start_pos=None,
            backend=self.attention,
        )
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        self.model.forward(zeros, zeros, meta, self.kv_cache, layer_fn=self.layer_fn)
