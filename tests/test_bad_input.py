"""Fuzzing the entry points. The claim of these tests is robustness only: whatever is thrown at
them, the outcome is success or a clean one-line error (UserError, or Hydra's own compact error
for malformed overrides), never a crash or a traceback; a sound input that validates must also
be usable (its space sampleable within bounds, its IDX or CSV parsed to the declared shape).
That each error says the right thing is tested case by case elsewhere (test_cli.py,
test_idx.py, test_kaggle.py, test_faults_round2.py). Examples per test: 25 locally, 250 in CI
(tests/conftest.py)."""

import gzip
import struct
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import CompactHydraException, HydraException
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from sweeper.settings import search_space
from sweeper.settings.config import check_overrides, to_config, validate
from sweeper.settings.errors import UserError
from sweeper.train import idx, kaggle
from tests.cli import refusal

CONF = Path(__file__).resolve().parents[1] / "conf"
KEYS = ["search.n_trials", "trainer.max_epochs", "trainer.batch_size", "trainer.lr",
        "model.dropout", "model.depth", "search.sampler", "search.pruner", "data.val_size",
        "search.objective", "search.space.depth.low", "search.space.width.high",
        "search.space.width.log", "search.space.dropout.type", "search.space.lr.step", "seed",
        "data", "model", "search.study_name", "search.space.lr", "trainer.steps_per_execution"]
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(str),
    st.sampled_from(["", "null", "true", "[1,2]", "{a: 1}", "nan", "-inf", "1e-300", "tpe",
                     "grid", "categorical", "mnist", "'quoted'", "${oops}", "~", "=", "[", "}"]),
    st.text(max_size=12))


def outcome_is_clean(overrides: list[str]) -> None:
    try:
        check_overrides(overrides)  # what `python -m sweeper` runs before Hydra
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = to_config(compose(config_name="config", overrides=overrides))
        validate(cfg)
    except (UserError, CompactHydraException):
        return
    except HydraException as e:  # Hydra prints these without a traceback too, as one message
        assert "\n" not in str(e).strip() or "override" in str(e).lower(), e


@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_random_overrides_run_or_are_refused_in_one_line(pairs):
    outcome_is_clean(["+experiment=smoke", *(f"{k}={v}" for k, v in pairs)])


SPEC = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["int", "float", "categorical", "cube", ""]),
    "low": st.one_of(st.integers(-5, 3000), st.floats(-1, 2, allow_nan=False), st.none()),
    "high": st.one_of(st.integers(-5, 3000), st.floats(-1, 2, allow_nan=False), st.none()),
    "log": st.booleans(),
    "step": st.one_of(st.none(), st.integers(-1, 64), st.floats(0, 0.5, allow_nan=False)),
    "choices": st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 512),
                                                       st.floats(0, 1, allow_nan=False)),
                                             max_size=3)),
    "per_layer": st.booleans()})


@given(st.dictionaries(st.sampled_from(["depth", "width", "dropout", "lr", "batch_size",
                                        "momentum"]), SPEC, min_size=1, max_size=4),
       st.sampled_from(["tpe", "random", "grid"]))
def test_random_search_spaces_are_refused_in_one_line_or_sampleable(space, sampler):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        raw = compose(config_name="config", overrides=["+experiment=smoke"])
    raw.search.space = OmegaConf.create(space)
    raw.search.sampler = sampler
    try:
        cfg = to_config(raw)
        validate(cfg)
    except UserError:
        return
    # A space that validates must be sampleable, within its bounds.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        params = search_space.suggest(study.ask(), cfg.search.space, cfg.model.depth)
        for name, value in params.items():
            spec = cfg.search.space[name.split("_")[0] if name.startswith("width_") else name]
            if spec.type != "categorical":
                assert spec.low <= value <= spec.high
    if sampler == "grid":
        assert all(search_space.grid(cfg.search.space).values())


def _valid_idx() -> bytes:
    return struct.pack(">HBBIII", 0, 8, 3, 2, 28, 28) + bytes(2 * 28 * 28)


@given(st.one_of(
    st.binary(max_size=64),
    st.tuples(st.integers(0, 2 * 28 * 28 + 15), st.binary(max_size=8)).map(
        lambda cut: _valid_idx()[:cut[0]] + cut[1]),
    st.tuples(st.integers(0, 15), st.integers(0, 255)).map(
        lambda pos: _valid_idx()[:pos[0]] + bytes([pos[1]]) + _valid_idx()[pos[0] + 1:])),
    st.booleans())
def test_random_idx_bytes_are_read_or_refused_in_one_line(tmp_path_factory, data, gz):
    path = tmp_path_factory.mktemp("idx") / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    try:
        a = idx.read_idx(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert a.dtype.name == "uint8" and a.ndim in (1, 3)


@pytest.mark.parametrize("overrides, message", [
    (["tracking.uri=sqlite:///{file}/mlflow.db"], "cannot write to"),
    (["search.storage=sqlite:///{file}/optuna.db"], "cannot write to"),
    (["search.storage=postgresql://nobody@127.0.0.1:1/none"], "cannot open the Optuna storage"),
    (["search.storage=nosuchdb://host/x"], "use sqlite:///PATH (one machine) or postgresql"),
    (["search.space.depth.type=cube"], "type='cube' is not one of"),
    (["+search.space.momentum={{type: float, low: 0.1, high: 0.9}}"], "unknown parameter"),
    (["data=0"], "data takes the name of a file in conf/data/"),
])
def test_bad_stores_and_spaces_from_the_command_line(tmp_path, overrides, message):
    (tmp_path / "file").write_text("not a folder")
    assert message in refusal(tmp_path, "+experiment=smoke",
                              *(o.format(file=tmp_path / "file") for o in overrides))
    # stores are checked before anything is written: no study was created
    assert not (tmp_path / "mlruns" / "optuna.db").exists()


CELL = st.one_of(st.integers(-3, 300).map(str), st.sampled_from(["", "1.5", "x", " 7", "1e2",
                                                                 "nan", "255", "0"]))


@given(st.lists(st.lists(CELL, min_size=783, max_size=787), min_size=0, max_size=3),
       st.sampled_from(["train", "test"]), st.integers(0, 3))
def test_random_kaggle_rows_are_read_or_refused_in_one_line(tmp_path_factory, rows, kind,
                                                            header_damage):
    columns = (["label"] if kind == "train" else []) + kaggle.PIXELS
    if header_damage == 1:
        columns = columns[:-1]
    elif header_damage == 2:
        columns = [*columns, "extra"]
    path = tmp_path_factory.mktemp("csv") / f"{kind}.csv"
    path.write_text("\n".join([",".join(columns), *(",".join(r) for r in rows)]) + "\n")
    try:
        out = kaggle.read_train(path)[0] if kind == "train" else kaggle.read_test(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert out.dtype.name == "uint8" and out.shape[1:] == (28, 28) and len(out) == len(rows)
