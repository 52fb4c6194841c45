"""How a trial this worker trained ends: its weights kept or not, its end told to the study's
record (ledger.py), its MLflow run closed. Trials it will not finish, and those of dead workers,
are the ledger's (release, recover)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import BEST_EPOCH, BEST_VAL_ACC, EPOCHS_RUN, VAL_ACC
from lightning_modules.models import Architecture
from sweeper.record.ledger import Ledger
from sweeper.record.tracking import BackgroundWrites, Tracker
from sweeper.settings import keys, objectives
from sweeper.settings.config import Config
from sweeper.train import checkpoints
from sweeper.train.data import Splits

TAKEN_OVER = "ended by another worker meanwhile, which took it for dead"


@dataclass
class Ending:
    """What a trained trial's end writes: its state, values and attributes, its run's."""
    trial: optuna.Trial
    run_id: str | None
    state: TrialState
    values: list[float] | None
    attrs: dict[str, Any]
    summary: dict[str, float]  # for its MLflow run
    error: str | None
    run_again: bool = False
    saved: Path | None = None  # weights written for it


def ending(trial: optuna.Trial, cfg: Config, splits: Splits, run_id: str | None,
           arch: Architecture | None, history: list[dict[str, float]],
           net: torch.nn.Module | None, pruned: bool, error: str | None, seconds: float,
           save_weights: bool = True, run_again: bool = False,
           attrs: dict[str, Any] | None = None) -> Ending:
    """The trial's end, its weights saved first (save_weights: when it can be among the best),
    so a kept trial always has its file. run_again: a failed trial's configuration is queued
    again right after its FAIL."""
    summary: dict[str, float] = {EPOCHS_RUN: len(history)}
    attrs = dict(attrs or {})  # written in one transaction, just before the tell
    if history:
        best = max(range(len(history)), key=lambda i: history[i][VAL_ACC])
        summary |= {BEST_VAL_ACC: history[best][VAL_ACC], BEST_EPOCH: best + 1}
        attrs |= history[-1]
    attrs |= summary | {keys.SECONDS: seconds}
    if error is None and not history:
        error = "no epoch finished"
    if error is not None:
        return Ending(trial, run_id, TrialState.FAIL, None, attrs | {keys.ERROR: error},
                      summary, error, run_again)
    if pruned:
        return Ending(trial, run_id, TrialState.PRUNED, None, attrs, summary, None)
    values = objectives.values(cfg, history, trial.user_attrs.get(keys.N_PARAMS, 0))
    assert net is not None and arch is not None
    saved = checkpoints.save(cfg, trial.number, net, arch, splits, history[-1]) \
        if save_weights else None
    # where its weights are or would have been
    return Ending(trial, run_id, TrialState.COMPLETE, values,
                  attrs | {keys.CHECKPOINT: str(checkpoints.path_of(cfg, trial.number))},
                  summary, None, saved=saved)


def conclude_all(ledger: Ledger, cfg: Config, tracker: Tracker | BackgroundWrites,
                 ends: list[Ending], drop_weights: bool = True) -> list[FrozenTrial]:
    """Tell the study how the trials ended (their attributes in one transaction), end their
    runs, and drop the weights out of the top k (drop_weights; a population runs keep_top_k
    once after)."""
    told = ledger.tell_all([(e.trial, e.state, e.values, e.attrs, e.run_again) for e in ends])
    out = []
    for e, frozen in zip(ends, told, strict=True):
        if frozen is None:  # its record is the other worker's: this end is not recorded
            print(f"  trial {e.trial.number}: {TAKEN_OVER}; this run's result is not recorded",
                  flush=True)
            if e.saved is not None:
                e.saved.unlink(missing_ok=True)
            if e.run_id is not None:
                tracker.end_trial(e.run_id, "FAIL", {}, error=TAKEN_OVER, status="KILLED")
            frozen = ledger.frozen(e.trial)
        elif e.run_id is not None:
            tracker.end_trial(e.run_id, frozen.state.name, e.summary, error=e.error)
        out.append(frozen)
    if drop_weights and any(f.state == TrialState.COMPLETE for f in out):
        checkpoints.keep_top_k(ledger.study, cfg.search.keep_top_k)
    return out


def conclude(ledger: Ledger, trial: optuna.Trial, cfg: Config, splits: Splits,
             tracker: Tracker | BackgroundWrites, run_id: str | None,
             arch: Architecture | None, history: list[dict[str, float]],
             net: torch.nn.Module | None, pruned: bool, error: str | None,
             seconds: float) -> FrozenTrial:
    """One trial's end: weights kept if it is among the best, told, its run ended."""
    end = ending(trial, cfg, splits, run_id, arch, history, net, pruned, error, seconds)
    return conclude_all(ledger, cfg, tracker, [end])[0]
