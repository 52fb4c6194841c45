"""`python -m sweeper.export --study NAME --out DIR [--trial N] [--ensemble K] [--refit]
[--kaggle-test CSV]`

Ships a study's best trial (or trial N) as files that load without this project:
  model.pt2   torch.export  torch.export.load(path).module()(images) -> logits
  model.onnx  ONNX          onnxruntime.InferenceSession(path).run(None, {"image": images})
  model.json  what it is: config, metrics, trial(s), data source, and the input contract
Both models take float32 images [N, 1, 28, 28] scaled to [0, 1] (white digit on black, as in
MNIST) and apply the training normalization themselves. With --ensemble K the files hold K
networks (the trial's seed repeats, else the study's top K trials) and output the log of their
mean probability: softmax of it is the ensemble's probabilities, as for a single model. The
model is also logged to the trial's MLflow run and registered in the MLflow model registry under
the study's name. With --kaggle-test it writes Kaggle's submission.csv; it always writes
predictions.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_modules.metrics import (
    BEST_VAL_ACC,
    EPOCHS_RUN,
    GAP,
    TEST_ACC,
    TRAIN_ACC,
    TRAIN_LOSS,
    VAL_ACC,
)
from sweeper.record import repeat_records, stores
from sweeper.settings import faultpoints, objectives
from sweeper.settings.config import DEFAULT_STORAGE, Config
from sweeper.settings.errors import UserError, one_line

# Largest |logit difference| allowed between an exported file and the trained model, checked on
# every export (float32 reorderings in ONNX Runtime stay far below it).
TOLERANCE = 1e-4


class Exported(nn.Module):
    """Input contract in the graph: [N, 1, 28, 28] in [0, 1] -> normalize -> net -> logits."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: float, std: float):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net((image - self.mean) / self.std)


class Ensemble(nn.Module):
    """Averages its members' probabilities; returns log(mean p), so that softmax of the output
    is that mean (the single-model contract: logits in, softmax for probabilities)."""

    def __init__(self, members: list[Exported]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(image), 1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))


@dataclass
class Member:
    trial: Any  # FrozenTrial
    seed: int  # 0: the trial itself; k: its seed repeat k
    weights: Path | None  # kept weights (None: --refit trains it)


def choose_members(study: Any, trial: Any, k: int, explicit: bool, storage: str,
                   refit: bool) -> tuple[list[Member], str]:
    """K members for --ensemble: the trial and its seed repeats when K of them kept their
    weights (with --refit: when K of its seeds finished; each is retrained), otherwise the
    study's top K trials. Returns (members, what they are in words)."""
    from sweeper.train import checkpoints

    seeds: list[tuple[int, Path | None]] = list(checkpoints.seeds(study, trial, storage))
    if refit:
        seeds = [(s, None) for s in [0, *checkpoints.finished_repeats(study, trial.number)]]
    if len(seeds) >= k:
        return ([Member(trial, s, w) for s, w in seeds[:k]],
                f"{k} seeds of trial {trial.number}")
    finished = 1 + len(checkpoints.finished_repeats(study, trial.number))
    seeds_to_ask = checkpoints.seeds_for_new_weights(study, trial.number, k - len(seeds))
    retrain = (f"; --refit retrains its {finished} finished seeds" if not refit and finished >= k
               else "")
    if explicit or objectives.is_multi(study):
        top = ("" if objectives.is_multi(study)
               else ", or leave out --trial to ensemble the top trials")
        raise UserError(f"--ensemble {k}: trial {trial.number} has {len(seeds)} seed(s) "
                        f"{'finished' if refit else 'with kept weights'}{retrain}; run the study "
                        f"again with confirm.seeds={seeds_to_ask} (repeats it has not trained yet "
                        f"keep their weights while the trial is among its best confirm.top_k)"
                        f"{top}")
    ranked = objectives.ranked(study)
    if not refit:
        ranked = [t for t in ranked if checkpoints.kept(t, storage) is not None]
    if len(ranked) < k:
        have = "complete" if refit else "with kept weights (search.keep_top_k)"
        raise UserError(f"--ensemble {k}: study {study.study_name!r} has {len(ranked)} trials "
                        f"{have} and trial {trial.number} has {len(seeds)} seed(s){retrain}; "
                        f"ask for fewer, or run it again with search.keep_top_k={k} or "
                        f"confirm.seeds={seeds_to_ask}" + ("" if refit else ", or add --refit"))
    members = [Member(t, 0, None if refit else checkpoints.kept(t, storage)) for t in ranked[:k]]
    return members, f"the top {k} trials ({', '.join(str(t.number) for t in ranked[:k])})"


def choose_trial(study: Any, number: int | None) -> Any:
    from optuna.trial import TrialState

    if number is None:
        ranked = objectives.ranked(study)
        if not ranked:
            raise UserError(f"study {study.study_name!r} has no complete trial to export")
        if objectives.is_multi(study):  # no single best: the user picks a point of the front
            points = "; ".join(f"trial {t.number}: {objectives.describe(study, t)}"
                               for t in objectives.front(study)[:12])
            raise UserError(f"study {study.study_name!r} has several objectives, so no single "
                            f"best trial: choose one of its Pareto front with --trial N ({points})")
        return ranked[0]
    if not 0 <= number < len(study.trials):
        raise UserError(f"--trial {number}: study {study.study_name!r} has trials 0.."
                        f"{len(study.trials) - 1}")
    trial = study.trials[number]
    if trial.state != TrialState.COMPLETE:
        raise UserError(f"--trial {number} is {trial.state.name}, not COMPLETE")
    return trial


def write_models(model: nn.Module, out: Path) -> None:
    example = torch.rand(4, 1, 28, 28)
    batch = ({0: torch.export.Dim("batch")},)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter
        program = torch.export.export(model, (example,), dynamic_shapes=batch)
        torch.export.save(program, str(out / "model.pt2"))
        torch.onnx.export(model, (example,), str(out / "model.onnx"), dynamo=True,
                              input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                              external_data=False)  # one self-contained file


def check_models(model: nn.Module, out: Path, images: torch.Tensor) -> float:
    """Largest |difference| of the two exported files' logits from the in-project model's."""
    import onnxruntime

    with torch.no_grad():
        want = model(images).numpy()
        script = torch.export.load(str(out / "model.pt2")).module()(images).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    onnx = session.run(None, {"image": images.numpy()})[0]
    diff = float(max(np.abs(script - want).max(), np.abs(onnx - want).max()))
    if not np.isfinite(want).all():
        raise UserError("the trained model's outputs are not finite (NaN/inf): not exported")
    if not diff <= TOLERANCE:
        raise UserError(f"exported models disagree with the trained one by {diff:.2e} "
                        f"(more than {TOLERANCE:g})")
    return diff


def predict(model: nn.Module, images: np.ndarray,
            batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [N, 28, 28] -> (labels [N], probabilities [N, 10])"""
    probs = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).float().div_(255).unsqueeze(1)
            probs.append(torch.softmax(model(x), 1).numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, 10), np.float32)
    return p.argmax(1), p


def measure(meta: dict[str, Any], model: nn.Module, nets: Sequence[nn.Module], splits: Any,
            members: list[Member], study: Any, cfg: Config, refit: bool,
            picture: Path | None) -> None:
    """Accuracy of the exported model (and each ensemble member) on the study's validation
    images, and on the test set where the study measured it; into meta["metrics"]."""
    from sweeper.train import data

    # validation images back to uint8 pixels for the picture and the model's contract
    val = ((splits.x_val[:, 0].cpu() * splits.std + splits.mean) * 255).round()
    images = val.clamp(0, 255).to(torch.uint8).numpy()
    labels, probs = predict(model, images)
    truth = splits.y_val.cpu().numpy()
    # After --refit the validation images were trained on: not a held-out figure. An
    # ensemble's members were chosen on these images (the top trials, or the seeds of the best
    # one): its figure is a selection score, optimistic, not a held-out accuracy either.
    key = ("val_acc_seen_in_training" if refit else "val_acc_selection_score" if len(nets) > 1
           else VAL_ACC)
    meta["metrics"][key] = float((labels == truth).mean())
    seen = (" (these images were trained on by --refit)" if refit else
            " (a selection score, not held out: these images chose its members)"
            if len(nets) > 1 else "")
    print(f"validation accuracy of the exported model: {meta['metrics'][key]:.4f}{seen}"
          + members_line(nets, images, truth))
    if picture is not None:
        predictions_png(picture, images, labels, probs, truth, "validation")
    # Measured on the test set only where the study already measured every member's trial
    # there (confirm.test): the export adds no new look at it to a study that made none.
    tested = all(TEST_ACC in study.user_attrs.get(repeat_records.key(m.trial.number, 0), {})
                 for m in members)
    test = data.load_test(cfg.data, splits) if tested else None
    if test is not None:
        images = ((test[0][:, 0].cpu() * splits.std + splits.mean) * 255).round()
        images = images.clamp(0, 255).to(torch.uint8).numpy()
        truth = test[1].cpu().numpy()
        meta["metrics"][TEST_ACC] = float((predict(model, images)[0] == truth).mean())
        print(f"test accuracy of the exported model (confirm.test): "
              f"{meta['metrics'][TEST_ACC]:.4f}" + members_line(nets, images, truth))


def members_line(nets: Sequence[nn.Module], images: np.ndarray, truth: np.ndarray) -> str:
    """Each ensemble member's accuracy on the same images ('' for a single model)."""
    if len(nets) < 2:
        return ""
    accs = [float((predict(n, images)[0] == truth).mean()) for n in nets]
    return f"; its members alone: {', '.join(f'{a:.4f}' for a in accs)}"


def write_submission(path: Path, labels: np.ndarray, n_rows: int) -> None:
    if len(labels) != n_rows:
        raise UserError(f"{len(labels)} predictions for {n_rows} test rows; not writing {path}")
    table = np.column_stack([np.arange(1, n_rows + 1), labels])
    np.savetxt(path, table, fmt="%d", delimiter=",", header="ImageId,Label", comments="")


def predictions_png(path: Path, images: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                    truth: np.ndarray | None, title: str) -> None:
    """A grid of sample images with `index:prediction`; with labels, a second grid of the most
    confident mistakes (`index:prediction (truth)`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = list(range(min(40, len(images))))
    grids = [(f"{title}: first {len(sample)} images, index:prediction", sample, False)]
    if truth is not None:
        wrong = np.flatnonzero(labels != truth)
        wrong = wrong[np.argsort(-probs[wrong, labels[wrong]])][:40]
        grids.append((f"most confident mistakes ({len(np.flatnonzero(labels != truth))} of "
                      f"{len(truth)} wrong), index:prediction (truth)", list(wrong), True))
    fig = plt.figure(figsize=(12, 5.6 * len(grids)))
    for sub, (heading, indices, mistakes) in zip(fig.subfigures(len(grids), 1, squeeze=False)[:, 0],
                                                  grids, strict=True):
        sub.suptitle(heading, x=0.02, ha="left", fontsize=11)
        axes = sub.subplots(4, 10, gridspec_kw={"hspace": 0.45})
        for j in range(40):
            ax = axes[j // 10, j % 10]
            ax.axis("off")
            if j < len(indices):
                i = indices[j]
                ax.imshow(images[i], cmap="gray")
                text = f"{i}:{labels[i]}" + (f" ({truth[i]})" if mistakes and truth is not None
                                             else "")
                ax.text(0.5, 1.02, text, transform=ax.transAxes, ha="center", fontsize=8,
                        color="red" if mistakes else "black")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def refit_splits(cfg: Config) -> Any:
    """The study's splits with every labelled image in training (the validation metrics
    printed while a refit trains are then training metrics)."""
    from sweeper.train import data, training

    device = training.accelerator(cfg.trainer.accelerator)
    if note := training.bf16_note(cfg.trainer.precision, device):
        print(f"{note}; --refit trains with the study's recipe, so it is slow here",
              flush=True)
    splits = data.load_splits(cfg.data, cfg.seed, device)
    splits.x_train = torch.cat([splits.x_train, splits.x_val])
    splits.y_train = torch.cat([splits.y_train, splits.y_val])
    return splits


def refit(cfg: Config, params: dict[str, Any], number: int, splits: Any, seed: int = 0
          ) -> tuple[nn.Module, dict[str, Any]]:
    """Retrain the trial's configuration (cfg: its own recipe) on train + validation, with the
    seed of the trial (0) or of its seed repeat k. Returns the network and what it measured."""
    from sweeper.loop import repeats
    from sweeper.train import training

    spec = training.resolve(cfg, params, number)
    if seed:
        spec = dataclasses.replace(spec, seed=repeats.repeat_seed(spec.seed, seed))
    module = training.build(spec, splits)
    which = f"trial {number}'s configuration" + (f" (seed {seed})" if seed else "")
    print(f"refit: training {which} on {len(splits.y_train):,} images for {spec.max_epochs} "
          "epochs ...", flush=True)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> bool:
        faultpoints.reached("refit-epoch")
        return not all(math.isfinite(v) for v in metrics.values())

    training.fit(module, spec, splits, on_epoch)
    last = module.history[-1]
    if not all(math.isfinite(v) for v in last.values()):
        raise UserError(f"the refit of {which} diverged (non-finite metrics at epoch "
                        f"{len(module.history)}): not exported")
    measured = {"trained_on": len(splits.y_train), "epochs": len(module.history),
                TRAIN_ACC: last[TRAIN_ACC], TRAIN_LOSS: last[TRAIN_LOSS]}
    return module.net.cpu().eval(), measured


def log_to_mlflow(tracking_uri: str, run_id: str | None, model: nn.Module, out: Path,
                  study: str) -> str:
    """Log the model and the export's files to the trial's run, by id: the run's status is
    never touched (no active run is opened on it), whatever stops the export."""
    import logging

    import mlflow

    stores.quiet_mlflow()
    for name in ("torch._export", "torch.export", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    mlflow.set_tracking_uri(tracking_uri)
    # The model's own record goes to the study's experiment (where its artifacts are kept):
    # log_model(run_id=...) would otherwise make it in the Default experiment, "0", and store
    # a second copy of the model under ./mlruns/0 of whatever folder the export ran in.
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_run(run_id).info.experiment_id if run_id is not None else getattr(
        client.get_experiment_by_name(study), "experiment_id", None)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # MLflow 3 stores PyTorch models as torch.export graphs ('pt2'), traced from an example
        info = mlflow.pytorch.log_model(model, name="model", registered_model_name=study,
                                        input_example=np.zeros((1, 1, 28, 28), np.float32),
                                        run_id=run_id)
        faultpoints.reached("export-mlflow")
        if run_id is not None:
            client.log_artifacts(run_id, str(out), "export")
    return f"{study} version {info.registered_model_version}"


def check_inputs(args: argparse.Namespace) -> np.ndarray | None:
    """Everything the export reads or writes, checked before any training or writing. Returns
    the Kaggle test images when --kaggle-test is given."""
    from sweeper.train import kaggle

    out: Path = args.out
    if getattr(args, "ensemble", None) is not None and args.ensemble < 2:
        raise UserError(f"--ensemble {args.ensemble}: needs 2 or more members")
    if getattr(args, "epochs", None) is not None and (not args.refit or args.epochs < 1):
        raise UserError(f"--epochs {args.epochs}: needs --refit and a value >= 1 (it sets how "
                        "long the refit trains)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a folder (it is made if missing)")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: cannot write in {parent}")
    stores.require_store(args.storage, "--storage", stores.STORAGE_HINT)
    if args.tracking_uri is None:
        args.tracking_uri = stores.default_tracking(args.storage)
    if not args.no_mlflow:
        stores.require_store(args.tracking_uri, "--tracking-uri", "pass the sweep's tracking.uri, "
                             "or --no-mlflow to export without logging")
    if not args.no_mlflow:
        stores.check_reachable(args.tracking_uri, "--tracking-uri")
    return kaggle.read_test(args.kaggle_test) if args.kaggle_test else None


def check_writable(args: argparse.Namespace, run_id: str | None) -> None:
    """Before any work: every place the export writes to can be written (the MLflow store and
    the artifact folders of the trial's run and experiment, predict's pointer in mlruns/)."""
    from sweeper.best_model.predict import LAST_EXPORT

    stores.prepare_folder(LAST_EXPORT.parent, f"{LAST_EXPORT.parent}/ (where predict finds the "
                          "last export)")
    if args.no_mlflow:
        return
    stores.prepare_sqlite(args.tracking_uri, "--tracking-uri")
    import mlflow

    stores.quiet_mlflow()
    client = mlflow.MlflowClient(args.tracking_uri)
    try:
        exp = client.get_experiment_by_name(args.study)
        uris = [exp.artifact_location] if exp is not None else []
        if run_id is not None:
            uris.append(client.get_run(run_id).info.artifact_uri)
    except Exception as e:  # a store MLflow cannot read
        raise UserError(f"--tracking-uri {args.tracking_uri}: {one_line(e, 200)}") from None
    for uri in uris:
        if (path := stores.local_path(uri)) is not None:
            stores.prepare_folder(path, f"the MLflow artifact store of study {args.study!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeper.export", description=__doc__.split(
        "\n\n")[0].split("`")[1])
    ap.add_argument("--study", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--trial", type=int, help="trial number (default: the best complete trial)")
    ap.add_argument("--refit", action="store_true", help="retrain on train + validation first")
    ap.add_argument("--ensemble", type=int, metavar="K", help="export K networks as one model "
                    "that averages their probabilities: the trial and its seed repeats when K "
                    "of them kept weights (confirm.seeds; with --refit: finished, and each is "
                    "retrained), otherwise the study's top K trials (not with --trial)")
    ap.add_argument("--epochs", type=int, help="with --refit: train this many epochs (default: "
                    "the trial's); a study that compares at a short budget can refit longer")
    ap.add_argument("--kaggle-test", type=Path, help="Kaggle test.csv: write submission.csv")
    ap.add_argument("--storage", default=DEFAULT_STORAGE)
    ap.add_argument("--tracking-uri", help="default: mlflow.db beside the --storage SQLite file")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log/register in MLflow")
    args = ap.parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"sweeper.export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sweeper.export: interrupted: nothing exported or registered, {args.out} "
              "unchanged (and the study's record too)", file=sys.stderr)
        return 130
    return 0


def run(args: argparse.Namespace) -> None:
    import optuna

    from sweeper.settings import keys, recipe
    from sweeper.train import checkpoints, data

    kaggle_images = check_inputs(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=args.storage)
    except KeyError:
        raise UserError(f"no study {args.study!r} in {args.storage}") from None
    except Exception as e:  # not an Optuna database, unreachable server
        raise UserError(f"--storage {args.storage}: {one_line(e, 200)}") from None
    trial = choose_trial(study, args.trial)
    check_writable(args, trial.user_attrs.get(keys.MLFLOW_RUN_ID))
    cfg = recipe.of_trial(study, trial)  # the settings this trial trained with
    if args.epochs is not None:  # the schedule (cosine, one-cycle) stretches to the new length
        cfg.trainer.max_epochs = args.epochs
    a = trial.user_attrs
    trial_metrics = {k: a.get(k) for k in (TRAIN_ACC, VAL_ACC, GAP, BEST_VAL_ACC, EPOCHS_RUN,
                                           keys.N_PARAMS)}
    members, described = [Member(trial, 0, None)], f"trial {trial.number}"
    if args.ensemble is not None:
        members, described = choose_members(study, trial, args.ensemble, args.trial is not None,
                                            args.storage, args.refit)
        print(f"ensemble of {described}", flush=True)
    splits: Any = refit_splits(cfg) if args.refit else None
    nets: list[Exported] = []
    member_info: list[dict[str, Any]] = []
    sources: tuple[float, float, str] = (0.0, 0.0, "")
    for m in members:
        mcfg = recipe.of_trial(study, m.trial)
        if args.epochs is not None:
            mcfg.trainer.max_epochs = args.epochs
        info: dict[str, Any] = {"trial": m.trial.number, "seed": m.seed,
                                "params": m.trial.params,
                                keys.N_PARAMS: m.trial.user_attrs.get(keys.N_PARAMS)}
        if args.refit:
            net, measured = refit(mcfg, m.trial.params, m.trial.number, splits, m.seed)
            mean, std, source = splits.mean, splits.std, splits.source + " (refit: train+val)"
            info |= measured
        else:
            net, ckpt = (checkpoints.load(m.weights) if m.weights is not None
                         else checkpoints.load_trial(study, m.trial, args.storage))
            mean, std, source = ckpt["mean"], ckpt["std"], ckpt["data_source"]
            info |= {k: ckpt["metrics"].get(k) for k in (TRAIN_ACC, VAL_ACC, GAP)}
        if nets and (source != sources[2] or not math.isclose(mean, sources[0], rel_tol=1e-6)
                     or not math.isclose(std, sources[1], rel_tol=1e-6)):
            raise UserError(f"--ensemble: trial {m.trial.number} was trained on {source} "
                            f"(mean {mean:.4f}, std {std:.4f}), the others on {sources[2]} "
                            f"(mean {sources[0]:.4f}, std {sources[1]:.4f}); members must "
                            "share their data")
        sources = (mean, std, source)
        nets.append(Exported(net, mean, std).eval())
        member_info.append(info)
    if args.refit:
        # The exported weights are the refit's: it saw the validation images, so nothing
        # held out measures them; the trial's numbers describe the same recipe on train only.
        metrics = {"weights": "refit on train+validation", **{
            k: v for k, v in member_info[0].items() if k not in ("trial", "seed", "params")}}
    else:
        # What the final-epoch weights measured (the best epoch's val_acc is another model).
        metrics = {"weights": "the trial's own (final epoch)",
                   **{k: v for k, v in trial_metrics.items() if k != BEST_VAL_ACC}}
    model: nn.Module = nets[0]
    if len(nets) > 1:
        model = Ensemble(nets).eval()
        metrics = {"weights": f"ensemble of {described}: mean of the members' probabilities"
                   + (", each refit on train+validation" if args.refit else ""),
                   keys.N_PARAMS: sum(i[keys.N_PARAMS] or 0 for i in member_info)}
    out: Path = args.out
    # Everything is written into a side folder first and moved into --out at the end: an
    # interrupted export leaves --out as it was.
    out.parent.mkdir(parents=True, exist_ok=True)
    # named by host and pid, so that a later export removes what a killed one left
    litter = f".{out.name}.export-{socket.gethostname()}-"
    stores.remove_litter(out.parent, litter)
    side = Path(tempfile.mkdtemp(prefix=f"{litter}{os.getpid()}-", dir=out.parent))
    try:
        write_models(model, side)
        diff = check_models(model, side, torch.rand(64, 1, 28, 28))
        meta = {
            "study": args.study, "trial": trial.number, "refit": args.refit,
            "params": trial.params, "metrics": metrics, "trial_metrics": trial_metrics,
            "objective": trial.values[0] if len(trial.values) == 1 else dict(zip(
                objectives.names(study), trial.values, strict=False)),
            "data_source": source, "config": recipe.of_config(cfg),
            "input": {"shape": [-1, 1, 28, 28], "dtype": "float32", "scaling": "pixel / 255",
                      "polarity": "white digit on black (MNIST)",
                      "normalization_in_model": True, "mean": mean, "std": std},
            "output": {"shape": [-1, 10], "meaning": "logits for digits 0-9; softmax for "
                       "probabilities"},
            "max_abs_difference_to_trained_model": diff,
        }
        if len(members) > 1:
            meta["ensemble"] = {"members": member_info, "of": described, "combine":
                                "mean of the members' softmax probabilities; output = log of it"}
        what = ("refit on train+validation" if args.refit
                else f"val_acc {a.get(VAL_ACC, float('nan')):.4f}")
        if len(members) > 1:
            what = described + (", each refit on train+validation" if args.refit else "")
        print(f"exported {'an ensemble of' if len(members) > 1 else 'trial'} "
              f"{what if len(members) > 1 else f'{trial.number} ({what})'}: model.pt2, "
              f"model.onnx, model.json (both files match the trained model to {diff:.1e})")
        if splits is None:  # refit already loaded them
            try:
                splits = data.load_splits(cfg.data, cfg.seed, torch.device("cpu"))
            except Exception as e:  # a Kaggle export needs only test.csv: say so, go on
                if kaggle_images is None:
                    raise
                print(f"validation accuracy not measured: the study's data cannot be read "
                      f"here ({one_line(e, 160)})")
        if splits is not None:
            measure(meta, model, nets, splits, members, study, cfg, args.refit,
                    side / "predictions.png" if kaggle_images is None else None)
        if kaggle_images is not None:
            t0 = time.perf_counter()
            labels, probs = predict(model, kaggle_images)
            write_submission(side / "submission.csv", labels, len(kaggle_images))
            print(f"submission.csv: {len(kaggle_images):,} rows in "
                  f"{time.perf_counter() - t0:.1f}s (predict, write)")
            predictions_png(side / "predictions.png", kaggle_images, labels, probs, None,
                            "Kaggle test")
        (side / "model.json").write_text(json.dumps(meta, indent=2, default=str))
        faultpoints.reached("export-written")
        with held_back_ctrl_c() as interrupts:
            commit(args, side, out, model, a.get(keys.MLFLOW_RUN_ID))
    finally:
        shutil.rmtree(side, ignore_errors=True)
    if interrupts:
        print("note: Ctrl-C came while the export was being committed (moving its files, "
              "registering the model): it was finished rather than left half-done")


def commit(args: argparse.Namespace, side: Path, out: Path, model: nn.Module,
           run_id: str | None) -> None:
    """The export's only lasting effects: its files moved into --out, the model logged and
    registered in MLflow, and predict's default model set to it."""
    out.mkdir(exist_ok=True)
    for f in sorted(side.iterdir()):
        os.replace(f, out / f.name)  # atomic per file
    print(f"written to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    if not args.no_mlflow:
        try:
            version = log_to_mlflow(args.tracking_uri, run_id, model, out, args.study)
        except Exception as e:  # the files are good; only the MLflow record is missing
            raise UserError(f"the model files are written to {out}, but logging them to MLflow "
                            f"({args.tracking_uri}) failed: {one_line(e, 200)}; re-run with "
                            "the right --tracking-uri, or --no-mlflow") from None
        print(f"MLflow: logged to the trial's run and registered as {version}")
    from sweeper.best_model.predict import LAST_EXPORT  # predict's default model: this export

    LAST_EXPORT.parent.mkdir(parents=True, exist_ok=True)
    LAST_EXPORT.write_text(str(out.resolve()))


@contextlib.contextmanager
def held_back_ctrl_c() -> Iterator[list[int]]:
    """Ctrl-C is noted, not raised, inside the block: the export's commit (seconds) either has
    not started or is finished, never half-done. The list holds the signals that came."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield came
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
