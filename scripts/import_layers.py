"""Who imports whom among sweeper's modules, read from the source (nothing is imported).

    python scripts/import_layers.py [--root DIR]

Prints, for the study loop followed from `sweeper.loop.study` (run_study): the modules it reaches
through imports, how many of their import edges go to a higher layer (LAYERS below, lowest
first: the folders of sweeper/); then every upward import in the packages, the modules that use
Optuna's internals, and any import circle.
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

# The folders of sweeper/, lowest first: a module may import its own folder and the ones before
# it. The modules directly in sweeper/ are the commands (python -m sweeper, sweeper.report, ...).
LAYERS = [
    ("models (lightning_modules/)", "lightning_modules"),
    ("configuration and search space", "sweeper.settings"),
    ("the record: ledger and stores", "sweeper.record"),
    ("data and training", "sweeper.train"),
    ("analysis and report", "sweeper.analysis"),
    ("the study loop", "sweeper.loop"),
    ("export and predict", "sweeper.best_model"),
    ("commands", "sweeper"),
]


# Optuna internals: private attributes of its study, trial and storage objects, private modules.
OPTUNA_PRIVATE = re.compile(r"\._storage\b|\._study_id\b|\._trial_id\b|_cached_frozen_trial|"
                            r"\._backend\b|optuna\.storages\._")


def optuna_private(root: Path) -> list[str]:
    """The sweeper modules that use the internals of Optuna's studies, trials and storages
    (not of its samplers: loop/samplers.py subclasses GridSampler and reads its attributes)."""
    return sorted(m for m, path in modules(root).items()
                  if m.startswith("sweeper") and OPTUNA_PRIVATE.search(path.read_text()))


def layer_of(module: str) -> int | None:
    """The index of the module's folder in LAYERS (sweeper.loop.study -> the study loop)."""
    for i, (_, prefix) in enumerate(LAYERS):
        if module.startswith(prefix + ".") or (module == prefix and prefix != "sweeper"):
            return i if prefix != "sweeper" or module.count(".") == 1 else None
    return len(LAYERS) - 1 if module == "sweeper" else None


def modules(root: Path) -> dict[str, Path]:
    """'sweeper.loop.study' -> its file, for both packages under root."""
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
    # `from sweeper.loop import study` names the module sweeper.loop.study; `from sweeper.x
    # import y` names sweeper.x (or sweeper.x.y when that is a module).
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
    loop = reachable(edges, "sweeper.loop.study")
    up = upward(edges, loop)
    n_edges = sum(len(edges[m] & loop) for m in loop)
    print(f"study loop (from sweeper.loop.study): {len(loop)} modules, {n_edges} import edges "
          f"among them, {len(up)} to a higher layer")
    for i, (layer, _) in enumerate(LAYERS):
        names = sorted(m for m in loop if layer_of(m) == i)
        if names:
            print(f"  {i} {layer}: {', '.join(n.replace('sweeper.', '') for n in names)}")
    unplaced = sorted(m for m in loop if layer_of(m) is None)
    if unplaced:
        print(f"  (no layer: {', '.join(unplaced)})")
    for a, b in up:
        print(f"  up: {a} -> {b}")
    everywhere = upward(edges, set(edges))
    print(f"all {len(edges)} modules: {len(everywhere)} import(s) to a higher layer")
    for a, b in everywhere:
        print(f"  up: {a} -> {b}")
    private = optuna_private(args.root)
    print(f"modules using Optuna's internals: {len(private)} ({', '.join(private)})")
    found = circles(edges)
    print(f"import circles in the packages: {len(found)}")
    for group in found:
        print(f"  {' <-> '.join(group)}")


if __name__ == "__main__":
    main()
