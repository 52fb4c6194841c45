"""The generalization report: statistics, verdict, files, and seed repeats."""

import re

import numpy as np
import optuna
import pytest
import scipy.stats
from mlflow import MlflowClient
from optuna.trial import TrialState

from lightning_modules.metrics import GAP, VAL_ACC
from sweeper.analysis import report, stats
from sweeper.analysis.report import main as report_main
from sweeper.loop import repeats
from sweeper.loop.study import run_study
from sweeper.record import repeat_records
from sweeper.settings.keys import REPEAT_TAG, ROLE_TAG, TRIAL_TAG

FILES = {"report.md", "gap_vs_params.png", "val_vs_params.png", "gap_vs_dropout.png",
         "heatmap_val.png", "heatmap_gap.png", "learning_curves.png", "importance_val.png",
         "importance_gap.png", "pareto_size.png"}


def test_spearman_matches_a_hand_computed_value():
    # d = rank differences (-1, 1, -1, 1, 0): rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8
    rho = stats.spearman(np.array([1, 2, 3, 4, 5]), np.array([2, 1, 4, 3, 5]))
    assert rho == pytest.approx(0.8)
    assert np.isnan(stats.spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))
    # The bootstrap's vectorized statistic is spearmanr on every resample (ties included).
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, size=(50, 9)), rng.integers(0, 5, size=(50, 9))
    want = [scipy.stats.spearmanr(a, b).statistic for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(stats._spearman_rows(x, y), want, atol=1e-12)


def test_bootstrap_interval_says_when_a_trend_is_clear():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=30)
    clear = stats.correlation(x, 2 * x + 0.05 * rng.normal(size=30))
    assert clear.low <= clear.rho <= clear.high and clear.sign == 1 and clear.n == 30
    assert stats.correlation(x, -x).sign == -1
    v = stats.correlation(x, np.abs(x - np.median(x)))  # a V: no monotone trend
    assert abs(v.rho) < 0.3 and v.sign == 0


def rows(val_trend: float, gap_trend: float, n: int = 12) -> list[report.Row]:
    sizes = np.geomspace(1e4, 1e6, n).astype(int)
    out = []
    for i, size in enumerate(sizes):
        val = 0.97 + val_trend * i / n + 0.0001 * (i % 3)
        gap = 0.01 + gap_trend * i / n
        out.append(report.Row(i, "COMPLETE", 1 + i % 3, 32 * (1 + i), 0.05 * (i % 4), 1e-3,
                              int(size), 5, val + gap, val, gap, sampler="qmc"))
    return out


def test_the_verdict_follows_the_numbers():
    # (train accuracy rises by 0.8 points: the small networks fitted their training data)
    up = report.analyse("s", rows(+0.005, +0.003), {}, 0)
    assert up.verdict.startswith("**Yes, bigger networks generalized better**")
    assert "gap grew with size" in up.verdict and up.effect_val.verdict == "bigger"
    assert up.effect_val.estimate == pytest.approx(100 * 0.005 * 11 / 12, abs=0.1)
    down = report.analyse("s", rows(-0.02, -0.01), {}, 0)
    assert down.verdict.startswith("**No, bigger networks generalized worse**")
    assert "gap shrank with size" in down.verdict
    assert "Not enough" in report.analyse("s", rows(0.02, 0.01, n=2), {}, 0).verdict
    assert "Not monotone" not in up.verdict
    dipped = rows(+0.02, +0.01)
    for r, v in zip(dipped[3:6], (0.95, 0.94, 0.95), strict=True):
        r.val_acc = v  # falls >= 1 point below the peak, then recovers above it
    # Where other settings vary too, their effects make dips: only a pure size ladder tells.
    assert "Not monotone" not in report.analyse("s", dipped, {}, 0).verdict
    for r in dipped:
        r.depth, r.dropout = 1, 0.0
    assert "Not monotone: validation accuracy falls from" in report.analyse(
        "s", dipped, {}, 0).verdict


def test_report_and_seed_repeats_on_a_small_study(tiny_cfg, tmp_path):
    tiny_cfg.search.n_trials, tiny_cfg.search.pruner = 4, "none"
    tiny_cfg.trainer.max_epochs = 2
    tiny_cfg.search.space["depth"].high = 3
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k, tiny_cfg.confirm.ladder = 3, 1, 2
    study = run_study(tiny_cfg)
    chosen = repeats.choose(study, 1, 2)
    assert 2 <= len(chosen) <= 3

    # Repeats: seeds-1 child runs per chosen configuration, their metrics stored on the study.
    client = MlflowClient(tiny_cfg.tracking.uri)
    exp = client.get_experiment_by_name("tiny")
    reps = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(ROLE_TAG) == "repeat"]
    assert len(reps) == 2 * len(chosen)
    seeds = repeat_records.results(study)
    assert sorted(seeds) == sorted(t.number for t in chosen)
    for r in reps:
        number, k = int(r.data.tags[TRIAL_TAG]), int(r.data.tags[REPEAT_TAG])
        stored = next(s for s in seeds[number] if s["seed"] == k)
        assert stored[VAL_ACC] == pytest.approx(r.data.metrics[VAL_ACC])
    # Running again does not repeat the repeats.
    run_study(tiny_cfg)
    assert len([r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get(ROLE_TAG) == "repeat"]) == len(reps)

    out = tmp_path / "report"
    rep = report.build("tiny", tiny_cfg.search.storage, tiny_cfg.tracking.uri, out)
    assert {p.name for p in out.iterdir()} >= FILES
    complete = {t.number: t for t in study.trials if t.state == TrialState.COMPLETE}
    assert {r.number for r in rep.rows} == set(complete)
    md = (out / "report.md").read_text()
    for r in rep.rows:
        t = complete[r.number]
        assert r.val_acc == t.user_attrs[VAL_ACC] and r.n_params == t.user_attrs["n_params"]
        if r.number in seeds:  # the table shows mean ± std over the seeds
            vals = [s[VAL_ACC] for s in seeds[r.number]]
            want = f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals, ddof=1):.2f} (3 seeds)"
            assert want in md
        else:
            assert re.search(rf"\| {r.number} \|.*\| {100 * r.val_acc:.2f} \|", md)
    gaps = [np.mean([s[GAP] for s in seeds[r.number]]) if r.number in seeds else r.gap
            for r in rep.rows]
    assert rep.size_gap.rho == pytest.approx(
        stats.spearman(np.array([r.n_params for r in rep.rows]), np.array(gaps)))
    # Also stored on the study's parent run.
    parent = report.parent_run(tiny_cfg.tracking.uri, "tiny")
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged and "report/gap_vs_params.png" in logged


def test_report_cli_errors_are_one_line(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    optuna.create_study(study_name="other", storage=storage)
    assert report.main(["--study", "missing", "--storage", storage, "--no-mlflow",
                        "--out", str(tmp_path / "r")]) == 2
    assert "no study 'missing'" in capsys.readouterr().err


def test_a_missing_store_or_a_bad_margin_is_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                          capsys):
    # Before: an empty typo.db, mlruns/optuna.db and mlruns/reports/nope/ were made, then "no
    # study"; --margin 0 or nan ended in a ZeroDivisionError or ValueError traceback.
    monkeypatch.chdir(tmp_path)
    assert report_main(["--study", "nope", "--storage", "sqlite:///typo.db"]) == 2
    assert "--storage sqlite:///typo.db: no such file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    for margin in ("0", "nan", "-1"):
        assert report_main(["--study", "nope", "--margin", margin]) == 2
        assert f"--margin {float(margin)}: give a number of points > 0" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_report_command_a_sweep_prints_finds_its_mlflow_store(tiny_cfg, tmp_path):
    """A sweep that moved only its Optuna store keeps MLflow in mlruns/mlflow.db: the printed
    `python -m sweeper.report --study X --storage ...` must find it there (the mlflow.db
    beside the Optuna store is looked for first, and is not there)."""
    (tmp_path / "runs").mkdir()
    tiny_cfg.search.storage = f"sqlite:///{tmp_path}/runs/optuna.db"
    tiny_cfg.tracking.uri = "sqlite:///mlruns/mlflow.db"  # the default, in the working folder
    tiny_cfg.search.checkpoint_dir = str(tmp_path / "ckpt")
    run_study(tiny_cfg)
    assert report_main(["--study", "tiny", "--storage", tiny_cfg.search.storage,
                        "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
