"""A new MLflow SQLite store made from a packaged empty schema instead of MLflow's migrations.

MLflow builds a new SQLite store by running its ~60 alembic migrations one by one: over a
second for every new study folder (and for every test). The same empty store, dumped once
(`scripts/make_store_schema.py`), is replayed here in ~50 ms. It is used only for the exact
MLflow version that made it; any other version takes MLflow's own migrations, and MLflow still
checks the store's schema revision each time it opens it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from pathlib import Path

PACKAGED = Path(__file__).with_name("store_schemas") / "mlflow.sql"
VERSION_LINE = "-- mlflow "  # the dump's first line: the MLflow version that made it


def _mlflow_version() -> str:
    from importlib.metadata import version

    return version("mlflow")


def dump_of_migrations() -> str:
    """The empty store exactly as MLflow's migrations leave it, as SQL (no default experiment:
    MLflow adds that row itself when it first opens the store)."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    with tempfile.TemporaryDirectory() as tmp:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}/m.db")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        with contextlib.closing(sqlite3.connect(f"{tmp}/m.db")) as db:
            body = "\n".join(db.iterdump())
    return f"{VERSION_LINE}{_mlflow_version()}\n{body}\n"


def normalized(sql: str) -> list[str]:
    """The dump's statements, each with its lines sorted, in sorted order: MLflow's migrations
    emit the same tables, columns, constraints and indexes in a run-dependent order."""
    statements = [s.strip() for s in sql.split(";\n") if s.strip()]
    return sorted("\n".join(sorted(line.strip().rstrip(",") for line in s.splitlines()))
                  for s in statements)


def create_from_packaged(path: str | Path) -> bool:
    """Write the packaged empty store to `path` (which must not exist yet). False, writing
    nothing, when the package holds no schema for the installed MLflow version."""
    try:
        sql = PACKAGED.read_text()
    except OSError:
        return False
    if sql.split("\n", 1)[0] != f"{VERSION_LINE}{_mlflow_version()}":
        return False
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(sql)  # iterdump's BEGIN ... COMMIT: one transaction
    return True
