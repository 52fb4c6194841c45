"""What the user sees while a study runs: a one-line live indicator per epoch (terminals only,
rewritten in place, so it costs one short write per epoch), one line per finished trial, and the
table of best trials at the end."""

from __future__ import annotations

import shlex
import sys
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import EPOCHS_RUN, GAP, TRAIN_ACC, VAL_ACC
from sweeper.settings import keys, objectives
from sweeper.settings.config import DEFAULT_STORAGE, DEFAULT_TRACKING, Config

LIVE = sys.stderr.isatty()
SHORT_BUDGET = 10  # epochs: a study this short suggests --refit --epochs 30 for the export


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())


def pct(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:6.2f}"


def epoch(number: int, ep: int, max_epochs: int, metrics: dict[str, float]) -> None:
    if LIVE:
        sys.stderr.write(f"\r  trial {number}: epoch {ep}/{max_epochs}  "
                         f"val_acc {100 * metrics[VAL_ACC]:.2f}%   ")
        sys.stderr.flush()


def population_epoch(size: int, ep: int, max_epochs: int, best_val: float) -> None:
    if LIVE:
        sys.stderr.write(f"\r  population of {size}: epoch {ep}/{max_epochs}  "
                         f"best val_acc {100 * best_val:.2f}%   ")
        sys.stderr.flush()


def clear_live() -> None:
    if LIVE:
        sys.stderr.write("\r" + " " * 60 + "\r")
        sys.stderr.flush()


def trial_line(t: FrozenTrial, done: int, target: int) -> None:
    clear_live()
    a = t.user_attrs
    n_params = a.get(keys.N_PARAMS)
    gap = a.get(GAP)
    print(f"[{done}/{target}] trial {t.number:3d} {t.state.name:8s} {fmt_params(t.params)} | "
          f"{n_params if n_params is None else format(n_params, ',')} params | "
          f"{a.get(EPOCHS_RUN, 0)} ep | train {pct(a.get(TRAIN_ACC))} val {pct(a.get(VAL_ACC))} "
          f"gap {'   -' if gap is None else f'{100 * gap:+.2f}'} | "
          f"{a.get(keys.SECONDS, 0):.1f}s"
          + (f" | {a[keys.ERROR]}" if t.state == TrialState.FAIL and a.get(keys.ERROR) else ""),
          flush=True)


def best_table(study: optuna.Study, k: int = 5) -> str:
    """The best k complete trials; a multi-objective study's whole Pareto front (up to 20)."""
    ranked = objectives.ranked(study)
    if not ranked:
        return "no completed trials yet"
    multi = objectives.is_multi(study)
    shown = objectives.front(study)[:20] if multi else ranked[:k]
    names = sorted({p for t in shown for p in t.params}, key=lambda n: (n != "depth", n))
    last = [] if multi else ["objective%"]
    head = ["trial", *names, "n_params", "epochs", "train%", "val%", "gap%", *last]
    rows = [head]
    for t in shown:
        a = t.user_attrs
        rows.append([str(t.number), *(fmt_value(t.params.get(n, "")) for n in names),
                     f"{a.get(keys.N_PARAMS, 0):,}", str(a.get(EPOCHS_RUN, "")),
                     pct(a.get(TRAIN_ACC)).strip(), pct(a.get(VAL_ACC)).strip(),
                     f"{100 * a.get(GAP, 0):+.2f}", *([pct(t.value).strip()] if not multi
                                                      else [])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    if multi:
        wanted = ", ".join(f"{n} ({d.name.lower()})" for n, d in
                           zip(objectives.names(study), study.directions, strict=False))
        lines.insert(0, f"Pareto front ({len(objectives.front(study))} trials; {wanted}): no "
                        "trial beats these on every objective at once")
        lines.append("each trial above is a best trade-off; export one with --trial N")
        return "\n".join(lines)
    best = ranked[0]
    lines.append(f"best trial {best.number}: objective {100 * (best.value or 0):.2f}% with "
                 f"{fmt_params(best.params)}")
    return "\n".join(lines)


def next_steps(cfg: Config, study: optuna.Study) -> str:
    """The commands a user runs next, with this study's name and stores filled in."""
    name = cfg.search.study_name
    quoted = shlex.quote(name)
    stores = ""
    if cfg.search.storage != DEFAULT_STORAGE:
        stores += f" --storage {shlex.quote(cfg.search.storage)}"
    if cfg.tracking.uri != DEFAULT_TRACKING:
        stores += f" --tracking-uri {shlex.quote(cfg.tracking.uri)}"
    out = shlex.quote(f"export/{name}")
    base = f"python -m sweeper.export --study {quoted} --out {out}{stores}"
    kaggle = (f" --kaggle-test {shlex.quote(cfg.data.test_csv or 'test.csv')}"
              if cfg.data.name == "kaggle" else "")
    if objectives.is_multi(study):
        front = objectives.front(study)
        export = (f"{base} --trial {front[0].number if front else 'N'}{kaggle}    # any trial "
                  "of the front")
    else:
        export = base + kaggle
        if cfg.trainer.max_epochs <= SHORT_BUDGET:
            # A short common budget is for comparing; the model to ship is trained longer.
            export += (f"\n  {base} --refit --epochs 30{kaggle}    # to ship: retrained on "
                       "train+val for 30 epochs")
        if cfg.confirm.seeds >= 2 and cfg.confirm.top_k >= 1 and cfg.search.keep_top_k >= 1:
            # the best trial's repeats kept their weights: its seeds ship as one model
            export += (f"\n  {base} --ensemble {cfg.confirm.seeds}{kaggle}    # its "
                       f"{cfg.confirm.seeds} seeds as one model")
    ui = (f"mlflow ui --backend-store-uri {shlex.quote(cfg.tracking.uri)}    # then "
          "http://127.0.0.1:5000" if cfg.tracking.uri.startswith(("sqlite", "postgresql",
                                                                   "mysql", "mssql"))
          else f"{cfg.tracking.uri}    # the MLflow server's UI")
    return ("next:\n"
            f"  python -m sweeper.report --study {quoted}{stores}    # figures and the verdict\n"
            f"  {export}\n"
            f"  {ui}")
