"""Scale-out on one machine: 2 workers vs 1 on a shared PostgreSQL study, and the per-trial cost
of PostgreSQL stores vs the SQLite default.

1. Speed-up: the same 8 reference trials (784-512-512-10 MLP, dropout 0.2, only lr searched,
   pruning off) run by 1 worker with all cores vs 2 workers started together (1 thread each,
   and 2 threads each), each a real `python -m sweeper` process. Wall time of the whole job.
2. Storage overhead: tiny trials (embedded sample, width 16, 2 epochs) through run_study with
   SQLite stores vs PostgreSQL stores (Optuna and MLflow both), interleaved; seconds per trial.

Starts a throwaway PostgreSQL server (tests/postgres.py) unless --pg URL names one.

    python scripts/bench_workers.py --root ../shared/data/mnist
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweeper.loop.study import run_study  # noqa: E402
from sweeper.settings.config import Config, ParamSpec  # noqa: E402
from tests.postgres import Throwaway, server_bin  # noqa: E402


def workers(n: int, threads: int, pg, root: str | None, trials: int, epochs: int) -> float:
    tag = uuid.uuid4().hex[:8]
    optuna_url, mlflow_url = pg.create_db(f"o_{tag}"), pg.create_db(f"m_{tag}")
    data = [f"data.root={root}"] if root else ["data=mnist_sample", "data.val_size=1000"]
    overrides = [*data, f"search.study_name=bench-{tag}", f"search.n_trials={trials}",
                 "search.sampler=random", "search.pruner=none", f"trainer.max_epochs={epochs}",
                 "search.space.depth=null", "search.space.width=null",
                 "search.space.dropout=null", f"search.storage={optuna_url}",
                 f"tracking.uri={mlflow_url}", f"hydra.run.dir={tempfile.mkdtemp()}",
                 f"tracking.artifact_location={Path(tempfile.mkdtemp()).as_uri()}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "sweeper", *overrides], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    return time.perf_counter() - t0


def tiny_study(storage: str, tracking: str, trials: int) -> float:
    cfg = Config(name="overhead")
    cfg.data.name, cfg.data.val_size = "mnist_sample", 1000
    cfg.search.study_name = f"overhead-{uuid.uuid4().hex[:8]}"
    cfg.search.storage, cfg.tracking.uri = storage, tracking
    cfg.search.n_trials, cfg.search.pruner, cfg.trainer.max_epochs = trials, "none", 2
    cfg.search.space = {"width": ParamSpec("int", low=16, high=16)}
    cfg.model.depth = 1
    t0 = time.perf_counter()
    run_study(cfg)
    return (time.perf_counter() - t0) / trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="MNIST IDX folder (default: the embedded sample)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny-trials", type=int, default=20)
    args = ap.parse_args()
    bin_dir = server_bin()
    if bin_dir is None:
        sys.exit("PostgreSQL server binaries not found (Debian: apt-get install postgresql)")
    pg = Throwaway(bin_dir)
    try:
        cores = os.cpu_count() or 1
        setups = {f"1 worker x {cores} threads": (1, cores), "2 workers x 1 thread": (2, 1),
                  f"2 workers x {cores} threads": (2, cores)}
        times: dict[str, list[float]] = {k: [] for k in setups}
        for r in range(args.repeats):
            for name, (n, threads) in (list(setups.items())[::-1] if r % 2 else setups.items()):
                t = workers(n, threads, pg, args.root, args.trials, args.epochs)
                times[name].append(t)
                print(f"  {name}: {t:.1f}s", flush=True)
        base = statistics.median(times[next(iter(setups))])
        print(f"\n{args.trials} trials x {args.epochs} epochs, wall time (median of "
              f"{args.repeats}):")
        for name, ts in times.items():
            print(f"  {name:24s} {statistics.median(ts):6.1f}s  speed-up "
                  f"{base / statistics.median(ts):.2f}x")

        tmp = Path(tempfile.mkdtemp())
        per: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        for r in range(args.repeats + 1):
            for kind in (["sqlite", "postgresql"] if r % 2 == 0 else ["postgresql", "sqlite"]):
                if kind == "sqlite":
                    d = tmp / uuid.uuid4().hex[:8]
                    stores = (f"sqlite:///{d}/optuna.db", f"sqlite:///{d}/mlflow.db")
                else:
                    tag = uuid.uuid4().hex[:8]
                    stores = (pg.create_db(f"to_{tag}"), pg.create_db(f"tm_{tag}"))
                per[kind].append(tiny_study(*stores, args.tiny_trials))
        sq, pq = (statistics.median(per[k][1:]) for k in ("sqlite", "postgresql"))  # 1st: warm-up
        print(f"\nper trial ({args.tiny_trials} tiny trials, median of {args.repeats}): "
              f"SQLite {sq * 1000:.0f} ms, PostgreSQL {pq * 1000:.0f} ms, "
              f"difference {(pq - sq) * 1000:+.0f} ms")
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
