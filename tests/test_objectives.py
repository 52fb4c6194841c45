"""Multi-objective studies (a Pareto front instead of one best trial), and what every run ends
with: the next commands and the study's summary on its parent run."""

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.analysis import console, report
from sweeper.best_model import export
from sweeper.loop.study import run_study
from sweeper.settings import keys, objectives
from sweeper.settings.config import validate
from sweeper.settings.errors import UserError
from tests.conftest import make_tiny_cfg
from tests.test_study import runs


@pytest.fixture(scope="module")
def front_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mo")
    cfg = make_tiny_cfg(tmp)
    cfg.search.study_name = "mo"
    cfg.search.n_trials = 4
    cfg.search.keep_top_k = 0  # the front's weights are kept all the same
    cfg.search.pruner, cfg.search.pruner_startup_trials, cfg.search.pruner_warmup_epochs = (
        "median", 0, 0)  # would prune at once in a single-objective study
    cfg.search.objectives = {"val_acc": "maximize", "n_params": "minimize"}
    validate(cfg)
    study = run_study(cfg)
    return cfg, study, tmp


def test_multi_objective_study_trains_every_trial_to_the_end(front_study):
    cfg, study, _ = front_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4  # no pruning
    assert all(t.user_attrs["epochs_run"] == cfg.trainer.max_epochs for t in study.trials)
    for t in study.trials:
        assert t.values == [t.user_attrs["val_acc"], t.user_attrs[keys.N_PARAMS]]
    assert study.user_attrs[keys.OBJECTIVES] == ["val_acc", "n_params"]


def test_front_is_pareto_optimal_and_keeps_its_weights(front_study):
    _, study, _ = front_study
    front = objectives.front(study)
    numbers = {t.number for t in front}
    assert front
    for t in study.trials:
        dominated = any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1]
                        and o.values != t.values for o in study.trials)
        assert (t.number in numbers) == (not dominated)
    kept = {t.number for t in study.trials if keys.CHECKPOINT in t.user_attrs
            and Path(t.user_attrs[keys.CHECKPOINT]).exists()}
    assert kept == numbers


@pytest.mark.slow
def test_table_shows_the_front_and_export_needs_a_point_of_it(front_study, capsys):
    cfg, study, tmp = front_study
    out = console.best_table(study)
    assert "Pareto front (" in out and "val_acc (maximize), n_params (minimize)" in out
    args = ["--study", "mo", "--storage", cfg.search.storage, "--tracking-uri",
            cfg.tracking.uri]
    assert export.main([*args, "--out", str(tmp / "none")]) == 2
    err = capsys.readouterr().err
    assert "choose one of its Pareto front with --trial N" in err
    for t in objectives.front(study):
        assert f"trial {t.number}: val_acc" in err
    pick = objectives.front(study)[-1]
    assert export.main([*args, "--trial", str(pick.number), "--out", str(tmp / "out")]) == 0
    meta = json.loads((tmp / "out" / "model.json").read_text())
    assert meta["trial"] == pick.number
    assert meta["objective"] == {"val_acc": pick.values[0], "n_params": pick.values[1]}


def test_report_draws_the_front(front_study):
    cfg, study, tmp = front_study
    rep_dir = tmp / "report"
    report.build("mo", cfg.search.storage, None, rep_dir)
    assert (rep_dir / "pareto_front.png").stat().st_size > 0
    assert (rep_dir / "pareto_size.png").stat().st_size > 0
    front = ", ".join(str(t.number) for t in sorted(objectives.front(study),
                                                     key=lambda t: t.values[0]))
    assert f"trials {front}" in (rep_dir / "report.md").read_text()


def test_parent_run_says_how_a_multi_objective_study_went(front_study):
    cfg, study, _ = front_study
    _, parents, _ = runs(cfg.tracking.uri, "mo")
    p = parents[0].data
    assert p.metrics["trials_complete"] == 4 and p.metrics["trials_fail"] == 0
    assert p.metrics[keys.FRONT_SIZE] == len(objectives.front(study))
    assert p.tags[keys.FRONT_TAG] == " ".join(str(t.number) for t in objectives.front(study))


def test_single_objective_run_ends_with_next_commands_and_a_summary(tiny_cfg, capsys):
    study = run_study(tiny_cfg)
    out = capsys.readouterr().out
    tail = out[out.index("\nnext:"):]
    storage, uri = tiny_cfg.search.storage, tiny_cfg.tracking.uri
    assert f"python -m sweeper.report --study tiny --storage {storage} --tracking-uri {uri}" in tail
    assert f"python -m sweeper.export --study tiny --out export/tiny --storage {storage}" in tail
    assert f"mlflow ui --backend-store-uri {uri}" in tail
    _, parents, _ = runs(uri, "tiny")
    p = parents[0].data
    best = max(study.trials, key=lambda t: t.value)
    assert p.metrics[keys.BEST_OBJECTIVE] == pytest.approx(best.value)
    assert p.metrics["trials_complete"] == 2
    assert p.tags[keys.BEST_TRIAL_TAG] == str(best.number)
    assert p.tags[f"{keys.BEST_PARAM_TAG}.depth"] == str(best.params["depth"])


def test_kaggle_study_is_told_to_export_with_its_test_csv(tiny_cfg):
    tiny_cfg.data.name, tiny_cfg.data.test_csv = "kaggle", "/data/test.csv"
    for study in (optuna.create_study(), optuna.create_study(directions=["maximize"] * 2)):
        assert "--kaggle-test /data/test.csv" in console.next_steps(tiny_cfg, study)


@pytest.mark.parametrize("objs, message", [
    ({"val_acc": "maximize"}, "list two or more"),
    ({"val_acc": "maximize", "loss": "minimize"}, "'loss' is not one of"),
    ({"val_acc": "up", "n_params": "minimize"}, "search.objectives.val_acc='up'"),
])
def test_bad_objectives_are_refused(tiny_cfg, objs, message):
    tiny_cfg.search.objectives = objs
    with pytest.raises(UserError, match=message):
        validate(tiny_cfg)


def test_cmaes_cannot_do_several_objectives(tiny_cfg):
    tiny_cfg.search.objectives = {"val_acc": "maximize", "gap": "minimize"}
    tiny_cfg.search.sampler = "cmaes"
    with pytest.raises(UserError, match="cmaes cannot optimize several objectives"):
        validate(tiny_cfg)


def test_reordered_objectives_are_refused_and_the_run_says_pruning_is_off(tiny_cfg, capsys):
    tiny_cfg.search.n_trials, tiny_cfg.trainer.max_epochs = 1, 1
    tiny_cfg.search.objectives = {"gap": "minimize", "n_params": "minimize"}
    run_study(tiny_cfg)
    assert "no pruning (Optuna cannot prune multi-objective trials)" in capsys.readouterr().out
    # Same directions, other order: the values would be told to the wrong objectives.
    tiny_cfg.search.objectives = {"n_params": "minimize", "gap": "minimize"}
    with pytest.raises(UserError, match=r"search\.objectives"):
        run_study(tiny_cfg)
    tiny_cfg.search.objectives = {"val_acc": "maximize", "gap": "minimize"}
    with pytest.raises(UserError, match=r"optimizes gap \(minimize\), n_params \(minimize\); "
                       r"this run asks for val_acc \(maximize\), gap \(minimize\)"):
        run_study(tiny_cfg)


def test_adding_objectives_to_a_single_objective_study_is_refused(tiny_cfg):
    tiny_cfg.search.n_trials = 1
    run_study(tiny_cfg)
    tiny_cfg.search.objectives = {"val_acc": "maximize", "n_params": "minimize"}
    with pytest.raises(UserError, match=r"optimizes val_acc \(maximize\); this run asks for "
                       r"val_acc \(maximize\), n_params \(minimize\)"):
        run_study(tiny_cfg)


def test_objective_best_takes_every_objective_from_the_best_epoch():
    """search.objective=best: val_acc, train_acc and the gap of one epoch, the best (before:
    the best epoch's val_acc beside the last epoch's train_acc and gap)."""
    from sweeper.settings.config import Config

    history = [{"val_acc": 0.90, "train_acc": 0.91, "gap": 0.01},
               {"val_acc": 0.95, "train_acc": 0.97, "gap": 0.02},
               {"val_acc": 0.94, "train_acc": 0.99, "gap": 0.05}]
    cfg = Config()
    cfg.search.objectives = {"val_acc": "maximize", "gap": "minimize",
                             "train_acc": "maximize", "n_params": "minimize"}
    cfg.search.objective = "best"
    assert objectives.values(cfg, history, 7) == [0.95, 0.02, 0.97, 7]
    cfg.search.objective = "final"
    assert objectives.values(cfg, history, 7) == [0.94, 0.05, 0.99, 7]
    cfg.search.objectives = {}
    assert objectives.values(cfg, history, 7) == [0.94]
    cfg.search.objective = "best"
    assert objectives.values(cfg, history, 7) == [0.95]
