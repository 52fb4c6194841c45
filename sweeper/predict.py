"""`python -m sweeper.predict`: the command is in sweeper/best_model/predict.py."""

import sys

from sweeper.best_model.predict import main

if __name__ == "__main__":
    sys.exit(main())
