"""Unit cards: one JPEG per channel, composed in numpy from results.h5 only.

A card gathers what the run knows about one unit (channel) of a scanned layer:

    header      layer, unit, output shape, receptive field
    cells       top-k patches (3x3 montage), one montage per backprop panel method
                (deconv, guided, gradient), the filter pattern, the bottom-k patches,
                the unit's convolution weights, the spectrum of its per-image maxima
    statistics  mean, max, share of zero activations, quantiles of the per-image maxima,
                weight norm and bias, the pattern's objective value
    table       rank, value, image id, label and file of every top-k (and bottom-k) entry
    footer      what results.h5 does not hold (and which stage would fill it in)

Image work is vectorised over a block of units: montages, panel scaling, weight tiles
and spectrum bars are built for all units of the block at once. Text is drawn from a
glyph atlas rendered once per size by matplotlib's FreeType wrapper (`FT2Font`; CJK from the
system's fallback fonts, a boxed '?' where none has the character) and
pasted with numpy, so a card costs a few milliseconds and no figure.

Nothing here touches the model or TensorFlow.
"""

from __future__ import annotations

import io
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.render.canvas import EMPTY_GREY, montage, resize_patches
from pipeline.render.fonts import PRIMARY, fallback_files
from pipeline.render.patches import layer_patches
from pipeline.render.results import LayerInfo, as_str, fmt
from pipeline.spectrum import GAMMA, MIN_ABS
from pipeline.names import shown
from pipeline.store import read_paths, replacing, stored_name

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- sizes

COLS = 4  # cell slots per card row
MARGIN = 14
GAP = 14  # between cells
CAPTION_H = 18  # caption band above each cell
HEADER_H = 54
LINE_H = 17  # statistics lines
ROW_H = 16  # table rows
THIN = 2  # between the patches of a montage
TARGET_PATCH = 48  # patches are enlarged by a whole factor towards this, or shrunk to it
MAX_PATCH = 56
THUMB_QUALITY = 88
CARD_QUALITY = 85  # JPEG: text stays sharp on white, photo cells cost most of the bytes
BLOCK_PIXELS = 24 * 2**20  # card pixels composed at once (bytes of the uint8 block)

INK = (34, 34, 34)
MUTED = (110, 110, 110)
BAR = (70, 120, 180)
MEDIAN = (200, 60, 40)
BORDER = (205, 205, 205)
CARD_BG = 255

PANEL_TITLES = {"deconv": "deconv", "guided": "guided backprop", "gradient": "gradient"}


# ---------------------------------------------------------------------------- text

class GlyphFont:
    """DejaVu Sans at one pixel size: glyphs rendered once by FreeType, strings pasted in numpy.

    A character DejaVu Sans lacks comes from the first fallback font that has it (CJK fonts,
    fonts.fallback_files; `fallbacks=()` uses none), one that no font has is a boxed '?'.
    Kerning is not applied (labels and numbers only). `mask(text)` gives an alpha image
    (height, width) float32 in [0, 1]; the baseline lies `ascent` rows below its top.
    """

    def __init__(self, size_px: int, bold: bool = False, fallbacks: tuple[str, ...] | None = None):
        from matplotlib import font_manager
        from matplotlib.font_manager import FontProperties

        path = font_manager.findfont(FontProperties(family=PRIMARY, weight="bold" if bold else "normal"))
        self._ft = self._open(path, size_px)
        upem = self._ft.units_per_EM
        self.size = size_px
        self.bold = bold
        self.ascent = int(math.ceil(self._ft.ascender / upem * size_px))
        self.descent = int(math.ceil(-self._ft.descender / upem * size_px))
        self.height = self.ascent + self.descent
        self._glyphs: dict[str, tuple[np.ndarray, int, int, int]] = {}
        self._fallback_paths = fallbacks
        self._fallbacks: list | None = None  # opened on the first character DejaVu Sans lacks

    @staticmethod
    def _open(path: str, size_px: int):
        from matplotlib.ft2font import FT2Font

        ft = FT2Font(path)
        ft.set_size(float(size_px), 72.0)  # 72 dpi: one point is one pixel
        return ft

    def _face(self, ch: str):
        """The first font that has `ch`, or None."""
        if self._ft.get_char_index(ord(ch)):
            return self._ft
        if self._fallbacks is None:
            paths = fallback_files(self.bold) if self._fallback_paths is None else self._fallback_paths
            self._fallbacks = []
            for p in paths:
                try:
                    self._fallbacks.append(self._open(p, self.size))
                except (OSError, RuntimeError) as e:
                    logger.warning("font %s not usable (%s): left out", p, e)
        return next((ft for ft in self._fallbacks if ft.get_char_index(ord(ch))), None)

    def _glyph(self, ch: str) -> tuple[np.ndarray, int, int, int]:
        """(alpha, left offset, row of the bitmap's top relative to the top of the line, advance)."""
        got = self._glyphs.get(ch)
        if got is not None:
            return got
        from matplotlib.ft2font import LoadFlags

        ft = self._face(ch)
        if ft is None:
            got = self._placeholder()
        else:
            ft.set_text(ch, 0.0, flags=LoadFlags.FORCE_AUTOHINT)
            ft.draw_glyphs_to_bitmap(antialiased=True)
            alpha = np.asarray(ft.get_image(), np.float32) / 255.0
            left = math.floor(ft.get_bitmap_offset()[0] / 64)  # the bitmap starts at the pixel holding xMin
            g = ft.load_char(ord(ch), flags=LoadFlags.FORCE_AUTOHINT)
            # the bitmap's first row lies floor(yMax) + 1 pixels above the baseline (yMax: top of
            # the glyph's outline box, 26.6 fixed point)
            top = self.ascent - (g.bbox[3] // 64 + 1)
            got = (alpha, left, top, g.horiAdvance / 64)  # the hinted advance, as the hinted bitmap was drawn
        self._glyphs[ch] = got
        return got

    def _placeholder(self) -> tuple[np.ndarray, int, int, int]:
        """A '?' in a box: a character no font here has, visibly not dropped."""
        mark, _, mark_top, _ = self._glyph("?")
        mh, mw = mark.shape
        h, w = self.ascent + 1, mw + 4
        box = np.zeros((h, w), np.float32)
        box[[0, -1], :] = 1.0
        box[:, [0, -1]] = 1.0
        y0 = max(0, min(h - mh, mark_top))
        box[y0:y0 + mh, 2:2 + mw] = np.maximum(box[y0:y0 + mh, 2:2 + mw], mark[:h - y0])
        return box, 1, 0, float(w + 2)

    def width(self, text: str) -> int:
        return int(math.ceil(sum(self._glyph(ch)[3] for ch in text)))

    def fit(self, text: str, max_width: int | None) -> str:
        """`text`, cut and ended with an ellipsis where it is wider than max_width."""
        if max_width is None or self.width(text) <= max_width:
            return text
        ell = self.width("\u2026")
        out, used = [], 0
        for ch in text:
            adv = self._glyph(ch)[3]
            if used + adv + ell > max_width:
                break
            out.append(ch)
            used += adv
        return "".join(out) + "\u2026"

    def mask(self, text: str) -> np.ndarray:
        return _mask(self, text).copy()


@lru_cache(maxsize=16384)
def _mask(font: GlyphFont, text: str) -> np.ndarray:
    width = max(1, font.width(text) + 2)
    out = np.zeros((font.height + 2, width), np.float32)
    pen = 0.0
    for ch in text:
        alpha, left, top, adv = font._glyph(ch)
        h, w = alpha.shape
        gx = int(round(pen)) + left
        y0, x0 = max(0, top), max(0, gx)
        y1, x1 = min(out.shape[0], top + h), min(width, gx + w)
        if y1 > y0 and x1 > x0:
            region = out[y0:y1, x0:x1]
            np.maximum(region, alpha[y0 - top:y1 - top, x0 - gx:x1 - gx], out=region)
        pen += adv
    return out


@lru_cache(maxsize=16)
def font(size_px: int, bold: bool = False) -> GlyphFont:
    return GlyphFont(size_px, bold)


def wrap(text: str, size: int, width: int, bold: bool = False) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than `width` pixels."""
    f = font(int(size), bold)
    lines, line = [], ""
    for word in shown(text).split(" "):
        trial = f"{line} {word}" if line else word
        if line and f.width(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def draw_text(canvas: np.ndarray, text: str, x: float, y: float, size: int = 12, color=INK,
              bold: bool = False, align: str = "left", max_width: int | None = None) -> int:
    """Draw one line of text on canvas (..., H, W, 3) uint8 in place; (x, y) is the
    left/centre/right end (align) of the line box's top. Leading axes (a block of
    cards) all get the same text. Returns the drawn width in pixels."""
    alpha, weight = _fitted(font(int(size), bold), shown(text), max_width)  # control characters escaped
    h, w = alpha.shape
    x0 = int(round(x - (w if align == "right" else w / 2 if align == "center" else 0)))
    y0 = int(round(y))
    H, W = canvas.shape[-3:-1]
    cy0, cx0, cy1, cx1 = max(0, y0), max(0, x0), min(H, y0 + h), min(W, x0 + w)
    if cy1 <= cy0 or cx1 <= cx0:
        return 0
    region = canvas[..., cy0:cy1, cx0:cx1, :]
    if canvas.ndim == 3 and max(color) <= 160 and region.min() == CARD_BG:
        # dark text on the card's white (most of a card's text): the blend over white, cached
        np.minimum(region, _inked(alpha, weight, tuple(color))[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], out=region)
        return w
    a = weight[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None]  # uint16, 0..256
    mixed = region * (256 - a) + np.asarray(color, np.uint16) * a + 128
    region[...] = (mixed >> 8).astype(np.uint8)
    return w


_INKED: dict = {}


def _inked(alpha: np.ndarray, weight: np.ndarray, color: tuple) -> np.ndarray:
    """(h, w, 3) uint8: the text of `weight` blended over CARD_BG exactly as draw_text blends."""
    key = (id(alpha), color)
    got = _INKED.get(key)
    if got is None or got[0] is not alpha:
        if len(_INKED) > 16384:
            _INKED.clear()
        a = weight[..., None]
        ink = ((CARD_BG * (256 - a) + np.asarray(color, np.uint16) * a + 128) >> 8).astype(np.uint8)
        got = _INKED[key] = (alpha, ink)
    return got[1]


@lru_cache(maxsize=16384)
def _fitted(f: GlyphFont, text: str, max_width: int | None) -> tuple[np.ndarray, np.ndarray]:
    alpha = _mask(f, f.fit(text, max_width))
    return alpha, np.rint(alpha * 256).astype(np.uint16)


# ---------------------------------------------------------------------------- pixel helpers

def patch_px(hw: tuple[int, int]) -> tuple[int, int]:
    """Size of one patch on a card: small patches enlarged by a whole factor, large ones shrunk."""
    h, w = int(hw[0]), int(hw[1])
    longest = max(h, w, 1)
    if longest <= MAX_PATCH:
        f = max(1, TARGET_PATCH // longest)
        return h * f, w * f
    return max(1, round(h * TARGET_PATCH / longest)), max(1, round(w * TARGET_PATCH / longest))


def _diverging_lut() -> np.ndarray:
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
    lut = _diverging_lut()
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


def spectrum_values(buckets: int, gamma: float, min_abs: float) -> np.ndarray:
    """The value each spectrum bucket stands for (as pipeline.spectrum.bucket_values, from the
    attrs stored with the counts): negatives (most negative first), zero, positives."""
    per_sign = (buckets - 1) // 2
    mid = min_abs * gamma ** (np.arange(per_sign) + 0.5)
    return np.concatenate([-mid[::-1], [0.0], mid]).astype(np.float32)


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


def quantile_lines(levels: np.ndarray, values: np.ndarray, width: int) -> list[str]:
    """The quantiles of a unit's per-image maxima in one line of 12 px text, or in two
    (levels, then values) where one would be wider than `width`: no value is cut off."""
    pct = "/".join(f"{100 * lv:g}" for lv in levels)
    text = " / ".join(_fmt_value(float(v)) for v in values)
    line = f"per-image max, quantiles {pct} %: {text}"
    if font(12).width(line) <= width:
        return [line]
    return [f"per-image max, quantiles {pct} %:", "    " + text]


def _fmt_value(v: float) -> str:
    if not np.isfinite(v):
        return "\u2013"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}" if a < 100 else f"{v:.1f}"


# ---------------------------------------------------------------------------- reading a layer

@dataclass
class ImageIndex:
    """What the cards say about an image id: its file name and label."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    @classmethod
    def read(cls, f: h5py.File) -> "ImageIndex":
        if "images" not in f:
            return cls([], np.zeros(0, np.int64), [])
        g = f["images"]
        paths = read_paths(g)
        labels = g["label"][()].astype(np.int64) if "label" in g else np.full(len(paths), -1, np.int64)
        names = json.loads(as_str(g.attrs.get("class_names", "[]")) or "[]")
        return cls(paths, labels, [shown(n) for n in names])

    def label(self, image_id: int) -> str:
        if not 0 <= image_id < len(self.labels):
            return "\u2013"
        return self.class_name(int(self.labels[image_id]))

    def class_name(self, label: int) -> str:
        if label < 0:
            return "\u2013"
        return self.class_names[label] if label < len(self.class_names) else str(label)

    def file(self, image_id: int) -> str:
        if not 0 <= image_id < len(self.paths):
            return "?"
        return shown(Path(self.paths[image_id]).name or self.paths[image_id])


@dataclass
class Weights:
    """The convolution kernel whose output unit u feeds unit u of a layer."""

    conv: str  # qualified name
    kind: str
    kernel: np.ndarray  # (kh, kw, n, units) float32: one (kh, kw, n) slice per unit
    bias: np.ndarray | None
    inferred: str  # '' when recorded, else how it was matched ('output count', 'name and output count')
    rgb: bool  # first layer on RGB input: drawn as colour images
    scale: float  # largest |weight| of the layer (colour scale)


def _units_kernel(g: h5py.Group) -> tuple[np.ndarray, str] | None:
    """(kh, kw, n, units) kernel of a filters/<conv> group, one slice per output unit."""
    kind = as_str(g.attrs.get("kind", "Conv2D"))
    w = np.asarray(g["weights"][()], np.float32)
    if w.ndim != 4:
        return None
    if kind == "SeparableConv2D" and "pointwise" in g:
        return np.asarray(g["pointwise"][()], np.float32), kind
    if kind == "DepthwiseConv2D":
        kh, kw, c, m = w.shape
        return w.reshape(kh, kw, 1, c * m), kind  # unit u = channel u // m, multiplier u % m
    return w, kind


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def find_weights(f: h5py.File, info: LayerInfo, channels: int) -> Weights | None:
    """The stored kernel of `info`'s units: its own (filters/<layer>/weights), the conv named
    by a `conv` attribute on filters/<layer> or layers/<layer>, or else the stored
    conv with as many outputs as the layer has channels whose name shares the longest
    prefix with the layer's (None when that is not unique)."""
    if "filters" not in f:
        return None
    root = f["filters"]
    groups = {k: g for k, g in root.items() if isinstance(g, h5py.Group) and "weights" in g}
    if not groups:
        return None
    own = root.get(info.stored)
    named = None
    for holder in (own, f["layers"].get(info.stored) if "layers" in f else None):
        if holder is not None and "conv" in holder.attrs:
            named = stored_name(as_str(holder.attrs["conv"]))
    inferred = ""
    if info.stored in groups:
        key = info.stored
    elif named in groups:
        key = named
    else:
        matches = []
        for k, g in groups.items():
            got = _units_kernel(g)
            if got is not None and got[0].shape[-1] == channels:
                matches.append((_common_prefix(k, info.stored), k))
        if not matches:
            return None
        best = max(m[0] for m in matches)
        keys = [k for p, k in matches if p == best]
        if len(keys) != 1 or (best == 0 and len(matches) > 1):
            return None
        key = keys[0]
        inferred = "name and output count" if best > 0 else "output count"
    g = groups[key]
    got = _units_kernel(g)
    if got is None or got[0].shape[-1] != channels:
        return None
    kernel, kind = got
    bias = np.asarray(g["bias"][()], np.float32) if "bias" in g and g["bias"].shape == (channels,) else None
    kernel_table = root.get("kernel_table")
    first = None
    if kernel_table is not None and "layer" in kernel_table and len(kernel_table["layer"]):
        first = as_str(kernel_table["layer"].asstr()[0]).replace("/", ".")
    rgb = kind == "Conv2D" and kernel.shape[2] == 3 and (first is None or first == key)
    if rgb:  # min-max over the layer, like the filters stage's colour sheet
        lo, hi = float(kernel.min()), float(kernel.max())
        kernel = (kernel - lo) / (hi - lo) if hi > lo else np.zeros_like(kernel)
    return Weights(conv=as_str(g.attrs.get("name", key)), kind=kind, kernel=kernel, bias=bias,
                   inferred=inferred, rgb=rgb, scale=float(np.abs(np.asarray(g["weights"][()])).max() or 1.0))


@dataclass
class Cell:
    key: str  # top | class | bottom | pattern | weights | spectrum | panel:<method>
    title: str
    slots: int = 1  # width in cell slots
    rows: int = 1  # height in card rows
    y: int = 0
    x: int = 0


@dataclass
class CardLayout:
    patch_hw: tuple[int, int]
    cell: int  # side of a square cell in pixels
    cells: list[Cell]
    width: int
    height: int
    stats_y: int
    table_y: int
    bottom_table_y: int | None
    footer_y: int
    footer: list[str]
    k: int
    bottom_k: int

    def slot(self, key: str) -> Cell | None:
        return next((c for c in self.cells if c.key == key), None)

    def px(self, c: Cell) -> tuple[int, int]:
        """(height, width) of a cell's frame: spans include the gaps and captions between."""
        return (c.rows * self.cell + (c.rows - 1) * (CAPTION_H + GAP), c.slots * self.cell + (c.slots - 1) * GAP)

    def patch_in(self, c: Cell) -> tuple[int, int]:
        """One patch's size in a montage cell: the layout's patch, enlarged in bigger cells."""
        if c.slots == 1 and c.rows == 1:
            return self.patch_hw
        ph, pw = self.patch_hw
        f = (min(self.px(c)) - 2 * THIN) / (3 * max(ph, pw, 1))
        f = math.floor(f) if f >= 2 else f  # whole factors keep pixels crisp
        return max(1, int(ph * f)), max(1, int(pw * f))


def card_layout(cells: list[Cell], patch_hw: tuple[int, int], k: int, bottom_k: int, stats_lines: int,
                footer_lines: int, side: int = 3) -> CardLayout:
    """Pack the cells, in order, into the first free place of a grid COLS slots wide (a
    cell spans `slots` columns and `rows` rows), and stack the statistics, the table(s)
    and the footer below them."""
    ph, pw = patch_hw
    cell = max(side * max(ph, pw) + (side - 1) * THIN, 120)
    width = 2 * MARGIN + COLS * cell + (COLS - 1) * GAP
    row_h = CAPTION_H + cell + GAP
    taken: list[list[bool]] = []
    placed = []
    for c in cells:
        w, h = min(c.slots, COLS), c.rows
        r = col = 0
        while True:
            while len(taken) < r + h:
                taken.append([False] * COLS)
            col = next((x for x in range(COLS - w + 1)
                        if not any(taken[rr][x + i] for rr in range(r, r + h) for i in range(w))), None)
            if col is not None:
                break
            r += 1
        for rr in range(r, r + h):
            taken[rr][col:col + w] = [True] * w
        placed.append(Cell(c.key, c.title, w, h, HEADER_H + r * row_h + CAPTION_H, MARGIN + col * (cell + GAP)))
    y = HEADER_H + len(taken) * row_h
    stats_y = y
    y += stats_lines * LINE_H + 8
    table_y = y
    y += (min(k, 9) + 1) * ROW_H + 8 if k else 0
    bottom_table_y = None
    if bottom_k:
        bottom_table_y = y
        y += (min(bottom_k, 9) + 1) * ROW_H + 8
    footer_y = y
    y += footer_lines * (LINE_H - 2) + MARGIN - 4
    return CardLayout(patch_hw=(ph, pw), cell=cell, cells=placed, width=width, height=y, stats_y=stats_y,
                      table_y=table_y, bottom_table_y=bottom_table_y, footer_y=footer_y, footer=[], k=k,
                      bottom_k=bottom_k)


@dataclass
class UnitClasses:
    """Each unit's class selectivity (per-image max), preferred class and the two means."""

    index: np.ndarray  # (C,)
    preferred: np.ndarray  # (C,)
    best: np.ndarray  # (C,) mean on the preferred class
    rest: np.ndarray  # (C,) mean of the other classes' means

    @classmethod
    def read(cls, g: h5py.Group) -> "UnitClasses | None":
        from pipeline.selectivity import class_selectivity

        if "classes/sum_max" not in g:
            return None
        found = class_selectivity(g["classes/sum_max"][()], g["classes/count"][()])
        seen = found.means[:, np.isfinite(found.means).all(axis=0)]
        best = np.nanmax(seen, axis=1) if seen.shape[1] else np.full(len(found.index), np.nan)
        rest = (seen.sum(axis=1) - best) / max(seen.shape[1] - 1, 1)
        return cls(found.index, found.preferred, best, rest)

    def line(self, c: int, images: "ImageIndex") -> str:
        if not np.isfinite(self.index[c]):
            return "class selectivity: fewer than two classes with images"
        name = images.class_name(int(self.preferred[c]))
        return (f"class selectivity {self.index[c]:.2f} \u00b7 prefers {name} (mean per-image max "
                f"{_fmt_value(float(self.best[c]))} vs {_fmt_value(float(self.rest[c]))} on the other classes)")


@dataclass
class Exemplars:
    """The scan's per-class top-k (scan.exemplars): classes (S,), k, images (C, S * K)."""

    classes: np.ndarray
    k: int
    image: np.ndarray

    @classmethod
    def read(cls, g: h5py.Group, channels: int) -> "Exemplars | None":
        t = g.get("class_topk")
        if t is None or "class_patches" not in g or g["class_patches"].shape[0] != channels:
            return None
        return cls(t.attrs["classes"][()], int(t.attrs["k"]), t["image"][()])

    def block_of(self, preferred: np.ndarray | None, n: int) -> np.ndarray:
        """(n,) which class block each unit shows: its preferred class where listed, else 0."""
        if preferred is None:
            return np.zeros(n, np.int64)
        at = np.clip(np.searchsorted(self.classes, preferred), 0, len(self.classes) - 1)  # classes are sorted
        return np.where(self.classes[at] == preferred, at, 0).astype(np.int64)


@dataclass
class UnitAblation:
    """What zeroing a unit did (the ablation stage): accuracy change overall and per class."""

    units: dict[int, int]  # unit -> row
    classes: np.ndarray
    accuracy_delta: np.ndarray  # (U, L')
    overall_delta: np.ndarray  # (U,)

    @classmethod
    def read(cls, f: h5py.File, stored: str) -> "UnitAblation | None":
        g = f.get(f"ablation/{stored}")
        if g is None:
            return None
        return cls({int(u): i for i, u in enumerate(g["units"][()])}, g["classes"][()], g["accuracy_delta"][()],
                   g["overall_delta"][()])

    def line(self, c: int, images: "ImageIndex") -> str | None:
        row = self.units.get(c)
        if row is None:
            return None
        delta = self.accuracy_delta[row]
        worst = [i for i in np.argsort(delta, kind="stable")[:2] if delta[i] < 0]
        hurt = ", ".join(f"{images.class_name(int(self.classes[i]))} {100 * delta[i]:+.0f}" for i in worst)
        return (f"zeroed: accuracy {100 * self.overall_delta[row]:+.1f} points overall"
                + (f"; most hurt: {hurt}" if hurt else "; no class loses accuracy"))


@dataclass
class LayerCards:
    """Everything needed to draw the cards of one layer; arrays for all units, datasets
    (patches, panels, patterns) read a block of units at a time."""

    info: LayerInfo
    group: h5py.Group
    images: ImageIndex
    channels: int
    k: int
    value: np.ndarray | None
    image: np.ndarray | None
    bottom_value: np.ndarray | None
    bottom_image: np.ndarray | None
    stats: dict[str, np.ndarray]
    quantile_levels: np.ndarray | None
    spectrum: np.ndarray | None
    spectrum_x: np.ndarray | None
    panel_methods: list[str]
    pattern_rows: np.ndarray | None  # (C,) row in filters/<layer>/patterns, -1 where none
    pattern_ds: h5py.Dataset | None
    pattern_value: np.ndarray | None
    pattern_objective: str
    weights: Weights | None
    layout: CardLayout
    absent: list[str] = field(default_factory=list)
    classes: "UnitClasses | None" = None
    ablation: "UnitAblation | None" = None
    exemplars: "Exemplars | None" = None
    scanned: int = 1  # how many layers the run scanned (info.depth counts these, in network order)
    opened: dict = field(default_factory=dict)  # datasets read a block at a time, opened once

    @classmethod
    def read(cls, f: h5py.File, info: LayerInfo, images: ImageIndex) -> "LayerCards":
        g = f["layers"][info.stored]
        shape = info.shape
        channels = int(shape[-1]) if shape else 0
        t = g.get("topk")
        value = t["value"][()] if t is not None and "value" in t else None
        image = t["image"][()] if t is not None and "image" in t else None
        if value is not None:
            channels = value.shape[0]
        k = value.shape[1] if value is not None else 0
        b = g.get("bottomk")
        bottom_value = b["value"][()] if b is not None and "value" in b else None
        bottom_image = b["image"][()] if b is not None and "image" in b else None
        s = g.get("stats")
        stats = {key: s[key][()] for key in ("mean", "max", "zero_fraction", "quantiles") if s is not None and key in s}
        levels = np.asarray(s.attrs["quantiles"], np.float64) if s is not None and "quantiles" in s.attrs else None
        spectrum = spectrum_x = None
        if s is not None and "spectrum" in s:
            spectrum = s["spectrum"][()]
            spectrum_x = spectrum_values(spectrum.shape[1], float(s.attrs.get("spectrum_gamma", GAMMA)),
                                         float(s.attrs.get("spectrum_min_abs", MIN_ABS)))
        panels = g.get("panels")
        methods = []
        if panels is not None:
            listed = json.loads(as_str(panels.attrs.get("methods", "[]")) or "[]")
            methods = [m for m in (listed or [k_ for k_ in panels if not k_.endswith("_norm")]) if m in panels]
        pattern_rows = pattern_ds = pattern_value = None
        objective = "channel"
        fg = f.get(f"filters/{info.stored}")
        if fg is not None and "patterns" in fg and "channels" in fg:
            objective = as_str(fg.attrs.get("objective", "channel"))
            if objective in ("channel", "neg"):
                rows = np.full(channels, -1, np.int64)
                chans = fg["channels"][()]
                computed = fg["computed"][()] if "computed" in fg else np.ones(len(chans), bool)
                ok = computed & (chans >= 0) & (chans < channels)
                rows[chans[ok]] = np.flatnonzero(ok)
                if (rows >= 0).any():
                    pattern_rows, pattern_ds = rows, fg["patterns"]
                    if "value" in fg:
                        vals = fg["value"][()]
                        pattern_value = np.full(channels, np.nan, np.float32)
                        pattern_value[rows >= 0] = vals[rows[rows >= 0]]
        weights = find_weights(f, info, channels)

        has_patches = "patches" in g and g["patches"].shape[0] == channels and 0 not in g["patches"].shape[:2]
        patch_hw = tuple(g["patches"].shape[2:4]) if has_patches else (40, 40)
        cells = []
        absent = []
        kk = min(k, 9)
        shown = f"top {kk} of {k}" if k > kk else f"top-{kk}"
        if has_patches:
            cells.append(Cell("top", f"{shown} patches", slots=2, rows=2))  # the card's main picture
        elif info.mappable:
            absent.append("patches (stages=[crop])")
        else:
            absent.append(f"patches: {info.geometry_message or 'layer not mappable to the input'}")
        exemplars = Exemplars.read(g, channels)
        if exemplars is not None:
            cells.append(Cell("class", f"top-{exemplars.k} within one class"))
        for m in methods:
            cells.append(Cell(f"panel:{m}", PANEL_TITLES.get(m, m)))
        if not methods and has_patches:
            absent.append("deconv/backprop panels (stages=[panels], panels.layers=all)")
        if pattern_rows is not None:
            cells.append(Cell("pattern", "filter pattern" + (" (minimised)" if objective == "neg" else "")))
        else:
            absent.append("filter pattern (stages=[filters])")
        bottom_patches = "bottom_patches" in g and bottom_image is not None
        bk = min(bottom_image.shape[1], 9) if bottom_image is not None else 0
        if bottom_patches:
            cells.append(Cell("bottom", f"bottom-{bk} patches"))
        elif bottom_image is None:
            absent.append("bottom-k (scan.bottomk=9)")
        if weights is not None:
            cells.append(Cell("weights", "weights" + (" (RGB)" if weights.rgb else " per input")))
        else:
            absent.append("weights (stages=[filters])")
        if spectrum is not None:
            cells.append(Cell("spectrum", "per-image maximum: log-bucket counts", slots=2))
        else:
            absent.append("activation spectrum")
        classes = UnitClasses.read(g)
        ablation = UnitAblation.read(f, info.stored)
        stats_lines = 3 + (weights is not None) + (pattern_value is not None) + (classes is not None) + \
            (ablation is not None)
        ph, pw = patch_px(patch_hw)
        width = 2 * MARGIN + COLS * max(3 * max(ph, pw) + 2 * THIN, 120) + (COLS - 1) * GAP
        footer = wrap("not in results.h5: " + " \u00b7 ".join(absent), 11, width - 2 * MARGIN) if absent else []
        if k > kk:  # the card has room for 9; the rest are one read away
            footer += wrap(f"ranks {kk + 1}-{k} of every unit: results.h5 layers/{info.stored}/topk and patches",
                           11, width - 2 * MARGIN)
        layout = card_layout(cells, (ph, pw), k, bk if bottom_value is not None else 0, stats_lines, len(footer))
        layout.footer = footer
        return cls(info=info, group=g, images=images, channels=channels, k=k, value=value, image=image,
                   bottom_value=bottom_value, bottom_image=bottom_image, stats=stats, quantile_levels=levels,
                   spectrum=spectrum, spectrum_x=spectrum_x, panel_methods=methods, pattern_rows=pattern_rows,
                   pattern_ds=pattern_ds, pattern_value=pattern_value, pattern_objective=objective,
                   weights=weights, layout=layout, absent=absent, classes=classes, ablation=ablation,
                   exemplars=exemplars, scanned=len(f["layers"]))

    # ------------------------------------------------------------------ composing

    def template(self) -> np.ndarray:
        """The parts every card of the layer shares: background, cell frames, captions."""
        lay = self.layout
        canvas = np.full((lay.height, lay.width, 3), CARD_BG, np.uint8)
        for c in lay.cells:
            h, w = lay.px(c)
            draw_text(canvas, c.title, c.x, c.y - CAPTION_H + 1, 12, MUTED, max_width=w)
            y0, x0 = c.y - 1, c.x - 1
            canvas[y0, x0:x0 + w + 2] = BORDER
            canvas[y0 + h + 1, x0:x0 + w + 2] = BORDER
            canvas[y0:y0 + h + 2, x0] = BORDER
            canvas[y0:y0 + h + 2, x0 + w + 1] = BORDER
        info = self.info
        sub = (f"output {fmt(info.shape)} \u00b7 receptive field {fmt(info.rf_size)} px, stride "
               f"{fmt(info.rf_stride)} \u00b7 scanned layer {info.depth + 1} of {self.scanned}")
        draw_text(canvas, sub, MARGIN, 32, 12, MUTED, max_width=lay.width - 2 * MARGIN)
        if lay.k:
            self._table_header(canvas, lay.table_y, f"top {min(self.k, 9)} of {self.k}" if self.k > 9
                               else f"top-{self.k}")
        if lay.bottom_table_y is not None:
            self._table_header(canvas, lay.bottom_table_y, f"bottom-{lay.bottom_k}")
        for i, line in enumerate(lay.footer):
            draw_text(canvas, line, MARGIN, lay.footer_y + i * (LINE_H - 2), 11, MUTED)
        return canvas

    def dataset(self, name: str) -> h5py.Dataset:
        """layers/<layer>/<name>, opened once for all blocks."""
        if name not in self.opened:
            self.opened[name] = self.group[name]
        return self.opened[name]

    def _columns(self) -> list[int]:
        return [MARGIN, MARGIN + 72, MARGIN + 136, MARGIN + 192, MARGIN + 346]

    def _table_header(self, canvas, y: int, what: str) -> None:
        for x, text in zip(self._columns(), (what, "value", "image", "label", "file")):
            draw_text(canvas, text, x, y, 11, MUTED, bold=True)

    def _montage_cell(self, name: str, c0: int, c1: int, valid: np.ndarray, cell: Cell) -> np.ndarray:
        ds = self.dataset(name)
        k = min(ds.shape[1], 9)
        side = max(1, math.ceil(math.sqrt(k)))
        size = self.layout.patch_in(cell)
        small = layer_patches(self.group, name, c0, c1, k, size, ds=ds)
        return montage(small, valid[:, :k], side, THIN, EMPTY_GREY, CARD_BG)

    def _exemplar_cell(self, cards: np.ndarray, cell: Cell, c0: int, c1: int) -> None:
        """Each unit's top images among one class: its preferred class when it is one of
        scan.exemplars, else the first of them; the class named in the cell."""
        ex, s = self.exemplars, self.layout.cell
        block = ex.block_of(self.classes.preferred[c0:c1] if self.classes is not None else None, c1 - c0)
        every = layer_patches(self.group, "class_patches", c0, c1, ex.k * len(ex.classes), self.layout.patch_hw,
                              ds=self.dataset("class_patches"))
        slots = block[:, None] * ex.k + np.arange(ex.k)[None, :]
        rows = np.arange(c1 - c0)[:, None]
        small = every[rows, slots]
        valid = ex.image[c0:c1][rows, slots] >= 0
        side = max(1, math.ceil(math.sqrt(ex.k)))
        _paste(cards, montage(small, valid, side, THIN, EMPTY_GREY, CARD_BG), cell.y, cell.x, s)
        for i in range(c1 - c0):
            name = self.images.class_name(int(ex.classes[block[i]]))
            draw_text(cards[i], name, cell.x + 4, cell.y + s - 15, 10, MUTED, max_width=s - 8)

    def compose(self, c0: int, c1: int, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cards of units c0..c1-1: (B, H, W, 3) uint8, and their thumbnails' source,
        the top-k montage (B, cell, cell, 3) (None-like grey where there are no patches)."""
        lay = self.layout
        b = c1 - c0
        cards = np.broadcast_to(template, (b,) + template.shape).copy()
        valid = (self.image[c0:c1] >= 0) if self.image is not None else np.ones((b, 9), bool)
        top = None
        for cell in lay.cells:
            y, x, s = cell.y, cell.x, lay.cell
            if cell.key == "top":
                top = self._montage_cell("patches", c0, c1, valid, cell)
                _paste(cards, top, y, x, *lay.px(cell))
            elif cell.key == "class":
                self._exemplar_cell(cards, cell, c0, c1)
            elif cell.key == "bottom":
                bvalid = self.bottom_image[c0:c1] >= 0
                _paste(cards, self._montage_cell("bottom_patches", c0, c1, bvalid, cell), y, x, s)
            elif cell.key.startswith("panel:"):
                m = cell.key.split(":", 1)[1]
                _paste(cards, self._montage_cell(f"panels/{m}", c0, c1, valid, cell), y, x, s)
            elif cell.key == "pattern":
                rows = self.pattern_rows[c0:c1]
                have = np.flatnonzero(rows >= 0)
                img = np.full((b, s, s, 3), EMPTY_GREY, np.uint8)
                if have.size:
                    order = np.argsort(rows[have])
                    sel = rows[have][order]
                    data = self.pattern_ds[np.unique(sel)]
                    data = data[np.searchsorted(np.unique(sel), sel)]
                    img[have[order]] = resize_patches(data[..., :3], (s, s))
                _paste(cards, img, y, x, s)
                for i in np.flatnonzero(rows < 0):
                    draw_text(cards[i], "not computed", x + s / 2, y + s / 2 - 8, 11, (250, 250, 250), align="center")
            elif cell.key == "weights":
                w = self.weights
                tiles, shown = weight_tiles(np.moveaxis(w.kernel[..., c0:c1], -1, 0), w.scale, s, w.rgb)
                _paste(cards, tiles, y, x, s)
                n = w.kernel.shape[2]
                if shown < n:
                    draw_text(cards, f"first {shown} of {n} inputs", x + s / 2, y + s - 15, 10, MUTED, align="center")
            elif cell.key == "spectrum":
                self._spectrum(cards, cell, c0, c1)
        if top is None:
            top = np.full((b, lay.cell, lay.cell, 3), EMPTY_GREY, np.uint8)
        for i in range(b):
            self._unit_text(cards[i], c0 + i)
        return cards, top

    def _spectrum(self, cards: np.ndarray, cell: Cell, c0: int, c1: int) -> None:
        lay = self.layout
        w = cell.slots * lay.cell + (cell.slots - 1) * GAP
        pad_x, axis_h = 10, 30
        ch, cw = lay.cell - axis_h - 6, w - 2 * pad_x
        counts = self.spectrum[c0:c1]
        mask, lo, hi = spectrum_bars(counts, ch, cw)
        y0, x0 = cell.y + 6, cell.x + pad_x
        region = cards[:, y0:y0 + ch, x0:x0 + cw]
        region[mask] = BAR
        cards[:, y0 + ch, x0:x0 + cw] = (90, 90, 90)
        q = self.stats.get("quantiles")
        xs = self.spectrum_x
        levels = self.quantile_levels
        median_col = None
        if q is not None and levels is not None and np.any(np.isclose(levels, 0.5)):
            med = q[c0:c1, int(np.argmin(np.abs(levels - 0.5)))]
            bucket = np.searchsorted(xs, med)  # first bucket value >= median
            bucket = np.clip(bucket, 0, len(xs) - 1)
            median_col = ((bucket - lo) * cw) // np.maximum(hi - lo + 1, 1) + cw // (2 * np.maximum(hi - lo + 1, 1))
        for i in range(c1 - c0):
            n_img = int(counts[i].sum())
            zeros = int(counts[i, (counts.shape[1] - 1) // 2])
            if median_col is not None and np.isfinite(med[i]) and 0 <= median_col[i] < cw:
                mx = x0 + int(median_col[i])
                cards[i, y0:y0 + ch, mx:mx + 2] = MEDIAN
            draw_text(cards[i], _fmt_value(float(xs[lo[i]])), x0, y0 + ch + 2, 10, MUTED)
            draw_text(cards[i], _fmt_value(float(xs[hi[i]])), x0 + cw, y0 + ch + 2, 10, MUTED, align="right")
            note = f"{n_img} images" + (f", {zeros} with max 0" if zeros else "") + " \u00b7 red: median"
            draw_text(cards[i], note, x0 + cw / 2, y0 + ch + 15, 10, MUTED, align="center", max_width=cw)

    def _unit_text(self, card: np.ndarray, c: int) -> None:
        from pipeline.render.dissection import unit_title

        lay = self.layout
        info = self.info
        draw_text(card, f"{info.name}  \u00b7  unit {c}{unit_title(self.group, c)}", MARGIN, 8, 18, (0, 0, 0),
                  bold=True, max_width=lay.width - 2 * MARGIN)
        y = lay.stats_y
        st = self.stats
        parts = []
        if "mean" in st:
            parts.append(f"mean {_fmt_value(float(st['mean'][c]))}")
        if "max" in st:
            parts.append(f"max {_fmt_value(float(st['max'][c]))}")
        if "zero_fraction" in st:
            parts.append(f"zero at {100 * float(st['zero_fraction'][c]):.1f} % of positions")
        draw_text(card, "activation: " + (" \u00b7 ".join(parts) if parts else "no statistics stored"), MARGIN, y,
                  12, INK, max_width=lay.width - 2 * MARGIN)
        y += LINE_H
        q, levels = st.get("quantiles"), self.quantile_levels
        if q is not None and levels is not None:
            for line in quantile_lines(levels, q[c], lay.width - 2 * MARGIN):
                draw_text(card, line, MARGIN, y, 12, INK, max_width=lay.width - 2 * MARGIN)
                y += LINE_H
        else:
            draw_text(card, "per-image maximum: no quantiles stored", MARGIN, y, 12, MUTED)
            y += LINE_H
        w = self.weights
        if w is not None:
            raw = w.kernel[..., c]
            norm = float(np.sqrt(np.sum(np.square(raw)))) if not w.rgb else float("nan")
            dims = "\u00d7".join(str(d) for d in w.kernel.shape[:3])
            bits = [f"{w.conv} ({dims})"]
            if not w.rgb:
                bits.append(f"\u2016w\u2016 {_fmt_value(norm)}")
            if w.bias is not None:
                bits.append(f"bias {_fmt_value(float(w.bias[c]))}")
            if w.inferred:
                bits.append(f"matched by {w.inferred}")
            draw_text(card, "weights: " + " \u00b7 ".join(bits), MARGIN, y, 12, INK, max_width=lay.width - 2 * MARGIN)
            y += LINE_H
        if self.classes is not None:
            draw_text(card, self.classes.line(c, self.images), MARGIN, y, 12, INK, max_width=lay.width - 2 * MARGIN)
            y += LINE_H
        if self.ablation is not None:
            text = self.ablation.line(c, self.images)
            draw_text(card, text or "zeroed: not among the ablated units", MARGIN, y, 12, INK if text else MUTED,
                      max_width=lay.width - 2 * MARGIN)
            y += LINE_H
        if self.pattern_value is not None:
            v = float(self.pattern_value[c])
            what = "minimised" if self.pattern_objective == "neg" else "maximised"
            draw_text(card, f"filter pattern: mean activation {what} to {_fmt_value(v)}" if np.isfinite(v)
                      else "filter pattern: not computed for this unit", MARGIN, y, 12, INK)
        if lay.k and self.value is not None:
            self._table(card, lay.table_y, self.value[c], self.image[c])
        if lay.bottom_table_y is not None and self.bottom_value is not None:
            self._table(card, lay.bottom_table_y, self.bottom_value[c], self.bottom_image[c])

    def _table(self, card: np.ndarray, y: int, values: np.ndarray, ids: np.ndarray) -> None:
        cols = self._columns()
        width = self.layout.width - MARGIN
        for r in range(min(len(values), 9)):
            yy = y + (r + 1) * ROW_H
            i = int(ids[r])
            draw_text(card, str(r + 1), cols[0], yy, 11, MUTED)
            if i < 0:
                draw_text(card, "empty slot", cols[1], yy, 11, MUTED)
                continue
            draw_text(card, _fmt_value(float(values[r])), cols[1], yy, 11)
            draw_text(card, f"#{i}", cols[2], yy, 11)
            draw_text(card, self.images.label(i), cols[3], yy, 11, max_width=cols[4] - cols[3] - 8)
            draw_text(card, self.images.file(i), cols[4], yy, 11, MUTED, max_width=width - cols[4])


def _paste(cards: np.ndarray, cells: np.ndarray, y: int, x: int, side: int, width: int | None = None) -> None:
    """Centre cells (B, h, w, 3) in the frame at (y, x), side high and width (default side) wide."""
    h, w = cells.shape[1:3]
    oy, ox = y + (side - h) // 2, x + ((side if width is None else width) - w) // 2
    cards[:, oy:oy + h, ox:ox + w] = cells


# ---------------------------------------------------------------------------- files

def card_name(unit: int) -> str:
    return f"unit_{unit:04d}.jpg"


def thumb_name(unit: int) -> str:
    return f"unit_{unit:04d}.jpg"


def thumb_size(cell: int) -> int:
    return max(48, cell // 2)


@dataclass
class LayerCardFiles:
    stored: str
    cards: dict[int, Path]  # unit -> card JPEG
    thumbs: dict[int, Path]  # unit -> thumbnail JPEG
    size: tuple[int, int]  # card (height, width)
    thumb: int  # thumbnail side


def card_bytes(image: np.ndarray) -> bytes:
    """Encode a card (H, W, 3) uint8 as JPEG (CARD_QUALITY, 4:2:0): about half a PNG's bytes,
    as a card's photo cells dominate its size, and encoded several times faster; browsers,
    Pillow and so the PDF book read it."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buf, format="JPEG", quality=CARD_QUALITY,
                                                                subsampling=2)
    return buf.getvalue()


def _save_card(path: Path, image: np.ndarray) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(card_bytes(image))
    return path


def _save_jpg(path: Path, image: np.ndarray) -> Path:
    with replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=THUMB_QUALITY)
    return path


def render_layer_cards(f: h5py.File, info: LayerInfo, cards_dir: Path, thumbs_dir: Path | None,
                       units=None, images: ImageIndex | None = None, pool: ThreadPoolExecutor | None = None,
                       bar: tqdm | None = None) -> LayerCardFiles:
    """Write the cards (and thumbnails, when thumbs_dir is given) of `units` (None: all) of one
    layer; blocks of units are composed at once, files are encoded on a thread pool."""
    images = images if images is not None else ImageIndex.read(f)
    lc = LayerCards.read(f, info, images)
    todo = np.arange(lc.channels) if units is None else np.asarray(sorted(set(int(u) for u in units
                                                                              if 0 <= int(u) < lc.channels)))
    cards_dir.mkdir(parents=True, exist_ok=True)
    if thumbs_dir is not None:
        thumbs_dir.mkdir(parents=True, exist_ok=True)
    template = lc.template()
    per_block = max(1, BLOCK_PIXELS // template.nbytes)
    side = thumb_size(lc.layout.cell)
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=2)
    out = LayerCardFiles(info.stored, {}, {}, template.shape[:2], side)
    # contiguous runs of wanted units, split into blocks
    runs = np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if todo.size else []
    blocks = [(int(run[s0]), int(run[min(s0 + per_block, len(run)) - 1]) + 1)
              for run in runs for s0 in range(0, len(run), per_block)]
    pending: list = []  # the previous block's files, encoded while the next block is composed
    for c0, c1 in blocks:
        cards, top = lc.compose(c0, c1, template)
        thumbs = resize_patches(top, (side, side)) if thumbs_dir is not None else None
        for fut in pending:
            fut.result()
        pending = []
        for i in range(c1 - c0):
            unit = c0 + i
            path = cards_dir / card_name(unit)
            pending.append(pool.submit(_save_card, path, cards[i]))
            out.cards[unit] = path
            if thumbs is not None:
                tpath = thumbs_dir / thumb_name(unit)
                pending.append(pool.submit(_save_jpg, tpath, thumbs[i]))
                out.thumbs[unit] = tpath
        if bar is not None:
            bar.update(c1 - c0)
    for fut in pending:
        fut.result()
    if own_pool:
        pool.shutdown()
    return out
