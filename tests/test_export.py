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

from sweeper import checkpoints, data, export, keys
from sweeper.config import Config, DataConfig, ParamSpec
from sweeper.study import run_study
from tests.test_kaggle import HEADER, write

STANDALONE = """
import sys, json, numpy as np
sys.modules["sweeper"] = None            # any import of the project now fails
sys.modules["lightning_modules"] = None
import torch, onnxruntime
out, x = sys.argv[1], np.load(sys.argv[2])
script = torch.jit.load(out + "/model.pt")(torch.from_numpy(x)).detach().numpy()
onnx = onnxruntime.InferenceSession(out + "/model.onnx").run(None, {"image": x})[0]
np.save(sys.argv[3], np.stack([script, onnx]))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cfg = Config(name="exp", seed=1)
    cfg.data = DataConfig(name="mnist_sample", val_size=1000)
    cfg.search.study_name = "exp"
    cfg.search.storage = f"sqlite:///{tmp}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{tmp}/mlflow.db"
    cfg.trainer.max_epochs, cfg.search.n_trials, cfg.search.keep_top_k = 2, 3, 1
    cfg.search.pruner = "none"
    cfg.search.space = {"width": ParamSpec("int", low=16, high=96, log=True)}
    study = run_study(cfg)
    images = data.load(DataConfig(name="mnist_sample")).images[:37]
    test_csv = write(tmp / "test.csv", HEADER, [list(map(int, im.ravel())) for im in images])
    rc = export.main(["--study", "exp", "--out", str(tmp / "out"), "--kaggle-test",
                      str(test_csv), "--storage", cfg.search.storage,
                      "--tracking-uri", cfg.tracking.uri])
    assert rc == 0
    return tmp, study, cfg, images


def test_only_the_top_k_checkpoints_are_kept(exported):
    _tmp, study, cfg, _ = exported
    files = sorted(checkpoints.folder(cfg).glob("*.pt"))
    assert [f.name for f in files] == [f"trial-{study.best_trial.number:03d}.pt"]


def test_files_load_without_the_project_and_agree_with_it(exported):
    tmp, study, _, _ = exported
    out = tmp / "out"
    assert {p.name for p in out.iterdir()} >= {"model.pt", "model.onnx", "model.json",
                                                "submission.csv", "predictions.png"}
    meta = json.loads((out / "model.json").read_text())
    assert meta["trial"] == study.best_trial.number and meta["params"] == study.best_params
    assert meta["input"]["shape"] == [-1, 1, 28, 28] and meta["data_source"].startswith(
        "mnist_sample")
    script, onnx = standalone_errors(study, out, tmp, 16)
    assert script < 1e-5 and onnx < 1e-5


def standalone_errors(study, out: Path, tmp: Path, n: int) -> tuple[float, float]:
    """Largest differences between the best trial's checkpoint (with normalization) and its
    exported model.pt / model.onnx, loaded in a process that cannot import the project."""
    net, ckpt = checkpoints.load(Path(study.best_trial.user_attrs[keys.CHECKPOINT]))
    model = export.Exported(net, ckpt["mean"], ckpt["std"]).eval()
    x = torch.rand(n, 1, 28, 28)
    np.save(tmp / "x.npy", x.numpy())
    subprocess.run([sys.executable, "-c", STANDALONE, str(out), str(tmp / "x.npy"),
                    str(tmp / "y.npy")], check=True, cwd=tmp)
    script, onnx = np.load(tmp / "y.npy")
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(script - want).max()), float(np.abs(onnx - want).max())


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
    """predict on the exported model.pt (not a stand-in): MNIST digits saved as PNG files come
    back as the exported model reads them in memory, and mostly right."""
    from PIL import Image

    from sweeper import predict

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
