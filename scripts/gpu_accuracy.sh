#!/usr/bin/env bash
# Issue 18's accuracy runs on a lent GPU host, in one call of under 10 minutes. The host has
# torch and Lightning and no network; prepare here, then carry both ignored folders:
#   bash ../shared/device/fetch-wheels.sh                            # .whl/ (Optuna, Hydra, MLflow)
#   mkdir -p .data/mnist && cp ../shared/data/mnist/*-ubyte.gz .data/mnist/    # 11 MB, git-ignored
#   run: carry [".whl", ".data"], command "bash scripts/gpu_accuracy.sh", timeout 600
# One small CNN leaves an H100/H200 mostly idle (launch-bound), so the parts share the GPU:
#   probe   a tiny cnn_deep study (2 epochs on 12,800 images, the trial then 2 seed repeats as a
#           population): the pipeline works here, and what an epoch costs alone and as a population
#   mnist   cnn_deep, the trial then its seed repeats at once (as one population, or as separate
#           workers where that is cheaper or the probe's population failed), for the first of
#           40, 30, 20 epochs x 6 seeds, then 20 x 4, 20 x 3, that the probe says fits before
#           DEADLINE; test measured once per seed (confirm.test)
#           (the last plan also when none fits); EPOCHS=20 SEEDS=6 repeats the measured run's
#           epochs and seeds (population or workers still follows the probe)
#   kaggle  cnn_deep's recipe (20 epochs, 3 seeds; TF32, the repeats as a population) on
#           Kaggle-format rows built from MNIST's training images, then `export --refit` alone
#           and as `--ensemble 3` (when REFIT_S seconds are left before DEADLINE), each with
#           --kaggle-test and scored on the 18,000 held-out rows. Not in the probe's plan: on a
#           slower GPU the deadline may stop the refits
# Studies, stores and kept weights go to $W/{probe,mnist,kaggle} and come back packed in $OUT,
# so that exports without --refit are made on any machine: unpack into the same $W there (the
# weights' paths are absolute), run from a checkout with MNIST in .data/mnist (the studies'
# data.root), rebuild the Kaggle files with `scripts/mnist_to_kaggle_csv.py --out $W/kaggle_csv`
# (seeded: the same rows), then `python -m sweeper.export --storage sqlite:///$W/mnist/optuna.db ...`.
set -u
T0=$SECONDS
OUT=${OUT:-/tmp/gpu-results}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
MNIST=${MNIST:-.data/mnist}
DEADLINE=${DEADLINE:-530}   # s after start: training still running then is stopped (SIGTERM)
SEEDS=${SEEDS:-6}           # with EPOCHS: the seeds (else the plan above picks both)
EPOCHS=${EPOCHS:-}          # fixed epochs for the mnist part instead of the probe's choice
PROBE_SIZE=${PROBE_SIZE:-12800}  # the probe's training images
EXTRA=${EXTRA:-}            # overrides for the mnist and kaggle studies (a CPU dry run: data.train_size=...)
KEXTRA=${KEXTRA:-}          # overrides for the kaggle study alone (its --refit exports follow its recipe)
REFIT_S=${REFIT_S:-240}      # the --refit exports start only with this long left before DEADLINE
W=${W:-/tmp/gpuacc}
if [ -n "$(ls -A "$W" 2>/dev/null)" ]; then  # never overwrite results unpacked there
  echo "W=$W is not empty: point W at a new folder" >&2
  exit 2
fi
mkdir -p "$W/kaggle_csv"
say() { echo "[$(( SECONDS - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
source scripts/gpu_host.sh  # MNIST present, the wheels installed, PYTHONPATH
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.csv"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
say "set up"

stores() {  # a study's Optuna and MLflow stores and kept weights, all under $W/$1
  echo "search.storage=sqlite:///$W/$1/optuna.db tracking.uri=sqlite:///$W/$1/mlflow.db" \
       "search.checkpoint_dir=$W/$1/checkpoints"
}
sweep() {  # log name, then overrides: one worker in the background (its pid kept for the deadline)
  local name=$1; shift
  python3 -m sweeper "$@" > "$W/$name.log" 2>&1 &
  echo $! >> "$W/pids"
}
epochs() {  # study folder -> "trial_s population_s repeats": epoch 2's wall time from the
  # timestamps of val_acc (free of start-up), for the trial and for its repeats together
  python3 - "$W/$1/mlflow.db" <<'EOF'
import sqlite3, sys
rows = sqlite3.connect(sys.argv[1]).execute(
    "select t.value, r.run_uuid, m.step, m.timestamp, r.status from metrics m "
    "join runs r on r.run_uuid = m.run_uuid join tags t on t.run_uuid = r.run_uuid "
    "and t.key = 'sweeper.role' where m.key = 'val_acc'").fetchall()
def epoch2(role):
    at = {step: max((ts for r, _, s, ts, _ in rows if r == role and s == step), default=None)
          for step in (1, 2)}
    return (at[2] - at[1]) / 1e3 if None not in at.values() else 0.0
done = {u for r, u, _, _, st in rows if r == "repeat" and st == "FINISHED"}
print(f"{epoch2('trial'):.2f} {epoch2('repeat'):.2f} {len(done)}")
EOF
}

# Kaggle-format files (CPU, while the probe runs)
python3 scripts/mnist_to_kaggle_csv.py --root "$MNIST" --out "$W/kaggle_csv" > "$W/csv.log" 2>&1 &
CSV=$!

# probe
timeout -k 15 180 python3 -m sweeper +experiment=cnn_deep data.root="$MNIST" \
  data.train_size=$PROBE_SIZE trainer.max_epochs=2 confirm.seeds=3 confirm.test=false \
  search.population=2 trainer.precision=tf32 search.study_name=probe $(stores probe) \
  > "$W/probe.log" 2>&1 || { say "the probe failed: stopping here"; tail -n 30 "$W/probe.log"; exit 1; }
read -r T1 TP NREP <<< "$(epochs probe)"
say "probe: an epoch of ${PROBE_SIZE} images: ${T1}s alone, ${TP}s for 2 repeats as a population ($NREP finished)"
tail -n 3 "$W/probe.log"
if [ -z "$T1" ] || [ "$T1" = 0.00 ]; then
  say "the probe trained nothing: stopping here"; tail -n 30 "$W/probe.log"; exit 1
fi
POP=2
if [ "$NREP" != 2 ]; then
  POP=1
  say "the population failed here (see probe.log): repeats run as separate workers"
fi
# Probe-export the 3 probe networks as one model (torch.export + ONNX on this host's torch)
python3 -m sweeper.export --study probe --out "$W/probe_export" --ensemble 3 --no-mlflow \
  --storage "sqlite:///$W/probe/optuna.db" > "$W/probe_export.log" 2>&1 &
echo $! >> "$W/pids"

# mnist: the most epochs and seeds that the probe says fit before the deadline, and whether the
# seed repeats train as one population or as separate workers sharing the GPU
left=$(( DEADLINE - (SECONDS - T0) - 30 ))
read -r EPOCHS SEEDS MPOP <<< "$(python3 -c "
f = 430 / ($PROBE_SIZE / 128)  # the probe's epoch: PROBE_SIZE/128 steps; a full one 430
t1, tp, left, pop = $T1 * f, $TP * f, $left, $POP
b = max(tp - t1, 0.0)  # what one more member adds to a population's epoch
def cost(e, s, mode):  # the trial alone, then its s-1 repeats at once; 1.4: the GPU is shared
    m = s - 1
    rest = t1 + b * (m - 1) if mode > 1 else t1 * max(1.0, m / 2)  # workers: a guess
    return 1.4 * e * (t1 + rest)
fixed = '$EPOCHS'
plans = [(int(fixed), $SEEDS)] if fixed else [(40, 6), (30, 6), (20, 6), (20, 4), (20, 3)]
for e, s in plans:
    mode = min(([s - 1] if pop > 1 else []) + [1], key=lambda m: cost(e, s, m))
    if cost(e, s, mode) <= left or (e, s) == plans[-1]:
        print(e, s, mode)
        break")"
[ -n "$MPOP" ] || { say "no plan for the mnist part (see above): stopping here"; exit 1; }
say "mnist: cnn_deep, $EPOCHS epochs x $SEEDS seeds, population=$MPOP (${left}s left for it)"
MARGS=(+experiment=cnn_deep data.root="$MNIST" trainer.max_epochs="$EPOCHS" confirm.seeds="$SEEDS"
       search.population=$MPOP trainer.precision=tf32 search.study_name=cnn_deep_gpu $(stores mnist) $EXTRA)
sweep mnist "${MARGS[@]}"
MPIDS=($!)
if [ "$MPOP" = 1 ]; then
  for i in $(seq 2 $(( SEEDS - 1 ))); do sweep "mnist$i" "${MARGS[@]}"; MPIDS+=($!); done
fi

# kaggle: the committed recipe on 37,000 train / 5,000 validation rows, then --refit
K="$W/kaggle_csv"
if ! wait $CSV; then
  say "Kaggle files not written, no kaggle part:"; cat "$W/csv.log"
else
  sweep kaggle +experiment=cnn_deep data=kaggle data.train_csv="$K/train.csv" \
    search.population=$POP trainer.precision=tf32 search.study_name=kaggle_cnn_deep_gpu \
    $(stores kaggle) $EXTRA $KEXTRA
  KPID=$!
  (
    while kill -0 $KPID 2>/dev/null; do sleep 1; done  # not this subshell's child: no wait
    say "kaggle study done: $(grep -E '^\[|^  trial ' "$W/kaggle.log" | tr '\n' ' ')"
    if [ $(( DEADLINE - (SECONDS - T0) )) -lt "$REFIT_S" ]; then
      say "kaggle --refit: skipped, under ${REFIT_S}s left"; exit 0
    fi
    for kind in single ensemble; do
      ens=(); [ $kind = ensemble ] && ens=(--ensemble 3)
      python3 -m sweeper.export --study kaggle_cnn_deep_gpu --out "$W/kaggle/refit_$kind" --refit \
        "${ens[@]}" --kaggle-test "$K/test.csv" --storage "sqlite:///$W/kaggle/optuna.db" \
        > "$W/refit_$kind.log" 2>&1 &
      echo $! >> "$W/pids"
    done
    wait
    for kind in single ensemble; do
      score=$(python3 scripts/score_submission.py "$W/kaggle/refit_$kind/submission.csv" \
              "$K/test_labels.csv" 2>&1 | tail -n 1)
      say "kaggle --refit $kind: $score"
    done
  ) &
  KJOB=$!
fi

# The deadline: stop what still trains (the sweeps end their runs cleanly on SIGTERM)
KJOB=${KJOB:-}
while [ $(( SECONDS - T0 )) -lt "$DEADLINE" ] && { { [ -n "$KJOB" ] && kill -0 "$KJOB" 2>/dev/null; } ||
      for p in "${MPIDS[@]}"; do kill -0 "$p" 2>/dev/null && break; done; }; do
  sleep 2
done
if [ $(( SECONDS - T0 )) -ge "$DEADLINE" ]; then
  say "deadline reached: stopping what still runs"
  kill -TERM $(cat "$W/pids") 2>/dev/null
  for _ in $(seq 20); do kill -0 $(cat "$W/pids") 2>/dev/null || break; sleep 1; done
  kill -KILL $(cat "$W/pids") 2>/dev/null
fi
wait
say "mnist study: $(grep -E '^\[|^  trial ' "$W"/mnist*.log | tr '\n' ' ')"
say "probe export: $(grep -E 'accuracy|exported|error' "$W/probe_export.log" | tr '\n' ' ')"
python3 - "$W" <<'EOF' | tee -a "$OUT/summary.txt"
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
w = sys.argv[1]
for name, study in (("mnist", "cnn_deep_gpu"), ("kaggle", "kaggle_cnn_deep_gpu")):
    try:
        s = optuna.load_study(study_name=study, storage=f"sqlite:///{w}/{name}/optuna.db")
    except Exception as e:
        print(f"{name}: no study ({e})")
        continue
    for k, v in sorted(s.user_attrs.items()):
        if k.startswith("sweeper.repeat."):
            print(f"{name} {k}: " + " ".join(f"{m}={x:.4f}" for m, x in sorted(v.items())
                                                 if isinstance(x, float)))
EOF
# weights and stores only (the exported files are remade from them)
tar -czf "$OUT/mnist.tgz" --exclude artifacts --exclude probe/checkpoints -C "$W" mnist probe
tar -czf "$OUT/kaggle.tgz" --exclude artifacts --exclude '*.onnx' --exclude '*.pt2' \
  --exclude '*.png' -C "$W" kaggle
tar -czf "$OUT/logs.tgz" -C "$W" $(cd "$W" && ls *.log)
ls -la "$OUT"
for f in "$OUT"/*; do  # the device tool brings back files of up to 16 MiB
  [ "$(stat -c %s "$f")" -le $(( 16 * 1024 * 1024 )) ] || say "$f is over 16 MiB: it will not come back"
done
# Time left: some of the suite with the GPU present (the tests themselves never need one)
rest=$(( ${END:-585} - (SECONDS - T0) ))
TESTS=${TESTS-tests/test_population.py tests/test_training.py tests/test_export.py}
if [ "$rest" -gt 30 ] && [ -n "$TESTS" ]; then
  say "tests with the GPU present, for up to ${rest}s: $TESTS"
  timeout "$rest" python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -n 15 |
    tee -a "$OUT/summary.txt"
fi
say "done"
