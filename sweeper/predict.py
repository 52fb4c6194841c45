"""`python -m sweeper.predict [--model DIR] [--sheet FILE] IMAGE...`: read digits from your own
photos or drawings with an exported model (default: the last `sweeper.export`).

Each image is prepared the way MNIST's digits were made: greyscale; polarity detected from the
border and made white-on-black; cropped to the ink's bounding box; the longest side scaled to
20 px keeping the aspect ratio; placed in 28x28 with its centre of mass at the centre.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from sweeper.errors import UserError, one_line

LAST_EXPORT = Path("mlruns/last_export")  # written by sweeper.export: the default model
INK = 0.2  # fraction of the ink/background contrast above which a pixel counts as ink
BLANK = 0.03  # below this contrast (of the full scale) an image holds no ink


def load_image(path: Path) -> np.ndarray:
    """Greyscale float [H, W] in [0, 1], at the image's own bit depth. A drawing on a
    transparent background (what drawing apps export) is read from its opacity: the strokes
    are what is opaque, whatever their colour."""
    from PIL import Image, UnidentifiedImageError

    if path.is_dir():
        raise UserError("is a folder, not an image")
    try:
        with Image.open(path) as im:
            im.seek(0)  # first frame of a GIF
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale
                grey = np.asarray(im, dtype=np.float64)
                return (grey / (65535.0 if im.mode.startswith("I;16") or grey.max() <= 65535
                                else grey.max())).clip(0, 1).astype(np.float32)
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255
    except FileNotFoundError:
        raise UserError("file not found") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"image too large to read safely ({one_line(e, 120)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"not a readable image ({one_line(e, 120)})") from None
    alpha = rgba[..., 3]
    if alpha.min() < 0.5 * alpha.max():  # transparent background: ink = opacity
        return 1.0 - alpha  # dark strokes on white paper, as if drawn in black
    grey = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)  # as PIL's "L"
    return grey * alpha + (1.0 - alpha)  # partly transparent pixels over white paper


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1], any polarity -> uint8 [28, 28], white digit on black, MNIST framing."""
    from PIL import Image

    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    # Ink is what differs from the background, in whichever direction the image has room:
    # by contrast, not by absolute level (a mid-grey digit on a grey page still counts).
    darker, lighter = background - grey, grey - background
    ink = darker if darker.max() > lighter.max() else lighter
    contrast = float(ink.max())
    if contrast < BLANK:
        raise UserError("blank image: no ink found (nothing differs from the background)")
    ink = np.clip(ink / contrast, 0, 1)
    rows, cols = np.nonzero(ink > INK)
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).resize(
        size, Image.Resampling.LANCZOS), dtype=np.float32) / 255
    small = np.clip(small, 0, 1)
    # Centre of mass to the centre of the 28x28 field, as MNIST did.
    ys, xs = np.indices(small.shape)
    mass = small.sum()
    cy, cx = (ys * small).sum() / mass, (xs * small).sum() / mass
    top, left = round(14 - cy), round(14 - cx)
    out = np.zeros((28, 28), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + small.shape[0], 28), min(left + small.shape[1], 28)
    out[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
    return (out * 255).round().astype(np.uint8)


def load_model(folder: Path | None):
    import torch

    if folder is None:
        if not LAST_EXPORT.is_file():
            raise UserError("no model: export one first (python -m sweeper.export --study NAME "
                            "--out DIR) or pass --model DIR")
        folder = Path(LAST_EXPORT.read_text().strip())
    path = folder / "model.pt2"
    if not path.is_file():
        older = " (model.pt there is an older TorchScript export: export it again)" if (
            folder / "model.pt").is_file() else ""
        raise UserError(f"{path}: no exported model there{older}; python -m sweeper.export "
                        "writes it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter on load
            return torch.export.load(str(path)).module()  # evaluation mode as exported
    except Exception as e:  # truncated, damaged or not a torch.export file
        raise UserError(f"{path}: not a loadable exported model ({one_line(e, 120)}); export "
                        "it again") from None


def check_sheet(path: Path) -> None:
    """Before any image is read: a format matplotlib writes, in a folder that can be written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = plt.gcf().canvas.get_supported_filetypes()
    plt.close()
    if path.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"--sheet {path}: unknown picture format {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join('.' + f for f in sorted(formats))}")
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--sheet {path}: cannot write there")


def contact_sheet(path: Path, items: list[tuple[str, np.ndarray, int, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image, digit, p) in zip(axes.ravel(), items, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name[:14]}\n{digit} ({100 * p:.0f}%)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeper.predict",
                                 description="Read digits from your own images.")
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, help="an export folder (default: the last export)")
    ap.add_argument("--sheet", type=Path, help="write the 28x28 inputs and predictions here")
    args = ap.parse_args(argv)
    import torch

    try:
        if args.sheet is not None:
            check_sheet(args.sheet)
        model = load_model(args.model)
    except UserError as e:
        print(f"sweeper.predict: error: {e}", file=sys.stderr)
        return 2
    failed, sheet = 0, []
    for path in args.images:
        try:
            image = to_mnist(load_image(path))
        except Exception as e:  # one bad file never stops the rest
            print(f"{path}: error: {e if isinstance(e, UserError) else one_line(e, 160)}",
                  file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            x = torch.from_numpy(image).float().div(255)[None, None]
            p = torch.softmax(model(x), 1)[0].numpy()
        first, second = np.argsort(-p)[:2]
        print(f"{path}: {first} ({100 * p[first]:.1f}%), runner-up {second} "
              f"({100 * p[second]:.1f}%)")
        sheet.append((path.name, image, int(first), float(p[first])))
    if args.sheet and sheet:
        contact_sheet(args.sheet, sheet)
        print(f"contact sheet of what the model saw: {args.sheet}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
