"""Faults, round three (issue 31): bounded memory for every input, no record left RUNNING, one
line for every refusal. Timing windows are reached through sweeper.faultpoints, never sleeps."""

import os
import socket
import subprocess

import pytest
from mlflow import MlflowClient

from sweeper import stores
from tests.test_faults_round2 import ONE_TRIAL, _export
from tests.test_study import sweep


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
