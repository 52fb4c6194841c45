"""Learning-rate schedules as a factor of the base lr, per optimizer step (progress in [0, 1])."""

import math


def _anneal(start: float, end: float, t: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * t))


def lr_factor(schedule: str, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":  # torch's OneCycleLR defaults: 30% warm-up from 1/25, to 1/25e4
        warm = 0.3
        if progress < warm:
            return _anneal(1 / 25, 1.0, progress / warm)
        return _anneal(1.0, 1 / 25e4, (progress - warm) / (1 - warm))
    return 1.0
