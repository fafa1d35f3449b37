"""A worker reports its load without waiting for the engine thread, whose steps can take seconds."""

from __future__ import annotations

import threading
import time

from pdserve.engine.sampling_params import SamplingParams
from pdserve.server.worker import Worker
from pdserve.v1 import common_pb2
from tests.engine_helpers import make_engine


def test_load_answers_at_once_while_a_long_step_runs(tiny_loaded):
    worker = Worker(common_pb2.WORKER_ROLE_DECODE, make_engine(tiny_loaded("llama"), num_blocks=64))
    try:
        worker.loop.call(lambda engine: engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4)))
        worker.loop.call(lambda engine: None).result(10)
        busy, release = threading.Event(), threading.Event()

        def long_step(engine):  # the engine thread, held as by a multi-second prefill
            busy.set()
            release.wait(10)

        worker.loop.call(long_step)
        assert busy.wait(10)
        started = time.perf_counter()
        load = worker.load()
        assert time.perf_counter() - started < 0.5
        assert isinstance(load, common_pb2.WorkerLoad)
        assert load.kv.num_total == 64 and load.kv.num_free + load.kv.num_used == 64
        release.set()
        worker.loop.call(lambda engine: engine.abort_request("a")).result(10)
        worker.loop.call(lambda engine: None).result(10)
        deadline = time.monotonic() + 5
        while worker.load().num_running_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.load().num_running_requests == 0 and worker.load().kv.num_used == 0
    finally:
        release.set()
        worker.loop.stop()
