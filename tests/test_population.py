"""search.population: trials of one shape trained together train exactly as they would alone."""

import dataclasses
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from lightning_modules.metrics import EPOCH_METRICS, VAL_ACC
from lightning_modules.models import Architecture
from sweeper import checkpoints, data, keys, population, training
from sweeper.config import Config, DataConfig, ParamSpec
from sweeper.keys import ROLE_TAG
from sweeper.study import run_study


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return data.make_splits(data.load(DataConfig(name="mnist_sample")), 1000, 0,
                            torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_member_trains_exactly_as_its_solo_trial(splits, optimizer):
    base = training.TrialSpec(arch=Architecture("mlp", (32, 32), 0.1), optimizer=optimizer,
                              lr_schedule="cosine", lr=1e-3, weight_decay=0.0, batch_size=64,
                              eval_batch_size=500, steps_per_execution=8, max_epochs=2, seed=5)
    # Own seed, lr, weight decay and dropout per member (one without dropout).
    specs = [dataclasses.replace(base, seed=5 + i, lr=1e-3 * (i + 1),
                                 weight_decay=[0, 1e-4, 0, 1e-3][i],
                                 arch=Architecture("mlp", (32, 32), [0.1, 0.0, 0.3, 0.2][i]))
             for i in range(4)]
    pop = population.build_population(specs, splits)
    # Member 1 stops after epoch 1 (as if pruned): the others must not notice.
    population.fit_population(pop, specs, splits, lambda epoch, m: {1} if epoch == 1 else set())
    assert [len(h) for h in pop.history] == [2, 1, 2, 2]
    assert pop.active == [0, 2, 3]
    for i, spec in enumerate(specs):
        solo = training.build(spec, splits)
        training.fit(solo, spec, splits, lambda epoch, m: False)
        for ep, member in enumerate(pop.history[i]):
            for k in EPOCH_METRICS:
                assert member[k] == pytest.approx(solo.history[ep][k], abs=1e-6), (i, ep, k)
        if i != 1:  # weights of a member still training come out as a plain MLP
            net = population.member_net(pop, i, spec, splits)
            for (k, a), b in zip(net.state_dict().items(), solo.net.state_dict().values(),
                                 strict=True):
                assert torch.allclose(a, b, atol=1e-5), k
    assert pop.history[0] != pop.history[2]  # members really differ


def test_population_study_end_to_end(tiny_cfg: Config, tmp_path: Path, splits):
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 3, 5
    tiny_cfg.search.pruner = "none"
    tiny_cfg.search.space["dropout"] = ParamSpec("float", low=0.0, high=0.5)
    tiny_cfg.search.space["lr"] = ParamSpec("float", low=1e-4, high=3e-3, log=True)
    study = run_study(tiny_cfg)
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 5
    # Two populations (3 + 2): members share the architecture, not the rest.
    assert [t.user_attrs["population"] for t in trials] == [3, 3, 3, 2, 2]
    for group in (trials[:3], trials[3:]):
        assert len({(t.params["depth"], t.params["width"]) for t in group}) == 1
        assert len({t.params["lr"] for t in group}) == len(group)
    client = MlflowClient(tiny_cfg.tracking.uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(runs) == 5
    for run in runs:
        assert run.data.params["population"] in ("2", "3")
        assert len(client.get_metric_history(run.info.run_id, VAL_ACC)) == 2
    # A member's kept weights reproduce its recorded validation accuracy.
    best = study.best_trial
    net, _ = checkpoints.load(Path(best.user_attrs[keys.CHECKPOINT]))
    with torch.no_grad():
        acc = (net(splits.x_val).argmax(1) == splits.y_val).double().mean().item()
    assert acc == pytest.approx(best.user_attrs[VAL_ACC], abs=1e-9)


def test_grid_population_is_bucketed_by_shape(tiny_cfg: Config):
    tiny_cfg.search.sampler, tiny_cfg.search.pruner = "grid", "none"
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 4, 4
    tiny_cfg.search.space = {"width": ParamSpec("int", low=16, high=32, step=16),
                             "dropout": ParamSpec("float", low=0.0, high=0.2, step=0.2)}
    study = run_study(tiny_cfg)
    points = sorted((t.params["width"], t.params["dropout"]) for t in study.trials)
    assert points == [(16, 0.0), (16, 0.2), (32, 0.0), (32, 0.2)]  # each grid point once
    assert [t.user_attrs["population"] for t in study.trials] == [2, 2, 2, 2]


def test_population_is_for_mlps_only():
    from sweeper.config import validate
    from sweeper.errors import UserError

    cfg = Config()
    cfg.search.space = {"width": ParamSpec("int", low=16, high=32)}
    cfg.search.population = 0
    with pytest.raises(UserError, match=r"search.population=0 must be >= 1"):
        validate(cfg)
    cfg.search.population, cfg.model.family = 4, "cnn"
    with pytest.raises(UserError, match=r"works for model=mlp without augmentation"):
        validate(cfg)
