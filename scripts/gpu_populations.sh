#!/usr/bin/env bash
# The whole population benchmark set on a lent GPU host, in one run (issue 17). The host has
# torch and Lightning and no network; prepare here, then carry both ignored folders:
#   bash ../shared/device/fetch-wheels.sh                            # .whl/ (Optuna, Hydra, MLflow)
#   mkdir -p .data/mnist && cp ../shared/data/mnist/*-ubyte.gz .data/mnist/    # 11 MB, git-ignored
#   run: carry [".whl", ".data"], command "bash scripts/gpu_populations.sh", timeout 590
# Every table row is printed (and kept in $OUT, or ./gpu-results) as soon as its mode ends.
# The parts' limits add up to 520 s (give the run 590 s: the wheels install first).
set -u
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
MNIST=${MNIST:-.data/mnist}
source scripts/gpu_host.sh  # MNIST present, the wheels installed, PYTHONPATH
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
part() {  # name, limit in seconds, script and arguments
  local name=$1 limit=$2; shift 2
  echo "== $name: python $*"
  timeout "$limit" python3 "$@" 2>&1 | grep --line-buffered -v '^\[' | tee "$OUT/$name.log"
}
# Grouped convolutions vs torch.func.vmap vs separate networks, one training step.
part conv 30 scripts/bench_grouped_conv.py --members 16 64 --steps 5
# The reference MLP task (docs/scale-out.md's population table), 10 epochs: one at a time and
# 64 members in float32 and TF32; 256 members in float32; 256 in bf16.
part mlp 130 scripts/bench_population.py --family mlp --root "$MNIST" --epochs 10 --solo 4 \
  --population 64 --precision 32 tf32
part mlp256 150 scripts/bench_population.py --family mlp --root "$MNIST" --epochs 10 \
  --solo 0 --population 256 --precision 32
part mlp256-bf16 130 scripts/bench_population.py --family mlp --root "$MNIST" --epochs 10 \
  --solo 0 --population 256 --precision bf16
# cnn_best's network and recipe (its seed repeats and fashion_cnn train this way), 2 epochs
# on 10k images: one at a time, 16 and 64 members, float32 and TF32.
part cnn 80 scripts/bench_population.py --family cnn --root "$MNIST" --train-size 10000 \
  --epochs 2 --solo 2 --population 16 64 --precision 32 tf32
# (Bookkeeping alone, without compute: scripts/bench_bookkeeping.py, a CPU measurement.)
