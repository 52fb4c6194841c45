"""Does size itself move validation accuracy and the gap, with the other hyperparameters held
fixed? A least-squares fit over the trials trained to one common budget:

    metric ~ 1 + s + s^2 + depth + dropout + dropout^2 + log10(lr) + log10(lr)^2 + ...,
    s = log10(n_params) (s^2 centred: returns diminish with size; dropped when trials are few)

(every other searched parameter that varies enters the same way: numbers linearly and, with 3+
distinct values, squared; log10 for those sampled on a log scale; categories as indicators).
The effect of size is the fitted size curve's rise from the smallest to the largest network:
"with the rest held fixed, validation accuracy moves by E points", and the same over the
largest tenfold. Its 95% interval is a percentile bootstrap over trials (pairs, 2,000
resamples, seeded). A rank correlation cannot do this: when a sampler ties size to dropout or
learning rate, their effects show up as a size effect.

Three answers, plus one for too small a study: bigger is better (the interval is above 0),
bigger is worse (below 0), no difference that matters (the interval lies within +-margin points,
so the change is bounded), or unclear, with the number of trials that would narrow the interval
to +-margin (from the fit's standard error, which shrinks as 1/sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_modules.metrics import TEST_ACC, TRAIN_ACC, VAL_ACC

MARGIN = 0.25  # points: a change of size's effect smaller than this does not matter here
RESAMPLES = 2000
MIN_RESIDUAL_DF = 8  # trials beyond the fitted coefficients, or the interval means little
CURVE_DF = 12  # the curved size term only with this many to spare
LOG_ERROR = (VAL_ACC, TRAIN_ACC, TEST_ACC)  # fitted on the error's log scale


@dataclass
class Trial:
    """One trial's inputs to the fit: metric values in points (accuracy x 100)."""
    n_params: int
    params: dict[str, Any]  # the hyperparameters that are not size (depth, dropout, lr, family)
    metrics: dict[str, float]
    logs: frozenset[str] = frozenset()  # params sampled on a log scale: they enter as log10


@dataclass
class Effect:
    metric: str
    verdict: str  # "bigger" | "smaller" | "null" | "unclear" | "too few"
    n: int
    smallest: int
    largest: int
    estimate: float = math.nan  # points from the smallest to the largest network
    low: float = math.nan
    high: float = math.nan
    covariates: tuple[str, ...] = ()  # the fit's columns besides size
    held: tuple[str, ...] = ()  # the hyperparameters they come from
    # unclear: about this many trials would bound it within margin; too few: would give one
    needed: int | None = None
    margin: float = MARGIN
    depth: tuple[float, float, float] | None = None  # points per extra layer at equal size
    top: tuple[float, float, float] | None = None  # points over the largest tenfold, 95%
    diminishing: bool = False  # the largest tenfold gained less than the average tenfold
    anywhere: float = math.nan  # 95% bound on the change from the smallest, anywhere in range
    degenerate: int = 0  # bootstrap resamples left out (their fit was rank-deficient)
    reason: str = ""  # why there is no verdict, when it is not the number of trials
    adjusted: list[float] | None = None  # each trial's metric with the covariates held at mean
    sizes: list[int] | None = None  # n_params of the same trials
    # The fitted size curve: b0 + b1 * log10(n) + b2 * (log10(n) - center)^2 on the fitted
    # scale (see fitted()), the other settings at their means.
    curve: tuple[float, float, float, float] = (math.nan, math.nan, 0.0, 0.0)
    se: float = math.nan  # the effect's bootstrap standard error, points
    ends: tuple[float, float] = (math.nan, math.nan)  # fitted metric at the smallest, largest

    @property
    def bound(self) -> float:
        """The null's bound: the largest change anywhere in the range (95%)."""
        ends = max(abs(self.low), abs(self.high))
        return ends if math.isnan(self.anywhere) else max(ends, self.anywhere)


def columns(trials: list[Trial]) -> tuple[list[str], list[str], np.ndarray]:
    """The covariate columns (not the intercept, not size): their names, the hyperparameter each
    comes from, and an (n, k) matrix."""
    names: list[str] = []
    sources: list[str] = []
    cols: list[np.ndarray] = []
    def numeric(key: str) -> bool:
        return all(isinstance(t.params.get(key), int | float)
                   and not isinstance(t.params.get(key), bool) for t in trials)

    # Categories first (model family), then depth: where each family has its own depth, depth
    # is the column dropped as redundant (see _independent), not a family.
    keys = sorted({k for t in trials for k in t.params},
                  key=lambda k: (numeric(k), k != "depth", k))
    for key in keys:
        values = [t.params.get(key) for t in trials]
        if len({repr(v) for v in values}) < 2:
            continue
        if numeric(key):
            x = np.array(values, dtype=np.float64)
            label = key
            if x.min() > 0 and any(key in t.logs for t in trials):
                x, label = np.log10(x), f"log10({key})"
            names.append(label)
            sources.append(key)
            cols.append(x)
            if len(set(values)) >= 3 and key != "depth":  # depth: one slope, "per extra layer"
                names.append(f"{label}^2")
                sources.append(key)
                cols.append((x - x.mean()) ** 2)
        else:
            levels = sorted({repr(v) for v in values})
            for level in levels[1:]:
                names.append(f"{key}={level.strip(chr(39))}")
                sources.append(key)
                cols.append(np.array([repr(v) == level for v in values], dtype=np.float64))
    matrix = np.stack(cols, axis=1) if cols else np.zeros((len(trials), 0))
    return names, sources, matrix


def _fit(y: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """OLS coefficients, or None when the design is rank-deficient (a degenerate resample)."""
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    return np.linalg.lstsq(x, y, rcond=None)[0]


def to_scale(metric: str, points: np.ndarray) -> np.ndarray:
    """Accuracies are fitted as -log10(error): near 100% effects multiply the error (dropout
    that doubles a small net's 5% error doubles a big net's 2%), so the fit is additive there,
    and a trial that barely trained (76% where the rest reach 92-98%) pulls it about half as
    much as in points. In points, a straight line on this scale flattens toward 100%: part of
    "returns diminish" comes from the scale. The gap, which can be 0 or negative, is fitted in
    points."""
    return -np.log10(np.maximum(100.0 - points, 1e-3)) if metric in LOG_ERROR else points


def to_points(metric: str, value: np.ndarray) -> np.ndarray:
    return 100.0 - 10.0 ** (-value) if metric in LOG_ERROR else value


def _independent(x: np.ndarray, names: list[str], sources: list[str], fixed: int
                 ) -> tuple[np.ndarray, list[str], list[str]]:
    """Drop covariate columns that the columns before them already determine (e.g. depth when
    each model family has its own depth): the first `fixed` columns (intercept, size) stay."""
    keep = list(range(fixed))
    for j in range(fixed, x.shape[1]):
        if np.linalg.matrix_rank(x[:, [*keep, j]]) == len(keep) + 1:
            keep.append(j)
    cov = [j - fixed for j in keep[fixed:]]
    return x[:, keep], [names[j] for j in cov], [sources[j] for j in cov]


def estimate(trials: list[Trial], metric: str, margin: float = MARGIN,
             resamples: int = RESAMPLES, seed: int = 0) -> Effect:
    n = len(trials)
    sizes = np.array([t.n_params for t in trials], dtype=np.float64)
    effect = Effect(metric, "too few", n, int(sizes.min()) if n else 0,
                    int(sizes.max()) if n else 0, margin=margin)
    if n and sizes.min() == sizes.max():
        effect.reason = "size is the same in every trial"
        return effect
    if n < 3:
        return effect
    if not all(math.isfinite(t.metrics[metric]) for t in trials):
        effect.reason = f"some trials have no finite {metric}"
        return effect
    names, sources, cov = columns(trials)
    logn = np.log10(sizes)
    center = float(logn.mean())
    others = np.column_stack([np.ones(n), cov])
    if np.linalg.matrix_rank(np.column_stack([others, logn])) == np.linalg.matrix_rank(others):
        effect.reason = ("size is fixed by the other settings that vary ("
                         + ", ".join(dict.fromkeys(sources)) + "): they cannot be told apart")
        return effect
    # Returns diminish with size: a curved size term when the trials afford it.
    curved = len(set(logn.tolist())) >= 4 and n - (3 + len(names)) >= CURVE_DF
    # Too few trials for every squared term: keep the linear ones.
    if n - (2 + curved + len(names)) < MIN_RESIDUAL_DF:
        keep = [i for i, c in enumerate(names) if not c.endswith("^2")]
        names, sources, cov = [names[i] for i in keep], [sources[i] for i in keep], cov[:, keep]
    size_cols = [logn, (logn - center) ** 2] if curved else [logn]
    k = len(size_cols)  # size coefficients are beta[1:1+k]; covariates follow
    x, names, sources = _independent(np.column_stack([np.ones(n), *size_cols, cov]), names,
                                     sources, 1 + k)
    cov = x[:, 1 + k:]
    if n - x.shape[1] < MIN_RESIDUAL_DF:
        effect.needed = x.shape[1] + MIN_RESIDUAL_DF  # the fewest trials that give a verdict
        return effect
    y = to_scale(metric, np.array([t.metrics[metric] for t in trials], dtype=np.float64))
    beta = _fit(y, x)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        b = _fit(y[i], x[i])
        if b is not None:
            boots.append(b)
    if beta is None or len(boots) < resamples // 2:
        effect.reason = "the trials do not pin the fit down (too many degenerate resamples)"
        return effect
    effect.degenerate = resamples - len(boots)  # left out of the percentiles
    draws = np.array(boots)
    means = cov.mean(axis=0)

    def acc(b: np.ndarray, at: np.ndarray | float, plus: np.ndarray | float = 0.0
            ) -> np.ndarray:
        """The fitted metric in points at log10(n) = at, the other settings at their means
        (+ `plus` on the fitted scale); one row per coefficient draw, one column per point."""
        b0 = b[..., 0] + b[..., 1 + k:] @ means
        b1, b2 = b[..., 1], b[..., 2] if curved else np.zeros_like(b[..., 1])
        if np.ndim(at):
            b0, b1, b2 = b0[..., None], b1[..., None], b2[..., None]
        return to_points(metric, b0 + b1 * at + b2 * (np.asarray(at) - center) ** 2 + plus)

    lo_n, hi_n = float(logn.min()), float(logn.max())
    whole = acc(draws, hi_n) - acc(draws, lo_n)
    effect.estimate = float(acc(beta, hi_n) - acc(beta, lo_n))
    effect.low, effect.high = (float(v) for v in np.percentile(whole, [2.5, 97.5]))
    effect.se = float(np.std(whole, ddof=1))
    effect.ends = (float(acc(beta, lo_n)), float(acc(beta, hi_n)))
    # A bound on the change anywhere in the range, not only between its ends (a curve can
    # rise and fall back): the widest 95% band of the change from the smallest network.
    grid = np.linspace(lo_n, hi_n, 41)
    band = np.percentile(acc(draws, grid) - acc(draws, lo_n)[:, None], [2.5, 97.5], axis=0)
    effect.anywhere = float(np.abs(band).max())
    decades = hi_n - lo_n
    if decades > 1.2:  # the largest tenfold against the average tenfold
        top = acc(draws, hi_n) - acc(draws, hi_n - 1)
        t_low, t_high = np.percentile(top, [2.5, 97.5])
        effect.top = (float(acc(beta, hi_n) - acc(beta, hi_n - 1)), float(t_low), float(t_high))
        effect.diminishing = bool(np.percentile(top - whole / decades, 97.5) < 0)
    effect.covariates, effect.held = tuple(names), tuple(dict.fromkeys(sources))
    if "depth" in names:  # one more layer at equal size, at the trials' mean log size and
        # the other settings' means
        j = 1 + k + names.index("depth")
        per_layer = acc(draws, center, draws[:, j]) - acc(draws, center)
        d_low, d_high = np.percentile(per_layer, [2.5, 97.5])
        effect.depth = (float(acc(beta, center, beta[j]) - acc(beta, center)), float(d_low),
                        float(d_high))
    # Partial residuals: each trial's value with the covariates moved to their means.
    effect.adjusted = to_points(metric, y - (cov - means) @ beta[1 + k:]).tolist()
    effect.sizes = [int(v) for v in sizes]
    effect.curve = (float(beta[0] + means @ beta[1 + k:]), float(beta[1]),
                    float(beta[2]) if curved else 0.0, center)
    low, high = effect.low, effect.high
    if low > 0:
        effect.verdict = "bigger"
    elif high < 0:
        effect.verdict = "smaller"
    elif effect.anywhere <= margin:
        effect.verdict = "null"
    else:
        # How many trials would bound it within +-margin, if the true effect is about 0: the
        # effect's standard error (the bootstrap's) shrinks as 1/sqrt(n); 1.96 + 1.645 standard
        # errors inside the margin gives a 95% interval within it 9 times in 10 (the null's
        # bound over the whole range is a little stricter: "about").
        effect.verdict = "unclear"
        effect.needed = max(n + 1, math.ceil(n * ((1.96 + 1.645) * effect.se / margin) ** 2))
    return effect


def fitted(effect: Effect, n_params: np.ndarray) -> np.ndarray:
    """The fitted size curve (other hyperparameters at their means) at these sizes, points."""
    b0, b1, b2, center = effect.curve
    at = np.log10(n_params)
    return to_points(effect.metric, b0 + b1 * at + b2 * (at - center) ** 2)


def params_text(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else f"{n:.0f}"


def held(effect: Effect) -> str:
    """What the fit accounted for, in words."""
    names = list(effect.held)
    return ("accounting for " + ", ".join(names[:-1]) + (" and " if len(names) > 1 else "")
            + names[-1]) if names else "nothing else varied"


def sentence(val: Effect, gap: Effect | None, budget: str) -> str:
    """The verdict in one sentence a non-statistician can read, then the numbers."""
    span = f"from {params_text(val.smallest)} to {params_text(val.largest)} parameters"
    where = f"{val.n} trials{budget}"
    if val.verdict == "too few":
        if val.reason:
            return (f"**No size verdict**: {val.reason} ({where}); this study cannot say whether "
                    "bigger networks generalize better.")
        fewest = f"about {val.needed}" if val.needed else "more"
        return (f"**Not enough comparable trials to separate size from the other settings** "
                f"({where}; the fit needs {fewest} trials, {MIN_RESIDUAL_DF} more than its "
                "coefficients): run more trials (search.n_trials) with pruning off.")
    ci = f"95% interval {val.low:+.2f} to {val.high:+.2f}"
    slight = val.verdict in ("bigger", "smaller") and val.bound <= val.margin
    text = {
        "bigger": f"**Yes, {'but only slightly: ' if slight else ''}bigger networks generalized "
                  f"better**: {span}, {held(val)}, validation accuracy rose by "
                  f"{val.estimate:.2f} points, from {val.ends[0]:.2f}% to {val.ends[1]:.2f}% "
                  f"({ci}; {where}).",
        "smaller": f"**No, {'only slightly, but ' if slight else ''}bigger networks generalized "
                   f"worse**: {span}, {held(val)}, validation accuracy fell by "
                   f"{-val.estimate:.2f} points, from {val.ends[0]:.2f}% to {val.ends[1]:.2f}% "
                   f"({ci}; {where}).",
        "null": f"**Size made no difference that matters**: {span}, {held(val)}, validation "
                f"accuracy changed by less than {val.bound:.2f} points anywhere in that range "
                f"(smallest to largest {val.estimate:+.2f}, {ci}; {where}).",
        "unclear": f"**Unclear**: {span}, {held(val)}, validation accuracy changed by "
                   f"{val.estimate:+.2f} points, but the 95% interval ({val.low:+.2f} to "
                   f"{val.high:+.2f}; {where}) is too wide to tell; about {val.needed} trials "
                   f"would narrow it to +-{val.margin:.2f} points.",
    }[val.verdict]
    if val.top is not None:
        t, lo, hi = val.top
        tenfold = (f"The largest tenfold ({params_text(val.largest / 10)} to "
                   f"{params_text(val.largest)}) accounts for {t:+.2f} points (95% interval "
                   f"{lo:+.2f} to {hi:+.2f})")
        if val.verdict == "bigger" and hi < 0:
            text += f" {tenfold}: accuracy peaks inside the range and falls after it."
        elif val.verdict == "bigger" and val.diminishing:
            text += f" {tenfold}: returns diminish with size."
        elif val.verdict in ("bigger", "smaller"):
            text += f" {tenfold}."
    if gap is not None and gap.verdict != "too few":
        g = (f"{gap.estimate:+.2f} points, 95% interval {gap.low:+.2f} to {gap.high:+.2f}")
        text += " " + {
            "bigger": f"The train-validation gap grew with size ({g}).",
            "smaller": f"The train-validation gap shrank with size ({g}).",
            "null": f"The train-validation gap changed by less than {gap.bound:.2f} points "
                    f"({g}).",
            "unclear": f"Whether the gap moves with size is unclear ({g}).",
        }[gap.verdict]
    if val.depth is not None:
        d, lo, hi = val.depth
        text += (f" At equal size, each extra hidden layer changed validation accuracy by "
                 f"{d:+.2f} points (95% interval {lo:+.2f} to {hi:+.2f}): "
                 + ("deeper beat wider." if lo > 0 else "wider beat deeper." if hi < 0
                    else "depth vs width made no clear difference."))
    return text


def of_rows(rows: list[Any], mean: Callable[[Any, str], float], metrics: tuple[str, ...]
            ) -> tuple[list[Trial], str]:
    """Trials from the report's rows: complete ones trained to the most common epoch count (a
    pruned or otherwise shorter trial is not comparable). Returns them and a budget note."""
    complete = [r for r in rows if r.state == "COMPLETE"]  # pruned ones: selected by score
    pruned, rows = len(rows) - len(complete), complete
    if not rows:
        return [], ""
    epochs = [r.epochs for r in rows]
    common = max(set(epochs), key=lambda e: (epochs.count(e), e))
    kept = [r for r in rows if r.epochs == common]
    trials = [Trial(r.n_params, {"depth": r.depth, "dropout": r.dropout, "lr": r.lr,
                                 "family": r.family, **r.extra},
                    {m: 100 * mean(r, m) for m in metrics}, r.logs) for r in kept]
    left = len(rows) - len(kept)
    note = (f" at {common} epochs each"
            + (f"; {left} trials with another epoch count left out" if left else "")
            + (f"; {pruned} pruned trials left out" if pruned else ""))
    return trials, note
