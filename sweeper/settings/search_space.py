"""Search space from YAML (`search.space`) -> Optuna suggestions, written plainly:
depth first, then width (one shared width, or one per layer when `per_layer: true`), then the
rest. Values not in the space come from `model.*` / `trainer.*`."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import optuna

from sweeper.settings.config import ParamSpec, grid_count


def suggest(trial: optuna.Trial, space: dict[str, ParamSpec], default_depth: int) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in sorted(space, key=lambda n: (n != "depth", n != "width", n)):
        spec = space[name]
        if name == "width" and spec.per_layer:
            depth = params.get("depth", default_depth)
            for i in range(depth):
                params[f"width_{i}"] = suggest_one(trial, f"width_{i}", spec)
        else:
            params[name] = suggest_one(trial, name, spec)
    return params


def suggest_one(trial: optuna.Trial, name: str, spec: ParamSpec) -> Any:
    if spec.type == "int":
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step or 1, log=spec.log)
    if spec.type == "float":
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return trial.suggest_categorical(name, list(spec.choices or []))


def grid_values(spec: ParamSpec) -> list[Any]:
    """Every value a grid sampler visits for one parameter (validated: step or categorical)."""
    if spec.type == "categorical":
        return list(spec.choices or [])
    return [step_value(spec, i) for i in range(grid_count(spec))]


def step_value(spec: ParamSpec, i: int) -> Any:
    """The i-th value of a stepped parameter (low itself when it has no step)."""
    if spec.step is None:
        return spec.low
    # Decimal steps so that 0.1 * 3 lands on 0.3, not 0.30000000000000004.
    lo, step = Decimal(str(spec.low)), Decimal(str(spec.step))
    return (int if spec.type == "int" else float)(lo + i * step)


def grid(space: dict[str, ParamSpec]) -> dict[str, list[Any]]:
    return {name: grid_values(spec) for name, spec in space.items()}


def describe(space: dict[str, ParamSpec]) -> dict[str, Any]:
    """A JSON-able, order-independent form of the space, to detect a changed space on resume."""
    out: dict[str, Any] = {}
    for name in sorted(space):
        s = space[name]
        out[name] = {"type": s.type, "low": s.low, "high": s.high, "log": s.log,
                     "step": s.step, "choices": s.choices, "per_layer": s.per_layer}
    return out


# Settings whose larger values make a network (or its batch) bigger.
GROWS = ("size", "depth", "width", "kernel", "channel_mult", "batch_size")


def extreme_points(space: dict[str, ParamSpec], default_depth: int,
                   largest: bool = True) -> list[dict[str, Any]]:
    """The points of the space that need the most memory (largest=False: the least): every
    setting in GROWS at its largest (smallest) value, once for each choice of the categorical
    settings that change the network's kind (family, batch_norm); the rest at their first."""
    base: dict[str, Any] = {}
    kinds: list[dict[str, Any]] = [{}]
    for name, spec in space.items():
        # the ends only (a range of a billion steps is never listed)
        values = (grid_values(spec) if spec.type == "categorical" else
                  [spec.low, step_value(spec, grid_count(spec) - 1)] if spec.step is not None
                  else [spec.low, spec.high])
        if name in GROWS:
            numeric = [v for v in values if isinstance(v, int | float)]
            base[name] = (max if largest else min)(numeric) if numeric else values[0]
        elif spec.type == "categorical" and name in ("family", "batch_norm"):
            kinds = [k | {name: v} for k in kinds for v in values]
        else:
            base[name] = values[0]
    points = [base | k for k in kinds]
    for p in points:  # one width per layer: each at its extreme
        if "width" in p and space["width"].per_layer:
            for i in range(int(p.get("depth", default_depth))):
                p[f"width_{i}"] = p["width"]
            del p["width"]
    return points
