"""MLflow layout: one experiment per study, one parent run per study (reused on resume), one
child run per Optuna trial with per-epoch metrics (step = epoch, from 1).

A pruned trial's run ends FINISHED with tag optuna.state=PRUNED: it trained correctly and was
stopped on purpose, which is not a failure. Failed trials end FAILED, interrupted ones KILLED.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from sweeper.record import store_schema, stores
from sweeper.settings import keys
from sweeper.settings.errors import UserError, one_line


def find_parent(client: Any, experiment_id: str) -> Any:
    """The study's parent run in its experiment (the oldest, should there ever be two), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{keys.ROLE_TAG}` = 'parent'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def forget_engine(uri: str) -> None:
    """MLflow keeps one SQLAlchemy engine per store URI for the life of the process; after the
    file behind a URI was replaced, that engine still holds the old file open."""
    with contextlib.suppress(Exception):  # a private cache: best effort across MLflow versions
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()


class Tracker:
    """MLflow client for one study. The caller checks the store first (stores.prepare_sqlite)."""

    def __init__(self, uri: str, artifact_location: str | None, experiment: str):
        from mlflow import MlflowClient

        # With a tracking server, MLflow prints two URL lines whenever a run ends.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        stores.quiet_mlflow()  # after the import: mlflow configures its logger when imported
        def make_store(side: str) -> None:
            if not store_schema.create_from_packaged(stores.sqlite_path(side) or side):
                MlflowClient(side).search_experiments()  # MLflow's migrations: seconds

        db = stores.sqlite_path(uri)
        if db is not None:
            stores.create_sqlite_whole(db, make_store)
            if artifact_location is None:
                artifact_location = (db.parent / "artifacts").resolve().as_uri()
        self.uri, self.experiment = uri, experiment
        for attempt in (1, 2):
            try:
                self.client = MlflowClient(tracking_uri=uri)  # may open the store at once
                self.experiment_id = self._experiment(artifact_location)
                return
            except UserError:
                raise
            except Exception as e:  # a store MLflow cannot open (half-made schema, ...)
                aside = (stores.set_aside_if_empty(db)
                         if attempt == 1 and db is not None and db.exists() else None)
                if aside is None:
                    raise UserError(f"tracking.uri={uri}: cannot open the MLflow store "
                                    f"({one_line(e, 200)})") from None
                assert db is not None
                forget_engine(uri)
                print(f"note: {db} held no runs and could not be opened (an interrupted first "
                      f"start?); moved it to {aside.name} and made a new one", flush=True)
                stores.create_sqlite_whole(db, make_store)

    def _experiment(self, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        name = self.experiment
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    return str(self.client.create_experiment(
                        name, artifact_location=artifact_location))
                except MlflowException:  # another worker created it a moment ago
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                raise UserError(f"MLflow experiment {name!r} is deleted in {self.uri}; "
                                "restore it (mlflow experiments restore) or choose "
                                "another search.study_name")
            return str(exp.experiment_id)
        except MlflowException as e:
            raise UserError(f"tracking.uri={self.uri}: {str(e).splitlines()[0][:300]}") from None

    def trial_numbers(self) -> set[int]:
        """The Optuna trial numbers that have a trial run here."""
        numbers: set[int] = set()
        token = None
        while True:
            page = self.client.search_runs([self.experiment_id],
                                           filter_string=f"tags.`{keys.ROLE_TAG}` = 'trial'",
                                           max_results=1000, page_token=token)
            numbers |= {int(r.data.tags[keys.TRIAL_TAG]) for r in page
                        if r.data.tags.get(keys.TRIAL_TAG, "").isdigit()}
            token = page.token
            if not token:
                return numbers

    def running_children(self) -> list[tuple[str, str, int, int]]:
        """(run id, role, trial number, seed index) of this study's trial and repeat runs that
        are still RUNNING."""
        found, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string="attributes.status = 'RUNNING'",
                max_results=1000, page_token=token)
            for r in page:
                tags = r.data.tags
                if tags.get(keys.ROLE_TAG) in ("trial", "repeat") and \
                        tags.get(keys.TRIAL_TAG, "").isdigit():
                    found.append((r.info.run_id, tags[keys.ROLE_TAG], int(tags[keys.TRIAL_TAG]),
                                  int(tags.get(keys.REPEAT_TAG, "0") or 0)))
            token = page.token
            if not token:
                return found

    def has_runs(self, role: str) -> bool:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.`{keys.ROLE_TAG}` = '{role}'",
                                       max_results=1)
        return bool(runs)

    def open_parent(self, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The study's parent run: reused when it exists (resume), created otherwise."""
        found = find_parent(self.client, self.experiment_id)
        if found is not None:
            run_id = found.info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.experiment,
                                         tags={keys.ROLE_TAG: "parent",
                                               keys.STUDY_TAG: self.experiment})
            run_id = run.info.run_id
            self._log(run_id, params=params)
        self._log(run_id, tags=tags)
        return run_id

    def start_trial(self, parent_id: str, number: int, params: dict[str, Any],
                    tags: dict[str, str], repeat: int | None = None) -> str:
        """A trial's run; with `repeat`, a seed repeat of that trial's configuration."""
        run_id = self.create_trial_run(parent_id, number, tags, repeat)
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._log(run_id, params=params)

    def create_trial_run(self, parent_id: str, number: int, tags: dict[str, str],
                         repeat: int | None = None) -> str:
        """start_trial without the params (a population logs them on a background thread)."""
        name, role = f"trial-{number:03d}", "trial"
        if repeat is not None:
            name, role = f"{name}-seed{repeat}", "repeat"
            tags = tags | {keys.REPEAT_TAG: str(repeat)}
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={keys.PARENT_RUN_ID_TAG: parent_id, keys.ROLE_TAG: role,
                  keys.STUDY_TAG: self.experiment, keys.TRIAL_TAG: str(number), **tags})
        return str(run.info.run_id)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self._log(run_id, metrics=metrics, step=step)

    def end_trial(self, run_id: str, state: str, metrics: dict[str, float],
                  error: str | None = None, status: str | None = None) -> None:
        """state: the Optuna state (COMPLETE/PRUNED/FAIL); status: the MLflow run status, by
        default FINISHED for COMPLETE and PRUNED, FAILED for FAIL (KILLED: interrupted)."""
        tags = {keys.STATE_TAG: state} | ({keys.ERROR_TAG: error[:5000]} if error else {})
        self._log(run_id, metrics=metrics, tags=tags)
        status = status or ("FAILED" if state == "FAIL" else "FINISHED")
        self.client.set_terminated(run_id, status=status)

    def close_parent(self, run_id: str, status: str | None, summary_md: str | None = None,
                     summary: tuple[dict[str, float], dict[str, str]] | None = None) -> None:
        """status None: other workers still run trials; the last one to stop ends the run.
        summary: (metrics, tags) that say how the study went, for the runs table."""
        if summary_md:
            self.client.log_text(run_id, summary_md, "best_trials.md")
        if summary is not None:
            metrics, tags = summary
            old = self.client.get_run(run_id).data.tags
            for stale in [k for k in old if k.startswith(keys.BEST_PARAM_TAG + ".")
                          and k not in tags]:  # a former best's parameter (another depth)
                self.client.delete_tag(run_id, stale)
            self._log(run_id, metrics=metrics, tags=tags)
        if status is not None:
            self.client.set_terminated(run_id, status=status)

    def _log(self, run_id: str, params: dict[str, Any] | None = None,
             metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
             step: int = 0) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
            params=[Param(k, str(v)) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
            synchronous=True)


class BackgroundWrites:
    """A population's MLflow writes (its runs' creation, params, per-epoch metrics, ends) on one
    background thread, in order. One write per member and epoch is ~5 ms in the SQLite store
    here: on the main thread they stall the device between epochs; here they overlap
    training. wait() waits for every write so far and raises the first error."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mlflow-writes")
        self.pending: list[Future[Any]] = []
        self.droppable: set[Future[Any]] = set()  # per-epoch metrics
        self.params: set[Future[Any]] = set()  # each run's params, behind its creation

    def _submit(self, fn: Callable[..., Any], *args: Any, droppable: bool = False) -> Future[Any]:
        f = self.pool.submit(fn, *args)
        self.pending.append(f)
        if droppable:
            self.droppable.add(f)
        return f

    def start_trial(self, parent_id: str, number: int, params: dict[str, Any],
                    tags: dict[str, str]) -> Future[str]:
        """The run's id once it is made (its params are logged right after)."""
        run: Future[str] = self._submit(self.tracker.create_trial_run, parent_id, number, tags)
        self.params.add(self._submit(self._log_params, run, params))
        return run

    def _log_params(self, run: Future[str], params: dict[str, Any]) -> None:
        # Kept on Ctrl-C (cancel(everything=True)): a run that was made keeps its params.
        if not run.cancelled():  # a run never made has no params to log
            self.tracker.log_params(run.result(), params)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self._submit(self.tracker.log_metrics, run_id, metrics, step, droppable=True)

    def end_trial(self, run_id: str, state: str, metrics: dict[str, float],
                  error: str | None = None, status: str | None = None) -> None:
        self._submit(self.tracker.end_trial, run_id, state, metrics, error, status)

    def _failed(self, f: Future[Any]) -> BaseException | None:
        return None if f.cancelled() else f.exception()

    def raise_if_failed(self) -> None:
        """The first error of a write already done, raised here (between epochs)."""
        for f in self.pending:
            if f.done() and (e := self._failed(f)) is not None:
                raise e
        self.pending = [f for f in self.pending if not f.done()]
        self.droppable &= set(self.pending)

    def wait(self) -> None:
        """Until every write so far is done (one refused write does not stop the others); the
        first error raised here."""
        wait(list(self.pending))  # pending stays as it is until then: Ctrl-C can still cancel
        pending, self.pending, self.droppable = self.pending, [], set()
        for f in pending:
            if (e := self._failed(f)) is not None:
                raise e

    def cancel(self, everything: bool = False) -> None:
        """After a failure: drop the per-epoch metrics writes that have not started, and forget
        the errors of writes already done (the failure is what is reported); everything
        (Ctrl-C): also the runs not yet made."""
        for f in self.pending:
            if f in self.droppable or (everything and f not in self.params):
                f.cancel()
        self.pending = [f for f in self.pending if f not in self.droppable and not f.done()]
        self.droppable = set()
