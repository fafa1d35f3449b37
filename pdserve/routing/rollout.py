"""Traffic split over worker versions: weights, pinned (A/B) requests, and a shadow version.

A worker's version is its `--version` label. With no weights every version serves
(the default). With weights, each request draws a version in proportion to them;
a request that names a version (SDK field, HTTP header X-Pdserve-Version) goes to
it. A shadow version gets a copy of a share of the requests; its answers are
discarded. Pure logic: the router owns the randomness source and the setting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pdserve.errors import InvalidRequestError


@dataclass(frozen=True)
class Rollout:
    weights: dict[str, int] = field(default_factory=dict)
    shadow_version: str = ""
    shadow_fraction: float = 0.0

    def __post_init__(self) -> None:
        if any(w < 0 for w in self.weights.values()):
            raise InvalidRequestError("weights", f"must be >= 0, got {self.weights}")
        if self.weights and not any(self.weights.values()):
            raise InvalidRequestError("weights", "at least one weight must be > 0")
        if not 0.0 <= self.shadow_fraction <= 1.0:
            raise InvalidRequestError("shadow_fraction", f"must be in [0, 1], got {self.shadow_fraction}")
        if self.shadow_fraction and not self.shadow_version:
            raise InvalidRequestError("shadow_version", "is required with a shadow fraction")

    def choose(self, rng: random.Random, pinned: str = "") -> str | None:
        """The version to serve a request on; None: any."""
        if pinned:
            return pinned
        if not self.weights:
            return None
        versions = [v for v, w in self.weights.items() if w > 0]
        return rng.choices(versions, weights=[self.weights[v] for v in versions])[0]

    def shadow(self, rng: random.Random, serving: str | None) -> str | None:
        """The version a copy of this request goes to, if any (never the serving one)."""
        if self.shadow_fraction and self.shadow_version != serving and rng.random() < self.shadow_fraction:
            return self.shadow_version
        return None
