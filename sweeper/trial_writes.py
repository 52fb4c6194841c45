"""Many trials' Optuna writes in one database transaction, a few statements each.

Each `trial.set_user_attr`, `trial.report` and heartbeat is a transaction of its own in Optuna,
with a read of the trial before every write (~2 ms in the SQLite store here). A finished trial
wrote 15 user attributes, and a population of 256 members wrote 256 intermediate values and 256
heartbeats one by one: about half of what a tiny trial cost outside training
(`scripts/bench_bookkeeping.py`). Here all trials' rows of one kind go in one transaction: one
read of the trials' states, one multi-row insert. This uses Optuna's RDB tables and helpers,
which are internals, so they are checked for first; without them (another storage, another
Optuna) the public per-value calls run instead: slower, same result.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import optuna

Session = Any  # sqlalchemy.orm.Session
ROWS_PER_INSERT = 200  # rows (or ids) per statement: x 4 columns < SQLite's old 999 limit


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), ROWS_PER_INSERT):
        yield items[i:i + ROWS_PER_INSERT]


def _backend(storage: Any) -> optuna.storages.RDBStorage | None:
    """The RDB storage behind `storage` (Optuna's cache, or our snapshot, wraps it) when its
    internals are the ones used here."""
    backend = getattr(storage, "_backend", storage)
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session  # noqa: F401
    except ImportError:
        return None
    needed = [(backend, "scoped_session"), (backend, "check_trial_is_updatable"),
              (models, "TrialModel"), (models, "TrialUserAttributeModel"),
              (models, "TrialIntermediateValueModel"), (models, "TrialHeartbeatModel")]
    if not isinstance(backend, optuna.storages.RDBStorage) or \
            not all(hasattr(obj, name) for obj, name in needed) or \
            not hasattr(models.TrialIntermediateValueModel, "intermediate_value_to_stored_repr"):
        return None
    return backend


def _rdb(trials: Iterable[optuna.Trial]) -> optuna.storages.RDBStorage | None:
    """The RDB storage of these trials, when they share one and each has its cached copy (what
    trial.user_attrs and trial.report read, kept up to date here as Optuna does)."""
    trials = list(trials)
    storages = {id(t.storage): t.storage for t in trials}
    if len(storages) != 1 or not all(isinstance(getattr(t, "_cached_frozen_trial", None),
                                                optuna.trial.FrozenTrial) for t in trials):
        return None
    return _backend(next(iter(storages.values())))


def _one_transaction(backend: optuna.storages.RDBStorage, trial_ids: list[int],
                     write: Callable[[Session], None]) -> None:
    """write(session) after checking, in one read, that every trial can still be written."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session) as session:  # commits once, at the end
        Trial = models.TrialModel
        states: dict[int, Any] = {}
        for ids in _chunks(trial_ids):
            states |= dict(session.query(Trial.trial_id, Trial.state)
                           .filter(Trial.trial_id.in_(ids)).all())
        for trial_id in trial_ids:
            if trial_id not in states:
                raise KeyError(f"no trial with trial_id {trial_id}")
            backend.check_trial_is_updatable(trial_id, states[trial_id])
        write(session)


def _insert(session: Session, backend: optuna.storages.RDBStorage, model: Any,
            rows: list[dict[str, Any]], upsert_on: tuple[str, ...], update: str) -> None:
    """Insert rows; a row whose `upsert_on` columns exist already updates `update` there."""
    dialect = backend.engine.name
    for chunk in _chunks(rows):
        if dialect == "postgresql" or (dialect == "sqlite" and
                                       sqlite3.sqlite_version_info >= (3, 24, 0)):  # upsert
            from sqlalchemy.dialects import postgresql, sqlite

            upsert: Any = (sqlite if dialect == "sqlite" else postgresql).insert(model)
            stmt = upsert.values(chunk)
            session.execute(stmt.on_conflict_do_update(
                index_elements=[getattr(model, c) for c in upsert_on],
                set_={update: getattr(stmt.excluded, update)}))
        elif dialect == "mysql":
            from sqlalchemy.dialects import mysql

            stmt = mysql.insert(model).values(chunk)
            session.execute(stmt.on_duplicate_key_update(
                **{update: getattr(stmt.inserted, update)}))
        else:  # row by row, as Optuna does for other databases
            for row in chunk:
                found = session.query(model).filter_by(
                    **{c: row[c] for c in upsert_on}).one_or_none()
                if found is None:
                    session.add(model(**row))
                else:
                    setattr(found, update, row[update])


def set_user_attrs(attrs: Mapping[optuna.Trial, Mapping[str, Any]]) -> None:
    """trial.set_user_attr(k, v) for every trial and item, in one transaction."""
    trials = [t for t, a in attrs.items() if a]
    if not trials:
        return
    backend = _rdb(trials)
    if backend is None:
        for trial in trials:
            for k, v in attrs[trial].items():
                trial.set_user_attr(k, v)
        return
    from optuna.storages._rdb import models

    rows = [{"trial_id": t._trial_id, "key": k, "value_json": json.dumps(v)}
            for t in trials for k, v in attrs[t].items()]
    _one_transaction(backend, [t._trial_id for t in trials], lambda session: _insert(
        session, backend, models.TrialUserAttributeModel, rows, ("trial_id", "key"),
        "value_json"))
    for trial in trials:  # what trial.user_attrs reads (Trial.set_user_attr does the same)
        trial._cached_frozen_trial.user_attrs.update(attrs[trial])


def report(values: Mapping[optuna.Trial, float], step: int) -> None:
    """trial.report(value, step) for every trial (single-objective studies), in one
    transaction. As in Trial.report, a step a trial has already reported keeps its first value
    (without Trial.report's warning)."""
    step = int(step)
    if step < 0:
        raise ValueError(f"step={step} must be non-negative")
    trials = list(values)
    backend = _rdb(trials)
    if backend is None:
        for trial in trials:
            trial.report(values[trial], step)
        return
    new = [t for t in trials if step not in t._cached_frozen_trial.intermediate_values]
    if not new:
        return
    from optuna.storages._rdb import models

    Model = models.TrialIntermediateValueModel
    rows = []
    for t in new:
        stored, kind = Model.intermediate_value_to_stored_repr(float(values[t]))
        rows.append({"trial_id": t._trial_id, "step": step, "intermediate_value": stored,
                     "intermediate_value_type": kind})

    def write(session: Session) -> None:
        # No upsert: Optuna keeps a step's first value, and the cached copy holds every step
        # this trial has written (the check above).
        for chunk in _chunks(rows):
            session.execute(Model.__table__.insert(), chunk)

    _one_transaction(backend, [t._trial_id for t in new], write)
    for t in new:
        t._cached_frozen_trial.intermediate_values[step] = float(values[t])


def beat(storage: Any, trial_ids: list[int]) -> None:
    """storage.record_heartbeat(id) for every trial, in one transaction (the heartbeat row made
    or set to the database's now(), as RDBStorage.record_heartbeat does for one)."""
    backend = _backend(storage)
    if backend is None:
        for trial_id in trial_ids:
            storage.record_heartbeat(trial_id)
        return
    import sqlalchemy
    from optuna.storages._rdb import models

    def write(session: Session) -> None:
        Model = models.TrialHeartbeatModel
        now = session.execute(sqlalchemy.func.now()).scalar()
        found = {h.trial_id: h for ids in _chunks(trial_ids) for h in session.query(Model)
                 .filter(Model.trial_id.in_(ids)).with_for_update()}
        for trial_id in trial_ids:
            if trial_id in found:
                found[trial_id].heartbeat = now
            else:
                session.add(Model(trial_id=trial_id))  # its column defaults to now()

    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        write(session)
