"""Re-make sweeper/record/store_schemas/mlflow.sql: the empty MLflow SQLite store, as MLflow's own
migrations make it, for the installed MLflow (run after an MLflow upgrade; tests/test_stores.py
fails until then, and new stores meanwhile take MLflow's slower migration path).

    python scripts/make_store_schema.py
"""

from pathlib import Path

from sweeper.record.store_schema import PACKAGED, dump_of_migrations

if __name__ == "__main__":
    PACKAGED.write_text(dump_of_migrations())
    print(f"wrote {PACKAGED} ({PACKAGED.stat().st_size:,} bytes)")
    print(f"(from {Path(__file__).name}; commit it)")
