"""Fixtures for end-to-end tests: a tiny model on disk and the transformers oracle."""

from __future__ import annotations

import pathlib

import pytest

from tests.factories import save_tiny_model_dir


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("e2e") / "tiny-llama", arch="llama"))


@pytest.fixture(scope="session")
def other_tiny_dir(tmp_path_factory) -> str:
    """Same shapes, other weights: a different fingerprint."""
    return str(save_tiny_model_dir(tmp_path_factory.mktemp("e2e") / "tiny-llama-2", arch="llama", seed=1))


def pytest_collection_modifyitems(items):
    for item in items:
        if pathlib.Path(str(item.fspath)).parent.name == "e2e":
            item.add_marker(pytest.mark.e2e)
