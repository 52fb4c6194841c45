"""search.sampler / search.pruner -> Optuna objects, and the grid sampler our ask/tell loop
needs."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeper.record import ledger
from sweeper.settings import objectives, search_space
from sweeper.settings.config import Config


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler counts a FAILED trial's point as visited (so after a crashed or
    diverged trial the failed point never runs and a finished one runs twice), and hands the
    first trials their points by trial number whatever happened to them. Here each asked trial
    takes, in the (seeded) grid order: a point whose one trial failed (its retry), else a point
    never started, else a point that failed more than once; a point with a complete, pruned,
    running or queued trial is never taken again while another remains. An enqueued trial (a
    retry) keeps the point its parameters name. It never calls Study.stop(), which only works
    inside optimize(): our loop stops at the grid size."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        fixed = trial.system_attrs.get("fixed_params")
        if fixed is not None:
            grid_id = self._point_of(fixed)
        else:
            taken: set[int] = set()
            failures: dict[int, int] = {}
            for t in study.get_trials(deepcopy=False):
                point = self._point(t)
                if point is None or t.number == trial.number:
                    continue
                if t.state == TrialState.FAIL:
                    failures[point] = failures.get(point, 0) + 1
                else:
                    taken.add(point)
            # A failed point is retried once, first; one that keeps failing waits until every
            # unvisited point has run, so that it cannot block the rest of the grid.
            free = [i for i in range(len(self._all_grids)) if i not in taken]
            ordered = sorted(free, key=lambda i: (failures.get(i) != 1, i in failures,
                                                  failures.get(i, 0)))
            grid_id = ordered[0] if ordered else None
        if grid_id is None:  # every point is done or being done; Optuna would stop here
            grid_id = int(self._rng.rng.choice(len(self._all_grids)))
        ledger.set_system_attrs(study, trial, {"search_space": self._search_space,
                                               "grid_id": grid_id})

    def _point(self, t: FrozenTrial) -> int | None:
        if "grid_id" in t.system_attrs and self._same_search_space(t.system_attrs["search_space"]):
            return int(t.system_attrs["grid_id"])
        if t.state == TrialState.WAITING and "fixed_params" in t.system_attrs:
            return self._point_of(t.system_attrs["fixed_params"])
        return None

    def _point_of(self, params: dict[str, Any]) -> int | None:
        values = tuple(params.get(name) for name in self._param_names)
        return next((i for i, g in enumerate(self._all_grids) if tuple(g) == values), None)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    s = cfg.search
    seed %= 2**32  # the study seed plus trial and start counts: Optuna takes 0 .. 2**32 - 1
    if s.sampler == "tpe":
        # constant_liar: concurrent workers do not all sample next to the same running trial.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        # The seed shuffles the grid, and grid ids index that order: every run and every worker
        # of a study must see the same order, so the grid's seed is the study's.
        return AskTellGridSampler(search_space.grid(s.space), seed=cfg.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # One scrambled sequence per study: Optuna keys a QMC sequence's position (a study system
    # attribute, advanced under our study lock at each ask) by the sampler's seed, so every
    # start and every worker must use the study's seed to continue it, never to restart it at
    # index 0 or draw another worker's points. The first trial is drawn at random (Optuna's
    # independent sampler), from this start's own stream.
    return optuna.samplers.QMCSampler(seed=cfg.seed, scramble=True,
                                      independent_sampler=optuna.samplers.RandomSampler(seed),
                                      warn_independent_sampling=False)


def prunes(cfg: Config) -> bool:
    """Whether a pruner reads the trials' per-epoch values: only then are they reported."""
    return not objectives.multi(cfg) and cfg.search.pruner != "none"


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    s = cfg.search
    if objectives.multi(cfg):  # Optuna cannot prune multi-objective trials
        return optuna.pruners.NopPruner()
    if s.pruner == "median":
        # Steps are epochs from 1; n_warmup_steps=w+1 leaves epochs 1..w unpruned.
        return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                           n_warmup_steps=s.pruner_warmup_epochs + 1)
    if s.pruner == "percentile":
        return optuna.pruners.PercentilePruner(s.pruner_percentile,
                                               n_startup_trials=s.pruner_startup_trials,
                                               n_warmup_steps=s.pruner_warmup_epochs + 1)
    # Rungs at epochs 1, 3, 9, ...: a trial goes on only in the top third of its rung.
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.trainer.max_epochs)
    return optuna.pruners.NopPruner()
