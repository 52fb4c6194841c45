"""Faults, round three (issue 31): bounded memory for every input, no record left RUNNING, one
line for every refusal. Timing windows are reached through sweeper.settings.faultpoints, never
sleeps."""

import os
import socket
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from sweeper.record import stores
from tests.cli import refusal
from tests.test_faults_round2 import ONE_TRIAL, _export, one_error_line
from tests.test_study import REPO, sweep


def test_litter_of_a_killed_process_is_removed_and_a_live_ones_kept(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".mlflow.db.creating-{dead}").write_text("x")
    (tmp_path / f".mlflow.db.creating-{dead}-journal").write_text("x")  # before: kept forever
    (tmp_path / f".mlflow.db.creating-{os.getpid()}-journal").write_text("x")  # alive: kept
    side = tmp_path / f".out.export-{socket.gethostname()}-{dead}-abc123"
    side.mkdir()
    (side / "model.onnx").write_text("x")
    stores.remove_litter(tmp_path, ".mlflow.db.creating-")
    stores.remove_litter(tmp_path, f".out.export-{socket.gethostname()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".mlflow.db.creating-{os.getpid()}-journal"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_ctrl_c_during_an_ensemble_refit_exports_and_registers_nothing(tmp_path):
    assert sweep(tmp_path, *ONE_TRIAL, "search.n_trials=2").returncode == 0
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    # Before: Lightning turned Ctrl-C into exit 1, silently (and once the export went on).
    result = _export(tmp_path, "--out", "out", "--ensemble", "2", "--refit", "--epochs", "2",
                     SWEEPER_TEST_STOP_AT="refit-epoch:SIGINT")
    assert result.returncode == 130, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == ["sweeper.export: interrupted: nothing exported or registered, out "
                     "unchanged (and the study's record too)"], result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".out.export-*"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert client.search_registered_models() == []
    assert not (tmp_path / "mlruns" / "last_export").exists()


@pytest.mark.slow
def test_ctrl_c_while_an_export_commits_finishes_it_and_says_so(tmp_path):
    assert sweep(tmp_path, *ONE_TRIAL).returncode == 0
    result = _export(tmp_path, "--out", "out", SWEEPER_TEST_STOP_AT="export-mlflow:SIGINT")
    assert result.returncode == 0, result.stderr
    assert "Ctrl-C came while the export was being committed" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert [m.name for m in client.search_registered_models()] == ["smoke"]
    assert {"model.pt2", "model.onnx", "model.json"} <= {p.name for p in
                                                         (tmp_path / "out").iterdir()}


@pytest.mark.slow
def test_a_killed_export_leaves_a_side_folder_that_the_next_one_removes(tmp_path):
    assert sweep(tmp_path, *ONE_TRIAL).returncode == 0
    killed = _export(tmp_path, "--out", "out", "--no-mlflow",
                     SWEEPER_TEST_STOP_AT="export-written")
    assert killed.returncode < 0 and len(list(tmp_path.glob(".out.export-*"))) == 1
    done = _export(tmp_path, "--out", "out", "--no-mlflow")
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".out.export-*"))


def test_runs_left_running_are_ended_by_the_next_start_and_live_ones_kept(tmp_path):
    import optuna

    from sweeper.record import ledger, liveness
    from sweeper.record.tracking import Tracker
    from sweeper.settings import keys

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db",
                                direction="maximize")
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", None, "s")
    parent = tracker.open_parent({}, {})
    failed, running, done = study.ask(), study.ask(), study.ask()
    orphan = tracker.start_trial(parent, failed.number, {}, {})  # killed before naming it
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    in_flight = tracker.start_trial(parent, running.number, {}, {})  # its worker is at it
    finished = tracker.start_trial(parent, done.number, {}, {})  # died after the tell
    done.set_user_attr(keys.MLFLOW_RUN_ID, finished)
    done.set_user_attr("epochs_run", 2)
    study.tell(done, 0.9)
    dead_repeat = tracker.start_trial(parent, done.number, {}, {}, repeat=1)
    study.set_user_attr(f"{keys.REPEAT}.{done.number}.1",
                        {keys.CLAIMED_BY: "elsewhere:x:y:1:2", keys.CLAIM_BEAT: 0.0})
    live_repeat = tracker.start_trial(parent, done.number, {}, {}, repeat=2)
    study.set_user_attr(f"{keys.REPEAT}.{done.number}.2",
                        {keys.CLAIMED_BY: liveness.this_worker(), keys.CLAIM_BEAT: 1e12})
    assert ledger.Ledger(study, grace_s=60).end_orphan_runs(tracker) == 3
    status = {r: tracker.client.get_run(r).info.status
              for r in (orphan, in_flight, finished, dead_repeat, live_repeat)}
    assert status == {orphan: "KILLED", in_flight: "RUNNING", finished: "FINISHED",
                      dead_repeat: "KILLED", live_repeat: "RUNNING"}
    tags = tracker.client.get_run(finished).data
    assert tags.tags[keys.STATE_TAG] == "COMPLETE" and tags.metrics["epochs_run"] == 2
    assert ledger.ORPHAN in tracker.client.get_run(orphan).data.tags[keys.ERROR_TAG]


@pytest.mark.slow
@pytest.mark.parametrize("point, extra", [("trial-run-made", []),
                                          ("population-runs-made", ["search.population=2"])])
def test_a_kill_before_a_trial_names_its_run_leaves_no_run_running(tmp_path, point, extra):
    killed = sweep(tmp_path, *ONE_TRIAL, "search.n_trials=2", *extra,
                   SWEEPER_TEST_STOP_AT=point)
    assert killed.returncode < 0
    again = sweep(tmp_path, *ONE_TRIAL, "search.n_trials=2", *extra)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "MLflow run(s) left running by a process that died: ended" in again.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("smoke")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    assert "RUNNING" not in statuses, statuses  # before: the killed trial's run, for good
    assert statuses.count("KILLED") == (1 if not extra else 2)


def test_mlruns_as_a_looping_link_is_one_line(tmp_path):
    (tmp_path / "mlruns").symlink_to("mlruns")  # before: Hydra's 6-line OSError
    assert "is a symbolic link that leads nowhere" in refusal(tmp_path, *ONE_TRIAL)


@pytest.mark.slow
def test_a_read_only_mlruns_is_one_line_for_every_command(tmp_path):
    assert sweep(tmp_path, *ONE_TRIAL).returncode == 0
    mlruns = tmp_path / "mlruns"
    if subprocess.run(["chattr", "-R", "+i", str(mlruns)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (needs root on a filesystem with it)")
    try:
        # before: a 6-line traceback, a 23-line one naming the wrong cause, and files written
        # then 86 lines of MLflow ERROR logs
        line = one_error_line(sweep(tmp_path, *ONE_TRIAL, "search.n_trials=2"))
        assert "cannot write to mlruns/hydra" in line
        report = subprocess.run([sys.executable, "-m", "sweeper.report", "--study", "smoke"],
                                cwd=tmp_path, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert "cannot write to mlruns/reports/smoke" in one_error_line(report)
        export = _export(tmp_path, "--out", str(tmp_path / "out"))
        assert "cannot write to mlruns" in one_error_line(export)
        assert not (tmp_path / "out").exists()  # checked before any work
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mlruns)])


def test_a_full_disk_stops_the_sweep_saying_what_is_kept(tiny_cfg, monkeypatch):
    import optuna

    from sweeper.loop.study import run_study
    from sweeper.settings.errors import DiskFull
    from sweeper.train import checkpoints

    def full(*args, **kwargs):  # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 "
                           "vs 1430")

    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(DiskFull) as e:
        run_study(tiny_cfg)
    message = str(e.value)  # before: the RuntimeError alone, exit 1
    assert message.startswith("the disk is full: writing ") and "trial-000.pt failed" in message
    assert "Kept: 0/2 finished trials in sqlite:///" in message
    assert "1 running trial(s) queued to run again" in message and "\n" not in message
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "WAITING"]
    client = MlflowClient(tiny_cfg.tracking.uri)
    statuses = {r.info.run_name: r.info.status for r in client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id])}
    assert statuses == {"tiny": "FAILED", "trial-000": "FAILED"}  # nothing left RUNNING
    monkeypatch.undo()
    assert len(run_study(tiny_cfg).trials) == 3  # resumed: the failed trial ran again


@pytest.mark.slow
def test_a_full_checkpoint_disk_is_one_line(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        line = one_error_line(sweep(tmp_path, *ONE_TRIAL, f"search.checkpoint_dir={small}"))
        assert line.startswith("sweeper: error: the disk is full: writing ")
        assert "Kept: 0/1 finished trials" in line
    finally:
        subprocess.run(["umount", str(small)])


def test_a_resume_at_another_precision_names_the_studys_precision(tiny_cfg):
    from sweeper.loop.study import run_study
    from sweeper.settings.errors import UserError

    tiny_cfg.search.n_trials, tiny_cfg.trainer.max_epochs = 1, 1
    run_study(tiny_cfg)
    tiny_cfg.trainer.precision = "bf16"
    with pytest.raises(UserError, match=r'trainer\.precision \(study "32", this run "bf16"\)'):
        run_study(tiny_cfg)  # before: (study null, ...)


@pytest.mark.slow
def test_sigterm_during_a_population_names_the_members_it_failed(tmp_path):
    import signal

    from tests.test_faults import SLOW_SMOKE, Sweep, wait_until_training

    run = Sweep(tmp_path, *SLOW_SMOKE, "search.population=2")
    wait_until_training(tmp_path, 0, timeout=300)
    assert run.stop(signal.SIGTERM) == 130
    assert "interrupted: 0/3 trials finished and saved; 2 running trial(s) marked failed, to " \
        "run again first" in "".join(run.output)


def test_a_damaged_exported_model_is_one_line(tmp_path):
    from PIL import Image

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt2").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 40)
    Image.new("L", (60, 60), 255).save(tmp_path / "x.png")
    result = subprocess.run([sys.executable, "-m", "sweeper.predict", "--model", "m", "x.png"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    # before: 13 lines of torch's logged traceback first
    line = one_error_line(result)
    assert "model.pt2: not a loadable exported model" in line
