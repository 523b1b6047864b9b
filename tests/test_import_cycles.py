"""Imports inside each package go one way: no module of vlm, train, eval or serve imports, directly or
through others of its package, a module that imports it back (function-level imports count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports anywhere in its source."""
    modules = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == package:
                found |= {f"{package}.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle_from({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}) == ["p.a", "p.b", "p.c", "p.a"]
    assert cycle_from({"p.a": {"p.b"}, "p.b": set()}) is None


@pytest.mark.parametrize("package", ["vlm", "train", "eval", "serve"])
def test_no_import_cycle_inside_a_package(package):
    cycle = cycle_from(package_imports(package))
    assert cycle is None, " -> ".join(cycle)
