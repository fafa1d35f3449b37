"""Process settings of the daemons: malloc tuning and the engine thread's lower priority."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest
import torch

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.host import cpu_has_fast_bf16
from pdserve.engine.sampling_params import SamplingParams
from tests.engine_helpers import make_engine


@pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc only")
def test_tune_malloc_applies_and_can_be_turned_off():
    code = "from pdserve.allocator import tune_malloc; print(tune_malloc())"
    run = lambda env: subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    assert run({}) == "True"
    assert run({"PDSERVE_MALLOC_TUNE": "0"}) == "False"


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_engine_thread_runs_below_the_callers_priority(tiny_loaded):
    loop = EngineLoop(make_engine(tiny_loaded("llama")), nice=5).start()
    try:
        # The thread sets its priority before it serves anything: one answer proves it has.
        assert list(loop.generate("r", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)))
        assert os.getpriority(os.PRIO_PROCESS, loop._thread.native_id) == os.getpriority(os.PRIO_PROCESS, 0) + 5
    finally:
        loop.stop()


# 400 GEMM and batched-matmul shapes never seen before, as 400 prompt lengths make; prints
# how much malloc'd memory they left behind, in MiB.
_NEW_SHAPES = """
import ctypes, torch
import pdserve.engine

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
torch.set_num_threads(1)
w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 64, dtype=torch.bfloat16), 32)

def run(rows):
    for m in rows:
        torch.ops.mkldnn._linear_pointwise(torch.randn(m, 64, dtype=torch.bfloat16), w, None, "none", [], "")
        torch.bmm(torch.randn(2, m, 8, dtype=torch.bfloat16), torch.randn(2, 8, m, dtype=torch.bfloat16))

run(range(1, 65))  # past the capped caches' size
before = mallinfo2().uordblks
run(range(65, 465))
print((mallinfo2().uordblks - before) / 2**20)
"""


@pytest.mark.skipif(ctypes.util.find_library("c") is None or sys.platform != "linux", reason="glibc only")
@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="no native bf16 GEMMs: the engine runs fp32 here, not oneDNN's bf16")
def test_onednn_kernel_caches_do_not_grow_with_new_shapes():
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    grown = lambda extra: float(subprocess.run([sys.executable, "-c", _NEW_SHAPES], env={**env, **extra},  # noqa: E731
                                               capture_output=True, text=True, check=True).stdout)
    assert grown({}) < 64  # measured: 17 MiB
    # Torch's own sizes, which a user may still choose: every new shape's kernels stay (measured: 387 MiB).
    assert grown({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}) > 128
