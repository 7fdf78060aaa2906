"""Check the package's import rules; print each violation and exit 1 if there is any.

The rules keep the layers of ``maestro_lod`` independent:

* no circle of imports anywhere in the package (a package's ``__init__`` counts as a module);
* ``training`` and ``deploy`` never import each other, directly or through any chain of imports
  (what both need lives in ``engine``);
* no library module imports ``commands`` or ``cli`` (commands parse arguments and print; the
  pipelines they run are library functions);
* no module imports a module of a higher layer (:data:`LAYERS`, lowest first: the table at the top
  of docs/extending.md);
* every import of the package's own modules sits at the top of its module, not inside a function
  or an ``if TYPE_CHECKING`` block, where it would hide a circle; the one exception is a module
  that needs an optional extra (:data:`OPTIONAL`), imported where it is used so that the rest
  works without the extra.

Usage: ``python scripts/check_imports.py [SRC_DIR]`` (default: ``src`` beside this script's folder).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "maestro_lod"
SEPARATED = ("training", "deploy")
FRONT = ("commands", "cli", "__main__")
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("maths", ("functional", "layers", "config", "checks", "errors", "registry", "tables", "files")),
    ("model surgery", ("inject", "whitening", "export", "canonical")),
    ("method primitives", ("sampling", "regularization", "shrinking")),
    ("data, models, theory", ("data", "models", "theory")),
    ("engine", ("engine",)),
    ("training, deployment", ("training", "baselines", "integrations", "deploy")),
    ("the package's own __init__", ("",)),
    ("runs", ("runs",)),
    ("benchmark", ("bench",)),
    ("front", FRONT),
)
"""The layers, lowest first, by the top-level module or package each holds (``""``: ``maestro_lod``)."""
OPTIONAL = ("maestro_lod.integrations.hf_folder", "maestro_lod.integrations.transformers",
            "maestro_lod.integrations.lightning")
"""Modules that import an optional extra (transformers, lightning) when they load."""


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, known: set[str]) -> Iterator[tuple[str, int, bool]]:
    """``(module, line, at_top)`` for each import of a package module in the file at ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                yield target, node.lineno, id(node) in top_level


def graph(src: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph of the package under ``src`` and the imports that are not at the top."""
    files = {module_name(p, src): p for p in sorted((src / PACKAGE).rglob("*.py"))}
    edges: dict[str, set[str]] = {name: set() for name in files}
    nested = []
    for name, path in files.items():
        for target, line, at_top in imported_modules(path, name, set(files)):
            if target != name:
                edges[name].add(target)
            if not at_top and target not in OPTIONAL:
                nested.append(f"{path.relative_to(src)}:{line}: imports {target} inside a function or block")
    return edges, nested


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(start: str) -> None:
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def reachable(edges: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module reachable from ``start``, each with the module that first imported it."""
    seen = {start: start}
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for child in sorted(edges[node]):
            if child not in seen:
                seen[child] = node
                frontier.append(child)
    return seen


def chain(parents: dict[str, str], end: str) -> str:
    path = [end]
    while parents[path[-1]] != path[-1]:
        path.append(parents[path[-1]])
    return " -> ".join(reversed(path))


def in_layer(module: str, layer: str) -> bool:
    prefix = f"{PACKAGE}.{layer}"
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module``'s layer (a module outside the table: an error to fix there)."""
    top = module[len(PACKAGE):].lstrip(".").split(".")[0]
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    raise KeyError(f"{module} is in no layer of LAYERS: add its top-level name there")


def violations(src: Path) -> list[str]:
    edges, found = graph(src)
    for module in sorted(edges):
        try:
            found += [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]}), "
                      f"a higher layer" for target in sorted(edges[module]) if layer_of(target) > layer_of(module)]
        except KeyError as error:
            found.append(str(error.args[0]))
    found += [f"circle of imports: {', '.join(cycle)}" for cycle in find_cycles(edges)]
    for module in sorted(edges):
        for layer in SEPARATED:
            if not in_layer(module, layer):
                continue
            other = SEPARATED[1 - SEPARATED.index(layer)]
            parents = reachable(edges, module)
            found += [f"{layer} reaches {other}: {chain(parents, target)}"
                      for target in sorted(parents) if in_layer(target, other)][:1]
        if not any(in_layer(module, front) for front in FRONT):
            found += [f"library module {module} imports {target}" for target in sorted(edges[module])
                      if any(in_layer(target, front) for front in FRONT)]
    return found


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "src"
    found = violations(src)
    for line in found:
        print(line)
    print(f"import rules: {len(found)} violation(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
