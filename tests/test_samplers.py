"""The search design across starts and workers: one scrambled QMC sequence per study, continued
by every resume and shared by concurrent workers (no point drawn twice); the other samplers'
random streams stay apart between workers."""

import numpy as np
import optuna
import torch

from sweeper.loop.study import open_storage, open_study
from sweeper.settings import search_space
from sweeper.settings.config import ParamSpec
from sweeper.train import data


def tiny_splits() -> data.Splits:
    rng = np.random.default_rng(0)  # open_study needs only the data's identity
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    return data.make_splits(data.Dataset(images, rng.integers(0, 10, 40), "synthetic"), 10, 0,
                            torch.device("cpu"))


def draw(study: optuna.Study, cfg, k: int) -> list[tuple[float, ...]]:
    """Ask k trials as the sweep does (one at a time, each told before the next)."""
    points = []
    for _ in range(k):
        trial = study.ask()
        params = search_space.suggest(trial, cfg.search.space, cfg.model.depth)
        study.tell(trial, 0.5)
        points.append(tuple(params[name] for name in sorted(params)))
    return points


def qmc_cfg(cfg, name: str):
    cfg.search.sampler, cfg.search.study_name = "qmc", name
    cfg.search.space = {"dropout": ParamSpec("float", low=0.0, high=0.5),
                        "lr": ParamSpec("float", low=1e-4, high=1e-2, log=True)}
    return cfg


def test_resumes_and_workers_continue_one_qmc_sequence(tiny_cfg):
    splits = tiny_splits()
    storage = open_storage(tiny_cfg)
    one = qmc_cfg(tiny_cfg, "one")
    uninterrupted = draw(open_study(one, splits, storage), one, 9)
    # The same study (same seed), in three starts: a first run of 3 trials, then two workers
    # that open it together and take turns asking.
    cut = qmc_cfg(tiny_cfg, "cut")
    pieces = draw(open_study(cut, splits, storage), cut, 3)
    a, b = open_study(cut, splits, storage), open_study(cut, splits, storage)
    for _ in range(3):
        pieces += draw(a, cut, 1) + draw(b, cut, 1)
    assert len(set(pieces)) == 9  # no point drawn twice
    # After the first (random) trial, every start continued the one sequence: the same points,
    # in the same order, as one uninterrupted worker (before: each start began a new scrambled
    # sequence at index 0).
    assert pieces[1:] == uninterrupted[1:]
    first = np.array(uninterrupted[1:])  # and they spread: a Sobol sequence, not a clump
    assert first[:, 0].min() < 0.1 and first[:, 0].max() > 0.4


def test_workers_of_a_random_study_draw_different_streams(tiny_cfg):
    splits = tiny_splits()
    storage = open_storage(tiny_cfg)
    tiny_cfg.search.sampler = "random"
    a, b = open_study(tiny_cfg, splits, storage), open_study(tiny_cfg, splits, storage)
    assert set(draw(a, tiny_cfg, 4)).isdisjoint(draw(b, tiny_cfg, 4))
