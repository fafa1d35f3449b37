"""Builds libpdserve_kernels.so, the paged-attention ops of `csrc/`, with the C++ compiler directly.

Owns: the compiler invocations, the digest that names a build, and where the library
lands: `<cache_dir()>/kernels/<digest>/libpdserve_kernels.so`. The digest covers the
sources, torch's version, the flags and the compiler's version, so a change to any of
them builds anew. Never through pip: a build-isolation environment would pull a CUDA torch.

`csrc/attention_kernels.cpp` (no torch headers) is compiled once per instruction set
(generic, and on x86 also avx2 and avx512; never -march=native: images are built on one
host and run on another); every other `csrc/*.cpp` (the attention ops' glue, the
quantized linears) once against torch's headers. The objects compile in parallel and
link into one library, written to a temporary file in the target directory and renamed
into place, under a file lock, so daemons starting together build once.

`python -m pdserve.engine.kernels.build` builds and prints the library's path.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.utils.cpp_extension

from pdserve.engine.host import cache_dir

logger = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).parent / "csrc"
LIBRARY_NAME = "libpdserve_kernels.so"
_PER_ISA_SOURCE = "attention_kernels.cpp"
_COMMON_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-ffp-contract=fast", "-Wno-psabi")
# Per instruction set: the defines and -m flags attention_kernels.cpp is compiled with.
_ISA_FLAGS = {
    "generic": (),
    "avx2": ("-DPDSERVE_ISA_AVX2", "-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-DPDSERVE_ISA_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
}


class BuildError(RuntimeError):
    """The compiler is missing or failed; `stderr` holds its output."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


@dataclass(frozen=True)
class _Compile:
    source: str  # file name under csrc/
    output: str  # object file name
    flags: tuple[str, ...]


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _compiles() -> list[_Compile]:
    """Torch-facing sources first: they take longest."""
    torch_flags = (
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in torch.utils.cpp_extension.include_paths()),
    )
    isas = ["avx512", "avx2", "generic"] if platform.machine() in ("x86_64", "AMD64") else ["generic"]
    sources = sorted(p.name for p in CSRC.glob("*.cpp"))
    stem = _PER_ISA_SOURCE.removesuffix(".cpp")
    per_isa = [_Compile(_PER_ISA_SOURCE, f"{stem}_{isa}.o", _COMMON_FLAGS + ("-Wall",) + _ISA_FLAGS[isa])
               for isa in isas if _PER_ISA_SOURCE in sources]
    return [_Compile(s, s.removesuffix(".cpp") + ".o", _COMMON_FLAGS + torch_flags)
            for s in sources if s != _PER_ISA_SOURCE] + per_isa


def _link_flags() -> list[str]:
    flags = ["-shared", "-fopenmp"]
    for lib_dir in torch.utils.cpp_extension.library_paths():
        flags += [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]
    return flags + ["-lc10", "-ltorch_cpu", "-ltorch"]


def _compiler_version(cxx: str) -> str:
    try:
        done = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"no usable C++ compiler {cxx!r}: {e}") from e
    return done.stdout


def digest() -> str:
    """Names a build: the sources, torch's version, the flags and the compiler."""
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    cxx = _compiler()
    parts = [torch.__version__, platform.machine(), cxx, _compiler_version(cxx), repr(_compiles()), repr(_link_flags())]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:24]


def library_path() -> pathlib.Path:
    """Where the library of the current sources, torch and compiler is (or will be) built."""
    return cache_dir() / "kernels" / digest() / LIBRARY_NAME


def build(force: bool = False) -> pathlib.Path:
    """Builds the library unless it is already there; returns its path. Raises BuildError."""
    path = library_path()
    if path.exists() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists() and not force:
            return path  # another process built it while we waited
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=path.parent, prefix="build-") as tmp:
            built = _compile_and_link(pathlib.Path(tmp))
            os.replace(built, path)
        logger.info("built %s in %.1f s", path, time.monotonic() - started)
    return path


def _compile_and_link(workdir: pathlib.Path) -> pathlib.Path:
    cxx = _compiler()
    compiles = _compiles()
    jobs = [(f"compiling {c.output}", [cxx, *c.flags, "-c", str(CSRC / c.source), "-o", str(workdir / c.output)])
            for c in compiles]
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(lambda job: _run(*job), jobs):  # the first failure raises
            pass
    output = workdir / LIBRARY_NAME
    _run("linking", [cxx, *(str(workdir / c.output) for c in compiles), *_link_flags(), "-o", str(output)])
    return output


def _run(what: str, command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise BuildError(f"{what}: could not run {command[0]!r}: {e}") from e
    if done.returncode != 0:
        raise BuildError(f"{what} failed (exit {done.returncode})", f"$ {' '.join(command)}\n{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build pdserve's compiled paged-attention ops.")
    parser.add_argument("--force", action="store_true", help="rebuild even if the library exists")
    args = parser.parse_args(argv)
    try:
        path = build(force=args.force)
    except BuildError as e:
        print(e.stderr, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
