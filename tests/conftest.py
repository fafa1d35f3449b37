"""Shared fixtures: tiny random-weight models (per architecture) and engines over them."""

from __future__ import annotations

import pathlib

import pytest
import torch

from tests.factories import ARCHS, save_tiny_model_dir, tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model_dir(root / arch, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_oracles() -> dict[str, torch.nn.Module]:
    return {arch: tiny_hf_model(arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dirs):
    """load_model results per (arch, dtype), loaded once per session."""
    from pdserve.engine.model_loader import load_model

    cache: dict[tuple[str, str], object] = {}

    def get(arch: str = "llama", dtype: str = "float32"):
        if (arch, dtype) not in cache:
            cache[(arch, dtype)] = load_model(str(tiny_model_dirs[arch]), dtype=dtype)
        return cache[(arch, dtype)]

    return get
