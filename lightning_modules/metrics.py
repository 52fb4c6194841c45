"""Metric names: defined once, used by the LightningModule, MLflow logging, Optuna and reports."""

TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
TRAIN_ACC = "train_acc"
VAL_ACC = "val_acc"
GAP = "gap"  # TRAIN_ACC - VAL_ACC, both measured in eval mode at the end of each epoch

EPOCH_METRICS = (TRAIN_LOSS, VAL_LOSS, TRAIN_ACC, VAL_ACC, GAP)

# Per-trial summaries (logged once, when the trial ends).
BEST_VAL_ACC = "best_val_acc"
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"

# Accuracy on the source's test set: measured once, for the configurations a study confirms.
TEST_ACC = "test_acc"
