"""The unit cards' small charts, drawn in numpy for a block of units at once: each unit's
convolution kernels as a tile grid, and the bar chart of its per-image maxima.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from pipeline.render.text import CARD_BG


@lru_cache(maxsize=1)
def diverging_lut() -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps["RdBu_r"](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def weight_tiles(kernels: np.ndarray, scale: float, side_px: int, rgb: bool = False) -> tuple[np.ndarray, int]:
    """Kernels of a block of units (B, kh, kw, n) -> (B, side_px, side_px, 3) uint8 and how many
    of the n input kernels are shown.

    rgb (first layer, n == 3): each kernel as one colour image, min-max over the layer
    (`scale` is unused then; the caller passes the layer's range through the kernels).
    Otherwise the n input kernels lie in a square grid, row-major, coloured on a
    blue-white-red map symmetric about zero (+-scale = the layer's largest |weight|).
    """
    b, kh, kw, n = kernels.shape
    out = np.full((b, side_px, side_px, 3), CARD_BG, np.uint8)
    if rgb:
        f = max(1, side_px // max(kh, kw))
        img = np.clip(np.rint(kernels * 255), 0, 255).astype(np.uint8)
        img = np.repeat(np.repeat(img, f, axis=1), f, axis=2)[:, :side_px, :side_px]
        y0, x0 = (side_px - img.shape[1]) // 2, (side_px - img.shape[2]) // 2
        out[:, y0:y0 + img.shape[1], x0:x0 + img.shape[2]] = img
        return out, n
    gap = 1
    side = max(1, math.ceil(math.sqrt(n)))
    f = (side_px - (side - 1) * gap) // (side * max(kh, kw))
    shown = n
    if f < 1:  # too many inputs to draw one pixel each: the first ones that fit
        side = max(1, (side_px + gap) // (max(kh, kw) + gap))
        f, shown = 1, min(n, side * side)
    lut = diverging_lut()
    unit = np.clip(np.asarray(kernels[..., :shown], np.float32) / max(scale, 1e-12), -1, 1)
    colours = lut[np.rint((unit + 1) * 127.5).astype(np.int64)]  # (B, kh, kw, shown, 3)
    th, tw = kh * f, kw * f
    tiles = np.full((b, side * side, th + gap, tw + gap, 3), CARD_BG, np.uint8)
    grown = np.repeat(np.repeat(colours.transpose(0, 3, 1, 2, 4), f, axis=2), f, axis=3)
    tiles[:, :shown, :th, :tw] = grown
    grid = (tiles.reshape(b, side, side, th + gap, tw + gap, 3).transpose(0, 1, 3, 2, 4, 5)
            .reshape(b, side * (th + gap), side * (tw + gap), 3))[:, :side * (th + gap) - gap, :side * (tw + gap) - gap]
    rows = math.ceil(shown / side)
    grid = grid[:, :rows * (th + gap) - gap]
    y0, x0 = (side_px - grid.shape[1]) // 2, (side_px - grid.shape[2]) // 2
    out[:, y0:y0 + grid.shape[1], x0:x0 + grid.shape[2]] = grid
    return out, shown


def spectrum_bars(counts: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bar charts of a block of spectra (B, buckets) -> (mask (B, height, width) bool, lo, hi).

    Each unit's chart spans its own nonzero buckets [lo, hi] (the zero bucket left out,
    padded by two buckets a side, at least 24 buckets wide); x is linear in bucket
    index, i.e. logarithmic in the value. Bar heights are relative to the unit's
    largest count.
    """
    counts = np.asarray(counts, np.float64)
    b, n = counts.shape
    zero = (n - 1) // 2
    c = counts.copy()
    c[:, zero] = 0
    nz = c > 0
    has = nz.any(axis=1)
    lo = np.where(has, nz.argmax(axis=1), zero + 1)
    hi = np.where(has, n - 1 - nz[:, ::-1].argmax(axis=1), zero + 24)
    lo, hi = np.maximum(lo - 2, 0), np.minimum(hi + 2, n - 1)
    short = (hi - lo + 1) < 24
    mid = (lo + hi) // 2
    lo = np.where(short, np.clip(mid - 12, 0, n - 24), lo)
    hi = np.where(short, lo + 23, hi)
    span = hi - lo + 1
    xs = np.arange(width)
    idx = lo[:, None] + (xs[None, :] * span[:, None]) // width  # (B, width)
    top = np.maximum(c.max(axis=1, keepdims=True), 1)
    bar = np.take_along_axis(c, idx, axis=1) / top * (height - 1)
    bar = np.where(np.take_along_axis(c, idx, axis=1) > 0, np.maximum(bar, 1), 0)
    # a white column where a new bucket starts, when buckets are wide enough to show it
    starts = np.concatenate([np.ones((b, 1), bool), idx[:, 1:] != idx[:, :-1]], axis=1)
    starts &= (width / span[:, None]) >= 4
    rows = (height - 1 - np.arange(height))[None, :, None]  # height above the baseline
    mask = (rows < bar[:, None, :]) & ~starts[:, None, :]
    return mask, lo, hi
