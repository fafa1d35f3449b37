"""Compiled paged-attention ops for CPU, and the choice of whether to use them.

Owns: loading libpdserve_kernels.so, pdserve's compiled CPU ops (built by `build` on
first use when missing), which registers `torch.ops.pdserve.paged_attention_decode` and
`paged_attention_prefill` (sources and design in `csrc/`; the same library carries the
quantized linears `quantization` uses); their fake implementations, so they trace under
torch.compile; and `supports`, what the attention ops cover. `reference` holds the same
two functions in PyTorch, the path everywhere else.

Environment: PDSERVE_ATTENTION=reference forces the attention reference (`attention_ops()`
returns None; the library, and the quantized linears in it, still load);
PDSERVE_KERNELS_BUILD=0 forbids building on first use.
"""

from __future__ import annotations

import logging
import os
import threading
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_ops: SimpleNamespace | None = None  # the loaded ops, once loaded
_failure: str | None = None  # why they cannot be loaded, once known


def supports(head_dim: int, dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the compiled ops cover this cache: CPU, fp32/bf16/fp16, head_dim a multiple of 8 up to 256."""
    return (torch.device(device).type == "cpu" and dtype in _SUPPORTED_DTYPES
            and head_dim % 8 == 0 and 0 < head_dim <= 256)


def attention_ops() -> SimpleNamespace | None:
    """`load()`, unless PDSERVE_ATTENTION=reference (checked on every call) asks for the reference."""
    choice = os.environ.get("PDSERVE_ATTENTION", "")
    if choice == "reference":
        logger.info("paged attention: PDSERVE_ATTENTION=reference, using the PyTorch reference")
        return None
    if choice not in ("", "auto", "kernel"):
        logger.warning("paged attention: ignoring PDSERVE_ATTENTION=%r (known: 'reference')", choice)
    return load()


def load() -> SimpleNamespace | None:
    """The ops (`paged_attention_decode`, `paged_attention_prefill`, `isa`, `path`), or None.

    None when the library is not built and cannot be, or does not load: one log line
    says why. Never raises.
    """
    global _ops, _failure
    with _lock:
        if _ops is None and _failure is None:
            _ops, _failure = _load_library()
            if _failure is not None:
                logger.warning("paged attention: %s; using the PyTorch reference", _failure)
        return _ops


def _load_library() -> tuple[SimpleNamespace | None, str | None]:
    from pdserve.engine.kernels import build

    try:
        path = build.library_path()
        if not path.exists():
            if os.environ.get("PDSERVE_KERNELS_BUILD", "1") == "0":
                return None, (f"{path} is not built and PDSERVE_KERNELS_BUILD=0 forbids building it "
                              "(run `python -m pdserve.engine.kernels.build`)")
            logger.info("paged attention: building the compiled ops (once per source and torch version)")
            build.build()
    except build.BuildError as e:
        first_error = next((line for line in e.stderr.splitlines() if "error" in line), "")
        return None, f"building the compiled ops failed: {e} {first_error}".rstrip()
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return None, f"loading {path} failed: {e}"
    _register_fakes()
    ops = torch.ops.pdserve
    return SimpleNamespace(
        paged_attention_decode=ops.paged_attention_decode.default,
        paged_attention_prefill=ops.paged_attention_prefill.default,
        isa=ops.select_isa(""),
        path=path,
    ), None


def _register_fakes() -> None:
    """Shapes of the ops' outputs without running them (meta tensors, torch.compile tracing)."""

    @torch.library.register_fake("pdserve::paged_attention_decode")
    def _decode(q, k_cache, v_cache, block_tables, context_lens, block_size, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pdserve::paged_attention_prefill")
    def _prefill(q, k_cache, v_cache, block_tables, query_start, start_pos, block_size, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("pdserve::int4_linear")
    def _int4_linear(x, packed, scale, offset):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("pdserve::int8_linear")
    def _int8_linear(x, q, scale):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("pdserve::int4_dequantize")
    def _int4_dequantize(packed, scale, offset, dtype):
        return packed.new_empty(packed.shape[0], 2 * packed.shape[1], dtype=dtype)
