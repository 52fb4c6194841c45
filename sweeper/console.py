"""What the user sees while a study runs: a one-line live indicator per epoch (terminals only,
rewritten in place, so it costs one short write per epoch), one line per finished trial, and the
table of best trials at the end."""

from __future__ import annotations

import sys
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import GAP, TRAIN_ACC, VAL_ACC

LIVE = sys.stderr.isatty()


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
    n_params = a.get("n_params")
    gap = a.get(GAP)
    print(f"[{done}/{target}] trial {t.number:3d} {t.state.name:8s} {fmt_params(t.params)} | "
          f"{n_params if n_params is None else format(n_params, ',')} params | "
          f"{a.get('epochs_run', 0)} ep | train {pct(a.get(TRAIN_ACC))} val {pct(a.get(VAL_ACC))} "
          f"gap {'   -' if gap is None else f'{100 * gap:+.2f}'} | "
          f"{a.get('seconds', 0):.1f}s"
          + (f" | {a['error']}" if t.state == TrialState.FAIL and a.get("error") else ""),
          flush=True)


def best_table(study: optuna.Study, k: int = 5) -> str:
    done = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        return "no completed trials yet"
    done.sort(key=lambda t: t.value or 0.0, reverse=True)
    names = sorted({p for t in done for p in t.params}, key=lambda n: (n != "depth", n))
    head = ["trial", *names, "n_params", "epochs", "train%", "val%", "gap%", "objective%"]
    rows = [head]
    for t in done[:k]:
        a = t.user_attrs
        rows.append([str(t.number), *(fmt_value(t.params.get(n, "")) for n in names),
                     f"{a.get('n_params', 0):,}", str(a.get("epochs_run", "")),
                     pct(a.get(TRAIN_ACC)).strip(), pct(a.get(VAL_ACC)).strip(),
                     f"{100 * a.get(GAP, 0):+.2f}", pct(t.value).strip()])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    best = done[0]
    lines.append("")
    lines.append(f"best trial {best.number}: objective {100 * (best.value or 0):.2f}% with "
                 f"{fmt_params(best.params)}")
    return "\n".join(lines)
