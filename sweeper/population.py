"""search.population=N: N trials asked together and trained as one batched computation.

How a population is formed: the first trial samples everything; the other N-1 are enqueued with
its architecture (depth, width(s), batch size) and sample the rest (dropout, lr, weight decay)
themselves, so they share one set of weight shapes. Each member stays a full trial: its own
Optuna trial (ask/tell), seed, pruning decision and MLflow child run with per-epoch metrics.
The trade-off: the sampler proposes one architecture per N trials, so a study of T trials
explores T/N architectures and N times as many per-member settings. With the grid sampler
nothing is enqueued (the grid decides every point); asked trials are bucketed by shape and
each bucket trains as one population (a grid over widths gets populations of one).
"""

from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass
from typing import Any

import optuna

from lightning_modules.metrics import VAL_ACC
from lightning_modules.models import build_model, count_params
from sweeper import console, liveness, search_space, training
from sweeper.config import Config
from sweeper.data import Splits
from sweeper.tracking import DATA_TAG, Tracker

SHARED = ("depth", "width", "size", "batch_size")  # params every member of a population shares


def shared_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k in SHARED or k.startswith("width_")}


def ask(study: optuna.Study, cfg: Config, size: int) -> list[tuple[optuna.Trial, dict[str, Any]]]:
    """Ask `size` trials (under the study lock) and suggest their parameters."""
    s = cfg.search
    asked: list[tuple[optuna.Trial, dict[str, Any]]] = []
    for _ in range(size):
        if asked and s.sampler != "grid":
            study.enqueue_trial(shared_params(asked[0][1]), skip_if_exists=False)
        trial = study.ask()
        asked.append((trial, search_space.suggest(trial, s.space, cfg.model.depth)))
    return asked


def run(study: optuna.Study, asked: list[tuple[optuna.Trial, dict[str, Any]]], cfg: Config,
        splits: Splits, tracker: Tracker, parent: str) -> list[optuna.trial.FrozenTrial]:
    """Train the asked trials, one population per shape; tell Optuna each member's end."""
    specs = [training.resolve(cfg, params, trial.number) for trial, params in asked]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(training.shape_key(spec), []).append(i)
    pending = {trial.number: Member(trial, spec) for (trial, _), spec in zip(asked, specs,
                                                                             strict=True)}
    done: list[optuna.trial.FrozenTrial] = []
    try:
        for rows in groups.values():
            done += _train(study, [pending[asked[i][0].number] for i in rows], cfg, splits,
                           tracker, parent)
            for i in rows:
                del pending[asked[i][0].number]
    except BaseException:  # Ctrl-C, SIGTERM: every trial not yet told is interrupted
        from sweeper.study import interrupted

        for m in pending.values():
            interrupted(study, m.trial, tracker, m.run_id)
        raise KeyboardInterrupt from None
    return done


@dataclass
class Member:
    trial: optuna.Trial
    spec: training.TrialSpec
    run_id: str | None = None
    pruned: bool = False
    error: str | None = None


def _train(study: optuna.Study, members: list[Member], cfg: Config, splits: Splits,
           tracker: Tracker, parent: str) -> list[optuna.trial.FrozenTrial]:
    from sweeper.study import conclude

    specs = [m.spec for m in members]
    t0 = time.perf_counter()
    module = None

    def on_epoch(epoch: int, latest: dict[int, dict[str, float]]) -> set[int]:
        stop = set()
        for i, metrics in latest.items():
            m = members[i]
            assert m.run_id is not None
            tracker.log_metrics(m.run_id, metrics, step=epoch)
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            if bad:  # NaN/inf: this member stops, the others go on
                m.error = f"diverged: {bad[0]}={metrics[bad[0]]} at epoch {epoch}"
                stop.add(i)
                continue
            m.trial.report(metrics[VAL_ACC], epoch)
            if m.trial.should_prune():
                m.pruned = True
                stop.add(i)
        best = max((v[VAL_ACC] for v in latest.values() if math.isfinite(v[VAL_ACC])),
                   default=math.nan)
        console.population_epoch(len(latest), epoch, specs[0].max_epochs, best)
        return stop

    try:
        with liveness.Heartbeat(study, [m.trial for m in members],
                                cfg.search.heartbeat_interval_s):
            module = training.build_population(specs, splits)
            n_params = count_params(build_model(specs[0].arch, splits.in_shape, splits.n_classes))
            for m in members:
                m.run_id = tracker.start_trial(
                    parent, m.trial.number,
                    m.spec.mlflow_params() | {"n_params": n_params, "population": len(members)},
                    {DATA_TAG: splits.source})
                m.trial.set_user_attr("n_params", n_params)
                m.trial.set_user_attr("mlflow_run_id", m.run_id)
                m.trial.set_user_attr("population", len(members))
            training.fit_population(module, specs, splits, on_epoch)
    except Exception as e:  # the whole population fails (out of memory, ...)
        error = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        for m in members:
            m.error = m.error or error
        if cfg.debug:
            traceback.print_exc()
    seconds = time.perf_counter() - t0
    done = []
    for i, m in enumerate(members):
        history = module.history[i] if module is not None else []
        net = None
        if module is not None and i in module.active and m.error is None:
            net = training.member_net(module, i, m.spec, splits)
        done.append(conclude(study, m.trial, cfg, splits, tracker, m.run_id, m.spec.arch,
                             history, net, m.pruned, m.error, seconds))
    return done
