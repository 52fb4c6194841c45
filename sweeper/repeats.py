"""Seed repeats: a single-seed difference on MNIST is often noise. After the sweep, the best
`confirm.top_k` configurations and a ladder of `confirm.ladder` sizes are re-trained so that each
has `confirm.seeds` runs in all (the trial itself is seed 0). Each repeat is an MLflow child run
(tag sweeper.role=repeat) and its final metrics are stored on the study (REPEAT_ATTR.N.K), where
the report finds them. Re-running skips repeats already done; concurrent workers split them.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import EPOCH_METRICS, GAP, TEST_ACC, TRAIN_ACC, VAL_ACC
from sweeper import checkpoints, data, liveness, training
from sweeper.config import Config
from sweeper.data import Splits
from sweeper.study_lock import StudyLock
from sweeper.tracking import DATA_TAG, Tracker

REPEAT_ATTR = "sweeper.repeat"


def repeat_seed(trial_seed: int, k: int) -> int:
    return (trial_seed + k * 7_919_993) % 2**31


def choose(study: optuna.Study, top_k: int, ladder: int) -> list[FrozenTrial]:
    """The best top_k complete trials, then `ladder` more spread evenly over log(n_params)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and "n_params" in t.user_attrs]
    best = sorted(done, key=lambda t: t.value or 0.0, reverse=True)[:top_k]
    by_size = sorted(done, key=lambda t: t.user_attrs["n_params"])
    picked = {t.number: t for t in best}
    if ladder > 0 and by_size:
        logs = [math.log(t.user_attrs["n_params"]) for t in by_size]
        for i in range(ladder):
            goal = logs[0] + (logs[-1] - logs[0]) * (i / max(ladder - 1, 1))
            t = min(by_size, key=lambda t: abs(math.log(t.user_attrs["n_params"]) - goal))
            picked.setdefault(t.number, t)
    return sorted(picked.values(), key=lambda t: t.user_attrs["n_params"])


def results(study: optuna.Study) -> dict[int, list[dict[str, float]]]:
    """trial number -> final metrics of every seed (the trial's own first), finished runs only."""
    out: dict[int, list[dict[str, float]]] = {}
    attrs = study.user_attrs
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        reps = [attrs[k] for k in sorted(attrs) if k.startswith(f"{REPEAT_ATTR}.{t.number}.")
                and VAL_ACC in attrs[k]]
        own_test = attrs.get(f"{REPEAT_ATTR}.{t.number}.0", {})  # the trial's own test accuracy
        if reps or own_test:
            own = {m: t.user_attrs[m] for m in (TRAIN_ACC, VAL_ACC, GAP)} | {"seed": 0}
            out[t.number] = [own | own_test, *reps]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(study: optuna.Study, cfg: Config, splits: Splits, tracker: Tracker, parent: str,
        lock: StudyLock) -> None:
    c = cfg.confirm
    if c.seeds < 2 and not c.test:
        return
    chosen = choose(study, c.top_k, c.ladder)
    test = data.load_test(cfg.data, splits) if c.test else None
    if c.test and test is None:
        print(f"confirm.test: {splits.source} has no labelled test set here; not measured")
    best = {t.number for t in choose(study, c.top_k, 0)}  # only these meet the test set
    if test is not None:
        for t in chosen:
            key = f"{REPEAT_ATTR}.{t.number}.0"
            if t.number in best and key not in study.user_attrs:
                path = Path(t.user_attrs.get(checkpoints.CHECKPOINT_ATTR, ""))
                if path.is_file():
                    net, _ = checkpoints.load(path)
                    study.set_user_attr(key, {TEST_ACC: training.accuracy(net, *test)})
    todo = [(t, k) for t in chosen for k in range(1, c.seeds)]
    print(f"\nconfirming {len(chosen)} configurations (top {c.top_k}"
          + (f" + a ladder of {c.ladder} sizes" if c.ladder else "")
          + f") with {c.seeds} seeds each: {len(todo)} repeat runs", flush=True)
    for t, k in todo:
        key = f"{REPEAT_ATTR}.{t.number}.{k}"
        with lock():  # claim it: workers finishing together split the repeats
            have = study.user_attrs.get(key)  # read from the storage, not cached
            if have is not None and (VAL_ACC in have or not liveness.is_dead_here(
                    have.get("worker", ""))):
                continue
            study.set_user_attr(key, {"worker": liveness.this_worker()})
        result = train_one(t, k, cfg, splits, tracker, parent,
                           test if t.number in best else None)
        study.set_user_attr(key, result)
        print(f"  trial {t.number:3d} seed {k}: {t.user_attrs['n_params']:,} params | "
              f"train {100 * result[TRAIN_ACC]:.2f} val {100 * result[VAL_ACC]:.2f} "
              f"gap {100 * result[GAP]:+.2f}"
              + (f" test {100 * result[TEST_ACC]:.2f}" if TEST_ACC in result else ""), flush=True)
    for number, runs in sorted(results(study).items()):
        val, gap = (mean_std([r[m] for r in runs]) for m in (VAL_ACC, GAP))
        tests = [r[TEST_ACC] for r in runs if TEST_ACC in r]
        test_s = ""
        if tests:
            tm, ts = mean_std(tests)
            test_s = f" | test {100 * tm:.2f} ± {100 * ts:.2f} ({len(tests)} seeds)"
        print(f"  trial {number:3d}: val {100 * val[0]:.2f} ± {100 * val[1]:.2f} | gap "
              f"{100 * gap[0]:+.2f} ± {100 * gap[1]:.2f} ({len(runs)} seeds){test_s}")


def train_one(t: FrozenTrial, k: int, cfg: Config, splits: Splits, tracker: Tracker,
              parent: str, test: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> dict[str, Any]:
    spec = training.resolve(cfg, t.params, t.number)
    spec = dataclasses.replace(spec, seed=repeat_seed(spec.seed, k))
    module = training.build(spec, splits)
    run_id = tracker.start_trial(parent, t.number, spec.mlflow_params()
                                 | {"n_params": t.user_attrs["n_params"]},
                                 {DATA_TAG: splits.source}, repeat=k)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        tracker.log_metrics(run_id, metrics, step=epoch)
        return not all(math.isfinite(v) for v in metrics.values())

    try:
        training.fit(module, spec, splits, on_epoch)
    except BaseException:  # Ctrl-C, SIGTERM: the claim stays with this (dead) process; redone
        tracker.end_trial(run_id, "FAIL", {}, error="interrupted", status="KILLED")
        raise KeyboardInterrupt from None
    last = module.history[-1]
    ok = all(math.isfinite(last[m]) for m in EPOCH_METRICS)
    result: dict[str, Any] = {m: last[m] for m in (TRAIN_ACC, VAL_ACC, GAP)}
    result |= {"seed": k, "run_id": run_id}
    if test is not None:
        result[TEST_ACC] = training.accuracy(module.net, *test)
    tracker.end_trial(run_id, "COMPLETE" if ok else "FAIL",
                      {TEST_ACC: result[TEST_ACC]} if TEST_ACC in result else {})
    return result
