"""Reading a study's seed repeats (keys.REPEAT.N.K on the study: a result, or a claim while a
worker trains it). Torch-free: the report reads these; the ledger writes them."""

from __future__ import annotations

import math
import statistics
from typing import Any

import optuna
from optuna.trial import TrialState

from lightning_modules.metrics import GAP, TRAIN_ACC, VAL_ACC
from sweeper.settings import keys


def key(number: int, k: int) -> str:
    """Where seed repeat k of trial `number` is recorded (k = 0: the trial's own test score)."""
    return f"{keys.REPEAT}.{number}.{k}"


def done(record: Any) -> bool:
    """A finished repeat (metrics, or diverged): never trained again, never overwritten."""
    return isinstance(record, dict) and (VAL_ACC in record or keys.DIVERGED in record)


def finite(record: dict[str, Any]) -> bool:
    return all(isinstance(record.get(m), int | float) and math.isfinite(record[m])
               for m in (TRAIN_ACC, VAL_ACC, GAP))


def results(study: optuna.Study) -> dict[int, list[dict[str, float]]]:
    """trial number -> final metrics of every seed (the trial's own first), finished runs only."""
    out: dict[int, list[dict[str, float]]] = {}
    attrs = study.user_attrs
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        # Diverged and unfinished repeats have no metrics (older studies stored NaN instead).
        reps = [attrs[k] for k in sorted(attrs) if k.startswith(f"{keys.REPEAT}.{t.number}.")
                and finite(attrs[k])]
        own_test = attrs.get(key(t.number, 0), {})  # the trial's own test accuracy
        if reps or own_test:
            own = {m: t.user_attrs[m] for m in (TRAIN_ACC, VAL_ACC, GAP)} | {keys.SEED: 0}
            out[t.number] = [own | own_test, *reps]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def diverged(study: optuna.Study) -> dict[int, int]:
    """trial number -> how many of its seed repeats diverged (NaN/inf)."""
    out: dict[int, int] = {}
    for k, v in study.user_attrs.items():
        if k.startswith(f"{keys.REPEAT}.") and isinstance(v, dict) and (
                keys.DIVERGED in v or (VAL_ACC in v and not finite(v))):
            number = int(k.split(".")[2])
            out[number] = out.get(number, 0) + 1
    return out
