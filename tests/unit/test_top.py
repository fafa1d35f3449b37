"""`pdserve top`: the rendered figures of a snapshot, and an unreachable router in --once mode."""

from __future__ import annotations

import socket
import time

from rich.console import Console

from pdserve.client.types import KVStats, WorkerInfo, WorkerLoad
from pdserve.top import _print_once, render, run_top

NOW = 1_700_000_000.0


def worker(worker_id: str, role: str | None, health: str | None, *, num_used: int = 0, num_total: int = 1000,
           num_cached: int = 0, hit_rate: float = 0.0, running: int = 0, waiting: int = 0, pending: int = 0,
           output_tps: float = 0.0, prefill_tps: float = 0.0, ttft: float = 0.0, itl: float = 0.0,
           age_ms: float = 250.0) -> WorkerInfo:
    kv = KVStats(block_size=16, num_total=num_total, num_free=num_total - num_used, num_used=num_used,
                 num_cached=num_cached, prefix_cache_hit_rate=hit_rate)
    load = WorkerLoad(num_running_requests=running, num_waiting_requests=waiting,
                      num_pending_prefill_tokens=pending, kv=kv, output_tokens_per_s=output_tps,
                      prefill_tokens_per_s=prefill_tps, p99_ttft_ms=ttft, p99_itl_ms=itl)
    return WorkerInfo(worker_id=worker_id, role=role, address=f"{worker_id}.local:50052", health=health,
                      load=load, model_fingerprint="llama/bfloat16/abc", preprocessing_version="1",
                      kv_layout="layers=2 kv_heads=2 head_dim=8 dtype=bfloat16", last_heartbeat_age_ms=age_ms)


WORKERS = [
    worker("decode-b", "decode", "draining", num_used=900, num_cached=12, hit_rate=0.5, running=7, waiting=3,
           output_tps=321.5, ttft=87.25, itl=12.5, age_ms=1500.0),
    worker("prefill-a", "prefill", "healthy", num_used=250, num_cached=40, hit_rate=0.375, running=2,
           pending=4096, prefill_tps=5432.1, ttft=150.0),
    worker("decode-c", "decode", "unhealthy", num_used=0, num_total=0),
    worker("decode-a", "decode", "healthy", output_tps=10.0),
]


def text_of(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def rows(text: str) -> dict[str, str]:
    """The table's line of each worker id."""
    ids = {w.worker_id for w in WORKERS}
    return {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in ids}


def test_rows_show_each_workers_figures():
    lines = rows(text_of(render(WORKERS, router="127.0.0.1:50051", error=None, now=NOW)))
    assert set(lines) == {w.worker_id for w in WORKERS}

    prefill = lines["prefill-a"]
    for figure in ("prefill", "healthy", "250/1000", "25.0%", "40", "37.5%", "4,096", "5,432.1", "150.0"):
        assert figure in prefill, (figure, prefill)

    busy = lines["decode-b"]
    for figure in ("decode", "draining", "900/1000", "90.0%", "50.0%", "321.5", "87.2", "12.5", "1.5s"):
        assert figure in busy, (figure, busy)

    # No KV pool and no samples: a dash, not 0% or a division error.
    idle = lines["decode-c"]
    assert "unhealthy" in idle and "0/0" in idle
    assert idle.split().count("-") == 3, idle  # KV used, p99 TTFT, p99 ITL


def test_rows_are_grouped_by_role_then_id():
    order = list(rows(text_of(render(WORKERS, router="r:1", error=None, now=NOW))))
    assert order == ["prefill-a", "decode-a", "decode-b", "decode-c"]


def test_header_counts_and_totals_by_role():
    header = text_of(render(WORKERS, router="127.0.0.1:50051", error=None, now=NOW)).splitlines()[0]
    assert "127.0.0.1:50051" in header
    assert "prefill 1 (1 healthy) 5,432.1 tok/s" in header
    assert "decode 3 (1 healthy, 1 draining, 1 unhealthy) 331.5 tok/s" in header
    assert time.strftime("%H:%M:%S", time.localtime(NOW)) in header


def test_health_is_coloured():
    console = Console(width=200)
    colours = {segment.text.strip(): segment.style.color.name
               for segment in console.render(render(WORKERS, router="r:1", error=None, now=NOW))
               if segment.style is not None and segment.style.color is not None}
    assert colours["healthy"] == "green"
    assert colours["draining"] == "yellow"
    assert colours["unhealthy"] == "red"


def test_error_is_in_the_header_and_no_rows():
    text = text_of(render([], router="10.0.0.9:50051", error="connection refused", now=NOW))
    assert "10.0.0.9:50051" in text and "error: connection refused" in text
    assert "retrying" in text
    assert "KV blocks" not in text  # no table of stale or empty rows


def test_once_prints_the_snapshot_to_stdout(capsys):
    class StubClient:
        def cluster_status(self):
            return WORKERS

    assert _print_once(StubClient(), "127.0.0.1:50051") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert set(rows(captured.out)) == {w.worker_id for w in WORKERS}


def test_once_against_a_closed_port_exits_2_with_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    start = time.monotonic()
    code = run_top(address, once=True, timeout=2.0)
    assert time.monotonic() - start < 5.0
    assert code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and address in lines[0], captured.err
    assert captured.out == ""


def test_bad_interval_exits_2(capsys):
    assert run_top("127.0.0.1:1", interval=0, once=True) == 2
    assert "--interval" in capsys.readouterr().err
