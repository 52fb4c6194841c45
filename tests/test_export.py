"""Export: files that load without this project and agree with the trained model; Kaggle
submission format; MLflow registration; bounded checkpoints; refit."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from sweeper.best_model import export
from sweeper.loop.study import run_study
from sweeper.settings import keys
from sweeper.settings.config import Config, DataConfig, ParamSpec
from sweeper.train import checkpoints, data
from tests.test_kaggle import HEADER, write

STANDALONE = """
import sys, json, numpy as np
sys.modules["sweeper"] = None            # any import of the project now fails
sys.modules["lightning_modules"] = None
import torch, onnxruntime
out, x = sys.argv[1], np.load(sys.argv[2])
script = torch.export.load(out + "/model.pt2").module()(torch.from_numpy(x)).detach().numpy()
onnx = onnxruntime.InferenceSession(out + "/model.onnx").run(None, {"image": x})[0]
np.save(sys.argv[3], np.stack([script, onnx]))
"""


def sample_study(tmp: Path, name: str, seed: int, epochs: int, trials: int,
                 widest: int) -> Config:
    """A width search on the embedded sample, stores in tmp, no pruning."""
    cfg = Config(name=name, seed=seed)
    cfg.data = DataConfig(name="mnist_sample", val_size=1000)
    cfg.search.study_name = name
    cfg.search.storage = f"sqlite:///{tmp}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{tmp}/mlflow.db"
    cfg.trainer.max_epochs, cfg.search.n_trials, cfg.search.pruner = epochs, trials, "none"
    cfg.search.space = {"width": ParamSpec("int", low=16, high=widest, log=True)}
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = sample_study(tmp, "exp", seed=1, epochs=2, trials=3, widest=96)
    cfg.search.keep_top_k = 1
    study = run_study(cfg)
    images = data.load(DataConfig(name="mnist_sample")).images[:37]
    test_csv = write(tmp / "test.csv", HEADER, [list(map(int, im.ravel())) for im in images])
    rc = export.main(["--study", "exp", "--out", str(tmp / "out"), "--kaggle-test",
                      str(test_csv), "--storage", cfg.search.storage,
                      "--tracking-uri", cfg.tracking.uri])
    assert rc == 0
    # The model was recorded in the study's experiment: before, MLflow made it in "Default"
    # and kept a second copy under ./mlruns/0 of the folder the export ran in.
    assert not (Path.cwd() / "mlruns" / "0").exists()
    return tmp, study, cfg, images


def test_only_the_top_k_checkpoints_are_kept(exported):
    _tmp, study, cfg, _ = exported
    files = sorted(checkpoints.folder(cfg).glob("*.pt"))
    assert [f.name for f in files] == [f"trial-{study.best_trial.number:03d}.pt"]


def test_files_load_without_the_project_and_agree_with_it(exported):
    tmp, study, _, _ = exported
    out = tmp / "out"
    assert {p.name for p in out.iterdir()} >= {"model.pt2", "model.onnx", "model.json",
                                                "submission.csv", "predictions.png"}
    meta = json.loads((out / "model.json").read_text())
    assert meta["trial"] == study.best_trial.number and meta["params"] == study.best_params
    assert meta["input"]["shape"] == [-1, 1, 28, 28] and meta["data_source"].startswith(
        "mnist_sample")
    script, onnx = standalone_errors(study, out, tmp, 16)
    assert script < 1e-5 and onnx < 1e-5


def standalone_errors(study, out: Path, tmp: Path, n: int) -> tuple[float, float]:
    """Largest differences between the best trial's checkpoint (with normalization) and its
    exported model.pt2 / model.onnx, loaded in a process that cannot import the project."""
    net, ckpt = checkpoints.load(Path(study.best_trial.user_attrs[keys.CHECKPOINT]))
    model = export.Exported(net, ckpt["mean"], ckpt["std"]).eval()
    x = torch.rand(n, 1, 28, 28)
    script, onnx = standalone_outputs(out, tmp, x)
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(script - want).max()), float(np.abs(onnx - want).max())


def standalone_outputs(out: Path, tmp: Path, x: torch.Tensor) -> np.ndarray:
    """[model.pt2's, model.onnx's] outputs for x, computed in a process that cannot import the
    project."""
    np.save(tmp / "x.npy", x.numpy())
    subprocess.run([sys.executable, "-c", STANDALONE, str(out), str(tmp / "x.npy"),
                    str(tmp / "y.npy")], check=True, cwd=tmp)
    return np.load(tmp / "y.npy")


def test_submission_is_in_kaggles_format(exported):
    tmp, _study, _, images = exported
    lines = (tmp / "out" / "submission.csv").read_text().splitlines()
    assert lines[0] == "ImageId,Label" and len(lines) == len(images) + 1
    rows = np.array([list(map(int, line.split(","))) for line in lines[1:]])
    assert rows[:, 0].tolist() == list(range(1, len(images) + 1))
    assert set(rows[:, 1]) <= set(range(10))
    labels = data.load(DataConfig(name="mnist_sample")).labels[:37]
    assert (rows[:, 1] == labels).mean() > 0.6  # a real model, reading real digits


def test_model_is_registered_in_mlflow(exported):
    _tmp, study, cfg, _ = exported
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    versions = client.search_model_versions("name='exp'")
    assert len(versions) == 1
    assert versions[0].run_id == study.best_trial.user_attrs["mlflow_run_id"]


def test_clear_errors(exported, capsys):
    tmp, study, cfg, _ = exported
    worst = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    args = ["--out", str(tmp / "o2"), "--storage", cfg.search.storage, "--no-mlflow"]
    assert export.main(["--study", "nope", *args]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert export.main(["--study", "exp", "--trial", "99", *args]) == 2
    assert "--trial 99" in capsys.readouterr().err
    assert export.main(["--study", "exp", "--trial", str(worst.number), *args]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert export.main(["--study", "exp", "--epochs", "30", *args]) == 2
    assert "--epochs 30: needs --refit" in capsys.readouterr().err
    assert export.main(["--study", "exp", "--refit", "--epochs", "0", *args]) == 2
    assert "--epochs 0: needs --refit and a value >= 1" in capsys.readouterr().err


def test_refit_retrains_a_dropped_trial(exported):
    tmp, study, cfg, _ = exported
    worst = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert worst.user_attrs["epochs_run"] != 1
    rc = export.main(["--study", "exp", "--trial", str(worst.number), "--refit", "--epochs", "1",
                      "--out", str(tmp / "refit"), "--storage", cfg.search.storage,
                      "--no-mlflow"])
    assert rc == 0
    meta = json.loads((tmp / "refit" / "model.json").read_text())
    assert meta["refit"] is True and "refit: train+val" in meta["data_source"]
    assert meta["metrics"]["epochs"] == 1  # --epochs sets the refit's length


def test_predict_reads_the_users_digits_with_a_real_export(exported, tmp_path, capsys):
    """predict on the exported model.pt2 (not a stand-in): MNIST digits saved as PNG files come
    back as the exported model reads them in memory, and mostly right."""
    from PIL import Image

    from sweeper.best_model import predict

    out, _study, _, images = exported[0] / "out", *exported[1:]
    labels = data.load(DataConfig(name="mnist_sample")).labels[:len(images)]
    files = []
    for i, im in enumerate(images[:20]):
        Image.fromarray(im).save(tmp_path / f"d{i}.png")
        files.append(str(tmp_path / f"d{i}.png"))
    assert predict.main([*files, "--model", str(out), "--sheet", str(tmp_path / "s.png")]) == 0
    said = [int(line.split(": ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
            if line.startswith(str(tmp_path / "d"))]
    model = predict.load_model(out)
    x = np.stack([predict.to_mnist(predict.load_image(Path(f))) for f in files])
    want, _ = export.predict(model, x)
    assert said == want.tolist()
    assert (np.array(said) == labels[:20]).mean() >= 0.6


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """One configuration trained with 3 seeds (the trial + 2 repeats that keep their weights)."""
    tmp = tmp_path_factory.mktemp("ensemble")
    cfg = sample_study(tmp, "ens", seed=2, epochs=1, trials=2, widest=64)
    cfg.confirm.seeds, cfg.confirm.top_k = 3, 1
    return tmp, run_study(cfg), cfg


def test_repeats_of_the_best_keep_their_weights(seeded):
    _tmp, study, cfg = seeded
    best = study.best_trial.number
    names = sorted(f.name for f in checkpoints.folder(cfg).glob("*.pt"))
    assert f"trial-{best:03d}-seed-1.pt" in names and f"trial-{best:03d}-seed-2.pt" in names
    seeds = checkpoints.seeds(study, study.best_trial, cfg.search.storage)
    assert [k for k, _ in seeds] == [0, 1, 2]
    # three different networks: the repeats trained with their own seeds
    weights = [checkpoints.load(path)[0].state_dict() for _, path in seeds]
    first = next(iter(weights[0]))
    assert not torch.equal(weights[0][first], weights[1][first])


@pytest.mark.slow
def test_seed_ensemble_is_one_model_averaging_probabilities(seeded, tmp_path, capsys):
    _tmp, study, cfg = seeded
    images = data.load(DataConfig(name="mnist_sample")).images[:25]
    test_csv = write(tmp_path / "test.csv", HEADER, [list(map(int, im.ravel())) for im in images])
    out = tmp_path / "ens"
    assert export.main(["--study", "ens", "--out", str(out), "--ensemble", "3",
                        "--storage", cfg.search.storage, "--tracking-uri", cfg.tracking.uri,
                        "--kaggle-test", str(test_csv)]) == 0
    printed = capsys.readouterr().out
    assert f"ensemble of 3 seeds of trial {study.best_trial.number}" in printed
    meta = json.loads((out / "model.json").read_text())
    # Validation accuracy is measured with --kaggle-test too, beside each member's, and named
    # for what it is: the members were chosen on these images, so it is not held out.
    score = meta["metrics"]["val_acc_selection_score"]
    assert "val_acc" not in meta["metrics"]
    assert (f"validation accuracy of the exported model: {score:.4f} (a selection score, not "
            "held out: these images chose its members); its members alone: ") in printed
    assert [(m["trial"], m["seed"]) for m in meta["ensemble"]["members"]] == [
        (study.best_trial.number, k) for k in range(3)]
    # What the files compute, outside the project, is the mean of the members' probabilities.
    members = []
    for _, path in checkpoints.seeds(study, study.best_trial, cfg.search.storage):
        net, ckpt = checkpoints.load(path)
        members.append(export.Exported(net, ckpt["mean"], ckpt["std"]).eval())
    x = torch.rand(9, 1, 28, 28)
    with torch.no_grad():
        want = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0).numpy()
        alone = [torch.softmax(m(x), 1).numpy() for m in members]
    for got in standalone_outputs(out, tmp_path, x):
        p = np.exp(got) / np.exp(got).sum(1, keepdims=True)
        assert np.abs(p - want).max() < 1e-5
        assert min(np.abs(p - a).max() for a in alone) > 1e-3  # not one member passed through
    # Kaggle's submission and predict take it as they take a single model.
    rows = np.loadtxt(out / "submission.csv", delimiter=",", skiprows=1, dtype=int)
    from sweeper.best_model import predict

    labels, _ = export.predict(predict.load_model(out), images)
    assert rows[:, 1].tolist() == labels.tolist()
    versions = MlflowClient(tracking_uri=cfg.tracking.uri).search_model_versions("name='ens'")
    assert len(versions) == 1


def test_ensemble_errors_say_what_would_work(seeded, tmp_path, capsys):
    _tmp, study, cfg = seeded
    args = ["--study", "ens", "--storage", cfg.search.storage, "--no-mlflow"]
    other = next(t.number for t in study.trials if t.number != study.best_trial.number)
    assert export.main([*args, "--out", str(tmp_path / "a"), "--ensemble", "1"]) == 2
    assert "--ensemble 1: needs 2 or more members" in capsys.readouterr().err
    assert export.main([*args, "--out", str(tmp_path / "b"), "--ensemble", "2",
                        "--trial", str(other)]) == 2  # no repeats: only its own weights
    err = capsys.readouterr().err
    assert f"trial {other} has 1 seed(s) with kept weights" in err and "confirm.seeds=2" in err
    assert export.main([*args, "--out", str(tmp_path / "c"), "--ensemble", "4"]) == 2
    err = capsys.readouterr().err
    assert "has 2 trials with kept weights" in err and "confirm.seeds=4" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_ensemble_of_the_top_trials(exported, capsys):
    """Without seed repeats the top K trials join; their weights must be kept, or --refit
    retrains them."""
    tmp, study, cfg, _ = exported
    args = ["--study", "exp", "--storage", cfg.search.storage, "--no-mlflow"]
    assert export.main([*args, "--out", str(tmp / "top"), "--ensemble", "2"]) == 2
    assert "has 1 trials with kept weights (search.keep_top_k)" in capsys.readouterr().err
    assert export.main([*args, "--out", str(tmp / "top"), "--ensemble", "2", "--refit",
                        "--epochs", "1"]) == 0
    top = [t.number for t in sorted(study.trials, key=lambda t: -t.value)[:2]]
    assert f"ensemble of the top 2 trials ({top[0]}, {top[1]})" in capsys.readouterr().out
    meta = json.loads((tmp / "top" / "model.json").read_text())
    assert [(m["trial"], m["seed"], m["epochs"]) for m in meta["ensemble"]["members"]] == [
        (top[0], 0, 1), (top[1], 0, 1)]
    # the validation images were trained on: recorded as such, never as val_acc
    assert "val_acc" not in meta["metrics"] and meta["metrics"]["val_acc_seen_in_training"] > 0


@pytest.mark.slow
def test_ensemble_reports_its_test_accuracy_when_the_study_measures_test(mnist_root, tmp_path,
                                                                          capsys):
    """A study with confirm.test measures its best on MNIST's test set; the export of its seed
    ensemble does too, and the figure is the exported files' own accuracy there."""
    from sweeper.best_model import predict
    from sweeper.train import idx

    cfg = Config(name="t", seed=0)
    cfg.data = DataConfig(name="mnist", root=str(mnist_root), val_size=1000, train_size=2000)
    cfg.search.study_name, cfg.search.pruner, cfg.search.n_trials = "t", "none", 1
    cfg.search.storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.trainer.max_epochs = 1
    cfg.search.space = {"width": ParamSpec("int", low=32, high=32)}
    cfg.confirm.seeds, cfg.confirm.top_k, cfg.confirm.test = 2, 1, True
    run_study(cfg)
    capsys.readouterr()
    out = tmp_path / "out"
    assert export.main(["--study", "t", "--out", str(out), "--ensemble", "2", "--storage",
                        cfg.search.storage, "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    images, labels = idx.load_split(mnist_root, "test")
    got, _ = export.predict(predict.load_model(out), images)
    acc = float((got == labels).mean())
    meta = json.loads((out / "model.json").read_text())
    assert meta["metrics"]["test_acc"] == acc > 0.5
    assert f"test accuracy of the exported model (confirm.test): {acc:.4f}; its members" in printed


def test_repeat_weights_go_with_their_trial_and_only_finished_repeats_count(tmp_path):
    """keep_top_k drops a trial's repeat weights with its own; seeds() lists the trial and its
    finished repeats only (diverged, failed and claimed ones are left out)."""
    import optuna
    from optuna.distributions import FloatDistribution

    from lightning_modules.metrics import TRAIN_ACC, VAL_ACC

    study = optuna.create_study(direction="maximize")
    files = {}
    for number, value in enumerate((0.9, 0.8)):
        own = tmp_path / f"trial-{number:03d}.pt"
        files[number] = [own, *(checkpoints.repeat_path(own, k) for k in (1, 2, 3, 4))]
        for f in files[number]:
            f.write_bytes(b"w")
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"x": value}, distributions={"x": FloatDistribution(0, 1)},
            user_attrs={keys.CHECKPOINT: str(own)}))
    done = {VAL_ACC: 0.9, TRAIN_ACC: 0.95}
    study.set_user_attr(f"{keys.REPEAT}.0.1", done)
    study.set_user_attr(f"{keys.REPEAT}.0.2", {keys.DIVERGED: "val_loss=nan at epoch 1"})
    study.set_user_attr(f"{keys.REPEAT}.0.3", {VAL_ACC: float("nan"), TRAIN_ACC: 0.9})  # old
    study.set_user_attr(f"{keys.REPEAT}.0.4", {keys.CLAIMED_BY: "host:1", keys.CLAIM_BEAT: 0})
    study.set_user_attr(f"{keys.REPEAT}.0.11", done)  # trial 0's repeat 11 has no file
    assert [k for k, _ in checkpoints.seeds(study, study.trials[0], "sqlite:///x.db")] == [0, 1]
    # Repeats 1-3 ended (finished or diverged) and are never trained again; 4 was only claimed:
    # one more repeat with weights needs confirm.seeds=5.
    with pytest.raises(export.UserError) as e:
        export.choose_members(study, study.trials[0], 3, True, "sqlite:///x.db", False)
    assert "has 2 seed(s) with kept weights; --refit retrains its 3 finished seeds; run the " \
        "study again with confirm.seeds=5 " in str(e.value)
    checkpoints.keep_top_k(study, 1)
    assert all(f.exists() for f in files[0])
    assert not any(f.exists() for f in files[1])  # the dropped trial's repeats went with it


@pytest.mark.slow
def test_refit_trains_each_seed_with_its_own_seed(seeded):
    _tmp, study, cfg = seeded
    from sweeper.settings import recipe

    best = study.best_trial
    splits = export.refit_splits(cfg)
    nets = [export.refit(recipe.of_trial(study, best), best.params, best.number, splits, k)[0]
            for k in (0, 1, 1)]
    first = next(iter(nets[0].state_dict()))
    assert not torch.equal(nets[0].state_dict()[first], nets[1].state_dict()[first])
    assert torch.equal(nets[1].state_dict()[first], nets[2].state_dict()[first])


def test_a_model_with_non_finite_outputs_is_not_exported(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, image):
            return image.flatten(1)[:, :10] * float("nan")

    export.write_models(Broken(), tmp_path)
    with pytest.raises(export.UserError, match="not finite"):
        export.check_models(Broken(), tmp_path, torch.rand(4, 1, 28, 28))


def test_a_study_with_seed_repeats_suggests_exporting_them_as_one_model():
    import optuna

    from sweeper.analysis import console

    cfg = Config(name="mb")
    cfg.search.study_name, cfg.trainer.max_epochs = "mb", 56
    assert "--ensemble" not in console.next_steps(cfg, optuna.create_study())
    cfg.confirm.seeds = 3
    assert ("python -m sweeper.export --study mb --out export/mb --ensemble 3    # its 3 seeds "
            "as one model") in console.next_steps(cfg, optuna.create_study())
    cfg.search.keep_top_k = 0  # no weights kept: nothing to ensemble
    assert "--ensemble" not in console.next_steps(cfg, optuna.create_study())


def test_a_multi_objective_ensemble_needs_the_trials_own_seeds(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(directions=["maximize", "minimize"])
    (tmp_path / "t.pt").write_bytes(b"w")
    study.add_trial(optuna.trial.create_trial(
        values=[0.9, 1e5], params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
        user_attrs={keys.CHECKPOINT: str(tmp_path / "t.pt")}))
    with pytest.raises(export.UserError) as e:
        export.choose_members(study, study.trials[0], 2, False, "sqlite:///x.db", False)
    assert "trial 0 has 1 seed(s) with kept weights" in str(e.value)
    assert "leave out --trial" not in str(e.value)  # no single ranking of a Pareto front


@pytest.mark.slow
def test_refit_of_a_bf16_recipe_warns_where_bf16_is_emulated(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    tiny_cfg.trainer.precision, tiny_cfg.trainer.accelerator = "bf16", "cpu"
    splits = export.refit_splits(tiny_cfg)
    assert "note: trainer.precision=bf16 on this CPU" in capsys.readouterr().out
    assert len(splits.y_train) == 5000  # train + validation: the embedded sample's 5,000
    tiny_cfg.trainer.precision = "32"
    export.refit_splits(tiny_cfg)
    assert "note:" not in capsys.readouterr().out
