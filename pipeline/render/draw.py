"""Drawing helpers for per-image maps: resampling, colour maps, overlays, tiles, figures.

Pure numpy and matplotlib (Agg, through `matplotlib.figure.Figure`, no pyplot state).
Maps arrive raw (as stored); they are normalised here, per map, only for display.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.names import shown
from pipeline.store import replacing

ALPHA = 0.4  # heatmap opacity over the photo
CMAP = "jet"
BLANK_GREY = 0.85  # tiles of channels that carry nothing
OUTSIDE_DIM = 0.45  # brightness of photo regions the model did not see
DPI = 150
CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM",
              "guided_gradcam": "guided Grad-CAM"}
# what an all-zero map means, written on it (else it is a solid dark overlay with no word of why)
ZERO_CAM_NOTES = {
    "gradcam": "Grad-CAM is zero here: the channel\nweights make every position negative\n(e.g. every weight is "
               "negative);\nsee Grad-CAM++",
    "guided_gradcam": "guided Grad-CAM is zero here:\nGrad-CAM is zero; see Grad-CAM++",
}


def zero_cam_note(method: str, cam: np.ndarray) -> str | None:
    """The note an all-zero class activation map gets on a sheet, None for a map with signal."""
    if np.any(cam):
        return None
    return ZERO_CAM_NOTES.get(method, f"{CAM_TITLES.get(method, method)} is zero here:\nno position has positive "
                                      f"evidence")


def mark_zero(ax, method: str, cam: np.ndarray, fontsize: float = 5.5) -> bool:
    """Write zero_cam_note on `ax` when `cam` is all zero; whether it did."""
    note = zero_cam_note(method, cam)
    if note is not None:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize=fontsize,
                color="black", bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, linewidth=0))
    return note is not None


def _axis_taps(n_in: int, n_out: int, start: float = 0.0, stop: float | None = None):
    """Bilinear taps (i0, i1, w1, inside) for n_out output pixels over the span [start, stop)
    of the output axis mapped onto n_in input samples (half-pixel centres, edges clamped)."""
    stop = float(n_out) if stop is None else stop
    centres = np.arange(n_out, dtype=np.float64) + 0.5
    inside = (centres >= start) & (centres < stop)
    pos = (centres - start) / max(stop - start, 1e-12) * n_in - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32), inside


def resample(maps: np.ndarray, out_hw: tuple[int, int], box=None) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear resampling of maps (..., h, w) onto an (H, W) pixel grid.

    `box` = (y0, x0, y1, x1), in output pixels (floats allowed), is where the map lies;
    default the whole grid, which gives the same values as
    `tf.image.resize(..., method='bilinear')`. Returns (values (..., H, W) float32,
    inside (H, W) bool: the pixels within the box).
    """
    maps = np.asarray(maps, np.float32)
    h, w = maps.shape[-2:]
    oh, ow = out_hw
    y0, x0, y1, x1 = (0.0, 0.0, float(oh), float(ow)) if box is None else map(float, box)
    r0, r1, wr, in_r = _axis_taps(h, oh, y0, y1)
    c0, c1, wc, in_c = _axis_taps(w, ow, x0, x1)
    top = maps[..., r0, :] * (1 - wr)[:, None] + maps[..., r1, :] * wr[:, None]
    out = top[..., c0] * (1 - wc) + top[..., c1] * wc
    return out.astype(np.float32), in_r[:, None] & in_c[None, :]


def unit_scale(maps: np.ndarray, axes=(-2, -1)) -> np.ndarray:
    """Each map divided by its own maximum (negative values clipped): [0, 1]; an all-zero
    map stays zero."""
    maps = np.maximum(np.asarray(maps, np.float32), 0.0)
    top = maps.max(axis=axes, keepdims=True)
    return np.divide(maps, top, out=np.zeros_like(maps), where=top > 0)


def colorize(values: np.ndarray, cmap: str = CMAP) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through a matplotlib colour map."""
    rgba = matplotlib.colormaps[cmap](np.clip(values, 0.0, 1.0))
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def open_photo(path: str, exif: bool = True, spec=None) -> np.ndarray | None:
    """An image file as uint8 RGB, decoded as the model's stream decodes it
    (`preprocess.read_photo`: upright when `exif`, a JPEG at the stream's DCT scale for
    `spec`); None when it cannot be read (moved, not an image)."""
    from PIL import Image

    from pipeline.preprocess import read_photo

    try:
        return to_rgb(read_photo(path, exif, spec))
    except (OSError, ValueError, Image.DecompressionBombError) as err:  # moved, changed or damaged since the scan
        logging.getLogger(__name__).warning("no photo for %s (%s): the drawings leave it out; put the file back at "
                                            "that path and run stages=[report] overwrite=true to draw them with it",
                                            shown(path), err)
        return None


def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W), (H, W, 1) or (H, W, 3/4) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = ALPHA, box=None, cmap: str = CMAP) -> np.ndarray:
    """A raw map drawn over a photo: (1 - alpha) * photo + alpha * jet(map / max(map)).

    The map is resampled bilinearly onto the photo's pixels; `box` (y0, x0, y1, x1) is
    the region of the photo the model saw (its crop); outside it the photo is dimmed
    and no colour is drawn. An all-zero map colours the box with the colour map's
    lowest colour, never NaN.
    """
    image = to_rgb(image).astype(np.float32)
    values, inside = resample(unit_scale(heat), image.shape[:2], box)
    colour = colorize(values, cmap).astype(np.float32)
    blended = (1 - alpha) * image + alpha * colour
    out = np.where(inside[..., None], blended, image * OUTSIDE_DIM)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def paste_in_box(photo: np.ndarray, picture: np.ndarray, box=None) -> np.ndarray:
    """An RGB picture of the model input (S, S, 3) resampled bilinearly into `box` of the
    photo (y0, x0, y1, x1); the rest of the photo dimmed, as `overlay` draws it."""
    photo = to_rgb(photo).astype(np.float32)
    values, inside = resample(np.moveaxis(to_rgb(picture).astype(np.float32), -1, 0), photo.shape[:2], box)
    out = np.where(inside[..., None], np.moveaxis(values, 0, -1), photo * OUTSIDE_DIM)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def heat_image(heat: np.ndarray, out_hw: tuple[int, int], cmap: str = CMAP) -> np.ndarray:
    """A raw map alone, normalised by its maximum, resampled bilinearly and coloured."""
    values, _ = resample(unit_scale(heat), out_hw)
    return colorize(values, cmap)


def guided_image(gradient: np.ndarray) -> np.ndarray:
    """An input-resolution gradient (H, W, C) as uint8 RGB: zero mean, unit std scaled to
    0.1 around grey, clipped (the usual way guided backprop is shown)."""
    g = np.asarray(gradient, np.float32)
    std = g.std()
    g = (g - g.mean()) / std * 0.1 + 0.5 if std > 0 else np.full_like(g, 0.5)
    return to_rgb((np.clip(g, 0, 1) * 255 + 0.5).astype(np.uint8))


def standardize_channels(maps: np.ndarray, blank: np.ndarray | None = None) -> np.ndarray:
    """Feature maps (..., H, W, C) -> display values in [0, 1], per channel: subtract the
    mean, divide by the std, scale by 64/255 around mid grey, clip. Constant channels
    (std 0) give 0.5; mark them with `blank` when drawing."""
    maps = np.asarray(maps, np.float32)
    mean = maps.mean(axis=(-3, -2), keepdims=True)
    std = maps.std(axis=(-3, -2), keepdims=True)
    z = np.divide(maps - mean, std, out=np.zeros_like(maps), where=std > 0)
    return np.clip((z * 64 + 128) / 255, 0, 1)


def channel_tiles(maps: np.ndarray, blank: np.ndarray, tile_px: int, cmap: str = "viridis") -> np.ndarray:
    """One image's maps (H, W, C) -> RGB tiles (C, t, t, 3) uint8: each channel standardised,
    coloured, enlarged by pixel repetition; blank channels a flat light grey."""
    h, w, c = maps.shape
    rgb = colorize(np.moveaxis(standardize_channels(maps), -1, 0), cmap)  # (C, H, W, 3)
    rep = max(1, tile_px // max(h, w))
    rgb = np.repeat(np.repeat(rgb, rep, axis=1), rep, axis=2)
    rgb[np.asarray(blank, bool)] = int(BLANK_GREY * 255)
    return rgb


def tile(tiles: np.ndarray, per_row: int, gap: int = 2, background: int = 255) -> np.ndarray:
    """Tiles (N, h, w, 3) uint8 -> one image, `per_row` tiles a row, row-major, with gaps."""
    n, h, w = tiles.shape[:3]
    rows = max(1, -(-n // per_row))
    cols = min(per_row, max(n, 1))
    cells = np.full((rows * cols, h + gap, w + gap, 3), background, np.uint8)
    cells[:n, :h, :w] = tiles
    out = cells.reshape(rows, cols, h + gap, w + gap, 3).transpose(0, 2, 1, 3, 4)
    out = out.reshape(rows * (h + gap), cols * (w + gap), 3)[:rows * (h + gap) - gap, :cols * (w + gap) - gap]
    return out


def save(fig: Figure, path: Path, compress_level: int | None = None) -> Path:
    """Render a figure to PNG with the Agg canvas; `compress_level` 1 encodes large sheets
    about twice as fast as the default 6, for about a tenth more bytes."""
    path = Path(path)
    FigureCanvasAgg(fig)
    options = {} if compress_level is None else {"pil_kwargs": {"compress_level": int(compress_level)}}
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=DPI, facecolor="white", **options)
    return path


# stored and live backprop panels: |v| at this percentile of each panel is full contrast,
# so the structure of sparse maps shows instead of a few bright specks on grey
PANEL_PERCENTILE = 99.5


def panel_to_uint8(panel, panel_dims: int | None = None, centred: bool = True,
                   percentile: float = 100.0) -> np.ndarray:
    """A panel as a viewable uint8 image (same shape).

    centred (raw panels, signed): 0 maps to 128 grey, +s to 255 and -s to 0, with s
    the `percentile` of |v| per panel (100: max|v|; lower values stretch the contrast
    of sparse maps, clipping the few largest). centred=False (norm panels, >= 0): 0 is
    black and s is white. panel_dims: how many trailing axes form one panel (3 for a
    (..., h, w, C) stack, 2 for (..., h, w) norm maps); None: the whole array is one
    panel. An all-zero panel gives flat grey (or black).
    """
    v = np.asarray(panel, np.float32)
    dims = v.ndim if panel_dims is None else int(panel_dims)
    axes = tuple(range(v.ndim - dims, v.ndim))
    if not v.size:
        scale = np.ones((1,) * v.ndim, np.float32)
    elif percentile >= 100:
        scale = np.abs(v).max(axis=axes, keepdims=True)
    else:
        scale = np.percentile(np.abs(v), percentile, axis=axes, keepdims=True).astype(np.float32)
    unit = np.divide(v, scale, out=np.zeros_like(v), where=scale > 0)
    out = 128.0 + 128.0 * unit if centred else 256.0 * unit
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def cell_edges(centres: np.ndarray, side: int) -> np.ndarray:
    """Edges of grid cells drawn around their centres: halfway between neighbours, as far
    out at the ends (one cell: the whole side)."""
    centres = np.asarray(centres, np.float64)
    if len(centres) == 1:
        return np.array([0.0, float(side)])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])
