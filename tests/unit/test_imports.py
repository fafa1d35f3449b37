"""The package's layering, checked from the source: no import circles, an engine that knows nothing
of gRPC, protobuf or the daemons, and daemons that do not import one another."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2] / "pdserve"
DAEMONS = ("pdserve.server.prefill", "pdserve.server.decode", "pdserve.server.router")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (a lazy import is still a dependency)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py") if "v1" not in p.relative_to(ROOT).parts}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_inside_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("path", sorted((ROOT / "engine").rglob("*.py")), ids=lambda p: p.name)
def test_the_engine_imports_no_grpc_protobuf_or_daemon(path):
    bad = sorted(m for m in imports_of(path)
                 if m.split(".")[0] in ("grpc", "google") or m.startswith(("pdserve.server", "pdserve.v1",
                                                                                 "pdserve.kv_transfer")))
    assert not bad, f"{module_name(path)} imports {bad}"


def daemon_of(module: str) -> str | None:
    return next((d for d in DAEMONS if module == d or module.startswith(d + ".")), None)


def test_no_daemon_imports_another():
    for module, imported in graph().items():
        own = daemon_of(module)
        others = sorted(m for m in imported if daemon_of(m) not in (None, own))
        assert not others, f"{module} imports {others}"


def test_the_daemons_are_packages_the_checks_see():
    assert {daemon_of(m) for m in graph()} >= set(DAEMONS)
