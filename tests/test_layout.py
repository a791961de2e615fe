"""The package's shape: no import cycle, stages import only lower stages, modules stay small.

The import graph is read from the source with :mod:`ast` (every ``import`` statement,
inside functions and ``TYPE_CHECKING`` blocks too: a lazy import is still a dependency),
so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cmdtool"

#: Stage of each top-level part of the package, in data-flow order. A module may import
#: modules of its own stage or of lower ones, never of a higher one.
STAGES = {
    "errors": 0,
    "objectstore": 0,
    "checkpoints": 1,
    "store": 1,
    "ingestion": 2,
    "method": 2,
    "backends": 3,
    "decomposition": 4,
    "reconstruction": 5,
    "baselines": 5,
    "evaluation": 6,
    "report": 6,
    "online": 7,
    "integrations": 8,
    "pipeline": 8,
    "cli": 9,
    "__main__": 10,
}


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a.b import c`` names ``a.b.c``
    when that is a module, else ``a.b``)."""
    mods = _modules(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in mods else base)
        graph[name] = {t for t in targets if t in mods and t != name and t.split(".")[0] == top}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.get(parts[1]) if len(parts) > 1 else None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_lower_stage_never_imports_a_higher_one() -> None:
    graph = import_graph(PACKAGE)
    unknown = sorted({m.split(".")[1] for m in graph if "." in m} - set(STAGES))
    assert not unknown, f"give these parts of the package a stage in STAGES: {unknown}"
    upward = [
        f"{src} (stage {_stage(src)}) imports {dst} (stage {_stage(dst)})"
        for src, dsts in graph.items()
        for dst in dsts
        if _stage(src) is not None and _stage(dst) is not None and _stage(dst) > _stage(src)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_backend_imports_an_estimator_or_a_writer() -> None:
    graph = import_graph(PACKAGE)
    for src, dsts in graph.items():
        if src.startswith("cmdtool.backends"):
            assert not {d for d in dsts if d.split(".")[1] in ("decomposition", "reconstruction")}


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long, f"modules over 600 lines: {long}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    "files",
    [
        {  # a direct cycle between two modules
            "__init__.py": "",
            "a.py": "from pkg.b import x\n",
            "b.py": "def f():\n    from pkg import a\n",
        },
        {  # through a package __init__ and a relative import
            "__init__.py": "",
            "sub/__init__.py": "from pkg.sub.m import y\n",
            "sub/m.py": "from ..c import z\n",
            "c.py": "import pkg.sub\n",
        },
    ],
)
def test_the_cycle_finder_finds_planted_cycles(tmp_path: Path, files: dict[str, str]) -> None:
    cycle = find_cycle(import_graph(_write(tmp_path, files)))
    assert cycle is not None and cycle[0] == cycle[-1] and len(cycle) >= 3


def test_the_cycle_finder_accepts_a_chain(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import x\n",
            "b.py": "from pkg.c import y\n",
            "c.py": "import os\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert find_cycle(graph) is None
