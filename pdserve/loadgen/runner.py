"""Send a trace to a backend on schedule and record when every token arrived.

Warm-up requests run first, all at once, and are not recorded. Then each request
is sent at its scheduled offset (open loop) or when a closed-loop client is free;
every arrival is timestamped here, on the client side, with time.perf_counter().
A failed request is recorded with its error and the run goes on. With a time
limit, requests still running (or not yet sent) when it passes are cancelled and
recorded as failed: a server that falls behind shows as failures, not as a hang.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence

from pdserve.loadgen.arrivals import Arrivals
from pdserve.loadgen.backend import Backend, BenchRequest
from pdserve.loadgen.stats import RequestRecord


async def run(backend: Backend, requests: Sequence[BenchRequest], arrivals: Arrivals, *,
              warmup: Sequence[BenchRequest] = (), progress: bool = True, label: str = "",
              time_limit_s: float | None = None) -> list[RequestRecord]:
    if warmup:
        await asyncio.gather(*(_drain(backend, r) for r in warmup))
    start = time.perf_counter()
    offsets = [0.0] * len(requests) if arrivals.closed_loop else arrivals.offsets(len(requests))
    records = [RequestRecord(r.index, r.kind, r.max_tokens, r.num_prompt_tokens, scheduled_s=t)
               for r, t in zip(requests, offsets)]
    bar = _progress_bar(len(requests), label, progress)

    async def one(request: BenchRequest, record: RequestRecord) -> None:
        sent = time.perf_counter()
        record.sent_s = sent - start
        try:
            async for n in backend.stream(request):
                if n > 0:
                    record.token_times.append(time.perf_counter() - sent)
                    record.token_counts.append(n)
            record.end_s = time.perf_counter() - sent
        except Exception as exc:  # noqa: BLE001 - a failed request is a result, not the end of the run
            record.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            record.error = f"cancelled at the run's time limit ({time_limit_s} s)"
        if bar is not None:
            bar.update(1)

    async def send_all() -> None:
        if arrivals.closed_loop:
            pending = iter(zip(requests, records))

            async def client() -> None:
                for request, record in pending:
                    await one(request, record)

            await asyncio.gather(*(client() for _ in range(arrivals.concurrency)))
        else:
            tasks = []
            for request, record in zip(requests, records):
                delay = start + record.scheduled_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(request, record)))
            await asyncio.gather(*tasks)

    try:
        await asyncio.wait_for(send_all(), time_limit_s)
    except TimeoutError:
        for record in records:
            if record.end_s is None and record.error is None:
                record.error = f"not done within the run's time limit ({time_limit_s} s)"
    finally:
        if bar is not None:
            bar.close()
    return records


async def _drain(backend: Backend, request: BenchRequest) -> None:
    async for _ in backend.stream(request):
        pass


def _progress_bar(total: int, label: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label or "requests", unit="req", file=sys.stderr, dynamic_ncols=True)
