"""The package's module graph: no import circles (imports inside functions count too, as a
circle there is still two modules that each need the other), and every module imports on
its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edice_dist

PKG = Path(edice_dist.__file__).parent
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("__init__", "__main__"))


def _imports(path: Path) -> set[str]:
    """The package modules that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                head = node.module.split(".")[0] if node.module else None
            elif node.level == 0 and (node.module or "").startswith("edice_dist."):
                head = node.module.split(".")[1]
            else:
                continue
            found |= {head} if head else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("edice_dist.")}
    return found & set(MODULES)


def graph() -> dict[str, set[str]]:
    return {m: _imports(PKG / f"{m}.py") - {m} for m in MODULES}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles():
    g = graph()
    assert {"impute", "export", "evaluate", "plots", "runfolder", "stages"} <= set(g)
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_the_run_folder_and_value_spaces_have_one_home():
    g = graph()
    for m in ("impute", "export", "evaluate", "info"):
        assert "runfolder" in g[m] or m == "evaluate" and "truth" in g[m], m
    assert "impute" not in g["export"] and "evaluate" not in g["plots"]
    for m in ("export", "evaluate", "truth", "impute"):
        assert "spaces" in g[m], m


def test_every_module_imports_on_its_own():
    """Each module imported first, in one fresh interpreter (the package's own modules
    are forgotten between imports; third-party ones stay loaded, for speed)."""
    code = (
        "import importlib, sys\n"
        f"for m in {MODULES!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('edice_dist.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module('edice_dist.' + m)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
