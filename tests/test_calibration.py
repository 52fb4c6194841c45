"""A small version of scripts/calibrate_verdict.py: planted studies whose truth is known, through
the verdict as the report gives it."""

import math

from sweeper.analysis import calibration


def test_planted_studies_get_calibrated_verdicts():
    # No effect planted, the default design's 24 trials: a false "bigger/smaller" is rare.
    null = calibration.run("log", 24, 0.0, 20, resamples=400)
    assert null.studies == 20 and null.false <= 2 and null.intervals == 20
    # A planted effect (on the fit's scale and, misspecified, in points): its interval holds it.
    for scenario, effect in (("log", 0.15), ("points", 1.0)):
        t = calibration.run(scenario, 24, effect, 10, resamples=400)
        assert t.covered >= 9 and t.verdicts.get("bigger", 0) >= 9
    # Constant returns in points: no bend said. At 16 trials (before: 47 of 50) the curve is
    # not fitted at all now; at 24 it is, and must not find a bend that is not there.
    assert calibration.run("points", 16, 1.0, 10, resamples=400).bends == 0
    assert calibration.run("points", 24, 1.0, 10, resamples=400).bends <= 1
    # Size tied to depth: no verdict, no trial count; pruning: a description, never a verdict.
    tied = calibration.run("tied", 24, 0.0, 5, resamples=400)
    assert tied.verdicts == {"too few": 5} and tied.needed_max == 0
    pruned = calibration.run("pruned", 24, 0.0, 5, resamples=400)
    assert pruned.false == 0 and pruned.gated >= 3
    p, se = null.rate(null.false)
    assert 0 <= p <= 0.1 and math.isfinite(se)
