"""The CLI: user errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("generate", "--local", "--model", "/nonexistent/model.gguf", "hi"), "/nonexistent/model.gguf"),
        (("generate", "--local", "--bogus-flag", "hi"), "--bogus-flag"),
        (("generate", "--local", "--dtype", "int3", "hi"), "dtype"),
        (("generate", "hi"), "--local"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16).save_pretrained(tmp_path)
    result = run_cli("generate", "--local", "--model", str(tmp_path), "hi")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "gpt2" in lines[0], result.stderr


def test_generate_local_streams_on_a_tiny_model(tiny_model_dirs):
    result = run_cli("generate", "--local", "--model", str(tiny_model_dirs["llama"]), "--dtype", "float32",
                     "--temperature", "0", "--max-tokens", "5", "abc")
    assert result.returncode == 0, result.stderr
    assert "5 generated tokens" in result.stderr or "stop" in result.stderr
