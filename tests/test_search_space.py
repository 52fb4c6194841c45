import optuna
import pytest

from sweeper.settings import search_space
from sweeper.settings.config import ParamSpec


def test_grid_values_hit_decimal_steps_exactly():
    assert search_space.grid_values(ParamSpec("float", low=0.0, high=0.3, step=0.1)) == \
        [0.0, 0.1, 0.2, 0.3]
    assert search_space.grid_values(ParamSpec("int", low=16, high=64, step=16)) == \
        [16, 32, 48, 64]
    assert search_space.grid_values(ParamSpec("categorical", choices=["a", 2])) == ["a", 2]


def test_depth_first_then_one_width_per_layer():
    space = {"width": ParamSpec("int", low=8, high=64, per_layer=True),
             "depth": ParamSpec("int", low=1, high=4)}
    trial = optuna.trial.FixedTrial({"depth": 3, "width_0": 8, "width_1": 16, "width_2": 32})
    assert search_space.suggest(trial, space, default_depth=2) == \
        {"depth": 3, "width_0": 8, "width_1": 16, "width_2": 32}


def test_shared_width_and_log_scale():
    space = {"width": ParamSpec("int", low=8, high=1024, log=True)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    widths = [search_space.suggest(study.ask(), space, 2)["width"] for _ in range(200)]
    assert min(widths) >= 8 and max(widths) <= 1024
    # log scale: about as many samples below sqrt(8 * 1024) = 90 as above it
    below = sum(w < 90 for w in widths)
    assert 60 < below < 140


@pytest.mark.parametrize("a, b, same", [
    ({"depth": ParamSpec("int", low=1, high=3)}, {"depth": ParamSpec("int", low=1, high=3)}, True),
    ({"depth": ParamSpec("int", low=1, high=3)}, {"depth": ParamSpec("int", low=1, high=4)}, False),
])
def test_describe_detects_changed_spaces(a, b, same):
    assert (search_space.describe(a) == search_space.describe(b)) is same
