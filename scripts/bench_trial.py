"""Framework overhead: one trial through Optuna + Lightning + MLflow vs a bare PyTorch loop.

Same model (784-512-512-10 MLP, dropout 0.2), Adam lr 1e-3 (fused, as the framework's) with
the default cosine decay, batch 128, the same 50k/10k MNIST tensors, the same per-epoch
evaluation (val set + equal-size train subset, eval mode). Runs are interleaved (order
alternates) and the median ratio is printed, because this machine is noisy. Both run in this
process, after Lightning's import. Also printed: the epoch's arithmetic (FLOPs of the matmuls)
over this machine's measured float32 matmul rate at the training shapes, and the bare epoch's
time against that limit.

    python scripts/bench_trial.py --root ../shared/data/mnist --epochs 3 --repeats 3
    python scripts/bench_trial.py --root ../shared/data/mnist --epochs 10 --numerics 3
"""

import argparse
import itertools
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_modules.dropout import FastDropout
from lightning_modules.models import Architecture, build_model
from sweeper.loop.study import run_study
from sweeper.settings.config import Config, DataConfig, ParamSpec
from sweeper.train import data
from sweeper.train.training import trial_seed

ARCH = Architecture("mlp", (512, 512), 0.2)


def bare(splits: data.Splits, epochs: int, seed: int, stock: bool = False) -> tuple[float, float]:
    """(seconds, final val_acc). stock: torch's own nn.Dropout and per-tensor Adam instead of
    the project's FastDropout and fused Adam (to show the faster numerics learn as well)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(ARCH, splits.in_shape, 10)
    if stock:
        for i, m in enumerate(model.net):
            if isinstance(m, FastDropout):
                model.net[i] = torch.nn.Dropout(m.p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=not stock)
    g = torch.Generator().manual_seed(seed)
    n, bs = len(splits.y_train), 128
    total, step = epochs * -(-n // bs), 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            for group in opt.param_groups:  # the framework's default cosine schedule
                group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / total))
            step += 1
            j = order[i:i + bs]
            loss = F.cross_entropy(model(splits.x_train[j]), splits.y_train[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.inference_mode():
            acc = [sum((model(x[i:i + 5000]).argmax(1) == y[i:i + 5000]).sum().item()
                       for i in range(0, len(y), 5000)) / len(y)
                   for x, y in ((splits.x_val, splits.y_val),
                                (splits.x_train_eval, splits.y_train_eval))]
    return time.perf_counter() - t0, acc[0]


def framework(splits: data.Splits, epochs: int, store: Path, name: str) -> tuple[float, float]:
    """(whole 1-trial study incl. opening both stores and the parent run, the trial alone)"""
    cfg = Config(name=name)
    cfg.search.study_name = name
    cfg.search.n_trials, cfg.search.pruner = 1, "none"
    cfg.search.storage = f"sqlite:///{store}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{store}/mlflow.db"
    cfg.trainer.max_epochs = epochs
    cfg.search.space = {"depth": ParamSpec("categorical", choices=[2]),
                        "width": ParamSpec("categorical", choices=[512]),
                        "dropout": ParamSpec("categorical", choices=[0.2])}
    t0 = time.perf_counter()
    study = run_study(cfg, splits=splits)
    return time.perf_counter() - t0, study.trials[0].user_attrs["seconds"]


def conventional(splits: data.Splits, epochs: int, seed: int, store: Path) -> float:
    """The stack people usually glue together: a LightningModule with automatic optimization
    and self.log per step, DataLoader(TensorDataset) with shuffle, MLFlowLogger, Lightning's
    default Trainer (checkpointing, progress bar off only to keep the output readable)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import MLFlowLogger
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build_model(ARCH, splits.in_shape, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            x, y = batch
            acc = (self.net(x).argmax(1) == y).float().mean()
            self.log(f"acc_{dataloader_idx}", acc)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=epochs * -(-len(splits.y_train) // 128))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    t0 = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    train = DataLoader(TensorDataset(splits.x_train, splits.y_train), batch_size=128,
                       shuffle=True)
    evals = [DataLoader(TensorDataset(splits.x_val, splits.y_val), batch_size=5000),
             DataLoader(TensorDataset(splits.x_train_eval, splits.y_train_eval),
                        batch_size=5000)]
    logger = MLFlowLogger(experiment_name="conventional",
                          tracking_uri=f"sqlite:///{store}/conventional.db")
    trainer = pl.Trainer(max_epochs=epochs, logger=logger, enable_progress_bar=False,
                         default_root_dir=str(store), accelerator="cpu", devices=1)
    trainer.fit(Module(), train, evals)
    return time.perf_counter() - t0


def arithmetic_limit(splits: data.Splits) -> tuple[float, float]:
    """(FLOP per epoch of the matmuls, seconds they take at the measured matmul rate)"""
    dims = [784, 512, 512, 10]
    macs = sum(a * b for a, b in itertools.pairwise(dims))
    n_eval = len(splits.y_val) + len(splits.y_train_eval)
    flop = 2 * macs * (3 * len(splits.y_train) + n_eval)  # forward + 2x for backward
    a, w = torch.randn(128, 784), torch.randn(784, 512)
    for _ in range(50):
        a @ w
    t0, reps = time.perf_counter(), 2000
    for _ in range(reps):
        a @ w
    rate = reps * 2 * 128 * 784 * 512 / (time.perf_counter() - t0)
    print(f"float32 matmul 128x784 @ 784x512: {rate / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    return flop, flop / rate


def numerics(splits: data.Splits, epochs: int, seeds: int) -> None:
    res: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for seed in range(seeds):
        for stock in (True, False):
            res[stock].append(bare(splits, epochs, seed, stock))
            s, acc = res[stock][-1]
            print(f"seed {seed} {'torch dropout + Adam' if stock else 'FastDropout + fused Adam'}"
                  f": val {100 * acc:.2f}% in {s:.1f}s", flush=True)
    for stock, rows in res.items():
        acc = [100 * a for _, a in rows]
        print(f"{'torch dropout + per-tensor Adam' if stock else 'FastDropout + fused Adam'}: "
              f"val {statistics.fmean(acc):.2f} ± {statistics.stdev(acc):.2f}% "
              f"({seeds} seeds, {epochs} epochs), {statistics.median(s for s, _ in rows):.1f}s "
              "median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/mnist")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--numerics", type=int, default=0, metavar="SEEDS",
                    help="instead: val accuracy of torch's dropout + per-tensor Adam vs ours, "
                         "bare loop, this many seeds each")
    args = ap.parse_args()
    splits = data.make_splits(data.load(DataConfig(name="mnist", root=args.root,
                                                   fallback_to_sample=False)),
                              10_000, 0, torch.device("cpu"))
    print(f"data {splits.describe()}; torch threads {torch.get_num_threads()}")
    if args.numerics:
        numerics(splits, args.epochs, args.numerics)
        return
    flop, limit = arithmetic_limit(splits)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        framework(splits, 1, store, "warmup")  # creates the stores once: not a per-trial cost
        rows = []  # (bare, study, trial, conventional) seconds
        for r in range(args.repeats):
            order = ("bare", "fw", "conv") if r % 2 == 0 else ("conv", "fw", "bare")
            for which in order:
                if which == "bare":
                    b, _ = bare(splits, args.epochs, trial_seed(0, 0))
                elif which == "fw":
                    s, t = framework(splits, args.epochs, store, f"bench{r}")
                else:
                    c = conventional(splits, args.epochs, trial_seed(0, 0), store)
            rows.append((b, s, t, c))
            print(f"repeat {r}: bare {b:.2f}s | framework study {s:.2f}s (ratio {s / b:.3f}), "
                  f"trial alone {t:.2f}s (ratio {t / b:.3f}) | conventional stack {c:.2f}s "
                  f"(ratio {c / b:.3f})", flush=True)
    med = statistics.median
    b = med(r[0] for r in rows)
    t = med(r[2] for r in rows)
    print(f"\nmedian of {args.repeats}: bare loop {b:.2f}s ({b / args.epochs:.2f}s/epoch); "
          f"framework/bare: whole 1-trial study {med(r[1] / r[0] for r in rows):.3f}, "
          f"trial alone {med(r[2] / r[0] for r in rows):.3f}; conventional stack "
          f"{med(r[3] / r[0] for r in rows):.3f}\n"
          f"arithmetic limit {flop:.3g} FLOP/epoch = {limit:.2f}s/epoch: bare epoch "
          f"{b / args.epochs / limit:.2f}x it, framework epoch {t / args.epochs / limit:.2f}x it")


if __name__ == "__main__":
    main()
