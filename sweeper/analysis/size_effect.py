"""Does size itself move validation accuracy and the gap, with the other hyperparameters held
fixed? A least-squares fit over the trials trained to one common budget:

    metric ~ 1 + s + s^2 + depth + dropout + dropout^2 + log10(lr) + log10(lr)^2 + ...,
    s = log10(n_params) (s^2 centred: returns can bend with size; dropped when trials are few)

(every other searched parameter that varies enters the same way: numbers linearly and, with 3+
distinct values, squared; log10 for those sampled on a log scale; categories as indicators).
The effect of size is the fitted size curve's rise from the smallest to the largest network:
"with the rest held fixed, validation accuracy moves by E points", and the same over the
largest tenfold. Its 95% interval is a percentile bootstrap over trials (pairs, 2,000
resamples, seeded), widened by Student's t over the normal at the fit's residual degrees of
freedom (small studies). A rank correlation cannot do this: when a sampler ties size to dropout or
learning rate, their effects show up as a size effect.

Answers: bigger is better (the interval is above 0), bigger is worse (below 0), better up to a
peak inside the range and worse after it (both parts' intervals clear of 0; a valley likewise),
no difference that matters (the change stays within +-margin points anywhere in the range), or
unclear, with the number of trials that would narrow the interval to +-margin (from the
interval's width, which shrinks as 1/sqrt(n); not given past MAX_NEEDED). No answer when the
study is too small or when the other settings fix size (linearly or not: one size per depth).
The design decides whether the answer is a verdict at all (design_note): only trials drawn at
random (qmc, random, grid; none pruned) are; otherwise the numbers are descriptive.
How often each answer is wrong is measured on planted studies: sweeper/analysis/calibration.py,
scripts/calibrate_verdict.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_modules.metrics import TEST_ACC, TRAIN_ACC, VAL_ACC

MARGIN = 0.25  # points: a change of size's effect smaller than this does not matter here
RESAMPLES = 2000
MIN_RESIDUAL_DF = 8  # trials beyond the fitted coefficients, or the interval means little
CURVE_DF = 12  # the curved size term only with this many to spare
LOG_ERROR = (VAL_ACC, TRAIN_ACC, TEST_ACC)  # fitted on the error's log scale
MAX_NEEDED = 10_000  # a trial count past this is not a plan: say the design cannot do it
DETERMINED = 0.95  # the other settings explain this share of log size: no verdict
RCOND = 1e-8  # a resample whose (scaled) design is this close to singular is left out
UNDERFIT = 1.0  # points: small networks' train accuracy this far below the large ones'
RANDOMIZED = ("qmc", "random", "grid")  # samplers that draw settings without looking at results


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
    # "bigger" | "smaller" | "peak" | "valley" | "null" | "unclear" | "too few"
    verdict: str
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
    # peak/valley: (n_params at the turn, (rise or fall to it, 95%), (change after it, 95%))
    turn: tuple[float, tuple[float, float, float], tuple[float, float, float]] | None = None
    curved: bool = False  # the fit has the curved size term (bends can only be seen with it)
    anywhere: float = math.nan  # 95% bound on the change from the smallest, anywhere in range
    degenerate: int = 0  # bootstrap resamples left out (their fit was rank-deficient)
    reason: str = ""  # why there is no verdict, when it is not the number of trials
    beyond: bool = False  # unclear, and more than MAX_NEEDED trials would be needed
    design: str = ""  # why the design allows only a description, not a verdict ("": it allows)
    # the gap only: (train accuracy at the smallest, at the largest) when the smallest networks
    # did not fit their training data (UNDERFIT), so the gap mixes in underfitting
    underfit: tuple[float, float] | None = None
    adjusted: list[float] | None = None  # each trial's metric with the covariates held at mean
    sizes: list[int] | None = None  # n_params of the same trials
    # The fitted size curve: b0 + b1 * log10(n) + b2 * (log10(n) - center)^2 on the fitted
    # scale (see fitted()), the other settings at their means.
    curve: tuple[float, float, float, float] = (math.nan, math.nan, 0.0, 0.0)
    se: float = math.nan  # the effect's standard error, points (from the interval's width)
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


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def determined(trials: list[Trial], logn: np.ndarray) -> tuple[float, list[str]]:
    """How much of log size the other settings that vary fix, linearly or not: R^2 of log10
    (n_params) on a flexible function of them (few-valued settings such as depth or family as
    one indicator per combination of values; the others as a cubic), and which settings (one
    alone, when one alone does it). Depth searched with the width fixed gives one size per
    depth: R^2 = 1, a straight line in depth or not. The flexible fit keeps MIN_RESIDUAL_DF
    trials to spare (cubic, then squared, then linear terms), so that chance alone does not
    come near DETERMINED."""
    n = len(trials)
    varying = [k for k in sorted({k for t in trials for k in t.params})
               if len({repr(t.params.get(k)) for t in trials}) > 1]
    y = logn - logn.mean()
    total = float(y @ y)

    def share(keys: list[str]) -> float:
        few, many = [], []
        for key in keys:
            values = [t.params.get(key) for t in trials]
            if _numeric(values) and len({repr(v) for v in values}) > 8:
                x = np.array(values, dtype=np.float64)
                if x.min() > 0 and any(key in t.logs for t in trials):
                    x = np.log10(x)
                many.append((x - x.mean()) / (x.std() or 1.0))
            else:
                few.append([repr(v) for v in values])
        cells = [repr(c) for c in zip(*few, strict=True)] if few else ["" for _ in trials]
        indicators = [np.array([c == v for c in cells], dtype=np.float64)
                      for v in sorted(set(cells))]
        for degree in (3, 2, 1, 0):
            x = np.column_stack([*indicators, *(m ** p for m in many
                                                for p in range(1, degree + 1))])
            if n - np.linalg.matrix_rank(x) >= (MIN_RESIDUAL_DF if degree or many else 1):
                resid = y - x @ np.linalg.lstsq(x, y, rcond=None)[0]
                return max(0.0, 1.0 - float(resid @ resid) / total)
        return 0.0

    if not varying or total == 0:
        return (1.0, varying) if varying else (0.0, [])
    whole = share(varying)
    alone = [(share([k]), k) for k in varying] if whole >= DETERMINED else []
    one = max(alone, default=(0.0, ""))
    return (one[0], [one[1]]) if one[0] >= DETERMINED else (whole, varying)


def _fits(y: np.ndarray, x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients of many resamples at once (rows: (B, n) trial indices):
    (B', p) coefficients of those whose design is not (near) singular, and which those are."""
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    xb, yb = x[rows] / scale, y[rows]
    u, s, vt = np.linalg.svd(xb, full_matrices=False)
    ok = s[:, -1] > RCOND * s[:, 0]
    s = np.where(ok[:, None], s, 1.0)
    coef = np.einsum("bji,bj->bi", vt, np.einsum("bnj,bn->bj", u, yb) / s) / scale
    return coef[ok], ok


def to_scale(metric: str, points: np.ndarray) -> np.ndarray:
    """Accuracies are fitted as -log10(error): near 100% effects multiply the error (dropout
    that doubles a small net's 5% error doubles a big net's 2%), so the fit is additive there,
    and a trial that barely trained (76% where the rest reach 92-98%) pulls it about half as
    much as in points. In points, a straight line on this scale flattens toward 100%: part of
    "returns diminish" comes from the scale (so it is claimed only from the curved fit). The
    gap, which can be 0 or negative, is fitted in points."""
    return -np.log10(np.maximum(100.0 - points, 1e-3)) if metric in LOG_ERROR else points


def to_points(metric: str, value: np.ndarray) -> np.ndarray:
    # clipped: a wild resample's curve can reach 10^300% error on the way back
    return 100.0 - 10.0 ** np.clip(-value, -9.0, 9.0) if metric in LOG_ERROR else value


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


def interval(draws: np.ndarray, point: Any, widen: float) -> tuple[Any, Any]:
    """The 95% percentile interval of bootstrap draws, widened about the point estimate by
    `widen` (Student's t over the normal at the fit's residual degrees of freedom: with 16
    to spare, 1.08; unwidened, the bootstrap covered a planted effect under uneven noise in
    only 90.5% of 200 planted studies, sweeper/analysis/calibration.py). Elementwise for arrays."""
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    low, high = point - widen * (point - low), point + widen * (high - point)
    return (float(low), float(high)) if np.ndim(low) == 0 else (low, high)


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
    share, by = determined(trials, logn)
    if share >= DETERMINED:
        which = ", ".join(by)
        effect.reason = (f"size is fixed by the other settings that vary ({which}): they cannot "
                         "be told apart" if share > 1 - 1e-9 else
                         f"size is almost fixed by the other settings that vary ({which} "
                         f"explain {100 * share:.1f}% of its variation): they cannot be told "
                         "apart")
        return effect
    # Returns bend with size: a curved size term when the trials afford it.
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
    full, _ = _fits(y, x, np.arange(n)[None])
    rng = np.random.default_rng(seed)
    draws, _ = _fits(y, x, rng.integers(0, n, (resamples, n)))
    if not len(full) or len(draws) < resamples // 2:
        effect.reason = "the trials do not pin the fit down (too many degenerate resamples)"
        return effect
    beta = full[0]
    effect.degenerate = resamples - len(draws)  # left out of the percentiles
    from scipy.stats import t as student

    widen = float(student.ppf(0.975, n - x.shape[1])) / 1.959964
    effect.curved = curved
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
    effect.low, effect.high = interval(whole, effect.estimate, widen)
    effect.se = (effect.high - effect.low) / (2 * 1.96)  # a few wild resamples cannot inflate it
    effect.ends = (float(acc(beta, lo_n)), float(acc(beta, hi_n)))
    # A bound on the change anywhere in the range, not only between its ends (a curve can
    # rise and fall back): the widest 95% band of the change from the smallest network.
    grid = np.linspace(lo_n, hi_n, 41)
    line = acc(beta, grid)
    band = interval(acc(draws, grid) - acc(draws, lo_n)[:, None], line - line[0], widen)
    effect.anywhere = float(np.abs(np.array(band)).max())
    decades = hi_n - lo_n
    if curved:
        # A turn inside the range: the fitted curve's highest (lowest) point, with a change
        # to it and a change after it that are both clear of 0.
        for turn, sign in ((int(np.argmax(line)), 1), (int(np.argmin(line)), -1)):
            if 0 < turn < len(grid) - 1:
                to = acc(draws, grid[turn]) - acc(draws, lo_n)
                after = acc(draws, hi_n) - acc(draws, grid[turn])
                (to_lo, to_hi) = interval(to, line[turn] - line[0], widen)
                (af_lo, af_hi) = interval(after, line[-1] - line[turn], widen)
                if (sign > 0 and to_lo > 0 and af_hi < 0) or (sign < 0 and to_hi < 0
                                                              and af_lo > 0):
                    effect.verdict = "peak" if sign > 0 else "valley"
                    effect.turn = (float(10 ** grid[turn]),
                                   (float(line[turn] - line[0]), to_lo, to_hi),
                                   (float(line[-1] - line[turn]), af_lo, af_hi))
        if decades > 1.2:  # the largest tenfold against the average tenfold
            top = acc(draws, hi_n) - acc(draws, hi_n - 1)
            t_point = float(acc(beta, hi_n) - acc(beta, hi_n - 1))
            effect.top = (t_point, *interval(top, t_point, widen))
            shortfall = t_point - effect.estimate / decades  # below the average tenfold
            effect.diminishing = interval(top - whole / decades, shortfall, widen)[1] < 0
    effect.covariates, effect.held = tuple(names), tuple(dict.fromkeys(sources))
    if "depth" in names:  # one more layer at equal size, at the trials' mean log size and
        # the other settings' means
        j = 1 + k + names.index("depth")
        per_layer = acc(draws, center, draws[:, j]) - acc(draws, center)
        d_point = float(acc(beta, center, beta[j]) - acc(beta, center))
        effect.depth = (d_point, *interval(per_layer, d_point, widen))
    # Partial residuals: each trial's value with the covariates moved to their means.
    effect.adjusted = to_points(metric, y - (cov - means) @ beta[1 + k:]).tolist()
    effect.sizes = [int(v) for v in sizes]
    effect.curve = (float(beta[0] + means @ beta[1 + k:]), float(beta[1]),
                    float(beta[2]) if curved else 0.0, center)
    if effect.verdict in ("peak", "valley"):
        return effect
    if effect.low > 0:
        effect.verdict = "bigger"
    elif effect.high < 0:
        effect.verdict = "smaller"
    elif effect.anywhere <= margin:
        effect.verdict = "null"
    else:
        # How many trials would bound it within +-margin, if the true effect is about 0: the
        # interval's width shrinks as 1/sqrt(n); 1.96 + 1.645 standard errors inside the
        # margin gives a 95% interval within it 9 times in 10 (the null's bound over the
        # whole range is a little stricter: "about"). Past MAX_NEEDED it is no plan.
        effect.verdict = "unclear"
        needed = max(n + 1, math.ceil(n * ((1.96 + 1.645) * effect.se / margin) ** 2))
        effect.needed, effect.beyond = (needed, False) if needed <= MAX_NEEDED else (None, True)
    return effect


def design_note(samplers: Iterable[str | None], pruned: int, complete: int) -> str:
    """Why a study's trials allow only a description of size's effect, not a verdict; "" when
    they were drawn at random (RANDOMIZED samplers) and none was pruned. samplers: the sampler
    that chose each fitted trial (None: not recorded); pruned, complete: the study's counts."""
    if pruned:
        return (f"not a randomized design: pruning kept only {complete} of {complete + pruned} "
                "trials, those that scored well early, so the survivors are selected on the "
                "outcome being judged")
    used = set(samplers)
    adaptive = sorted(s for s in used if s is not None and s not in RANDOMIZED)
    if adaptive:
        return (f"not a randomized design: the {' and '.join(adaptive)} sampler chose settings "
                "from earlier trials' results")
    if None in used:
        return ("the design is not recorded (trials made before sweeper recorded their "
                "sampler), so it may not be randomized")
    return ""


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


def _turn(val: Effect) -> str:
    assert val.turn is not None
    at, (a, a_lo, a_hi), (b, b_lo, b_hi) = val.turn
    first, then = ("rose", "fell") if val.verdict == "peak" else ("fell", "rose")
    return (f"validation accuracy {first} by {abs(a):.2f} points from "
            f"{params_text(val.smallest)} to about {params_text(at)} parameters (95% interval "
            f"{a_lo:+.2f} to {a_hi:+.2f}), then {then} by {abs(b):.2f} points to "
            f"{params_text(val.largest)} ({b_lo:+.2f} to {b_hi:+.2f})")


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
    if val.design:  # numbers, no verdict: the intervals assume trials drawn at random
        text = (f"**No size verdict, only a description** ({val.design}): {span}, {held(val)}, "
                + (_turn(val) if val.turn is not None else
                   f"validation accuracy changed by {val.estimate:+.2f} points, from "
                   f"{val.ends[0]:.2f}% to {val.ends[1]:.2f}%")
                + f" ({ci}, as if the trials had been drawn at random; {where}).")
        if gap is not None and gap.verdict != "too few":
            text += (f" The train-validation gap changed by {gap.estimate:+.2f} points "
                     f"({gap.low:+.2f} to {gap.high:+.2f})")
            if gap.underfit is not None:
                small, large = gap.underfit
                text += (f", which mixes underfitting with generalization: the smallest "
                         f"networks did not fit their training data (train accuracy "
                         f"{small:.2f}% at {params_text(gap.smallest)} against {large:.2f}% "
                         f"at {params_text(gap.largest)})")
            text += "."
        if val.depth is not None:
            d, lo, hi = val.depth
            text += (f" At equal size, each extra hidden layer went with {d:+.2f} points of "
                     f"validation accuracy ({lo:+.2f} to {hi:+.2f}).")
        return text + (" For a verdict, run a study with search.sampler=qmc (or random, or "
                       "grid) and search.pruner=none.")
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
        "peak": f"**Bigger networks generalized better only up to a point**: {held(val)}, "
                + (_turn(val) if val.turn else "") + f" ({where}).",
        "valley": f"**Bigger networks first generalized worse, then better**: {held(val)}, "
                  + (_turn(val) if val.turn else "") + f" ({where}).",
        "null": f"**Size made no difference that matters**: {span}, {held(val)}, validation "
                f"accuracy changed by less than {val.bound:.2f} points anywhere in that range "
                f"(smallest to largest {val.estimate:+.2f}, {ci}; {where}).",
        "unclear": f"**Unclear**: {span}, {held(val)}, validation accuracy changed by "
                   f"{val.estimate:+.2f} points, but the 95% interval ({val.low:+.2f} to "
                   f"{val.high:+.2f}; {where}) is too wide to tell; "
                   + (f"about {val.needed} trials would narrow it to +-{val.margin:.2f} points."
                      if val.needed else
                      f"this design would need more than {MAX_NEEDED:,} trials to narrow it "
                      f"to +-{val.margin:.2f} points: let size vary apart from the other "
                      "settings."),
    }[val.verdict]
    if val.top is not None and val.verdict in ("bigger", "smaller"):
        t, lo, hi = val.top
        text += (f" The largest tenfold ({params_text(val.largest / 10)} to "
                 f"{params_text(val.largest)}) accounts for {t:+.2f} points (95% interval "
                 f"{lo:+.2f} to {hi:+.2f})"
                 + (": returns diminish with size." if val.verdict == "bigger"
                    and val.diminishing else "."))
    if gap is not None and gap.verdict != "too few":
        g = (f"{gap.estimate:+.2f} points, 95% interval {gap.low:+.2f} to {gap.high:+.2f}")
        if gap.underfit is not None:
            small, large = gap.underfit
            text += (f" The train-validation gap moved by {g}, but that mixes underfitting with "
                     f"generalization: the smallest networks did not fit their training data "
                     f"(train accuracy {small:.2f}% at {params_text(gap.smallest)} against "
                     f"{large:.2f}% at {params_text(gap.largest)}, other settings at their "
                     "means), so a smaller gap there is less fitting, not better "
                     "generalization.")
        else:
            text += " " + {
                "bigger": f"The train-validation gap grew with size ({g}).",
                "smaller": f"The train-validation gap shrank with size ({g}).",
                "peak": f"The train-validation gap rose, then fell with size ({g} from the "
                        "smallest to the largest).",
                "valley": f"The train-validation gap fell, then rose with size ({g} from the "
                          "smallest to the largest).",
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


def underfit(train: Effect) -> tuple[float, float] | None:
    """The fitted train accuracy at the smallest and the largest network when the smallest
    fell short of the largest by UNDERFIT points or more (and surely short), else None."""
    if train.verdict == "too few" or train.estimate < UNDERFIT or not train.low > 0:
        return None
    return train.ends


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
