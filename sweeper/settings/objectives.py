"""What a study optimizes. One objective (the default): validation accuracy, maximized, as
`search.objective` says (final or best epoch). Several (`search.objectives`, e.g. val_acc up and
n_params down): an Optuna multi-objective study, whose answer is a Pareto front, not one trial;
Optuna cannot prune such trials, so they all train to the end."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lightning_modules.metrics import GAP, TRAIN_ACC, VAL_ACC
from sweeper.settings import keys
from sweeper.settings.config import Config


def multi(cfg: Config) -> bool:
    return bool(cfg.search.objectives)


def directions(cfg: Config) -> list[str]:
    return list(cfg.search.objectives.values()) if multi(cfg) else ["maximize"]


def values(cfg: Config, history: list[dict[str, float]], n_params: int) -> list[float]:
    """The trial's objective values, in the order of search.objectives: all from the final
    epoch (search.objective=final) or all from the best epoch by val_acc (best), never a mix
    (before: best-epoch val_acc beside last-epoch train_acc and gap, a point of no epoch)."""
    epoch = history[-1] if cfg.search.objective == "final" else history[
        max(range(len(history)), key=lambda i: history[i][VAL_ACC])]
    if not multi(cfg):
        return [epoch[VAL_ACC]]
    of = {VAL_ACC: epoch[VAL_ACC], TRAIN_ACC: epoch[TRAIN_ACC], GAP: epoch[GAP],
          keys.N_PARAMS: n_params}
    return [float(of[name]) for name in cfg.search.objectives]


def is_multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def names(study: optuna.Study) -> list[str]:
    """The objectives' names as the study stored them (single-objective studies: val_acc)."""
    stored = study.user_attrs.get(keys.OBJECTIVES)
    return list(stored) if stored else [VAL_ACC]


def front(study: optuna.Study) -> list[FrozenTrial]:
    """Pareto-optimal complete trials, by their first objective (best first)."""
    trials = study.best_trials
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    return sorted(trials, key=lambda t: (sign * t.values[0], t.number))


def ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials, best first: by value; in a multi-objective study the front first (by
    its first objective), then the rest by their first objective."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values]
    if not is_multi(study):
        return sorted(done, key=lambda t: (-(t.value or 0.0), t.number))
    on_front = front(study)
    numbers = {t.number for t in on_front}
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    rest = sorted((t for t in done if t.number not in numbers),
                  key=lambda t: (sign * t.values[0], t.number))
    return on_front + rest


def describe(study: optuna.Study, t: FrozenTrial) -> str:
    """`val_acc 97.12%, n_params 50,890` for a trial's objective values."""
    return ", ".join(f"{n} {fmt(n, v)}" for n, v in zip(names(study), t.values or [], strict=False))


def fmt(name: str, v: Any) -> str:
    if name == keys.N_PARAMS:
        return f"{int(v):,}"
    return f"{100 * v:.2f}%" if name != GAP else f"{100 * v:+.2f} points"
