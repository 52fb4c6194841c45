"""One lock per study, held while a worker changes the study's shape: creating the stores,
opening the parent run, recovering dead trials, asking for a trial.

Optuna's relational storage is safe for concurrent workers but has no compare-and-set: two
workers that both see 5 of 6 trials finished would both ask for a 6th, and two workers that
both find no parent run would both create one. Under this lock each check-then-act is atomic,
so a study ends with exactly search.n_trials finished trials and one parent run.

PostgreSQL: a session advisory lock (the server releases it if the worker dies). SQLite: an
exclusive file lock beside the database file, which holds across processes of one machine
only (SQLite itself is unsafe on network filesystems).
"""

from __future__ import annotations

import contextlib
import fcntl
import zlib
from collections.abc import Iterator
from typing import Any

from sweeper.record.stores import sqlite_path


class StudyLock:
    def __init__(self, storage_url: str, study_name: str):
        self.db = sqlite_path(storage_url)
        self.key = zlib.crc32(f"sweeper:{study_name}".encode())  # fits PostgreSQL's bigint
        self._engine: Any = None
        if storage_url.startswith("postgresql"):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            self._engine = sqlalchemy.create_engine(storage_url, poolclass=NullPool)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        if self._engine is not None:
            from sqlalchemy import text

            with self._engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                    conn.commit()
        elif self.db is not None and str(self.db) != ":memory:":
            self.db.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{self.db}.lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        else:  # in-memory SQLite: one process by definition
            yield
