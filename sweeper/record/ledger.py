"""The study's record, written from one place: every write to a trial's record and to a seed
repeat's, and who is alive to hold them.

A worker's trials. `ask` stamps each asked trial with its owner (keys.WORKER) and recipe and
records its first heartbeat, under the study lock, in the moment it is asked. From then until
its tell or release the trial is *held*, and the ledger's one heartbeat thread beats every
trial this worker holds: a population's members waiting for their part are held as much as the
part training now. `set_attrs`, `report` and `tell` (`tell_all`: a population's ends, their
attributes in one write) write to held trials; a trial that another worker has ended meanwhile
(taken for dead) refuses them, as Optuna's own calls do, and only that trial: `tell` then
returns None. `release` ends a held trial that will not finish, and
`recover` what dead workers left: RUNNING trials (failed, their runs KILLED, their
configurations queued again) and MLflow runs left RUNNING.

Seed repeats (keys.REPEAT.N.K on the study). A claim is {worker, beat}, the beat read from the
database's clock; claims are compare-and-set under the study lock (`claim`, `renew`, `finish`,
`unclaim`), so a claim taken, renewed late or released never replaces a result, and workers
with unsynchronised clocks judge one another on one clock. The heartbeat thread renews them.

Batched writes. Optuna's public calls write one value per transaction, each after a read of the
trial. A population of N members writes N attributes, intermediate values and heartbeats at a
time: `_Batched` writes them in one transaction through Optuna's RDB tables (Optuna internals:
the versions in pyproject.toml). Before it is used, a self-check writes through it in a
scratch study, reads back through Optuna's public API and checks that a finished trial is
refused alone; when anything disagrees (another Optuna, another storage) the ledger uses the
public calls: slower, the same record. Optuna's other internals sweeper needs are here too:
the trial's storage id, the snapshot of reads a population's ask works on, a trial read by id.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sqlite3
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import BEST_EPOCH, BEST_VAL_ACC, EPOCHS_RUN, VAL_ACC
from sweeper.record import liveness, repeat_records
from sweeper.record.study_lock import StudyLock
from sweeper.record.tracking import Tracker
from sweeper.settings import keys

AnyTrial = optuna.Trial | FrozenTrial
Session = Any  # sqlalchemy.orm.Session
ROWS_PER_STATEMENT = 200  # rows (or ids) per statement: x 4 columns < SQLite's old 999 limit
SELF_CHECK_PREFIX = "sweeper.self-check."  # the scratch study's name (deleted at once)
ORPHAN = "its process ended before it could end this run (killed, or the machine lost)"


def trial_id(trial: AnyTrial) -> int:
    """Optuna's storage id of a trial (its heartbeat and storage calls are keyed by it)."""
    return trial._trial_id


def rdb_of(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    """The RDB storage under the study's storage (Optuna's cache wraps it), else None."""
    storage = getattr(study._storage, "_backend", study._storage)
    return storage if isinstance(storage, optuna.storages.RDBStorage) else None


def frozen(study: optuna.Study, trial: AnyTrial) -> FrozenTrial:
    """One trial read (all trials would be O(running trials) with Optuna's cached storage)."""
    return study._storage.get_trial(trial_id(trial))


def db_now(study: optuna.Study) -> float:
    """The database's clock in seconds since the epoch: workers' own clocks may disagree."""
    rdb = rdb_of(study)
    if rdb is None:  # in memory: one process, one clock
        return time.time()
    import sqlalchemy

    now_fn = sqlalchemy.func.utc_timestamp() if rdb.engine.name == "mysql" else \
        sqlalchemy.func.now()
    with rdb.engine.connect() as conn:
        now = conn.execute(sqlalchemy.select(now_fn)).scalar_one()
    if isinstance(now, str):  # SQLite without a type: "YYYY-MM-DD HH:MM:SS"
        now = datetime.fromisoformat(now)
    if now.tzinfo is None:  # SQLite's CURRENT_TIMESTAMP (and MySQL's UTC_TIMESTAMP) are UTC
        now = now.replace(tzinfo=UTC)
    return now.timestamp()


def claim_is_live(record: Any, now: float, grace_s: float) -> bool:
    """A seed repeat's claim whose worker is alive: not dead here, and renewed within the grace
    period (`now`: the database's clock; claims of earlier versions used the worker's)."""
    if not isinstance(record, dict) or keys.CLAIMED_BY not in record:
        return False
    return not liveness.is_dead_here(record[keys.CLAIMED_BY]) and (
        now - float(record.get(keys.CLAIM_BEAT, 0)) <= grace_s)


# ---------------------------------------------------------------------------------------------
# Reads while a population is asked or pruned.

@contextlib.contextmanager
def snapshot(study: optuna.Study) -> Iterator[Snapshot]:
    """Within the block, the study's trial list is read once (plus trials added to it).
    Optuna's cached RDB storage re-reads every unfinished trial on each get_all_trials, and
    ask() (TPE with constant liar) and should_prune() (median pruner) read the list once per
    trial: N members made that O(N^2) rows per population and per epoch (asking 256 tiny MLPs
    took 48 s of a 111 s study on the CPU; 6 s with this). Writes go through to the storage;
    trials asked within the block use the real storage after it."""
    storage = study._storage
    reads = Snapshot(storage, study._study_id)
    study._storage = reads  # type: ignore[assignment]
    try:
        yield reads
    finally:
        study._storage = storage
        for trial in reads.asked:
            trial.storage = storage


class Snapshot:
    def __init__(self, storage: Any, study_id: int):
        self._storage, self._study_id = storage, study_id
        self._trials = {t._trial_id: t for t in storage.get_all_trials(study_id, deepcopy=False)}
        self.asked: list[optuna.Trial] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def add(self, trial: optuna.Trial) -> None:
        # A storage read, not the Trial's own copy: samplers write system attrs the copy
        # lacks (GridSampler's grid_id, which the next member must see as taken).
        self._trials[trial_id(trial)] = self._storage.get_trial(trial_id(trial))
        self.asked.append(trial)

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Any = None) -> list[FrozenTrial]:
        if study_id != self._study_id:
            return self._storage.get_all_trials(study_id, deepcopy, states)
        trials = sorted(self._trials.values(), key=lambda t: t.number)
        if states is not None:
            trials = [t for t in trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


def set_system_attrs(study: optuna.Study, trial: FrozenTrial, attrs: dict[str, Any]) -> None:
    """A sampler's own marks on a trial it is about to sample (as Optuna's GridSampler does)."""
    for k, v in attrs.items():
        study._storage.set_trial_system_attr(trial_id(trial), k, v)


# ---------------------------------------------------------------------------------------------
# Many trials' writes in one transaction.

class _Batched:
    """Attributes, intermediate values and heartbeats of many trials in one transaction, through
    Optuna's RDB tables: one read of the trials' states, multi-row statements. What a trial
    that is finished (or unknown) would refuse is not written, and only for that trial."""

    def __init__(self, rdb: optuna.storages.RDBStorage):
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        self.rdb, self.models, self._session = rdb, models, _create_scoped_session
        self.dialect = rdb.engine.name
        models.TrialIntermediateValueModel.intermediate_value_to_stored_repr  # noqa: B018

    def write(self, attrs: Mapping[int, Mapping[str, Any]], values: Mapping[int, float],
              step: int, beats: list[int]) -> set[int]:
        """user attributes by trial id, intermediate `values` at `step`, heartbeats of `beats`:
        those of running trials, in one transaction. Returns the ids refused."""
        import sqlalchemy

        m = self.models
        ids = sorted(set(attrs) | set(values) | set(beats))
        with self._session(self.rdb.scoped_session) as session:  # commits at the end
            running: set[int] = set()
            for chunk in _chunks(ids):
                query = session.query(m.TrialModel.trial_id, m.TrialModel.state) \
                    .filter(m.TrialModel.trial_id.in_(chunk))
                running |= {i for i, state in query if state == TrialState.RUNNING}
            rows = [{"trial_id": i, "key": k, "value_json": json.dumps(v)}
                    for i, a in attrs.items() if i in running for k, v in a.items()]
            self._upsert(session, m.TrialUserAttributeModel, rows, ("trial_id", "key"),
                         ("value_json",))
            stored = m.TrialIntermediateValueModel.intermediate_value_to_stored_repr
            rows = [{"trial_id": i, "step": step, "intermediate_value": s,
                     "intermediate_value_type": kind}
                    for i, v in values.items() if i in running
                    for s, kind in [stored(float(v))]]
            self._upsert(session, m.TrialIntermediateValueModel, rows, ("trial_id", "step"),
                         ("intermediate_value", "intermediate_value_type"))
            beating = [i for i in beats if i in running]
            if beating:  # as RDBStorage.record_heartbeat: the row made or set to now()
                now = session.execute(sqlalchemy.func.now()).scalar()
                self._upsert(session, m.TrialHeartbeatModel,
                             [{"trial_id": i, "heartbeat": now} for i in beating], ("trial_id",),
                             ("heartbeat",))
        return set(ids) - running

    def _upsert(self, session: Session, model: Any, rows: list[dict[str, Any]],
                on: tuple[str, ...], update: tuple[str, ...]) -> None:
        """Insert rows; a row whose `on` columns exist already takes the new `update` values
        (what Optuna's per-value calls do)."""
        for chunk in _chunks(rows):
            if self.dialect == "postgresql" or (self.dialect == "sqlite" and
                                                sqlite3.sqlite_version_info >= (3, 24, 0)):
                from sqlalchemy.dialects import postgresql, sqlite

                dialect: Any = sqlite if self.dialect == "sqlite" else postgresql
                stmt = dialect.insert(model).values(chunk)
                session.execute(stmt.on_conflict_do_update(
                    index_elements=[getattr(model, c) for c in on],
                    set_={c: getattr(stmt.excluded, c) for c in update}))
            elif self.dialect == "mysql":
                from sqlalchemy.dialects import mysql

                stmt = mysql.insert(model).values(chunk)
                session.execute(stmt.on_duplicate_key_update(
                    **{c: getattr(stmt.inserted, c) for c in update}))
            else:  # row by row, as Optuna does for other databases
                for row in chunk:
                    found = session.query(model).filter_by(**{c: row[c] for c in on}) \
                        .one_or_none()
                    if found is None:
                        session.add(model(**row))
                    else:
                        for c in update:
                            setattr(found, c, row[c])

    def heartbeat_rows(self, trial: int) -> list[Any]:
        """The heartbeat rows of a trial (the self-check's read of Optuna's own writes)."""
        m = self.models
        with self._session(self.rdb.scoped_session) as session:
            return [h.heartbeat for h in session.query(m.TrialHeartbeatModel)
                    .filter(m.TrialHeartbeatModel.trial_id == trial)]


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for i in range(0, len(items), ROWS_PER_STATEMENT):
        yield items[i:i + ROWS_PER_STATEMENT]


_CHECKED: dict[str, str | None] = {}  # storage URL -> None (batched writes agree) or why not


def batched_writes(rdb: optuna.storages.RDBStorage | None) -> tuple[_Batched | None, str | None]:
    """(the batched writer, None) when its self-check passes on this storage (once per process
    and URL), else (None, why not)."""
    if rdb is None:
        return None, "not a relational storage"
    if rdb.url not in _CHECKED:
        _CHECKED[rdb.url] = self_check(rdb)
    why = _CHECKED[rdb.url]
    return (_Batched(rdb), None) if why is None else (None, why)


def self_check(rdb: optuna.storages.RDBStorage) -> str | None:
    """Write through _Batched in a scratch study and read back through Optuna's public API:
    None when everything agrees, else what did not."""
    try:
        batched = _Batched(rdb)
    except (ImportError, AttributeError) as e:
        return f"Optuna {optuna.__version__} lacks what batched writes use ({e})"
    study_id = None
    try:
        # Scratch studies of checks on this machine whose process was killed mid-check.
        with contextlib.suppress(Exception):  # tidying only: never a reason to fail the check
            for old in rdb.get_all_studies():
                owner = old.study_name.removeprefix(SELF_CHECK_PREFIX).rpartition("/")[0]
                if old.study_name.startswith(SELF_CHECK_PREFIX) and owner and \
                        liveness.is_dead_here(owner):
                    rdb.delete_study(old._study_id)
        study_id = rdb.create_new_study(
            [StudyDirection.MAXIMIZE],
            f"{SELF_CHECK_PREFIX}{liveness.this_worker()}/{uuid.uuid4().hex}")
        running, done = rdb.create_new_trial(study_id), rdb.create_new_trial(study_id)
        rdb.set_trial_state_values(done, TrialState.COMPLETE, [1.0])
        rdb.set_trial_user_attr(running, "a", "public")  # the batch overwrites both
        rdb.set_trial_intermediate_value(running, 1, 0.25)
        rdb.record_heartbeat(running)
        if len(batched.heartbeat_rows(running)) != 1:
            return "Optuna's heartbeat is not where batched writes look for it"
        attrs = {"a": 1, "nested": {"b": [1.5, None]}, "text": "x"}
        refused = batched.write({running: attrs, done: {"a": 2}}, {running: 0.5, done: 0.5}, 1,
                                [running, done])
        if refused != {done}:
            return f"refused {sorted(refused)}, not only the finished trial"
        got, got_done = rdb.get_trial(running), rdb.get_trial(done)
        if got.user_attrs != attrs or got_done.user_attrs:
            return "user attributes read back differ"
        if got.intermediate_values != {1: 0.5} or got_done.intermediate_values:
            return "intermediate values read back differ"
        if len(batched.heartbeat_rows(running)) != 1 or batched.heartbeat_rows(done):
            return "heartbeats read back differ"
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if study_id is not None:
            with contextlib.suppress(Exception):
                rdb.delete_study(study_id)


# ---------------------------------------------------------------------------------------------
# The ledger of one worker.

class Ledger:
    """This worker's trials and seed repeats, and the one heartbeat that keeps them. A context
    manager: the heartbeat thread runs inside the `with`."""

    def __init__(self, study: optuna.Study, lock: StudyLock | None = None,
                 interval_s: float = 20, grace_s: float = 60):
        self.study, self.interval_s, self.grace_s = study, interval_s, grace_s
        self.lock = lock or StudyLock("sqlite:///:memory:", study.study_name)
        self.worker = liveness.this_worker()
        self.batched, self.why_not_batched = batched_writes(rdb_of(study))
        self.beating = getattr(study._storage, "get_heartbeat_interval", lambda: None)() \
            is not None
        self._held: dict[int, AnyTrial] = {}  # storage id -> trial, from ask to tell
        self._claims: set[str] = set()  # repeat keys this worker trains
        self._mine = threading.Lock()  # guards both against the heartbeat thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the heartbeat --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat_forever, name="sweeper-ledger",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            # A late beat is harmless (a held trial's, or a claim that is compare-and-set).
            self._thread.join(timeout=self.interval_s)

    def __enter__(self) -> Ledger:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _beat_forever(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
                failing = False
            except Exception as e:  # a missed beat is harmless; many are not: said once
                if not failing:
                    why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                    print(f"warning: this worker's heartbeat could not be written ({why}); if "
                          "that lasts past search.heartbeat_grace_s "
                          f"({self.grace_s:g} s), other workers take its trials for dead and "
                          "run them again", file=sys.stderr, flush=True)
                failing = True

    def beat(self) -> None:
        """One beat: every held trial's heartbeat, then every held claim renewed."""
        with self._mine:
            held = list(self._held.values())
            claims = sorted(self._claims)
        if held and self.beating:
            self._write({}, {}, 0, held)
        if claims:
            self.renew(claims)

    @property
    def held(self) -> list[AnyTrial]:
        with self._mine:
            return list(self._held.values())

    # -- trials ---------------------------------------------------------------------------

    def ask(self, asker: Callable[[], list[tuple[optuna.Trial, dict[str, Any]]]],
            attrs: dict[str, Any]) -> list[tuple[optuna.Trial, dict[str, Any]]]:
        """Under the study lock: the trials asker() asks, each held from now on: its first
        heartbeat, then this worker as its owner and `attrs`, all before the lock is released
        (recover relies on it: a trial with an owner but no heartbeat could never be found
        dead from another machine). An error before that ends the trials it asked."""
        trials: list[optuna.Trial] = []
        try:
            asked = asker()
            trials = [t for t, _ in asked]
            self._write({t: {keys.WORKER: self.worker} | attrs for t in trials}, {}, 0,
                        list(trials) if self.beating else [])
        except BaseException:
            # Under the lock an unowned RUNNING trial is one this call asked, and so are those
            # it asked (the public calls may have stamped some before failing): end them now,
            # or they would count as running elsewhere until the next run recovers them.
            with contextlib.suppress(Exception):
                mine = {trial_id(t) for t in trials}
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    if (trial_id(t) in mine or keys.WORKER not in t.user_attrs) \
                            and self.fail_if_running(t):
                        self.requeue(t)
            raise
        with self._mine:
            self._held |= {trial_id(t): t for t in trials}
        return asked

    def set_attrs(self, attrs: Mapping[optuna.Trial, Mapping[str, Any]]) -> set[int]:
        """trial.set_user_attr(k, v) for every trial and item. Returns the numbers of trials
        that refused (another worker ended them)."""
        return self._write(attrs, {}, 0, [])

    def report(self, values: Mapping[optuna.Trial, float], step: int) -> set[int]:
        """trial.report(value, step) for every trial. As Trial.report: a step this trial object
        has reported keeps its first value; one the storage has from elsewhere is overwritten.
        Returns the numbers of trials that refused."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step={step} must be non-negative")
        new = {t: float(v) for t, v in values.items()
               if step not in t._cached_frozen_trial.intermediate_values}
        return self._write({}, new, step, [])

    def _write(self, attrs: Mapping[optuna.Trial, Mapping[str, Any]],
               values: Mapping[optuna.Trial, float], step: int, beats: list[AnyTrial]) -> set[int]:
        """Attributes, intermediate values at `step` and heartbeats, batched when the
        self-check passed, else by Optuna's public calls (heartbeats first). The numbers of the
        trials that refused: nothing was written to them."""
        attrs = {t: a for t, a in attrs.items() if a}
        trials: dict[int, Any] = {trial_id(t): t for t in [*attrs, *values, *beats]}
        if not trials:
            return set()
        if self.batched is not None:
            refused = self.batched.write({trial_id(t): a for t, a in attrs.items()},
                                         {trial_id(t): v for t, v in values.items()}, step,
                                         [trial_id(t) for t in beats])
            for t, a in attrs.items():  # what trial.user_attrs reads, as Optuna keeps it
                if trial_id(t) not in refused:
                    t._cached_frozen_trial.user_attrs.update(a)
            for t, v in values.items():
                if trial_id(t) not in refused:
                    t._cached_frozen_trial.intermediate_values[step] = v
            return {trials[i].number for i in refused}
        refused = set()
        for b in beats:
            self.study._storage.record_heartbeat(trial_id(b))  # type: ignore[attr-defined]
        for t, a in attrs.items():
            try:
                for k, v in a.items():
                    t.set_user_attr(k, v)
            except (UpdateFinishedTrialError, KeyError):
                refused.add(t.number)
        for t, v in values.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    t.report(v, step)
                except (UpdateFinishedTrialError, KeyError):
                    refused.add(t.number)
        return refused

    def tell(self, trial: optuna.Trial, state: TrialState, values: list[float] | None = None,
             attrs: Mapping[str, Any] | None = None, run_again: bool = False
             ) -> FrozenTrial | None:
        """`attrs`, then Optuna's tell, then (run_again) its configuration queued to run first.
        None when the trial was no longer this worker's (ended by another); else the trial as
        stored."""
        return self.tell_all([(trial, state, values, attrs or {}, run_again)])[0]

    def tell_all(self, ends: list[tuple[optuna.Trial, TrialState, list[float] | None,
                                        Mapping[str, Any], bool]]) -> list[FrozenTrial | None]:
        """tell() for each (trial, state, values, attrs, run_again), the attributes of all of
        them in one write."""
        refused = self._write({t: a for t, _, _, a, _ in ends}, {}, 0, [])
        out: list[FrozenTrial | None] = []
        for t, state, values, _, run_again in ends:
            if t.number in refused:
                self._unhold(t)
                out.append(None)
            else:
                out.append(self._tell(t, state, values, run_again))
        return out

    def _tell(self, trial: optuna.Trial, state: TrialState, values: list[float] | None,
              run_again: bool) -> FrozenTrial | None:
        # A trial is held until it is told, and no longer: an interrupt part-way through a
        # population's ends leaves the untold members held, so that they are released.
        try:  # values: COMPLETE, or FAIL when Optuna finds them infeasible (NaN)
            told = self.study.tell(trial, values, state=None if values is not None else state)
        except (UpdateFinishedTrialError, ValueError):
            if frozen(self.study, trial).state.is_finished():  # ended by another worker
                self._unhold(trial)
                return None
            raise
        self._unhold(trial)
        if run_again:  # (one lost between the two: requeue_lost_splits at the next start)
            self.requeue(trial)
        return told  # the trial as stored (tell reads it back)

    def frozen(self, trial: AnyTrial) -> FrozenTrial:
        return frozen(self.study, trial)

    def _unhold(self, trial: AnyTrial) -> None:
        with self._mine:
            self._held.pop(trial_id(trial), None)

    def fail_if_running(self, trial: AnyTrial) -> bool:
        """RUNNING -> FAIL in one storage transaction; False when the trial had already ended."""
        try:
            return bool(self.study._storage.set_trial_state_values(trial_id(trial),
                                                                   TrialState.FAIL))
        except UpdateFinishedTrialError:
            return False

    def requeue(self, trial: AnyTrial) -> None:
        """Queue the trial's configuration to run first, as a new trial naming its original."""
        if trial.params:
            self.study.enqueue_trial(trial.params, user_attrs={keys.RETRY_OF: trial.number})

    def requeue_lost_splits(self) -> list[int]:
        """Trials of an out-of-memory population (keys.SPLIT_AFTER_OOM) whose configuration was
        never queued again (Ctrl-C or a kill between the FAIL and the queueing): queued now.
        Returns their numbers."""
        trials = self.study.get_trials(deepcopy=False)
        queued = {t.user_attrs.get(keys.RETRY_OF) for t in trials}
        lost = [t for t in trials if t.state == TrialState.FAIL
                and keys.SPLIT_AFTER_OOM in t.user_attrs and t.number not in queued]
        for t in lost:
            self.requeue(t)
        return [t.number for t in lost]

    def release(self, trial: AnyTrial, tracker: Tracker, why: str, interrupted: bool) -> bool:
        """A trial this worker holds but will not finish: it fails with `why`, its
        configuration is queued again, and its MLflow run ends KILLED (interrupted) or FAILED.
        False when the trial had already ended."""
        self._unhold(trial)
        try:
            self.study._storage.set_trial_user_attr(trial_id(trial), keys.ERROR, why)
        except UpdateFinishedTrialError:
            return False
        if not self.fail_if_running(trial):
            return False
        self.requeue(trial)
        if run_id := frozen(self.study, trial).user_attrs.get(keys.MLFLOW_RUN_ID):
            tracker.end_trial(run_id, "FAIL", {}, error=why,
                              status="KILLED" if interrupted else "FAILED")
        return True

    def release_held(self, tracker: Tracker, why: str, interrupted: bool) -> int:
        """Every trial this worker still holds fails with `why` and is queued again."""
        return sum(self.release(t, tracker, why, interrupted) for t in self.held)

    # -- dead workers ---------------------------------------------------------------------

    def recover(self, tracker: Tracker) -> tuple[list[int], int]:
        """Under the study lock: what dead workers left. (Trials left RUNNING: failed, their
        MLflow runs KILLED, their configurations queued again; MLflow runs left RUNNING:
        ended.) Returns (those trials' numbers, how many runs were ended)."""
        numbers = self.recover_dead_trials(tracker)
        return numbers, self.end_orphan_runs(tracker)

    def recover_dead_trials(self, tracker: Tracker) -> list[int]:
        """Trials left RUNNING by a worker that died (kill -9, power loss, a lost machine).
        Dead means: silent past the heartbeat grace period (any host); owned by a process of
        this machine and pid namespace that is gone; or never stamped with an owner, which
        every worker does under the study lock in the moment it asks, so the asker died
        before it could. Each move out of RUNNING is one compare-and-set in the storage, so
        two workers never both end one trial, and a trial that ends normally is never
        relabelled dead."""
        dead = getattr(self.study._storage, "get_heartbeat_stale_trial_callback",
                       lambda: None)()
        if self.beating:
            assert isinstance(dead, DeadTrials), "open the storage with study.open_storage"
        else:
            dead = DeadTrials()
        dead.ledger, dead.tracker, dead.found = self, tracker, []
        if self.beating:
            optuna.storages.fail_stale_trials(self.study)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial_id(t) in self._held:
                continue
            owner = t.user_attrs.get(keys.WORKER)
            if (owner is None or liveness.is_dead_here(owner)) and self.fail_if_running(t):
                dead(self.study, frozen(self.study, t))
        return dead.found

    def end_orphan_runs(self, tracker: Tracker) -> int:
        """MLflow trial and repeat runs left RUNNING by a process that died before it ended
        them (or before its trial named them) are ended: as their trial or repeat ended when it
        did (the process died after the tell), else KILLED. A run is left alone while its trial
        is RUNNING, or its repeat is being trained by a live worker. Returns how many."""
        running = tracker.running_children()
        if not running:
            return 0
        trials = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        repeats = any(role == "repeat" for _, role, _, _ in running)
        attrs = self.study.user_attrs if repeats else {}
        now = db_now(self.study) if repeats else 0.0
        ended = 0
        for run_id, role, number, k in running:
            if role == "trial":
                t = trials.get(number)
                if t is None:
                    continue
                own = t.user_attrs.get(keys.MLFLOW_RUN_ID)
                if t.state == TrialState.RUNNING and own in (None, run_id):
                    continue
                if own == run_id and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    summary = {m: t.user_attrs[m] for m in (EPOCHS_RUN, BEST_VAL_ACC, BEST_EPOCH)
                               if m in t.user_attrs}
                    tracker.end_trial(run_id, t.state.name, summary)
                else:
                    error = t.user_attrs.get(keys.ERROR) if own == run_id else None
                    tracker.end_trial(run_id, "FAIL", {}, error=error or ORPHAN, status="KILLED")
            else:
                record = attrs.get(repeat_records.key(number, k))
                if not isinstance(record, dict):
                    record = {}
                done = record.get(keys.RUN_ID) == run_id
                if not done and claim_is_live(record, now, self.grace_s):
                    continue
                if done and VAL_ACC in record:
                    tracker.end_trial(run_id, "COMPLETE", {})
                else:
                    error = (record.get(keys.ERROR) or record.get(keys.DIVERGED)) if done \
                        else None
                    tracker.end_trial(run_id, "FAIL", {}, error=error or ORPHAN, status="KILLED")
            ended += 1
        return ended

    # -- seed repeats ---------------------------------------------------------------------

    def taken(self, record: Any, now: float) -> bool:
        """Done (metrics or diverged), or claimed by a worker that is still alive."""
        return repeat_records.done(record) or claim_is_live(record, now, self.grace_s)

    def left(self, names: list[str]) -> list[str]:
        """Of these repeat keys, those not taken now (one read; no claim)."""
        attrs, now = self.study.user_attrs, db_now(self.study)
        return [k for k in names if not self.taken(attrs.get(k), now)]

    def claim(self, names: list[str]) -> list[str]:
        """Those of these repeat keys that are free, claimed for this worker (compare-and-set
        under the study lock) and renewed by the heartbeat until finished or unclaimed."""
        with self.lock():
            attrs, now = self.study.user_attrs, db_now(self.study)  # fresh from the storage
            mine = [k for k in names if not self.taken(attrs.get(k), now)]
            for k in mine:
                self.study.set_user_attr(k, {keys.CLAIMED_BY: self.worker, keys.CLAIM_BEAT: now})
        with self._mine:
            self._claims |= set(mine)
        return mine

    def _ours(self, record: Any) -> bool:
        return (isinstance(record, dict) and record.get(keys.CLAIMED_BY) == self.worker
                and not repeat_records.done(record))

    def renew(self, names: list[str]) -> None:
        """Each claim still this worker's gets a new beat; one that is not (a result stands,
        or another worker took it over) is let go. However late it lands, never a result
        replaced."""
        with self.lock():
            attrs, now = self.study.user_attrs, db_now(self.study)
            lost = []
            for k in names:
                if self._ours(attrs.get(k)):
                    self.study.set_user_attr(k, {keys.CLAIMED_BY: self.worker,
                                                 keys.CLAIM_BEAT: now})
                else:
                    lost.append(k)
        with self._mine:
            self._claims -= set(lost)

    def finish(self, name: str, record: dict[str, Any]) -> bool:
        """A repeat's end: its result (or failure) recorded, unless a result is there already
        (another worker's, which stands); a failure does not replace another worker's live
        claim. False when nothing was written."""
        with self._mine:
            self._claims.discard(name)
        with self.lock():
            have = self.study.user_attrs.get(name)
            if repeat_records.done(have):
                return False
            if not repeat_records.done(record) and not self._ours(have) and claim_is_live(
                    have, db_now(self.study), self.grace_s):
                return False
            self.study.set_user_attr(name, record)
            return True

    def unclaim(self, names: list[str]) -> None:
        """Interrupted: these claims let go (the next run trains them); results stay."""
        with self._mine:
            self._claims -= set(names)
        with self.lock():
            attrs = self.study.user_attrs
            for k in names:
                if self._ours(attrs.get(k)):
                    self.study.set_user_attr(k, {})


class DeadTrials:
    """The storage's heartbeat_stale_trial_callback (Optuna's retry mechanism): Optuna calls it
    once for each trial it moved from RUNNING to FAIL itself, so only that worker re-queues
    it, and ends its MLflow run."""

    def __init__(self) -> None:
        self.ledger: Ledger | None = None
        self.tracker: Tracker | None = None
        self.found: list[int] = []

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        study.set_user_attr(f"{keys.RECOVERED}.{trial.number}", "worker died while running it")
        if self.ledger is not None:
            self.ledger.requeue(trial)
        if self.tracker is not None and (run_id := trial.user_attrs.get(keys.MLFLOW_RUN_ID)):
            self.tracker.end_trial(run_id, "FAIL", {}, error="worker died", status="KILLED")
        self.found.append(trial.number)

