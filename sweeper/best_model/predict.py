"""`python -m sweeper.predict [--model DIR] [--sheet FILE] IMAGE...`: read digits from your own
photos or drawings with an exported model (default: the last `sweeper.export`).

Each image is read at most WORK_SIDE px a side (a JPEG is decoded at 1/2, 1/4 or 1/8 scale
straight away), the digit is found in it as a document scanner would (sweeper.best_model.find_digit:
uneven light flattened, ink by local contrast, ruled lines and specks removed, the digit's
strokes kept), then framed the way MNIST's digits were made: the longest side scaled to 20 px
keeping the aspect ratio, placed in 28x28 with its centre of mass at the centre.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from sweeper.best_model.find_digit import WORK_SIDE, NoDigit, find_digit, shrink
from sweeper.settings.errors import UserError, one_line

LAST_EXPORT = Path("mlruns/last_export")  # written by sweeper.export: the default model
INK = 0.2  # fraction of the digit's ink level above which a pixel counts for the framing box
# Decoding costs up to 4 bytes a pixel before the image can be shrunk (a JPEG excepted: it is
# shrunk while decoding), so larger images are refused: 50 MP is 200 MB.
MAX_PIXELS = 50_000_000


def read_image(path: Path) -> tuple[np.ndarray, int]:
    """Greyscale float [H, W] in [0, 1], at most WORK_SIDE a side, at the image's own bit
    depth; and how many frames the file holds (only the first is read). A drawing on a
    transparent background (what drawing apps export) is read from its opacity: the strokes
    are what is opaque, whatever their colour."""
    from PIL import Image, JpegImagePlugin, UnidentifiedImageError

    if path.is_dir():
        raise UserError("is a folder, not an image")
    try:
        with warnings.catch_warnings():  # our own size limit below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            # A phone's JPEG may be an MPO (Pillow's name for a JPEG with a preview or gain map
            # as a second "frame"): a JPEG all the same, shrunk while decoding, one picture.
            jpeg = isinstance(im, JpegImagePlugin.JpegImageFile)
            frames = 1 if jpeg else getattr(im, "n_frames", 1)
            im.seek(0)  # first frame of a GIF
            w, h = im.size
            if jpeg and max(w, h) > WORK_SIDE:
                s = WORK_SIDE / max(w, h)
                im.draft(None, (math.ceil(w * s), math.ceil(h * s)))
            if im.width * im.height > MAX_PIXELS:
                raise UserError(f"image too large: {w}x{h} is {w * h / 1e6:.0f} megapixels; "
                                f"predict reads up to {MAX_PIXELS // 1_000_000} (a JPEG of any "
                                "size: it is shrunk while decoding); scale it down first")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale
                grey = np.asarray(im, dtype=np.float32)
                top = 65535 if im.mode.startswith("I;16") or grey.max() <= 65535 else grey.max()
                return shrink(np.clip(grey / np.float32(top), 0, 1), WORK_SIDE), frames
            clear = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
            small = im.convert("RGBA" if clear else "L")
            small.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS, reducing_gap=2.0)
            # A phone stores a portrait photo sideways and says so in its EXIF orientation (the
            # same turns as PIL.ImageOps.exif_transpose, done on the small copy).
            t = Image.Transpose
            turn = {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE,
                    6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90}.get(
                        im.getexif().get(0x0112, 1))
            pixels = np.asarray(small if turn is None else small.transpose(turn),
                                dtype=np.float32) / 255
    except FileNotFoundError:
        raise UserError("file not found") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"image too large to read safely ({one_line(e, 120)})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"not a readable image ({one_line(e, 120)})") from None
    if not clear:
        return pixels, frames
    alpha = pixels[..., 3]
    if alpha.min() < 0.5 * alpha.max():  # transparent background: ink = opacity
        return 1.0 - alpha, frames  # dark strokes on white paper, as if drawn in black
    luma = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)  # as PIL's "L"
    return luma * alpha + (1.0 - alpha), frames  # partly transparent pixels over white paper


def load_image(path: Path) -> np.ndarray:
    return read_image(path)[0]


def to_mnist(grey: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1], any polarity -> uint8 [28, 28], white digit on black, MNIST framing."""
    return mnist_framing(find_digit(grey))


def mnist_framing(ink: np.ndarray) -> np.ndarray:
    """A digit's ink (white on black, [0, 1]) -> uint8 [28, 28] as MNIST framed its digits: the
    box of its ink scaled to 20 px on the longest side, centre of mass at the centre."""
    from PIL import Image

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
    # torch.export logs a damaged file's traceback (13 lines) before it raises: said in one line
    logging.getLogger("torch.export").setLevel(logging.CRITICAL)
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


def contact_sheet(path: Path, items: list[tuple[str, np.ndarray, str]]) -> None:
    """Each image as the model saw it (28x28), or for a refused one what was left of it after
    lines and specks were removed, titled with its name and the prediction or refusal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image, caption) in zip(axes.ravel(), items, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=max(1, int(image.max())))
        ax.set_title(f"{name[:14]}\n{caption}", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sweeper.predict",
                                 description="Read digits from your own images.")
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--model", type=Path, help="an export folder (default: the last export)")
    ap.add_argument("--sheet", type=Path, help="write the 28x28 inputs and predictions here "
                    "(for a refused image: what was left of it)")
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
        frames = 1
        try:
            grey, frames = read_image(path)
            image = to_mnist(grey)
        except Exception as e:  # one bad file never stops the rest
            why = e if isinstance(e, UserError) else one_line(e, 160)
            only = f" (only frame 1 of {frames} was read)" if frames > 1 else ""
            print(f"{path}: error: {why}{only}", file=sys.stderr)
            if isinstance(e, NoDigit):  # show what was left of it, so one sees why
                view = shrink(e.view.astype(np.float32), 160)
                sheet.append((path.name, view, "no digit" if "no digit" in str(e)
                              else "several marks"))
            failed += 1
            continue
        with torch.no_grad():
            x = torch.from_numpy(image).float().div(255)[None, None]
            p = torch.softmax(model(x), 1)[0].numpy()
        first, second = np.argsort(-p)[:2]
        print(f"{path}: {first} ({100 * p[first]:.1f}%), runner-up {second} "
              f"({100 * p[second]:.1f}%)")
        sheet.append((path.name, image, f"{first} ({100 * p[first]:.0f}%)"))
    if args.sheet and sheet:
        contact_sheet(args.sheet, sheet)
        print(f"contact sheet of what the model saw: {args.sheet}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
