"""MLflow layout: one experiment per study, one parent run per study (reused on resume), one
child run per Optuna trial with per-epoch metrics (step = epoch, from 1).

A pruned trial's run ends FINISHED with tag optuna.state=PRUNED: it trained correctly and was
stopped on purpose, which is not a failure. Failed trials end FAILED, interrupted ones KILLED.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from sweeper import keys
from sweeper.errors import UserError


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def prepare_sqlite(uri: str, what: str) -> None:
    """SQLite wants its folder to exist; say clearly when it cannot be made or written."""
    path = sqlite_path(uri)
    if path is None or str(path) == ":memory:":
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".write-test-{time.time_ns()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what}={uri}: cannot write to {path.parent} ({e.strerror}); "
                        f"choose a writable place with {what}=sqlite:///PATH/file.db") from None


def find_parent(client: Any, experiment_id: str) -> Any:
    """The study's parent run in its experiment (the oldest, should there ever be two), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{keys.ROLE_TAG}` = 'parent'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


class Tracker:
    """MLflow client for one study. The caller checks the store first (prepare_sqlite)."""

    def __init__(self, uri: str, artifact_location: str | None, experiment: str):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        # With a tracking server, MLflow prints two URL lines whenever a run ends.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # After the import: mlflow configures its own logger when imported.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.client = MlflowClient(tracking_uri=uri)
        if artifact_location is None and (db := sqlite_path(uri)) is not None:
            artifact_location = (db.parent / "artifacts").resolve().as_uri()
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=artifact_location)
                except MlflowException:  # another worker created it a moment ago
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    raise UserError(f"MLflow experiment {experiment!r} is deleted in {uri}; "
                                    "restore it (mlflow experiments restore) or choose "
                                    "another search.study_name")
                self.experiment_id = exp.experiment_id
        except MlflowException as e:
            raise UserError(f"tracking.uri={uri}: {str(e).splitlines()[0]}") from None
        self.uri, self.experiment = uri, experiment

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
        name, role = f"trial-{number:03d}", "trial"
        if repeat is not None:
            name, role = f"{name}-seed{repeat}", "repeat"
            tags = tags | {keys.REPEAT_TAG: str(repeat)}
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={keys.PARENT_RUN_ID_TAG: parent_id, keys.ROLE_TAG: role,
                  keys.STUDY_TAG: self.experiment, keys.TRIAL_TAG: str(number), **tags})
        self._log(run.info.run_id, params=params)
        return run.info.run_id

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

    def close_parent(self, run_id: str, status: str | None, summary_md: str | None = None) -> None:
        """status None: other workers still run trials; the last one to stop ends the run."""
        if summary_md:
            self.client.log_text(run_id, summary_md, "best_trials.md")
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
