"""`python -m sweeper.report --study NAME`: does size buy generalization in this study?

Reads the Optuna study (params, final metrics, n_params) and its MLflow runs (per-epoch curves),
writes report.md and PNG figures to --out (default mlruns/reports/NAME/) and to the study's
parent MLflow run (artifacts under report/), and prints the verdict and the table.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_modules.metrics import EPOCHS_RUN, GAP, TEST_ACC, TRAIN_ACC, VAL_ACC
from sweeper.analysis import size_effect, stats
from sweeper.record import repeat_records, stores
from sweeper.settings import keys, objectives
from sweeper.settings.config import DEFAULT_STORAGE, DEFAULT_TRACKING
from sweeper.settings.errors import UserError, one_line

DROPOUT_BANDS = ((0.0, 0.1), (0.1, 0.3), (0.3, 1.0))  # dropout confounds size: compare within
COVARIATES = ("depth", "size", "dropout", "lr", "family")  # Row's own fields (size: n_params)


@dataclass
class Row:
    number: int
    state: str
    depth: int
    width: int  # the widest hidden layer
    dropout: float
    lr: float
    n_params: int
    epochs: int
    train_acc: float
    val_acc: float
    gap: float
    run_id: str | None = None
    family: str = "mlp"
    curves: dict[str, list[float]] = field(default_factory=dict)
    # With seed repeats: final metrics of every seed (the trial's own first); the statistics and
    # figures then use the mean over seeds, with the standard deviation as error bars.
    seeds: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # other searched params (covariates)
    logs: frozenset[str] = frozenset()  # params the search sampled on a log scale
    sampler: str | None = None  # the sampler that chose it (None: not recorded)

    def mean_std(self, metric: str) -> tuple[float, float]:
        if len(self.seeds) < 2:
            return getattr(self, metric), 0.0
        return repeat_records.mean_std([s[metric] for s in self.seeds])


@dataclass
class Report:
    study: str
    rows: list[Row]
    setup: dict[str, Any]
    size_gap: stats.Correlation
    size_val: stats.Correlation
    bands: list[tuple[str, stats.Correlation, stats.Correlation]]
    verdict: str
    excluded_pruned: int
    # Size with the other hyperparameters held fixed (the verdict): val_acc and gap, in points.
    effect_val: size_effect.Effect | None = None
    effect_gap: size_effect.Effect | None = None


def rows_of(study: Any, include_pruned: bool) -> tuple[list[Row], int]:
    from optuna.trial import TrialState

    legacy = study.user_attrs.get(keys.LEGACY_CONFIG, {})  # studies made before RECIPE
    states = (TrialState.COMPLETE, TrialState.PRUNED) if include_pruned else (TrialState.COMPLETE,)
    pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    rows = []
    for t in study.get_trials(deepcopy=False, states=states):
        a, p = t.user_attrs, t.params
        if VAL_ACC not in a or keys.N_PARAMS not in a:
            continue
        model = a.get(keys.RECIPE, legacy).get("model", {})  # values the space did not search
        trainer = a.get(keys.RECIPE, legacy).get("trainer", {})
        family = str(p.get("family", model.get("family", "mlp")))
        depth = int(p.get("depth", model.get("depth_by_family", {}).get(
            family, model.get("depth", 0))))
        widths = [v for k, v in p.items() if k.startswith("width_")] or [
            a.get(keys.WIDTH, p.get("width", model.get("width", 0)))]
        rows.append(Row(t.number, t.state.name, depth, int(max(widths)),
                        float(p.get("dropout", model.get("dropout", 0.0))),
                        float(p.get("lr", trainer.get("lr", 0.0))), int(a[keys.N_PARAMS]),
                        int(a.get(EPOCHS_RUN, 0)), float(a[TRAIN_ACC]), float(a[VAL_ACC]),
                        float(a[GAP]), a.get(keys.MLFLOW_RUN_ID),
                        family, extra={k: v for k, v in p.items() if k not in COVARIATES
                                       and not k.startswith("width")},
                        logs=frozenset(k for k, d in t.distributions.items()
                                       if getattr(d, "log", False)),
                        sampler=a.get(keys.DESIGN, {}).get("sampler")))
    seeds = repeat_records.results(study)
    for r in rows:
        r.seeds = seeds.get(r.number, [])
    return sorted(rows, key=lambda r: r.n_params), 0 if include_pruned else pruned


def analyse(study_name: str, rows: list[Row], setup: dict[str, Any],
            excluded_pruned: int, margin: float = size_effect.MARGIN) -> Report:
    size = np.array([r.n_params for r in rows], dtype=np.float64)
    gap = np.array([r.mean_std(GAP)[0] for r in rows])
    val = np.array([r.mean_std(VAL_ACC)[0] for r in rows])
    size_gap, size_val = stats.correlation(size, gap), stats.correlation(size, val)
    bands = []
    for lo, hi in DROPOUT_BANDS:
        i = np.array([lo <= r.dropout < hi for r in rows], dtype=bool)
        if i.sum() >= 3:
            bands.append((f"dropout {lo:.1f}-{hi:.1f}", stats.correlation(size[i], gap[i]),
                          stats.correlation(size[i], val[i])))
    recorded = setup.get("sampler") if setup.get("sampler") != "?" else None
    effect_val, effect_gap, budget = size_effects(rows, excluded_pruned, margin, recorded)
    text = size_effect.sentence(effect_val, effect_gap, budget)
    if len(rows) >= 3:
        text += " " + ranks(size_gap, size_val)
    kinds = sorted({r.family for r in rows})
    # A dip means something only where size alone varies: with other settings varying, their
    # effects (and the fit's residual noise, ~0.5 points in depth_vs_width) make dips.
    alone = effect_val.verdict == "too few" or not effect_val.held or effect_val.held == (
        "family",)
    for fam in kinds if alone else ():  # a dip across families would only show they differ
        if (d := dip([r for r in rows if r.family == fam])) is not None:
            text += d if len(kinds) == 1 else f" ({fam})" + d
    text += families(rows)
    return Report(study_name, rows, setup, size_gap, size_val, bands, text, excluded_pruned,
                  effect_val, effect_gap)


def dip(rows: list[Row], points: float = 0.01) -> str | None:
    """A smooth fit only sees smooth trends. Say so when validation accuracy (by size) falls by
    `points` or more below an earlier peak and later climbs above it again: the double-descent
    shape."""
    val = [r.mean_std(VAL_ACC)[0] for r in rows]
    for i in range(len(val)):
        j = min(range(i, len(val)), key=lambda k: val[k])
        if val[i] - val[j] >= points and any(v > val[i] for v in val[j:]):
            return (f" Not monotone: validation accuracy falls from {100 * val[i]:.2f}% at "
                    f"{rows[i].n_params:,} params to {100 * val[j]:.2f}% at {rows[j].n_params:,}"
                    f" (train {100 * rows[j].mean_std(TRAIN_ACC)[0]:.2f}%), then climbs above "
                    "it again with size: a double-descent shape.")
    return None


def families(rows: list[Row]) -> str:
    """With several model families in one study: compare them at equal size (parameter counts
    in the same quarter-decade), pair by pair, on validation accuracy and on the gap."""
    names = sorted({r.family for r in rows})
    if len(names) < 2:
        return ""

    def size_bin(r: Row) -> int:
        return round(4 * math.log10(r.n_params))

    cells: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        cells.setdefault((r.family, size_bin(r)), []).append(r)

    def mean(rs: list[Row], metric: str) -> float:
        return float(np.mean([r.mean_std(metric)[0] for r in rs]))

    overall = {f: mean([r for r in rows if r.family == f], VAL_ACC) for f in names}
    order = sorted(names, key=lambda f: -overall[f])
    parts = []
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            shared = sorted({k for f, k in cells if f == a} & {k for f, k in cells if f == b})
            if not shared:
                continue
            dv = [mean(cells[a, k], VAL_ACC) - mean(cells[b, k], VAL_ACC) for k in shared]
            dg = [mean(cells[a, k], GAP) - mean(cells[b, k], GAP) for k in shared]
            parts.append(f"{a} vs {b}: higher validation accuracy at {sum(d > 0 for d in dv)} "
                         f"of {len(shared)} matched sizes (mean {100 * np.mean(dv):+.2f} "
                         f"points), gap {100 * np.mean(dg):+.2f} points")
    if not parts:
        return " The families share no size range: they cannot be compared at equal size."
    return (" At equal size (parameter counts in the same quarter-decade): " + "; ".join(parts)
            + ".")


def ranks(size_gap: stats.Correlation, size_val: stats.Correlation) -> str:
    """The unadjusted view, for comparison: rank correlations of size with each metric."""
    word = {1: "rises", -1: "falls", 0: "no clear trend"}
    text = (f"Not adjusted for anything else, validation accuracy {word[size_val.sign]} with "
            f"size (Spearman rho {size_val}) and the gap {word[size_gap.sign]} (rho "
            f"{size_gap}); 95% bootstrap intervals over trials.")
    return text


def study_effects(study: Any) -> tuple[size_effect.Effect, size_effect.Effect, str] | None:
    """The size effects on val_acc and the gap from a study's own record (no MLflow needed),
    with the budget note; None when it has too few comparable trials to say anything (a study
    whose other settings fix size says so)."""
    rows, pruned = rows_of(study, include_pruned=False)
    if len({r.n_params for r in rows}) < 3:
        return None
    val, gap, budget = size_effects(rows, pruned)
    return None if val.verdict == "too few" and not val.reason else (val, gap, budget)


def size_effects(rows: list[Row], pruned: int, margin: float = size_effect.MARGIN,
                 sampler: str | None = None
                 ) -> tuple[size_effect.Effect, size_effect.Effect, str]:
    """The size effects on val_acc and the gap (seed means where there are repeats), and the
    budget note the verdict quotes. The design (size_effect.design_note) decides whether they
    are a verdict; the gap is flagged where the small networks did not fit their training data.
    sampler: for trials that did not record theirs (the study's parent run may have)."""
    trials, budget = size_effect.of_rows(rows, lambda r, m: r.mean_std(m)[0],
                                         (VAL_ACC, GAP, TRAIN_ACC))
    if pruned:  # the survivors of pruning are a selected set: say so in the verdict
        budget += f"; {pruned} pruned trials left out"
    val = size_effect.estimate(trials, VAL_ACC, margin)
    gap = size_effect.estimate(trials, GAP, margin)
    complete = [r for r in rows if r.state == "COMPLETE"]
    pruned += len(rows) - len(complete)  # --include-pruned: they are among the rows
    design = size_effect.design_note([r.sampler or sampler for r in complete], pruned,
                                     len(complete))
    val.design = gap.design = design
    if gap.verdict != "too few":
        gap.underfit = size_effect.underfit(size_effect.estimate(trials, TRAIN_ACC, margin))
    return val, gap, budget


def console_verdict(study: Any, found: Any = ...) -> str | None:
    """The end of a run: the size verdict in plain words, when the study can give one.
    `found`: study_effects(study), when already computed."""
    found = study_effects(study) if found is ... else found
    return None if found is None else size_effect.sentence(*found).replace("**", "")


def fetch_curves(rows: list[Row], tracking_uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for r in rows:
        if r.run_id:
            for m in (TRAIN_ACC, VAL_ACC):
                hist = sorted(client.get_metric_history(r.run_id, m), key=lambda h: h.step)
                r.curves[m] = [h.value for h in hist]


def table(rows: list[Row]) -> str:
    head = "| trial | depth | width | dropout | lr | n_params | epochs | train % | val % | gap % |"
    with_test = any(TEST_ACC in s for r in rows for s in r.seeds)
    with_family = len({r.family for r in rows}) > 1
    head = ("| family " if with_family else "") + head
    lines = [head + (" test % |" if with_test else ""),
             "|" + " --- |" * (10 + with_test + with_family)]
    for r in rows:
        cells = []
        for m, sign in ((TRAIN_ACC, ""), (VAL_ACC, ""), (GAP, "+")):
            mean, std = r.mean_std(m)
            cells.append(f"{100 * mean:{sign}.2f}" + (f" ± {100 * std:.2f} ({len(r.seeds)} seeds)"
                                                      if len(r.seeds) > 1 else ""))
        if with_test:
            tests = [s[TEST_ACC] for s in r.seeds if TEST_ACC in s]
            mean, std = repeat_records.mean_std(tests) if tests else (math.nan, 0.0)
            cells.append("-" if not tests else f"{100 * mean:.2f}" + (
                f" ± {100 * std:.2f} ({len(tests)} seeds)" if len(tests) > 1 else ""))
        lines.append(("| " + r.family + " " if with_family else "")
                     + f"| {r.number} | {r.depth} | {r.width} | {r.dropout:.2f} | {r.lr:.2g} | "
                     f"{r.n_params:,} | {r.epochs} | {' | '.join(cells)} |")
    return "\n".join(lines)


def figures(rep: Report, study: Any, out: Path) -> dict[str, str]:
    """name -> caption of each PNG written (or why it was skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    rows = rep.rows
    size = np.array([r.n_params for r in rows])
    depth = np.array([r.depth for r in rows])
    family = np.array([r.family for r in rows])
    kinds = sorted(set(family.tolist()))

    def scatter(name: str, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str,
                logx: bool, caption: str, yerr: np.ndarray | None = None) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        if yerr is not None and yerr.any():  # seed repeats: mean ± std
            ax.errorbar(x, y, yerr=yerr, fmt="none", ecolor="0.4", capsize=3, zorder=1)
        if len(kinds) > 1:  # several model families: one colour each
            for k, fam in enumerate(kinds):
                i = family == fam
                ax.scatter(x[i], y[i], color=f"C{k}", edgecolors="k", linewidths=0.3,
                           zorder=2, label=fam)
            ax.legend()
        elif len(set(depth.tolist())) > 1:
            sc = ax.scatter(x, y, c=depth, cmap="viridis", edgecolors="k", linewidths=0.3,
                            zorder=2)
            fig.colorbar(sc, ax=ax, label="depth")
        else:
            ax.plot(x, y, "o-", mec="k", mew=0.3, zorder=2, label=f"depth {depth[0]}")
            ax.legend()
        if logx:
            ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{rep.study}: {caption}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made[name] = caption

    gap_pct, gap_err = (100 * np.array([r.mean_std(GAP)[i] for r in rows]) for i in (0, 1))
    val_pct, val_err = (100 * np.array([r.mean_std(VAL_ACC)[i] for r in rows]) for i in (0, 1))
    scatter("gap_vs_params.png", size, gap_pct, "n_params", "gap (train - val), %", True,
            "gap vs size", gap_err)
    scatter("val_vs_params.png", size, val_pct, "n_params", "validation accuracy, %", True,
            "validation accuracy vs size", val_err)
    scatter("gap_vs_dropout.png", np.array([r.dropout for r in rows]), gap_pct, "dropout",
            "gap (train - val), %", False, "gap vs dropout", gap_err)

    if rep.effect_val is not None and rep.effect_val.adjusted is not None:
        made["size_effect.png"] = partial_effect(plt, out / "size_effect.png", rep)

    # Accuracy-vs-size front: no smaller network reaches a higher validation accuracy.
    order = sorted(rows, key=lambda r: (r.n_params, -r.mean_std(VAL_ACC)[0]))
    front_rows: list[Row] = []
    for r in order:
        if not front_rows or r.mean_std(VAL_ACC)[0] > front_rows[-1].mean_std(VAL_ACC)[0]:
            front_rows.append(r)
    front_plot(plt, out / "pareto_size.png", list(zip(size, val_pct, strict=True)),
               [(r.n_params, 100 * r.mean_std(VAL_ACC)[0], r.number) for r in front_rows],
               "n_params", "validation accuracy, %", f"{rep.study}: accuracy-vs-size front",
               (True, False))
    made["pareto_size.png"] = ("accuracy-vs-size Pareto front: the trials no smaller network "
                               f"beats ({', '.join(str(r.number) for r in front_rows)})")
    if objectives.is_multi(study):
        made |= pareto_objectives(study, out, plt)

    # depth x width (log2 bins) heatmaps: mean over the trials in each cell.
    def wbin(r: Row) -> int:
        return math.floor(math.log2(max(r.width, 1)))

    bins = sorted({wbin(r) for r in rows})
    depths = sorted({r.depth for r in rows})
    for metric, name in ((VAL_ACC, "heatmap_val.png"), (GAP, "heatmap_gap.png")):
        if len(kinds) > 1:
            made[name] = "skipped: depth and width mean different things in each model family"
            continue
        total = np.zeros((len(depths), len(bins)))
        count = np.zeros_like(total)
        for r in rows:
            i, j = depths.index(r.depth), bins.index(wbin(r))
            total[i, j] += 100 * r.mean_std(metric)[0]
            count[i, j] += 1
        grid = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        fig, ax = plt.subplots(figsize=(1.2 * len(bins) + 2, 0.8 * len(depths) + 1.5))
        im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(depths)):
            for j in range(len(bins)):
                if count[i, j]:
                    ax.text(j, i, f"{grid[i, j]:.2f}\nn={int(count[i, j])}", ha="center",
                            va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(bins)), [f"{2 ** b}-{2 ** (b + 1) - 1}" for b in bins],
                      rotation=30)
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        label = "validation accuracy, %" if metric == VAL_ACC else "gap, %"
        ax.set(xlabel="width", ylabel="depth", title=f"{rep.study}: {label} (mean per cell)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made[name] = f"depth x width: {label}"

    with_curves = [r for r in rows if r.curves.get(VAL_ACC)]
    if with_curves:
        picks = {"smallest": with_curves[0], "median": with_curves[len(with_curves) // 2],
                 "largest": with_curves[-1]}
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
        for ax, (label, r) in zip(axes, picks.items(), strict=True):
            for m, style in ((TRAIN_ACC, "-"), (VAL_ACC, "--")):
                ys = 100 * np.array(r.curves.get(m, []))
                ax.plot(range(1, len(ys) + 1), ys, style, label=m)
            ax.set(title=f"{label}: trial {r.number}, {r.n_params:,} params", xlabel="epoch")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy, %")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "learning_curves.png", dpi=110)
        plt.close(fig)
        made["learning_curves.png"] = "learning curves of the smallest, median and largest network"

    import optuna

    def value_of(metric: str) -> Any:
        return lambda t: t.user_attrs[metric]

    # Optuna computes importances over complete trials only.
    for target, name in ((VAL_ACC, "importance_val.png"), (GAP, "importance_gap.png")):
        try:
            imp = optuna.importance.get_param_importances(
                study, target=value_of(target),
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (RuntimeError, ValueError) as e:  # too few trials or no varying parameter
            made[name] = f"skipped: {e}"
            continue
        fig, ax = plt.subplots(figsize=(5, 0.5 * len(imp) + 1.2))
        ax.barh(list(imp)[::-1], list(imp.values())[::-1])
        ax.set(xlabel="importance (fANOVA)", title=f"what drives {target}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made[name] = f"Optuna parameter importances for {target} (complete trials)"
    return made


def partial_effect(plt: Any, path: Path, rep: Report) -> str:
    """Validation accuracy and the gap against size with the other hyperparameters held at their
    means (partial residuals), and the fitted line."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, e, label in ((axes[0], rep.effect_val, "validation accuracy"),
                         (axes[1], rep.effect_gap, "gap (train - val)")):
        if e is None or e.adjusted is None or e.sizes is None:
            ax.set_axis_off()
            continue
        x = np.array(e.sizes, dtype=np.float64)
        ax.scatter(x, e.adjusted, color="C0", edgecolors="k", linewidths=0.3, label="trials")
        line = np.geomspace(x.min(), x.max(), 50)
        ax.plot(line, size_effect.fitted(e, line), "C3-",
                label=f"fit: {e.estimate:+.2f} points [{e.low:+.2f}, {e.high:+.2f}]")
        ax.set_xscale("log")
        ax.set(xlabel="n_params", ylabel=f"{label}, % (adjusted)",
               title=f"{label}: {'descriptive' if e.design else e.verdict}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    held = rep.effect_val.held if rep.effect_val is not None else ()
    fig.suptitle(f"{rep.study}: the effect of size, {', '.join(held) or 'nothing'} held at "
                 "their means")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ("partial effect of size: each trial's validation accuracy and gap with the other "
            "hyperparameters held at their means, and the fitted line")


def effects_table(rep: Report) -> list[str]:
    lines = ["| metric | from smallest to largest network, points | 95% interval | verdict | "
             "trials | accounted for (regression covariates) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for e in (rep.effect_val, rep.effect_gap):
        if e is None or e.verdict == "too few":
            continue
        lines.append(f"| {e.metric} | {e.estimate:+.2f} ({size_effect.params_text(e.smallest)}"
                     f" to {size_effect.params_text(e.largest)}) | {e.low:+.2f} to "
                     f"{e.high:+.2f} | {'descriptive' if e.design else e.verdict}"
                     f"{' (mixes in underfitting)' if e.underfit else ''} | {e.n} | "
                     f"{', '.join(e.covariates) or '-'} |")
    e = rep.effect_val
    if e is not None and e.depth is not None:
        lines.append(f"| val_acc per extra layer at equal size | {e.depth[0]:+.2f} | "
                     f"{e.depth[1]:+.2f} to {e.depth[2]:+.2f} | | {e.n} | |")
    return lines if len(lines) > 2 else []


def assumptions(rep: Report) -> list[str]:
    e = rep.effect_val
    if e is None or e.verdict == "too few":
        return []
    lines = ["How to read it: a least-squares fit of each metric (validation accuracy as "
             "-log10 of its error, the gap in points) on log10(n_params)"
             + (" and its square" if e.curve[2] else "")
             + (f" with {', '.join(e.covariates)} as covariates" if e.covariates else "")
             + "; the effect is the fitted change from the smallest to the largest network, its "
             "interval a bootstrap over trials (2,000 resamples, widened by Student's t at the "
             "fit's residual degrees of freedom). The fit assumes size acts the "
             "same way whatever the other settings (no interactions)"
             + (", in every model family" if "family" in e.held else "") + "; how often its "
             "verdicts are wrong, on planted studies: docs/guide.md, `python "
             "scripts/calibrate_verdict.py`."]
    if e.degenerate:
        lines[0] += (f" {e.degenerate} of the resamples could not be fitted (a rare setting "
                     "missing from them) and were left out.")
    return [*lines, ""]


def front_plot(plt: Any, path: Path, points: list[tuple[float, float]],
               front: list[tuple[float, float, int]], xlabel: str, ylabel: str, title: str,
               log: tuple[bool, bool]) -> None:
    """All trials in grey, the front as a red line labelled with trial numbers."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="0.75", edgecolors="k",
               linewidths=0.3, label="trials")
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", mec="k", mew=0.3,
            label="Pareto front")
    for x, y, n in front:
        ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    if log[0]:
        ax.set_xscale("log")
    if log[1]:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_objectives(study: Any, out: Path, plt: Any) -> dict[str, str]:
    """A multi-objective study's own front, on its first two objectives."""
    names = objectives.names(study)
    done = objectives.ranked(study)
    front = objectives.front(study)

    def scale(name: str, v: float) -> float:
        return float(v) if name == keys.N_PARAMS else 100 * float(v)

    pts = sorted((scale(names[0], t.values[0]), scale(names[1], t.values[1]), t.number)
                 for t in front)
    unit = {keys.N_PARAMS: ""}
    front_plot(plt, out / "pareto_front.png",
               [(scale(names[0], t.values[0]), scale(names[1], t.values[1])) for t in done], pts,
               f"{names[0]}{unit.get(names[0], ', %')} ({study.directions[0].name.lower()})",
               f"{names[1]}{unit.get(names[1], ', %')} ({study.directions[1].name.lower()})",
               f"{study.study_name}: Pareto front",
               (names[0] == keys.N_PARAMS, names[1] == keys.N_PARAMS))
    return {"pareto_front.png": f"the study's Pareto front ({names[0]} vs {names[1]}): trials "
                                f"{', '.join(str(p[2]) for p in pts)}"}


def markdown(rep: Report, made: dict[str, str]) -> str:
    s = rep.setup
    lines = [f"# {rep.study}: do bigger networks generalize better?", "",
             "## Setup", "",
             f"- data: {s.get('data', '?')} ({s.get('train_size', '?')} train / "
             f"{s.get('val_size', '?')} validation images)",
             f"- budget: {s.get('n_trials', '?')} trials of up to {s.get('max_epochs', '?')} "
             f"epochs; sampler {s.get('sampler', '?')}, pruner {s.get('pruner', '?')}",
             f"- trials in these statistics: {len(rep.rows)} complete"
             + (f"; {rep.excluded_pruned} pruned trials excluded (they stopped early, so their "
                "final metrics are not comparable; --include-pruned adds them)"
                if rep.excluded_pruned else ""),
             f"- seed repeats: {sum(len(r.seeds) > 1 for r in rep.rows)} configurations with "
             f"{max((len(r.seeds) for r in rep.rows), default=0)} seeds each; their mean is "
             "used below and their standard deviation drawn as error bars"
             if any(len(r.seeds) > 1 for r in rep.rows) else
             "- seed repeats: none (one seed per configuration; confirm.seeds=N adds them)",
             *([f"- size range: {s['sizes']}"] if "sizes" in s else []),
             "", "## Verdict", "", rep.verdict, "", *effects_table(rep), "",
             *assumptions(rep),
             "Not adjusted (rank correlations, for comparison):", "",
             "| trials | rho(n_params, gap) | rho(n_params, val_acc) |", "| --- | --- | --- |",
             f"| all | {rep.size_gap} | {rep.size_val} |"]
    lines += [f"| {name} | {g} | {v} |" for name, g, v in rep.bands]
    lines += ["", "## Figures", ""]
    for name, caption in made.items():
        lines.append(f"- {name}: {caption}" if caption.startswith("skipped")
                     else f"![{caption}]({name})")
    lines += ["", "## Trials (complete, by size)", "", table(rep.rows), ""]
    return "\n".join(lines)


def build(study_name: str, storage: str, tracking_uri: str | None, out: Path,
          include_pruned: bool = False, sizes: tuple[int, int] | None = None,
          margin: float = size_effect.MARGIN) -> Report:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stores.require_store(storage, "--storage", stores.STORAGE_HINT)
    if tracking_uri:
        stores.require_store(tracking_uri, "--tracking-uri", "pass the sweep's tracking.uri, or "
                             "--no-mlflow for a report without curves")
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise UserError(f"no study {study_name!r} in {storage}") from None
    except Exception as e:
        raise UserError(f"--storage {storage}: {type(e).__name__}: {e}") from None
    stores.prepare_folder(out, "--out")  # before any work: the report is written there
    rows, excluded = rows_of(study, include_pruned)
    identity = study.user_attrs.get(keys.IDENTITY, {})
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    setup = {"data": identity.get("data.content", identity.get("data", "?")),
             "n_trials": len(finished), "max_epochs": identity.get(
                 "trainer.max_epochs", study.user_attrs.get(keys.LEGACY_CONFIG, {}).get(
                     "trainer", {}).get("max_epochs")),
             "sampler": "?", "pruner": "?"}
    if sizes is not None:  # a sub-range of sizes: e.g. where returns diminish
        rows = [r for r in rows if sizes[0] <= r.n_params <= sizes[1]]
        setup["sizes"] = (f"only trials of {sizes[0]:,} to {sizes[1]:,} parameters "
                          "(--min-params/--max-params)")
    parent = None
    if tracking_uri:
        parent = parent_run(tracking_uri, study_name)
        if parent is not None:
            setup |= {k: parent.data.params.get(k, "?")
                      for k in (keys.TRAIN_SIZE_PARAM, keys.VAL_SIZE_PARAM,
                                keys.SAMPLER_PARAM, keys.PRUNER_PARAM)}
            setup["data"] = parent.data.tags.get(keys.DATA_TAG, setup["data"])
        fetch_curves(rows, tracking_uri)
    rep = analyse(study_name, rows, setup, excluded, margin)
    out.mkdir(parents=True, exist_ok=True)
    made = figures(rep, study, out) if rows else {}
    (out / "report.md").write_text(markdown(rep, made))
    if parent is not None:
        from mlflow import MlflowClient

        try:
            MlflowClient(tracking_uri=tracking_uri).log_artifacts(parent.info.run_id, str(out),
                                                                  "report")
        except Exception as e:  # the report is written; only its copy in MLflow is missing
            raise UserError(f"the report is written to {out}, but logging it to MLflow "
                            f"({tracking_uri}) failed: {one_line(e, 200)}; --no-mlflow skips "
                            "that") from None
    return rep


def parent_run(tracking_uri: str, study_name: str) -> Any:
    from mlflow import MlflowClient

    from sweeper.record.tracking import find_parent

    stores.quiet_mlflow()
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study_name)
    return None if exp is None else find_parent(client, exp.experiment_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeper.report",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--study", required=True, help="the study's search.study_name")
    ap.add_argument("--storage", default=DEFAULT_STORAGE)
    ap.add_argument("--tracking-uri", help="default: the mlflow.db beside a SQLite --storage "
                    f"if there is one, else {DEFAULT_TRACKING}")
    ap.add_argument("--no-mlflow", action="store_true", help="no curves, nothing logged")
    ap.add_argument("--out", type=Path, help="default: mlruns/reports/STUDY/")
    ap.add_argument("--include-pruned", action="store_true")
    ap.add_argument("--min-params", type=int, default=0, help="only trials this big or bigger")
    ap.add_argument("--max-params", type=int, help="only trials this big or smaller")
    ap.add_argument("--margin", type=float, default=size_effect.MARGIN,
                    help="points: a size effect within +-this does not matter (default "
                         "%(default)s)")
    args = ap.parse_args(argv)
    out = args.out or Path("mlruns/reports") / args.study
    if args.tracking_uri is None:
        args.tracking_uri = stores.default_tracking(args.storage)
    try:
        if not (math.isfinite(args.margin) and args.margin > 0):
            raise UserError(f"--margin {args.margin}: give a number of points > 0 (default "
                            f"{size_effect.MARGIN})")
        rep = build(args.study, args.storage, None if args.no_mlflow else args.tracking_uri, out,
                    args.include_pruned, (args.min_params, args.max_params or 2**63)
                    if args.min_params or args.max_params else None, args.margin)
    except UserError as e:
        print(f"sweeper.report: error: {e}", file=sys.stderr)
        return 2
    print(rep.verdict.replace("**", ""))
    print()
    print(table(rep.rows))
    print(f"\nreport: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
