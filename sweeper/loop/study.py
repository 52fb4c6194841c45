"""The study loop: Optuna ask -> train one trial with Lightning -> tell, with every trial an
MLflow child run of the study's parent run. Re-running tops the study up to search.n_trials
finished (COMPLETE or PRUNED) trials; failed trials do not count and are retried as new ones.

Where things live: every write to a trial's or a seed repeat's record, the heartbeat and the
recovery of dead workers are ledger.py; how a trained trial ends (weights, tell, MLflow) is
outcome.py; what makes trials comparable is recipe.py; populations are population.py; samplers
are samplers.py.
"""

from __future__ import annotations

import contextlib
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
from optuna.trial import TrialState

from lightning_modules.metrics import VAL_ACC
from sweeper.analysis import console, report
from sweeper.loop import outcome, population, repeats, samplers
from sweeper.record import stores
from sweeper.record.ledger import DeadTrials, Ledger
from sweeper.record.study_lock import StudyLock
from sweeper.record.tracking import Tracker
from sweeper.settings import faultpoints, keys, objectives, recipe, search_space
from sweeper.settings.config import Config, grid_count
from sweeper.settings.errors import DiskFull, Refused, UserError, disk_full, one_line
from sweeper.train import checkpoints, data, training

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_POLL_S = 2.0  # a worker with nothing to ask (the rest is running elsewhere) checks this often
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# We drive the heartbeat ourselves from the ask/tell loop (the ledger's heartbeat thread).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


def storage_error(url: str, e: Exception) -> UserError:
    return UserError(f"search.storage={url}: cannot open the Optuna storage ({one_line(e, 220)})")


def open_storage(cfg: Config) -> optuna.storages.RDBStorage:
    s = cfg.search
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        db = stores.sqlite_path(s.storage)
        if db is not None:  # made whole or not at all
            stores.create_sqlite_whole(db, optuna.storages.RDBStorage)
        # Wait for a busy SQLite file instead of failing at once.
        engine = {"connect_args": {"timeout": 60}} if s.storage.startswith("sqlite") else None
        return optuna.storages.RDBStorage(s.storage, engine_kwargs=engine,
                                          heartbeat_interval=s.heartbeat_interval_s,
                                          grace_period=s.heartbeat_grace_s,
                                          heartbeat_stale_trial_callback=DeadTrials())
    except Exception as e:  # bad URL, missing driver, unreachable server, foreign database
        raise storage_error(s.storage, e) from None


def check_stores_agree(cfg: Config, storage: optuna.storages.RDBStorage,
                       tracker: Tracker) -> None:
    """Both stores (and the checkpoint folder) hold this study, or none does: one of them
    replaced, emptied or pointed elsewhere would otherwise start a second study inside the
    first one's record."""
    s = cfg.search
    try:
        trials = storage.get_all_trials(storage.get_study_id_from_name(s.study_name),
                                        deepcopy=False)
    except KeyError:
        trials = []
    fix = ("point search.storage and tracking.uri at the study's own stores, or start a new "
           "study with search.study_name=NEW_NAME")
    # Trial numbers only grow, and a trial exists in Optuna before its run and its weights:
    # a number Optuna has not reached means its store was emptied or replaced by an older copy.
    unknown = sorted(n for n in tracker.trial_numbers() if n >= len(trials))
    if unknown:
        raise UserError(f"study {s.study_name!r} has {len(trials)} trials in {s.storage}, but "
                        f"MLflow ({cfg.tracking.uri}) holds runs of trial {unknown[0]}"
                        f"{' and later' if len(unknown) > 1 else ''}: the stores disagree (was "
                        f"the Optuna store replaced, restored from an older copy or emptied?); "
                        f"{fix}")
    if any(keys.MLFLOW_RUN_ID in t.user_attrs for t in trials) and not tracker.has_runs("parent"):
        raise UserError(f"study {s.study_name!r} has {len(trials)} trials in {s.storage}, but "
                        f"MLflow ({cfg.tracking.uri}) has no record of it: the stores disagree "
                        f"(was the MLflow store replaced or emptied?); {fix}")
    folder = checkpoints.folder(cfg)
    ahead = sorted(p.name for p in folder.glob("trial-*.pt")
                   if p.stem[6:].isdigit() and int(p.stem[6:]) >= len(trials))
    if ahead:
        raise UserError(f"study {s.study_name!r} has {len(trials)} trials in {s.storage}, but "
                        f"{folder} holds {ahead[0]} of a study of that name that went further; "
                        f"move the checkpoints away or {fix}")


def open_study(cfg: Config, splits: data.Splits,
               storage: optuna.storages.RDBStorage) -> optuna.Study:
    s = cfg.search
    want_directions: list[Any] = objectives.directions(cfg)
    try:
        study = optuna.create_study(study_name=s.study_name, storage=storage,
                                    directions=want_directions, load_if_exists=True)
    except Exception as e:  # a foreign database
        raise storage_error(s.storage, e) from None
    have_directions = [d.name.lower() for d in study.directions]
    if have_directions != want_directions:
        if len(have_directions) == 1 and not objectives.multi(cfg):
            raise UserError(f"study {s.study_name!r} in {s.storage} minimizes its objective; "
                            "sweeper studies maximize validation accuracy: use another "
                            "search.study_name")
        names = study.user_attrs.get(keys.OBJECTIVES) or [VAL_ACC] * len(have_directions)
        had = ", ".join(f"{m} ({d})" for m, d in zip(names, have_directions, strict=False))
        asked = ", ".join(f"{m} ({d})" for m, d in (s.objectives or {VAL_ACC: "maximize"}).items())
        raise UserError(f"study {s.study_name!r} in {s.storage} optimizes {had}; this run "
                        f"asks for {asked}: give the study's objectives in its order, or use "
                        "another search.study_name")
    # The data by content, not path: workers on other machines may keep it elsewhere.
    kind = splits.source.split(":")[0]
    want = recipe.identity(cfg, f"{kind}:{splits.fingerprint()}")
    have = study.user_attrs.get(keys.IDENTITY)
    if have is not None and "search.space" not in have:  # made by an earlier version
        have = recipe.upgrade(have, study.user_attrs.get(keys.LEGACY_CONFIG), want)
    if have is not None and have.get("data.content") == f"{kind}:{splits.labels_fingerprint()}":
        # Made before the fingerprint covered pixels: its labels match, which is all it kept.
        # From now on it is known by the new one (stored below).
        have = have | {"data.content": want["data.content"]}
    if have is None:
        if not study.trials:
            for fixed in s.enqueue:
                study.enqueue_trial(dict(fixed), skip_if_exists=True)
    else:
        recipe.refuse(s.study_name, s.storage, have, want)
    study.set_user_attr(keys.IDENTITY, want)
    if objectives.multi(cfg):
        study.set_user_attr(keys.OBJECTIVES, list(s.objectives))
    # Workers that open the study at the same moment see the same trials; the start count
    # (read and bumped under the study lock) keeps their samplers' random streams apart (the
    # QMC and grid samplers take the study's seed instead: one sequence, one order per study).
    starts = int(study.user_attrs.get(keys.STARTS, 0))
    study.set_user_attr(keys.STARTS, starts + 1)
    study.sampler = samplers.make_sampler(cfg, cfg.seed + len(study.trials) + 10_007 * starts)
    study.pruner = samplers.make_pruner(cfg)
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


def ask(ledger: Ledger, cfg: Config, room: int) -> list[tuple[optuna.Trial, dict[str, Any]]]:
    """Under the study lock: ask up to `room` trials; the ledger holds them as this worker's
    before the lock is released."""
    if room <= 0:
        return []

    def asker() -> list[tuple[optuna.Trial, dict[str, Any]]]:
        if cfg.search.population > 1:
            asked = population.ask(ledger.study, cfg, room)
        else:
            trial = ledger.study.ask()
            asked = [(trial, search_space.suggest(trial, cfg.search.space, cfg.model.depth))]
        faultpoints.reached("asked")
        return asked

    design = {"sampler": cfg.search.sampler, "pruner": "none" if objectives.multi(cfg)
              else cfg.search.pruner}
    return ledger.ask(asker, {keys.RECIPE: recipe.of_config(cfg), keys.DESIGN: design})


def recover(ledger: Ledger, tracker: Tracker) -> None:
    """Under the study lock: what dead workers left RUNNING is ended (and their trials queued
    again), said once per trial."""
    numbers, ended = ledger.recover(tracker)
    for number in numbers:
        print(f"trial {number} was left running by a process that died: marked failed, its "
              "configuration queued again", flush=True)
    if ended:
        print(f"{ended} MLflow run(s) left running by a process that died: ended", flush=True)


def run_study(cfg: Config, splits: data.Splits | None = None) -> optuna.Study:
    t0 = time.perf_counter()
    # The data must be sound and every store reachable and writable before anything is
    # written: a refused run leaves nothing behind.
    try:
        device = training.accelerator(cfg.trainer.accelerator)
        if note := training.bf16_note(cfg.trainer.precision, device):
            # before the study exists: precision is part of its identity
            print(f"{note}; to train in float32, stop and add trainer.precision=32 with a new "
                  "search.study_name", flush=True)
        if splits is None:
            splits = data.load_splits(cfg.data, cfg.seed, device)
        training.check_space_fits(cfg, splits)
        stores.check_reachable(cfg.tracking.uri, "tracking.uri")
        for uri, what in ((cfg.search.storage, "search.storage"),
                          (cfg.tracking.uri, "tracking.uri")):
            stores.prepare_sqlite(uri, what)
        stores.prepare_folder(checkpoints.folder(cfg), "search.checkpoint_dir")
    except UserError as e:
        raise Refused(str(e)) from None
    lock = open_lock(cfg)
    s = cfg.search
    target = s.n_trials
    if s.sampler == "grid":
        size = math.prod(grid_count(spec) for spec in s.space.values())
        if target > size:
            print(f"note: the grid has {size} points; running {size} trials, not {target}")
            target = size
    with lock():  # workers starting together: one creates the stores and the parent run
        storage = open_storage(cfg)
        tracker = Tracker(cfg.tracking.uri, cfg.tracking.artifact_location, s.study_name)
        check_stores_agree(cfg, storage, tracker)
        study = open_study(cfg, splits, storage)
        ledger = Ledger(study, lock, s.heartbeat_interval_s, s.heartbeat_grace_s)
        if ledger.why_not_batched:
            print(f"note: batched Optuna writes are off ({ledger.why_not_batched}): trial "
                  "records go through Optuna's own calls, slower, the same record", flush=True)
        parent = tracker.open_parent(
            params={keys.SAMPLER_PARAM: s.sampler, "objective": s.objective,
                    keys.PRUNER_PARAM: "none" if objectives.multi(cfg) else s.pruner,
                    "seed": cfg.seed, keys.TRAIN_SIZE_PARAM: len(splits.y_train),
                    keys.VAL_SIZE_PARAM: len(splits.y_val), "family": cfg.model.family,
                    "label_noise": splits.label_noise,
                    "search_space": json.dumps(search_space.describe(s.space))},
            tags={keys.N_TRIALS_TAG: str(target), keys.DATA_TAG: splits.source,
                  keys.STORAGE_TAG: s.storage})
        recover(ledger, tracker)
    done = n_finished(study)
    print(f"study {s.study_name!r}: {done}/{target} finished trials in {s.storage}; "
          f"MLflow {cfg.tracking.uri} (parent run {parent[:8]})\n"
          f"data {splits.describe()} | sampler {s.sampler}, " + (
              f"objectives {', '.join(f'{m} ({d})' for m, d in s.objectives.items())}, no "
              "pruning (Optuna cannot prune multi-objective trials)" if objectives.multi(cfg)
              else f"pruner {s.pruner}") + f", {cfg.trainer.max_epochs} epochs max", flush=True)
    if done >= target:
        print(f"nothing to do: the study already has {done} finished trials "
              f"(raise search.n_trials to add more)")
    status, failures, waiting, failing, first = "FINISHED", 0, False, False, True
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # signal handlers can only be set from the main thread
        previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    ledger.start()  # the heartbeat of every trial and repeat this worker holds
    try:
        while n_finished(study) < target:
            with lock():
                recover(ledger, tracker)
                if first:
                    first = False
                    if lost := ledger.requeue_lost_splits():
                        print(f"trial(s) {', '.join(map(str, lost))} of a population that ran "
                              "out of memory were never queued again: queued now", flush=True)
                # Running trials of other workers count: they will finish (or be retried).
                elsewhere = n_running(study)
                asked = ask(ledger, cfg, min(target - n_finished(study) - elsewhere,
                                             s.population))
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
                frozen = [run_trial(ledger, asked[0][0], cfg, splits, tracker, parent)]
            else:
                frozen = population.run(ledger, asked, cfg, splits, tracker, parent)
            for f in frozen:
                before += f.state != TrialState.FAIL
                console.trial_line(f, before, target)
                if keys.SPLIT_AFTER_OOM in f.user_attrs:
                    continue  # queued again for a smaller population: not a failure in a row
                failures = failures + 1 if f.state == TrialState.FAIL else 0
            if failures >= s.max_consecutive_failures:
                raise UserError(f"{failures} trials failed in a row (last: "
                                f"{frozen[-1].user_attrs.get(keys.ERROR, '?')}); stopping the "
                                "sweep. Finished trials are kept; fix the cause and re-run to "
                                "resume")
        repeats.run(ledger, cfg, splits, tracker, parent)
    except BaseException as e:
        # Only Ctrl-C and SIGTERM (which Lightning may re-raise as SystemExit) are interrupts;
        # anything else fails the run with its own message.
        interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
        status, failing = ("KILLED" if interrupted else "FAILED"), True
        held = 0
        if interrupted and main_thread:
            # Lightning ignores SIGINT while it shuts down; give Ctrl-C back its usual meaning.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # The store that failed may fail again here: the first error is the one to report.
        with contextlib.suppress(Exception):
            held = ledger.release_held(tracker, "interrupted" if interrupted else one_line(e),
                                       interrupted)
        console.clear_live()
        if not interrupted and disk_full(e):
            what = str(e) if isinstance(e, UserError) else f"the disk is full ({one_line(e)})"
            queued = (f"{held} running trial(s) queued to run again; " if held else "")
            raise DiskFull(f"{what}. Kept: {n_finished(study)}/{target} finished trials in "
                           f"{s.storage} and MLflow; {queued}free some space and run the same "
                           "command to resume (the next start ends whatever this one could not)"
                           ) from None
        if interrupted:
            running = (f"{held} running trial(s) marked failed, to run again first; " if held
                       else "")
            print(f"\ninterrupted: {n_finished(study)}/{target} trials finished and saved; "
                  f"{running}run the same command to resume.\n{console.best_table(study)}",
                  file=sys.stderr, flush=True)
            raise KeyboardInterrupt from None
        raise
    finally:
        ledger.stop()
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        with contextlib.suppress(Exception) if failing else contextlib.nullcontext():
            table = console.best_table(study)
            effects = None if failing else size_verdict(study)
            # With other workers still training, the last one to stop closes the parent run.
            others = n_running(study)
            tracker.close_parent(parent, None if others else status,
                                 f"# {s.study_name}\n\n```\n{table}\n```\n",
                                 summary(study, effects))
    found = report.console_verdict(study, effects)
    print(f"\nbest trials of {s.study_name!r} ({n_finished(study)} finished, "
          f"{time.perf_counter() - t0:.0f}s this run):\n{table}\n\n"
          + (f"does size buy generalization? {found}\n\n" if found else "")
          + f"{console.next_steps(cfg, study)}")
    return study


def size_verdict(study: optuna.Study) -> Any:
    """report.study_effects, or None: a bug in the statistics must not fail a finished sweep."""
    try:
        return report.study_effects(study)
    except Exception as e:
        print(f"warning: no size verdict at the end of this run ({one_line(e)})",
              file=sys.stderr)
        return None


def summary(study: optuna.Study, effects: Any = None) -> tuple[dict[str, float], dict[str, str]]:
    """How the study went, for its parent run: (metrics, tags). `effects`: the size verdict
    (report.study_effects), if there is one."""
    counts: dict[str, float] = {f"trials_{state.name.lower()}": len(study.get_trials(deepcopy=False,
                                                                    states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    ranked = objectives.ranked(study)
    if not ranked:
        return counts, {}
    best = ranked[0]
    tags = {keys.BEST_TRIAL_TAG: str(best.number)}
    tags |= {f"{keys.BEST_PARAM_TAG}.{k}": str(v) for k, v in best.params.items()}
    if effects is not None:  # the size verdict, for the runs table
        val, gap, _ = effects
        tags[keys.SIZE_VERDICT_TAG] = "descriptive" if val.design else val.verdict
        for key, e in ((keys.SIZE_EFFECT_VAL, val), (keys.SIZE_EFFECT_GAP, gap)):
            if e.verdict != "too few":
                counts |= {key: e.estimate, f"{key}_low": e.low, f"{key}_high": e.high}
    if objectives.is_multi(study):
        front = objectives.front(study)
        tags[keys.FRONT_TAG] = " ".join(str(t.number) for t in front)
        return counts | {keys.FRONT_SIZE: len(front)}, tags
    return counts | {keys.BEST_OBJECTIVE: float(best.values[0])}, tags


def run_trial(ledger: Ledger, trial: optuna.Trial, cfg: Config, splits: data.Splits,
              tracker: Tracker, parent: str) -> optuna.trial.FrozenTrial:
    """Train one asked trial and conclude it. An error in its training fails the trial (the
    study goes on); an interrupt leaves it RUNNING for run_study to release."""
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
        console.epoch(trial.number, epoch, spec.max_epochs, metrics)
        if not samplers.prunes(cfg):  # no pruner would read the epoch's value
            return False
        ledger.report({trial: metrics[VAL_ACC]}, epoch)
        pruned = trial.should_prune()
        return pruned

    try:
        params = search_space.suggest(trial, cfg.search.space, cfg.model.depth)
        spec = training.resolve(cfg, params, trial.number)
        module = training.build(spec, splits)
        n_params = training.n_params(module)
        run_id = tracker.start_trial(parent, trial.number,
                                     spec.mlflow_params() | {keys.N_PARAMS: n_params},
                                     {keys.DATA_TAG: splits.source})
        faultpoints.reached("trial-run-made")
        attrs = {keys.N_PARAMS: n_params, keys.MLFLOW_RUN_ID: run_id}
        if "size" in params:  # the width that `size` picked, for the report
            attrs[keys.WIDTH] = spec.arch.hidden[0]
        ledger.set_attrs({trial: attrs})  # refused: another worker ended it (conclude says so)
        training.fit(module, spec, splits, on_epoch)
    except Exception as e:  # this trial fails (bad config, out of memory, ...); the study goes on
        error = one_line(e)
        if cfg.debug:
            traceback.print_exc()

    history = module.history if module is not None else []
    net = module.net if module is not None else None
    arch = spec.arch if net is not None else None
    return outcome.conclude(ledger, trial, cfg, splits, tracker, run_id, arch, history, net,
                            pruned, error, time.perf_counter() - t0)
