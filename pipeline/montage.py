"""Pure numpy composition of patch images: area resizing and montages.

Shared by the report's sheets and cards, the filters' sheets, the toolbox export and
the viewer, so a unit's patches look the same wherever they are drawn.
"""

from __future__ import annotations

import numpy as np

EMPTY_GREY = 128  # an empty slot
BACKGROUND = 255  # the lines between patches


def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (n_out, taps) averaging each output pixel over its area."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    src = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + scale, src + 1) - np.maximum(lo, src), 0.0, None) / scale
    overlap[overlap < 1e-6] = 0.0
    taps = int((overlap > 0).sum(axis=1).max())
    idx = np.argsort(overlap == 0, axis=1, kind="stable")[:, :taps]  # nonzero columns first
    return idx, np.take_along_axis(overlap, idx, axis=1).astype(np.float32)


def _resample_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Area-average x along `axis` to n_out samples, one gather per tap (float32)."""
    idx, weight = _area_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    out = np.zeros(x.shape[:axis] + (n_out,) + x.shape[axis + 1:], np.float32)
    for t in range(idx.shape[1]):
        out += np.take(x, idx[:, t], axis=axis) * weight[:, t].reshape(shape)
    return out


def resize_patches(patches: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize uint8 images (..., h, w, ch) to (..., out_h, out_w, ch).

    Shrinking averages each output pixel over its source area; growing by a whole
    factor repeats pixels (crisp blocks). Work is vectorised over all images; the
    only Python loops run over the few source pixels per output pixel.
    """
    h, w = patches.shape[-3:-1]
    oh, ow = out_hw
    if (oh, ow) == (h, w):
        return patches
    if oh % h == 0 and ow % w == 0:
        return np.repeat(np.repeat(patches, oh // h, axis=-3), ow // w, axis=-2)
    lead = patches.shape[:-3]
    ch = patches.shape[-1]
    x = patches.reshape((-1, h, w, ch))
    if h % oh == 0 and w % ow == 0:  # whole-factor box average: integer sums of strided views
        fh, fw = h // oh, w // ow
        acc_t = np.uint16 if fh * fw * 255 < 2**16 else np.uint32
        rows = np.zeros((x.shape[0], oh, w, ch), acc_t)
        for t in range(fh):
            np.add(rows, x[:, t::fh], out=rows)
        acc = np.zeros((x.shape[0], oh, ow, ch), acc_t)
        for t in range(fw):
            np.add(acc, rows[:, :, t::fw], out=acc)
        out = (acc + (fh * fw) // 2) // (fh * fw)
    else:
        out = np.rint(_resample_axis(_resample_axis(x, 1, oh), 2, ow))
    return np.clip(out, 0, 255).astype(np.uint8).reshape(lead + (oh, ow, ch))


def montage(patches: np.ndarray, valid: np.ndarray, side: int, thin: int,
            empty: int = EMPTY_GREY, background: int = BACKGROUND) -> np.ndarray:
    """Compose each channel's patches into one side x side montage.

    patches (C, K, h, w, ch) uint8, valid (C, K) bool. Rank k goes to row k // side,
    column k % side; its top-left pixel is (row * (h + thin), col * (w + thin)).
    Invalid slots and slots beyond K are filled with `empty`; the `thin` lines
    between patches with `background`. Returns (C, side*h + (side-1)*thin,
    side*w + (side-1)*thin, ch) uint8.
    """
    c, k, h, w, ch = patches.shape
    out = np.full((c, side * h + (side - 1) * thin, side * w + (side - 1) * thin, ch),
                  background, np.uint8)
    for slot in range(side * side):
        y, x = (slot // side) * (h + thin), (slot % side) * (w + thin)
        cell = out[:, y:y + h, x:x + w]
        cell[...] = empty
        if slot < k:
            ok = valid[:, slot]
            cell[ok] = patches[ok, slot]
    return out
