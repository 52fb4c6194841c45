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

import contextlib
import gc
import math
import time
import traceback
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import optuna
import torch

from lightning_modules.cnn import CNN
from lightning_modules.metrics import VAL_ACC
from lightning_modules.mlp import MLP
from lightning_modules.models import build_model, count_params
from lightning_modules.population import (
    PopulationClassifier,
    PopulationCNN,
    PopulationMLP,
    PopulationNet,
)
from sweeper.analysis import console
from sweeper.loop import samplers
from sweeper.loop.outcome import conclude_all, ending
from sweeper.record import ledger
from sweeper.record.ledger import Ledger
from sweeper.record.tracking import BackgroundWrites, Tracker
from sweeper.settings import faultpoints, keys, objectives, params, search_space
from sweeper.settings.config import POPULATION_FAMILIES, Config
from sweeper.settings.errors import UserError, one_line
from sweeper.train import checkpoints, training
from sweeper.train.batches import PopulationGroups
from sweeper.train.data import Splits


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
        with ledger.snapshot(study) as reads:
            for _ in range(size):
                if asked and s.sampler != "grid":
                    study.sampler = optuna.samplers.PartialFixedSampler(
                        params.shared(asked[0][1]), sampler)
                trial = study.ask()
                asked.append((trial, search_space.suggest(trial, s.space, cfg.model.depth)))
                reads.add(trial)
    finally:
        study.sampler = sampler
    return asked


def run(book: Ledger, asked: list[tuple[optuna.Trial, dict[str, Any]]], cfg: Config,
        splits: Splits, tracker: Tracker, parent: str) -> list[optuna.trial.FrozenTrial]:
    """Train the asked trials, one population per shape; tell Optuna each member's end. An
    interrupt or an error outside the members' training leaves the untold members RUNNING for
    the study loop to release. Members waiting for their part stay held, and so alive, in the
    ledger's heartbeat."""
    specs = [training.resolve(cfg, p, trial.number) for trial, p in asked]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(shape_key(spec), []).append(i)
    members = [Member(trial, spec) for (trial, _), spec in zip(asked, specs, strict=True)]
    done: list[optuna.trial.FrozenTrial] = []
    slow_here(specs[0], splits)
    for rows in groups.values():
        for part in split(rows, capacity(specs[rows[0]], splits) if len(rows) > 1 else 1):
            # After an out-of-memory the cap is lower: the rest is trained smaller too.
            for sub in split(part, capacity(specs[rows[0]], splits) if len(part) > 1 else 1):
                done += _train(book, [members[i] for i in sub], cfg, splits, tracker, parent)
    return done


_WARNED: set[str] = set()


def slow_here(spec: training.TrialSpec, splits: Splits) -> None:
    """Say once that CNN populations do not pay on a CPU (measured, docs/scale-out.md)."""
    if spec.arch.family == "cnn" and splits.x_train.device.type == "cpu" and "cnn" not in _WARNED:
        _WARNED.add("cnn")
        print("  note: on a CPU a CNN population trains ~1.8x slower than its members one at a "
              "time (grouped convolutions; measured with scripts/bench_population.py "
              "--family cnn); it is meant for GPUs", flush=True)


# Memory: a population never plans for more than this share of the free device memory.
MEMORY_SHARE = 0.8
_MEMBER_BYTES: dict[tuple[Any, ...], int] = {}
_OOM_CAP: dict[tuple[Any, ...], int] = {}  # half of a population that ran out of memory


def _memory_key(spec: training.TrialSpec, splits: Splits) -> tuple[Any, ...]:
    return (*shape_key(spec), spec.eval_batch_size, str(splits.x_train.device))


def capacity(spec: training.TrialSpec, splits: Splits) -> int:
    """The most members of spec's shape that fit in the device's free memory now (one
    member's memory is measured once per shape and device), and never more than half of a
    population of this shape that ran out of memory. A larger request is split into
    populations this big (printed)."""
    key = _memory_key(spec, splits)
    if key not in _MEMBER_BYTES:
        _MEMBER_BYTES[key] = member_bytes(spec, splits)
    fit = max(1, int(MEMORY_SHARE * free_bytes(splits.x_train.device) // _MEMBER_BYTES[key]))
    return min(fit, _OOM_CAP.get(key, fit))


# Out-of-memory errors that arrive as a plain RuntimeError: the CUDA driver's, cuBLAS's and
# cuDNN's allocation failures, and the CPU allocator's.
OOM_MESSAGES = ("out of memory", "ALLOC_FAILED", "can't allocate memory")


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError | MemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES))


def after_out_of_memory(spec: training.TrialSpec, splits: Splits, size: int) -> int:
    """A population of `size` ran out of memory despite the estimate: later ones of this shape
    are at most half as big. Returns that cap."""
    key = _memory_key(spec, splits)
    _OOM_CAP[key] = max(1, min(_OOM_CAP.get(key, size), size) // 2)
    return _OOM_CAP[key]


def split(rows: list[int], cap: int) -> list[list[int]]:
    """rows in ceil(len / cap) parts of (nearly) equal size, each <= cap; printed if > 1."""
    parts = -(-len(rows) // cap)
    if parts > 1:
        print(f"  population of {len(rows)}: more than the free memory holds (~{cap} members); "
              f"training it as {parts} populations", flush=True)
    sizes = [len(rows) // parts + (i < len(rows) % parts) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [rows[a:a + n] for a, n in zip(starts, sizes, strict=True)]


def member_bytes(spec: training.TrialSpec, splits: Splits) -> int:
    """Memory one member adds, measured on a population of one: weights, gradients and
    optimizer state, plus the larger of (a) the tensors autograd keeps for backward of one
    training mini-batch, 1.5x for the gradients flowing back, and (b) evaluation's peak, two
    of the largest activation at eval_batch_size (a layer's input and output). 25% margin."""
    module = build_population([spec], splits).to(splits.x_train.device)
    x, y = splits.x_train[:spec.batch_size], splits.y_train[:spec.batch_size]
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module._loss(module.net(x.unsqueeze(0)), y.unsqueeze(0)).sum()
    # The training data (x and the labels are views of it) and the weights themselves are no
    # member's own activations.
    own = {p.untyped_storage().data_ptr() for p in module.net.parameters()}
    own |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    acts = [n for ptr, n in saved.items() if ptr not in own]
    train = 1.5 * sum(acts)
    evaluation = 2 * max(acts, default=0) * spec.eval_batch_size / max(1, len(x))
    copies = 3 if spec.optimizer == "sgd" else 4  # weights, gradients, 1-2 optimizer states
    weights = copies * sum(p.numel() * p.element_size() for p in module.net.parameters())
    return int(1.25 * (weights + max(train, evaluation)))


free_bytes = training.free_bytes  # (tests replace it here)


@dataclass
class Member:
    trial: optuna.Trial
    spec: training.TrialSpec
    run_id: str | None = None
    pruned: bool = False
    error: str | None = None


def _train(book: Ledger, members: list[Member], cfg: Config, splits: Splits,
           tracker: Tracker, parent: str) -> list[optuna.trial.FrozenTrial]:
    study = book.study
    specs = [m.spec for m in members]
    t0 = time.perf_counter()
    module = None
    writes = BackgroundWrites(tracker)  # MLflow after each run's creation, in order
    retry_cap = 0  # out of memory: members `retried` run again in populations <= retry_cap
    retried: set[int] = set()
    runs: list[futures.Future[str]] = []
    stored = False  # the trials name their runs (keys.MLFLOW_RUN_ID)

    def on_epoch(epoch: int, latest: dict[int, dict[str, float]]) -> set[int]:
        stop = set()
        for i, metrics in latest.items():
            m = members[i]
            assert m.run_id is not None
            writes.log_metrics(m.run_id, metrics, step=epoch)
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            if bad:  # NaN/inf: this member stops, the others go on
                m.error = f"diverged: {bad[0]}={metrics[bad[0]]} at epoch {epoch}"
                stop.add(i)
        writes.raise_if_failed()  # a refused write stops the population now
        if samplers.prunes(cfg):  # else no pruner would read the epoch's values
            # Median and percentile compare with finished trials only: one read of them for all
            # members. Halving's rungs also hold other running members' values: read live.
            reads = ledger.snapshot(study) if cfg.search.pruner in ("median", "percentile") \
                else contextlib.nullcontext()
            with reads:
                going = {i: members[i] for i in latest if i not in stop}
                book.report({m.trial: latest[i][VAL_ACC] for i, m in going.items()}, epoch)
                for i, m in going.items():
                    if m.trial.should_prune():
                        m.pruned = True
                        stop.add(i)
        best = max((v[VAL_ACC] for v in latest.values() if math.isfinite(v[VAL_ACC])),
                   default=math.nan)
        console.population_epoch(len(latest), epoch, specs[0].max_epochs, best)
        return stop

    try:
        try:
            n_params = count_params(build_model(specs[0].arch, splits.in_shape,
                                                splits.n_classes))
            for m in members:  # a loop: on Ctrl-C, runs holds every run asked for
                runs.append(writes.start_trial(
                    parent, m.trial.number,
                    m.spec.mlflow_params() | {keys.N_PARAMS: n_params,
                                              keys.POPULATION: len(members)},
                    {keys.DATA_TAG: splits.source}))
            module = build_population(specs, splits)  # while the runs are made
            for m, run in zip(members, runs, strict=True):
                m.run_id = run.result()
            faultpoints.reached("population-runs-made")
            # A member that refuses (another worker ended it) trains on; its conclude says so.
            book.set_attrs({m.trial: {keys.N_PARAMS: n_params, keys.MLFLOW_RUN_ID: m.run_id,
                                      keys.POPULATION: len(members)} for m in members})
            stored = True
            fit_population(module, specs, splits, on_epoch)
            writes.wait()  # a store that refused a write fails the population
        except BaseException as e:
            interrupted = not isinstance(e, Exception)
            # Queued metrics are dropped (on Ctrl-C the runs not yet made too); the runs
            # already made are ended below, not left RUNNING.
            writes.cancel(everything=interrupted)
            futures.wait(runs)
            for m, run in zip(members, runs, strict=False):
                if m.run_id is None and not run.cancelled() and run.exception() is None:
                    m.run_id = run.result()
            if interrupted:  # the study loop releases the trials
                if not stored:  # ... and their runs, once the trials name them
                    for m in members:
                        if m.run_id is not None:
                            tracker.end_trial(m.run_id, "FAIL", {}, error="interrupted",
                                              status="KILLED")
                raise
            # The population fails: its members still training end FAIL (pruned or diverged
            # ones keep their own end).
            training = [i for i, m in enumerate(members) if not m.pruned and m.error is None]
            error = one_line(e)
            if out_of_memory(e) and len(members) > 1:  # those run again, in halves
                retry_cap = after_out_of_memory(specs[0], splits, len(members))
                error = (f"out of memory in a population of {len(members)} (despite the "
                         f"memory estimate): queued again for populations of at most "
                         f"{retry_cap} ({error})")
                retried = set(training)
            for i in training:
                members[i].error = error
            if cfg.debug:
                traceback.print_exc()
        seconds = time.perf_counter() - t0
        nets: dict[int, torch.nn.Module] = {}
        if module is not None:
            for i, m in enumerate(members):
                if i in module.active and m.error is None:
                    nets[i] = member_net(module, i, m.spec, splits)
        save = _worth_saving(study, cfg, members, module, nets)
        # All members' attributes in one write, each told after it; a member split after an
        # out of memory is marked so before its FAIL is told (no reader counts it a failure).
        ends = [ending(m.trial, cfg, splits, m.run_id, m.spec.arch,
                       module.history[i] if module is not None else [], nets.get(i),
                       m.pruned, m.error, seconds, save_weights=i in save,
                       run_again=i in retried,
                       attrs={keys.SPLIT_AFTER_OOM: retry_cap} if i in retried else None)
                for i, m in enumerate(members)]
        # The MLflow runs end on the writer's thread, behind each member's other writes.
        done = conclude_all(book, cfg, writes, ends, drop_weights=False)
        if retried:
            module = None
            if splits.x_train.device.type == "cuda":  # the failed population's cached blocks
                gc.collect()
                torch.cuda.empty_cache()
        writes.wait()  # every run ended (the first refused write raised here)
    finally:  # a told member's run end is never dropped (Ctrl-C while concluding waits for it)
        writes.pool.shutdown(wait=True)
    checkpoints.keep_top_k(study, cfg.search.keep_top_k)  # once, not once per member
    return done


def _worth_saving(study: optuna.Study, cfg: Config, members: list[Member],
                  module: PopulationClassifier | None,
                  nets: dict[int, torch.nn.Module]) -> set[int]:
    """The members whose weights can be among the study's best keep_top_k (single objective:
    ranked with the complete trials as keep_top_k ranks, value then number); multi-objective
    studies save every finished member and let keep_top_k keep the front."""
    if module is None or objectives.multi(cfg):
        return set(nets)
    k = cfg.search.keep_top_k
    # The trials keep_top_k ranks: complete ones that say where their weights are.
    ranked = [(-(t.value or 0.0), t.number) for t in objectives.ranked(study)
              if keys.CHECKPOINT in t.user_attrs][:k]
    for i in nets:
        history = module.history[i]
        if not members[i].pruned and history:  # value as conclude computes it (maximized)
            value = objectives.values(cfg, history, 0)[0]
            ranked.append((-value, members[i].trial.number))
    top = {number for _, number in sorted(ranked)[:k]}
    return {i for i in nets if members[i].trial.number in top}


# Training: the Lightning side of a population (the model is lightning_modules/population.py).
PopulationHook = Callable[[int, dict[int, dict[str, float]]], set[int]]


def shape_key(spec: training.TrialSpec) -> tuple[Any, ...]:
    """Trials with equal keys can share a population (everything but per-member values)."""
    a, aug = spec.arch, spec.augment
    return (a.family, a.hidden, a.kernel, a.batch_norm, spec.batch_size, spec.optimizer,
            spec.lr_schedule, spec.max_epochs, spec.precision, aug.name if aug else None,
            aug.elastic_sigma if aug else None)


def build_population(specs: list[training.TrialSpec], splits: Splits) -> PopulationClassifier:
    """Member i starts exactly as `build(specs[i])` would: same seed, same initial weights, and
    (on CPU) a dropout generator in the state the solo run's global generator has after init."""
    family = specs[0].arch.family
    if family not in POPULATION_FAMILIES:
        names = " and ".join(f"model={f}" for f in POPULATION_FAMILIES)
        raise UserError(f"search.population works for {names}, not {family}")
    nets, generators = [], []
    with torch.random.fork_rng(devices=[]):
        for spec in specs:
            pl.seed_everything(spec.seed, verbose=False)
            nets.append(build_model(spec.arch, splits.in_shape, splits.n_classes))
            generators.append(torch.Generator().manual_seed(0))
            generators[-1].set_state(torch.get_rng_state())
    dropouts = [s.arch.dropout for s in specs]
    pop: PopulationNet
    if family == "mlp":
        pop = PopulationMLP([n for n in nets if isinstance(n, MLP)], dropouts)
    else:
        pop = PopulationCNN([n for n in nets if isinstance(n, CNN)], dropouts)
    if splits.x_train.device.type == "cpu":
        pop.generators = generators
    else:  # one batched mask draw per layer on the GPU, seeded by the first member
        torch.manual_seed(specs[0].seed)
    spec = specs[0]
    total_steps = spec.max_epochs * -(-len(splits.y_train) // spec.batch_size)
    augments = None
    if spec.augment is not None:
        augments = [a for s in specs if (a := training.make_augment(s.augment, s.seed))]
    return PopulationClassifier(pop, spec.optimizer, [s.lr for s in specs],
                                [s.weight_decay for s in specs], spec.lr_schedule, total_steps,
                                [s.label_smoothing for s in specs], augments)


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
                                    _PopulationEpochEnd(on_epoch, train), spec.precision)
    training.run_fit(trainer, module, train, training.evals(splits, spec.eval_batch_size))


def member_net(module: PopulationClassifier, member: int, spec: training.TrialSpec,
               splits: Splits) -> torch.nn.Module:
    """Member `member` (original index, still in the population) as a plain MLP or CNN."""
    net = build_model(spec.arch, splits.in_shape, splits.n_classes)
    net.load_state_dict(module.net.member_state(module.active.index(member)))
    return net
