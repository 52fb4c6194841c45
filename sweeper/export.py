"""`python -m sweeper.export`: the command is in sweeper/best_model/export.py."""

import sys

from sweeper.best_model.export import main

if __name__ == "__main__":
    sys.exit(main())
