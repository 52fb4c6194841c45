"""`python -m sweeper` in-process, for the refusals: the CLI's own checks (preflight, Hydra's
compose, start) without a new Python, torch and MLflow per case. A few real subprocess runs
(tests/test_cli.py) keep the exit codes and printing honest."""

import contextlib
import os
from pathlib import Path

from hydra import compose, initialize_config_dir

from sweeper.__main__ import preflight, start
from sweeper.settings.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"


def refusal(cwd: Path, *overrides: str) -> str:
    """The one-line error that `python -m sweeper OVERRIDES` run in `cwd` prints (after
    "sweeper: error: "). Fails the test if the run is not refused, or the error is not one line."""
    old = Path.cwd()
    os.chdir(cwd)
    try:
        try:
            argv = preflight(list(overrides))
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                raw = compose(config_name="config", overrides=argv)
            start(raw)
        except UserError as e:
            message = str(e)
        else:
            raise AssertionError(f"not refused: {overrides}")
    finally:
        with contextlib.suppress(OSError):
            os.chdir(old)
    assert "\n" not in message and len(message) < 600, message
    return message
