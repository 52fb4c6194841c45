"""The study loop: Optuna ask -> train one trial with Lightning -> tell, with every trial an
MLflow child run of the study's parent run. Re-running tops the study up to search.n_trials
finished (COMPLETE or PRUNED) trials; failed trials do not count and are retried as new ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from lightning_modules.metrics import BEST_EPOCH, BEST_VAL_ACC, EPOCHS_RUN, VAL_ACC
from lightning_modules.models import Architecture
from sweeper import (
    checkpoints,
    console,
    data,
    liveness,
    population,
    repeats,
    search_space,
    training,
)
from sweeper.config import Config
from sweeper.errors import UserError
from sweeper.study_lock import StudyLock
from sweeper.tracking import DATA_TAG, Tracker, prepare_sqlite

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
RETRY_ATTR = "sweeper.retry_of"  # on a trial that re-runs an interrupted trial's configuration
STARTS_ATTR = "sweeper.starts"  # how many times a worker opened the study (seeds its sampler)
WAIT_POLL_S = 2.0  # a worker with nothing to ask (the rest is running elsewhere) checks this often
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# We drive the heartbeat ourselves from the ask/tell loop (liveness.Heartbeat).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler calls Study.stop() when the grid is exhausted, which only works inside
    optimize(); our ask/tell loop stops by itself at the grid size.

    A retry of an interrupted trial is enqueued with fixed params, which GridSampler leaves
    without a grid point: the point would count as never visited (and the failed original as
    visited), so the grid would repeat one point and skip another. The retry takes over the
    original's grid point instead."""

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retry_of = trial.user_attrs.get(RETRY_ATTR)
        if retry_of is None or "grid_id" in trial.system_attrs:
            super().before_trial(study, trial)
            return
        storage = study._storage
        original = storage.get_trial(
            storage.get_trial_id_from_study_id_trial_number(study._study_id, retry_of))
        for key in ("search_space", "grid_id"):
            if key in original.system_attrs:
                storage.set_trial_system_attr(trial._trial_id, key, original.system_attrs[key])

    def after_trial(self, study, trial, state, values) -> None:
        pass
# Stored on the study when it is created; a resume with other values would mix incomparable
# trials in one study, so it is refused.
IDENTITY_ATTR = "sweeper.identity"
CONFIG_ATTR = "sweeper.config"


def identity(cfg: Config, splits: data.Splits) -> dict[str, Any]:
    # The data by content, not path: workers on other machines may keep it elsewhere.
    return {"space": search_space.describe(cfg.search.space), "objective": cfg.search.objective,
            "data": f"{splits.source.split(':')[0]}:{splits.fingerprint()}",
            "val_size": len(splits.y_val), "seed": cfg.seed, "family": cfg.model.family}


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    s = cfg.search
    if s.sampler == "tpe":
        # constant_liar: concurrent workers do not all sample next to the same running trial.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        # The seed shuffles the grid, and grid ids index that order: every run and every worker
        # of a study must see the same order, so the grid's seed is the study's.
        return AskTellGridSampler(search_space.grid(s.space), seed=cfg.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s = cfg.search
    if s.pruner == "median":
        # Steps are epochs from 1; n_warmup_steps=w+1 leaves epochs 1..w unpruned.
        return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                           n_warmup_steps=s.pruner_warmup_epochs + 1)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.trainer.max_epochs)
    return optuna.pruners.NopPruner()


def storage_error(url: str, e: Exception) -> UserError:
    return UserError(f"search.storage={url}: cannot open the Optuna storage "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")


def open_study(cfg: Config, splits: data.Splits) -> optuna.Study:
    s = cfg.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # Wait for a busy SQLite file instead of failing at once.
        engine = {"connect_args": {"timeout": 60}} if s.storage.startswith("sqlite") else None
        storage = optuna.storages.RDBStorage(s.storage, engine_kwargs=engine,
                                             heartbeat_interval=s.heartbeat_interval_s,
                                             grace_period=s.heartbeat_grace_s)
        study = optuna.create_study(study_name=s.study_name, storage=storage,
                                    direction="maximize", load_if_exists=True)
    except Exception as e:  # bad URL, missing driver, unreachable server, foreign database
        raise storage_error(s.storage, e) from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise UserError(f"study {s.study_name!r} in {s.storage} minimizes its objective; sweeper "
                        "studies maximize validation accuracy: use another search.study_name")
    want = identity(cfg, splits)
    have = study.user_attrs.get(IDENTITY_ATTR)
    if have is None:
        study.set_user_attr(IDENTITY_ATTR, want)
        if not study.trials:
            for fixed in s.enqueue:
                study.enqueue_trial(dict(fixed), skip_if_exists=True)
    elif have != want:
        diff = sorted(k for k in want if have.get(k) != want.get(k))
        raise UserError(
            f"study {s.study_name!r} in {s.storage} was created with a different "
            f"{', '.join(diff)} ({json.dumps({k: have.get(k) for k in diff})[:300]}); resume it "
            "with its original settings or start a new one with search.study_name=NEW_NAME")
    # The whole config of the latest run: export --refit retrains from it.
    study.set_user_attr(CONFIG_ATTR, dataclasses.asdict(cfg))
    # Workers that open the study at the same moment see the same trials; the start count
    # (read and bumped under the study lock) keeps their samplers' random streams apart.
    starts = int(study.user_attrs.get(STARTS_ATTR, 0))
    study.set_user_attr(STARTS_ATTR, starts + 1)
    study.sampler = make_sampler(cfg, cfg.seed + len(study.trials) + 10_007 * starts)
    study.pruner = make_pruner(cfg)
    return study


def _sigterm_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM")


def n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def n_running(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def open_lock(cfg: Config) -> StudyLock:
    lock = StudyLock(cfg.search.storage, cfg.search.study_name)
    try:
        with lock():
            pass
    except Exception as e:  # unreachable server, bad credentials, missing driver
        raise storage_error(cfg.search.storage, e) from None
    return lock


def run_study(cfg: Config, splits: data.Splits | None = None) -> optuna.Study:
    t0 = time.perf_counter()
    # Both stores must be writable before anything is loaded or written.
    prepare_sqlite(cfg.search.storage, "search.storage")
    prepare_sqlite(cfg.tracking.uri, "tracking.uri")
    lock = open_lock(cfg)
    device = training.accelerator(cfg.trainer.accelerator)
    if splits is None:
        splits = data.load_splits(cfg.data, cfg.seed, device)
    s = cfg.search
    target = s.n_trials
    if s.sampler == "grid":
        size = math.prod(len(v) for v in search_space.grid(s.space).values())
        if target > size:
            print(f"note: the grid has {size} points; running {size} trials, not {target}")
            target = size
    with lock():  # workers starting together: one creates the stores and the parent run
        study = open_study(cfg, splits)
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_location, s.study_name)
        parent = tracker.open_parent(
            params={"sampler": s.sampler, "pruner": s.pruner, "objective": s.objective,
                    "seed": cfg.seed, "train_size": len(splits.y_train),
                    "val_size": len(splits.y_val), "family": cfg.model.family,
                    "label_noise": splits.label_noise,
                    "search_space": json.dumps(search_space.describe(s.space))},
            tags={"search.n_trials": str(target), DATA_TAG: splits.source,
                  "optuna.storage": s.storage})
    done = n_finished(study)
    print(f"study {s.study_name!r}: {done}/{target} finished trials in {s.storage}; "
          f"MLflow {cfg.tracking.uri} (parent run {parent[:8]})\n"
          f"data {splits.describe()} | sampler {s.sampler}, pruner {s.pruner}, "
          f"{cfg.trainer.max_epochs} epochs max", flush=True)
    if done >= target:
        print(f"nothing to do: the study already has {done} finished trials "
              f"(raise search.n_trials to add more)")
    status, failures, waiting = "FINISHED", 0, False
    asked: list[tuple[optuna.Trial, dict[str, Any]]] = []
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # signal handlers can only be set from the main thread
        previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        while n_finished(study) < target:
            with lock():
                for number in recover_dead_trials(study, tracker):
                    print(f"trial {number} was left running by a process that died: marked "
                          "failed, its configuration queued again", flush=True)
                # Running trials of other workers count: they will finish (or be retried).
                elsewhere = n_running(study)
                room = min(target - n_finished(study) - elsewhere, s.population)
                asked = [] if room <= 0 else (population.ask(study, cfg, room)
                                              if s.population > 1 else [(study.ask(), {})])
                for trial, _ in asked:  # owned from the first moment: a beat, then the worker
                    liveness.beat(study, trial)
                    trial.set_user_attr(liveness.WORKER_ATTR, liveness.this_worker())
            if not asked:
                if not waiting:
                    print(f"waiting: the last {elsewhere} trial(s) are running in other workers",
                          flush=True)
                    waiting = True
                time.sleep(WAIT_POLL_S)
                continue
            waiting = False
            before = n_finished(study)
            if s.population == 1:
                frozen = [run_trial(study, asked[0][0], cfg, splits, tracker, parent)]
            else:
                frozen = population.run(study, asked, cfg, splits, tracker, parent)
            for f in frozen:
                before += f.state != TrialState.FAIL
                console.trial_line(f, before, target)
                failures = failures + 1 if f.state == TrialState.FAIL else 0
            if failures >= s.max_consecutive_failures:
                status = "FAILED"
                raise UserError(f"{failures} trials failed in a row (last: "
                                f"{frozen[-1].user_attrs.get('error', '?')}); stopping the sweep. "
                                "Finished trials are kept; fix the cause and re-run to resume")
        repeats.run(study, cfg, splits, tracker, parent, lock)
    except KeyboardInterrupt:
        status = "KILLED"
        # An interrupt between ask and the trial's own handler (e.g. while the lock is
        # released) would leave a trial RUNNING: fail and re-queue whatever this worker holds.
        me, numbers = liveness.this_worker(), {t.number for t, _ in asked}
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(liveness.WORKER_ATTR) == me or t.number in numbers:
                interrupted(study, t, tracker, t.user_attrs.get("mlflow_run_id"))
        console.clear_live()
        print(f"\ninterrupted: {n_finished(study)}/{target} trials finished and saved; the "
              "running trial is marked failed and will run again first; run the same command "
              f"to resume.\n{console.best_table(study)}", file=sys.stderr, flush=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        table = console.best_table(study)
        # With other workers still training, the last one to stop closes the parent run.
        others = n_running(study)
        tracker.close_parent(parent, None if others else status,
                             f"# {s.study_name}\n\n```\n{table}\n```\n")
    print(f"\nbest trials of {s.study_name!r} ({n_finished(study)} finished, "
          f"{time.perf_counter() - t0:.0f}s this run):\n{table}")
    return study


def run_trial(study: optuna.Study, trial: optuna.Trial, cfg: Config, splits: data.Splits,
              tracker: Tracker, parent: str) -> optuna.trial.FrozenTrial:
    t0 = time.perf_counter()
    run_id: str | None = None
    module = None
    pruned, error = False, None

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        nonlocal pruned, error
        assert run_id is not None
        tracker.log_metrics(run_id, metrics, step=epoch)
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:  # NaN/inf: nothing more to learn from this trial
            error = f"diverged: {bad[0]}={metrics[bad[0]]} at epoch {epoch}"
            return True
        trial.report(metrics[VAL_ACC], epoch)
        console.epoch(trial.number, epoch, spec.max_epochs, metrics)
        pruned = trial.should_prune()
        return pruned

    try:
        with liveness.Heartbeat(study, trial, cfg.search.heartbeat_interval_s):
            params = search_space.suggest(trial, cfg.search.space, cfg.model.depth)
            spec = training.resolve(cfg, params, trial.number)
            module = training.build(spec, splits)
            n_params = training.n_params(module)
            run_id = tracker.start_trial(parent, trial.number,
                                         spec.mlflow_params() | {"n_params": n_params},
                                         {DATA_TAG: splits.source})
            trial.set_user_attr("n_params", n_params)
            trial.set_user_attr("mlflow_run_id", run_id)
            if "size" in params:  # the width that `size` picked, for the report
                trial.set_user_attr("width", spec.arch.hidden[0])
            training.fit(module, spec, splits, on_epoch)
    except Exception as e:  # this trial fails (bad config, out of memory, ...); the study goes on
        error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        if cfg.debug:
            traceback.print_exc()
    except BaseException:  # Ctrl-C (Lightning re-raises it as SystemExit), SIGTERM
        interrupted(study, trial, tracker, run_id)
        raise KeyboardInterrupt from None

    history = module.history if module is not None else []
    net = module.net if module is not None else None
    arch = spec.arch if net is not None else None
    return conclude(study, trial, cfg, splits, tracker, run_id, arch, history, net, pruned, error,
                    time.perf_counter() - t0)


def conclude(study: optuna.Study, trial: optuna.Trial, cfg: Config, splits: data.Splits,
             tracker: Tracker, run_id: str | None, arch: Architecture | None,
             history: list[dict[str, float]], net: torch.nn.Module | None, pruned: bool,
             error: str | None, seconds: float) -> optuna.trial.FrozenTrial:
    """Tell Optuna how the trial ended, keep its weights if it is among the best, end its run."""
    summary: dict[str, float] = {EPOCHS_RUN: len(history)}
    if history:
        best = max(range(len(history)), key=lambda i: history[i][VAL_ACC])
        summary |= {BEST_VAL_ACC: history[best][VAL_ACC], BEST_EPOCH: best + 1}
        for k, v in history[-1].items():
            trial.set_user_attr(k, v)
    for k, v in summary.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("seconds", seconds)
    if error is None and not history:
        error = "no epoch finished"
    if error is not None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        state = "FAIL"
    elif pruned:
        study.tell(trial, state=TrialState.PRUNED)
        state = "PRUNED"
    else:
        value = history[-1][VAL_ACC] if cfg.search.objective == "final" else summary[BEST_VAL_ACC]
        # Weights first, so a kept trial always has its file; then drop those out of the top k.
        assert net is not None and arch is not None
        path = checkpoints.save(cfg, trial.number, net, arch, splits, history[-1])
        trial.set_user_attr(checkpoints.CHECKPOINT_ATTR, str(path))
        study.tell(trial, value)
        checkpoints.keep_top_k(study, cfg.search.keep_top_k)
        state = "COMPLETE"
    if run_id is not None:
        tracker.end_trial(run_id, state, summary, error=error)
    return study.get_trials(deepcopy=False)[trial.number]


def interrupted(study: optuna.Study, trial: optuna.Trial | optuna.trial.FrozenTrial,
                tracker: Tracker, run_id: str | None) -> None:
    """Ctrl-C/SIGTERM mid-trial: the trial is failed (not complete), its configuration is queued
    to run first on resume, and its MLflow run ends KILLED."""
    # Lightning ignores SIGINT while it shuts down; give Ctrl-C back its usual meaning.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted")
    study.tell(trial.number, state=TrialState.FAIL)
    if trial.params:
        study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})
    if run_id is not None:
        tracker.end_trial(run_id, "FAIL", {}, error="interrupted", status="KILLED")


def recover_dead_trials(study: optuna.Study, tracker: Tracker) -> list[int]:
    """Trials left RUNNING by a process that died (kill -9, power loss, lost machine): mark them
    failed, their MLflow runs KILLED, and queue their configurations again."""
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    optuna.storages.fail_stale_trials(study)  # heartbeat older than the grace period: any host
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        if t.number not in running:
            continue
        if t.state == TrialState.RUNNING:  # owner on this host and gone: no need to wait
            if not liveness.is_dead_here(t.user_attrs.get(liveness.WORKER_ATTR, "")):
                continue
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError):  # another worker got there first
                continue
        dead.append(t.number)
        study.set_user_attr(f"sweeper.recovered.{t.number}", "worker died while running it")
        if t.params:
            study.enqueue_trial(t.params, user_attrs={RETRY_ATTR: t.number})
        if run_id := t.user_attrs.get("mlflow_run_id"):
            tracker.end_trial(run_id, "FAIL", {}, error="worker died", status="KILLED")
    return dead
