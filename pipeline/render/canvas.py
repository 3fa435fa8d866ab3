"""Drawing primitives shared by every picture: area resizing, montages, grids, text
labels on composed pixels, and the PNG / figure writers.

Used by the report's sheets and cards, the filters' sheets, the evolution sheets, the
toolbox export and the viewer, so a unit's patches look the same wherever they are drawn.
Pure numpy but for `draw_labels` (matplotlib renders the text) and the writers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.store import replacing

EMPTY_GREY = 128  # an empty slot
BACKGROUND = 255  # the lines between patches
MAX_SLOTS = 9  # top-k patches drawn per unit (a 3x3 montage); the rest stay in results.h5
DPI = 150  # of composed sheets: text sizes are set in pixels through it


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights averaging each output pixel over its source area."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    src = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + scale, src + 1) - np.maximum(lo, src), 0.0, None) / scale
    overlap[overlap < 1e-6] = 0.0
    return overlap.astype(np.float32)


# source pixels per output pixel up to which an area resize gathers them (a few passes over
# the images) instead of multiplying by dense matrices: BLAS's worker threads cost about a
# third of the unit cards' CPU time on a busy 2-core machine (benchmarks/cards_throughput.py)
MAX_TAPS = 8
CHUNK_BYTES = 2**21  # of a float temporary of a tap or box resize


def _taps(n_in: int, n_out: int) -> int:
    """How many source pixels one output pixel of an area resize can overlap, at the most."""
    return math.ceil(n_in / n_out) + 1


def _tap_sum(x: np.ndarray, axis: int, weights: np.ndarray) -> np.ndarray:
    """x resized along `axis` by the (n_out, n_in) area weights, as the sum over the few
    source pixels each output pixel overlaps, each gathered for all images at once
    (float32; products and sums in place, each tap's weights laid out over all the axes
    after `axis`, so the multiplies run along contiguous memory)."""
    n_out, n_in = weights.shape
    taps = min(_taps(n_in, n_out), n_in)
    first = np.minimum(np.argmax(weights > 0, axis=1), n_in - taps)
    trailing = x.shape[axis + 1:]
    out = None
    for t in range(taps):
        src = first + t
        w = np.ascontiguousarray(np.broadcast_to(
            weights[np.arange(n_out), src].reshape((n_out,) + (1,) * len(trailing)), (n_out,) + trailing))
        term = np.take(x, src, axis=axis)
        term = np.multiply(term, w, out=term if term.dtype == np.float32 else None, dtype=np.float32)
        out = term if out is None else np.add(out, term, out=out)
    return out


def resize_patches(patches: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Resize uint8 images (..., h, w, ch) to (..., out_h, out_w, ch).

    Shrinking averages each output pixel over its source area; growing by a whole
    factor repeats pixels (crisp blocks). Work is vectorised over all images.
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
    small = max(_taps(h, oh), _taps(w, ow)) <= MAX_TAPS
    step = max(1, CHUNK_BYTES // (4 * max(h, oh) * max(w, ow) * ch))
    if (small or (h % oh == 0 and w % ow == 0)) and x.shape[0] > step:
        # a few images at a time: the float temporaries stay in the CPU's cache (1.5-5x faster
        # than one pass over hundreds of patches, the same pixels)
        out = np.empty((x.shape[0], oh, ow, ch), np.uint8)
        for i in range(0, x.shape[0], step):
            out[i:i + step] = resize_patches(x[i:i + step], out_hw)
        return out.reshape(lead + (oh, ow, ch))
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
    elif small:
        # few source pixels per output pixel: a weighted sum of gathered rows, then columns
        out = _tap_sum(_tap_sum(x, 1, _area_matrix(h, oh)), 2, _area_matrix(w, ow))
        np.rint(out, out=out)
        return np.clip(out, 0, 255, out=out).astype(np.uint8).reshape(lead + (oh, ow, ch))
    else:
        # each axis as one large matrix product (BLAS): rows, then columns
        n = x.shape[0]
        cols = np.moveaxis(x, 1, 0).reshape(h, -1).astype(np.float32)  # (h, N * w * ch)
        rows = (_area_matrix(h, oh) @ cols).reshape(oh, n, w, ch)
        rows = np.moveaxis(rows, 2, -1).reshape(-1, w)  # (oh * N * ch, w)
        out = (rows @ _area_matrix(w, ow).T).reshape(oh, n, ch, ow)
        out = np.rint(np.moveaxis(out, (0, 2), (1, 3)))  # (N, oh, ow, ch)
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


def grid(cells: np.ndarray, cols: int, gap_x: int, gap_y: int,
         background: int = BACKGROUND) -> tuple[np.ndarray, np.ndarray]:
    """Place cells (C, ch, cw, 3) row-major in a grid with gaps between them.

    Returns the image (rows*(ch+gap_y)-gap_y, cols*(cw+gap_x)-gap_x, 3) and the
    (C, 2) top-left (y, x) of every cell.
    """
    c, ch, cw = cells.shape[:3]
    rows = max(1, math.ceil(c / cols))
    tiles = np.full((rows * cols, ch + gap_y, cw + gap_x, 3), background, np.uint8)
    tiles[:c, :ch, :cw] = cells
    image = (tiles.reshape(rows, cols, ch + gap_y, cw + gap_x, 3)
             .transpose(0, 2, 1, 3, 4)
             .reshape(rows * (ch + gap_y), cols * (cw + gap_x), 3))
    idx = np.arange(c)
    origins = np.stack([(idx // cols) * (ch + gap_y), (idx % cols) * (cw + gap_x)], axis=1)
    return image[:image.shape[0] - gap_y, :image.shape[1] - gap_x], origins



@dataclass(frozen=True)
class Label:
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    text: str
    size_px: float
    weight: str = "normal"
    color: str = "0.2"
    style: str = "normal"


def fit_px(text: str, size_px: float, width: float) -> float:
    """Font size in px, shrunk so that one line of `text` roughly fits `width`."""
    longest = max((len(line) for line in text.splitlines()), default=1)
    return min(size_px, width / (0.6 * max(longest, 1)))


def draw_labels(canvas: np.ndarray, labels: list[Label]) -> np.ndarray:
    """Return canvas (H, W, 3) uint8 with the labels' text drawn on it.

    Matplotlib renders the text alone on white at the canvas' exact pixel size; the
    two layers are combined by keeping the darker pixel, so text must go on light
    background (title band, label bands) and leaves the patches untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import IdentityTransform

    h, w = canvas.shape[:2]
    fig = Figure(figsize=((w + 0.5) / DPI, (h + 0.5) / DPI), dpi=DPI, facecolor="white")
    agg = FigureCanvasAgg(fig)
    pt_per_px = 72 / DPI
    for lab in labels:
        fig.text(lab.x, h - lab.y, lab.text, transform=IdentityTransform(), ha="center",
                 va="center", fontsize=lab.size_px * pt_per_px, weight=lab.weight,
                 color=lab.color, style=lab.style, linespacing=1.3)
    agg.draw()
    text_layer = np.asarray(agg.buffer_rgba())[:h, :w, :3]
    return np.minimum(canvas, text_layer)



def write_png(path: Path, image: np.ndarray) -> None:
    # low zlib effort: sheets are mostly photo pixels, higher levels cost seconds for little
    from PIL import Image

    with replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1, dpi=(DPI, DPI))



def save_figure(fig, path: Path, dpi: float, alpha: bool = True) -> Path:
    """A figure as PNG on white; alpha=False drops the (all opaque) alpha channel: a quarter
    fewer raw bytes, the same picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    with replacing(path) as tmp:
        if alpha:
            fig.savefig(tmp, dpi=dpi, facecolor="white")
        else:
            fig.set_dpi(dpi)
            fig.set_facecolor("white")
            canvas.draw()
            rgb = np.asarray(canvas.buffer_rgba())[..., :3]
            # zlib level 1: half the encoding time of the default level, about a tenth more bytes
            Image.fromarray(rgb).save(tmp, format="PNG", dpi=(dpi, dpi), compress_level=1)
    return path
