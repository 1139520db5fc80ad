"""The package's shape, checked from its source: no import cycle, small modules, private names
kept private, and no attack library imported by importing the package.

The import graph is built with :mod:`ast` from ``import``/``from ... import`` statements of
relucap_plugin's own modules. Two graphs are checked:

- *module level* (statements run when the module is imported, ``if TYPE_CHECKING:`` blocks
  excluded): must have no cycle at all, since such a cycle breaks or reorders imports;
- *with lazy imports* (also the imports inside functions): the cycles that remain are listed
  in :data:`LAZY_CYCLES` with the reason each is deliberate. A lazy import is how a module
  reaches a later pipeline stage (or an optional library) without paying for it at import time.

The pairs that ``duplicates --most 40`` (run in relucap_plugin/) still reports are deliberate
parallels: parser declarations of the CLI commands, the data-declared adapter members, the
adapters' ``build``/``from_native``; docs/architecture.md
lists them with the reason each stays.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import relucap_plugin

PACKAGE = Path(relucap_plugin.__file__).parent
ROOT = "relucap_plugin"

#: Modules allowed over the line limit, with the reason. Keep this short.
MAX_LINES = 600
LONG_MODULES: dict[str, str] = {}

#: (importer, imported module, name): private names imported across top-level modules, with
#: the reason. Imports inside a subpackage (relucap_plugin.surgery.* from each other) are free.
PRIVATE_IMPORTS: dict[tuple[str, str, str], str] = {}

#: Cycles of the graph with lazy imports, as sorted module tuples, with why each is deliberate.
LAZY_CYCLES: dict[tuple[str, ...], str] = {
    ("relucap_plugin.adapters", "relucap_plugin.adapters.base", "relucap_plugin.attacks"):
        "get_attack looks the library members up in the adapters' registry when called, so "
        "importing attacks imports no adapter (and no library)",
    ("relucap_plugin.surgery.convert", "relucap_plugin.surgery.quantize"):
        "inside the surgery subpackage: cap_relus(quantizable=True) dispatches to quantize, which "
        "checks itself against the ordinary float conversion",
    ("relucap_plugin.adaptive", "relucap_plugin.adaptive.suite", "relucap_plugin.evaluation"):
        "evaluate asks adaptive for the black-box layout of the data; evaluate_suite (in "
        "adaptive) is evaluate with the suite's attacks",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imports(module: str, lazy: bool):
    """Yield (imported module, names) for each import statement of ``module`` naming one of ours."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]

    def visit(body, top):
        for node in body:
            if _type_checking(node):
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parent = base[: len(base) - node.level + 1]
                    target = ".".join(parent + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target == ROOT or target.startswith(ROOT + "."):
                    names = [a.name for a in node.names]
                    for name in names:  # ``from . import x``: x is a module
                        if f"{target}.{name}" in MODULES:
                            yield f"{target}.{name}", []
                    rest = [n for n in names if f"{target}.{n}" not in MODULES]
                    if rest:
                        yield target, rest
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(ROOT + ".") and alias.name in MODULES:
                        yield alias.name, []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if lazy or isinstance(node, ast.ClassDef):
                    yield from visit(node.body, False)
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    yield from visit(getattr(node, field, []) or [], top)
            elif isinstance(node, ast.ExceptHandler):
                yield from visit(node.body, top)

    yield from visit(tree.body, True)


def _graph(lazy: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in _imports(module, lazy):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[tuple[str, ...]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _within_package(importer: str, module: str) -> bool:
    """A package and its own modules (``a.b`` and ``a.b.c``) are one room."""
    if importer.count(".") < 2 and module.count(".") < 2:
        return False
    room = lambda m: m.split(".")[1]  # noqa: E731
    return room(importer) == room(module) and (_is_package(f"{ROOT}.{room(importer)}"))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_relative_imports():
    top = _graph(lazy=False)
    assert f"{ROOT}._torch" in top[f"{ROOT}.attacks"]
    assert f"{ROOT}.attacks" in top[f"{ROOT}.adapters.base"]


def test_no_import_cycle_among_module_level_imports():
    assert _cycles(_graph(lazy=False)) == []


def test_import_cycles_through_lazy_imports_are_the_listed_ones():
    assert {c: LAZY_CYCLES.get(c, "NOT LISTED") for c in _cycles(_graph(lazy=True))} == LAZY_CYCLES


def test_no_module_over_the_line_limit():
    long = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    over = {m: n for m, n in long.items() if n > MAX_LINES}
    assert set(over) == set(LONG_MODULES), f"modules over {MAX_LINES} lines: {over}"


def test_no_private_name_imported_across_modules():
    found = {}
    for module in MODULES:
        for target, names in _imports(module, lazy=True):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and not _within_package(module, target):
                    found[(module, target, name)] = PRIVATE_IMPORTS.get((module, target, name), "NOT LISTED")
    assert found == PRIVATE_IMPORTS


def test_importing_every_module_imports_no_attack_library():
    """Every module but the three library adapters imports without ART, Foolbox or torchattacks."""
    mods = [m for m in MODULES if m not in (f"{ROOT}.adapters.art", f"{ROOT}.adapters.foolbox",
                                             f"{ROOT}.adapters.torchattacks")]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n    importlib.import_module(m)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'art', 'foolbox', 'torchattacks'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_importing_the_package_imports_no_torch():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, relucap_plugin; print(sorted({m.split('.')[0] for m in "
         "sys.modules} & {'torch', 'art', 'foolbox', 'torchattacks'}))"],
        capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
