"""The package's layering, read from its source with `ast` (every import, those inside functions too):
flashjax.weights (the checkpoint readers) never imports flashjax.store (the flash format, which builds on
it), directly or through other flashjax modules; the package stands alone: flashjax.bench (`flashjax
bench`) imports nothing from the repository's `benchmarks/`, edits no `sys.path`, and no module names the
repository's ../shared data."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "flashjax"



def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every module `name` imports anywhere in its source (absolute names; `from a import b` counts a.b
    when a.b is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return out


def _flashjax_deps(name: str) -> set[str]:
    """The flashjax modules importing `name` runs or may run: its imports, resolved to modules, plus the
    packages above each (their __init__ runs first). The root package is left out: its only imports are
    the lazy `flashjax.load` / attribute hooks, which run when called, not on import."""
    deps = set()
    for imported in _imports(name):
        if imported != "flashjax" and not imported.startswith("flashjax."):
            continue
        while imported not in MODULES:  # `from flashjax.x import attr` names an attribute: its module
            imported = imported.rpartition(".")[0]
        parts = imported.split(".")
        deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    return deps


def _reachable(start: str) -> dict[str, str]:
    """Every flashjax module reachable from `start`, each with one module that imports it."""
    seen, todo = {start: ""}, [start]
    while todo:
        current = todo.pop()
        for dep in _flashjax_deps(current):
            if dep not in seen:
                seen[dep] = current
                todo.append(dep)
    return seen


def _chain(seen: dict[str, str], end: str) -> str:
    chain = [end]
    while seen[chain[-1]]:
        chain.append(seen[chain[-1]])
    return " <- ".join(chain)


WEIGHTS = sorted(m for m in MODULES if m == "flashjax.weights" or m.startswith("flashjax.weights."))
BENCH = sorted(m for m in MODULES if m == "flashjax.bench" or m.startswith("flashjax.bench."))


def test_the_modules_are_found():
    assert {"flashjax.weights.source", "flashjax.store.model", "flashjax.bench.compare",
            "flashjax.bench.peers"} <= set(MODULES)
    assert "flashjax.store.model" in _imports("flashjax.store.convert")  # function-level imports count
    assert "flashjax.weights.source" in _flashjax_deps("flashjax.store.model")


@pytest.mark.parametrize("module", WEIGHTS)
def test_weights_never_imports_store(module):
    seen = _reachable(module)
    bad = sorted(m for m in seen if m == "flashjax.store" or m.startswith("flashjax.store."))
    assert not bad, f"{module} imports the flash format: " + "; ".join(_chain(seen, m) for m in bad)


def test_store_builds_on_weights():
    """The one-way direction: the flash format opens checkpoints through flashjax.weights."""
    from flashjax.store import manifest
    from flashjax.weights import source

    assert "flashjax.weights.source" in _imports("flashjax.store.model")
    assert source.FLASH_MANIFEST == manifest.MANIFEST_NAME  # the checkpoint opener's refusal matches the format


@pytest.mark.parametrize("module", BENCH)
def test_bench_stands_alone(module):
    tree = ast.parse(MODULES[module].read_text())
    imports = _imports(module)
    assert not [i for i in imports if i == "benchmarks" or i.startswith("benchmarks.")], imports
    edits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
             and isinstance(n.value, ast.Name) and n.value.id == "sys"]
    assert not edits, f"{module} touches sys.path (lines {edits})"


def _strings(tree: ast.AST):
    """String constants, docstrings left out."""
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docs.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node


@pytest.mark.parametrize("module", sorted(MODULES))
def test_package_reads_nothing_from_shared(module):
    tree = ast.parse(MODULES[module].read_text())
    bad = [n.lineno for n in _strings(tree) if n.value == "shared" or "shared/data" in n.value
           or "../shared" in n.value]
    assert not bad, f"{module} names the repository's ../shared data (lines {bad})"
