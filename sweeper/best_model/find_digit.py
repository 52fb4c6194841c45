"""Find the one digit in a photo or a drawing, the way document scanners do (OpenCV):

1. flatten uneven light: the paper's brightness is estimated over a large neighbourhood (a
   grey closing, which erases strokes thinner than a third of the image) and divided out, so a
   shadow or vignetting leaves the paper white;
2. ink by local contrast: how much darker a pixel is than the paper around it (or lighter than
   a dark ground: the polarity that finds the stronger strokes);
3. ruled or squared lines removed: long thin near-horizontal/vertical structures (openings
   with line-shaped kernels at small tilts); a stroke crossing a line stays whole;
4. specks dropped and the digit's connected component(s) kept: the largest digit-shaped mark,
   with the nearby strokes of the same digit (a 5's top bar written apart).

`find_digit` returns the digit's ink, white on black, cropped to it; MNIST's framing is
sweeper.predict's. An image with no digit-like mark, or with several digit-sized marks side by
side, is refused (NoDigit) rather than guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sweeper.settings.errors import UserError

WORK_SIDE = 1024  # longest side the digit is looked for at (a 12 MP photo is shrunk to this)
BLANK = 0.03  # below this contrast (of the full scale) an image holds no ink
MIN_INK = 0.25  # a digit's strokes are on average this much darker than the paper around them
PAPER_SIDE = 96  # the paper's brightness is estimated on an image this small (short side)
LINE_SIDE = 256  # lines are looked for at this resolution (long side)
LINE_LENGTH = 0.85  # a line spans at least this fraction of the image's width (or height)
LINE_TILTS = tuple(range(-6, 7))  # degrees: a phone held slightly askew
MERGE_GAP = 0.2  # strokes this close (a fraction of the digit's height) belong to the digit
RIVAL = 0.5  # another mark at least this tall (relative) and a quarter as inky: two digits


class NoDigit(UserError):
    """No single digit found; `view` is what was left after lines and specks (for --sheet)."""

    def __init__(self, message: str, view: np.ndarray):
        super().__init__(message)
        self.view = view
        self.lines = 0  # ruled or squared lines found before the refusal
        self.tight = False  # the image's ink touched all four of its sides


def shrink(grey: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = grey.shape
    if max(h, w) <= side:
        return grey
    s = side / max(h, w)
    return cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))),
                      interpolation=cv2.INTER_AREA)


def local_ink(grey: np.ndarray) -> np.ndarray:
    """Ink by local contrast, whatever the image's polarity: how much darker each pixel is than
    the paper around it (`paper`), or for light ink on a dark ground, how much lighter."""
    if float(grey.max()) - float(grey.min()) < BLANK:
        raise UserError("blank image: no ink found (nothing differs from the background)")
    page = grey if dark_ink(grey) else 1.0 - grey
    ground = paper(page)
    # Against a black ground there is no darker ink: divide by at least a dim grey.
    return np.clip((ground - page) / np.maximum(ground, 0.1), 0, 1)


def dark_ink(grey: np.ndarray) -> bool:
    """Is the ink darker than its ground? The ground is the image's median (most of a page is
    paper, even with the table around it in the photo), ink what differs most from it. Where
    both directions differ much (a shadow over half the page is darker than the paper by as
    much as the ink is), the ground is a median over a large neighbourhood instead, which moves
    with the shadow."""
    import cv2

    level = float(np.median(grey[::2, ::2]))
    darker, lighter = level - float(grey.min()), float(grey.max()) - level
    if min(darker, lighter) < 0.5 * max(darker, lighter):
        return darker >= lighter
    h, w = grey.shape
    f = max(1, min(h, w) // PAPER_SIDE)
    small = cv2.resize(grey, (w // f, h // f), interpolation=cv2.INTER_AREA) if f > 1 else grey
    k = max(3, min(small.shape) // 3) | 1
    median = cv2.medianBlur((np.clip(small, 0, 1) * 255).astype(np.uint8), k)
    # Only where the ground itself is smooth: not near the table's edge or a shadow's (the
    # median cuts a page's corners: half its square further).
    steep = cv2.morphologyEx(median, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)) > 25
    steep = cv2.dilate(steep.astype(np.uint8), np.ones((k // 2 | 1, k // 2 | 1), np.uint8)) > 0
    ground: np.ndarray = median / np.float32(255)
    if f > 1:
        ground = cv2.resize(ground, (w, h), interpolation=cv2.INTER_LINEAR)
        steep = cv2.resize(steep.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    # What differs most from it, either way, ignoring 1-2 px specks and noise (a 3x3 median).
    differs = cv2.medianBlur(((grey - ground + 1) * 127.5).astype(np.uint8), 3)[~steep]
    if not differs.size:
        return darker >= lighter
    return int(differs.min()) + int(differs.max()) <= 255


def paper(grey: np.ndarray) -> np.ndarray:
    """The paper's brightness under each pixel: a grey closing (max then min filter) with a
    square a third of the image's short side, on a small copy, smoothed and scaled back."""
    import cv2

    h, w = grey.shape
    f = max(1, min(h, w) // PAPER_SIDE)
    small = cv2.resize(grey, (w // f, h // f), interpolation=cv2.INTER_AREA) if f > 1 else grey
    k = max(3, min(small.shape) // 3) | 1
    square = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    # Padded first: the closing's second step must see the first step's result beyond the edge,
    # or the paper's level near the edges of a vignetted photo is taken from further in.
    padded = cv2.copyMakeBorder(small, k, k, k, k, cv2.BORDER_REPLICATE)
    bg = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, square)[k:-k, k:-k]
    # Smoothed a little (its plateaus), replicating the border: a reflected one would raise the
    # paper's level at the edges of a vignetted photo.
    bg = cv2.GaussianBlur(bg, (0, 0), 1.0, borderType=cv2.BORDER_REPLICATE)
    # Then the darker side of a sharp edge (the table beside a photographed page) kept dark:
    # smoothing and scaling would smear the page's brightness onto it, and it would read as ink.
    bg = cv2.erode(bg, np.ones((5, 5), np.uint8), borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR) if f > 1 else bg


def line_kernel(length: int, degrees: float) -> np.ndarray:
    import cv2

    rise = round(length * np.tan(np.radians(degrees)))
    kernel = np.zeros((abs(rise) + 1, length), np.uint8)
    y0, y1 = (0, abs(rise)) if rise >= 0 else (abs(rise), 0)
    cv2.line(kernel, (0, y0), (length - 1, y1), 1, 1)
    return kernel


def horizontal_lines(mask: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Where `mask` (uint8 0/1) has long thin near-horizontal lines, their thickness in px, and
    how many there are.
    At low resolution (max-pooled), straight runs a quarter of the width long at each small
    tilt (openings with line kernels) are joined; what spans nearly the whole width and is thin
    for its length is a line where there are two or more (ruled paper) or one across all of
    it. A digit's own strokes are shorter than the image they are drawn in, even in a tight
    drawing."""
    import cv2

    h, w = mask.shape
    p = max(1, round(max(h, w) / LINE_SIDE))
    small = cv2.resize(mask, (-(-w // p), -(-h // p)), interpolation=cv2.INTER_AREA) \
        if p > 1 else mask
    pooled: np.ndarray = (small > 0).astype(np.uint8)
    # Bridge small gaps (a line fainter in places).
    pooled = cv2.morphologyEx(pooled, cv2.MORPH_CLOSE, np.ones((1, 3), np.uint8))
    width = pooled.shape[1]
    runs: np.ndarray = np.zeros_like(pooled)
    for degrees in LINE_TILTS:
        runs |= cv2.morphologyEx(pooled, cv2.MORPH_OPEN, line_kernel(max(3, width // 4), degrees))
    _, labels, stats, _ = cv2.connectedComponentsWithStats(runs, connectivity=8)
    spans = stats[1:, cv2.CC_STAT_WIDTH]
    thick = stats[1:, cv2.CC_STAT_AREA] / np.maximum(spans, 1)
    long = (spans >= LINE_LENGTH * width) & (spans >= 12 * thick)
    keep = long & ((spans >= 0.95 * width) | (long.sum() >= 2))
    if not keep.any():
        return np.zeros_like(mask), 0.0, 0
    region: np.ndarray = np.isin(labels, 1 + np.flatnonzero(keep)).astype(np.uint8)
    if p > 1:
        region = cv2.resize(region, (w, h), interpolation=cv2.INTER_NEAREST)
    region = cv2.dilate(region, np.ones((3, 3), np.uint8))
    return region, float((region & mask).sum() / (p * spans[keep].sum())), int(keep.sum())


def remove_lines(mask: np.ndarray, loose: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """`mask` without ruled or squared lines (found on the looser `loose` mask), the removed
    pixels, and how many lines were found. Within a line's band only what is no thicker than
    the line goes: a stroke crossing it, or lying along it, is taller than the line and
    stays."""
    import cv2

    lines, count = np.zeros_like(mask), 0
    for axis in (0, 1):  # rows, then columns (the same on the transposed image)
        m, lo = (mask, loose) if axis == 0 else (mask.T, loose.T)
        region, thickness, n = horizontal_lines(np.ascontiguousarray(lo))
        count += n
        if thickness:
            across = np.ones((math.ceil(thickness) + 2, 1), np.uint8)
            thicker: np.ndarray = cv2.morphologyEx(np.ascontiguousarray(m), cv2.MORPH_OPEN, across)
            found = region & lo & ~thicker & 1
            lines |= found if axis == 0 else found.T
    return mask & ~lines & 1, lines, count


def pick_digit(mask: np.ndarray, ink: np.ndarray, faint: float) -> np.ndarray:
    """Labels of the digit's connected components in `mask`: the largest digit-shaped mark (at
    least a third as tall as wide, on average darker than `faint`) with the strokes close to
    it; NoDigit for none or several."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    x, y, w, h, area = (stats[1:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP,
                                              cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT,
                                              cv2.CC_STAT_AREA))
    darkness = np.bincount(labels.ravel(), ink.ravel(), n)[1:] / np.maximum(area, 1)
    # The table around a photographed page, or the page's edge: a mark lying along a side of
    # the image for half its length or more (a digit's stroke only ends there).
    along = [np.bincount(labels[i], minlength=n)[1:] for i in (0, -1)]
    across = [np.bincount(labels[:, i], minlength=n)[1:] for i in (0, -1)]
    edge = (np.maximum(*along) >= w / 2) | (np.maximum(*across) >= h / 2)
    shaped = (h >= 5) & (3 * h >= w) & ~edge & (darkness >= faint)
    if not shaped.any():
        raise NoDigit("no digit found (only specks or lines after cleaning)", mask)
    main = int(np.argmax(np.where(shaped, area, -1)))
    group = {main}
    box = [x[main], y[main], x[main] + w[main], y[main] + h[main]]
    grew = True
    while grew:  # the digit's other strokes: close to it, not specks, still one digit wide
        grew = False
        tall = box[3] - box[1]
        for i in range(n - 1):
            if i in group or max(w[i], h[i]) < 0.15 * tall:
                continue
            gap = max(box[0] - (x[i] + w[i]), x[i] - box[2], box[1] - (y[i] + h[i]),
                      y[i] - box[3])
            union = [min(box[0], x[i]), min(box[1], y[i]), max(box[2], x[i] + w[i]),
                     max(box[3], y[i] + h[i])]
            if gap <= MERGE_GAP * tall and union[2] - union[0] <= 1.5 * (union[3] - union[1]):
                group.add(i)
                box, grew = union, True
    tall, ink = box[3] - box[1], area[list(group)].sum()
    rivals = [i for i in range(n - 1) if i not in group and shaped[i]
              and h[i] >= RIVAL * tall and area[i] >= 0.25 * ink]
    if rivals:
        raise NoDigit(f"several digit-sized marks ({len(rivals) + 1}) side by side: crop the "
                      "image to one digit", mask)
    return np.isin(labels, [1 + i for i in group])


def find_digit(grey: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1], any polarity -> the digit's ink [h, w] in [0, 1], white on black,
    cropped to the digit."""
    grey = shrink(np.asarray(grey, np.float32), WORK_SIDE)
    try:
        found: Found | None = _find(grey)
    except NoDigit as e:
        found, refusal = None, e
    # A drawing cropped tight to its ink has strokes along all four sides of the image, where
    # the rules for ruled lines and a page's edge look: a 7's bar went as a line, a 1 as the
    # page's edge. Such an image, unless it is ruled or squared paper (two lines or more), is
    # read again on a margin of its own ground (the rim's level), and that reading is kept
    # when it finds more of a digit.
    tight, lines = (found.tight, found.lines) if found is not None else (refusal.tight,
                                                                          refusal.lines)
    if not tight or lines >= 2:
        if found is None:
            raise refusal
        return found.ink
    h, w = grey.shape
    m = max(h, w) // 4 + 1
    try:
        wide: Found | None = _find(_pad(grey, m, rim_level(grey)))
    except NoDigit:
        wide = None
    # Kept only where it holds what the first reading found (a tight 7's stem is inside the
    # whole 7): on a photo, a table's edge away from the image's side could otherwise win.
    if wide is not None and (found is None or (wide.ink.size > found.ink.size and contains(
            [v - m for v in wide.box], found.box))):
        return wide.ink
    if found is None:
        raise refusal
    return found.ink


def contains(outer: list[int], inner: list[int], slack: int = 2) -> bool:
    """Does box `outer` (top, left, bottom, right) hold box `inner`, give or take `slack` px?"""
    return (outer[0] <= inner[0] + slack and outer[1] <= inner[1] + slack
            and outer[2] >= inner[2] - slack and outer[3] >= inner[3] - slack)


@dataclass
class Found:
    ink: np.ndarray  # the digit's ink, cropped
    box: list[int]  # where it was: top, left, bottom, right in the image read
    tight: bool  # the image's ink touches all four of its sides
    lines: int  # ruled or squared lines found and removed


def touches_every_side(grey: np.ndarray) -> bool:
    """Something far from the ground's level (the rim's median) on each side of the image: ink
    cut by all four sides, as in a tight crop (or lines, or a table, seen all round)."""
    level, far = rim_level(grey), 0.5 * (float(grey.max()) - float(grey.min()))
    return all(float(np.abs(side - level).max()) >= far
               for side in (grey[0], grey[-1], grey[:, 0], grey[:, -1]))


def rim_level(grey: np.ndarray) -> float:
    """The ground's level as the image's rim shows it (a tight crop may be mostly ink inside)."""
    return float(np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])))


def _pad(grey: np.ndarray, margin: int, level: float) -> np.ndarray:
    import cv2

    return cv2.copyMakeBorder(grey, margin, margin, margin, margin, cv2.BORDER_CONSTANT,
                              value=level)


def _find(grey: np.ndarray) -> Found:
    import cv2

    ink = local_ink(grey)
    # Thresholds relative to the image's darkest ink (a speck-proof maximum) and its noise.
    level = float(cv2.medianBlur((ink * 255).astype(np.uint8), 3).max()) / 255
    level = max(level, float(ink.max()) / 2)
    sample = ink[::3, ::3]  # the paper's noise: a robust spread (MAD), on every 9th pixel
    noise = 1.4826 * float(np.median(np.abs(sample - np.median(sample))))
    mask = (ink > max(0.4 * level, 4 * noise, BLANK)).astype(np.uint8)
    loose = (ink > max(0.15 * level, 4 * noise, BLANK)).astype(np.uint8)
    kept, lines, n_lines = remove_lines(mask, loose)
    tight = touches_every_side(grey)
    try:
        digit = pick_digit(kept, ink, max(MIN_INK, 6 * noise))
    except NoDigit as e:
        e.lines, e.tight = n_lines, tight
        raise
    rows, cols = np.nonzero(digit)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    # The strokes' anti-aliased edges come with them; the lines' pixels do not.
    near = cv2.dilate(digit.astype(np.uint8), np.ones((3, 3), np.uint8)) & ~lines & 1
    out = (ink * near)[max(0, top - 1):bottom + 1, max(0, left - 1):right + 1]
    core = out[digit[max(0, top - 1):bottom + 1, max(0, left - 1):right + 1]]
    return Found(np.clip(out / float(np.percentile(core, 90)), 0, 1),
                 [int(v) for v in (top, left, bottom, right)], tight, n_lines)
