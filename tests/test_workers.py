"""Several workers share one study through PostgreSQL (the Optuna storage; MLflow through an
MLflow server or straight into PostgreSQL): exactly search.n_trials finished trials, one parent
run, and a killed worker's trial retried."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from lightning_modules.metrics import VAL_ACC
from sweeper.settings import keys
from sweeper.settings.keys import TRIAL_TAG
from tests.postgres import free_port
from tests.test_faults import Sweep, wait_for_state
from tests.test_study import runs

pytestmark = pytest.mark.slow  # every test here: PostgreSQL and worker processes

BAD = ("database is locked", "IntegrityError", "UniqueViolation", "Traceback")


def stores(postgres_cluster, tmp_path) -> tuple[str, str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    optuna_url = postgres_cluster.create_db(f"optuna_{tag}")
    mlflow_url = postgres_cluster.create_db(f"mlflow_{tag}")
    return optuna_url, mlflow_url, [
        "+experiment=smoke", "search.n_trials=6", "search.pruner=none",
        f"search.storage={optuna_url}", f"tracking.uri={mlflow_url}",
        f"tracking.artifact_location={(tmp_path / 'artifacts').as_uri()}"]


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path) -> Iterator[str]:
    """`mlflow server` on a PostgreSQL backend store, as in docs/scale-out.md, "Scale out"."""
    port = free_port()
    log = open(artifacts.parent / "mlflow-server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < end, \
                    (artifacts.parent / "mlflow-server.log").read_text()
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def finish(*workers: Sweep, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    for w in workers:
        rc = w.proc.wait(timeout=max(1, end - time.monotonic()))
        out = "".join(w.output)
        assert rc == 0, out
        assert not [b for b in BAD if b in out], out


def test_two_workers_started_together_share_one_study(postgres_cluster, tmp_path):
    optuna_url, mlflow_db, overrides = stores(postgres_cluster, tmp_path)
    with mlflow_server(mlflow_db, tmp_path / "served-artifacts") as server:
        overrides = [o for o in overrides if not o.startswith("tracking.")]
        # ~1 s trials: long enough that both workers get some.
        workers = [Sweep(tmp_path, *overrides, f"tracking.uri={server}", "trainer.max_epochs=8",
                         OMP_NUM_THREADS="1") for _ in range(2)]
        finish(*workers)
        client, parents, children = runs(server, "smoke")
        best_trials = [f.path for f in client.list_artifacts(parents[0].info.run_id)]
    study = optuna.load_study(study_name="smoke", storage=optuna_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6  # no extra, no failure
    assert sorted(t.number for t in study.trials) == list(range(6))
    owners = {t.user_attrs[keys.WORKER] for t in study.trials}
    assert len(owners) == 2, "both workers should have trained trials"

    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert best_trials == ["best_trials.md"]  # artifacts go through the server
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags[TRIAL_TAG]) for c in children) == list(range(6))


def _other_host() -> tuple[str, ...]:
    """Run a worker under another hostname (a UTS namespace) when allowed, so that its death
    can only be seen through its missing heartbeat, as for a worker on another machine. Under
    CI the namespace is required: without it the test would check the weaker same-host path."""
    if shutil.which("unshare") and subprocess.run(
            ["unshare", "-u", "hostname", "other-machine"], capture_output=True).returncode == 0:
        return ("unshare", "-u", "sh", "-c", 'hostname other-machine && exec "$@"', "sh")
    if os.environ.get("CI"):
        pytest.fail("unshare -u (util-linux, as root) is needed to run a worker as another host")
    return ()


def _training_in(optuna_url: str, mlflow_url: str, pid: int) -> bool:
    """A trial of worker `pid` is RUNNING and has logged an epoch to MLflow (with
    search.pruner=none nothing is reported to Optuna)."""
    try:
        trials = optuna.load_study(study_name="smoke", storage=optuna_url).trials
        runs = [t.user_attrs.get(keys.MLFLOW_RUN_ID) for t in trials
                if t.state == TrialState.RUNNING
                and f":{pid}:" in t.user_attrs.get(keys.WORKER, "")]
        client = MlflowClient(mlflow_url)
        return any(r is not None and VAL_ACC in client.get_run(r).data.metrics for r in runs)
    except Exception:  # not created yet, or being written
        return False


def test_a_killed_worker_trial_is_retried_and_the_study_completes(postgres_cluster, tmp_path):
    optuna_url, mlflow_url, overrides = stores(postgres_cluster, tmp_path)
    overrides += ["trainer.max_epochs=25", "search.heartbeat_interval_s=1",
                  "search.heartbeat_grace_s=3"]  # ~3 s trials
    prefix = _other_host()
    doomed = Sweep(tmp_path, *overrides, prefix=prefix, OMP_NUM_THREADS="1")
    survivor = Sweep(tmp_path, *overrides, OMP_NUM_THREADS="1")
    doomed.wait_for("] trial")  # one trial done, then until its next one is training
    wait_for_state(lambda: _training_in(optuna_url, mlflow_url, doomed.proc.pid),
                   "doomed never trained")
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(timeout=10)
    finish(survivor)

    study = optuna.load_study(study_name="smoke", storage=optuna_url)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 6 and states.count(TrialState.FAIL) == 1
    dead = next(t for t in study.trials if t.state == TrialState.FAIL)
    if prefix:
        assert dead.user_attrs[keys.WORKER].startswith("other-machine:")
    retry = next(t for t in study.trials if t.user_attrs.get(keys.RETRY_OF) == dead.number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    out = "".join(survivor.output)
    assert f"trial {dead.number} was left running by a process that died" in out

    _, parents, children = runs(mlflow_url, "smoke")
    assert len(parents) == 1
    killed = [int(c.data.tags[TRIAL_TAG]) for c in children if c.info.status == "KILLED"]
    assert killed == [dead.number]
