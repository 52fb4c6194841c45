"""`python -m sweeper +experiment=NAME [overrides]`: run (or resume) one Optuna study."""

import os
import sys

import hydra
from omegaconf import DictConfig

from sweeper.config import check_overrides, to_config, validate
from sweeper.errors import UserError, one_line


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    debug = bool(raw.get("debug")) or os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        cfg = to_config(raw)
        validate(cfg)
        from sweeper.study import run_study  # heavy imports only after the config is sound

        run_study(cfg)
    except UserError as e:
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
        check_overrides(sys.argv[1:])
    except UserError as e:
        print(f"sweeper: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
