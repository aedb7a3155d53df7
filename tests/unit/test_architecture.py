"""The package's architecture, read from its source with ``ast``: no import circles, no
import from a layer above, no reaching into another module's private attributes.

Every import counts, including those under ``TYPE_CHECKING`` and inside functions: a
circle held open by hiding one of its imports is still a circle to whoever reads the
code. There are no exceptions, other than the standard library's own underscore names
listed in ``FOREIGN_PUBLIC``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cryptoplane"

# Bottom to top: a module may import from its own layer and the layers below it. As in
# ../shared/DESIGN.md, with the vocabulary every layer names (the exceptions it raises,
# the algorithm catalogue) beneath the kernels that raise and look them up.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("vocabulary", ("cryptoplane.exceptions", "cryptoplane.algorithms",
                    "cryptoplane._version")),
    ("native", ("cryptoplane._native",)),
    ("kernels", ("cryptoplane.kernels",)),
    ("nouns", ("cryptoplane.keys", "cryptoplane.requests", "cryptoplane.chain",
               "cryptoplane.session", "cryptoplane.stats")),
    ("engines", ("cryptoplane.engines",)),
    ("scheduler", ("cryptoplane.scheduler",)),
    ("plane", ("cryptoplane.plane", "cryptoplane.sector_runs")),
    ("consumers", ("cryptoplane.volume", "cryptoplane.nbd", "cryptoplane.stream",
                   "cryptoplane.telemetry", "cryptoplane.offload")),
    ("package", ("cryptoplane",)),  # the facade: ``import cryptoplane as cp``
    ("tools", ("cryptoplane.cli", "cryptoplane.__main__", "cryptoplane.yardstick")),
]

# Consumers whose cryptography goes through the plane, so that its engines, balancer,
# QoS limits and statistics see their work: none of their modules imports the native
# kernels (a chunk or sector run is a request, served by engines through ``kernels``).
THROUGH_THE_PLANE = ("cryptoplane.stream", "cryptoplane.volume", "cryptoplane.nbd")

# Underscore names that are another module's public API (the standard library's).
FOREIGN_PUBLIC: dict[str, str] = {
    "os._exit": "the documented way to end a process without running cleanup handlers",
}


# -- reading the package --------------------------------------------------------------


@cache
def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text(), str(modules()[module]))


def _base(module: str, node: ast.ImportFrom) -> str:
    """The absolute name ``from X import ...`` refers to as X."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if modules()[module].name != "__init__.py":
        parts.pop()  # a module's relative imports start at its package
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + (node.module.split(".") if node.module else []))


def targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The package's modules that ``node`` imports (a name from a module counts as that
    module; a submodule by name counts as the submodule)."""
    known = modules()
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name in known)
        return
    base = _base(module, node)
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            yield sub
        elif base in known:
            yield base


@cache
def graph() -> dict[str, frozenset[str]]:
    edges: dict[str, frozenset[str]] = {}
    for m in modules():
        found = {t for n in ast.walk(tree(m)) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for t in targets(m, n)}
        edges[m] = frozenset(found - {m})
    return edges


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    component.append(x)
                    if x == v:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def layer(module: str) -> int:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer: add it to LAYERS"
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def defined_here(module: str) -> set[str]:
    """Private names this module defines: its functions and classes, attributes it
    assigns (on any object), slots and class-level names. Using them on any object in
    this module is the module's own business."""
    names: set[str] = set()
    for n in ast.walk(tree(module)):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                for x in ast.walk(t):
                    if isinstance(x, ast.Attribute):
                        names.add(x.attr)
                    elif isinstance(x, ast.Name):
                        names.add(x.id)
            if isinstance(n, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__slots__" for t in n.targets):
                names |= {c.value for c in ast.walk(n.value)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return {x for x in names if _private(x)}


def private_uses(module: str) -> set[str]:
    """Where ``module`` touches a private name it does not define: ``obj._x`` (other
    than on ``self``/``cls``/``super()``), ``getattr(obj, "_x")`` and its kin, and
    ``from elsewhere import _x`` (a private submodule is the package's, and fine)."""
    own = defined_here(module)
    found: set[str] = set()
    for n in ast.walk(tree(module)):
        if isinstance(n, ast.Attribute) and _private(n.attr) and n.attr not in own:
            v = n.value
            if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            text = ast.unparse(n)
            if text not in FOREIGN_PUBLIC:
                found.add(text)
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in (
                "getattr", "setattr", "hasattr", "delattr") and len(n.args) >= 2:
            name = n.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(
                    name.value) and name.value not in own:
                found.add(ast.unparse(n))
        elif isinstance(n, ast.ImportFrom):
            base = _base(module, n)
            for alias in n.names:
                if _private(alias.name) and f"{base}.{alias.name}" not in modules():
                    found.add(f"import {alias.name} from {'.' * n.level}{n.module or ''}")
    return found


# -- the rules --------------------------------------------------------------------------


def test_the_package_has_no_import_circle() -> None:
    found = cycles(graph())
    assert not found, "import circles (every import counts, TYPE_CHECKING and in-function "\
        "ones too): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_from_a_layer_above() -> None:
    wrong = sorted((m, t) for m, ts in graph().items() for t in ts if layer(t) > layer(m))
    assert not wrong, "imports from a layer above: " + "; ".join(
        f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})" for m, t in wrong)


def test_consumers_reach_the_native_code_only_through_the_plane() -> None:
    def native(t: str) -> bool:
        return t == "cryptoplane._native" or t.startswith("cryptoplane._native.")

    consumers = [m for m in modules() if m.startswith(THROUGH_THE_PLANE)]
    assert consumers, f"no module under {THROUGH_THE_PLANE}"
    wrong = sorted((m, t) for m in consumers for t in graph()[m] if native(t))
    assert not wrong, "consumers importing the native code around the plane: " + "; ".join(
        f"{m} imports {t}" for m, t in wrong)


def test_every_module_has_a_layer() -> None:
    for m in modules():
        layer(m)


def test_no_module_touches_another_modules_private_names() -> None:
    found = sorted((m, what) for m in modules() for what in private_uses(m))
    assert not found, "private names used outside the module that defines them (give " \
        "them a public, well-named interface): " + "; ".join(f"{m}: {w}" for m, w in found)


# -- the checks check ---------------------------------------------------------------------


def test_the_checks_see_hidden_imports_and_private_access(tmp_path: Path) -> None:
    """The analysis itself: an import under TYPE_CHECKING or in a function is an edge, a
    circle is found, and ``obj._x`` from another module is a private access."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .b import B\n"
        "def f(o):\n    from . import c\n    return o._hidden, self_ok(o)\n"
        "class A:\n    __slots__ = ('_mine',)\n"
        "    def g(self, other):\n        return self._x, other._mine\n")
    cases = {"cryptoplane.a": source, "cryptoplane.b": "from .a import f\n",
             "cryptoplane.c": ""}
    paths = {m: tmp_path / f"{m.split('.')[1]}.py" for m in cases}
    for m, text in cases.items():
        paths[m].write_text(text)
    trees = {m: ast.parse(text) for m, text in cases.items()}
    modules.cache_clear()
    tree.cache_clear()
    real_modules, real_tree = modules.__wrapped__, tree.__wrapped__
    try:
        globals()["modules"] = lambda: paths
        globals()["tree"] = lambda m: trees[m]
        edges = {m: frozenset(t for n in ast.walk(trees[m])
                              if isinstance(n, (ast.Import, ast.ImportFrom))
                              for t in targets(m, n)) for m in cases}
        assert edges["cryptoplane.a"] == {"cryptoplane.b", "cryptoplane.c"}
        assert cycles(edges) == [["cryptoplane.a", "cryptoplane.b"]]
        assert private_uses("cryptoplane.a") == {"o._hidden"}  # not self._x, not _mine
    finally:
        globals()["modules"] = cache(real_modules)
        globals()["tree"] = cache(real_tree)
