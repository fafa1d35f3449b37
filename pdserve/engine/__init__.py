"""The inference engine: model, paged KV cache, continuous-batching scheduler, sampling.

oneDNN, which runs torch's bf16 GEMMs and batched matmuls on CPU, keeps each compiled
kernel ("primitive") in an LRU keyed by shape, and so does ideep, torch's layer over it:
1024 entries each by default, a few hundred KB apiece. Prompt lengths and batch shapes
vary with every step, so a prefill daemon's heap grew by about 600 MB before those caches
filled. A step reuses a handful of shapes across all its layers, and the next step mostly
the same ones, so 64 entries keep the working set hot. Read on first use; a value the
user set wins.
"""

import os

ONEDNN_CACHE_ENTRIES = "64"
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
os.environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHE_ENTRIES)
