"""sweeper: Hydra + Optuna + Lightning + MLflow sweeps over digit-image classifiers."""
