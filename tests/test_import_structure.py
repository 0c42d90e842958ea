"""Imports run one way: no circle among the modules of the package, its Triton kernels
and the benchmarks, and the layers train -> models -> ops -> kernels are never
crossed upwards. Read statically from the source (an import inside a function ties
two modules together as much as one at the top)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("anatomask_fast", "kernels", "benchmarks")

# What each layer must not import (as a module name prefix). ``kernels`` is installed
# as ``anatomask_fast.kernels``; ``anatomask_fast/kernels`` is a link to it in a checkout.
FORBIDDEN = {
    "kernels": ("anatomask_fast.ops", "anatomask_fast.models", "anatomask_fast.train"),
    "anatomask_fast.ops": ("anatomask_fast.models", "anatomask_fast.train"),
    "anatomask_fast.reference": (
        "anatomask_fast.ops",
        "anatomask_fast.models",
        "anatomask_fast.train",
    ),
    "anatomask_fast.models": ("anatomask_fast.train",),
}


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Module name -> file, for every .py file below the package folders (links to
    folders are not followed: ``anatomask_fast/kernels`` is ``kernels``)."""
    found = {}
    for package in packages:
        base = root / package
        for path in sorted(base.rglob("*.py")):
            relative = path.relative_to(root)
            if any(
                (root / Path(*relative.parts[:i])).is_symlink()
                for i in range(1, len(relative.parts))
            ):
                continue
            name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _canonical(name: str) -> str:
    return (
        "kernels" + name[len("anatomask_fast.kernels") :]
        if name == "anatomask_fast.kernels" or name.startswith("anatomask_fast.kernels.")
        else name
    )


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules that module ``name`` imports (any import statement)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in map(_canonical, candidates):
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    # A package re-exporting its own submodules, or a submodule reading its package's
    # __init__, is not a circle between modules.
    return {t for t in targets if not t.startswith(name + ".") and not name.startswith(t + ".")}


def graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    known = modules(root, packages)
    return {name: imported(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        for layer, banned in FORBIDDEN.items():
            if source == layer or source.startswith(layer + "."):
                bad += [
                    f"{source} imports {t}"
                    for t in sorted(targets)
                    if any(t == b or t.startswith(b + ".") for b in banned)
                ]
    return bad


def test_no_import_circle():
    found = circles(graph(ROOT, PACKAGES))
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_downwards_only():
    assert upward_imports(graph(ROOT, PACKAGES)) == []


def test_the_checks_find_a_circle_and_an_upward_import(tmp_path):
    """The detector itself: a planted circle (also through a relative import inside a
    function) and a kernel reaching into ops are found."""
    (tmp_path / "anatomask_fast" / "ops").mkdir(parents=True)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "anatomask_fast" / "__init__.py").write_text("")
    (tmp_path / "anatomask_fast" / "ops" / "__init__.py").write_text("")
    (tmp_path / "anatomask_fast" / "ops" / "a.py").write_text("from . import b\n")
    (tmp_path / "anatomask_fast" / "ops" / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "k.py").write_text("from anatomask_fast.ops.a import x\n")
    edges = graph(tmp_path, ("anatomask_fast", "kernels"))
    assert circles(edges) == [["anatomask_fast.ops.a", "anatomask_fast.ops.b"]]
    assert upward_imports(edges) == ["kernels.k imports anatomask_fast.ops.a"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_read(package):
    assert any(
        name == package or name.startswith(package + ".") for name in modules(ROOT, PACKAGES)
    )
