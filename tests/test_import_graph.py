"""The project's import graph has no circles, and the api does not import the worker.

The graph is read from the source with `ast` (nothing is imported): every `import` and
`from ... import` in a module counts, at module level or inside a function (a lazy import still
runs, so it still closes a circle), with relative imports resolved and `from pkg import name`
counted as an import of the submodule `pkg.name` where `name` is one. `importlib.import_module`
counts too where its name is a literal, or an f-string over a module-level list or dict of names
(the lazy re-exports of welore_core/__init__.py, finetune/__init__.py, the CLI's command modules).

Three checks:
- file level: no cycle among modules (a package's `__init__.py` is the module named like the
  package);
- package level: inside every package (and among the top-level packages api, worker,
  welore_core, welore_client) no cycle among its direct children, a subpackage standing for
  everything under it -- e.g. no api.catalog ⇄ api.jobs, no api ⇄ worker;
- nothing under api/ imports worker (api enqueues worker tasks by name, see api/dispatch.py).

No import is allow-listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "worker", "welore_core", "welore_client")
TOP = "<top level>"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py file of the project's packages."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            found[_module_name(path, root)] = path
    return found


def _is_package(modules: dict[str, Path], name: str) -> bool:
    return name in modules and modules[name].name == "__init__.py"


def _resolve(modules: dict[str, Path], name: str) -> str | None:
    """The project module `name` refers to: itself, else its longest project prefix."""
    while name:
        if name in modules:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return None


def _literal_names(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level `NAME = [...] / (...) / {...}` of strings: the names (a dict's values)."""
    out: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            items = value.values if isinstance(value, ast.Dict) else getattr(value, "elts", None)
            if isinstance(value, (ast.Dict, ast.List, ast.Tuple, ast.Set)) and all(
                    isinstance(i, ast.Constant) and isinstance(i.value, str) for i in items):
                out[node.targets[0].id] = [i.value for i in items]
    return out


def _dynamic_names(tree: ast.Module, call: ast.Call, module: str) -> list[str]:
    """The absolute module names an `import_module(...)` call may load (empty: cannot tell)."""
    literals = _literal_names(tree)
    loops = {n.target.id: literals[n.iter.id] for n in ast.walk(tree)
             if isinstance(n, ast.For) and isinstance(n.target, ast.Name) and isinstance(n.iter, ast.Name)
             and n.iter.id in literals}

    def values(node) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Name) and node.id in ("__name__", "__package__"):
            return [module]
        if isinstance(node, ast.Name) and node.id in loops:
            return loops[node.id]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in literals:
            return literals[node.value.id]
        if isinstance(node, ast.FormattedValue):
            return values(node.value)
        if isinstance(node, ast.JoinedStr):
            out = [""]
            for part in node.values:
                vs = values(part)
                if not vs:
                    return []
                out = [a + b for a in out for b in vs]
            return out
        return []

    if not call.args:
        return []
    names = values(call.args[0])
    anchors = values(call.args[1]) if len(call.args) > 1 else [""]
    out = []
    for n in names:
        if n.startswith("."):
            dots = len(n) - len(n.lstrip("."))
            for anchor in anchors:
                parts = anchor.split(".")[: len(anchor.split(".")) - (dots - 1)]
                out.append(".".join(parts + ([n[dots:]] if n[dots:] else [])))
        else:
            out.append(n)
    return out


def _is_import_module(node: ast.AST) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return (isinstance(f, ast.Attribute) and f.attr == "import_module" and isinstance(f.value, ast.Name)
            and f.value.id == "importlib") or (isinstance(f, ast.Name) and f.id == "import_module")


def imports_of(modules: dict[str, Path], name: str) -> set[str]:
    """Project modules imported anywhere in module `name` (module or function level)."""
    path = modules[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if _is_package(modules, name) else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if _is_import_module(node):
            for target in _dynamic_names(tree, node, name):
                resolved = _resolve(modules, target)
                if resolved:
                    out.add(resolved)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(modules, alias.name)
                if target:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and sub in modules:
                    out.add(sub)
                else:
                    target = _resolve(modules, base)
                    if target:
                        out.add(target)
    out.discard(name)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imports_of(modules, name) for name in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None. Deterministic (sorted order)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt, BLACK) == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with a cycle: each set of nodes that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[set[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # Tarjan; the graphs are small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per circle (strongly connected component), so a failure names every circle."""
    cycles = []
    for comp in circles(graph):
        sub = {n: {m for m in graph[n] if m in comp} for n in comp}
        cycle = find_cycle(sub)
        assert cycle
        cycles.append(cycle)
    return sorted(cycles)


def package_graphs(graph: dict[str, set[str]], modules: dict[str, Path]) -> dict[str, dict[str, set[str]]]:
    """For every package (and "" for the top level): the graph among its direct children.

    A child is a module directly in the package, or a subpackage standing for all its modules;
    the package's own `__init__` is a child named like the package. Edges are the imports between
    modules under different children.
    """
    packages = [""] + sorted(n for n in modules if _is_package(modules, n))
    result: dict[str, dict[str, set[str]]] = {}
    for pkg in packages:
        prefix = f"{pkg}." if pkg else ""

        def child(mod: str) -> str | None:
            if pkg and mod == pkg:
                return pkg
            if not mod.startswith(prefix):
                return None
            return prefix + mod[len(prefix):].split(".", 1)[0]

        sub: dict[str, set[str]] = {}
        for mod, targets in graph.items():
            a = child(mod)
            if a is None:
                continue
            sub.setdefault(a, set())
            for t in targets:
                b = child(t)
                if b is not None and b != a:
                    sub[a].add(b)
        result[pkg or TOP] = sub
    return result


def _fmt(cycle: list[str], graph: dict[str, set[str]] | None = None) -> str:
    """The cycle, and every other node caught in the same circle (each must be untangled too)."""
    text = " -> ".join(cycle)
    if graph is not None:
        comp = next(c for c in circles(graph) if cycle[0] in c)
        others = sorted(comp - set(cycle))
        if others:
            text += f"  (the same circle also holds {', '.join(others)})"
    return text


def _why(graph: dict[str, set[str]], pkg: str, a: str, b: str) -> str:
    """The module imports that make child `a` of package `pkg` import child `b` (for the message)."""
    def under(mod: str, child: str) -> bool:  # the package's own __init__ is the child named like it
        return mod == child or (child != pkg and mod.startswith(child + "."))

    lines = [f"      {mod} imports {t}" for mod in sorted(graph) if under(mod, a)
             for t in sorted(graph[mod]) if under(t, b) and not under(t, a)]
    return "\n".join(lines[:6])


MODULES = project_modules()
GRAPH = import_graph(MODULES)


def test_graph_is_read():
    # A sanity check that the parser finds the project's imports at all.
    assert len(MODULES) > 100
    assert "welore_core.compression.config" in GRAPH["welore_core.compression.model"]
    assert "api.jobs.states" in GRAPH["api.jobs.service"]
    # lazy imports count: inside a function, and importlib's over a table of names
    assert "welore_core.checkpoint" in GRAPH["welore_core.python_api"]
    assert {"welore_core.python_api", "welore_core.finetune.config"} <= GRAPH["welore_core"]
    assert "welore_core.cli.compress" in GRAPH["welore_core.cli"]


def test_no_module_cycle():
    cycles = all_cycles(GRAPH)
    assert not cycles, "import cycles among modules:\n" + "\n".join(f"  {_fmt(c, GRAPH)}" for c in cycles)


def test_no_package_cycle():
    problems = []
    for pkg, sub in package_graphs(GRAPH, MODULES).items():
        for cycle in all_cycles(sub):
            why = "\n".join(
                f"    {a} -> {b}:\n{_why(GRAPH, '' if pkg == TOP else pkg, a, b)}" for a, b in zip(cycle, cycle[1:])
            )
            problems.append(f"  in {pkg}: {_fmt(cycle, sub)}\n{why}")
    assert not problems, "import cycles among packages:\n" + "\n".join(problems)


def test_api_does_not_import_worker():
    bad = sorted(
        f"  {mod} imports {t}"
        for mod, targets in GRAPH.items()
        if mod == "api" or mod.startswith("api.")
        for t in targets
        if t == "worker" or t.startswith("worker.")
    )
    assert not bad, "api imports the worker:\n" + "\n".join(bad)


def test_the_checks_catch_a_cycle(tmp_path):
    # The checker itself: a lazy (function-level) relative import closing a circle is found.
    pkg = tmp_path / "api"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    for name in ("worker", "welore_core", "welore_client"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    modules = project_modules(tmp_path)
    graph = import_graph(modules)
    assert graph["api.a"] == {"api.sub.b"}
    assert graph["api.sub.b"] == {"api.a"}
    assert all_cycles(graph) == [["api.a", "api.sub.b", "api.a"]]
    assert all_cycles(package_graphs(graph, modules)["api"]) == [["api.a", "api.sub", "api.a"]]


# docs/architecture.md: the layers depend downwards only.
ALLOWED = {"welore_core": set(), "welore_client": set(), "api": {"welore_core"}, "worker": {"api", "welore_core"}}


def test_layers_depend_downwards_only():
    top = package_graphs(GRAPH, MODULES)[TOP]
    bad = sorted(f"  {a} -> {b}:\n{_why(GRAPH, '', a, b)}" for a, targets in top.items() for b in targets
                 if b not in ALLOWED[a])
    assert not bad, "imports against the layering (core, client < api < worker):\n" + "\n".join(bad)
