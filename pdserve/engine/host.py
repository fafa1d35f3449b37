"""What this host's CPU can do, asked once: native bf16 GEMMs, and the vector ISA; and where
pdserve keeps the files it derives (dequantized weights, compiled kernels and graphs).

Hosts differ: Intel with AMX, AMD Zen 5 with AVX512-BF16, older AVX2-only parts (Zen 3).
oneDNN's prepacked bf16 linear refuses to run without avx512bw/vl/dq or avx_ne_convert,
and where bf16 runs only emulated a bf16 GEMM at batch 32 is about 5x slower than fp32
(measured on a Zen 3 host: 7.6 ms against 1.5 ms for a [32, 576] x [576, 3072] GEMM). So the CPU
default dtype and the prepacked path both follow this answer, never the CPU's name.
"""

from __future__ import annotations

import functools
import os
import pathlib

import torch


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here (AVX512-BF16, AMX, AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported is not None and supported())


@functools.cache
def cpu_capability() -> str:
    """torch's name for the vector ISA its CPU kernels use here: "AVX512", "AVX2", "DEFAULT", ..."""
    return torch.backends.cpu.get_cpu_capability()


def default_cpu_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively (half the memory, fp32's range), else fp32."""
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cache_dir() -> pathlib.Path:
    """Where pdserve caches derived files: $PDSERVE_CACHE_DIR, else $XDG_CACHE_HOME/pdserve, else ~/.cache/pdserve."""
    explicit = os.environ.get("PDSERVE_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "pdserve"
