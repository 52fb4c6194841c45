#!/usr/bin/env bash
# The whole population benchmark set on a lent GPU host, in one run (issue 17). The host has
# torch and Lightning; the rest comes from .whl/ (bash ../shared/device/fetch-wheels.sh here,
# then name .whl in the run's carry list). Tables go to stdout and to $OUT (or ./gpu-results).
#   bash scripts/gpu_populations.sh      # at most 9 minutes (each part has its own limit)
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import optuna, hydra, mlflow" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
  python3 .whl/check-closure.py --live /tmp/site \
    --import optuna,optuna_integration,hydra,mlflow,sqlalchemy,alembic,mlxtend || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
bench() {  # name, limit in seconds, arguments
  local name=$1 limit=$2; shift 2
  echo "== $name: python scripts/bench_population.py $*"
  timeout "$limit" python3 scripts/bench_population.py "$@" 2>&1 \
    | grep -v '^\[' | tee "$OUT/$name.log" | grep -E '^\||TFLOP per trial|^data|trials/min|rror'
}
# The reference MLP task (docs/scale-out.md's population table): one at a time, 64 and 256
# members in float32, then 256 in TF32 and bf16.
bench mlp 220 --family mlp --epochs 10 --solo 8 --population 64 256 --precision 32
bench mlp-precision 120 --family mlp --epochs 10 --solo 0 --population 256 --precision tf32 bf16
# cnn_best's network and recipe (its seed repeats and fashion_cnn train this way), 2 epochs.
bench cnn 150 --family cnn --epochs 2 --solo 2 --population 16 64 --precision 32 tf32
# What each trial costs in bookkeeping as N grows (no compute to speak of).
bench tiny 40 --family tiny --solo 16 --population 64 256
