import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from sweeper.settings.config import Config, ParamSpec

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist"

# Never download in tests; keep any cache out of the user's home.
os.environ["SWEEPER_OFFLINE"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))

# Property-based tests: a quick look locally, a long one in CI (HYPOTHESIS_PROFILE overrides).
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=250, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"full MNIST not found at {MNIST} (the shared data folder beside the repo)")
    return MNIST


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    return make_tiny_cfg(tmp_path)


def make_tiny_cfg(tmp_path: Path) -> Config:
    """A study on the embedded sample, stores in tmp_path: seconds on a CPU."""
    cfg = Config(name="tiny")
    cfg.data.name, cfg.data.val_size = "mnist_sample", 1000
    cfg.search.study_name = "tiny"
    cfg.search.storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.trainer.max_epochs = 2
    cfg.search.n_trials = 2
    cfg.search.space = {"depth": ParamSpec("int", low=1, high=2),
                        "width": ParamSpec("int", low=16, high=64, log=True)}
    return cfg


def skip_unless_ci(why: str) -> None:
    """A test whose tool is missing: skipped here, but a failure under CI, which must run it."""
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must run this test")
    pytest.skip(why)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL server for the multi-worker tests (see tests/postgres.py)."""
    from tests.postgres import Throwaway, server_bin

    bin_dir = server_bin()
    if bin_dir is None:
        skip_unless_ci("PostgreSQL server binaries not found (Debian: apt-get install "
                       "postgresql; .ci/run installs it)")
    cluster = Throwaway(bin_dir)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def db_url(request, tmp_path) -> Callable[[str], str]:
    """name -> the URL of a new empty database: a SQLite file, or (full tier) a database on the
    throwaway PostgreSQL server. For code that writes the study's record on both."""
    if request.param == "sqlite":
        return lambda name: f"sqlite:///{tmp_path}/{name}.db"
    cluster = request.getfixturevalue("postgres_cluster")
    tag = uuid.uuid4().hex[:8]
    return lambda name: cluster.create_db(f"{name}_{tag}")


@pytest.fixture(scope="session", autouse=True)
def _scratch_session_folder(tmp_path_factory) -> Iterator[None]:
    """Module- and session-scoped fixtures (studies exported once per file) run here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("session-cwd"))
        yield


@pytest.fixture(autouse=True)
def _scratch_working_folder(tmp_path_factory, monkeypatch) -> None:
    """Every test runs in a folder of its own: whatever a command writes relative to where it
    runs (mlruns/, mlruns/last_export, MLflow's ./mlruns) never lands in the repository."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
