"""Per-request latency records and the figures a serving benchmark reports.

Definitions (all latencies from the moment the request was sent):
- TTFT: until the first output token arrived.
- ITL (inter-token latency): the gap between two consecutive arrivals of one
  request; an arrival carrying n tokens counts as one gap (as streamed).
- TPOT (time per output token): (end-to-end - TTFT) / (output tokens - 1), per
  request; undefined for one-token outputs.
- end-to-end: until the last token arrived and the stream ended.
- throughput: completed requests (and their output tokens) per second of the run,
  from the first send to the last completion.
- goodput: completed requests per second whose TTFT <= slo_ttft_ms and whose TPOT
  <= slo_tpot_ms (a request without a TPOT meets that SLO).
Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    kind: str
    max_tokens: int
    prompt_tokens: int | None
    scheduled_s: float  # when the arrival process asked for it, from the run's start
    sent_s: float = 0.0  # when it was sent, from the run's start
    # Arrivals: seconds after sending, and how many tokens each brought.
    token_times: list[float] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    end_s: float | None = None  # seconds after sending that the stream ended
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and bool(self.token_times)

    @property
    def output_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        return self.end_s

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(ok=self.ok, output_tokens=self.output_tokens, ttft_s=self.ttft_s, tpot_s=self.tpot_s,
                   e2e_s=self.e2e_s)
        return out


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 in milliseconds (None for no values)."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    out = {"mean": float(ms.mean())}
    out.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


@dataclass(frozen=True)
class Slo:
    ttft_ms: float = 3000.0
    tpot_ms: float = 150.0

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return tpot is None or tpot * 1e3 <= self.tpot_ms


def summarize(records: list[RequestRecord], slo: Slo) -> dict:
    """Every figure of a run, JSON-ready."""
    ok = [r for r in records if r.ok]
    if records:
        start = min(r.sent_s for r in records)
        ends = [r.sent_s + r.end_s for r in records if r.end_s is not None]
        duration = max(ends) - start if ends else 0.0
    else:
        duration = 0.0
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(records),
        "num_completed": len(ok),
        "num_failed": len(records) - len(ok),
        "duration_s": duration,
        "output_tokens": output_tokens,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(output_tokens),
        "goodput": per_s(sum(1 for r in ok if slo.met_by(r))),
        "slo_ttft_ms": slo.ttft_ms,
        "slo_tpot_ms": slo.tpot_ms,
        "ttft_ms": distribution_ms([r.ttft_s for r in ok]),
        "itl_ms": distribution_ms([x for r in ok for x in r.itls_s]),
        "tpot_ms": distribution_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": distribution_ms([r.e2e_s for r in ok]),
    }
