"""Rollout settings: validation, the weighted choice, pinning and the shadow draw."""

from __future__ import annotations

import random

import pytest

from pdserve.errors import InvalidRequestError
from pdserve.routing.rollout import Rollout


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"weights": {"v1": -1}}, "weights"),
    ({"weights": {"v1": 0, "v2": 0}}, "weights"),
    ({"shadow_version": "v2", "shadow_fraction": 1.5}, "shadow_fraction"),
    ({"shadow_fraction": 0.5}, "shadow_version"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        Rollout(**kwargs)
    assert err.value.field == field


def test_choice_follows_weights_pins_and_shadows():
    rng = random.Random(3)
    r = Rollout({"v1": 80, "v2": 20, "v3": 0})
    picks = [r.choose(rng) for _ in range(5000)]
    assert abs(picks.count("v1") / 5000 - 0.8) < 0.03 and "v3" not in picks
    assert r.choose(rng, pinned="v3") == "v3"
    assert Rollout().choose(rng) is None
    shadowed = Rollout({"v1": 1}, "v2", 0.25)
    draws = [shadowed.shadow(rng, "v1") for _ in range(4000)]
    assert abs(draws.count("v2") / 4000 - 0.25) < 0.03
    assert shadowed.shadow(rng, "v2") is None  # never a copy to the version serving it
