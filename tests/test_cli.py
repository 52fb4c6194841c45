"""Bad input at the command line: one clear line, non-zero exit, never a traceback."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.cli import refusal
from tests.test_study import REPO, sweep


@pytest.mark.parametrize("overrides, message", [
    (["+experiment=smoke", "search.n_trials=0"], "search.n_trials=0 must be >= 1"),
    (["+experiment=smoke", "search.sampler=bayes"], "search.sampler='bayes' is not one of"),
    (["+experiment=smoke", "model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["+experiment=smoke", "search.space.depth.low=0"], "depth must be an integer >= 1"),
    (["+experiment=smoke", "search.space.width.low=500"], "empty range"),
    (["+experiment=smoke", "trainer.max_epochs=two"], "trainer.max_epochs"),
    (["+experiment=smoke", "data=mnist", "data.root=/nonexistent/mnist"],
     "no MNIST IDX files in /nonexistent/mnist"),
    (["+experiment=smoke", "data=kaggle"], "data=kaggle needs data.train_csv=PATH"),
    (["+experiment=smoke", "data=kaggle", "data.train_csv=/nonexistent/train.csv"],
     "/nonexistent/train.csv: file not found"),
    (["+experiment=smoke", "data=cifar10"], "cifar10"),
    # before: Optuna's ValueError after the study was made, and a second start then went on
    (["+experiment=smoke", "seed=-5"], "seed=-5 must be an integer from 0 to 4294967295"),
    (["+experiment=smoke", "seed=4294967296"], "seed=4294967296 must be an integer from 0"),
])
def test_bad_values_fail_with_one_line(tmp_path, overrides, message):
    assert message in refusal(tmp_path, *overrides)
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # refused before any store


def test_a_refusal_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    result = sweep(tmp_path, "+experiment=smoke", "data=mnist", "data.root=/nonexistent/mnist")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sweeper: error: "), result.stderr
    assert "no MNIST IDX files in /nonexistent/mnist" in lines[0]
    assert not (tmp_path / "mlruns").exists()  # Hydra's run folder removed with the refusal


def test_debug_shows_the_traceback(tmp_path):
    result = sweep(tmp_path, "+experiment=smoke", "search.n_trials=0", "debug=true")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pty")
def test_live_indicator_on_a_terminal(tmp_path):
    # `script` runs the sweep on a pseudo-terminal, where the per-epoch indicator is shown.
    env = {**os.environ, "SWEEPER_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = f"{sys.executable} -m sweeper +experiment=smoke search.n_trials=1"
    out = subprocess.run(["script", "-qec", cmd, "/dev/null"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300).stdout
    assert "trial 0: epoch 1/2" in out and "trial 0: epoch 2/2" in out
    assert "[1/1] trial   0" in out


@pytest.mark.slow
def test_default_data_on_an_offline_machine_falls_back_and_runs(tmp_path):
    # What `make run` does on a fresh offline machine: data=mnist, nothing cached, no network.
    result = sweep(tmp_path, "+experiment=smoke", "data=mnist", "search.n_trials=1",
                   SWEEPER_CACHE=str(tmp_path / "cache"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    assert result.returncode == 0, result.stderr
    # No library log lines (before: matplotlib's font-cache INFO line on a first run).
    logs = [ln for ln in (result.stdout + result.stderr).splitlines()
            if re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[", ln)]
    assert not logs, logs
    assert "EMBEDDED 5,000-IMAGE SAMPLE" in result.stderr
    assert "(fallback: full MNIST unavailable): 4,000 train / 1,000 val" in result.stdout
