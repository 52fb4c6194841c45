"""Seed repeats: a single-seed difference on MNIST is often noise. After the sweep, the best
`confirm.top_k` configurations and a ladder of `confirm.ladder` sizes are re-trained so that each
has `confirm.seeds` runs in all (the trial itself is seed 0). Each repeat is an MLflow child run
(tag sweeper.role=repeat) trained with the trial's own recipe, and its final metrics are stored
on the study (keys.REPEAT.N.K), where the report finds them (repeat_records.py reads them).
Re-running skips repeats already done; concurrent workers split them: a worker claims a repeat
and the ledger's heartbeat renews the claim while it trains; a claim whose worker is gone (dead
here, or silent for search.heartbeat_grace_s on the database's clock) is taken over, and a
result, once there, stands (ledger.py). A repeat that diverges is recorded as diverged and left
out of every mean.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from lightning_modules.metrics import GAP, TEST_ACC, TRAIN_ACC, VAL_ACC
from sweeper.loop import population
from sweeper.record import repeat_records
from sweeper.record.ledger import Ledger
from sweeper.record.tracking import Tracker
from sweeper.settings import keys, objectives, recipe
from sweeper.settings.config import POPULATION_FAMILIES, Config
from sweeper.settings.errors import one_line
from sweeper.train import checkpoints, data, training
from sweeper.train.data import Splits


def repeat_seed(trial_seed: int, k: int) -> int:
    return (trial_seed + k * 7_919_993) % 2**31


def choose(study: optuna.Study, top_k: int, ladder: int) -> list[FrozenTrial]:
    """The best top_k complete trials, then `ladder` more spread evenly over log(n_params)."""
    done = [t for t in objectives.ranked(study) if keys.N_PARAMS in t.user_attrs]
    best = done[:top_k]  # multi-objective: the Pareto front first
    by_size = sorted(done, key=lambda t: t.user_attrs[keys.N_PARAMS])
    picked = {t.number: t for t in best}
    if ladder > 0 and by_size:
        logs = [math.log(t.user_attrs[keys.N_PARAMS]) for t in by_size]
        for i in range(ladder):
            goal = logs[0] + (logs[-1] - logs[0]) * (i / max(ladder - 1, 1))
            t = min(by_size, key=lambda t: abs(math.log(t.user_attrs[keys.N_PARAMS]) - goal))
            picked.setdefault(t.number, t)
    return sorted(picked.values(), key=lambda t: t.user_attrs[keys.N_PARAMS])


def run(book: Ledger, cfg: Config, splits: Splits, tracker: Tracker, parent: str) -> None:
    study = book.study
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
            key = repeat_records.key(t.number, 0)
            if t.number in best and key not in study.user_attrs:
                path = Path(t.user_attrs.get(keys.CHECKPOINT, ""))
                if path.is_file():
                    net, _ = checkpoints.load(path)
                    book.finish(key, {TEST_ACC: training.accuracy(net, *test)})
    todo = [(t, k) for t in chosen for k in range(1, c.seeds)]
    # A resume (say with more seeds) trains only the repeats not done yet: say how many.
    left = len(book.left([repeat_records.key(t.number, k) for t, k in todo]))
    print(f"\nconfirming {len(chosen)} configurations (top {c.top_k}"
          + (f" + a ladder of {c.ladder} sizes" if c.ladder else "")
          + f") with {c.seeds} seeds each: {len(todo)} repeat runs"
          + (f", {left} still to train" if left < len(todo) else ""), flush=True)
    size = cfg.search.population
    for t in chosen:
        free = set(book.left([repeat_records.key(t.number, k) for k in range(1, c.seeds)]))
        ks = [k for k in range(1, c.seeds) if repeat_records.key(t.number, k) in free]
        if not ks:  # (claimed below, compare-and-set: another worker may be quicker)
            continue
        spec = training.resolve(recipe.of_trial(study, t), t.params, t.number)
        # search.population > 1: a trial's repeats train together, that many at a time.
        step = 1
        if size > 1 and spec.arch.family in POPULATION_FAMILIES and len(ks) > 1:
            step = min(size, population.capacity(spec, splits))
            population.slow_here(spec, splits)
        for i in range(0, len(ks), step):
            # workers finishing together split the repeats
            mine = set(book.claim([repeat_records.key(t.number, k) for k in ks[i:i + step]]))
            claimed = [k for k in ks[i:i + step] if repeat_records.key(t.number, k) in mine]
            if claimed:
                _train_claimed(book, t, claimed, splits, tracker, parent, test, best)
    bad = repeat_records.diverged(study)
    for number, runs in sorted(repeat_records.results(study).items()):
        val, gap = (repeat_records.mean_std([r[m] for r in runs]) for m in (VAL_ACC, GAP))
        tests = [r[TEST_ACC] for r in runs if TEST_ACC in r]
        test_s = ""
        if tests:
            tm, ts = repeat_records.mean_std(tests)
            test_s = f" | test {100 * tm:.2f} ± {100 * ts:.2f} ({len(tests)} seeds)"
        div = f", {bad[number]} diverged" if bad.get(number) else ""
        print(f"  trial {number:3d}: val {100 * val[0]:.2f} ± {100 * val[1]:.2f} | gap "
              f"{100 * gap[0]:+.2f} ± {100 * gap[1]:.2f} ({len(runs)} seeds{div}){test_s}")


def _train_claimed(book: Ledger, t: FrozenTrial, ks: list[int], splits: Splits,
                   tracker: Tracker, parent: str, test: tuple[torch.Tensor, torch.Tensor] | None,
                   best: set[int]) -> None:
    """Train the claimed seeds ks of trial t (one population when several; the ledger's
    heartbeat renews the claims meanwhile); record and print each."""
    study = book.study
    names = [repeat_records.key(t.number, k) for k in ks]
    own = Path(t.user_attrs.get(keys.CHECKPOINT, ""))
    keep = {k: checkpoints.repeat_path(own, k) if t.number in best and own.is_file() else None
            for k in ks}
    tested = test if t.number in best else None
    try:
        if len(ks) == 1:
            records = {ks[0]: train_one(study, t, ks[0], splits, tracker, parent, tested,
                                        keep[ks[0]])}
        else:
            records = train_together(study, t, ks, splits, tracker, parent, tested, keep)
    except (KeyboardInterrupt, SystemExit):
        book.unclaim(names)  # the next run trains them
        raise
    for k, result in records.items():
        head = f"  trial {t.number:3d} seed {k}: {t.user_attrs[keys.N_PARAMS]:,} params | "
        if not book.finish(repeat_records.key(t.number, k), result):
            print(f"{head}another worker recorded this repeat first; its result stands",
                  flush=True)
        elif keys.ERROR in result:
            print(f"{head}FAILED ({result[keys.ERROR]}); the next run tries it again", flush=True)
        elif keys.DIVERGED in result:
            print(f"{head}diverged ({result[keys.DIVERGED]}): left out of the means",
                  flush=True)
        else:
            print(f"{head}train {100 * result[TRAIN_ACC]:.2f} val {100 * result[VAL_ACC]:.2f} "
                  f"gap {100 * result[GAP]:+.2f}"
                  + (f" test {100 * result[TEST_ACC]:.2f}" if TEST_ACC in result else ""),
                  flush=True)


def train_together(study: optuna.Study, t: FrozenTrial, ks: list[int], splits: Splits,
                   tracker: Tracker, parent: str, test: tuple[torch.Tensor, torch.Tensor] | None,
                   keep: dict[int, Path | None]) -> dict[int, dict[str, Any]]:
    """Seeds ks of trial t as one population: each as train_one would train it alone (its own
    seed, MLflow run, divergence check, weights and test accuracy)."""
    base = training.resolve(recipe.of_trial(study, t), t.params, t.number)
    specs = [dataclasses.replace(base, seed=repeat_seed(base.seed, k)) for k in ks]
    records: dict[int, dict[str, Any]] = {k: {keys.SEED: k} for k in ks}
    runs: dict[int, str] = {}
    bad: dict[int, str] = {}
    try:
        module = population.build_population(specs, splits)
        for k, spec in zip(ks, specs, strict=True):
            runs[k] = tracker.start_trial(parent, t.number, spec.mlflow_params()
                                          | {keys.N_PARAMS: t.user_attrs[keys.N_PARAMS],
                                             keys.POPULATION: len(ks)},
                                          {keys.DATA_TAG: splits.source}, repeat=k)
            records[k][keys.RUN_ID] = runs[k]

        def on_epoch(epoch: int, latest: dict[int, dict[str, float]]) -> set[int]:
            stop = set()
            for i, metrics in latest.items():
                tracker.log_metrics(runs[ks[i]], metrics, step=epoch)
                wrong = [f"{m}={metrics[m]} at epoch {epoch}" for m in sorted(metrics)
                         if not math.isfinite(metrics[m])]
                if wrong:
                    bad[ks[i]] = wrong[0]
                    stop.add(i)
            return stop

        population.fit_population(module, specs, splits, on_epoch)
        for i, k in enumerate(ks):
            try:
                if k in bad:
                    records[k][keys.DIVERGED] = bad[k]
                    continue
                history = module.history[i]
                final = {m: history[-1][m] for m in (TRAIN_ACC, VAL_ACC, GAP)}
                net = population.member_net(module, i, specs[i], splits)
                if test is not None:
                    final[TEST_ACC] = training.accuracy(net, *test)
                path = keep[k]
                if path is not None:
                    checkpoints.save_to(path, t.number, net, specs[i].arch, splits, history[-1])
                records[k] |= final
            except Exception as e:  # this seed's save or test failed: this repeat fails
                records[k][keys.ERROR] = one_line(e)
    except (KeyboardInterrupt, SystemExit):
        for run_id in runs.values():
            tracker.end_trial(run_id, "FAIL", {}, error="interrupted", status="KILLED")
        raise
    except Exception as e:  # out of memory, ...: the whole population's repeats fail
        for k in ks:
            if VAL_ACC not in records[k] and keys.DIVERGED not in records[k]:
                records[k][keys.ERROR] = one_line(e)
    for k, run_id in runs.items():
        r = records[k]
        tracker.end_trial(run_id, "COMPLETE" if VAL_ACC in r else "FAIL",
                          {TEST_ACC: r[TEST_ACC]} if TEST_ACC in r else {},
                          error=r.get(keys.DIVERGED) or r.get(keys.ERROR))
    return records


def train_one(study: optuna.Study, t: FrozenTrial, k: int, splits: Splits, tracker: Tracker,
              parent: str, test: tuple[torch.Tensor, torch.Tensor] | None = None,
              keep: Path | None = None) -> dict[str, Any]:
    """Seed k of trial t, trained with the trial's own recipe. Returns its final metrics, or
    {diverged} / {error}; its weights are saved to `keep` (the best trials' repeats: export's
    seed ensembles). An interrupt ends its MLflow run KILLED and is raised again."""
    spec = training.resolve(recipe.of_trial(study, t), t.params, t.number)
    spec = dataclasses.replace(spec, seed=repeat_seed(spec.seed, k))
    record: dict[str, Any] = {keys.SEED: k}
    run_id = None
    try:
        module = training.build(spec, splits)
        run_id = tracker.start_trial(parent, t.number, spec.mlflow_params()
                                     | {keys.N_PARAMS: t.user_attrs[keys.N_PARAMS]},
                                     {keys.DATA_TAG: splits.source}, repeat=k)
        record[keys.RUN_ID] = run_id
        bad: list[str] = []

        def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
            assert run_id is not None
            tracker.log_metrics(run_id, metrics, step=epoch)
            bad.extend(f"{m}={metrics[m]} at epoch {epoch}" for m in sorted(metrics)
                       if not math.isfinite(metrics[m]))
            return bool(bad)

        training.fit(module, spec, splits, on_epoch)
        if bad:
            record[keys.DIVERGED] = bad[0]
        else:
            # Weights and test first: a repeat whose save fails is a failed repeat (retried by
            # the next run), never a finished one without its file.
            final = {m: module.history[-1][m] for m in (TRAIN_ACC, VAL_ACC, GAP)}
            if test is not None:
                final[TEST_ACC] = training.accuracy(module.net, *test)
            if keep is not None:
                checkpoints.save_to(keep, t.number, module.net, spec.arch, splits,
                                    module.history[-1])
            record |= final
    except (KeyboardInterrupt, SystemExit):
        if run_id is not None:
            tracker.end_trial(run_id, "FAIL", {}, error="interrupted", status="KILLED")
        raise
    except Exception as e:  # out of memory, a store that refused a write, ...: this repeat fails
        record[keys.ERROR] = one_line(e)
    if run_id is not None:
        state = "COMPLETE" if VAL_ACC in record else "FAIL"
        tracker.end_trial(run_id, state, {TEST_ACC: record[TEST_ACC]} if TEST_ACC in record
                          else {}, error=record.get(keys.DIVERGED) or record.get(keys.ERROR))
    return record
