"""Generate the gRPC stubs in pdserve/v1/ from protos/pdserve/v1/*.proto.

    python scripts/gen_protos.py           # regenerate the committed stubs
    python scripts/gen_protos.py --check   # exit 1 listing stale stubs, change nothing

Both modes run protoc (from grpcio-tools, in-process) into a temporary
directory; generate then copies the output over pdserve/v1/ and deletes stubs
whose .proto is gone, check only compares. The output depends on the
grpcio-tools version, so stubs generated with another version show up as stale.
pdserve/v1/__init__.py is hand-written and never touched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE = Path("pdserve") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, sorted so protoc sees them in a stable order."""
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def run_protoc(out_root: Path) -> None:
    """Writes the stubs under out_root/pdserve/v1/; raises if protoc fails."""
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",  # argv[0], ignored by protoc
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(path) for path in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed; its errors are on stderr")


def generated_files(root: Path) -> dict[str, bytes]:
    """Generated stubs under root/pdserve/v1/, by file name."""
    directory = root / PACKAGE
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if is_generated(p)}


def stale_files(stub_dir: Path | None = None) -> list[str]:
    """Stubs in stub_dir (default: the committed pdserve/v1/) that differ from a
    fresh generation: changed, missing or no longer generated. Sorted file names."""
    stub_dir = stub_dir or REPO_ROOT / PACKAGE
    committed = {p.name: p.read_bytes() for p in sorted(stub_dir.glob("*")) if is_generated(p)}
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp))
        fresh = generated_files(Path(tmp))
    names = committed.keys() | fresh.keys()
    return sorted(name for name in names if committed.get(name) != fresh.get(name))


def generate() -> list[str]:
    """Rewrites the committed stubs; returns the names of the files it changed."""
    target = REPO_ROOT / PACKAGE
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(Path(tmp))
        fresh = generated_files(Path(tmp))
    changed = []
    for path in sorted(target.iterdir()):
        if is_generated(path) and path.name not in fresh:
            path.unlink()
            changed.append(path.name)
    for name, content in fresh.items():
        path = target / name
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
            changed.append(name)
    return sorted(changed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 listing stubs that differ from a fresh generation; write nothing",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale stubs in {PACKAGE}/ (run: python scripts/gen_protos.py):", file=sys.stderr)
            for name in stale:
                print(f"  {name}", file=sys.stderr)
            return 1
        print(f"{PACKAGE}/ stubs are up to date")
        return 0
    changed = generate()
    print(f"{PACKAGE}/: {len(changed)} file(s) updated" + "".join(f"\n  {n}" for n in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
