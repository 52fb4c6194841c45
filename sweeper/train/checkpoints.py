"""Trained weights of the study's best trials: `<dir>/<study>/trial-NNN.pt`, the top
`search.keep_top_k` complete trials only (the rest are deleted as better ones arrive), so that
export can ship a chosen model without retraining and disk use stays bounded. Seed repeats of a
kept trial keep theirs beside it (`trial-NNN-seed-K.pt`): export's seed ensembles."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from lightning_modules.metrics import TRAIN_ACC, VAL_ACC
from lightning_modules.models import Architecture, build_model
from sweeper.record import repeat_records
from sweeper.record.stores import sqlite_path
from sweeper.settings import keys, objectives
from sweeper.settings.config import Config
from sweeper.settings.errors import DiskFull, UserError, disk_full
from sweeper.train.data import Splits


def folder(cfg: Config) -> Path:
    """Beside the Optuna SQLite file (mlruns/checkpoints/<study>), else ./mlruns/checkpoints."""
    base = cfg.search.checkpoint_dir
    if base is None:
        db = sqlite_path(cfg.search.storage)
        base = str(db.parent / "checkpoints") if db is not None else "mlruns/checkpoints"
    return Path(base) / cfg.search.study_name


def path_of(cfg: Config, number: int) -> Path:
    """Absolute: export finds it from any folder."""
    return (folder(cfg) / f"trial-{number:03d}.pt").resolve()


def save(cfg: Config, number: int, net: torch.nn.Module, arch: Architecture, splits: Splits,
         metrics: dict[str, float]) -> Path:
    return save_to(path_of(cfg, number), number, net, arch, splits, metrics)


def repeat_path(trial_checkpoint: Path, k: int) -> Path:
    """Where seed repeat k of a trial keeps its weights: beside the trial's own."""
    return trial_checkpoint.with_name(f"{trial_checkpoint.stem}-seed-{k}.pt")


def save_to(path: Path, number: int, net: torch.nn.Module, arch: Architecture, splits: Splits,
            metrics: dict[str, float]) -> Path:
    """Written beside and renamed into place: a file that exists is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.part")
    try:
        torch.save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
                "arch": asdict(arch), "in_shape": list(splits.in_shape),
                "n_classes": splits.n_classes, "mean": splits.mean, "std": splits.std,
                    "data_source": splits.source, "trial": number, "metrics": metrics}, part)
        part.replace(path)
    except BaseException as e:
        part.unlink(missing_ok=True)
        if disk_full(e):
            free = shutil.disk_usage(path.parent).free
            raise DiskFull(f"the disk is full: writing {path} failed ({free / 1e6:.1f} MB free "
                           "there)") from None
        raise
    return path


def keep_top_k(study: optuna.Study, k: int) -> None:
    """Weights of the best k complete trials stay; a multi-objective study keeps its whole
    Pareto front as well (export picks a point of it)."""
    ranked = [t for t in objectives.ranked(study) if keys.CHECKPOINT in t.user_attrs]
    keep = {t.number for t in ranked[:k]}
    if objectives.is_multi(study):
        keep |= {t.number for t in objectives.front(study)}
    for t in ranked:
        if t.number not in keep:
            own = Path(t.user_attrs[keys.CHECKPOINT])
            own.unlink(missing_ok=True)
            for repeat in own.parent.glob(f"{own.stem}-seed-*.pt"):
                repeat.unlink(missing_ok=True)


def load_trial(study: optuna.Study, trial: FrozenTrial, storage: str
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    return load(trial_path(study, trial, storage))


def kept(trial: FrozenTrial, storage: str) -> Path | None:
    """The file of a trial's kept weights, or None."""
    if keys.CHECKPOINT not in trial.user_attrs:
        return None
    path = resolved(trial, storage)
    return path if path.is_file() else None


def resolved(trial: FrozenTrial, storage: str) -> Path:
    """Where a trial's weights are (or were). Studies made before paths were stored absolute
    hold them relative to the folder the sweep ran in: beside the SQLite file's folder."""
    path = Path(trial.user_attrs[keys.CHECKPOINT])
    db = sqlite_path(storage)
    if not path.is_absolute() and not path.is_file() and db is not None:
        path = db.resolve().parent.parent / path
    return path


def trial_path(study: optuna.Study, trial: FrozenTrial, storage: str) -> Path:
    """The file of a complete trial's kept weights; a clear error where there is none."""
    if keys.CHECKPOINT not in trial.user_attrs:
        raise UserError(f"trial {trial.number} has no checkpoint (it is not COMPLETE); "
                        "export --refit retrains it")
    path = kept(trial, storage)
    if path is None:
        path = resolved(trial, storage)
        complete = objectives.ranked(study)
        rank = [t.number for t in complete].index(trial.number) + 1
        raise UserError(f"{path}: checkpoint not found (the trial ranks {rank} of "
                        f"{len(complete)}: only the best search.keep_top_k keep their weights, "
                        "or the file was moved); export --refit retrains the trial")
    return path


def seeds(study: optuna.Study, trial: FrozenTrial, storage: str) -> list[tuple[int, Path]]:
    """(seed index, weights) of a trial and its finished seed repeats whose weights are kept:
    0 first. Diverged, failed and unfinished repeats are left out."""
    own = kept(trial, storage)
    if own is None:
        return []
    found = [(0, own)]
    for k in finished_repeats(study, trial.number):
        if repeat_path(own, k).is_file():
            found.append((k, repeat_path(own, k)))
    return found


def seeds_for_new_weights(study: optuna.Study, number: int, more: int) -> int:
    """The confirm.seeds that makes `more` repeats of trial `number` that it has not trained
    yet (finished and diverged repeats are never trained again, so they keep no new weights)."""
    k = 0
    while more > 0:
        k += 1
        if not repeat_records.done(study.user_attrs.get(repeat_records.key(number, k))):
            more -= 1
    return k + 1


def finished_repeats(study: optuna.Study, number: int) -> list[int]:
    """Seed indices (k >= 1) of trial `number`'s repeats that finished with finite metrics."""
    out = []
    for key, record in study.user_attrs.items():
        if key.startswith(f"{keys.REPEAT}.{number}.") and isinstance(record, dict) and all(
                isinstance(record.get(m), int | float) and math.isfinite(record[m])
                for m in (VAL_ACC, TRAIN_ACC)) and keys.ERROR not in record:
            k = int(key.rsplit(".", 1)[1])
            if k > 0:
                out.append(k)
    return sorted(out)


def load(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(the trained network in eval mode, the checkpoint's metadata)"""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    arch = Architecture(**(ckpt["arch"] | {"hidden": tuple(ckpt["arch"]["hidden"])}))
    net = build_model(arch, ckpt["in_shape"], ckpt["n_classes"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), ckpt
