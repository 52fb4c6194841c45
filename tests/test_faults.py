"""Faults: Ctrl-C, SIGTERM and kill -9 mid-trial, divergence, a crashing trial, determinism.
After each, the stores hold every finished trial exactly once and the sweep resumes to the
exact budget."""

import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lightning_modules.metrics import VAL_ACC
from sweeper.loop.study import run_study
from sweeper.settings import keys
from sweeper.settings.errors import UserError
from sweeper.settings.keys import ERROR_TAG, STATE_TAG, TRIAL_TAG
from sweeper.train import training
from tests.test_study import REPO, runs, sweep

# ~0.1 s epochs on the embedded sample: each trial runs for a few seconds.
SLOW_SMOKE = ["+experiment=smoke", "search.n_trials=3", "trainer.max_epochs=25",
              "search.pruner=none"]


class Sweep:
    """A sweep in a child process whose output lines we can wait for."""

    def __init__(self, cwd: Path, *overrides: str, prefix: tuple[str, ...] = (),
                 **extra_env: str):
        # faulthandler: a child that hangs is sent SIGABRT and prints every thread's stack
        env = {**os.environ, "SWEEPER_OFFLINE": "1", "PYTHONPATH": str(REPO),
               "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **extra_env}
        cmd = [*prefix, sys.executable, "-m", "sweeper", *overrides]
        self.proc = subprocess.Popen(cmd, cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if text in self.lines.get(timeout=1):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"never saw {text!r}:\n{''.join(self.output)}")

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # the stacks of where it hangs, then gone
            self.proc.wait(timeout=30)
            self.reader.join(timeout=10)
            raise AssertionError(f"no exit within 30 s of signal {sig}; its output and "
                                 f"stacks:\n{''.join(self.output)}") from None
        self.seconds_to_exit = time.monotonic() - t0
        return rc


def wait_until_training(tmp_path: Path, number: int, timeout: float = 60) -> None:
    """Until trial `number` has logged its first epoch to MLflow: it is mid-training (the
    smoke trials here run 25 epochs; with search.pruner=none nothing is reported to Optuna).
    Polls the stores' state; no fixed sleep."""
    wait_for_state(lambda: _reported(tmp_path, number), f"trial {number} never trained",
                   timeout)


def _reported(tmp_path: Path, number: int) -> bool:
    try:
        trials = load(tmp_path).trials
        run_id = trials[number].user_attrs.get(keys.MLFLOW_RUN_ID) if len(trials) > number \
            else None
        if run_id is None:
            return False
        return VAL_ACC in MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_run(
            run_id).data.metrics
    except Exception:  # the stores are being created or written
        return False


def wait_for_state(ready, what: str, timeout: float = 60, poll: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > end:
            raise AssertionError(what)
        time.sleep(poll)


def load(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")


def check_resumed(tmp_path: Path, interrupted: int) -> None:
    """Resume to the full budget and check nothing was lost or counted twice."""
    result = sweep(tmp_path, *SLOW_SMOKE)
    assert result.returncode == 0, result.stdout + result.stderr
    study = load(tmp_path)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3  # exactly the budget
    assert states[interrupted] == TrialState.FAIL
    retry = next(t for t in study.trials if t.user_attrs.get(keys.RETRY_OF) == interrupted)
    assert retry.params == study.trials[interrupted].params and retry.state == TrialState.COMPLETE
    _, parents, children = runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    numbers = [int(c.data.tags[TRIAL_TAG]) for c in children]
    assert sorted(numbers) == list(range(len(study.trials)))  # one run per trial, no duplicate
    killed = [c for c in children if c.info.status == "KILLED"]
    assert [int(c.data.tags[TRIAL_TAG]) for c in killed] == [interrupted]
    assert all(c.info.status == "FINISHED" for c in children if c not in killed)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_trial_then_resume(tmp_path, sig):
    s = Sweep(tmp_path, *SLOW_SMOKE)
    s.wait_for("[1/3] trial")
    wait_until_training(tmp_path, 1)
    rc = s.stop(sig)
    out = "".join(s.output)
    assert rc == 130, out
    assert s.seconds_to_exit < 10
    assert "interrupted: 1/3 trials finished" in out and "Traceback" not in out
    study = load(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                               TrialState.WAITING]  # the retry, queued
    _, parents, children = runs(f"sqlite:///{tmp_path}/mlruns/mlflow.db", "smoke")
    assert parents[0].info.status == "KILLED"
    status = {c.data.tags[TRIAL_TAG]: c.info.status for c in children}
    assert status == {"0": "FINISHED", "1": "KILLED"}
    check_resumed(tmp_path, interrupted=1)


@pytest.mark.slow
def test_kill_9_mid_trial_then_resume(tmp_path):
    s = Sweep(tmp_path, *SLOW_SMOKE)
    s.wait_for("[1/3] trial")
    wait_until_training(tmp_path, 1)
    s.stop(signal.SIGKILL)
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    # The dead process's trial is detected at once (its pid is gone on this host).
    result = sweep(tmp_path, *SLOW_SMOKE)
    assert "trial 1 was left running by a process that died" in result.stdout
    check_resumed(tmp_path, interrupted=1)


def diverge_on_build(monkeypatch, call: int, steps: int) -> None:
    """The `call`-th network built (1 = the first) outputs NaN once it has taken `steps`
    optimizer steps (real divergence: NaN loss, NaN gradients, NaN weights)."""
    build, calls = training.build, []

    def poisoned(spec, splits):
        module = build(spec, splits)
        calls.append(spec)
        if len(calls) != call:
            return module

        def hook(_, args):
            if module.training and module.steps_done >= steps:
                return (args[0] * math.nan,)
            return None

        module.net.register_forward_pre_hook(hook)
        return module

    monkeypatch.setattr(training, "build", poisoned)


@pytest.mark.slow
def test_divergence_fails_the_trial_with_a_reason_and_the_sweep_goes_on(tiny_cfg, monkeypatch):
    tiny_cfg.search.n_trials = 2
    diverge_on_build(monkeypatch, call=1, steps=10)
    study = run_study(tiny_cfg)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].user_attrs["error"].startswith("diverged: train_loss=nan at epoch 1")
    _, _, children = runs(tiny_cfg.tracking.uri, "tiny")
    bad = next(c for c in children if c.data.tags[TRIAL_TAG] == "0")
    assert bad.info.status == "FAILED" and bad.data.tags[STATE_TAG] == "FAIL"
    assert "diverged" in bad.data.tags[ERROR_TAG]


@pytest.mark.slow
def test_consecutive_failures_stop_the_sweep(tiny_cfg, monkeypatch):
    tiny_cfg.search.max_consecutive_failures = 2

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(training, "fit", out_of_memory)
    with pytest.raises(UserError, match=r"2 trials failed in a row .*out of memory"):
        run_study(tiny_cfg)
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    _, parents, children = runs(tiny_cfg.tracking.uri, "tiny")
    assert parents[0].info.status == "FAILED"
    assert all(c.info.status == "FAILED" for c in children)


@pytest.mark.slow
def test_one_crashing_trial_does_not_stop_the_study(tiny_cfg, monkeypatch):
    fit, calls = training.fit, {"n": 0}

    def crash_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", crash_once)
    study = run_study(tiny_cfg)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                               TrialState.COMPLETE]
    assert study.trials[0].user_attrs["error"] == "RuntimeError: boom"


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_curves(tiny_cfg, tmp_path):
    curves = []
    for i in range(2):
        tiny_cfg.search.storage = f"sqlite:///{tmp_path}/o{i}.db"
        tiny_cfg.tracking.uri = f"sqlite:///{tmp_path}/m{i}.db"
        tiny_cfg.search.checkpoint_dir = str(tmp_path / f"ck{i}")
        run_study(tiny_cfg)
        client, _, children = runs(tiny_cfg.tracking.uri, "tiny")
        curves.append({(c.data.tags[TRIAL_TAG], name): [m.value for m in sorted(
            client.get_metric_history(c.info.run_id, name), key=lambda m: m.step)]
            for c in children for name in ("train_loss", "val_loss", "train_acc", "val_acc")})
    assert curves[0].keys() == curves[1].keys() and len(curves[0]) == 8
    for key, values in curves[0].items():
        assert len(values) == 2
        assert max(abs(a - b) for a, b in zip(values, curves[1][key], strict=True)) <= 1e-6, key


@pytest.mark.slow
def test_existing_study_that_minimizes_is_refused(tiny_cfg):
    optuna.create_study(study_name="tiny", storage=tiny_cfg.search.storage, direction="minimize")
    with pytest.raises(UserError, match="minimizes its objective"):
        run_study(tiny_cfg)
