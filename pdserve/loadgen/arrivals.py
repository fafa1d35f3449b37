"""When requests are sent: open-loop schedules (Poisson, gamma) or a closed loop.

Open loop: request i is sent at a fixed offset from the run's start, whatever the
server is doing, so a slow server builds a queue (what users see). Inter-arrival
gaps are drawn from a gamma distribution with shape `burstiness` and mean
1 / rate: burstiness 1 is a Poisson process, below 1 burstier, above 1 more even.
rate = inf sends everything at once. Closed loop: `concurrency` clients, each
sending its next request when the previous one ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Arrivals:
    rate: float | None = None  # requests per second (open loop); math.inf: all at once
    burstiness: float = 1.0
    concurrency: int | None = None  # closed loop
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) and concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    @property
    def closed_loop(self) -> bool:
        return self.concurrency is not None

    def offsets(self, n: int) -> list[float]:
        """Send times of n requests in seconds from the start (open loop); the first at 0."""
        if self.closed_loop:
            raise ValueError("a closed loop has no schedule")
        if math.isinf(self.rate):
            return [0.0] * n
        rng = np.random.default_rng(self.seed)
        gaps = rng.gamma(shape=self.burstiness, scale=1.0 / (self.rate * self.burstiness), size=max(n - 1, 0))
        return [0.0, *np.cumsum(gaps).tolist()]

    def describe(self) -> str:
        if self.closed_loop:
            return f"closed loop, concurrency {self.concurrency}"
        kind = "poisson" if self.burstiness == 1.0 else f"gamma (burstiness {self.burstiness})"
        return f"{kind} at {self.rate:g} req/s"
