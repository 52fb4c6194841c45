"""`python -m sweeper +experiment=NAME [overrides]`: run (or resume) one Optuna study."""

import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweeper.record import stores
from sweeper.settings import sweep_grammar
from sweeper.settings.config import check_composes, check_overrides, to_config, validate
from sweeper.settings.errors import Refused, UserError, one_line


def check_output_folder(argv: list[str]) -> None:
    """Hydra makes its run folder under mlruns/hydra/ before our code runs (unless the command
    line moves it): mlruns/ must be a folder that can be written."""
    mlruns = Path("mlruns")
    if mlruns.is_symlink() and not mlruns.exists():
        raise UserError(f"{mlruns.absolute()} is a symbolic link that leads nowhere (a loop, or "
                        "its target is gone): the runtime folder mlruns/ must be a folder; fix "
                        "or remove the link")
    if mlruns.exists() and not mlruns.is_dir():
        raise UserError(f"{mlruns.resolve()} is a file: the runtime folder mlruns/ "
                        "must be a folder; move the file away")
    if not any(a.startswith(("hydra.run.dir=", "hydra/")) for a in argv):
        stores.prepare_folder(mlruns / "hydra", "the runtime folder mlruns/")


def remove_run_folder(folder: Path, job: str) -> None:
    """What Hydra wrote for this run (.hydra/ and the job's log), then the folder and its
    parents while they are empty: never anything else (hydra.run.dir may be `.`)."""
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    (folder / f"{job}.log").unlink(missing_ok=True)
    for parent in [folder.resolve(), *folder.resolve().parents]:
        if parent == Path.cwd().resolve():
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def preflight(argv: list[str]) -> list[str]:
    """The checks of a plain run before Hydra starts: the arguments Hydra then reads."""
    argv = sweep_grammar.rewrite(argv)  # Hydra then reads the dict form
    # With Hydra's own flags (--cfg job, --info, -cn NAME, --multirun, ...) Hydra reads the
    # command line itself; our one-line checks are for a plain run.
    if not any(a.startswith("-") for a in argv):
        check_overrides(argv)
        check_composes(argv)
    check_output_folder(argv)
    return argv


def start(raw: DictConfig) -> None:
    """The run, once Hydra has composed its config (tests call preflight and this in-process)."""
    try:
        cfg = to_config(raw)
        validate(cfg)
    except UserError as e:
        raise Refused(str(e)) from None
    from sweeper.loop.study import run_study  # heavy imports only after the config is sound

    run_study(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    debug = bool(raw.get("debug")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        start(raw)
    except UserError as e:
        if isinstance(e, Refused):  # nothing was written: the run leaves no folder behind
            hc = HydraConfig.get()
            remove_run_folder(Path(hc.runtime.output_dir), hc.job.name)
        if debug:
            raise
        print(f"sweeper: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # a real failure, not the user's: its own message, exit 1
        if debug:
            raise
        print(f"sweeper: error: {one_line(e, 500)} (debug=true shows the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
    except UserError as e:
        print(f"sweeper: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
