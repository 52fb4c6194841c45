"""How a trial ends: told to Optuna, its MLflow run closed, its weights kept or dropped.

`conclude` ends a trial this worker trained; `release` ends one it holds but cannot finish
(Ctrl-C, or an error outside the trial's own training) and queues its configuration again;
`recover_dead_trials` does the same for trials whose worker died. Every move out of RUNNING is
one atomic compare-and-set in the storage, so two workers never both end (and re-queue) one
trial, and a trial that ends normally is never relabelled dead.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import BEST_EPOCH, BEST_VAL_ACC, EPOCHS_RUN, VAL_ACC
from lightning_modules.models import Architecture
from sweeper import checkpoints, keys, liveness, objectives, trial_writes
from sweeper.config import Config
from sweeper.data import Splits
from sweeper.tracking import BackgroundWrites, Tracker

AnyTrial = optuna.Trial | FrozenTrial


def conclude(study: optuna.Study, trial: optuna.Trial, cfg: Config, splits: Splits,
             tracker: Tracker | BackgroundWrites, run_id: str | None,
             arch: Architecture | None, history: list[dict[str, float]],
             net: torch.nn.Module | None, pruned: bool,
             error: str | None, seconds: float, save_weights: bool = True,
             drop_weights: bool = True, run_again: bool = False) -> FrozenTrial:
    """Tell Optuna how the trial ended, keep its weights if it is among the best, end its run.
    A population decides once for all its members: save_weights=False for members outside the
    top k (their file is never written), drop_weights=False (keep_top_k runs once after).
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
    if error is not None:
        trial_writes.set_user_attrs({trial: attrs | {keys.ERROR: error}})
        study.tell(trial, state=TrialState.FAIL)
        if run_again:  # (one lost between the two: requeue_lost_splits at the next start)
            requeue(study, trial)
        state = "FAIL"
    elif pruned:
        trial_writes.set_user_attrs({trial: attrs})
        study.tell(trial, state=TrialState.PRUNED)
        state = "PRUNED"
    else:
        values = objectives.values(cfg, history, trial.user_attrs.get(keys.N_PARAMS, 0))
        # Weights first, so a kept trial always has its file; then drop those out of the top k.
        assert net is not None and arch is not None
        path = checkpoints.path_of(cfg, trial.number)
        if save_weights:
            checkpoints.save(cfg, trial.number, net, arch, splits, history[-1])
        # where its weights are or would have been
        trial_writes.set_user_attrs({trial: attrs | {keys.CHECKPOINT: str(path)}})
        study.tell(trial, values)
        if drop_weights:
            checkpoints.keep_top_k(study, cfg.search.keep_top_k)
        state = "COMPLETE"
    if run_id is not None:
        tracker.end_trial(run_id, state, summary, error=error)
    # One trial read (all trials would be O(running trials) with Optuna's cached storage).
    return study._storage.get_trial(trial._trial_id)


def fail_if_running(study: optuna.Study, trial: AnyTrial) -> bool:
    """RUNNING -> FAIL in one storage transaction; False when the trial had already ended."""
    try:
        return bool(study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except UpdateFinishedTrialError:
        return False


def requeue(study: optuna.Study, trial: AnyTrial) -> None:
    """Queue the trial's configuration to run first, as a new trial that names its original."""
    if trial.params:
        study.enqueue_trial(trial.params, user_attrs={keys.RETRY_OF: trial.number})


def requeue_lost_splits(study: optuna.Study) -> list[int]:
    """Trials of an out-of-memory population (keys.SPLIT_AFTER_OOM) whose configuration was
    never queued again (Ctrl-C or a kill between the FAIL and the queueing): queued now.
    Returns their numbers."""
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get(keys.RETRY_OF) for t in trials}
    lost = [t for t in trials if t.state == TrialState.FAIL
            and keys.SPLIT_AFTER_OOM in t.user_attrs and t.number not in queued]
    for t in lost:
        requeue(study, t)
    return [t.number for t in lost]


def release(study: optuna.Study, trial: AnyTrial, tracker: Tracker, why: str,
            interrupted: bool) -> bool:
    """A trial this worker holds but will not finish: it fails with `why`, its configuration is
    queued again, and its MLflow run ends KILLED (interrupted) or FAILED. False when the trial
    had already ended."""
    if interrupted and threading.current_thread() is threading.main_thread():
        # Lightning ignores SIGINT while it shuts down; give Ctrl-C back its usual meaning.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        study._storage.set_trial_user_attr(trial._trial_id, keys.ERROR, why)
    except UpdateFinishedTrialError:
        return False
    if not fail_if_running(study, trial):
        return False
    requeue(study, trial)
    frozen = study._storage.get_trial(trial._trial_id)
    if run_id := frozen.user_attrs.get(keys.MLFLOW_RUN_ID):
        tracker.end_trial(run_id, "FAIL", {}, error=why,
                          status="KILLED" if interrupted else "FAILED")
    return True


class DeadTrials:
    """The storage's heartbeat_stale_trial_callback (Optuna's retry mechanism): Optuna calls it
    once for each trial it moved from RUNNING to FAIL itself, so only that worker re-queues it."""

    def __init__(self) -> None:
        self.tracker: Tracker | None = None
        self.found: list[int] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        study.set_user_attr(f"{keys.RECOVERED}.{trial.number}", "worker died while running it")
        requeue(study, trial)
        if self.tracker is not None and (run_id := trial.user_attrs.get(keys.MLFLOW_RUN_ID)):
            self.tracker.end_trial(run_id, "FAIL", {}, error="worker died", status="KILLED")
        self.found.append(trial.number)


ORPHAN = "its process ended before it could end this run (killed, or the machine lost)"


def end_orphan_runs(study: optuna.Study, tracker: Tracker, grace_s: float) -> int:
    """Under the study lock, after recover_dead_trials: MLflow trial and repeat runs left
    RUNNING by a process that died before it ended them (or before its trial named them) are
    ended: as their trial or repeat ended when it did (the process died after the tell), else
    KILLED. A run is left alone while its trial is RUNNING, or its repeat is being trained by a
    live worker. Returns how many were ended."""
    running = tracker.running_children()
    if not running:
        return 0
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    attrs = study.user_attrs if any(role == "repeat" for _, role, _, _ in running) else {}
    ended = 0
    for run_id, role, number, k in running:
        if role == "trial":
            t = trials.get(number)
            if t is None:
                continue
            own = t.user_attrs.get(keys.MLFLOW_RUN_ID)
            if t.state == TrialState.RUNNING and own in (None, run_id):
                continue
            if own == run_id and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                summary = {m: t.user_attrs[m] for m in (EPOCHS_RUN, BEST_VAL_ACC, BEST_EPOCH)
                           if m in t.user_attrs}
                tracker.end_trial(run_id, t.state.name, summary)
            else:
                error = t.user_attrs.get(keys.ERROR) if own == run_id else None
                tracker.end_trial(run_id, "FAIL", {}, error=error or ORPHAN, status="KILLED")
        else:
            record = attrs.get(f"{keys.REPEAT}.{number}.{k}")
            if not isinstance(record, dict):
                record = {}
            done = record.get(keys.RUN_ID) == run_id
            if not done and liveness.claim_is_live(record, grace_s):
                continue
            if done and VAL_ACC in record:
                tracker.end_trial(run_id, "COMPLETE", {})
            else:
                error = (record.get(keys.ERROR) or record.get(keys.DIVERGED)) if done else None
                tracker.end_trial(run_id, "FAIL", {}, error=error or ORPHAN, status="KILLED")
        ended += 1
    return ended


def recover_dead_trials(study: optuna.Study, tracker: Tracker) -> list[int]:
    """Under the study lock: trials left RUNNING by a worker that died (kill -9, power loss, a
    lost machine) fail, their MLflow runs end KILLED and their configurations run again.
    Dead means: silent past the heartbeat grace period (any host); owned by a process of this
    machine and pid namespace that is gone; or never stamped with an owner, which every worker
    does under this lock in the moment it asks, so the asker died before it could."""
    dead = study._storage.get_heartbeat_stale_trial_callback()  # type: ignore[attr-defined]
    assert isinstance(dead, DeadTrials), "open the storage with study.open_storage"
    dead.tracker, dead.found = tracker, []
    optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(keys.WORKER)
        if (owner is None or liveness.is_dead_here(owner)) and fail_if_running(study, t):
            dead(study, study._storage.get_trial(t._trial_id))
    return dead.found
