"""The load generator: figures from known latencies, arrival processes, workloads, JSON and plot."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from pdserve.loadgen import report, runner, stats
from pdserve.loadgen.arrivals import Arrivals
from pdserve.loadgen.backend import BenchRequest
from pdserve.loadgen.cli import report_run
from pdserve.loadgen.stats import RequestRecord, Slo, summarize
from pdserve.loadgen.workloads import WorkloadSpec, build, chat_conversations


class FakeServer:
    """Answers request i after ttft_s[i], then one token every itl_s[i]; request 'fail' raises."""

    name = "fake"

    def __init__(self, ttft_s: list[float], itl_s: list[float], fail: set[int] = frozenset()) -> None:
        self.ttft_s, self.itl_s, self.fail = ttft_s, itl_s, fail
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def stream(self, request: BenchRequest):
        if request.index in self.fail:
            raise RuntimeError("refused")
        await asyncio.sleep(self.ttft_s[request.index])
        yield 1
        for _ in range(request.max_tokens - 1):
            await asyncio.sleep(self.itl_s[request.index])
            yield 1

    async def close(self) -> None:
        self.closed = True


def record(index: int, ttft: float, itl: float, n: int, sent: float = 0.0) -> RequestRecord:
    times = [ttft + k * itl for k in range(n)]
    return RequestRecord(index, "synthetic", n, 8, scheduled_s=sent, sent_s=sent, token_times=times,
                         token_counts=[1] * n, end_s=times[-1])


def test_figures_of_known_records_are_exact():
    # TTFTs 100..1000 ms, ITL 10 ms x (index + 1), 5 tokens each, all sent at 0.
    records = [record(i, 0.1 * (i + 1), 0.01 * (i + 1), 5) for i in range(10)]
    s = summarize(records, Slo(ttft_ms=550, tpot_ms=45))
    ttfts = [100.0 * (i + 1) for i in range(10)]
    assert s["ttft_ms"]["mean"] == pytest.approx(550.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(np.percentile(ttfts, 50))
    assert s["ttft_ms"]["p99"] == pytest.approx(np.percentile(ttfts, 99))
    assert s["tpot_ms"]["p90"] == pytest.approx(np.percentile([10.0 * (i + 1) for i in range(10)], 90))
    assert s["itl_ms"]["mean"] == pytest.approx(55.0)  # 4 gaps of 10 (i + 1) ms per request
    assert s["duration_s"] == pytest.approx(1.0 + 4 * 0.1)  # the last request ends at 1.0 + 4 * 0.1
    assert s["request_throughput"] == pytest.approx(10 / 1.4)
    assert s["output_throughput"] == pytest.approx(50 / 1.4)
    # TTFT <= 550 ms: indices 0-4; TPOT <= 45 ms: indices 0-3.
    assert s["goodput"] == pytest.approx(4 / 1.4)


def test_failed_requests_count_but_do_not_enter_the_latencies():
    failed = RequestRecord(9, "synthetic", 5, 8, scheduled_s=0.0, error="RuntimeError: refused")
    s = summarize([record(0, 0.2, 0.01, 3), failed], Slo())
    assert (s["num_completed"], s["num_failed"]) == (1, 1)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert summarize([], Slo())["ttft_ms"]["p99"] is None


def test_runner_measures_the_fake_servers_latencies():
    ttft = [0.05, 0.10, 0.15, 0.20]
    itl = [0.01, 0.02, 0.01, 0.02]
    server = FakeServer(ttft, itl, fail={3})
    requests = [BenchRequest(i, 6, prompt_token_ids=(1, 2)) for i in range(4)]
    records = asyncio.run(runner.run(server, requests, Arrivals(concurrency=4), progress=False))
    for r in records[:3]:
        assert r.ok and r.output_tokens == 6
        assert r.ttft_s == pytest.approx(ttft[r.index], abs=0.03)
        assert r.tpot_s == pytest.approx(itl[r.index], abs=0.008)
    assert not records[3].ok and "refused" in records[3].error
    s = summarize(records, Slo(ttft_ms=120, tpot_ms=1000))
    assert s["num_completed"] == 3 and s["goodput"] == pytest.approx(2 / s["duration_s"])


def test_open_loop_sends_on_schedule_and_closed_loop_caps_concurrency():
    server = FakeServer([0.05] * 6, [0.0] * 6)
    requests = [BenchRequest(i, 1, prompt_token_ids=(1,)) for i in range(6)]
    arrival = Arrivals(rate=20.0, seed=3)
    records = asyncio.run(runner.run(server, requests, arrival, progress=False))
    for r, planned in zip(records, arrival.offsets(6)):
        assert r.sent_s == pytest.approx(planned, abs=0.03)
    closed = asyncio.run(runner.run(server, requests, Arrivals(concurrency=2), progress=False))
    # Two clients, 50 ms each: the 6 requests take three rounds.
    assert max(r.sent_s for r in closed) == pytest.approx(0.10, abs=0.04)


def test_poisson_rate_and_gamma_burstiness_on_a_fixed_seed():
    gaps = np.diff(Arrivals(rate=10.0, seed=7).offsets(20001))
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(Arrivals(rate=10.0, burstiness=0.25, seed=7).offsets(20001))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # gamma: CV 1 / sqrt(shape)
    assert Arrivals(rate=math.inf).offsets(3) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        Arrivals(rate=1.0, concurrency=2)


def test_workloads_are_reproducible_and_shaped_as_asked():
    spec = WorkloadSpec("synthetic", 50, input_len=100, output_len=20, range_ratio=0.5, token_range=(3, 500), seed=1)
    a, b = build(spec), build(spec)
    assert a == b
    assert all(50 <= len(r.prompt_token_ids) <= 150 and 10 <= r.max_tokens <= 30 for r in a)
    assert all(3 <= t < 500 for r in a for t in r.prompt_token_ids)
    mix = build(WorkloadSpec("interference", 40, input_len=32, output_len=64, long_input_len=2048, long_fraction=0.1))
    longs = [r for r in mix if r.kind == "long"]
    assert len(longs) == 4 and all(len(r.prompt_token_ids) == 2048 for r in longs)
    assert min(r.index for r in longs) >= 4  # decoding streams run before the first long prompt
    chats = build(WorkloadSpec("chat", 12))
    assert all(r.messages and r.messages[-1]["role"] == "user" for r in chats)
    text = json.dumps(chat_conversations(), ensure_ascii=False)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "def " in text and "🎉" in text


def test_json_has_every_figure_and_record_and_the_plot_is_written(tmp_path, capsys):
    runs = {"a": [record(i, 0.1, 0.01, 4, sent=0.3 * i) for i in range(5)],
            "b": [record(i, 0.2, 0.02, 4, sent=0.3 * i) for i in range(5)]}
    summaries = {name: summarize(rs, Slo()) for name, rs in runs.items()}
    json_path, png_path = tmp_path / "run.json", tmp_path / "run.png"
    report_run(summaries, runs, str(json_path), str(png_path), extra={"workload": {"name": "synthetic"}},
               ratios={"p99_itl_b_over_a": 2.0, "skipped": None})
    out = capsys.readouterr().out
    assert "ITL p99 ms" in out and "skipped" in out
    data = json.loads(json_path.read_text())
    for name in runs:
        config = data["configs"][name]
        for key in ("num_requests", "num_completed", "num_failed", "duration_s", "request_throughput",
                    "output_throughput", "goodput", "slo_ttft_ms", "slo_tpot_ms"):
            assert key in config
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            assert set(config[key]) == {"mean", "p50", "p90", "p99"}
        assert len(config["requests"]) == 5 and config["requests"][0]["token_times"]
    assert data["ratios"] == {"p99_itl_b_over_a": 2.0, "skipped": None}
    assert png_path.stat().st_size > 10_000
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_lists_each_configuration():
    summaries = {"disagg": summarize([record(0, 0.1, 0.01, 3)], Slo()),
                 "coloc": summarize([record(0, 0.3, 0.02, 3)], Slo())}
    text = report.table(summaries)
    assert "disagg" in text.splitlines()[0] and "coloc" in text.splitlines()[0]
    assert "100.0" in text and "300.0" in text
    assert stats.distribution_ms([0.001])["p99"] == pytest.approx(1.0)


def test_time_limit_fails_what_is_left_instead_of_hanging():
    server = FakeServer([0.01, 5.0, 0.01], [0.0] * 3)
    requests = [BenchRequest(i, 1, prompt_token_ids=(1,)) for i in range(3)]
    records = asyncio.run(runner.run(server, requests, Arrivals(concurrency=3), progress=False, time_limit_s=0.3))
    assert [r.ok for r in records] == [True, False, True]
    assert "time limit" in records[1].error


def test_llama_server_backend_counts_tokens_from_a_chunked_event_stream():
    from pdserve.loadgen.backends import LlamaServerBackend

    events = [None, {"content": "a", "tokens": [5], "tokens_predicted": 1, "stop": False},
              {"content": "\u00e9", "tokens": [7], "tokens_predicted": 3, "stop": False},  # two tokens, one event
              {"content": "", "tokens": [], "tokens_predicted": 3, "stop": True}]
    seen: list[dict] = []

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int([h for h in head.decode().split("\r\n") if h.lower().startswith("content-length")][0].split(":")[1])
        seen.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for e in events:
            body = f"data: {json.dumps(e)}\n\n".encode()
            writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        backend = LlamaServerBackend(f"http://127.0.0.1:{port}")
        counts = [n async for n in backend.stream(BenchRequest(0, 3, prompt_token_ids=(1, 2, 3)))]
        server.close()
        return counts

    assert asyncio.run(main()) == [1, 2]
    assert seen[0]["prompt"] == [1, 2, 3] and seen[0]["n_predict"] == 3 and seen[0]["ignore_eos"] is True
