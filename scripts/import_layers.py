"""Who imports whom among sweeper's modules, read from the source (nothing is imported).

    python scripts/import_layers.py [--root DIR]

Prints, for the study loop followed from `sweeper.study` (run_study): the modules it reaches
through imports, how many of their import edges go to a higher layer (LAYERS below, lowest
first); then the modules that use Optuna's internals, and any import circle in the packages.
Imports inside functions count: they run too, later. tests/test_imports.py uses `graph` and
`circles`.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sweeper", "lightning_modules")

# Lowest first: a module may import its own layer and the ones before it. A proposal for the
# folders of issue 29's layout; modules not listed are left out of the layer count.
LAYERS = [
    ("basics", ["errors", "keys", "faultpoints", "params"]),
    ("models", ["lightning_modules"]),
    ("configuration and search space", ["config", "sweep_grammar", "search_space", "recipe",
                                        "objectives"]),
    ("ledger and stores", ["stores", "store_schema", "study_lock", "liveness", "ledger",
                           "trial_writes", "tracking", "repeat_records"]),
    ("training and data", ["idx", "kaggle", "data", "batches", "training", "checkpoints"]),
    ("analysis and report", ["stats", "size_effect", "report", "console"]),
    ("the study loop", ["samplers", "outcome", "population", "repeats", "study"]),
    ("export and predict", ["export", "predict"]),
    ("entry points", ["__main__"]),
]


# Optuna internals: private attributes of its study, trial and storage objects, private modules.
OPTUNA_PRIVATE = re.compile(r"\._storage\b|\._study_id\b|\._trial_id\b|_cached_frozen_trial|"
                            r"\._backend\b|optuna\.storages\._")


def optuna_private(root: Path) -> list[str]:
    """The sweeper modules that use Optuna's internals."""
    return sorted(m for m, path in modules(root).items()
                  if m.startswith("sweeper") and OPTUNA_PRIVATE.search(path.read_text()))


def layer_of(module: str) -> int | None:
    """sweeper.x -> the index of x's layer; lightning_modules.* -> the models layer."""
    package, _, name = module.partition(".")
    for i, (_, names) in enumerate(LAYERS):
        if (package == "lightning_modules" and "lightning_modules" in names) or (
                package == "sweeper" and name in names):
            return i
    return None


def modules(root: Path) -> dict[str, Path]:
    """'sweeper.study' -> its file, for both packages under root."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported(node: ast.AST, here: str, is_package: bool) -> list[str]:
    """The module names an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # from . import x / from .y import z
        base = here.split(".")
        base = base[:len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from sweeper import study` names the module sweeper.study; `from sweeper.x import y`
    # names sweeper.x (or sweeper.x.y when that is a module).
    return [prefix, *(f"{prefix}.{a.name}" for a in node.names)]


def graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in its file)."""
    known = modules(root)
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        out: set[str] = set()
        for node in ast.walk(tree):
            for target in _imported(node, name, path.name == "__init__.py"):
                # the deepest package module the name points at
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in PACKAGES:
                    out.add(target)
        edges[name] = out
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def upward(edges: dict[str, set[str]], among: set[str]) -> list[tuple[str, str]]:
    """Import edges between `among` modules that go to a higher layer."""
    out = []
    for a in sorted(among):
        for b in sorted(edges.get(a, ())):
            la, lb = layer_of(a), layer_of(b)
            if b in among and la is not None and lb is not None and lb > la:
                out.append((a, b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO, help="a checkout (default: this one)")
    args = ap.parse_args()
    edges = graph(args.root)
    loop = reachable(edges, "sweeper.study")
    up = upward(edges, loop)
    n_edges = sum(len(edges[m] & loop) for m in loop)
    print(f"study loop (from sweeper.study): {len(loop)} modules, {n_edges} import edges among "
          f"them, {len(up)} to a higher layer")
    for i, (layer, _) in enumerate(LAYERS):
        names = sorted(m for m in loop if layer_of(m) == i)
        if names:
            print(f"  {i} {layer}: {', '.join(n.replace('sweeper.', '') for n in names)}")
    unplaced = sorted(m for m in loop if layer_of(m) is None)
    if unplaced:
        print(f"  (no layer: {', '.join(unplaced)})")
    for a, b in up:
        print(f"  up: {a} -> {b}")
    private = optuna_private(args.root)
    print(f"modules using Optuna's internals: {len(private)} ({', '.join(private)})")
    found = circles(edges)
    print(f"import circles in the packages: {len(found)}")
    for group in found:
        print(f"  {' <-> '.join(group)}")


if __name__ == "__main__":
    main()
