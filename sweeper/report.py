"""`python -m sweeper.report`: the command is in sweeper/analysis/report.py."""

import sys

from sweeper.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
