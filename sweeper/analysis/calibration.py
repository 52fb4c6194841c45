"""Planted studies: trials of the default design (depth_vs_width: size 20k-1M parameters, log,
depth 1-4, dropout 0-0.5, lr 3e-4-3e-3, log; drawn from a scrambled Sobol sequence) whose
validation accuracy follows a known rule, fed to size_effect.estimate. How often the verdict
is wrong, measured: scripts/calibrate_verdict.py prints it, tests/test_calibration.py runs a
small version.

Each scenario plants a size effect (0: none) in one way:
- log: additive on the fit's own scale, -log10(error) (the model the fit assumes);
- points: additive in points, a straight line per tenfold (the scale misspecified; with an
  effect, constant returns: no bend in points);
- interaction: on the log scale, size's slope changes with dropout (the fit has no such term);
- uneven: on the log scale, small networks far noisier than large ones;
- pruned: like log, 2.5x as many trials drawn, but a median pruner stops those that start
  below the median (large networks start faster), so the fit sees survivors selected on the
  outcome;
- tied: the width fixed, depth drawn: size is a function of depth;
- near-tied: the width drawn from 192-320 only, depth drawn: size mostly a function of depth.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from lightning_modules.metrics import VAL_ACC
from sweeper.analysis import size_effect
from sweeper.analysis.size_effect import Trial

LOG_N = (math.log10(2e4), math.log10(1e6))
SCENARIOS = ("log", "points", "interaction", "uneven", "pruned", "tied", "near-tied")
NOISE = 0.04  # -log10(error) units: ~0.3 points at 97%, as the default study's residuals


def mlp_params(width: int, depth: int) -> int:
    return 784 * width + width + (depth - 1) * (width * width + width) + 10 * width + 10


def design(rng: np.random.Generator, n: int) -> np.ndarray:
    """n points of a scrambled Sobol sequence in [0, 1)^4 (size, depth, dropout, lr)."""
    from scipy.stats import qmc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "balance properties ... power of 2"
        return qmc.Sobol(4, scramble=True, seed=rng).random(n)


def score(depth: np.ndarray, dropout: np.ndarray, loglr: np.ndarray) -> np.ndarray:
    """The other settings' part of -log10(error): a layer costs a little, dropout costs more
    as it grows, the learning rate has an optimum near 1.2e-3 (as in the default study)."""
    return (-0.45 - 0.02 * (depth - 2.5) - 0.2 * dropout - 0.6 * dropout ** 2
            - 0.5 * (loglr + 2.9) ** 2)


@dataclass
class Planted:
    trials: list[Trial]
    truth: float  # the estimand: points from the smallest to the largest network, other
    # settings at their means; nan where size is not separable (tied)
    bend: bool  # whether the planted curve bends in points (log scale: it does)
    pruned: int = 0


def planted(scenario: str, n: int, per_decade: float, rng: np.random.Generator) -> Planted:
    """One planted study. per_decade: the size effect per tenfold, in -log10(error) units for
    the log-scale scenarios and in points for `points`."""
    u = design(rng, 5 * n // 2 if scenario == "pruned" else n)  # pruning keeps about 2 in 5
    logn = LOG_N[0] + u[:, 0] * (LOG_N[1] - LOG_N[0])
    depth = 1 + np.floor(4 * u[:, 1]).astype(int)
    dropout = 0.5 * u[:, 2]
    loglr = math.log10(3e-4) + u[:, 3]
    if scenario in ("tied", "near-tied"):
        width = (np.full(len(u), 256) if scenario == "tied"
                 else 192 + np.floor(129 * rng.random(len(u))).astype(int))
        logn = np.log10([mlp_params(int(w), int(d)) for w, d in zip(width, depth, strict=True)])
    centre = float(np.mean(LOG_N))
    other = score(depth, dropout, loglr)
    slope = np.full(len(u), per_decade)
    noise = NOISE * rng.normal(size=len(u))
    if scenario == "interaction":  # dropout 0.5 doubles size's slope, dropout 0 halves it
        slope = slope + 0.3 * (dropout - 0.25)
    if scenario == "uneven":  # 3x the noise at the small end, half of it at the large end
        noise *= 3.0 - 2.5 * (logn - LOG_N[0]) / (LOG_N[1] - LOG_N[0])
    if scenario == "points":
        acc = 100 - 10 ** -other + per_decade * (logn - centre) + 7 * noise
    else:
        acc = 100 - 10 ** -(other + slope * (logn - centre) + noise)
    keep = np.ones(len(u), dtype=bool)
    if scenario == "pruned":  # median pruning on an early score in which large nets lead
        early = -np.log10(100 - acc) + 0.3 * (logn - centre) + NOISE * rng.normal(size=len(u))
        for i in range(5, len(u)):
            keep[i] = early[i] >= np.median(early[:i][keep[:i]])
    trials = [Trial(round(10 ** logn[i]), {"depth": int(depth[i]),
                                                "dropout": float(dropout[i]),
                                                "lr": float(10 ** loglr[i])},
                    {VAL_ACC: float(acc[i])}, frozenset({"lr"})) for i in np.flatnonzero(keep)]
    lo, hi = float(logn[keep].min()), float(logn[keep].max())
    if scenario == "points":
        truth = per_decade * (hi - lo)
    elif scenario == "tied":
        truth = math.nan
    else:
        # The fit's "other settings at their means": the mean of their part on its scale.
        mean_other = float(other[keep].mean())
        mean_slope = per_decade + (0.3 * (float(dropout[keep].mean()) - 0.25)
                                   if scenario == "interaction" else 0.0)

        def points(at: float) -> float:
            return 100 - 10 ** -(mean_other + mean_slope * (at - centre))

        truth = points(hi) - points(lo)
    return Planted(trials, truth, scenario != "points" and per_decade != 0,
                   int((~keep).sum()))


@dataclass
class Tally:
    studies: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    covered: int = 0  # interval holds the planted truth
    intervals: int = 0  # studies with an interval (a verdict other than "too few")
    false: int = 0  # a direction (bigger/smaller/peak/valley) said where none was planted
    bends: int = 0  # "returns diminish", a peak or a valley said where the curve has no bend
    needed_max: int = 0  # the largest trial count printed
    beyond: int = 0  # unclear, with more than MAX_NEEDED trials needed (no count printed)
    gated: int = 0  # the design gate made it a description (no verdict)
    ungated: int = 0  # false directions the bare estimate would have said without the gate

    def rate(self, count: int, of: int | None = None) -> tuple[float, float]:
        """A share and its simulation standard error."""
        total = self.studies if of is None else of
        p = count / total if total else math.nan
        return p, math.sqrt(p * (1 - p) / total) if total else math.nan


def run(scenario: str, n: int, per_decade: float, studies: int, seed: int = 0,
        resamples: int = size_effect.RESAMPLES) -> Tally:
    """`studies` planted studies of one kind, through estimate() and the design gate as the
    report applies it."""
    rng = np.random.default_rng([seed, n, SCENARIOS.index(scenario), int(1000 * per_decade)])
    tally = Tally()
    for k in range(studies):
        p = planted(scenario, n, per_decade, rng)
        e = size_effect.estimate(p.trials, VAL_ACC, resamples=resamples, seed=k)
        e.design = size_effect.design_note(["qmc"] * len(p.trials), p.pruned, len(p.trials))
        tally.studies += 1
        said = "description" if e.design and e.verdict != "too few" else e.verdict
        tally.verdicts[said] = tally.verdicts.get(said, 0) + 1
        tally.gated += said == "description"
        if e.verdict != "too few":
            tally.intervals += 1
            tally.covered += bool(e.low <= p.truth <= e.high)
        if per_decade == 0:
            tally.false += said in ("bigger", "smaller", "peak", "valley")
            tally.ungated += e.verdict in ("bigger", "smaller", "peak", "valley")
        if not p.bend and (said in ("peak", "valley") or (said == "bigger" and e.diminishing)):
            tally.bends += 1
        if said == "unclear" and e.needed is not None:
            tally.needed_max = max(tally.needed_max, e.needed)
        tally.beyond += e.beyond
    return tally
