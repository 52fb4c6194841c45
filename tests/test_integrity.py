"""A study's record is true: no incomparable trials, no error reported as Ctrl-C, no grid point
skipped, no live trial taken for dead, no diverged repeat averaged in (issue 13)."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import TrialState

from lightning_modules.metrics import GAP, TRAIN_ACC, VAL_ACC
from sweeper.best_model import export
from sweeper.loop import population
from sweeper.loop.study import open_storage, open_study, run_study
from sweeper.record import ledger, liveness, repeat_records
from sweeper.record.tracking import Tracker
from sweeper.settings import keys, recipe, search_space
from sweeper.settings.config import ParamSpec
from sweeper.settings.errors import UserError
from sweeper.train import checkpoints, data, training
from tests.conftest import skip_unless_ci
from tests.test_faults import diverge_on_build
from tests.test_study import REPO, runs, sweep


@pytest.mark.slow
def test_resume_with_another_training_recipe_is_refused_naming_the_keys(tiny_cfg, tmp_path):
    tiny_cfg.trainer.max_epochs, tiny_cfg.search.n_trials = 1, 1
    run_study(tiny_cfg)
    tiny_cfg.search.n_trials = 2
    tiny_cfg.trainer.max_epochs, tiny_cfg.trainer.optimizer = 3, "sgd"
    tiny_cfg.trainer.lr_schedule = "constant"
    with pytest.raises(UserError) as e:
        run_study(tiny_cfg)
    msg = str(e.value)
    for key in ("trainer.lr_schedule", "trainer.max_epochs", "trainer.optimizer"):
        assert key in msg
    assert "(study 1, this run 3)" in msg and "\n" not in msg
    tiny_cfg.trainer.max_epochs, tiny_cfg.trainer.optimizer = 1, "adam"
    tiny_cfg.trainer.lr_schedule = "cosine"
    # A fixed model value changes what trials learn; the fixed width is unused (width is
    # searched), so it may change.
    tiny_cfg.model.dropout = 0.5
    with pytest.raises(UserError, match=r"model.dropout \(study 0.2, this run 0.5\)"):
        run_study(tiny_cfg)
    tiny_cfg.model.dropout, tiny_cfg.model.width = 0.2, 999
    for augment_key in ("rotate", "label_noise"):
        bad = tiny_cfg.augment if augment_key == "rotate" else tiny_cfg.data
        old = getattr(bad, augment_key)
        setattr(bad, augment_key, 0.3)
        with pytest.raises(UserError, match=augment_key):
            run_study(tiny_cfg)
        setattr(bad, augment_key, old)
    # What may change on a resume: budget, stores' places, checkpoints, heartbeat, confirm.
    tiny_cfg.search.keep_top_k, tiny_cfg.search.checkpoint_dir = 1, str(tmp_path / "ckpt")
    tiny_cfg.search.heartbeat_interval_s, tiny_cfg.search.heartbeat_grace_s = 5, 30
    tiny_cfg.confirm.top_k, tiny_cfg.trainer.eval_batch_size = 1, 333
    assert len(run_study(tiny_cfg).trials) == 2


@pytest.mark.slow
def test_a_resume_with_another_recipe_is_one_line_exit_2(tmp_path):
    first = sweep(tmp_path, "+experiment=smoke", "search.n_trials=1", "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr
    second = sweep(tmp_path, "+experiment=smoke", "search.n_trials=2", "trainer.max_epochs=2",
                   "trainer.lr_schedule=constant", "trainer.optimizer=sgd")
    assert second.returncode == 2 and "Traceback" not in second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweeper: error: study 'smoke'")
    assert "trainer.max_epochs" in lines[0] and "trainer.optimizer" in lines[0]


@pytest.mark.slow
def test_export_refit_and_repeats_use_the_trials_own_recipe(tiny_cfg, tmp_path, monkeypatch):
    tiny_cfg.trainer.max_epochs, tiny_cfg.search.pruner = 1, "none"
    tiny_cfg.search.keep_top_k = 2
    study = run_study(tiny_cfg)
    for t in study.trials:
        assert t.user_attrs[keys.RECIPE] == json.loads(json.dumps(recipe.of_config(tiny_cfg)))
    # A later run with another recipe may not join (before: it joined, and its config became
    # what refit and repeats used for every trial).
    later = copy.deepcopy(tiny_cfg)
    later.trainer.max_epochs = 3
    with pytest.raises(UserError, match=r"trainer\.max_epochs"):
        run_study(later)

    # The trials' own recipe says 2 epochs, this run's config 1: refit and repeats must follow
    # the trial (written behind Optuna's back: finished trials are read-only through its API).
    import sqlite3

    own = json.loads(json.dumps(recipe.of_config(tiny_cfg)))
    own["trainer"]["max_epochs"] = 2
    with sqlite3.connect(tiny_cfg.search.storage.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE trial_user_attributes SET value_json=? WHERE key=?",
                   (json.dumps(own), keys.RECIPE))
    specs: list[training.TrialSpec] = []
    fit = training.fit

    def spy(module, spec, splits, on_epoch):
        specs.append(spec)
        return fit(module, spec, splits, on_epoch)

    monkeypatch.setattr(training, "fit", spy)
    out = tmp_path / "refit"
    assert export.main(["--study", "tiny", "--trial", "0", "--refit", "--out", str(out),
                        "--storage", tiny_cfg.search.storage, "--no-mlflow"]) == 0
    assert [s.max_epochs for s in specs] == [2]
    meta = json.loads((out / "model.json").read_text())
    assert meta["config"]["trainer"]["max_epochs"] == 2
    # The metrics describe the exported (refit) weights, and say so.
    m = meta["metrics"]
    assert m["weights"] == "refit on train+validation" and m["epochs"] == 2
    assert m["trained_on"] == 5000 and 0 < m["train_acc"] <= 1 and VAL_ACC not in m
    assert meta["trial_metrics"][VAL_ACC] == study.trials[0].user_attrs[VAL_ACC]

    specs.clear()
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k = 2, 1
    run_study(tiny_cfg)
    assert [s.max_epochs for s in specs] == [2]  # the repeat, with the trial's recipe


@pytest.mark.slow
def test_an_error_in_a_seed_repeat_fails_that_repeat_not_the_run(tiny_cfg, monkeypatch, capsys):
    tiny_cfg.search.pruner = "none"
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k = 2, 1
    fit, calls = training.fit, []

    def oom_in_repeats(*args, **kwargs):
        calls.append(1)
        if len(calls) > tiny_cfg.search.n_trials:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", oom_in_repeats)
    study = run_study(tiny_cfg)  # before: KeyboardInterrupt, exit 130, message lost
    best = study.best_trial.number
    record = study.user_attrs[f"{keys.REPEAT}.{best}.1"]
    assert "CUDA out of memory" in record[keys.ERROR]
    assert f"trial {best:3d} seed 1: " in (out := capsys.readouterr().out)
    assert "FAILED (RuntimeError: CUDA out of memory" in out
    client, parents, _ = runs(tiny_cfg.tracking.uri, "tiny")
    repeat = client.get_run(record[keys.RUN_ID])
    assert repeat.info.status == "FAILED"
    assert "CUDA out of memory" in repeat.data.tags[keys.ERROR_TAG]
    assert parents[0].info.status == "FINISHED"
    monkeypatch.setattr(training, "fit", fit)
    run_study(tiny_cfg)  # the failed repeat runs again
    assert VAL_ACC in optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage
                                        ).user_attrs[f"{keys.REPEAT}.{best}.1"]


@pytest.mark.slow
def test_more_seeds_on_resume_trains_and_announces_only_the_new_ones(tiny_cfg, monkeypatch,
                                                                     capsys):
    tiny_cfg.search.pruner = "none"
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k = 2, 1
    run_study(tiny_cfg)
    assert "with 2 seeds each: 1 repeat runs\n" in capsys.readouterr().out
    fit, calls = training.fit, []
    monkeypatch.setattr(training, "fit", lambda *a, **kw: calls.append(1) or fit(*a, **kw))
    tiny_cfg.confirm.seeds = 3
    run_study(tiny_cfg)  # before: "2 repeat runs" while only seed 2 trained
    assert "with 3 seeds each: 2 repeat runs, 1 still to train" in capsys.readouterr().out
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.parametrize("pop", [1, 2])
def test_an_unexpected_error_fails_the_run_with_its_message(tiny_cfg, monkeypatch, pop):
    tiny_cfg.search.population, tiny_cfg.search.pruner = pop, "none"

    # Not a disk-full error (that one becomes a one-line DiskFull: test_faults_round3).
    def broken(*args, **kwargs):
        raise RuntimeError("the checkpoint writer broke")

    monkeypatch.setattr(checkpoints, "save", broken)
    with pytest.raises(RuntimeError, match="writer broke"):  # before: KeyboardInterrupt (pop 2)
        run_study(tiny_cfg)
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == pop and not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert all("writer broke" in t.user_attrs[keys.ERROR] for t in failed)
    assert len([t for t in study.trials if t.state == TrialState.WAITING]) == pop  # queued
    _, parents, children = runs(tiny_cfg.tracking.uri, "tiny")
    assert parents[0].info.status == "FAILED"  # before: FINISHED
    assert sorted(c.info.status for c in children) == ["FAILED"] * pop


@pytest.mark.slow
def test_an_interrupted_population_explores_as_many_architectures(tiny_cfg, monkeypatch,
                                                                  tmp_path):
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 2, 6
    tiny_cfg.trainer.max_epochs, tiny_cfg.search.pruner = 1, "none"
    tiny_cfg.search.space = {"depth": ParamSpec("int", low=1, high=3),
                             "width": ParamSpec("int", low=16, high=128, log=True),
                             "lr": ParamSpec("float", low=1e-4, high=3e-3, log=True)}

    def shapes(study):
        return {(t.params["depth"], t.params["width"]) for t in study.trials
                if t.state == TrialState.COMPLETE}

    uninterrupted = shapes(run_study(tiny_cfg))
    assert len(uninterrupted) == 3

    tiny_cfg.search.study_name = "interrupted"
    fit = population.fit_population

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(population, "fit_population", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_cfg)
    monkeypatch.setattr(population, "fit_population", fit)
    study = run_study(tiny_cfg)
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 6
    assert len(shapes(study)) == len(uninterrupted)  # before: 2 (the interrupted shape twice)
    assert not [t for t in study.trials if t.state == TrialState.WAITING]


@pytest.mark.slow
def test_grid_retries_a_failed_point_first_and_never_repeats_a_finished_one(tiny_cfg,
                                                                            monkeypatch):
    tiny_cfg.trainer.max_epochs, tiny_cfg.search.pruner = 1, "none"
    tiny_cfg.search.sampler, tiny_cfg.search.n_trials = "grid", 3
    tiny_cfg.search.space = {"width": ParamSpec("int", low=16, high=48, step=16)}
    fit, calls = training.fit, []

    def crash_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", crash_first)
    study = run_study(tiny_cfg)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert trials[1].params == trials[0].params  # the failed point, first
    assert sorted(t.params["width"] for t in trials[1:]) == [16, 32, 48]  # each point once


@pytest.mark.slow
def test_a_grid_point_that_always_fails_does_not_block_the_others(tiny_cfg, monkeypatch):
    tiny_cfg.trainer.max_epochs, tiny_cfg.search.pruner = 1, "none"
    tiny_cfg.search.sampler, tiny_cfg.search.n_trials = "grid", 3
    tiny_cfg.search.space = {"width": ParamSpec("int", low=16, high=48, step=16)}
    fit, bad = training.fit, []

    def first_point_always_fails(module, spec, *args, **kwargs):
        bad[:] = bad or [spec.arch.hidden[0]]
        if spec.arch.hidden[0] == bad[0]:
            raise RuntimeError("diverges every time")
        return fit(module, spec, *args, **kwargs)

    monkeypatch.setattr(training, "fit", first_point_always_fails)
    with pytest.raises(UserError, match="3 trials failed in a row"):
        run_study(tiny_cfg)
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    done = sorted(t.params["width"] for t in study.trials if t.state == TrialState.COMPLETE)
    assert done == sorted({16, 32, 48} - {bad[0]})  # before: the sweep stopped on the bad point
    assert [t.params["width"] for t in study.trials[:2]] == [bad[0]] * 2  # retried once, first


def test_recovery_never_relabels_a_trial_that_ended_normally(tiny_cfg, monkeypatch):
    splits = data.load_splits(tiny_cfg.data, tiny_cfg.seed, torch.device("cpu"))
    study = open_study(tiny_cfg, splits, open_storage(tiny_cfg))
    tracker = Tracker(tiny_cfg.tracking.uri, None, "tiny")
    trial = study.ask({"width": optuna.distributions.IntDistribution(16, 64)})
    trial.suggest_int("width", 16, 64)
    trial.set_user_attr(keys.WORKER, "host:boot:ns:1:1")

    def judged_dead_while_it_ends(owner: str) -> bool:
        # Recovery saw the trial RUNNING; its owner ends it normally before recovery acts.
        study.tell(trial.number, 0.5)
        return True

    monkeypatch.setattr(liveness, "is_dead_here", judged_dead_while_it_ends)
    assert ledger.Ledger(study).recover_dead_trials(tracker) == []
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]  # not FAIL, nothing queued
    assert f"{keys.RECOVERED}.0" not in study.user_attrs


def test_a_trial_never_stamped_by_its_asker_is_recovered_at_once(tiny_cfg):
    splits = data.load_splits(tiny_cfg.data, tiny_cfg.seed, torch.device("cpu"))
    study = open_study(tiny_cfg, splits, open_storage(tiny_cfg))
    trial = study.ask()  # its worker died before it could stamp it (under the study lock)
    trial.suggest_int("width", 16, 64)
    tracker = Tracker(tiny_cfg.tracking.uri, None, "tiny")
    assert ledger.Ledger(study).recover_dead_trials(tracker) == [0]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].user_attrs[keys.RETRY_OF] == 0


def _unshare_pid() -> list[str] | None:
    """A command prefix that runs in a new pid namespace, or None where that is not allowed."""
    cmd = ["unshare", "--pid", "--fork", "--mount-proc"]
    if shutil.which("unshare") and subprocess.run([*cmd, "true"],
                                                  capture_output=True).returncode == 0:
        return cmd
    return None


def test_a_worker_in_another_pid_namespace_is_not_taken_for_dead():
    prefix = _unshare_pid()
    if prefix is None:
        skip_unless_ci("unshare --pid is not available (util-linux, and root or user "
                       "namespaces)")
    code = ("import sys; from sweeper.record import liveness; print(liveness.this_worker(), "
            "flush=True); sys.stdin.read()")
    other = subprocess.Popen([*prefix, sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert other.stdout is not None
        worker = other.stdout.readline().strip()
        # Same host name and boot, another pid namespace: its pid (1 or 2) means nothing here.
        assert worker.startswith(liveness.this_machine().rsplit(":", 1)[0])
        assert not liveness.is_dead_here(worker)
    finally:
        other.communicate("", timeout=30)
    # In this namespace, a gone process is dead; on another boot, nothing can be said.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    assert liveness.is_dead_here(f"{liveness.this_machine()}:{gone}:123")
    host, _boot, ns = liveness.this_machine().split(":")
    assert not liveness.is_dead_here(f"{host}:another-boot:{ns}:{gone}:123")


@pytest.mark.slow
def test_a_repeat_claimed_by_a_silent_worker_elsewhere_is_taken_over(tiny_cfg):
    tiny_cfg.search.pruner = "none"
    study = run_study(tiny_cfg)
    best = study.best_trial.number
    stale = {keys.CLAIMED_BY: "other-machine:boot:1:123:456",
             keys.CLAIM_BEAT: time.time() - 10 * tiny_cfg.search.heartbeat_grace_s}
    study.set_user_attr(f"{keys.REPEAT}.{best}.1", stale)
    fresh = stale | {keys.CLAIM_BEAT: time.time() + 3600}  # alive for the whole test
    study.set_user_attr(f"{keys.REPEAT}.{best}.2", fresh)
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k = 3, 1
    attrs = run_study(tiny_cfg).user_attrs
    assert VAL_ACC in attrs[f"{keys.REPEAT}.{best}.1"]  # before: skipped forever
    assert attrs[f"{keys.REPEAT}.{best}.2"] == fresh  # still being trained elsewhere


@pytest.mark.slow
def test_diverged_repeats_are_left_out_of_the_means_and_reported(tiny_cfg, monkeypatch,
                                                                 capsys):
    tiny_cfg.search.pruner = "none"
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k = 3, 1
    diverge_on_build(monkeypatch, call=4, steps=5)  # 2 trials, then the second repeat
    study = run_study(tiny_cfg)
    best = study.best_trial.number
    seeds = repeat_records.results(study)[best]
    assert len(seeds) == 2 and all(math.isfinite(s[VAL_ACC]) for s in seeds)
    assert repeat_records.diverged(study) == {best: 1}
    out = capsys.readouterr().out
    assert f"trial {best:3d} seed 2: " in out and "diverged (train_loss=nan" in out
    assert "(2 seeds, 1 diverged)" in out
    # A study made before this fix stored a diverged repeat as NaN metrics: left out as well.
    study.set_user_attr(f"{keys.REPEAT}.{best}.2", {VAL_ACC: math.nan, TRAIN_ACC: math.nan,
                                                     GAP: math.nan, keys.SEED: 2})
    assert len(repeat_records.results(study)[best]) == 2
    assert repeat_records.diverged(study) == {best: 1}


@pytest.mark.slow
def test_population_and_study_modules_do_not_import_each_other():
    code = ("import sys, sweeper.loop.population, sweeper.loop.outcome, sweeper.loop.repeats; "
            "print('sweeper.loop.study' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.slow
def test_an_error_between_ask_and_stamp_leaves_no_running_trial(tiny_cfg, monkeypatch):
    def broken_suggest(*args, **kwargs):
        raise RuntimeError("suggest broke")

    monkeypatch.setattr(search_space, "suggest", broken_suggest)
    with pytest.raises(RuntimeError, match="suggest broke"):
        run_study(tiny_cfg)
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # before: RUNNING, unowned
    _, parents, _ = runs(tiny_cfg.tracking.uri, "tiny")
    assert parents[0].info.status == "FAILED"  # before: RUNNING (it counted as running elsewhere)
