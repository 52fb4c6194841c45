"""The import graph (read by scripts/import_layers.py from the source): no circles among the
packages' modules, lightning_modules never imports sweeper, and the report runs without the
training stack (issue 29)."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_layers", REPO / "scripts/import_layers.py")
assert spec is not None and spec.loader is not None
layers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layers)


def test_no_import_circles() -> None:
    edges = layers.graph(REPO)
    # The reader sees imports inside functions too (this one closed a circle before).
    assert "sweeper.settings.sweep_grammar" in edges["sweeper.settings.config"]
    assert layers.circles(edges) == []  # before: config <-> sweep_grammar


def test_lightning_modules_never_import_sweeper() -> None:
    edges = layers.graph(REPO)
    assert any(m.startswith("lightning_modules.") for m in edges)
    up = sorted((a, b) for a, out in edges.items() if a.startswith("lightning_modules")
                for b in out if b.startswith("sweeper"))
    assert up == []


def test_every_import_goes_down_the_folders() -> None:
    """sweeper/'s folders are layers (scripts/import_layers.py LAYERS): a module imports its own
    folder and lower ones, never a higher one; every module has a folder or is a command."""
    edges = layers.graph(REPO)
    placed = {m: layers.layer_of(m) for m in edges}
    assert [m for m, i in placed.items() if i is None] == []
    assert placed["sweeper.settings.config"] < placed["sweeper.record.ledger"] < placed[
        "sweeper.train.training"] < placed["sweeper.analysis.report"] < placed[
        "sweeper.loop.study"] < placed["sweeper.best_model.export"] == placed[
        "sweeper.best_model.predict"] < placed["sweeper.report"] == placed["sweeper.__main__"]
    assert layers.upward(edges, set(edges)) == []
    # and the check can fail: an edge from the record up to the study loop is caught
    edges["sweeper.record.ledger"] = edges["sweeper.record.ledger"] | {"sweeper.loop.study"}
    assert layers.upward(edges, set(edges)) == [("sweeper.record.ledger", "sweeper.loop.study")]


def test_the_report_reaches_no_training_module_and_no_torch_import() -> None:
    """Fast twin of test_the_report_runs_without_torch: what `python -m sweeper.report` can
    import, read from the source (imports inside functions too)."""
    import ast

    edges = layers.graph(REPO)
    reached = layers.reachable(edges, "sweeper.report")
    assert "sweeper.analysis.report" in reached
    assert not [m for m in reached if m.startswith(("sweeper.train", "sweeper.loop"))]
    heavy = []
    for m in sorted(reached):
        for node in ast.walk(ast.parse(layers.modules(REPO)[m].read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            heavy += [(m, n) for n in names if n.partition(".")[0] in (
                "torch", "torchvision", "lightning", "pytorch_lightning")]
    assert heavy == []


def test_the_reader_finds_circles_and_relative_imports(tmp_path) -> None:
    pkg = tmp_path / "sweeper"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from sweeper.c import x\n")
    (pkg / "c.py").write_text("import sweeper.a\nx = 1\n")
    (tmp_path / "lightning_modules").mkdir()
    edges = layers.graph(tmp_path)
    assert edges["sweeper.a"] == {"sweeper.b"} and edges["sweeper.b"] == {"sweeper.c"}
    assert layers.circles(edges) == [["sweeper.a", "sweeper.b", "sweeper.c"]]
    assert layers.reachable(edges, "sweeper.b") == {"sweeper.a", "sweeper.b", "sweeper.c"}


NO_TORCH = """
import importlib.abc, runpy, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('torch', 'torchvision', 'lightning', 'lightning_fabric',
                                      'pytorch_lightning'):
            raise ModuleNotFoundError(f'{name}: not importable in this test', name=name)
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ['sweeper.report', *sys.argv[1:]]
runpy.run_module('sweeper.report', run_name='__main__')
"""


def finished_study(tmp_path: Path) -> tuple[str, str]:
    """A finished study as sweeps leave it (trials with their metrics, a seed repeat, MLflow
    runs with curves), written directly: no training."""
    import optuna

    from lightning_modules.metrics import EPOCHS_RUN, GAP, TRAIN_ACC, VAL_ACC
    from sweeper.record import repeat_records
    from sweeper.record.tracking import Tracker
    from sweeper.settings import keys

    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    tracker = Tracker(tracking, None, "s")
    parent = tracker.open_parent({keys.SAMPLER_PARAM: "tpe", keys.PRUNER_PARAM: "none"}, {})
    dists = {"depth": optuna.distributions.IntDistribution(1, 3),
             "width": optuna.distributions.IntDistribution(16, 1024, log=True),
             "dropout": optuna.distributions.FloatDistribution(0.0, 0.5)}
    for i in range(16):
        depth, width, dropout = 1 + i % 3, 16 * 2 ** (i % 7), 0.05 * (i % 5)
        n_params = 784 * width + (depth - 1) * width * width + 10 * width
        val = 0.90 + 0.01 * math.log2(width / 16) - 0.02 * dropout + 0.002 * (i % 2)
        run_id = tracker.start_trial(parent, i, {}, {})
        for epoch in (1, 2):
            tracker.log_metrics(run_id, {TRAIN_ACC: val + 0.01 * epoch, VAL_ACC: val}, epoch)
        tracker.end_trial(run_id, "COMPLETE", {})
        study.add_trial(optuna.trial.create_trial(
            params={"depth": depth, "width": width, "dropout": dropout}, distributions=dists,
            value=val, user_attrs={keys.N_PARAMS: n_params, TRAIN_ACC: val + 0.02,
                                   VAL_ACC: val, GAP: 0.02, EPOCHS_RUN: 2,
                                   keys.MLFLOW_RUN_ID: run_id,
                                   keys.RECIPE: {"model": {}, "trainer": {"lr": 1e-3}}}))
    study.set_user_attr(repeat_records.key(15, 1), {keys.SEED: 1, TRAIN_ACC: 0.99,
                                                    VAL_ACC: 0.96, GAP: 0.03})
    return storage, tracking


@pytest.mark.slow
def test_the_report_runs_without_torch(tmp_path) -> None:
    """`python -m sweeper.report` is analysis: torch and Lightning unimportable, it still
    reports (before: report imported repeats, which imports torch, population, training)."""
    storage, tracking = finished_study(tmp_path)
    out = subprocess.run([sys.executable, "-c", NO_TORCH, "--study", "s", "--storage", storage,
                          "--tracking-uri", tracking, "--out", str(tmp_path / "report")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "report" / "report.md").is_file()
    assert "(2 seeds)" in out.stdout  # the seed repeat was read
