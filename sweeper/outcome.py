"""How a trial this worker trained ends: its weights kept or not, its end told to the study's
record (ledger.py), its MLflow run closed. Trials it will not finish, and those of dead workers,
are the ledger's (release, recover)."""

from __future__ import annotations

from typing import Any

import torch
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import BEST_EPOCH, BEST_VAL_ACC, EPOCHS_RUN, VAL_ACC
from lightning_modules.models import Architecture
from sweeper import checkpoints, keys, objectives
from sweeper.config import Config
from sweeper.data import Splits
from sweeper.ledger import Ledger
from sweeper.tracking import BackgroundWrites, Tracker

TAKEN_OVER = "ended by another worker meanwhile, which took it for dead"


def conclude(ledger: Ledger, trial: Any, cfg: Config, splits: Splits,
             tracker: Tracker | BackgroundWrites, run_id: str | None,
             arch: Architecture | None, history: list[dict[str, float]],
             net: torch.nn.Module | None, pruned: bool,
             error: str | None, seconds: float, save_weights: bool = True,
             drop_weights: bool = True, run_again: bool = False) -> FrozenTrial:
    """Tell the study how the trial ended, keep its weights if it is among the best, end its
    run. A population decides once for all its members: save_weights=False for members outside
    the top k (their file is never written), drop_weights=False (keep_top_k runs once after).
    run_again: a failed trial's configuration is queued again right after its FAIL."""
    summary: dict[str, float] = {EPOCHS_RUN: len(history)}
    attrs: dict[str, Any] = {}  # written in one transaction, just before the tell
    if history:
        best = max(range(len(history)), key=lambda i: history[i][VAL_ACC])
        summary |= {BEST_VAL_ACC: history[best][VAL_ACC], BEST_EPOCH: best + 1}
        attrs |= history[-1]
    attrs |= summary | {keys.SECONDS: seconds}
    if error is None and not history:
        error = "no epoch finished"
    saved = None
    if error is not None:
        told = ledger.tell(trial, TrialState.FAIL, attrs=attrs | {keys.ERROR: error},
                           run_again=run_again)
    elif pruned:
        told = ledger.tell(trial, TrialState.PRUNED, attrs=attrs)
    else:
        values = objectives.values(cfg, history, summary[BEST_VAL_ACC],
                                   trial.user_attrs.get(keys.N_PARAMS, 0))
        # Weights first, so a kept trial always has its file; then drop those out of the top k.
        assert net is not None and arch is not None
        path = checkpoints.path_of(cfg, trial.number)
        if save_weights:
            saved = checkpoints.save(cfg, trial.number, net, arch, splits, history[-1])
        # where its weights are or would have been
        told = ledger.tell(trial, TrialState.COMPLETE, values,
                           attrs | {keys.CHECKPOINT: str(path)})
        if told is not None and drop_weights:
            checkpoints.keep_top_k(ledger.study, cfg.search.keep_top_k)
    if told is None:  # its record is the other worker's: this end is not recorded
        print(f"  trial {trial.number}: {TAKEN_OVER}; this run's result is not recorded",
              flush=True)
        if saved is not None:
            saved.unlink(missing_ok=True)
        if run_id is not None:
            tracker.end_trial(run_id, "FAIL", {}, error=TAKEN_OVER, status="KILLED")
        return ledger.frozen(trial)
    if run_id is not None:
        tracker.end_trial(run_id, told.state.name, summary, error=error)
    return told
