"""Where a study's record lives (the Optuna store, the MLflow store, the checkpoint folder) and
the checks made before anything is written: each store is writable or reachable, a fresh SQLite
store comes into being whole, and the stores agree about the study.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from sweeper.settings import faultpoints
from sweeper.settings.config import DEFAULT_TRACKING
from sweeper.settings.errors import UserError, one_line

REACH_TIMEOUT_S = 5  # a tracking server that does not answer /health in this time is down


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def prepare_folder(folder: Path, what: str) -> None:
    """The folder exists (made if needed) and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{time.time_ns()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what}: cannot write to {folder} ({e.strerror or one_line(e)}); "
                        f"choose a writable place") from None


def prepare_sqlite(uri: str, what: str) -> None:
    """SQLite wants its folder to exist; say clearly when it cannot be made or written, or when
    the file itself is unusable."""
    path = sqlite_path(uri)
    if path is None:
        return
    if str(path) == ":memory:":
        raise UserError(f"{what}={uri}: an in-memory store would lose the study when this "
                        f"process ends; use {what}=sqlite:///PATH/file.db")
    if path.is_dir():
        raise UserError(f"{what}={uri}: {path} is a folder, not a SQLite file")
    prepare_folder(path.parent, f"{what}={uri}")
    if path.exists():
        try:
            with path.open("ab"):  # opens for writing, writes nothing
                pass
        except OSError as e:
            raise UserError(f"{what}={uri}: {path} cannot be written ({e.strerror}: read-only or "
                            "immutable); make it writable or use another file") from None


def check_reachable(uri: str, what: str) -> None:
    """An MLflow tracking server answers within seconds, or the run stops before creating
    anything (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=REACH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as e:  # it answers: a proxy or an old server without /health
        if e.code >= 500:
            raise UserError(f"{what}={uri}: the server answers HTTP {e.code}") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{what}={uri}: no MLflow server answers there ({one_line(reason, 120)}"
                        f"); start it (mlflow server ...) or fix the address") from None


def create_sqlite_whole(path: Path, init: Callable[[str], object]) -> bool:
    """Create a missing SQLite store in a side file and link it into place only when its schema
    is complete: an interrupt while the schema is being made (MLflow's takes seconds) leaves no
    half-made store behind. False when the store already existed (or another process won)."""
    if path.exists() and path.stat().st_size > 0:
        return False
    # left by a killed process: the side file and SQLite's -journal / -wal / -shm beside it
    remove_litter(path.parent, f".{path.name}.creating-")
    side = path.parent / f".{path.name}.creating-{os.getpid()}"
    side.unlink(missing_ok=True)
    try:
        init(f"sqlite:///{side}")
        faultpoints.reached(f"made-{path.stem}")
        if path.exists() and path.stat().st_size == 0:  # an empty file: nothing to keep
            path.unlink()
        os.link(side, path)  # fails if another process linked its store first: theirs wins
        return True
    except FileExistsError:
        return False
    finally:
        side.unlink(missing_ok=True)


def remove_litter(folder: Path, prefix: str) -> None:
    """Files or folders named PREFIX + PID + anything, whose process (on this machine) is gone:
    what a process killed mid-write left behind."""
    for stale in folder.glob(f"{glob.escape(prefix)}*"):
        found = re.match(r"(\d+)", stale.name[len(prefix):])
        if found is None or _alive(int(found[1])):
            continue
        with contextlib.suppress(OSError):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def set_aside_if_empty(path: Path) -> Path | None:
    """A store that cannot be opened: if it holds no run and no trial (a schema left half-made
    by an earlier version's interrupted first start), move it aside and return where to;
    None when it holds data (then it is the user's to look at)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            for table in ("runs", "trials"):
                if table in tables and db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                    return None
    except sqlite3.DatabaseError:
        return None
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    path.rename(aside)
    return aside


def quiet_mlflow() -> None:
    """MLflow logs through its own loggers: INFO lines ('Updating database tables') and, when a
    write fails, ERROR lines and tracebacks before the exception we turn into one line."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def local_path(uri: str) -> Path | None:
    """The folder of a local artifact URI (file:///x or a plain path); None for remote ones."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    return None if "://" in uri else Path(uri)


def default_tracking(storage: str) -> str:
    """The MLflow store of a study whose Optuna store is `storage`: the mlflow.db beside a
    SQLite store when there is one (a sweep run with both in another folder), else the
    default mlruns/mlflow.db (where a sweep that moved only its Optuna store put it)."""
    db = sqlite_path(storage)
    beside = db.parent / "mlflow.db" if db is not None else None
    return f"sqlite:///{beside}" if beside is not None and beside.is_file() else DEFAULT_TRACKING


STORAGE_HINT = "run this where the sweep ran, or pass --storage sqlite:///PATH/optuna.db"


def require_store(uri: str, flag: str, hint: str) -> None:
    """A SQLite store a command reads must be there (opening it would create an empty one)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"{flag} {uri}: no such file ({hint})")
