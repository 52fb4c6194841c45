"""Population training throughput: trials per minute one at a time vs `search.population=N`.

Both modes run whole studies through Optuna + Lightning + MLflow (SQLite stores in a temp dir)
on the same data: 784-512-512-10 MLPs, dropout 0.2, Adam lr 1e-3 with cosine decay, batch 128,
the same number of epochs; trials differ only by seed, so their accuracies compare directly
(mean ± std). Prints trials/minute, seconds per epoch (one trial's, or the whole population's),
time spent in MLflow/Optuna bookkeeping, and GPU utilisation (NVML, sampled every 50 ms).

    python scripts/bench_population.py --root ../shared/data/mnist --epochs 10 --solo 8 \
        --population 64
"""

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from lightning_modules.metrics import VAL_ACC
from sweeper import data, tracking
from sweeper.config import Config, DataConfig, ParamSpec
from sweeper.study import run_study


class GpuUtil:
    """Mean GPU utilisation (%) while the block runs; None without NVML or GPU."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        except Exception:
            self.read = None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self.read())

    def __enter__(self):
        if self.read is not None and torch.cuda.is_available():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


BOOKKEEPING = {"s": 0.0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            BOOKKEEPING["s"] += time.perf_counter() - t0
    return wrapper


for _name in ("start_trial", "log_metrics", "end_trial"):  # MLflow writes, per trial and epoch
    setattr(tracking.Tracker, _name, _timed(getattr(tracking.Tracker, _name)))


def study(splits: data.Splits, store: Path, name: str, epochs: int, n_trials: int,
          population: int) -> dict:
    cfg = Config(name=name)
    cfg.search.study_name, cfg.search.n_trials, cfg.search.pruner = name, n_trials, "none"
    cfg.search.population = population
    cfg.search.storage = f"sqlite:///{store}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{store}/mlflow.db"
    cfg.search.keep_top_k = 1
    cfg.trainer.max_epochs = epochs
    cfg.search.space = {"depth": ParamSpec("categorical", choices=[2]),
                        "width": ParamSpec("categorical", choices=[512]),
                        "dropout": ParamSpec("categorical", choices=[0.2])}
    BOOKKEEPING["s"] = 0.0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with GpuUtil() as util:
        s = run_study(cfg, splits=splits)
    wall = time.perf_counter() - t0
    accs = [t.user_attrs[VAL_ACC] for t in s.trials if t.value is not None]
    seconds = [t.user_attrs["seconds"] for t in s.trials if t.value is not None]
    # A trial's "seconds" is its own fit; a population member's is the whole population's.
    return {"wall": wall, "trials": len(accs), "per_min": 60 * len(accs) / wall,
            "epoch_s": statistics.median(seconds) / epochs, "acc": accs,
            "bookkeeping": BOOKKEEPING["s"], "util": util.mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--solo", type=int, default=8, help="trials run one at a time")
    ap.add_argument("--population", type=int, nargs="+", default=[64])
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = data.make_splits(data.load(DataConfig(name="mnist", root=args.root,
                                                   fallback_to_sample=False)), 10_000, 0, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"data {splits.describe()}; device {name}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        study(splits, Path(tmp), "warmup", 1, 2, 2)  # CUDA/cuBLAS init, stores created
        rows = [("one at a time", study(splits, Path(tmp), "solo", args.epochs, args.solo, 1))]
        for p in args.population:
            rows.append((f"population={p}",
                         study(splits, Path(tmp), f"pop{p}", args.epochs, p, p)))
    base = rows[0][1]["per_min"]
    print(f"\n{args.epochs} epochs per trial, 784-512-512-10, batch 128, 50k MNIST, {name}")
    print("| mode | trials | wall s | trials/min | speed-up | s/epoch | bookkeeping s | "
          "GPU util % | val acc % (mean ± std) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, r in rows:
        acc = [100 * a for a in r["acc"]]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        util = "n/a" if r["util"] is None else f"{r['util']:.0f}"
        print(f"| {label} | {r['trials']} | {r['wall']:.1f} | {r['per_min']:.1f} | "
              f"{r['per_min'] / base:.1f}x | {r['epoch_s']:.2f} | {r['bookkeeping']:.1f} | "
              f"{util} | {statistics.fmean(acc):.2f} ± {sd:.2f} |", flush=True)


if __name__ == "__main__":
    main()
