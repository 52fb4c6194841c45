"""What a trial costs outside training as populations grow: trials per minute of whole studies
of tiny 784-16-10 MLPs (dropout and lr sampled by TPE) on the embedded 4k sample, where the
compute is next to nothing. Runs on any commit that has `search.population` (it uses only
run_study and the config), so the same command measures before and after a change.

    python scripts/bench_bookkeeping.py --epochs 2
"""

import argparse
import contextlib
import io
import tempfile
import time

import torch

from sweeper.loop.study import run_study
from sweeper.settings.config import Config, DataConfig, ParamSpec
from sweeper.train import data

# (trials, population, pruner); the last: two populations, the second pruned against the first
MODES = [(16, 1, "none"), (16, 16, "none"), (64, 64, "none"), (256, 256, "none"),
         (512, 256, "median")]


def config(store: str, name: str, n: int, population: int, pruner: str, epochs: int) -> Config:
    cfg = Config(name=name)
    cfg.search.study_name, cfg.search.n_trials, cfg.search.pruner = name, n, pruner
    cfg.search.population = population
    cfg.search.storage = f"sqlite:///{store}/optuna.db"
    cfg.tracking.uri = f"sqlite:///{store}/mlflow.db"
    cfg.search.keep_top_k, cfg.trainer.max_epochs = 1, epochs
    cfg.search.space = {"depth": ParamSpec("categorical", choices=[1]),
                        "width": ParamSpec("categorical", choices=[16]),
                        "dropout": ParamSpec("float", low=0.0, high=0.3),
                        "lr": ParamSpec("float", low=1e-4, high=1e-2, log=True)}
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    splits = data.make_splits(data.load(DataConfig(name="mnist_sample")), 1000, 0,
                              torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet, contextlib.redirect_stderr(io.StringIO()):
            run_study(config(tmp, "warmup", 2, 2, "none", 1), splits=splits)
        # Commits with the fused population update (256 tiny members use it): compiled before
        # anything is timed, as the warm-up study is too small to.
        with contextlib.suppress(ImportError):
            from lightning_modules.population_optim import compiled

            compiled("adam", torch.device("cpu"))
        print("| trials | population | pruner | wall s | trials/min |")
        print("| --- | --- | --- | --- | --- |")
        for n, population, pruner in MODES:
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                run_study(config(tmp, f"p{population}-{pruner}-{n}", n, population, pruner,
                                 args.epochs), splits=splits)
            wall = time.perf_counter() - t0
            print(f"| {n} | {population} | {pruner} | {wall:.1f} | {60 * n / wall:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
