"""The study's record: the ledger (every write to a trial's record), stores, MLflow."""
