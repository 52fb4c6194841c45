"""How often the size verdict is wrong, on planted studies whose truth is known
(sweeper/analysis/calibration.py): per scenario and study size, the share of false "bigger/smaller"
(or peak/valley) verdicts where no effect was planted, the 95% interval's coverage of the
planted effect, how often a bend ("returns diminish", a peak, a valley) is said where the
planted curve has none, and the largest trial-count estimate printed. Each share comes with its
simulation standard error.

    python scripts/calibrate_verdict.py                  # 200 studies per row, ~10 min on 2 cores
    python scripts/calibrate_verdict.py --studies 50 --sizes 24
"""

import argparse
import time

from sweeper.analysis import calibration, size_effect

# Planted size effects per tenfold: -log10(error) units (0.15: about +1 point per tenfold at
# 97%) for the log-scale scenarios, points for `points`.
EFFECT = {"points": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=200, help="planted studies per row")
    ap.add_argument("--sizes", default="16,24", help="trials per study")
    ap.add_argument("--scenarios", default=",".join(calibration.SCENARIOS))
    ap.add_argument("--resamples", type=int, default=size_effect.RESAMPLES)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print("scenario     trials effect  studies  false verdict   coverage        bend said     "
          "max needed  verdicts")
    for scenario in args.scenarios.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            for effect in (0.0, EFFECT.get(scenario, 0.15)):
                if scenario == "tied" and effect:
                    continue  # no size effect to recover where size is depth
                t = calibration.run(scenario, n, effect, args.studies,
                                    resamples=args.resamples)

                def share(count: int, of: int | None = None, t: calibration.Tally = t) -> str:
                    p, se = t.rate(count, of)
                    return "-" if p != p else f"{100 * p:5.1f}% +-{100 * se:.1f}"

                verdicts = " ".join(f"{k}={v}" for k, v in sorted(t.verdicts.items()))
                if t.gated and not effect:  # what the bare fit would have said
                    verdicts += f"; without the design check {share(t.ungated)} false"
                needed = f"{t.needed_max:,}" + (f" ({t.beyond} over)" if t.beyond else "")
                print(f"{scenario:12s} {n:6d} {effect:6.2f} {t.studies:8d}  "
                      f"{share(t.false) if not effect else '-':14s}  "
                      f"{share(t.covered, t.intervals):14s}  {share(t.bends):12s}  "
                      f"{needed:10s}  {verdicts}", flush=True)
    print(f"{time.perf_counter() - t0:.0f}s; false verdict: bigger/smaller/peak/valley with no "
          "effect planted (a description, given where the design is not randomized, is no "
          "verdict); coverage: the 95% interval holds the planted effect (studies with an "
          "interval); bend said: returns diminish, a peak or a valley where the planted curve "
          "has no bend in points; max needed: the largest trial count printed (over: more than "
          f"{size_effect.MAX_NEEDED:,}, none printed)")


if __name__ == "__main__":
    main()
