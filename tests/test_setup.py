"""Set-up on a fresh machine: `make` picks the newest Python >= 3.11 that runs, and installs the
pinned versions of requirements.lock, which must cover pyproject.toml's dependencies."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")


def fake_python(folder: Path, name: str, works: bool) -> None:
    script = folder / name
    script.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n' if works else
                      "#!/bin/sh\necho 'pyenv: command not found' >&2\nexit 127\n")
    script.chmod(0o755)


def which_python(folder: Path) -> subprocess.CompletedProcess:
    # A PATH with only these interpreters (and echo, which make runs directly).
    (folder / "echo").symlink_to(shutil.which("echo") or "/bin/echo")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"} | {"PATH": str(folder)}
    return subprocess.run([MAKE, "-s", "-C", str(REPO), "which-python"], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(MAKE is None, reason="needs make")
def test_make_picks_the_newest_python_that_runs(tmp_path):
    fake_python(tmp_path, "python3.13", works=False)  # an inactive pyenv shim
    fake_python(tmp_path, "python3.12", works=True)
    fake_python(tmp_path, "python3.11", works=True)
    assert which_python(tmp_path).stdout.strip() == "python3.12"


@pytest.mark.skipif(MAKE is None, reason="needs make")
def test_make_says_clearly_when_no_python_fits(tmp_path):
    fake_python(tmp_path, "python3", works=False)
    result = which_python(tmp_path)
    assert result.returncode != 0
    assert "sweeper needs Python >= 3.11 and none runs here" in result.stderr


def lock() -> dict[str, tuple[str, Marker | None]]:
    """name -> (version, marker) of the lines that apply to this interpreter."""
    out = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
        if req.marker is None or req.marker.evaluate():
            out[canonical(req.name)] = (next(iter(req.specifier)).version, req.marker)
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_dependency_and_this_environment_matches_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]
              + project["optional-dependencies"]["dev"]]
    pinned = lock()
    for req in wanted:
        assert canonical(req.name) in pinned, f"{req.name} is not in requirements.lock"
        assert req.specifier.contains(pinned[canonical(req.name)][0]), req
    assert pinned["torch"][0] == "2.14.1" and pinned["torchvision"][0] == "0.29.1"
    # The tests run with exactly the locked versions (after a dependency change: `make lock`).
    for req in wanted:
        assert metadata.version(req.name) == pinned[canonical(req.name)][0], req.name
