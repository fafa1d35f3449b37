"""The engine thread when the engine breaks: every request fails loudly, and the owner is told once."""

from __future__ import annotations

import threading

import pytest

from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import FatalError
from tests.engine_helpers import make_engine


def test_a_broken_engine_fails_its_requests_and_calls_on_failure_once(tiny_loaded):
    engine = make_engine(tiny_loaded("llama"))

    def broken_step(layer_hook=None):
        raise RuntimeError("boom")

    engine.step = broken_step
    loop = EngineLoop(engine)
    told, done = [], threading.Event()
    loop.on_failure = lambda exc: (told.append(exc), done.set())
    loop.start()
    try:
        outputs = list(loop.generate("r1", [1, 2, 3], SamplingParams(max_tokens=2), timeout=10))
        assert outputs[-1].finished and isinstance(outputs[-1].error, FatalError)
        assert "boom" in str(outputs[-1].error)
        assert done.wait(5) and len(told) == 1 and isinstance(told[0], RuntimeError)
        with pytest.raises(FatalError, match="engine thread died"):  # later calls fail at once
            loop.call(lambda e: None).result(5)
    finally:
        loop.stop()
