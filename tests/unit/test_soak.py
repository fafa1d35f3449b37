"""bench/soak.py's pure parts: the request mix, status classification, RSS windows, the verdict."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import pytest

from pdserve.loadgen.arrivals import Arrivals
from pdserve.loadgen.stats import RequestRecord

_PATH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "soak.py"
_spec = importlib.util.spec_from_file_location("bench_soak", _PATH)
soak = importlib.util.module_from_spec(_spec)
sys.modules["bench_soak"] = soak  # dataclasses look their module up while the file executes
_spec.loader.exec_module(soak)


def record(kind: str = "short", error: str | None = None, ok: bool = True) -> RequestRecord:
    r = RequestRecord(0, kind, 8, 16, scheduled_s=0.0, error=error)
    if ok and error is None:
        r.token_times, r.token_counts, r.end_s = [0.1], [1], 0.2
    return r


def test_mix_is_reproducible_within_token_range_and_carries_abort_extras():
    a = soak.build_mix(400, seed=3, token_range=(10, 20))
    assert a == soak.build_mix(400, seed=3, token_range=(10, 20))
    assert [r.extra for r in a] == [r.extra for r in soak.build_mix(400, seed=3, token_range=(10, 20))]
    assert {r.kind for r in a} == set(soak.MIX)
    assert all(10 <= t < 20 for r in a for t in r.prompt_token_ids)
    for r in a:
        _, (plo, phi), (olo, ohi) = soak.MIX[r.kind]
        extra_len = soak.SHARED_PREFIX_LEN if r.kind == "shared" else 0
        assert plo + extra_len <= len(r.prompt_token_ids) <= phi + extra_len
        assert olo <= r.max_tokens <= ohi
        assert set(r.extra) == {"cancel": {"cancel_after"}, "deadline": {"timeout_s"}}.get(r.kind, set())
    prefixes = {r.prompt_token_ids[:soak.SHARED_PREFIX_LEN] for r in a if r.kind == "shared"}
    assert len(prefixes) == 4


def test_mix_restricted_to_kinds():
    assert {r.kind for r in soak.build_mix(50, 0, (10, 20), ("short", "long"))} == {"short", "long"}


def test_arrival_offsets_are_a_prefix_of_a_longer_schedule():
    # soak.py counts the arrivals before the end from a longer schedule; the runner redraws the shorter one.
    arrivals = Arrivals(rate=2.0, seed=5)
    assert arrivals.offsets(30) == arrivals.offsets(100)[:30]


@pytest.mark.parametrize("error, kind, status, expected", [
    (None, "short", "OK", True),
    ("DeadlineError: request r1: deadline passed", "deadline", "DEADLINE_EXCEEDED", True),
    ("DeadlineError: request r1: deadline passed", "short", "DEADLINE_EXCEEDED", False),
    ("CapacityError: no room", "short", "RESOURCE_EXHAUSTED", False),
    ("UnavailableError: no worker", "deadline", "UNAVAILABLE", False),
    ("cancelled at the run's time limit (10 s)", "short", "TIME_LIMIT", False),
    ("FatalError: the generate stream ended without a GenerateResult", "short", "INTERNAL", False),
])
def test_status_of_and_expected(error, kind, status, expected):
    r = record(kind, error)
    assert soak.status_of(r) == status
    assert soak.expected(r) is expected


def test_rss_of_this_process_and_of_a_missing_one():
    assert soak.rss_mib(os.getpid()) > 1.0
    assert soak.rss_mib(2**22 + 12345) is None


def test_window_means_skip_warmup_and_drain():
    times = list(range(0, 111))  # load for 100 s, then 10 s of drain
    values = [1000.0 if t < 20 else 100.0 if t <= 30 else 200.0 if t < 90 else 110.0 for t in times]
    values[-5:] = [5000.0] * 5  # drain: ignored
    assert soak.window_means(times, values, 100.0) == (100.0, 110.0)


def test_window_means_needs_a_sample_after_warmup():
    with pytest.raises(ValueError, match="interval"):
        soak.window_means([0.0, 1.0], [1.0, 1.0], 100.0)


def summary_of(rss_end: float | None, leaked: int | None, records: list[RequestRecord]) -> dict:
    samples = soak.Samples(times=[0.0, 25.0, 95.0], rss={"router": [50.0, 100.0, 100.0],
                                                         "decode0": [50.0, 100.0, rss_end]},
                           kv_used={"decode0": [0, 7, 3]})
    return soak.summary(soak.SoakRun(2.0, 1.6, 100.0, records, samples, {"decode0": leaked}))


def test_summary_passes_and_fails_on_each_target():
    good = summary_of(102.0, 0, [record(), record("deadline", "DeadlineError: late")])
    assert good["pass"] is True
    # Peaks: 100 in [20, 60), 102 in [60, 100]: +2% in half the span, +4% over it.
    assert good["daemons"]["decode0"] == {"rss_start_mib": 100.0, "rss_end_mib": 102.0, "rss_window_growth": 0.02,
                                          "rss_growth": 0.04, "alive": True, "max_kv_used": 7,
                                          "leaked_blocks": 0}
    assert good["requests"]["ok"] == 1 and good["requests"]["failed"] == {"DEADLINE_EXCEEDED": 1}
    assert summary_of(103.0, 0, [record()])["pass"] is False  # RSS grew 6% over the span
    assert summary_of(100.0, 2, [record()])["pass"] is False  # leaked blocks
    assert summary_of(100.0, None, [record()])["pass"] is False  # the worker did not answer Stats
    assert summary_of(None, 0, [record()])["pass"] is False  # decode0 is gone
    assert summary_of(100.0, 0, [record(), record("short", "CapacityError: x")])["pass"] is False
    assert summary_of(100.0, 0, [])["pass"] is False  # nothing completed
    json.dumps(good)


def test_peaks_see_through_a_sawtooth_and_catch_a_climb():
    times = [float(t) for t in range(0, 101)]
    # A flat heap that the allocator trims every 40 s (at 20, 60, 100): the first window after the
    # warm-up falls on a tooth's foot, the last near its top.
    saw = [1000.0 + 1.5 * ((t - 20) % 40) for t in range(0, 101)]
    first, last = soak.window_means(times, saw, 100.0)
    assert last / first - 1 > 0.035  # what the windows alone would judge
    start, end = soak.peaks(times, saw, 100.0)
    assert abs(end / start - 1) < 0.005
    climb = [1000.0 + t for t in range(0, 101)]  # 1 MiB/s that is never given back
    start, end = soak.peaks(times, climb, 100.0)
    assert end / start - 1 > 0.035  # half the judged span apart: summary() doubles it


def test_token_range_for_tiny_vocab(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 512}))
    assert soak.token_range_for(str(tmp_path)) == (64, 512)
    assert soak.token_range_for(None) == soak.DEFAULT_TOKEN_RANGE
    assert soak.token_range_for(str(tmp_path / "model.gguf")) == soak.DEFAULT_TOKEN_RANGE
