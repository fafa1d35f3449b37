"""The client distribution (clients/python): its wheel, installed into a fresh venv with only
grpcio and protobuf, streams a request through a real cluster, and torch is not there.

1. as `python -m build` does, an sdist is made from a copy of clients/python and pdserve/
   (what a clean checkout has: no build/ or egg-info of an earlier build), and the wheel
   from that sdist alone, without build isolation;
2. a fresh venv of the interpreter behind this one gets the wheel and its dependencies
   from the configured package indexes (once per session), and nothing else;
3. a script run by that venv's python, outside the repository, drives a tiny cluster through
   the SDK and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import pdserve
from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from tests.cluster_helpers import E2E_LOG

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Not importable in the client's venv (so `import torch` fails there), let alone imported by the SDK.
HEAVY = ("torch", "transformers", "numpy", "opentelemetry")
PROMPT = [5, 17, 42, 99, 7]
MAX_TOKENS = 6

# Run by the client venv's python: argv[1] is the router's address; prints one JSON object.
CLIENT_SCRIPT = """
import asyncio, importlib.util, json, sys

import pdserve
from pdserve.client import AsyncClient, Client
from pdserve.errors import InvalidRequestError

HEAVY = {heavy!r}
out = {{"pdserve_file": pdserve.__file__, "version": pdserve.__version__,
        "importable": [m for m in HEAVY if importlib.util.find_spec(m) is not None]}}
with Client(sys.argv[1], timeout=60) as client:
    stream = client.generate(prompt_token_ids={prompt!r}, max_tokens={max_tokens}, temperature=0.0,
                             ignore_eos=True)
    out["deltas"] = [delta.token_ids for delta in stream]
    out["finish_reason"] = stream.result.finish_reason
    out["completion_tokens"] = stream.result.usage.completion_tokens
    try:
        client.complete(prompt="hello " * 600, max_tokens=2)  # refused by the cluster, not the SDK
    except InvalidRequestError as exc:
        out["error_field"] = exc.field


async def complete_async():
    async with AsyncClient(sys.argv[1], timeout=60) as client:
        return (await client.complete(prompt_token_ids={prompt!r}, max_tokens={max_tokens},
                                      temperature=0.0, ignore_eos=True)).token_ids


out["async_token_ids"] = asyncio.run(complete_async())
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print(json.dumps(out))
""".format(heavy=HEAVY, prompt=PROMPT, max_tokens=MAX_TOKENS)


def run(args: list[str | os.PathLike], **kwargs) -> subprocess.CompletedProcess:
    """`args`, checked; on failure the error carries its output."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def venv_env() -> dict[str, str]:
    """This environment without what would make a child python see this venv or the repository."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


@pytest.fixture(scope="session")
def client_wheel(tmp_path_factory) -> pathlib.Path:
    """pdserve-client's wheel, built from its sdist as `python -m build` builds it."""
    tmp = tmp_path_factory.mktemp("client-dist")
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    shutil.copytree(ROOT / "pdserve", tmp / "src" / "pdserve", ignore=ignore)
    project = tmp / "src" / "clients" / "python"
    shutil.copytree(ROOT / "clients" / "python", project, symlinks=True, ignore=ignore)
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist = run([sys.executable, "-c", build_sdist, tmp / "dist"], cwd=project).stdout.split()[-1]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist",
         tmp / "dist" / sdist])
    wheel, = (tmp / "dist").glob("*.whl")
    return wheel


@pytest.fixture(scope="session")
def client_python(client_wheel, tmp_path_factory) -> pathlib.Path:
    """The python of a fresh venv holding the client wheel and its dependencies, nothing else."""
    venv = tmp_path_factory.mktemp("client-venv")
    # No pip of its own (ensurepip alone takes seconds): this venv's pip installs into it.
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv], env=venv_env())
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", client_wheel], env=venv_env())
    return python


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=1, model=tiny_dir, dtype="float32", router_listen="127.0.0.1:0",
                       kv_cache_gib=0.05, heartbeat_s=0.5, log_path=E2E_LOG)
    with LocalCluster(spec) as c:
        yield c


def test_the_wheel_holds_the_sdk_and_the_stubs_only(client_wheel):
    assert client_wheel.name == f"pdserve_client-{pdserve.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(client_wheel) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"pdserve_client-{pdserve.__version__}.dist-info/METADATA").decode()
    modules = sorted(n for n in names if n.startswith("pdserve/"))
    assert "pdserve/client/client.py" in modules and "pdserve/v1/router_pb2_grpc.py" in modules
    # Nothing of the daemons or the engine.
    assert not [m for m in modules if m.startswith(("pdserve/server/", "pdserve/engine/", "pdserve/kv_transfer/"))]
    requires = sorted(line.split(":", 1)[1].strip() for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert [r.split(">")[0] for r in requires] == ["grpcio", "protobuf"]


def test_the_installed_sdk_streams_from_a_cluster_without_torch(client_python, cluster, tmp_path):
    script = tmp_path / "use_client.py"
    script.write_text(CLIENT_SCRIPT)
    # Run from tmp_path, so the repository's pdserve/ is not on the path.
    out = json.loads(run([client_python, script, cluster.address], cwd=tmp_path, env=venv_env()).stdout)

    assert pathlib.Path(out["pdserve_file"]).is_relative_to(client_python.parent.parent)
    assert out["version"] == pdserve.__version__
    assert out["importable"] == [] and out["loaded"] == []
    with Client(cluster.address, timeout=60) as client:  # the repository's SDK, as a reference
        expected = client.complete(prompt_token_ids=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                   ignore_eos=True).token_ids
    assert len(expected) == MAX_TOKENS
    assert [t for ids in out["deltas"] for t in ids] == expected == out["async_token_ids"]
    assert out["finish_reason"] == "length" and out["completion_tokens"] == MAX_TOKENS
    assert out.get("error_field") == "prompt", "a too long prompt was not refused with InvalidRequestError"
