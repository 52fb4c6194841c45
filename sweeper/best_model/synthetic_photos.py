"""Synthetic phone photos of a digit, to test and benchmark `sweeper.predict` on what a camera
gives: a 28x28 MNIST-style digit (white on black) written in pen on notebook paper, then
photographed with uneven light, dust, a tilted phone, the table around the page and JPEG
compression.

Each condition of issue 33 comes at three strengths (CONDITIONS); `mixture` draws all of them
at once at random strengths. `render(digit, settings, rng)` returns RGB uint8, `encode` the
bytes of the file a phone would save.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

BLACK_PEN = (0.10, 0.10, 0.12)  # transmittance per RGB channel: what the ink lets through
BLUE_PEN = (0.12, 0.22, 0.70)
PENCIL = (0.45, 0.45, 0.47)
RULED_BLUE = (0.55, 0.72, 0.95)  # notebook lines, at full strength
GRID_GREY = (0.55, 0.62, 0.72)


@dataclass(frozen=True)
class Photo:
    size: tuple[int, int] = (640, 480)  # width, height of the photo
    height: tuple[float, float] = (0.5, 0.7)  # the digit's height, a fraction of the photo's
    pen: tuple[float, float, float] = BLACK_PEN
    lines: str = "none"  # none | ruled | squared
    line_strength: float = 0.5  # how dark the lines are (0: invisible, 1: the colour itself)
    shadow: float = 0.0  # the shadowed side is this much darker (soft edge, random direction)
    specks: int = 0  # dust specks of 1-2 px
    perspective: float = 0.0  # each corner moved by up to this fraction of the side
    table: float = 0.0  # the page drawn this much smaller (per side), a dark table around it
    vignette: float = 0.0  # corners this much darker
    jpeg: int = 0  # JPEG quality (0: PNG)
    noise: float = 0.01  # sensor noise (standard deviation)


BASE = Photo(height=(0.2, 0.6))  # the other conditions: a digit of 20-60% of the height
CONDITIONS: dict[str, list[Photo]] = {
    "clean": [Photo()],
    "small": [replace(BASE, height=h) for h in ((0.25, 0.30), (0.18, 0.25), (0.12, 0.18))],
    "ruled": [replace(BASE, lines="ruled", line_strength=s) for s in (0.4, 0.7, 1.0)],
    "squared": [replace(BASE, lines="squared", line_strength=s) for s in (0.4, 0.7, 1.0)],
    "shadow": [replace(BASE, shadow=s) for s in (0.2, 0.35, 0.5)],
    "specks": [replace(BASE, specks=n) for n in (10, 20, 40)],
    "pen": [replace(BASE, pen=p) for p in (BLUE_PEN, (0.30, 0.40, 0.80), PENCIL)],
    "perspective": [replace(BASE, perspective=p) for p in (0.03, 0.06, 0.10)],
    "vignette": [replace(BASE, vignette=v) for v in (0.2, 0.35, 0.5)],
    "table": [replace(BASE, table=t, perspective=0.03) for t in (0.04, 0.08, 0.12)],
    "jpeg": [replace(BASE, jpeg=q) for q in (80, 50, 25)],
    "mixture": [Photo()],  # drawn at random per photo by mixture()
}


def _arc(cx: float, cy: float, ax: float, ay: float, start: float = 0, end: float = 360,
         ) -> list[tuple[int, int]]:
    t = np.radians(np.linspace(start, end, 25))
    return [(round(cx + ax * np.cos(a)), round(cy + ay * np.sin(a))) for a in t]


# Digits drawn as pen strokes (x, y on a 100x150 canvas), not taken from MNIST: for tests and
# examples that may be shown or committed.
STROKES = {
    0: [_arc(50, 75, 34, 62)],
    1: [[(30, 35), (60, 10), (58, 140)]],
    2: [[(15, 40), (35, 12), (70, 12), (85, 40), (70, 75), (15, 135), (88, 135)]],
    3: [[(15, 20), (75, 15), (45, 65), (80, 90), (75, 125), (45, 138), (12, 125)]],
    4: [[(60, 10), (15, 90), (85, 90)], [(62, 40), (62, 130)]],
    5: [[(78, 12), (32, 12)],  # the top bar apart from the rest, as many people write it
        [(30, 24), (26, 62), (55, 55), (80, 75), (78, 110), (50, 130), (20, 115)]],
    6: [[(72, 12), (35, 50), (20, 100)], _arc(50, 105, 30, 30)],
    7: [[(15, 15), (85, 15), (40, 130)], [(35, 72), (75, 72)]],  # with a cross stroke
    8: [_arc(50, 42, 27, 30), _arc(50, 105, 33, 33)],
    9: [_arc(48, 45, 30, 30), [(78, 45), (72, 138)]],
}


def drawn(digit: int) -> np.ndarray:
    """A digit drawn in strokes, white on black, uint8 [150, 100]."""
    import cv2

    canvas = np.zeros((150, 100), np.uint8)
    for stroke in STROKES[digit]:
        cv2.polylines(canvas, [np.array(stroke, np.int32)], False, 255, 14, cv2.LINE_AA)
    return canvas


# A stand-in digit of 1/255 ink, invisible: `render` makes of it a photo of an empty page (lines
# spaced as for a digit of that size).
EMPTY = np.ones((28, 20), np.uint8)


def pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two 28x28 digits side by side, 12 px apart (~40% of their height)."""
    return np.concatenate([a, np.zeros((28, 12), np.uint8), b], axis=1)


def mixture(rng: np.random.Generator) -> Photo:
    """A real-looking photo: every condition at once, each at a random strength."""
    return Photo(size=(640, 480) if rng.random() < 0.5 else (480, 640),
                 height=(0.15, 0.5),
                 pen=(BLACK_PEN, BLUE_PEN)[int(rng.integers(2))],
                 lines=("none", "ruled", "squared")[int(rng.integers(3))],
                 line_strength=float(rng.uniform(0.3, 0.8)),
                 shadow=float(rng.uniform(0, 0.4)), specks=int(rng.integers(0, 25)),
                 perspective=float(rng.uniform(0, 0.04)), vignette=float(rng.uniform(0, 0.35)),
                 table=float(rng.uniform(0, 0.1)) * (rng.random() < 0.5),
                 jpeg=int(rng.integers(40, 90)), noise=float(rng.uniform(0.005, 0.02)))


def settings(condition: str, strength: int, rng: np.random.Generator) -> Photo:
    return mixture(rng) if condition == "mixture" else CONDITIONS[condition][strength]


def _lines(shape: tuple[int, int], spacing: float, horizontal: bool, vertical: bool,
           rng: np.random.Generator) -> np.ndarray:
    """Coverage [H, W] in [0, 1] of 1-2 px lines every `spacing` px, anti-aliased."""
    import cv2

    h, w = shape
    cover = np.zeros(shape, np.float32)
    width = int(rng.integers(1, 3))
    shift = 4  # cv2 draws at 1/16 px
    if horizontal:
        for y in np.arange(rng.uniform(0, spacing), h, spacing):
            cv2.line(cover, (0, round(y * 16)), (w * 16, round(y * 16)), 1.0, width,
                     cv2.LINE_AA, shift)
    if vertical:
        for x in np.arange(rng.uniform(0, spacing), w, spacing):
            cv2.line(cover, (round(x * 16), 0), (round(x * 16), h * 16), 1.0, width,
                     cv2.LINE_AA, shift)
    return cover


def render(digit: np.ndarray, s: Photo, rng: np.random.Generator) -> np.ndarray:
    """A digit (28x28 uint8, white on black) as a phone photo: RGB uint8 [H, W, 3]."""
    import cv2

    w, h = s.size
    paper = np.array([0.96, 0.95, 0.91], np.float32) * rng.uniform(0.9, 1.0)
    page = np.ones((h, w, 3), np.float32) * paper
    # Multiplicative layers (what each lets through), as pen and print on paper.
    rows, cols = np.nonzero(digit > 0)
    box = digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    margin = round(0.08 * min(w, h))  # a tilted phone must not cut the digit off
    scale = min(rng.uniform(*s.height) * h / box.shape[0], (w - 2 * margin) / box.shape[1])
    dw, dh = max(1, round(box.shape[1] * scale)), max(1, round(box.shape[0] * scale))
    ink = np.clip(cv2.resize(box.astype(np.float32) / 255, (dw, dh),
                             interpolation=cv2.INTER_CUBIC), 0, 1)
    if s.lines != "none":
        spacing = rng.uniform(0.5, 0.9) * dh if s.lines == "ruled" else rng.uniform(0.25, 0.4) * dh
        spacing = max(spacing, 0.04 * h)
        colour = np.array(RULED_BLUE if s.lines == "ruled" else GRID_GREY, np.float32)
        cover = _lines((h, w), spacing, True, s.lines == "squared", rng) * s.line_strength
        page *= 1 - cover[..., None] * (1 - colour)
    y0 = int(rng.integers(0, max(1, h - dh - 2 * margin + 1))) + min(margin, (h - dh) // 2)
    x0 = int(rng.integers(0, max(1, w - dw - 2 * margin + 1))) + min(margin, (w - dw) // 2)
    region = page[y0:y0 + dh, x0:x0 + dw]
    region *= 1 - ink[..., None] * (1 - np.array(s.pen, np.float32))
    if s.specks:
        dots = np.zeros((h, w), np.float32)
        for _ in range(s.specks):
            centre = (int(rng.integers(0, w * 16)), int(rng.integers(0, h * 16)))
            cv2.circle(dots, centre, int(rng.uniform(0.5, 1.0) * 16), rng.uniform(0.5, 0.9), -1,
                       cv2.LINE_AA, 4)
        page *= 1 - dots[..., None]
    if s.perspective or s.table:
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
        inward = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float32) * s.table * [w, h]
        moved = corners + inward + rng.uniform(-1, 1, (4, 2)).astype(np.float32) * (
            s.perspective * np.array([w, h], np.float32))
        warp = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
        if s.table:  # the page lies on a dark table that fills the rest of the photo
            table = np.ones((h, w, 3), np.float32) * rng.uniform(0.15, 0.45) * np.array(
                [1.0, 0.85, 0.7], np.float32)
            page = cv2.warpPerspective(page, warp, (w, h), dst=table, flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_TRANSPARENT)
        else:
            page = cv2.warpPerspective(page, warp, (w, h), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REFLECT)
    xs = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]  # -0.5 .. 0.5 across
    ys = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    light = np.ones((h, w), np.float32)
    if s.shadow:  # a soft-edged shadow from one side, in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        along = xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle))
        edge, soft = np.float32(rng.uniform(-0.2, 0.2)), np.float32(rng.uniform(0.05, 0.15))
        light *= 1 - np.float32(s.shadow) / (1 + np.exp(-(along - edge) / soft))
    if s.vignette:
        light *= 1 - np.float32(s.vignette) * (xs ** 2 + ys ** 2) / np.float32(0.5)
    page *= light[..., None]
    page += rng.standard_normal(page.shape, dtype=np.float32) * np.float32(s.noise)
    return (np.clip(page, 0, 1) * 255).round().astype(np.uint8)


def encode(rgb: np.ndarray, s: Photo) -> bytes:
    """The file a phone would save: JPEG at the photo's quality, else PNG."""
    from PIL import Image

    buf = io.BytesIO()
    if s.jpeg:
        Image.fromarray(rgb).save(buf, format="JPEG", quality=s.jpeg)
    else:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)  # quick to write
    return buf.getvalue()


def write_photos(digits: np.ndarray, condition: str, strength: int, rng: np.random.Generator,
                 folder: Path) -> list[Path]:
    """Each digit as a photo file in `folder` (JPEG or PNG, as the condition says)."""
    paths = []
    for i, digit in enumerate(digits):
        s = settings(condition, strength, rng)
        path = folder / f"{condition}-{strength}-{i}.{'jpg' if s.jpeg else 'png'}"
        path.write_bytes(encode(render(digit, s, rng), s))
        paths.append(path)
    return paths
