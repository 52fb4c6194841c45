"""Population training throughput: trials per minute one at a time vs `search.population=N`,
and how far each mode is from the device's limit.

Every mode runs a whole study through Optuna + Lightning + MLflow (SQLite stores in a temp dir)
on the same data; trials differ only by seed, so their accuracies compare directly (mean ±
std). Families (--family):
  mlp   784-512-512-10, dropout 0.2, Adam 1e-3 with cosine decay, batch 128 (full MNIST)
  cnn   cnn_best's network and recipe: 32-32-64-64 conv blocks, batch norm, dropout 0.3,
        affine augmentation, one-cycle Adam 3e-3, label smoothing 0.1, batch 128 (full MNIST)
  tiny  784-16-10 on the embedded 4k sample, 1 epoch: almost no compute, so the table shows
        what each trial costs in bookkeeping (Optuna, MLflow, checkpoints) as N grows
Per mode: trials/min, s/epoch (one trial's, or the whole population's), achieved TFLOP/s (the
matmul and convolution FLOPs of training and evaluation, counted by torch's FlopCounterMode on
one member, times the trials, over the wall time) against the peak measured in the same run
(a large matmul in that precision) and the datasheet's, peak GPU memory against the
population's memory estimate (sweeper/loop/population.py), time in MLflow writes, GPU utilisation
(NVML, every 50 ms).

    python scripts/bench_population.py --family mlp --epochs 10 --solo 8 --population 64 256 \
        --precision 32 tf32 bf16

--compare-update: instead of studies, the population optimizer's unfused update against the
fused one (lightning_modules/population_optim.py), side by side: per size, `--rounds` rounds,
each training one population of that size (members differing by seed) with each update in
turn (the order alternating), fit_population only (no Optuna or MLflow). Prints the seconds
per epoch in training steps (forward, backward, update; evaluation not counted) of every
round, the medians of those and of the update's share, their ratios, and whether both updates
learned the same (val acc):

    python scripts/bench_population.py --family mlp --compare-update --population 64 \
        --epochs 1 --train-size 2560 --val-size 1000 --rounds 3
"""

import argparse
import contextlib
import dataclasses
import gc
import io
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_modules.metrics import VAL_ACC
from lightning_modules.models import build_model
from lightning_modules.population import PopulationClassifier
from lightning_modules.population_optim import StackedOptimizer, compiled
from sweeper.loop import population
from sweeper.loop.study import run_study
from sweeper.record import tracking
from sweeper.settings.config import Config, DataConfig, ParamSpec
from sweeper.train import data, training

# Dense TFLOP/s by precision, from NVIDIA's datasheets (no sparsity), by device-name substring.
DATASHEET = {"H100 PCIe": {"32": 51, "tf32": 378, "bf16": 756},
             "H100": {"32": 67, "tf32": 495, "bf16": 989},  # SXM
             "H200": {"32": 67, "tf32": 495, "bf16": 989},
             "A100": {"32": 19.5, "tf32": 156, "bf16": 312}}


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


# MLflow writes, per trial and epoch (start_trial = create_trial_run + log_params), on the main
# thread or a population's background writer
for _name in ("create_trial_run", "log_params", "log_metrics", "end_trial"):
    setattr(tracking.Tracker, _name, _timed(getattr(tracking.Tracker, _name)))


def config(family: str, store: Path, name: str, epochs: int, n_trials: int, population: int,
           precision: str) -> Config:
    cfg = Config(name=name)
    cfg.search.study_name, cfg.search.n_trials, cfg.search.pruner = name, n_trials, "none"
    cfg.search.population = population
    cfg.search.storage = f"sqlite:///{store}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{store}/mlflow.db"
    cfg.search.keep_top_k = 1
    cfg.trainer.max_epochs, cfg.trainer.precision = epochs, precision
    if family == "cnn":
        cfg.model.family, cfg.model.depth, cfg.model.width, cfg.model.dropout = "cnn", 4, 32, 0.3
        cfg.augment.name = "affine"
        cfg.trainer.lr_schedule, cfg.trainer.lr, cfg.trainer.label_smoothing = "onecycle", 3e-3, 0.1
        cfg.trainer.eval_batch_size = 1000
        cfg.search.space = {"depth": ParamSpec("categorical", choices=[4])}
    else:
        depth, width = (1, 16) if family == "tiny" else (2, 512)
        cfg.search.space = {"depth": ParamSpec("categorical", choices=[depth]),
                            "width": ParamSpec("categorical", choices=[width]),
                            "dropout": ParamSpec("categorical", choices=[0.2])}
    return cfg


def spec_of(cfg: Config) -> training.TrialSpec:
    """The trials' configuration (the space holds one choice per parameter)."""
    params = {k: p.choices[0] for k, p in cfg.search.space.items() if p.choices}
    return training.resolve(cfg, params, 0)


def trial_flops(cfg: Config, splits: data.Splits) -> float:
    """Matmul/convolution FLOPs of one trial: every training step forward + backward, and each
    epoch's evaluation (validation set + train subset), counted on one network."""
    spec = spec_of(cfg)
    net = build_model(spec.arch, splits.in_shape, splits.n_classes).to(splits.x_train.device)
    b = spec.batch_size
    x, y = splits.x_train[:b], splits.y_train[:b]
    with FlopCounterMode(display=False) as train:
        F.cross_entropy(net(x), y).backward()
    with FlopCounterMode(display=False) as evaluation, torch.no_grad():
        net.eval()(x)
    steps = -(-len(splits.y_train) // b)
    per_image_eval = evaluation.get_total_flops() / b
    n_eval = len(splits.y_val) + len(splits.y_train_eval)
    return spec.max_epochs * (steps * train.get_total_flops() + n_eval * per_image_eval)


def matmul_peak(device: torch.device, precision: str) -> float:
    """TFLOP/s of a large square matmul in this precision: the most this device does here."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    reps = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def study(cfg: Config, splits: data.Splits) -> dict:
    BOOKKEEPING["s"] = 0.0
    cuda = splits.x_train.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    log = io.StringIO()  # the study's own lines: shown only when trials fail
    error = None
    with GpuUtil() as util, contextlib.redirect_stdout(log):
        try:
            s = run_study(cfg, splits=splits)
        except Exception as e:  # e.g. too many failures in a row: show why, go on
            error = f"{type(e).__name__}: {e}"
            s = optuna.load_study(study_name=cfg.search.study_name, storage=cfg.search.storage)
    wall = time.perf_counter() - t0
    if error:
        print(f"  the study stopped: {error}", flush=True)
    done = [t for t in s.trials if t.value is not None]
    failed = len(s.trials) - len(done)
    if failed:
        print(f"  {failed} of {len(s.trials)} trials did not finish; the study said:\n"
              + "\n".join(log.getvalue().splitlines()[-8:]), flush=True)
    accs = [t.user_attrs[VAL_ACC] for t in done]
    seconds = [t.user_attrs["seconds"] for t in done] or [math.nan]
    # A trial's "seconds" is its own fit; a population member's is the whole population's.
    return {"wall": wall, "trials": len(accs), "per_min": 60 * len(accs) / wall,
            "epoch_s": statistics.median(seconds) / cfg.trainer.max_epochs,
            "acc": accs or [math.nan],
            "bookkeeping": BOOKKEEPING["s"], "util": util.mean,
            "mem": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def compare_update(family: str, epochs: int, sizes: list[int], rounds: int,
                   splits: data.Splits) -> None:
    """Unfused vs fused population update, interleaved (see the module's docstring)."""
    device = splits.x_train.device
    spec = spec_of(config(family, Path("."), "x", epochs, 1, 1, "32"))
    kind = "sgd" if spec.optimizer == "sgd" else "adam"
    t0 = time.perf_counter()
    fn = compiled(kind, device)  # once per process, before anything is timed
    print(f"compiling the fused update ({kind}, {device.type}): {time.perf_counter() - t0:.1f} s "
          "(less when Inductor's disk cache already holds it)", flush=True)
    if fn is None:
        return
    spent = {"step": 0.0, "update": 0.0}  # seconds in training steps, and the update's part

    def timed(f, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            f(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent[key] += time.perf_counter() - t
        return wrapper

    real = PopulationClassifier.training_step, StackedOptimizer.step
    PopulationClassifier.training_step = timed(real[0], "step")  # type: ignore[method-assign]
    StackedOptimizer.step = timed(real[1], "update")  # type: ignore[method-assign]
    steps = epochs * -(-len(splits.y_train) // spec.batch_size)
    print(f"\n{family}: {epochs} epoch(s), {steps} steps of {spec.batch_size}, "
          f"{splits.describe()}, {device}")
    print("| members | update | s/epoch in training steps, each round | median | "
          "of which the update, median | val acc % (mean) | unfused / fused: steps, update |")
    print("| --- " * 7 + "|", flush=True)
    for size in sizes:
        specs = [dataclasses.replace(spec, seed=i) for i in range(size)]
        times: dict[bool, list[float]] = {False: [], True: []}
        updates: dict[bool, list[float]] = {False: [], True: []}
        accs: dict[bool, float] = {}
        for r in range(rounds):
            for fused in (False, True) if r % 2 == 0 else (True, False):
                module = population.build_population(specs, splits)
                module.fused = fused
                spent["step"] = spent["update"] = 0.0
                with contextlib.redirect_stdout(io.StringIO()):
                    population.fit_population(module, specs, splits, lambda e, m: set())
                assert module.opt is not None and module.opt.fused == fused
                times[fused].append(spent["step"] / epochs)
                updates[fused].append(spent["update"] / epochs)
                accs[fused] = statistics.fmean(h[-1][VAL_ACC] for h in module.history)
                del module
                gc.collect()
        med = {f: statistics.median(t) for f, t in times.items()}
        upd = {f: statistics.median(t) for f, t in updates.items()}
        for fused in (False, True):
            ratio = f"{med[False] / med[True]:.2f}x, {upd[False] / upd[True]:.2f}x" if fused else ""
            each = ", ".join(f"{t:.2f}" for t in times[fused])
            print(f"| {size} | {'fused' if fused else 'unfused'} | {each} | {med[fused]:.2f} | "
                  f"{upd[fused]:.2f} | {100 * accs[fused]:.2f} | {ratio} |", flush=True)
    PopulationClassifier.training_step, StackedOptimizer.step = real  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=["mlp", "cnn", "tiny"], default="mlp")
    ap.add_argument("--root", default="../shared/data/mnist")
    ap.add_argument("--train-size", type=int, default=None, help="first N training images")
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 (tiny: 1)")
    ap.add_argument("--solo", type=int, default=8, help="trials run one at a time (0: none)")
    ap.add_argument("--population", type=int, nargs="+", default=[64])
    ap.add_argument("--precision", nargs="+", default=["32"], choices=["32", "tf32", "bf16"],
                    help="precisions of the population modes (one at a time: the first)")
    ap.add_argument("--val-size", type=int, default=None,
                    help="validation images (default 10,000; tiny 1,000)")
    ap.add_argument("--compare-update", action="store_true",
                    help="unfused vs fused population update, interleaved, instead of studies")
    ap.add_argument("--rounds", type=int, default=3, help="--compare-update: rounds")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    epochs = args.epochs or (1 if args.family == "tiny" else 10)
    if args.family == "tiny":
        dcfg, val = DataConfig(name="mnist_sample"), 1000
    else:
        dcfg, val = DataConfig(name="mnist", root=args.root, fallback_to_sample=False), 10_000
    splits = data.make_splits(data.load(dcfg), args.val_size or val, 0, device, args.train_size)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"data {splits.describe()}; device {name}; torch {torch.__version__}", flush=True)
    if args.compare_update:
        compare_update(args.family, args.epochs or 1, args.population, args.rounds, splits)
        return
    sheet = next((v for k, v in DATASHEET.items() if k in name), None)
    peaks = {p: matmul_peak(device, p) for p in dict.fromkeys(args.precision[:1] + args.precision)}
    flops = trial_flops(config(args.family, Path("."), "x", epochs, 1, 1, "32"), splits)
    print(f"{flops / 1e9:,.1f} GFLOP per trial ({args.family}, {epochs} epochs); matmul peak "
          "measured here: " + ", ".join(f"{p} {v:.1f}" for p, v in peaks.items())
          + " TFLOP/s" + (f"; datasheet: {sheet}" if sheet else ""), flush=True)
    base: list[float] = []  # one at a time: trials/min
    # Each row is printed as its mode ends: a run stopped by a time limit keeps what it did.
    print(f"\n{args.family}: {epochs} epochs per trial, {splits.describe()}, {name}")
    print("| mode | precision | trials | wall s | trials/min | speed-up | s/epoch | TFLOP/s | "
          "% of measured peak | % of datasheet | GPU mem GiB (estimate) | MLflow writes s | "
          "GPU util % | val acc % (mean ± std) |")
    print("| --- " * 14 + "|", flush=True)

    def row(label: str, precision: str, r: dict) -> None:
        acc = [100 * a for a in r["acc"]]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        achieved = r["trials"] * flops / r["wall"] / 1e12
        util = "n/a" if r["util"] is None else f"{r['util']:.0f}"
        mem = "n/a" if r["mem"] is None else f"{r['mem']:.1f}"
        if r["estimate"] is not None:
            mem += f" ({r['estimate']:.1f})"
        datasheet = f"{100 * achieved / sheet[precision]:.1f}" if sheet else "n/a"
        speedup = f"{r['per_min'] / base[0]:.1f}x" if base else "n/a"
        print(f"| {label} | {precision} | {r['trials']} | {r['wall']:.1f} | {r['per_min']:.1f} "
              f"| {speedup} | {r['epoch_s']:.2f} | {achieved:.2f} | "
              f"{100 * achieved / peaks[precision]:.1f} | {datasheet} | {mem} | "
              f"{r['bookkeeping']:.1f} | {util} | {statistics.fmean(acc):.2f} ± {sd:.2f} |",
              flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        def run(label: str, n: int, size: int, precision: str) -> None:
            name = f"{label.replace(' ', '_').replace('=', '')}-{precision}"  # one study each
            cfg = config(args.family, Path(tmp), name, epochs, n, size, precision)
            estimate = None
            if size > 1:
                spec = spec_of(cfg)
                estimate = min(size, population.capacity(spec, splits)) * \
                    population.member_bytes(spec, splits) / 2**30
            r = study(cfg, splits)
            r["estimate"] = estimate
            if size == 1:
                base.append(r["per_min"])
            row(label, precision, r)

        # CUDA/cuBLAS init, stores created and the fused population update compiled before
        # anything is timed
        with contextlib.redirect_stdout(io.StringIO()):
            study(config(args.family, Path(tmp), "warmup", 1, 2, 2, args.precision[0]), splits)
        compiled("adam", device)  # every family here trains with Adam
        if args.solo:
            run("one at a time", args.solo, 1, args.precision[0])
        for size in args.population:
            for precision in args.precision:
                run(f"population={size}", size, size, precision)

if __name__ == "__main__":
    main()
