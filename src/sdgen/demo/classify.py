"""Reads a demo picture back into words: object colour, background colour, shape. Pixels only, no model.

  background  the median colour of a 3-pixel frame around the border, named by the nearest palette colour
  object      pixels nearer to the object's colour than to the background's; the object's colour is first
              estimated as the median of the pixels farthest from the background
  shape       the object mask against a circle, a square and an upright triangle fitted to its bounding box:
              the template with the highest overlap (IoU) wins

This is the measure of the demo's prompt following, so it is checked to be right on the dataset's own pictures.
"""

from dataclasses import dataclass

import numpy as np

from .data import PALETTE, SHAPES, shape_mask

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float64)  # (8, 3)


@dataclass(frozen=True)
class Reading:
    colour: str | None       # None when no object stands out from the background
    shape: str | None
    background: str
    area: float              # object pixels, fraction of the picture


def nearest_colour(rgb) -> str:
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)))]


def classify(image) -> Reading:
    """image: a PIL image or an (H, W, 3) uint8 array."""
    px = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    h, w, _ = px.shape
    frame = np.concatenate([px[:3].reshape(-1, 3), px[-3:].reshape(-1, 3),
                            px[:, :3].reshape(-1, 3), px[:, -3:].reshape(-1, 3)])
    bg = np.median(frame, axis=0)
    dist_bg = np.sqrt(((px - bg) ** 2).sum(-1))  # (H, W)
    far = dist_bg > max(60.0, 0.5 * dist_bg.max())
    if far.sum() < 0.002 * h * w:  # fewer than ~33 pixels at 128x128: no object
        return Reading(None, None, nearest_colour(bg), 0.0)
    obj = np.median(px[far], axis=0)
    dist_obj = np.sqrt(((px - obj) ** 2).sum(-1))
    mask = dist_obj < dist_bg
    mask = _largest_component(mask)
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    best, best_iou = None, -1.0
    for shape in SHAPES:  # templates of the shape fitted to the bounding box (stretched to its aspect ratio)
        sx, sy = (x1 - x0) / 2, (y1 - y0) / 2
        t = _stretched(shape, cx, cy, sx, sy, h, w) > 0.5
        iou = (t & mask).sum() / max(1, (t | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(nearest_colour(obj), best, nearest_colour(bg), float(mask.mean()))


def _stretched(shape, cx, cy, sx, sy, h, w):
    """A template of half-width sx and half-height sy centred at (cx, cy), on an (h, w) grid."""
    side = max(h, w)
    m = shape_mask(shape, side / 2, side / 2, side / 4, side=side, supersample=1)  # unit template, half = side/4
    ys = ((np.arange(h) + 0.5 - cy) / max(sy, 0.5)) * (side / 4) + side / 2
    xs = ((np.arange(w) + 0.5 - cx) / max(sx, 0.5)) * (side / 4) + side / 2
    yi = np.clip(np.floor(ys).astype(int), 0, side - 1)
    xi = np.clip(np.floor(xs).astype(int), 0, side - 1)
    inside = ((ys >= 0) & (ys < side))[:, None] & ((xs >= 0) & (xs < side))[None, :]
    return m[yi][:, xi] * inside


def _largest_component(mask):
    """The largest 4-connected region of a boolean mask: stray pixels of a blurry picture do not stretch the box."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


def score(readings, expected) -> dict:
    """Fractions right: {"colour", "background", "shape"} over pairs of Reading and (colour, shape, background)."""
    n = max(1, len(expected))
    return {"colour": sum(r.colour == e[0] for r, e in zip(readings, expected)) / n,
            "shape": sum(r.shape == e[1] for r, e in zip(readings, expected)) / n,
            "background": sum(r.background == e[2] for r, e in zip(readings, expected)) / n}
