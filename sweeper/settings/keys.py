"""Every key sweeper writes into Optuna and MLflow, defined once (metric names live in
lightning_modules/metrics.py). The values are stored in users' databases: never rename one."""

# Optuna study user attributes.
IDENTITY = "sweeper.identity"  # what makes the study's trials comparable; a resume must match it
LEGACY_CONFIG = "sweeper.config"  # studies made before RECIPE: the config of their latest run
STARTS = "sweeper.starts"  # how many times a worker opened the study (seeds its sampler)
REPEAT = "sweeper.repeat"  # REPEAT.N.K: seed repeat K of trial N (its result, or a claim on it)
OBJECTIVES = "sweeper.objectives"  # a multi-objective study's objective names, in order
RECOVERED = "sweeper.recovered"  # RECOVERED.N: trial N was left running by a dead worker

# Optuna trial user attributes.
RECIPE = "sweeper.recipe"  # the settings the trial trained with (seed, data, model, augment, ...)
WORKER = "sweeper.worker"  # who holds a RUNNING trial (see liveness.py)
# How the trial was chosen: {"sampler": search.sampler, "pruner": search.pruner}. The size
# verdict is a verdict only for trials drawn at random (size_effect.design_note).
DESIGN = "sweeper.design"
RETRY_OF = "sweeper.retry_of"  # on a trial that re-runs a failed trial's configuration
# On a trial failed because its population ran out of memory: the population size its
# configuration was queued again for (not counted as a failure in a row).
SPLIT_AFTER_OOM = "sweeper.split_after_oom"
CHECKPOINT = "sweeper.checkpoint"  # absolute path of the kept weights (top search.keep_top_k)
MLFLOW_RUN_ID = "mlflow_run_id"
N_PARAMS = "n_params"
ERROR = "error"
SECONDS = "seconds"
POPULATION = "population"  # members of the population the trial trained in
WIDTH = "width"  # the width that a searched `size` resolved to

# Keys inside a seed repeat's record (REPEAT.N.K).
CLAIMED_BY, CLAIM_BEAT = "worker", "beat"  # a repeat being trained, and when it last said so
DIVERGED = "diverged"  # the repeat ended in NaN/inf: excluded from means, reported as such
RUN_ID, SEED = "run_id", "seed"

# MLflow params of the study's parent run that the report reads back (with others, study.py).
SAMPLER_PARAM, PRUNER_PARAM = "sampler", "pruner"
TRAIN_SIZE_PARAM, VAL_SIZE_PARAM = "train_size", "val_size"

# MLflow run tags.
ROLE_TAG = "sweeper.role"  # parent | trial | repeat
REPEAT_TAG = "sweeper.repeat"  # seed index of a repeat run (the trial itself is 0)
STUDY_TAG = "sweeper.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"  # COMPLETE | PRUNED | FAIL
DATA_TAG = "data.source"
N_TRIALS_TAG = "search.n_trials"  # parent run: the study's target
STORAGE_TAG = "optuna.storage"  # parent run: where the Optuna study lives
ERROR_TAG = "sweeper.error"
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
# On the study's parent run: how the study went (metrics trials_complete/_pruned/_fail too).
BEST_TRIAL_TAG = "best.trial"  # the best trial (multi-objective: the front's best first objective)
BEST_PARAM_TAG = "best.param"  # best.param.NAME: its parameters
FRONT_TAG = "pareto_front"  # multi-objective: the front's trial numbers
BEST_OBJECTIVE = "best_objective"  # metric: the best trial's objective value
FRONT_SIZE = "pareto_front_size"  # metric: trials on the Pareto front
# The size verdict (size_effect.py): tag bigger|smaller|peak|valley|null|unclear|too few, or
# descriptive where the design allows no verdict; metrics in points from the smallest to the
# largest network, with their 95% interval (suffixes _low, _high).
SIZE_VERDICT_TAG = "size_effect.verdict"
SIZE_EFFECT_VAL = "size_effect_val_acc"
SIZE_EFFECT_GAP = "size_effect_gap"
