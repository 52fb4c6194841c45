"""Write synthetic phone photos of pen-drawn digits (sweeper.best_model.synthetic_photos: drawn
strokes, not MNIST digits) to try `python -m sweeper.predict` on: each digit 0-9 under another
condition (ruled or squared paper, a shadow, specks, blue pen, a small digit, perspective,
vignetting, JPEG, a mixture), and one photo of two digits side by side, which predict refuses.

    python scripts/photo_examples.py --out /tmp/photos
    python -m sweeper.predict --model export/ /tmp/photos/* --sheet sheet.png
"""

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from sweeper.best_model import synthetic_photos as sp

EXAMPLES = {  # digit: (file name, what the photo shows)
    0: ("0-ruled", replace(sp.BASE, lines="ruled", line_strength=0.8)),
    1: ("1-squared", replace(sp.BASE, lines="squared", line_strength=0.8)),
    2: ("2-shadow", replace(sp.BASE, shadow=0.45)),
    3: ("3-specks", replace(sp.BASE, specks=40)),
    4: ("4-blue-pen", replace(sp.BASE, pen=sp.BLUE_PEN)),
    5: ("5-small", replace(sp.BASE, height=(0.12, 0.12), size=(1600, 1200))),
    6: ("6-tilted", replace(sp.BASE, perspective=0.08)),
    7: ("7-vignette", replace(sp.BASE, vignette=0.45, jpeg=40)),
    8: ("8-mixture", replace(sp.BASE, pen=sp.BLUE_PEN, lines="squared", line_strength=0.6,
                             shadow=0.35, specks=20, perspective=0.04, vignette=0.25, jpeg=60)),
    9: ("9-mixture", replace(sp.BASE, lines="ruled", line_strength=0.7, shadow=0.3, specks=15,
                             perspective=0.03, vignette=0.3, jpeg=70)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for digit, (name, settings) in EXAMPLES.items():
        path = args.out / f"{name}.{'jpg' if settings.jpeg else 'png'}"
        path.write_bytes(sp.encode(sp.render(sp.drawn(digit), settings, rng), settings))
    pair = np.concatenate([sp.drawn(4), np.zeros((150, 40), np.uint8), sp.drawn(7)], axis=1)
    settings = replace(sp.BASE, height=(0.3, 0.3), lines="ruled", jpeg=80)
    (args.out / "47-two-digits.jpg").write_bytes(sp.encode(sp.render(pair, settings, rng),
                                                           settings))
    print(f"{len(EXAMPLES) + 1} photos in {args.out}")


if __name__ == "__main__":
    main()
