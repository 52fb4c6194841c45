"""What a new study folder costs before its first trial: making the empty MLflow SQLite store
by MLflow's own migrations vs from the packaged schema (sweeper/record/store_schema.py),
interleaved, median of N, and the whole `Tracker(...)` open on a fresh folder both ways.

    python scripts/bench_new_store.py --rounds 5
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from unittest import mock

from mlflow import MlflowClient

from sweeper.record import store_schema, stores
from sweeper.record.tracking import Tracker


def migrations(folder: str) -> None:
    MlflowClient(f"sqlite:///{folder}/m.db").search_experiments()


def packaged(folder: str) -> None:
    store_schema.create_from_packaged(f"{folder}/m.db")
    MlflowClient(f"sqlite:///{folder}/m.db").search_experiments()  # MLflow opens it as usual


def tracker(folder: str, use_packaged: bool) -> None:
    patch = (contextlib.nullcontext() if use_packaged else
             mock.patch.object(store_schema, "create_from_packaged", lambda path: False))
    with patch:
        Tracker(f"sqlite:///{folder}/mlflow.db", None, "s")


def timed(fn, *args) -> float:
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        fn(folder, *args)
        return time.perf_counter() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    stores.quiet_mlflow()
    timed(packaged)  # imports and first-use costs out of the way
    names = ("migrations", "packaged", "tracker: migrations", "tracker: packaged")
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.rounds):
        times["migrations"].append(timed(migrations))
        times["packaged"].append(timed(packaged))
        times["tracker: migrations"].append(timed(tracker, False))
        times["tracker: packaged"].append(timed(tracker, True))
    for name, ts in times.items():
        print(f"{name:22s} median {statistics.median(ts):6.3f} s  (min {min(ts):.3f}, "
              f"max {max(ts):.3f}, {len(ts)} rounds)")
    m, p = (statistics.median(times[k]) for k in ("tracker: migrations", "tracker: packaged"))
    print(f"a new study's MLflow store: {m / p:.1f}x faster from the packaged schema "
          f"({m - p:.2f} s saved per new folder)")
