"""A run's figures as a table, a JSON file and a PNG (latency CDFs, ITL over time)."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from pdserve.loadgen.stats import RequestRecord

_ROWS = [
    ("completed / failed", lambda s: f"{s['num_completed']} / {s['num_failed']}"),
    ("duration s", lambda s: f"{s['duration_s']:.1f}"),
    ("requests/s", lambda s: f"{s['request_throughput']:.3f}"),
    ("output tok/s", lambda s: f"{s['output_throughput']:.1f}"),
    ("goodput req/s", lambda s: f"{s['goodput']:.3f}"),
]
_LATENCIES = [("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")]


def table(summaries: dict[str, dict]) -> str:
    """One column per configuration; latency rows in ms as mean / p50 / p90 / p99."""
    rows = [(label, [fmt(s) for s in summaries.values()]) for label, fmt in _ROWS]
    for label, key in _LATENCIES:
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{label} {stat} ms", [_ms(s[key][stat]) for s in summaries.values()]))
    names = list(summaries)
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    lines = ["  ".join([" " * width, *(n.rjust(c) for n, c in zip(names, cols))])]
    lines += ["  ".join([label.ljust(width), *(v.rjust(c) for v, c in zip(values, cols))]) for label, values in rows]
    first = next(iter(summaries.values()), None)
    if first is not None:
        lines.append(f"goodput SLOs: TTFT <= {first['slo_ttft_ms']:g} ms, TPOT <= {first['slo_tpot_ms']:g} ms")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_json(path: str | pathlib.Path, payload: dict) -> None:
    pathlib.Path(path).write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


def plot(path: str | pathlib.Path, runs: dict[str, list[RequestRecord]], title: str = "") -> None:
    """CDFs of TTFT, ITL and TPOT, and p99 ITL per second over the run; one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    cdfs = [
        (axes[0][0], "TTFT (ms)", lambda rs: [r.ttft_s for r in rs if r.ok]),
        (axes[0][1], "inter-token latency (ms)", lambda rs: [x for r in rs if r.ok for x in r.itls_s]),
        (axes[1][0], "TPOT (ms)", lambda rs: [r.tpot_s for r in rs if r.tpot_s is not None]),
    ]
    for ax, label, values in cdfs:
        for name, records in runs.items():
            ms = np.sort(np.asarray(values(records), dtype=np.float64) * 1e3)
            if ms.size:
                ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, label=name, drawstyle="steps-post")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of samples")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax = axes[1][1]
    for name, records in runs.items():
        seconds, p99 = _itl_p99_per_second(records)
        if seconds:
            ax.plot(seconds, p99, label=name, drawstyle="steps-post")
    ax.set_xlabel("time in the run (s)")
    ax.set_ylabel("p99 inter-token latency in that second (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _itl_p99_per_second(records: list[RequestRecord]) -> tuple[list[int], list[float]]:
    """For each whole second of the run, the p99 of the inter-token gaps that ended in it."""
    by_second: dict[int, list[float]] = {}
    for r in records:
        if not r.ok:
            continue
        for t_prev, t in zip(r.token_times, r.token_times[1:]):
            by_second.setdefault(int(r.sent_s + t), []).append((t - t_prev) * 1e3)
    seconds = sorted(by_second)
    return seconds, [float(np.percentile(by_second[s], 99)) for s in seconds]
