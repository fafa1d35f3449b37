"""Process-wide glibc malloc settings for the daemons.

By default glibc serves allocations above a (dynamic) threshold of 128 KiB-32 MiB
with fresh mmap()s and gives a freed heap top back to the OS once it exceeds twice
that threshold. A daemon's hot buffers are exactly such sizes, freed and made again
on every request: KV chunks of ~1 MiB (tensor bytes, protobuf messages, their
serialization), activations and logits. Each new mapping is paid in page faults on
first touch. Measured on SmolLM2's 1024-token KV (30 chunks of 774 KB, one thread):
building the protobuf messages took 14.5 ms and serializing them 16.0 ms with the
defaults, 2.5 and 3.4 ms with the settings below (a plain copy of the same 23.6 MB
into warm memory: 1.5-2.4 ms).

The cost: up to TRIM_THRESHOLD of freed memory stays mapped in each process.
PDSERVE_MALLOC_TUNE=0 leaves malloc alone (for example under jemalloc or tcmalloc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 2**20  # allocations below come from the heap and are reused
TRIM_THRESHOLD = 256 * 2**20  # free heap kept before returning memory to the OS


def tune_malloc() -> bool:
    """Apply the settings; False where they do not apply (not glibc, or turned off)."""
    if os.environ.get("PDSERVE_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the daemon's malloc settings; KV transfers will page-fault more")
    return ok
