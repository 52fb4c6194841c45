"""What a trial learns with, and what makes a study's trials comparable.

The recipe is the part of the config that a trial trains with (seed, data, model, augment,
trainer); every trial stores its own (keys.RECIPE), and refit, seed repeats and export read it
from there. The study's identity is the recipe minus the settings that cannot change what a
trial learns, plus the search space, the objective and the data's content: a resume (or another
worker) whose identity differs would mix incomparable trials, so it is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sweeper.settings import keys, search_space
from sweeper.settings.config import Config
from sweeper.settings.errors import UserError

SECTIONS = ("seed", "data", "model", "augment", "trainer")
# Identity keys left out at their default value (studies made before they existed match).
OMITTED_AT_DEFAULT = {"trainer.precision": "32"}
# Recipe settings free to differ between runs and workers: where the data lives (it is known by
# its content), the device, and two knobs that change speed only (evaluation batch size;
# steps_per_execution groups optimizer steps and is numerically identical to 1).
FREE = ("data.root", "data.train_csv", "data.test_csv", "data.fallback_to_sample",
        "trainer.accelerator", "trainer.eval_batch_size", "trainer.steps_per_execution")


def of_config(cfg: Config) -> dict[str, Any]:
    full = dataclasses.asdict(cfg)
    out = {k: full[k] for k in SECTIONS}
    # Paths as absolute: refit and export may run from another folder than the sweep.
    for key in ("root", "train_csv", "test_csv"):
        if out["data"].get(key):
            out["data"][key] = str(Path(out["data"][key]).expanduser().absolute())
    return out


def to_config(recipe: dict[str, Any]) -> Config:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), recipe))
    assert isinstance(cfg, Config)
    return cfg


def flat(recipe: dict[str, Any]) -> dict[str, Any]:
    """{"trainer": {"lr": 1e-3}} -> {"trainer.lr": 1e-3} (one level: sections are flat)."""
    out: dict[str, Any] = {}
    for section, value in recipe.items():
        if isinstance(value, dict):
            out |= {f"{section}.{k}": v for k, v in value.items()}
        else:
            out[section] = value
    return out


def identity(cfg: Config, data_content: str) -> dict[str, Any]:
    """data_content: the training data's kind and fingerprint (Splits.fingerprint)."""
    space = cfg.search.space
    out = {k: v for k, v in flat(of_config(cfg)).items() if k not in FREE}
    for name, spec in space.items():  # a searched value overrides its fixed default
        out.pop(f"model.{name}", None)
        out.pop(f"trainer.{name}", None)
        if name == "size" or spec.per_layer:
            out.pop("model.width", None)
    out |= {"search.space": search_space.describe(space), "search.objective":
            cfg.search.objective, "data.content": data_content}
    for key, default in OMITTED_AT_DEFAULT.items():  # absent, as before the setting existed
        if out.get(key) == default:
            del out[key]
    if cfg.search.objectives:  # absent from single-objective studies (as before it existed)
        out["search.objectives"] = [[m, d] for m, d in cfg.search.objectives.items()]  # order
    return json.loads(json.dumps(out))  # as stored: tuples become lists


def upgrade(old: dict[str, Any], last_config: dict[str, Any] | None,
            want: dict[str, Any]) -> dict[str, Any]:
    """The identity of a study made before the recipe was part of it: its stored keys, and for
    the rest the config of its latest run (all it kept), else this run's."""
    have = dict(want)
    have.pop("search.objectives", None)  # studies that old had one objective
    if last_config is not None:
        last = identity(to_config({k: last_config[k] for k in SECTIONS if k in last_config}),
                        want["data.content"])
        have |= {k: v for k, v in last.items() if k in want}
    renamed = {"space": "search.space", "objective": "search.objective", "data": "data.content",
               "seed": "seed", "family": "model.family", "val_size": None}
    for old_key, key in renamed.items():
        if key in have and old_key in old:
            have[key] = old[old_key]
    return have


def differences(have: Any, want: Any, key: str = "") -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (study's value, this run's value), down to the innermost difference."""
    if isinstance(have, dict) and isinstance(want, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(have.keys() | want.keys()):
            out |= differences(have.get(k), want.get(k), f"{key}.{k}" if key else k)
        return out
    return {} if have == want else {key: (have, want)}


def refuse(study_name: str, storage: str, have: dict[str, Any], want: dict[str, Any]) -> None:
    # a setting absent at its default is shown at that value, not as null
    diff = differences(OMITTED_AT_DEFAULT | have, OMITTED_AT_DEFAULT | want)
    if diff:
        def show(v: Any) -> str:
            text = json.dumps(v)
            return text if len(text) <= 40 else text[:37] + "..."

        listed = "; ".join(f"{k} (study {show(a)}, this run {show(b)})"
                           for k, (a, b) in list(diff.items())[:6])
        more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise UserError(
            f"study {study_name!r} in {storage} was created with different settings: "
            f"{listed}{more}. Its trials would not be comparable: resume with the study's "
            "settings, or start a new study with search.study_name=NEW_NAME")


def of_trial(study: Any, trial: Any) -> Config:
    """The config trial `trial` trained with: its own recipe; for trials made before recipes
    were stored, the study's latest run's config (all those versions kept)."""
    stored = trial.user_attrs.get(keys.RECIPE)
    if stored is None:
        last = study.user_attrs.get(keys.LEGACY_CONFIG)
        if last is None:
            raise UserError(f"study {study.study_name!r}, trial {trial.number}: no stored "
                            "recipe (the study was not made by `python -m sweeper`)")
        stored = {k: last[k] for k in SECTIONS if k in last}
    return to_config(stored)
