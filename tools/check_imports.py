"""Check that densevlm's import graph has no cycles.

Builds the graph of ``densevlm.*`` imports with ``ast`` (nothing is imported). Two kinds of edge:
- top-level: an import at module level (incl. under ``if``/``try`` at module level);
- function-level: an import inside a function or method body.

Cycles are searched at two grains, each over all edges (an import put inside a function to dodge a
cycle is still a cycle, only a hidden one):
- between modules (``densevlm.models.factory`` <-> ``densevlm.models.layouts``);
- between packages (``densevlm.config`` <-> ``densevlm.toyworld``), a package being ``densevlm.<name>``.

Exit status 1 and every cycle printed when there is one. ``--list-function-imports`` also prints the
function-level imports of ``densevlm`` modules (lazy imports of heavy optional deps are not listed:
they are not ``densevlm`` modules).

    python tools/check_imports.py [--root DIR] [--list-function-imports] [--allow MOD_A,MOD_B ...]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Set, Tuple

PACKAGE = "densevlm"

Edge = Tuple[str, str, int, bool]  # (importer, imported, line, function_level)


def module_files(root: Path) -> Dict[str, Path]:
    """Map every module of the package under ``root`` to its file."""
    out: Dict[str, Path] = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: Set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: Set[str]):
        self.module, self.is_package, self.modules = module, is_package, modules
        self.depth = 0
        self.edges: List[Edge] = []

    def _add(self, name: str, line: int) -> None:
        target = _resolve(name, self.modules)
        if target and target != self.module:
            self.edges.append((self.module, target, line, self.depth > 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _absolute(self.module, self.is_package, node.level, node.module)
        for alias in node.names:
            # ``from densevlm.models import layouts`` imports a module; ``from x import func`` imports x
            self._add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.modules else base, node.lineno)


def import_edges(root: Path) -> List[Edge]:
    files = module_files(root)
    modules = set(files)
    edges: List[Edge] = []
    for module, path in files.items():
        visitor = _Visitor(module, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges.extend(visitor.edges)
    return edges


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def strongly_connected(nodes: Iterable[str], graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def strongconnect(v: str) -> None:  # the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(set(nodes)):
        if v not in index:
            strongconnect(v)
    return components


def shortest_cycle(component: List[str], graph: Dict[str, Set[str]]) -> List[str]:
    """A shortest cycle through the first node of a strongly connected component."""
    members, start = set(component), component[0]
    prev: Dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise ValueError(f"{component} is not strongly connected")


def check(root: Path, list_function_imports: bool = False, out=sys.stdout,
          allowed: Iterable[frozenset[str]] = ()) -> list[list[str]]:
    """Print the cycles (and optionally the function-level imports); return them (each a sorted list of the
    modules or packages of one strongly connected component), less those in ``allowed``."""
    allowed = set(allowed)
    edges = import_edges(root)
    where: Dict[Tuple[str, str], List[Tuple[str, int, bool]]] = defaultdict(list)
    mod_graph: Dict[str, Set[str]] = defaultdict(set)
    pkg_graph: Dict[str, Set[str]] = defaultdict(set)
    for a, b, line, fn in edges:
        mod_graph[a].add(b)
        where[(a, b)].append((a, line, fn))
        pa, pb = package_of(a), package_of(b)
        if pa != pb:
            pkg_graph[pa].add(pb)
            where[(pa, pb)].append((a, line, fn))
    files = module_files(root)

    def describe(component: List[str], graph: Dict[str, Set[str]]) -> str:
        lines = [" -> ".join(shortest_cycle(component, graph))]
        members = set(component)
        for a in component:
            for b in sorted(graph[a] & members):
                sites = sorted(set(where[(a, b)]))
                for mod, line, fn in sites[:3]:
                    rel = files[mod].relative_to(root)
                    lines.append(f"    {a} -> {b}: {rel}:{line}{' (inside a function)' if fn else ''}")
                if len(sites) > 3:
                    lines.append(f"    {a} -> {b}: ... {len(sites) - 3} more")
        return "\n".join(lines)

    module_cycles = [c for c in strongly_connected(files, mod_graph) if frozenset(c) not in allowed]
    package_cycles = [c for c in strongly_connected({package_of(m) for m in files}, pkg_graph)
                      if frozenset(c) not in allowed]
    for title, graph, components in (("modules", mod_graph, module_cycles), ("packages", pkg_graph, package_cycles)):
        for component in components:
            print(f"import cycle between {title} {{{', '.join(component)}}}: {describe(component, graph)}", file=out)
    if list_function_imports:
        fn_edges = sorted({(a, b, line) for a, b, line, fn in edges if fn})
        print(f"{len(fn_edges)} function-level imports of {PACKAGE} modules:", file=out)
        for a, b, line in fn_edges:
            print(f"    {files[a].relative_to(root)}:{line}: {b}", file=out)
    total = len(module_cycles) + len(package_cycles)
    print(f"{total} import cycle(s)" if total else "no import cycles", file=out)
    return module_cycles + package_cycles


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--list-function-imports", action="store_true")
    parser.add_argument("--allow", action="append", default=[], metavar="A,B",
                        help="a known cycle (its modules or packages, comma-separated) not to fail on")
    args = parser.parse_args(argv)
    allowed = [frozenset(a.split(",")) for a in args.allow]
    return 1 if check(args.root, args.list_function_imports, allowed=allowed) else 0


if __name__ == "__main__":
    sys.exit(main())
