"""search.population=N: N trials asked together and trained as one batched computation.

How a population is formed: the first trial samples everything; the other N-1 are asked with
its architecture (depth, width(s), batch size) fixed and sample the rest (dropout, lr, weight
decay) themselves, so they share one set of weight shapes. Each member stays a full trial: its
own Optuna trial (ask/tell), seed, pruning decision and MLflow child run with per-epoch metrics.
The trade-off: the sampler proposes one architecture per N trials, so a study of T trials
explores T/N architectures and N times as many per-member settings. With the grid sampler the
grid decides every point; asked trials are bucketed by shape and each bucket trains as one
population (a grid over widths gets populations of one).

The second half of this module is the Lightning side (build, fit, take a member out); the
batched model itself is lightning_modules/population.py.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import optuna
import torch

from lightning_modules.metrics import VAL_ACC
from lightning_modules.mlp import MLP
from lightning_modules.models import build_model, count_params
from lightning_modules.population import PopulationClassifier, PopulationMLP
from sweeper import console, keys, liveness, objectives, search_space, training
from sweeper.batches import PopulationGroups
from sweeper.config import Config
from sweeper.data import Splits
from sweeper.errors import UserError, one_line
from sweeper.outcome import conclude
from sweeper.tracking import Tracker

SHARED = ("depth", "width", "size", "batch_size")  # params every member of a population shares


def shared_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k in SHARED or k.startswith("width_")}


def ask(study: optuna.Study, cfg: Config, size: int) -> list[tuple[optuna.Trial, dict[str, Any]]]:
    """Ask `size` trials (under the study lock) and suggest their parameters. Queued trials
    (retries, search.enqueue) come first, as Optuna's ask() hands them out; the rest of the
    population takes the first member's shape through a PartialFixedSampler. Nothing is queued
    here, so an interrupted population leaves only its own retries behind, and the sampler's
    next proposal is the next population's shape."""
    s = cfg.search
    sampler = study.sampler
    asked: list[tuple[optuna.Trial, dict[str, Any]]] = []
    try:
        for _ in range(size):
            if asked and s.sampler != "grid":
                study.sampler = optuna.samplers.PartialFixedSampler(
                    shared_params(asked[0][1]), sampler)
            trial = study.ask()
            asked.append((trial, search_space.suggest(trial, s.space, cfg.model.depth)))
    finally:
        study.sampler = sampler
    return asked


def run(study: optuna.Study, asked: list[tuple[optuna.Trial, dict[str, Any]]], cfg: Config,
        splits: Splits, tracker: Tracker, parent: str) -> list[optuna.trial.FrozenTrial]:
    """Train the asked trials, one population per shape; tell Optuna each member's end. An
    interrupt or an error outside the members' training leaves the untold members RUNNING for
    the study loop to release."""
    specs = [training.resolve(cfg, params, trial.number) for trial, params in asked]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(shape_key(spec), []).append(i)
    members = [Member(trial, spec) for (trial, _), spec in zip(asked, specs, strict=True)]
    done: list[optuna.trial.FrozenTrial] = []
    for rows in groups.values():
        done += _train(study, [members[i] for i in rows], cfg, splits, tracker, parent)
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
            if objectives.multi(cfg):  # Optuna cannot prune multi-objective trials
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
            module = build_population(specs, splits)
            n_params = count_params(build_model(specs[0].arch, splits.in_shape, splits.n_classes))
            for m in members:
                params = {keys.N_PARAMS: n_params, keys.POPULATION: len(members)}
                m.run_id = tracker.start_trial(parent, m.trial.number,
                                               m.spec.mlflow_params() | params,
                                               {keys.DATA_TAG: splits.source})
                m.trial.set_user_attr(keys.N_PARAMS, n_params)
                m.trial.set_user_attr(keys.MLFLOW_RUN_ID, m.run_id)
                m.trial.set_user_attr(keys.POPULATION, len(members))
            fit_population(module, specs, splits, on_epoch)
    except Exception as e:  # the whole population fails (out of memory, ...)
        error = one_line(e)
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
            net = member_net(module, i, m.spec, splits)
        done.append(conclude(study, m.trial, cfg, splits, tracker, m.run_id, m.spec.arch,
                             history, net, m.pruned, m.error, seconds))
    return done


# Training: the Lightning side of a population (the model is lightning_modules/population.py).
PopulationHook = Callable[[int, dict[int, dict[str, float]]], set[int]]


def shape_key(spec: training.TrialSpec) -> tuple[Any, ...]:
    """Trials with equal keys can share a population (everything but per-member values)."""
    return (spec.arch.family, spec.arch.hidden, spec.batch_size, spec.optimizer,
            spec.lr_schedule, spec.max_epochs)


def build_population(specs: list[training.TrialSpec], splits: Splits) -> PopulationClassifier:
    """Member i starts exactly as `build(specs[i])` would: same seed, same initial weights, and
    (on CPU) a dropout generator in the state the solo run's global generator has after init."""
    if specs[0].arch.family != "mlp" or any(s.augment or s.label_smoothing for s in specs):
        raise UserError("search.population works for model=mlp without augmentation or label "
                        "smoothing")
    nets, generators = [], []
    with torch.random.fork_rng(devices=[]):
        for spec in specs:
            pl.seed_everything(spec.seed, verbose=False)
            net = build_model(spec.arch, splits.in_shape, splits.n_classes)
            assert isinstance(net, MLP)
            nets.append(net)
            generators.append(torch.Generator().manual_seed(0))
            generators[-1].set_state(torch.get_rng_state())
    pop = PopulationMLP(nets, [s.arch.dropout for s in specs])
    if splits.x_train.device.type == "cpu":
        pop.generators = generators
    else:  # one batched mask draw per layer on the GPU, seeded by the first member
        torch.manual_seed(specs[0].seed)
    spec = specs[0]
    total_steps = spec.max_epochs * -(-len(splits.y_train) // spec.batch_size)
    return PopulationClassifier(pop, spec.optimizer, [s.lr for s in specs],
                                [s.weight_decay for s in specs], spec.lr_schedule, total_steps)


class _PopulationEpochEnd(pl.Callback):
    def __init__(self, hook: PopulationHook, train: PopulationGroups):
        self.hook, self.train = hook, train

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, PopulationClassifier)
        latest = {m: pl_module.history[m][-1] for m in pl_module.active}
        stop = self.hook(len(pl_module.history[pl_module.active[0]]), latest)
        if stop:
            self.train.keep(pl_module.stop(stop))
        if not pl_module.active:
            trainer.should_stop = True


def fit_population(module: PopulationClassifier, specs: list[training.TrialSpec], splits: Splits,
                   on_epoch: PopulationHook) -> None:
    """on_epoch(epoch, {member: metrics}) -> the members to stop (pruned or diverged)."""
    spec = specs[0]
    train = PopulationGroups(splits.x_train, splits.y_train, spec.batch_size,
                             spec.steps_per_execution, [s.seed for s in specs])
    trainer = training.make_trainer(splits.x_train.device, spec.max_epochs,
                               _PopulationEpochEnd(on_epoch, train))
    trainer.fit(module, train_dataloaders=train,
                val_dataloaders=training.evals(splits, spec.eval_batch_size))


def member_net(module: PopulationClassifier, member: int, spec: training.TrialSpec,
               splits: Splits) -> MLP:
    """Member `member` (original index, still in the population) as a plain MLP."""
    net = build_model(spec.arch, splits.in_shape, splits.n_classes)
    assert isinstance(net, MLP)
    net.load_state_dict(module.net.member_state(module.active.index(member)))
    return net
