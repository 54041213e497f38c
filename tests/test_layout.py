"""The package's shape: no import cycle (lazy imports included), ``ops`` below everything,
small modules, and no reference a reader of the repository cannot follow."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "adaptkern"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """adaptkern modules imported anywhere in ``path`` (module level and inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "adaptkern")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "adaptkern":
                continue
            found.add(mod)
            # `from . import x` / `from .ops import reference` may name submodules.
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _package_edges(graph):
    """An import of ``a.b.c`` also runs ``a.b``'s ``__init__``: add those edges."""
    out = {}
    for name, deps in graph.items():
        full = set(deps)
        for d in deps:
            parts = d.split(".")
            full.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in graph)
        out[name] = {d for d in full if d != name and not name.startswith(d + ".")}
    return out


def test_no_import_cycle():
    graph = _package_edges(_graph())
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_ops_imports_nothing_above_it():
    graph = _graph()
    above = ("adaptkern.bench", "adaptkern.nn", "adaptkern.integrations", "adaptkern.cli", "adaptkern.pool",
             "adaptkern.functional", "adaptkern.mixed", "adaptkern.testing")
    bad = {name: sorted(d for d in deps if d.startswith(above))
           for name, deps in graph.items() if name.startswith("adaptkern.ops")}
    assert not {k: v for k, v in bad.items() if v}


def test_no_private_names_across_modules():
    """``from x import _private`` between adaptkern modules means a missing public name. The one
    exception: an op's ``op.py`` launches the ``_<op>_*_kernel`` functions of its own ``kernels.py``."""
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("adaptkern")):
                own_kernels = node.level == 1 and node.module == "kernels" and path.name == "op.py"
                offenders += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")
                              and not (own_kernels and a.name.startswith(f"_{path.parent.name}_"))]
    assert not offenders


def test_modules_are_small():
    big = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


_UNFOLLOWABLE = re.compile(r"DESIGN\s*§|\bissue\s*#?\d+\b|§\s*\d", re.IGNORECASE)


def test_no_references_a_reader_cannot_follow():
    files = [*PKG.rglob("*.py"), *PKG.rglob("*.md"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md",
             *(ROOT / "tests").glob("**/*.py"), *(ROOT / "csrc").glob("*"),
             *(ROOT / "benchmarks").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.md")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if _UNFOLLOWABLE.search(line)]
    assert not hits, "\n".join(hits)


def test_dir_lists_the_public_api():
    import adaptkern

    names = set(dir(adaptkern))
    for name in adaptkern.__all__:
        assert name in names, name
        assert getattr(adaptkern, name) is not None
