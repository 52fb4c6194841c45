# Sourced by the GPU scripts (gpu_accuracy.sh, gpu_populations.sh) on a lent GPU host: MNIST in
# $MNIST, then Optuna/Hydra/MLflow from the carried .whl/ where the host lacks them.
if ! ls "$MNIST"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  echo "no MNIST IDX files in $MNIST: copy ../shared/data/mnist/*-ubyte.gz there and carry .data" >&2
  exit 2
fi
if [ -d .whl ] && ! python3 -c "import optuna, hydra, mlflow" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
  # Seen on an H200 host (2026-11-28): the check flags databricks-sdk's certifi pin, which the
  # sweep never touches; what must hold is that the imports work.
  python3 .whl/check-closure.py --live /tmp/site \
    --import optuna,optuna_integration,hydra,mlflow,sqlalchemy,alembic,mlxtend ||
    echo "(closure check: going on; the imports are checked next)"
  python3 -c "import optuna, hydra, mlflow, mlxtend" || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
