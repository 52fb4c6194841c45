"""New stores: the packaged empty MLflow schema is the one MLflow's own migrations make, and
MLflow opens a store made from it without migrating."""

import sqlite3

from mlflow import MlflowClient

from sweeper.record import store_schema
from sweeper.record.tracking import Tracker


def test_packaged_mlflow_schema_is_what_mlflows_migrations_make():
    # Fails after an MLflow upgrade: re-make it with `python scripts/make_store_schema.py`.
    packaged = store_schema.PACKAGED.read_text()
    assert packaged.startswith(f"{store_schema.VERSION_LINE}{store_schema._mlflow_version()}\n")
    assert store_schema.normalized(packaged) == \
        store_schema.normalized(store_schema.dump_of_migrations())


def test_a_new_tracking_store_comes_from_the_packaged_schema_and_mlflow_uses_it(tmp_path,
                                                                                monkeypatch):
    # MLflow's migrations would log "Creating initial MLflow database tables": never called.
    import mlflow.store.db.utils as db_utils

    def no_migrations(engine):
        raise AssertionError("MLflow ran its migrations on a store made from the schema")

    monkeypatch.setattr(db_utils, "_initialize_tables", no_migrations)
    monkeypatch.setattr(db_utils, "_upgrade_db", no_migrations)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, None, "s")
    parent = tracker.open_parent({"a": 1}, {"t": "x"})
    run = tracker.start_trial(parent, 0, {"depth": 2}, {})
    tracker.log_metrics(run, {"val_acc": 0.5}, step=1)
    tracker.end_trial(run, "COMPLETE", {"epochs_run": 1})
    got = MlflowClient(uri).get_run(run)
    assert got.info.status == "FINISHED" and got.data.metrics["val_acc"] == 0.5
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1


def test_another_mlflow_version_takes_mlflows_own_migrations(tmp_path, monkeypatch):
    monkeypatch.setattr(store_schema, "_mlflow_version", lambda: "0.0.1")
    assert not store_schema.create_from_packaged(tmp_path / "x.db")
    assert not (tmp_path / "x.db").exists()
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", None, "s")  # migrations, still works
    assert tracker.open_parent({}, {})
