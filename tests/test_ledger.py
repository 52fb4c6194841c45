"""The ledger (sweeper/record/ledger.py): its writes store what Optuna's public calls store, a trial
another worker ended refuses alone, one heartbeat covers every held trial, and seed-repeat
claims never replace a result."""

import contextlib
import copy
import math
import threading
import time
import warnings
from collections.abc import Callable

import optuna
import pytest
from mlflow import MlflowClient
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import event

from lightning_modules.metrics import VAL_ACC
from sweeper.loop import population
from sweeper.loop import study as study_loop
from sweeper.record import ledger
from sweeper.record.ledger import DeadTrials, Ledger
from sweeper.record.study_lock import StudyLock
from sweeper.settings import keys
from sweeper.settings.config import ParamSpec
from sweeper.train import training
from tests.test_faults import wait_for_state

ATTRS = {"val_acc": 0.98, "epochs_run": 3, "checkpoint": "/x/y.pt", "nested": {"a": [1, 2]},
         "nan": math.nan}


def storage(url: str, heartbeat: int | None = None) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=60,
                                      heartbeat_stale_trial_callback=DeadTrials())


def commits(s: optuna.storages.RDBStorage) -> list[int]:
    count = [0]
    event.listen(s.engine, "commit", lambda conn: count.__setitem__(0, count[0] + 1))
    return count


def stored(url: str, name: str = "s") -> list[optuna.trial.FrozenTrial]:
    """The trials as a fresh process reads them."""
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def same(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def record(study: optuna.Study, write: Callable[..., set[int]],
           report: Callable[..., set[int]]) -> tuple[set[int], set[int]]:
    """The same story written through `write`/`report`: three trials asked, one finished by
    someone else, then a batch of attributes and intermediate values for all three, one step
    of them already stored elsewhere; returns what each batch refused."""
    trials = [study.ask() for _ in range(3)]
    for t in trials:
        t.suggest_float("lr", 1e-4, 1e-2, log=True)
    write({t: {"i": -1} for t in trials})  # then overwritten
    study.tell(trials[2], 0.5)  # (another worker's tell, or its recovery)
    elsewhere = optuna.Trial(study, ledger.trial_id(trials[1]))  # another object of trial 1
    elsewhere.report(0.125, 1)  # step 1, stored: trials[1] has not seen it
    refused = write({t: ATTRS | {"i": t.number} for t in trials})
    refused_values = report({t: 0.5 + t.number / 10 for t in trials}, 1)
    trials[0].report(0.75, 2)  # this object's own step 2: reported again below, first kept
    report({trials[0]: 0.99}, 2)
    return refused, refused_values


def public_write(attrs: dict) -> set[int]:
    """Optuna's public calls, one trial after another."""
    refused = set()
    for t, a in attrs.items():
        try:
            for k, v in a.items():
                t.set_user_attr(k, v)
        except UpdateFinishedTrialError:
            refused.add(t.number)
    return refused


def public_report(values: dict, step: int) -> set[int]:
    refused = set()
    for t, v in values.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t.report(v, step)
        except UpdateFinishedTrialError:
            refused.add(t.number)
    return refused


@pytest.mark.parametrize("batched", [True, False])
def test_writes_store_what_optunas_public_calls_store(db_url: Callable[[str], str],
                                                      batched: bool) -> None:
    """Before (sweeper/trial_writes.py): the step stored from elsewhere raised a raw
    IntegrityError, and the finished trial refused every trial's write."""
    reference = optuna.create_study(storage=storage(db_url("public")), study_name="s",
                                    direction="maximize")
    want = record(reference, public_write, public_report)
    study = optuna.create_study(storage=storage(db_url("ledger")), study_name="s",
                                direction="maximize")
    book = Ledger(study)
    if batched:
        assert book.batched is not None, book.why_not_batched  # the self-check passed
    else:
        book.batched = None  # the public calls (what a failed self-check leaves)
    got = record(study, book.set_attrs, book.report)
    assert got == want == ({2}, {2})
    for a, b in zip(stored(reference._storage._backend.url), stored(study._storage._backend.url),
                    strict=True):
        assert same(a.user_attrs, b.user_attrs) and a.state == b.state
        assert same(a.intermediate_values, b.intermediate_values)
    assert stored(study._storage._backend.url)[1].intermediate_values == {1: 0.6}  # overwritten
    assert stored(study._storage._backend.url)[0].intermediate_values == {1: 0.5, 2: 0.75}


def test_a_population_writes_in_one_transaction(tmp_path) -> None:
    s = storage(f"sqlite:///{tmp_path}/o.db", heartbeat=20)
    study = optuna.create_study(storage=s, study_name="s", direction="maximize")
    book = Ledger(study)
    n = commits(s)
    asked = book.ask(lambda: [(study.ask(), {}) for _ in range(5)], {keys.RECIPE: {"seed": 0}})
    trials = [t for t, _ in asked]
    asks = n[0]
    book.set_attrs({t: {"a": t.number, "b": "x"} for t in trials})
    book.report({t: 0.5 for t in trials}, 1)
    assert n[0] - asks == 2  # one transaction each, whatever the population's size
    for t in stored(s.url):
        assert t.user_attrs == {keys.WORKER: book.worker, keys.RECIPE: {"seed": 0},
                                "a": t.number, "b": "x"}
        assert t.intermediate_values == {1: 0.5}
    # Stamped with an owner and a heartbeat in the moment they were asked.
    assert book._held.keys() == {ledger.trial_id(t) for t in trials}
    assert all(len(book.batched.heartbeat_rows(ledger.trial_id(t))) == 1 for t in trials)


def test_many_trials_in_chunks(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "ROWS_PER_STATEMENT", 4)
    study = optuna.create_study(storage=storage(f"sqlite:///{tmp_path}/o.db"), study_name="s")
    book = Ledger(study)
    trials = [study.ask() for _ in range(11)]
    assert book.set_attrs({t: {"a": t.number, "b": -t.number} for t in trials}) == set()
    assert book.report({t: t.number / 10 for t in trials}, 0) == set()
    for t in stored(f"sqlite:///{tmp_path}/o.db"):
        assert t.user_attrs == {"a": t.number, "b": -t.number}
        assert t.intermediate_values == {0: t.number / 10}


def test_one_heartbeat_covers_every_held_trial_from_ask_to_tell(tmp_path, monkeypatch) -> None:
    """A population's members that wait for their part are held, so they beat (before, only
    the part training had a heartbeat, and another worker failed the rest)."""
    study = optuna.create_study(storage=storage(f"sqlite:///{tmp_path}/o.db", heartbeat=20),
                                study_name="s", direction="maximize")
    book = Ledger(study)
    asked = [t for t, _ in book.ask(lambda: [(study.ask(), {}) for _ in range(3)], {})]
    beats: list[list[int]] = []
    real = book._write
    monkeypatch.setattr(book, "_write", lambda a, v, s, b: beats.append(
        sorted(t.number for t in b)) or real(a, v, s, b))
    book.beat()
    book.tell(asked[0], TrialState.COMPLETE, [0.5])
    book.beat()
    assert beats[0] == [0, 1, 2] and beats[-1] == [1, 2]


def test_a_trial_ended_by_another_worker_refuses_alone(tmp_path) -> None:
    study = optuna.create_study(storage=storage(f"sqlite:///{tmp_path}/o.db", heartbeat=20),
                                study_name="s", direction="maximize")
    book = Ledger(study)
    a, b = (t for t, _ in book.ask(lambda: [(study.ask(), {}) for _ in range(2)], {}))
    assert book.fail_if_running(b)  # taken for dead elsewhere
    assert book.tell(b, TrialState.COMPLETE, [0.9], {"x": 1}) is None
    told = book.tell(a, TrialState.COMPLETE, [0.5], {"x": 1})
    assert told is not None and told.state == TrialState.COMPLETE and told.user_attrs["x"] == 1
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL]
    assert "x" not in study.trials[1].user_attrs and not book.held


def test_a_self_check_that_disagrees_leaves_the_public_calls(tmp_path, monkeypatch) -> None:
    url = f"sqlite:///{tmp_path}/o.db"
    real = ledger._Batched.write

    def drops_a_value(self, attrs, values, step, beats):
        return real(self, {i: dict(list(a.items())[1:]) for i, a in attrs.items()}, values,
                    step, beats)

    monkeypatch.setattr(ledger._Batched, "write", drops_a_value)
    monkeypatch.setattr(ledger, "_CHECKED", {})
    study = optuna.create_study(storage=storage(url), study_name="s")
    book = Ledger(study)
    assert book.batched is None and "user attributes" in (book.why_not_batched or "")
    trial = study.ask()
    book.set_attrs({trial: {"a": 1, "b": 2}})
    assert stored(url)[0].user_attrs == {"a": 1, "b": 2}
    assert optuna.get_all_study_names(url) == ["s"]  # the scratch study is gone


def test_in_memory_studies_take_the_public_calls() -> None:
    study = optuna.create_study(direction="maximize")
    book = Ledger(study)
    trials = [study.ask() for _ in range(2)]
    book.set_attrs({t: {"k": t.number} for t in trials})
    book.report({t: 0.5 for t in trials}, 2)
    assert book.batched is None
    assert [t.user_attrs for t in study.get_trials()] == [{"k": 0}, {"k": 1}]
    assert [t.intermediate_values for t in study.get_trials()] == [{2: 0.5}] * 2


def _two_workers(tmp_path) -> tuple[Ledger, Ledger]:
    url = f"sqlite:///{tmp_path}/o.db"
    study = optuna.create_study(storage=storage(url), study_name="s")
    here, there = Ledger(study, grace_s=60), Ledger(optuna.load_study(study_name="s",
                                                                       storage=storage(url)))
    there.worker = "elsewhere:boot:ns:1:2"  # another machine's worker: judged by its beats
    return here, there


def test_a_repeat_claim_is_compare_and_set_and_a_result_stands(tmp_path) -> None:
    here, there = _two_workers(tmp_path)
    names = [f"{keys.REPEAT}.0.1", f"{keys.REPEAT}.0.2"]
    assert here.claim(names) == names and there.claim(names) == []  # taken, and alive
    result = {keys.SEED: 1, "val_acc": 0.9, "train_acc": 0.95, "gap": 0.05}
    assert here.finish(names[0], result)
    here.renew(names)  # however late the renew lands
    here._claims.add(names[0])
    here.beat()
    here.unclaim(names[:1])
    assert here.study.user_attrs[names[0]] == result  # the result stands
    assert here.study.user_attrs[names[1]][keys.CLAIMED_BY] == here.worker
    # A claim silent past the grace period (on the database's clock) is taken over; the
    # worker that lost it cannot record a failure over it, nor renew it.
    here.study.set_user_attr(names[1], {keys.CLAIMED_BY: here.worker,
                                        keys.CLAIM_BEAT: ledger.db_now(here.study) - 3600})
    assert there.claim(names) == names[1:]
    assert not here.finish(names[1], {keys.SEED: 2, keys.ERROR: "out of memory"})
    here.renew(names[1:])
    assert here.study.user_attrs[names[1]][keys.CLAIMED_BY] == there.worker
    assert there.finish(names[1], result | {keys.SEED: 2})
    assert not here.finish(names[1], result | {"val_acc": 0.1})  # a second result: refused
    assert here.study.user_attrs[names[1]]["val_acc"] == 0.9


def test_the_database_clock_is_seconds_since_the_epoch(tmp_path) -> None:
    import time

    study = optuna.create_study(storage=storage(f"sqlite:///{tmp_path}/o.db"), study_name="s")
    assert abs(ledger.db_now(study) - time.time()) < 5  # this SQLite file's clock is ours


def test_old_sqlite_writes_row_by_row(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before SQLite 3.24 (no upsert) rows go one by one, in the same one transaction."""
    monkeypatch.setattr(ledger.sqlite3, "sqlite_version_info", (3, 23, 0))
    s = storage(f"sqlite:///{tmp_path}/o.db", heartbeat=20)
    study = optuna.create_study(storage=s, study_name="s")
    book = Ledger(study)
    assert book.batched is not None, book.why_not_batched
    trials = [t for t, _ in book.ask(lambda: [(study.ask(), {}) for _ in range(2)], {})]
    statements: list[str] = []
    event.listen(s.engine, "before_cursor_execute",
                 lambda conn, cursor, sql, *args: statements.append(sql))
    n = commits(s)
    book.set_attrs({t: {"a": t.number + 1, "b": "x"} for t in trials})
    book.beat()
    assert n[0] == 2 and not any("ON CONFLICT" in sql for sql in statements)
    assert [t.user_attrs["a"] for t in stored(s.url)] == [1, 2]


def _in_thread(name: str, fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.slow
def test_a_populations_waiting_part_outlives_the_grace_period(tiny_cfg, monkeypatch) -> None:
    """Two workers on one study. Worker A asks a population of two shapes (a grid over widths:
    two parts, trained one after the other) and its first part trains past the heartbeat grace
    period while worker B looks for dead trials. Before: the waiting member had no heartbeat,
    B failed it and queued it again, A's writes to it raised UpdateFinishedTrialError, A's
    sweep failed and MLflow runs stayed RUNNING."""
    cfg = tiny_cfg
    cfg.search.sampler, cfg.search.pruner = "grid", "none"
    cfg.search.space = {"depth": ParamSpec("categorical", choices=[1]),
                        "width": ParamSpec("categorical", choices=[16, 32])}
    cfg.search.population = cfg.search.n_trials = 2
    cfg.trainer.max_epochs = 1
    cfg.search.heartbeat_interval_s, cfg.search.heartbeat_grace_s = 1, 3
    monkeypatch.setattr(study_loop, "WAIT_POLL_S", 0.1)  # B looks for dead trials this often

    looked: list[float] = []  # when B's passes over dead trials started
    real_fail_stale = optuna.storages.fail_stale_trials

    def fail_stale(study: optuna.Study) -> None:
        t0 = time.monotonic()
        real_fail_stale(study)
        if threading.current_thread().name == "B":
            looked.append(t0)

    monkeypatch.setattr(optuna.storages, "fail_stale_trials", fail_stale)
    first_part: list[float] = []
    fit = population.fit_population

    def first_part_outlasts_the_grace(module, specs, splits, on_epoch):  # type: ignore[no-untyped-def]
        if not first_part:
            first_part.append(time.monotonic())
            # Until B has looked for dead trials, past the grace period since A's first part
            # began (2 s more: SQLite's clock counts whole seconds).
            late = first_part[0] + cfg.search.heartbeat_grace_s + 2
            wait_for_state(lambda: any(t > late for t in looked), "B never looked", 120)
        return fit(module, specs, splits, on_epoch)

    monkeypatch.setattr(population, "fit_population", first_part_outlasts_the_grace)
    a, a_failed = _in_thread("A", lambda: study_loop.run_study(cfg))
    wait_for_state(lambda: bool(first_part), "A never trained", 120)
    b, b_failed = _in_thread("B", lambda: study_loop.run_study(copy.deepcopy(cfg)))
    for worker in (a, b):
        worker.join(timeout=300)
        assert not worker.is_alive()
    assert a_failed == [] and b_failed == []  # before: A failed (UpdateFinishedTrialError)
    study = optuna.load_study(study_name="tiny", storage=cfg.search.storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2  # none failed, no retry
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("tiny")
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get(keys.ROLE_TAG) == "trial"]
    assert sorted(int(r.data.tags[keys.TRIAL_TAG]) for r in children) == [0, 1]  # ended once
    assert all(r.info.status == "FINISHED" for r in client.search_runs([exp.experiment_id]))


@pytest.mark.slow
def test_a_claim_renewed_after_the_result_never_replaces_it(tiny_cfg, monkeypatch) -> None:
    """The heartbeat's renew of a seed repeat's claim is held back until the repeat's result
    is written. Before: the renew thread (joined for 5 s at most) then wrote the claim over the
    result, and the repeat was trained again by the next run."""
    cfg = tiny_cfg
    cfg.search.pruner, cfg.search.n_trials = "none", 1
    cfg.confirm.seeds, cfg.confirm.top_k = 2, 1
    cfg.search.heartbeat_interval_s, cfg.search.heartbeat_grace_s = 1, 3
    renewing, result_written, renewed = threading.Event(), threading.Event(), threading.Event()

    def held_back() -> bool:
        """On the heartbeat's thread: wait for the result, then go on."""
        if threading.current_thread() is threading.main_thread():
            return False
        renewing.set()
        assert result_written.wait(timeout=120)
        return True

    real_set = optuna.Study.set_user_attr

    def set_user_attr(self, key, value):  # type: ignore[no-untyped-def]
        late = isinstance(value, dict) and keys.CLAIMED_BY in value and held_back()
        real_set(self, key, value)
        if isinstance(value, dict) and VAL_ACC in value:
            result_written.set()
        if late:
            renewed.set()

    real_lock = StudyLock.__call__

    @contextlib.contextmanager
    def lock(self):  # type: ignore[no-untyped-def]
        late = held_back()  # a renew decided before the result, landing after it
        with real_lock(self):
            yield
        if late:
            renewed.set()

    monkeypatch.setattr(optuna.Study, "set_user_attr", set_user_attr)
    monkeypatch.setattr(StudyLock, "__call__", lock)
    fits: list[int] = []
    real_fit = training.fit

    def fit(module, spec, splits, on_epoch):  # type: ignore[no-untyped-def]
        fits.append(1)
        if len(fits) == 2:  # the repeat trains until a renew of its claim is on its way
            wait_for_state(renewing.is_set, "its claim was never renewed", 120)
        return real_fit(module, spec, splits, on_epoch)

    monkeypatch.setattr(training, "fit", fit)
    study = study_loop.run_study(cfg)
    wait_for_state(renewed.is_set, "the late renew never landed", 120)
    record = study.user_attrs[f"{keys.REPEAT}.{study.best_trial.number}.1"]
    assert VAL_ACC in record and keys.CLAIMED_BY not in record  # before: the claim


def test_an_ask_that_fails_part_way_ends_every_trial_it_asked(tmp_path, monkeypatch) -> None:
    """With the public calls one owner is stamped per write: a failure after the first leaves
    a stamped trial that is nobody's (before: left RUNNING, counted as running elsewhere, until
    this process ended or the grace period passed)."""
    study = optuna.create_study(storage=storage(f"sqlite:///{tmp_path}/o.db", heartbeat=20),
                                study_name="s", direction="maximize")
    book = Ledger(study)

    def stamp_one_then_fail(attrs, values, step, beats):
        first = next(iter(attrs))
        study._storage.set_trial_user_attr(ledger.trial_id(first), keys.WORKER, book.worker)
        raise OSError("the database went away")

    monkeypatch.setattr(book, "_write", stamp_one_then_fail)
    with pytest.raises(OSError, match="went away"):
        book.ask(lambda: [(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}), {})
                          for _ in range(2)], {})
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states and states[:2] == [TrialState.FAIL] * 2
    assert [t.user_attrs.get(keys.RETRY_OF) for t in study.trials[2:]] == [0, 1]  # queued again


def test_a_failing_heartbeat_is_said_once_per_streak(tmp_path, monkeypatch, capsys) -> None:
    study = optuna.create_study(storage=storage(f"sqlite:///{tmp_path}/o.db", heartbeat=20),
                                study_name="s", direction="maximize")
    book = Ledger(study, interval_s=0.01, grace_s=60)
    calls = [0]

    def broken() -> None:
        calls[0] += 1
        raise OSError("database is locked")

    monkeypatch.setattr(book, "beat", broken)
    book.start()
    wait_for_state(lambda: calls[0] >= 5, "the heartbeat thread never beat", timeout=30)
    book.stop()
    err = capsys.readouterr().err
    assert err.count("heartbeat could not be written (OSError: database is locked)") == 1, err
    assert "search.heartbeat_grace_s (60 s)" in err


def test_a_killed_self_check_leaves_no_scratch_study_for_good(tmp_path) -> None:
    from sweeper.record import liveness

    url = f"sqlite:///{tmp_path}/o.db"
    rdb = storage(url)
    dead = f"{liveness.this_machine()}:999999999:0"  # a pid that does not exist here
    assert liveness.is_dead_here(dead)
    rdb.create_new_study([optuna.study.StudyDirection.MAXIMIZE],
                         f"{ledger.SELF_CHECK_PREFIX}{dead}/0123")
    alive = f"{ledger.SELF_CHECK_PREFIX}{liveness.this_worker()}/4567"  # mid-check elsewhere
    rdb.create_new_study([optuna.study.StudyDirection.MAXIMIZE], alive)
    assert ledger.self_check(rdb) is None
    assert [s.study_name for s in rdb.get_all_studies()] == [alive]
