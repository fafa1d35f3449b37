"""Process settings of the daemons: malloc tuning and the engine thread's lower priority."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.sampling import SamplingParams
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
