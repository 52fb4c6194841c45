"""Batched Optuna writes (sweeper/trial_writes.py) store what the per-value calls store, in one
transaction, and keep the trial objects' cached copies in step."""

import math
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from sqlalchemy import event

from sweeper import trial_writes

ATTRS = {"val_acc": 0.98, "epochs_run": 3, "checkpoint": "/x/y.pt", "nested": {"a": [1, 2]},
         "nan": math.nan}


def storage(db_url: Callable[[str], str], name: str = "o",
            heartbeat: int | None = None) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(db_url(name), heartbeat_interval=heartbeat)


def commits(s: optuna.storages.RDBStorage) -> list[int]:
    count = [0]
    event.listen(s.engine, "commit", lambda conn: count.__setitem__(0, count[0] + 1))
    return count


def frozen(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials as a fresh process would read them."""
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_user_attrs_match_one_by_one_in_one_transaction(db_url: Callable[[str], str]) -> None:
    one, batch = storage(db_url, "one"), storage(db_url, "batch")
    s1 = optuna.create_study(storage=one, study_name="s")
    s2 = optuna.create_study(storage=batch, study_name="s")
    t1, t2 = [s1.ask() for _ in range(3)], [s2.ask() for _ in range(3)]
    for i, t in enumerate(t1):
        for k, v in ATTRS.items():
            t.set_user_attr(k, v)
        t.set_user_attr("i", i)
    trial_writes.set_user_attrs({t: {"i": -1} for t in t2})  # then overwritten (upsert)
    n = commits(batch)
    trial_writes.set_user_attrs({t: ATTRS | {"i": i} for i, t in enumerate(t2)})
    assert n[0] == 1
    for a, b, t in zip(frozen(one.url, "s"), frozen(batch.url, "s"), t2, strict=True):
        assert json_equal(a.user_attrs, b.user_attrs)
        assert json_equal(t.user_attrs, b.user_attrs)  # the trial object's cached copy


def json_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k]
        for k in a)


def test_report_stores_values_keeps_first_and_prunes(db_url: Callable[[str], str]) -> None:
    s = storage(db_url)
    study = optuna.create_study(storage=s, study_name="s", direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1,
                                                                   n_warmup_steps=0))
    done = study.ask()
    done.report(0.9, 1)
    study.tell(done, 0.9)
    trials = [study.ask() for _ in range(3)]
    n = commits(s)
    trial_writes.report({t: v for t, v in zip(trials, [0.5, 0.95, math.inf], strict=True)}, 1)
    trial_writes.report({trials[0]: 0.99}, 1)  # already reported: ignored, as Trial.report does
    assert n[0] == 1
    stored = {t.number: t.intermediate_values for t in frozen(s.url, "s")}
    assert stored[1] == {1: 0.5} and stored[2] == {1: 0.95} and stored[3] == {1: math.inf}
    assert [t.should_prune() for t in trials[:2]] == [True, False]


def test_finished_or_unknown_trials_are_refused(db_url: Callable[[str], str]) -> None:
    study = optuna.create_study(storage=storage(db_url), study_name="s")
    t = study.ask()
    study.tell(t, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        trial_writes.set_user_attrs({t: {"late": 1}})
    with pytest.raises(UpdateFinishedTrialError):
        trial_writes.report({t: 0.1}, 5)
    assert frozen(study._storage._backend.url, "s")[0].user_attrs == {}


def test_many_trials_in_chunks(db_url: Callable[[str], str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trial_writes, "ROWS_PER_INSERT", 4)
    study = optuna.create_study(storage=storage(db_url), study_name="s")
    trials = [study.ask() for _ in range(11)]
    trial_writes.set_user_attrs({t: {"a": t.number, "b": -t.number} for t in trials})
    trial_writes.report({t: t.number / 10 for t in trials}, 0)
    for t in frozen(study._storage._backend.url, "s"):
        assert t.user_attrs == {"a": t.number, "b": -t.number}
        assert t.intermediate_values == {0: t.number / 10}


def test_heartbeats_in_one_transaction_and_stale_detection(db_url: Callable[[str], str]) -> None:
    s = storage(db_url, heartbeat=1)
    s.grace_period = 1
    study = optuna.create_study(storage=s, study_name="s")
    trials = [study.ask() for _ in range(3)]
    ids = [t._trial_id for t in trials]
    n = commits(s)
    trial_writes.beat(study._storage, ids[:2])  # the third never beats: never stale
    assert n[0] == 1
    deadline = time.time() + 30
    while set(s._get_stale_trial_ids(study._study_id)) != set(ids[:2]):
        assert time.time() < deadline, "heartbeats never went stale"
        time.sleep(0.2)
    trial_writes.beat(study._storage, ids[:1])  # beats again: alive
    assert set(s._get_stale_trial_ids(study._study_id)) == {ids[1]}


def test_other_storages_take_the_public_calls() -> None:
    study = optuna.create_study(direction="maximize")  # in memory: no RDB internals
    trials = [study.ask() for _ in range(2)]
    trial_writes.set_user_attrs({t: {"k": t.number} for t in trials})
    trial_writes.report({t: 0.5 for t in trials}, 2)
    assert [t.user_attrs for t in study.get_trials()] == [{"k": 0}, {"k": 1}]
    assert [t.intermediate_values for t in study.get_trials()] == [{2: 0.5}] * 2


def test_unknown_trials_and_mixed_batches_write_nothing(db_url: Callable[[str], str]) -> None:
    """All or nothing: one finished (or unknown) trial in a batch refuses the whole write."""
    study = optuna.create_study(storage=storage(db_url), study_name="s")
    running, done = study.ask(), study.ask()
    study.tell(done, 1.0)
    with pytest.raises(UpdateFinishedTrialError):
        trial_writes.set_user_attrs({running: {"a": 1}, done: {"a": 1}})
    with pytest.raises(UpdateFinishedTrialError):
        trial_writes.report({running: 0.5, done: 0.5}, 1)
    ghost = study.ask()
    ghost._trial_id = 10_000  # no such trial in the storage
    with pytest.raises(KeyError, match="no trial with trial_id 10000"):
        trial_writes.set_user_attrs({running: {"a": 1}, ghost: {"a": 1}})
    stored = frozen(study._storage._backend.url, "s")[0]
    assert stored.user_attrs == {} and stored.intermediate_values == {}
    with pytest.raises(ValueError, match="non-negative"):
        trial_writes.report({running: 0.5}, -1)


def test_old_sqlite_writes_row_by_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before SQLite 3.24 (no upsert) attributes go row by row in the same transaction."""
    s = storage(lambda name: f"sqlite:///{tmp_path}/{name}.db")
    study = optuna.create_study(storage=s, study_name="s")
    trials = [study.ask() for _ in range(2)]
    statements: list[str] = []
    event.listen(s.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *args: statements.append(sql))
    trial_writes.set_user_attrs({trials[0]: {"a": 0}})
    assert any("ON CONFLICT" in sql for sql in statements)  # this SQLite upserts
    monkeypatch.setattr(trial_writes.sqlite3, "sqlite_version_info", (3, 23, 0))
    trial_writes.set_user_attrs({trials[1]: {"a": 0}})
    statements.clear()
    n = commits(s)
    trial_writes.set_user_attrs({t: {"a": t.number + 1, "b": "x"} for t in trials})
    assert n[0] == 1 and not any("ON CONFLICT" in sql for sql in statements)
    assert [t.user_attrs for t in frozen(s.url, "s")] == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
