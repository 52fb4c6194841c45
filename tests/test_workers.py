"""Several workers share one study through PostgreSQL (Optuna storage and MLflow tracking):
exactly search.n_trials finished trials, one parent run, and a killed worker's trial retried."""

import shutil
import signal
import subprocess
import time
import uuid

import optuna
from optuna.trial import TrialState

from sweeper import liveness
from sweeper.study import RETRY_ATTR
from sweeper.tracking import TRIAL_TAG
from tests.test_faults import Sweep
from tests.test_study import runs

BAD = ("database is locked", "IntegrityError", "UniqueViolation", "Traceback")


def stores(postgres_cluster, tmp_path) -> tuple[str, str, list[str]]:
    tag = uuid.uuid4().hex[:8]
    optuna_url = postgres_cluster.create_db(f"optuna_{tag}")
    mlflow_url = postgres_cluster.create_db(f"mlflow_{tag}")
    return optuna_url, mlflow_url, [
        "+experiment=smoke", "search.n_trials=6", "search.pruner=none",
        f"search.storage={optuna_url}", f"tracking.uri={mlflow_url}",
        f"tracking.artifact_location={(tmp_path / 'artifacts').as_uri()}"]


def finish(*workers: Sweep, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    for w in workers:
        rc = w.proc.wait(timeout=max(1, end - time.monotonic()))
        out = "".join(w.output)
        assert rc == 0, out
        assert not [b for b in BAD if b in out], out


def test_two_workers_started_together_share_one_study(postgres_cluster, tmp_path):
    optuna_url, mlflow_url, overrides = stores(postgres_cluster, tmp_path)
    # ~1 s trials: long enough that both workers get some.
    workers = [Sweep(tmp_path, *overrides, "trainer.max_epochs=8", OMP_NUM_THREADS="1")
               for _ in range(2)]
    finish(*workers)
    study = optuna.load_study(study_name="smoke", storage=optuna_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6  # no extra, no failure
    assert sorted(t.number for t in study.trials) == list(range(6))
    owners = {t.user_attrs[liveness.WORKER_ATTR] for t in study.trials}
    assert len(owners) == 2, "both workers should have trained trials"

    _, parents, children = runs(mlflow_url, "smoke")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(int(c.data.tags[TRIAL_TAG]) for c in children) == list(range(6))


def _other_host() -> tuple[str, ...]:
    """Run a worker under another hostname (a UTS namespace) when allowed, so that its death
    can only be seen through its missing heartbeat, as for a worker on another machine."""
    if shutil.which("unshare") and subprocess.run(
            ["unshare", "-u", "hostname", "other-machine"], capture_output=True).returncode == 0:
        return ("unshare", "-u", "sh", "-c", 'hostname other-machine && exec "$@"', "sh")
    return ()


def test_a_killed_worker_trial_is_retried_and_the_study_completes(postgres_cluster, tmp_path):
    optuna_url, mlflow_url, overrides = stores(postgres_cluster, tmp_path)
    overrides += ["trainer.max_epochs=25", "search.heartbeat_interval_s=1",
                  "search.heartbeat_grace_s=3"]  # ~3 s trials
    prefix = _other_host()
    doomed = Sweep(tmp_path, *overrides, prefix=prefix, OMP_NUM_THREADS="1")
    survivor = Sweep(tmp_path, *overrides, OMP_NUM_THREADS="1")
    doomed.wait_for("] trial")
    time.sleep(1.0)  # its next trial is training now
    doomed.proc.send_signal(signal.SIGKILL)
    doomed.proc.wait(timeout=10)
    finish(survivor)

    study = optuna.load_study(study_name="smoke", storage=optuna_url)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 6 and states.count(TrialState.FAIL) == 1
    dead = next(t for t in study.trials if t.state == TrialState.FAIL)
    if prefix:
        assert dead.user_attrs[liveness.WORKER_ATTR].startswith("other-machine:")
    retry = next(t for t in study.trials if t.user_attrs.get(RETRY_ATTR) == dead.number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    out = "".join(survivor.output)
    assert f"trial {dead.number} was left running by a process that died" in out

    _, parents, children = runs(mlflow_url, "smoke")
    assert len(parents) == 1
    killed = [int(c.data.tags[TRIAL_TAG]) for c in children if c.info.status == "KILLED"]
    assert killed == [dead.number]
