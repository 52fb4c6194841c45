"""Typed config schema. Hydra composes YAML from conf/; `to_config` turns it into these
dataclasses once, at the entry point, and `validate` rejects bad values before any training."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from lightning_modules.metrics import GAP, TRAIN_ACC, VAL_ACC
from sweeper.settings.errors import UserError
from sweeper.settings.keys import N_PARAMS
from sweeper.settings.params import INTEGER_PARAMS, SEARCHABLE

DATASETS = ("mnist", "mnist_sample", "fashion_mnist", "kaggle")
SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "nsga2")
PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")
OBJECTIVES = ("final", "best")
OBJECTIVE_METRICS = (VAL_ACC, TRAIN_ACC, GAP, N_PARAMS)  # what search.objectives may name
PARAM_TYPES = ("int", "float", "categorical")
MODEL_FAMILIES = ("mlp", "cnn", "resnet")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTS = ("none", "affine", "elastic")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STORAGE_SCHEMES = ("sqlite", "postgresql")
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"  # also the default of export/report --storage
DEFAULT_TRACKING = "sqlite:///mlruns/mlflow.db"  # Optuna storages whose study lock we implement

PRECISIONS = ("32", "tf32", "bf16")
POPULATION_FAMILIES = ("mlp", "cnn")  # families with a batched population form


@dataclass
class ParamSpec:
    type: str = "float"
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: Optional[List[Any]] = None
    # width only: sample one width per hidden layer (width_0 .. width_{depth-1}).
    per_layer: bool = False


@dataclass
class DataConfig:
    name: str = "mnist"
    # Folder with the IDX files. null: ~/.cache/sweeper/<name>, downloaded there if missing.
    root: Optional[str] = None
    val_size: int = 10_000
    # mnist only: if the IDX files are missing and the download fails, train on the embedded
    # 5,000-image sample (with a loud warning) instead of stopping.
    fallback_to_sample: bool = True
    # kaggle only: Kaggle Digit Recognizer files (train.csv trains and validates the sweep;
    # test.csv is only read by export, for submission.csv).
    train_csv: Optional[str] = None
    test_csv: Optional[str] = None
    # Train on the first N images of the (seeded) training split; null: all of it.
    train_size: Optional[int] = None
    # Fraction of training labels replaced by uniformly random ones (seeded; validation clean).
    label_noise: float = 0.0


@dataclass
class ModelConfig:
    family: str = "mlp"
    # mlp: hidden layers; cnn: conv blocks; resnet: basic blocks per stage (3 stages)
    depth: int = 2
    # mlp: units per layer; cnn: channels of the first two blocks; resnet: first stage's
    width: int = 512
    dropout: float = 0.2
    kernel: int = 3  # cnn
    channel_mult: float = 2.0  # cnn: channels grow by this factor every second block
    batch_norm: bool = True  # cnn
    # When `family` is searched: each family's depth (families not listed use `depth`).
    depth_by_family: Dict[str, int] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    # none | affine | elastic (affine + elastic); training batches only, on the device
    name: str = "none"
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    translate: float = 0.1  # fraction of the image size, each axis
    scale: float = 0.1  # uniform in [1 - scale, 1 + scale]
    elastic_alpha: float = 34.0  # displacement strength, pixels (Simard et al. 2003)
    elastic_sigma: float = 4.0  # smoothness of the displacement field, pixels


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 5_000
    # Optimizer steps per Lightning step (Keras' steps_per_execution): amortizes Lightning's
    # per-step overhead. Numerically identical to 1.
    steps_per_execution: int = 64
    optimizer: str = "adam"
    # cosine: decay to 0 over max_epochs (per step); onecycle: warm up from lr/25 over the
    # first 30% of steps, then cosine down to ~0; constant: no schedule.
    lr_schedule: str = "cosine"
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    accelerator: str = "auto"
    # 32: float32 everywhere (on GPUs too: TF32 matmuls and convolutions off); tf32: TF32
    # matmuls and convolutions on GPUs that have them (Ampere+; CPU: same as 32); bf16: bfloat16
    # autocast (Lightning's bf16-mixed; weights and optimizer stay float32).
    precision: str = "32"


@dataclass
class SearchConfig:
    n_trials: int = 20
    study_name: str = "default"
    storage: str = DEFAULT_STORAGE
    sampler: str = "tpe"
    pruner: str = "median"
    # Median and percentile pruners: never prune during the first N trials or before epoch N+1.
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int = 3
    # Percentile pruner: stop a trial below this percentile of finished trials at its epoch.
    pruner_percentile: float = 25.0
    # final: val_acc at the last epoch; best: best val_acc over epochs.
    objective: str = "final"
    # Two or more: a multi-objective study, e.g. {val_acc: maximize, n_params: minimize}
    # (metric -> direction, in order; val_acc follows `objective`). Empty: maximize val_acc.
    objectives: Dict[str, str] = field(default_factory=dict)
    max_consecutive_failures: int = 3
    # Weights of the best k complete trials are kept (for export); null dir: beside the storage.
    keep_top_k: int = 3
    checkpoint_dir: Optional[str] = None
    # Optuna heartbeat of a running trial; a trial silent for the grace period is taken for dead
    # (another machine's worker). Dead processes on this host are detected at once.
    heartbeat_interval_s: int = 20
    heartbeat_grace_s: int = 60
    # name -> spec; `name: null` removes a parameter that the defaults put in the space.
    space: Dict[str, ParamSpec] = field(default_factory=dict)
    # Trials trained together as one batched computation (model=mlp or cnn; see
    # sweeper/loop/population.py): N > 1 asks N trials at a time that share an architecture, and
    # trains confirm's seed repeats N at a time. 1: one trial at a time.
    population: int = 1
    # Trials to run first when the study is new (e.g. a known baseline), as {param: value}.
    enqueue: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class TrackingConfig:
    uri: str = DEFAULT_TRACKING
    # null: <folder of the sqlite file>/artifacts, or ./mlruns/artifacts for other URIs.
    artifact_location: Optional[str] = None


@dataclass
class ConfirmConfig:
    # Seed repeats after the sweep: each chosen configuration ends with `seeds` runs in all.
    seeds: int = 0
    top_k: int = 3
    ladder: int = 0
    # Measure the best top_k configurations (every seed) once on the source's labelled test set.
    test: bool = False


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    debug: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)


CONFIG_GROUPS = ("data", "model", "augment", "trainer", "search", "experiment")


def check_overrides(overrides: list[str]) -> None:
    """Hydra reports a config-group choice that is not a name (`data=0`, `model=[1]`) with a full
    traceback; catch that case before Hydra sees it. Everything else Hydra reports in one
    message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for line in [o for o in overrides if not o.startswith("-")]:
        try:
            parsed += parser.parse_overrides([line])
        except Exception as e:
            raise UserError(f"{line}: {_one_line(e)} (the override syntax: "
                            "https://hydra.cc/docs/advanced/override_grammar/basic/)") from None
    for o in parsed:
        if o.key_or_group not in CONFIG_GROUPS or o.is_delete():
            continue
        value = o.value()
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(v, str) for v in names):
            raise UserError(f"{o.input_line}: {o.key_or_group} takes the name of a file in "
                            f"conf/{o.key_or_group}/ (e.g. {o.key_or_group}=NAME)")


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def check_composes(overrides: list[str]) -> None:
    """Compose the config as Hydra will, and turn Hydra's multi-line errors (unknown key,
    missing experiment or group choice) into one line with the closest valid name."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException

    if {"-m", "--multirun"} & set(overrides):  # sweep values: Hydra's sweeper expands them
        return
    plain = [o for o in overrides if not o.startswith(("-", "hydra.", "+hydra.", "~hydra."))]
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose("config", overrides=plain)
    except MissingConfigException as e:
        lines = str(e).splitlines()
        missing = re.search(r"Could not find '([^']+)/([^']+)'", lines[0])
        options = [ln.strip() for ln in lines if ln.startswith("\t") and "=" not in ln]
        if missing is None:
            raise UserError(lines[0]) from None
        group, name = missing.groups()
        raise UserError(f"{group}={name}: no conf/{group}/{name}.yaml{_closest(name, options)}; "
                        f"choose one of: {', '.join(options)}") from None
    except ConfigCompositionException as e:
        bad = re.search(r"Could not override '([^']+)'", str(e))
        if bad is None:
            raise UserError(_one_line(e)) from None
        key = bad.group(1)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            known = _keys(compose("config", overrides=[o for o in plain if "experiment=" in o]))
        if key in known:  # the key exists: the value is what Hydra refused
            raise UserError(_one_line(e)) from None
        raise UserError(f"{key}: no such setting" + (_closest(key, known) or
                                                      f" (to add a new key, write +{key}=...)")
                        ) from None
    except HydraException as e:  # a malformed override (`trainer.lr=[`), ...
        raise UserError(_one_line(e)) from None


def _one_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and "hydra.cc/docs" not in ln and not ln.startswith("Key ")]
    return " ".join(lines)[:300] or type(e).__name__


def _keys(cfg: Any, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, DictConfig):
            out += _keys(v, f"{prefix}{k}.")
    return out


def _closest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def to_config(cfg: DictConfig) -> Config:
    """Merge the composed YAML into the schema: type errors and unknown keys surface here."""
    from sweeper.settings.sweep_grammar import spec_of

    space = OmegaConf.select(cfg, "search.space")
    if isinstance(space, DictConfig):
        with open_dict(space):
            for name in [k for k, v in space.items() if v is None]:
                del space[name]
            for name in [k for k, v in space.items() if isinstance(v, str)]:
                space[name] = spec_of(str(name), space[name])  # `depth: choice(1,2,3)` in YAML
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise UserError(f"config {key or ''}: {msg}".replace("config : ", "config: ")) from e
    assert isinstance(obj, Config)
    return obj


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise UserError(msg)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key}={value!r} is not one of: {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Reject impossible values with one line that names the key and the fix."""
    _check(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32,
           f"seed={cfg.seed} must be an integer from 0 to {2**32 - 1}")
    _one_of("data", cfg.data.name, DATASETS)
    _check(cfg.data.val_size >= 1, f"data.val_size={cfg.data.val_size} must be >= 1")
    _check(cfg.data.train_size is None or cfg.data.train_size >= 1,
           f"data.train_size={cfg.data.train_size} must be >= 1 (or null: all)")
    _check(0 <= cfg.data.label_noise <= 1,
           f"data.label_noise={cfg.data.label_noise} must be a fraction in [0, 1]")
    _check(cfg.data.name != "kaggle" or cfg.data.train_csv is not None,
           "data=kaggle needs data.train_csv=PATH (Kaggle's train.csv)")
    _one_of("model.family", cfg.model.family, MODEL_FAMILIES)
    _check(cfg.model.depth >= 1, f"model.depth={cfg.model.depth} must be >= 1")
    _check(cfg.model.width >= 1, f"model.width={cfg.model.width} must be >= 1")
    _check(0 <= cfg.model.dropout < 1, f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    _check(cfg.model.kernel >= 1 and cfg.model.kernel % 2 == 1,
           f"model.kernel={cfg.model.kernel} must be an odd number >= 1")
    _check(cfg.model.channel_mult > 0, f"model.channel_mult={cfg.model.channel_mult} must be > 0")
    a = cfg.augment
    _one_of("augment", a.name, AUGMENTS)
    _check(a.rotate >= 0 and a.translate >= 0 and 0 <= a.scale < 1 and a.elastic_alpha >= 0
           and a.elastic_sigma > 0, "augment.*: rotate, translate, elastic_alpha >= 0; "
           "scale in [0, 1); elastic_sigma > 0")
    t = cfg.trainer
    _check(t.max_epochs >= 1, f"trainer.max_epochs={t.max_epochs} must be >= 1")
    _check(t.batch_size >= 1, f"trainer.batch_size={t.batch_size} must be >= 1")
    _check(t.eval_batch_size >= 1, f"trainer.eval_batch_size={t.eval_batch_size} must be >= 1")
    _check(t.steps_per_execution >= 1,
           f"trainer.steps_per_execution={t.steps_per_execution} must be >= 1")
    _check(t.lr > 0 and math.isfinite(t.lr), f"trainer.lr={t.lr} must be a positive number")
    _check(t.weight_decay >= 0, f"trainer.weight_decay={t.weight_decay} must be >= 0")
    _check(0 <= t.label_smoothing < 1,
           f"trainer.label_smoothing={t.label_smoothing} must be in [0, 1)")
    _one_of("trainer.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("trainer.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _one_of("trainer.accelerator", t.accelerator, ACCELERATORS)
    _one_of("trainer.precision", t.precision, PRECISIONS)
    s = cfg.search
    _check(s.n_trials >= 1, f"search.n_trials={s.n_trials} must be >= 1")
    _check(bool(s.study_name.strip()), "search.study_name must not be empty")
    _check(s.storage.split(":", 1)[0].split("+", 1)[0] in STORAGE_SCHEMES,
           f"search.storage={s.storage}: use sqlite:///PATH (one machine) or "
           "postgresql://USER:PASSWORD@HOST/DB (workers on many machines)")
    scheme = cfg.tracking.uri.split(":", 1)[0].split("+", 1)[0]
    _check(":" in cfg.tracking.uri and scheme in TRACKING_SCHEMES,
           f"tracking.uri={cfg.tracking.uri}: use sqlite:///PATH/mlflow.db, http(s)://HOST:PORT "
           f"(an MLflow server) or a database URL ({', '.join(TRACKING_SCHEMES)})")
    _one_of("search.sampler", s.sampler, SAMPLERS)
    _one_of("search.pruner", s.pruner, PRUNERS)
    _check(0 < s.pruner_percentile < 100,
           f"search.pruner_percentile={s.pruner_percentile} must be between 0 and 100")
    _one_of("search.objective", s.objective, OBJECTIVES)
    _check(s.population >= 1, f"search.population={s.population} must be >= 1")
    _check(len(s.objectives) != 1, "search.objectives: list two or more (one objective is "
           "search.objective: validation accuracy, maximized)")
    for metric, direction in s.objectives.items():
        _one_of("search.objectives", metric, OBJECTIVE_METRICS)
        _one_of(f"search.objectives.{metric}", direction, ("maximize", "minimize"))
    _check(not (s.objectives and s.sampler == "cmaes"), "search.sampler=cmaes cannot optimize "
           "several objectives; use tpe, nsga2, random, qmc or grid")
    _check(not ("size" in s.space and "width" in s.space),
           "search.space: size and width both set the width; search one of them (width: null)")
    for fam, d in cfg.model.depth_by_family.items():
        _one_of("model.depth_by_family", fam, MODEL_FAMILIES)
        _check(d >= 1, f"model.depth_by_family.{fam}={d} must be >= 1")
    _check("augment_strength" not in s.space or cfg.augment.name != "none",
           "search.space.augment_strength scales the augmentation: pick one (augment=affine or "
           "augment=elastic)")
    _check(s.population == 1 or (cfg.model.family in POPULATION_FAMILIES
                                 and "family" not in s.space),
           f"search.population={s.population} works for model=mlp and model=cnn (one family "
           "per study, not a searched one)")
    _check(s.max_consecutive_failures >= 1, "search.max_consecutive_failures must be >= 1")
    _check(s.keep_top_k >= 0, f"search.keep_top_k={s.keep_top_k} must be >= 0")
    _check(s.heartbeat_interval_s >= 1, "search.heartbeat_interval_s must be >= 1")
    _check(s.heartbeat_grace_s > s.heartbeat_interval_s,
           "search.heartbeat_grace_s must be longer than search.heartbeat_interval_s")
    _check(bool(s.space), "search.space is empty: pick an experiment (+experiment=depth_vs_width) "
           "or define search.space in YAML (see docs/guide.md, 'Writing a search space')")
    for name, spec in s.space.items():
        _validate_param(name, spec, s.sampler)
    if s.sampler == "grid":
        points = math.prod(grid_count(spec) for spec in s.space.values())
        _check(points <= MAX_GRID, f"search.space: the grid has {points:,} points, more than "
               f"{MAX_GRID:,}; use larger steps or fewer values (or another sampler)")
    c = cfg.confirm
    _check(c.seeds >= 0 and c.top_k >= 0 and c.ladder >= 0,
           "confirm.seeds, confirm.top_k and confirm.ladder must be >= 0")
    for i, fixed in enumerate(s.enqueue):
        unknown = sorted(set(fixed) - set(s.space))
        _check(not unknown, f"search.enqueue[{i}]: {unknown} not in search.space")


MAX_GRID = 1_000_000  # grid points (the grid sampler lists every one)
MAX_INT = 2**31
MAX_STEPS = 10**15  # values of one stepped parameter


def grid_count(p: ParamSpec) -> int:
    """How many values the grid takes of one validated parameter, without listing them."""
    if p.type == "categorical":
        return len(p.choices or [])
    if p.step is None:  # low == high
        return 1
    with localcontext() as exact:  # enough digits for a count of any size (1e30 / 1e-4)
        exact.prec = 1000
        lo, hi, step = (Decimal(str(v)) for v in (p.low, p.high, p.step))
        return int((hi - lo) // step) + 1


def _validate_param(name: str, p: ParamSpec, sampler: str) -> None:
    key = f"search.space.{name}"
    _check(name in SEARCHABLE, f"{key}: unknown parameter; searchable: {', '.join(SEARCHABLE)}")
    _one_of(f"{key}.type", p.type, PARAM_TYPES)
    _check(name not in INTEGER_PARAMS or p.type != "float",
           f"{key}: {name} takes integers; use type: int (or categorical)")
    _check(not p.per_layer or name == "width", f"{key}.per_layer is only supported for width")
    _check(not (p.per_layer and sampler == "grid"),
           f"{key}.per_layer: the grid sampler needs a fixed set of parameters; use one width")
    if p.type == "categorical":
        _check(bool(p.choices), f"{key}: categorical needs a non-empty 'choices' list")
        values = list(p.choices or [])
    else:
        _check(p.low is not None and p.high is not None, f"{key}: {p.type} needs 'low' and 'high'")
        _check(p.choices is None, f"{key}: 'choices' is only for type: categorical")
        num = (int,) if p.type == "int" else (int, float)
        for bound in ("low", "high", "step"):
            v = getattr(p, bound)
            _check(v is None or (isinstance(v, num) and not isinstance(v, bool)),
                   f"{key}.{bound}={v!r} must be {'an integer' if p.type == 'int' else 'a number'}")
        _check(p.low <= p.high, f"{key}: empty range, low={p.low} > high={p.high}")
        _check(not (p.log and p.low <= 0), f"{key}: log scale needs low > 0 (got {p.low})")
        _check(not (p.log and p.step is not None), f"{key}: use either log or step, not both")
        _check(p.step is None or p.step > 0, f"{key}.step={p.step} must be > 0")
        # Optuna's own step arithmetic has 28 digits (more steps: an error at the first trial)
        _check(p.step is None or grid_count(p) <= MAX_STEPS,
               f"{key}: more than {MAX_STEPS:.0e} steps of {p.step} from {p.low} to {p.high}; "
               "use a larger step")
        if sampler == "grid":
            _check(p.step is not None or p.low == p.high,
                   f"{key}: search.sampler=grid needs 'step' (or type: categorical) for every "
                   "parameter")
        # Sizes past this overflow the arithmetic of the memory estimate and of the layers
        # themselves long before they could fit anywhere.
        if p.type == "int" and max(abs(p.low), abs(p.high)) >= MAX_INT:
            big = max(abs(p.low), abs(p.high))
            shown = f"{big:.4g}" if big < 1e300 else "a number of more than 300 digits"
            raise UserError(f"{key}: {shown} is out of range: must be below 2**31")
        values = [p.low, p.high]
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    checks = {
        "depth": (lambda v: isinstance(v, int) and v >= 1, "depth must be an integer >= 1"),
        "width": (lambda v: isinstance(v, int) and v >= 1, "width must be an integer >= 1"),
        "batch_size": (lambda v: isinstance(v, int) and v >= 1, "batch_size must be an int >= 1"),
        "dropout": (lambda v: number(v) and 0 <= v < 1, "dropout must be in [0, 1)"),
        "lr": (lambda v: number(v) and v > 0, "lr must be > 0"),
        "weight_decay": (lambda v: number(v) and v >= 0, "weight_decay must be >= 0"),
        "family": (lambda v: v in MODEL_FAMILIES, f"family must be one of {MODEL_FAMILIES}"),
        "size": (lambda v: isinstance(v, int) and v >= 100, "size (parameters) must be >= 100"),
        "kernel": (lambda v: isinstance(v, int) and v >= 1 and v % 2 == 1,
                   "kernel must be an odd integer >= 1"),
        "channel_mult": (lambda v: number(v) and v > 0, "channel_mult must be > 0"),
        "batch_norm": (lambda v: isinstance(v, bool), "batch_norm must be true or false"),
        "label_smoothing": (lambda v: number(v) and 0 <= v < 1, "label_smoothing in [0, 1)"),
        "augment_strength": (lambda v: number(v) and v >= 0, "augment_strength must be >= 0"),
    }
    ok, why = checks[name]
    for v in values:
        _check(ok(v), f"{key}: {v!r} is out of range: {why}")
