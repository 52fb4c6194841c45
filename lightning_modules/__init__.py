"""Models and the LightningModule. Plain PyTorch/Lightning: no Hydra, Optuna or MLflow here."""
