"""The Dockerfile cannot be built here (no registry): check what can be checked without building it."""

from __future__ import annotations

import json
import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_images_commands_are_console_scripts_of_the_package():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"pdserve", "pdserve-prefill", "pdserve-decode", "pdserve-router"} <= set(scripts)
    dockerfile = (ROOT / "Dockerfile").read_text()
    commands = [json.loads(m.group(2))[0] for m in re.finditer(r"^(CMD|ENTRYPOINT)\s+(\[.*\])\s*$", dockerfile, re.M)]
    assert commands and all(c in scripts for c in commands)
    # Every file the image copies exists, and torch is pinned to the CPU build's version, as in the Makefile.
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", dockerfile, re.M):
        assert all((ROOT / path).exists() for path in src.split()), src
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", dockerfile).group(1)
    assert f"TORCH_VERSION ?= {torch_pin}" in makefile
