"""Bad input at the command line: one clear line, non-zero exit, never a traceback."""

import pytest

from tests.test_study import sweep


@pytest.mark.parametrize("overrides, message", [
    (["+experiment=smoke", "search.n_trials=0"], "search.n_trials=0 must be >= 1"),
    (["+experiment=smoke", "search.sampler=bayes"], "search.sampler='bayes' is not one of"),
    (["+experiment=smoke", "model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["+experiment=smoke", "search.space.depth.low=0"], "depth must be an integer >= 1"),
    (["+experiment=smoke", "search.space.width.low=500"], "empty range"),
    (["+experiment=smoke", "trainer.max_epochs=two"], "trainer.max_epochs"),
    (["+experiment=smoke", "data=mnist", "data.root=/nonexistent/mnist"],
     "no MNIST IDX files in /nonexistent/mnist"),
])
def test_bad_values_fail_with_one_line(tmp_path, overrides, message):
    result = sweep(tmp_path, *overrides)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sweeper: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_unknown_config_option_is_hydras_clear_error(tmp_path):
    result = sweep(tmp_path, "+experiment=smoke", "data=cifar10")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cifar10" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = sweep(tmp_path, "+experiment=smoke", "search.n_trials=0", "debug=true")
    assert result.returncode != 0 and "Traceback" in result.stderr
