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

What a card shows is read by card_data, where it goes is card_layout's; this module
composes the pixels and writes the files. Image work is vectorised over a block of units:
montages, panel scaling, weight tiles and spectrum bars (card_charts) are built for all
units of the block at once, and text is pasted from a glyph atlas (text), so a card costs
a few milliseconds and no figure.

Nothing here touches the model or TensorFlow.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.render.canvas import EMPTY_GREY, MAX_SLOTS, montage, resize_patches
from pipeline.render.card_charts import spectrum_bars, weight_tiles
from pipeline.render.card_data import ImageIndex, LayerData
from pipeline.render.card_layout import (CAPTION_H, GAP, LINE_H, MARGIN, ROW_H, THIN, CardLayout, Cell,
                                         layer_layout)
from pipeline.render.patches import distinct_patches, layer_patches
from pipeline.render.results import LayerInfo, fmt
from pipeline.render.text import CARD_BG, INK, draw_text, fmt_value, font
from pipeline.store import replacing

THUMB_QUALITY = 88
CARD_QUALITY = 80  # JPEG: text stays sharp on white, photo cells cost most of the bytes
BLOCK_PIXELS = 24 * 2**20  # card pixels composed at once (bytes of the uint8 block)
SPAN_UNITS = 320  # units whose patches are read and drawn at once, for all their blocks

MUTED = (110, 110, 110)
BAR = (70, 120, 180)
MEDIAN = (200, 60, 40)
BORDER = (205, 205, 205)


def quantile_lines(levels: np.ndarray, values: np.ndarray, width: int) -> list[str]:
    """The quantiles of a unit's per-image maxima in one line of 12 px text, or in two
    (levels, then values) where one would be wider than `width`: no value is cut off."""
    pct = "/".join(f"{100 * lv:g}" for lv in levels)
    text = " / ".join(fmt_value(float(v)) for v in values)
    line = f"per-image max, quantiles {pct} %: {text}"
    if font(12).width(line) <= width:
        return [line]
    return [f"per-image max, quantiles {pct} %:", "    " + text]


@dataclass
class LayerCards:
    """The cards of one layer: its data (card_data), their layout and what the footer lists
    as absent; composes the pixels of a block of units at a time."""

    data: LayerData
    layout: CardLayout
    absent: list[str] = field(default_factory=list)
    span: tuple[int, int] | None = None  # the units being drawn: their patches are read at once
    _sets: dict = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, f: h5py.File, info: LayerInfo, images: ImageIndex) -> "LayerCards":
        data = LayerData.read(f, info, images)
        layout, absent = layer_layout(data)
        return cls(data, layout, absent)

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
        info = self.data.info
        sub = (f"output {fmt(info.shape)} \u00b7 receptive field {fmt(info.rf_size)} px, stride "
               f"{fmt(info.rf_stride)} \u00b7 scanned layer {info.depth + 1} of {self.data.scanned}")
        draw_text(canvas, sub, MARGIN, 32, 12, MUTED, max_width=lay.width - 2 * MARGIN)
        if lay.k:
            k = self.data.k
            self._table_header(canvas, lay.table_y, f"top {MAX_SLOTS} of {k}" if k > MAX_SLOTS else f"top-{k}",
                               min(k, MAX_SLOTS))
        if lay.bottom_table_y is not None:
            self._table_header(canvas, lay.bottom_table_y, f"bottom-{lay.bottom_k}", lay.bottom_k)
        for i, line in enumerate(lay.footer):
            draw_text(canvas, line, MARGIN, lay.footer_y + i * (LINE_H - 2), 11, MUTED)
        return canvas

    def _columns(self) -> list[int]:
        return [MARGIN, MARGIN + 72, MARGIN + 136, MARGIN + 192, MARGIN + 346]

    def _table_header(self, canvas, y: int, what: str, rows: int) -> None:
        """A table's column titles and its rank numbers, the same on every card of the layer."""
        cols = self._columns()
        for x, text in zip(cols, (what, "value", "image", "label", "file")):
            draw_text(canvas, text, x, y, 11, MUTED, bold=True)
        for r in range(rows):
            draw_text(canvas, str(r + 1), cols[0], y + (r + 1) * ROW_H, 11, MUTED)

    def patches(self, name: str, c0: int, c1: int, k: int, size: tuple[int, int]) -> np.ndarray:
        """layer_patches of units c0:c1. Within `span`, stored patches (not panels, which
        every unit has its own of) are read and drawn for the whole span on the first call:
        each distinct patch is resized once for all the span's blocks, not once a block."""
        ds = self.data.dataset(name)
        lo, hi = self.span or (c0, c1)
        if name.startswith("panels/") or not lo <= c0 < c1 <= hi:
            return layer_patches(self.data.group, name, c0, c1, k, size, ds=ds)
        key = (name, k, tuple(size), lo, hi)
        if key not in self._sets:
            self._sets = {kk: v for kk, v in self._sets.items() if kk[-2:] == (lo, hi)}  # an earlier span's go
            self._sets[key] = distinct_patches(self.data.group, name, lo, hi, k, size, ds=ds)
        return self._sets[key].rows(c0 - lo, c1 - lo)

    def _montage_cell(self, name: str, c0: int, c1: int, valid: np.ndarray, cell: Cell) -> np.ndarray:
        ds = self.data.dataset(name)
        k = min(ds.shape[1], MAX_SLOTS)
        side = max(1, math.ceil(math.sqrt(k)))
        size = self.layout.patch_in(cell)
        small = self.patches(name, c0, c1, k, size)
        return montage(small, valid[:, :k], side, THIN, EMPTY_GREY, CARD_BG)

    def _exemplar_cell(self, cards: np.ndarray, cell: Cell, c0: int, c1: int) -> None:
        """Each unit's top images among one class: its preferred class when it is one of
        scan.exemplars, else the first of them; the class named in the cell."""
        ex, s = self.data.exemplars, self.layout.cell
        block = ex.block_of(self.data.classes.preferred[c0:c1] if self.data.classes is not None else None, c1 - c0)
        every = self.patches("class_patches", c0, c1, ex.k * len(ex.classes), self.layout.patch_hw)
        slots = block[:, None] * ex.k + np.arange(ex.k)[None, :]
        rows = np.arange(c1 - c0)[:, None]
        small = every[rows, slots]
        valid = ex.image[c0:c1][rows, slots] >= 0
        side = max(1, math.ceil(math.sqrt(ex.k)))
        _paste(cards, montage(small, valid, side, THIN, EMPTY_GREY, CARD_BG), cell.y, cell.x, s)
        for i in range(c1 - c0):
            name = self.data.images.class_name(int(ex.classes[block[i]]))
            draw_text(cards[i], name, cell.x + 4, cell.y + s - 15, 10, MUTED, max_width=s - 8)

    def compose(self, c0: int, c1: int, template: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cards of units c0..c1-1: (B, H, W, 3) uint8, and their thumbnails' source,
        the top-k montage (B, cell, cell, 3) (None-like grey where there are no patches)."""
        lay = self.layout
        b = c1 - c0
        cards = np.broadcast_to(template, (b,) + template.shape).copy()
        valid = (self.data.image[c0:c1] >= 0) if self.data.image is not None else np.ones((b, MAX_SLOTS), bool)
        top = None
        for cell in lay.cells:
            y, x, s = cell.y, cell.x, lay.cell
            if cell.key == "top":
                top = self._montage_cell("patches", c0, c1, valid, cell)
                _paste(cards, top, y, x, *lay.px(cell))
            elif cell.key == "class":
                self._exemplar_cell(cards, cell, c0, c1)
            elif cell.key == "bottom":
                bvalid = self.data.bottom_image[c0:c1] >= 0
                _paste(cards, self._montage_cell("bottom_patches", c0, c1, bvalid, cell), y, x, s)
            elif cell.key.startswith("panel:"):
                m = cell.key.split(":", 1)[1]
                _paste(cards, self._montage_cell(f"panels/{m}", c0, c1, valid, cell), y, x, s)
            elif cell.key == "pattern":
                rows = self.data.pattern_rows[c0:c1]
                have = np.flatnonzero(rows >= 0)
                img = np.full((b, s, s, 3), EMPTY_GREY, np.uint8)
                if have.size:
                    order = np.argsort(rows[have])
                    sel = rows[have][order]
                    data = self.data.pattern_ds[np.unique(sel)]
                    data = data[np.searchsorted(np.unique(sel), sel)]
                    img[have[order]] = resize_patches(data[..., :3], (s, s))
                _paste(cards, img, y, x, s)
                for i in np.flatnonzero(rows < 0):
                    draw_text(cards[i], "not computed", x + s / 2, y + s / 2 - 8, 11, (250, 250, 250), align="center")
            elif cell.key == "weights":
                w = self.data.weights
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
        counts = self.data.spectrum[c0:c1]
        mask, lo, hi = spectrum_bars(counts, ch, cw)
        y0, x0 = cell.y + 6, cell.x + pad_x
        region = cards[:, y0:y0 + ch, x0:x0 + cw]
        region[mask] = BAR
        cards[:, y0 + ch, x0:x0 + cw] = (90, 90, 90)
        q = self.data.stats.get("quantiles")
        xs = self.data.spectrum_x
        levels = self.data.quantile_levels
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
            draw_text(cards[i], fmt_value(float(xs[lo[i]])), x0, y0 + ch + 2, 10, MUTED)
            draw_text(cards[i], fmt_value(float(xs[hi[i]])), x0 + cw, y0 + ch + 2, 10, MUTED, align="right")
            note = f"{n_img} images" + (f", {zeros} with max 0" if zeros else "") + " \u00b7 red: median"
            draw_text(cards[i], note, x0 + cw / 2, y0 + ch + 15, 10, MUTED, align="center", max_width=cw)

    def _unit_text(self, card: np.ndarray, c: int) -> None:
        from pipeline.render.dissection import unit_title

        lay = self.layout
        info = self.data.info
        draw_text(card, f"{info.name}  \u00b7  unit {c}{unit_title(self.data.group, c)}", MARGIN, 8, 18, (0, 0, 0),
                  bold=True, max_width=lay.width - 2 * MARGIN)
        y = lay.stats_y
        st = self.data.stats
        parts = []
        if "mean" in st:
            parts.append(f"mean {fmt_value(float(st['mean'][c]))}")
        if "max" in st:
            parts.append(f"max {fmt_value(float(st['max'][c]))}")
        if "zero_fraction" in st:
            parts.append(f"zero at {100 * float(st['zero_fraction'][c]):.1f} % of positions")
        draw_text(card, "activation: " + (" \u00b7 ".join(parts) if parts else "no statistics stored"), MARGIN, y,
                  12, INK, max_width=lay.width - 2 * MARGIN)
        y += LINE_H
        q, levels = st.get("quantiles"), self.data.quantile_levels
        if q is not None and levels is not None:
            for line in quantile_lines(levels, q[c], lay.width - 2 * MARGIN):
                draw_text(card, line, MARGIN, y, 12, INK, max_width=lay.width - 2 * MARGIN)
                y += LINE_H
        else:
            draw_text(card, "per-image maximum: no quantiles stored", MARGIN, y, 12, MUTED)
            y += LINE_H
        w = self.data.weights
        if w is not None:
            raw = w.kernel[..., c]
            norm = float(np.sqrt(np.sum(np.square(raw)))) if not w.rgb else float("nan")
            dims = "\u00d7".join(str(d) for d in w.kernel.shape[:3])
            bits = [f"{w.conv} ({dims})"]
            if not w.rgb:
                bits.append(f"\u2016w\u2016 {fmt_value(norm)}")
            if w.bias is not None:
                bits.append(f"bias {fmt_value(float(w.bias[c]))}")
            if w.inferred:
                bits.append(f"matched by {w.inferred}")
            draw_text(card, "weights: " + " \u00b7 ".join(bits), MARGIN, y, 12, INK, max_width=lay.width - 2 * MARGIN)
            y += LINE_H
        if self.data.classes is not None:
            draw_text(card, self.data.classes.line(c, self.data.images), MARGIN, y, 12, INK, max_width=lay.width - 2 * MARGIN)
            y += LINE_H
        if self.data.ablation is not None:
            text = self.data.ablation.line(c, self.data.images)
            draw_text(card, text or "zeroed: not among the ablated units", MARGIN, y, 12, INK if text else MUTED,
                      max_width=lay.width - 2 * MARGIN)
            y += LINE_H
        if self.data.pattern_value is not None:
            v = float(self.data.pattern_value[c])
            what = "minimised" if self.data.pattern_objective == "neg" else "maximised"
            draw_text(card, f"filter pattern: mean activation {what} to {fmt_value(v)}" if np.isfinite(v)
                      else "filter pattern: not computed for this unit", MARGIN, y, 12, INK)
        if lay.k and self.data.value is not None:
            self._table(card, lay.table_y, self.data.value[c], self.data.image[c])
        if lay.bottom_table_y is not None and self.data.bottom_value is not None:
            self._table(card, lay.bottom_table_y, self.data.bottom_value[c], self.data.bottom_image[c])

    def _table(self, card: np.ndarray, y: int, values: np.ndarray, ids: np.ndarray) -> None:
        cols = self._columns()
        width = self.layout.width - MARGIN
        for r in range(min(len(values), MAX_SLOTS)):
            yy = y + (r + 1) * ROW_H
            i = int(ids[r])
            if i < 0:
                draw_text(card, "empty slot", cols[1], yy, 11, MUTED)
                continue
            draw_text(card, fmt_value(float(values[r])), cols[1], yy, 11)
            draw_text(card, f"#{i}", cols[2], yy, 11)
            draw_text(card, self.data.images.label(i), cols[3], yy, 11, max_width=cols[4] - cols[3] - 8)
            draw_text(card, self.data.images.file(i), cols[4], yy, 11, MUTED, max_width=width - cols[4])


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
    """Encode a card (H, W, 3) uint8 as JPEG (CARD_QUALITY, 4:2:0, the standard Huffman
    tables): about 0.4x a PNG's bytes, as a card's photo cells dominate its size, and
    encoded faster; browsers, Pillow and so the PDF book read it. Tables fitted to each
    card (optimize) would save 4.5 % of the bytes but double the encoding's CPU (5.4 against
    2.8 ms a card, a quarter of a card's cost); quality 80 against 85 saves 12 %, the text as sharp."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, np.uint8)).save(buf, format="JPEG", quality=CARD_QUALITY,
                                                                subsampling=2)
    return buf.getvalue()


def _save_card(path: Path, image: np.ndarray) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(card_bytes(image))
    return path


def _save_thumb(path: Path, top: np.ndarray, side: int) -> Path:
    """The thumbnail: the top-k montage area-averaged to side x side by Pillow's box filter,
    on the encoding thread (0.3 ms of CPU a thumbnail against 0.9 ms for canvas's float resize)."""
    with replacing(path) as tmp:
        Image.fromarray(np.ascontiguousarray(top)).resize((side, side), Image.Resampling.BOX).save(
            tmp, format="JPEG", quality=THUMB_QUALITY)
    return path


def render_layer_cards(f: h5py.File, info: LayerInfo, cards_dir: Path, thumbs_dir: Path | None,
                       units=None, images: ImageIndex | None = None, pool: ThreadPoolExecutor | None = None,
                       bar: tqdm | None = None) -> LayerCardFiles:
    """Write the cards (and thumbnails, when thumbs_dir is given) of `units` (None: all) of one
    layer; blocks of units are composed at once, files are encoded on a thread pool."""
    images = images if images is not None else ImageIndex.read(f)
    lc = LayerCards.read(f, info, images)
    todo = np.arange(lc.data.channels) if units is None else np.asarray(sorted(set(int(u) for u in units
                                                                              if 0 <= int(u) < lc.data.channels)))
    cards_dir.mkdir(parents=True, exist_ok=True)
    if thumbs_dir is not None:
        thumbs_dir.mkdir(parents=True, exist_ok=True)
    template = lc.template()
    per_block = max(1, BLOCK_PIXELS // template.nbytes)
    side = thumb_size(lc.layout.cell)
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=2)
    out = LayerCardFiles(info.stored, {}, {}, template.shape[:2], side)
    # contiguous runs of wanted units, split into spans (patches read at once), then blocks
    runs = np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if todo.size else []
    spans = [(int(run[s0]), int(run[min(s0 + SPAN_UNITS, len(run)) - 1]) + 1)
             for run in runs for s0 in range(0, len(run), SPAN_UNITS)]
    blocks = [(span, b0, min(b0 + per_block, span[1])) for span in spans for b0 in range(span[0], span[1], per_block)]
    pending: list = []  # the previous block's files, encoded while the next block is composed
    for span, c0, c1 in blocks:
        lc.span = span
        cards, top = lc.compose(c0, c1, template)
        for fut in pending:
            fut.result()
        pending = []
        for i in range(c1 - c0):
            unit = c0 + i
            path = cards_dir / card_name(unit)
            pending.append(pool.submit(_save_card, path, cards[i]))
            out.cards[unit] = path
            if thumbs_dir is not None:
                tpath = thumbs_dir / thumb_name(unit)
                pending.append(pool.submit(_save_thumb, tpath, top[i], side))
                out.thumbs[unit] = tpath
        if bar is not None:
            bar.update(c1 - c0)
    for fut in pending:
        fut.result()
    lc.span, lc._sets = None, {}
    if own_pool:
        pool.shutdown()
    return out


# ---------------------------------------------------------------------------- many layers

PARALLEL_MIN_CARDS = 512  # fewer cards: two worker processes' start (about a second each) costs more
CHUNK_UNITS = SPAN_UNITS  # units a worker draws at a time: even shares of a few seconds, each chunk
# drawing its distinct patches once (fewer, larger chunks repeat fewer of them)


@dataclass
class CardJob:
    """The cards of one layer to draw: `units` (None: every unit) into cards_dir, and
    thumbnails into thumbs_dir where it is given."""

    info: LayerInfo
    units: list[int] | None
    cards_dir: Path
    thumbs_dir: Path | None


def _chunk_cards(results: str, stored: str, units: list[int], cards_dir: Path,
                 thumbs_dir: Path | None) -> LayerCardFiles:
    """A worker process's share: some units of one layer, read from results.h5 here."""
    from pipeline.render.results import read_layers

    with h5py.File(results, "r") as f:
        info = next(i for i in read_layers(f) if i.stored == stored)
        return render_layer_cards(f, info, cards_dir, thumbs_dir, units=units,
                                  images=_images(results, Path(results).stat().st_mtime_ns))


def _channels(info: LayerInfo) -> int:
    return int(info.shape[-1]) if info.shape else 0


@lru_cache(maxsize=1)
def _images(results: str, mtime_ns: int) -> ImageIndex:
    """The run's image index, read once per worker process and version of results.h5."""
    with h5py.File(results, "r") as f:
        return ImageIndex.read(f)


class CardRender:
    """The cards of many layers. With PARALLEL_MIN_CARDS or more, two worker processes
    (spawned: no TensorFlow, no inherited HDF5 handles) draw them in chunks of units from
    the start, while the caller draws the sheets; the chunks holding `first` (stored layer
    name -> units: the book's) go first, so `first_files` has them early, then the `then`
    tasks ((function, args): the per-image sheets), then the rest; `result` waits for every
    card. Fewer cards are drawn in this process, all at the first of the two calls, and the
    `then` tasks when asked for. The files are the same either way."""

    def __init__(self, f: h5py.File, jobs: list[CardJob], workers: int | None = None,
                 min_cards: int | None = None, first: dict[str, list[int]] | None = None,
                 then: list | None = None):
        self.f, self.jobs, self.first, self.then = f, jobs, first or {}, list(then or [])
        self.then_futures: list = []
        self.total = sum(len(j.units) if j.units is not None else _channels(j.info) for j in jobs)
        if workers is None:
            workers = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self.pool, self.futures, self._all = None, [], None
        if workers > 1 and self.total >= max(1, PARALLEL_MIN_CARDS if min_cards is None else min_cards):
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            chunks = []
            for job in jobs:
                units = list(range(_channels(job.info))) if job.units is None else sorted(job.units)
                chunks += [(job, units[s:s + CHUNK_UNITS]) for s in range(0, len(units), CHUNK_UNITS)]
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

            def submit(queued):  # network and unit order within each group
                self.futures += [(job, chunk, self.pool.submit(_chunk_cards, self.f.filename, job.info.stored,
                                                               chunk, job.cards_dir, job.thumbs_dir))
                                 for job, chunk in queued]

            submit([jc for jc in chunks if self._early(*jc)])
            self.then_futures = [self.pool.submit(fn, *args) for fn, args in self.then]
            submit([jc for jc in chunks if not self._early(*jc)])

    def _early(self, job: CardJob, chunk: list[int]) -> bool:
        return not set(self.first.get(job.info.stored, ())).isdisjoint(chunk)

    def __enter__(self) -> "CardRender":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:  # on an error in the caller too: no worker left drawing
            self.pool.shutdown(cancel_futures=True)

    def then_results(self, bar: tqdm | None = None) -> list:
        """The results of the `then` tasks (functions of picklable arguments, e.g. the per-image
        sheets): from the workers, queued after the book's chunks; without workers, run here now."""
        out = []
        for i, (fn, args) in enumerate(self.then):
            out.append(self.then_futures[i].result() if self.pool is not None else fn(*args))
            if bar is not None:
                bar.update(1)
        return out

    def first_files(self) -> dict[str, LayerCardFiles]:
        """Stored layer name -> the card files of at least its `first` units, once written."""
        if self.pool is None:
            return self.result()
        return self._gather([(job, chunk, fut) for job, chunk, fut in self.futures if self._early(job, chunk)])

    def result(self) -> dict[str, LayerCardFiles]:
        """Stored layer name -> its card files, once every card is written."""
        if self._all is not None:
            return self._all
        if self.pool is None:
            out: dict[str, LayerCardFiles] = {}
            images = ImageIndex.read(self.f)
            with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=self.total, desc="unit cards",
                                                                 unit="card") as bar:
                for job in self.jobs:
                    out[job.info.stored] = render_layer_cards(self.f, job.info, job.cards_dir, job.thumbs_dir,
                                                              units=job.units, images=images, pool=pool, bar=bar)
        else:
            with tqdm(total=self.total, desc="unit cards", unit="card") as bar:
                out = self._gather(self.futures, bar)
        self._all = out
        return out

    def _gather(self, futures, bar: tqdm | None = None) -> dict[str, LayerCardFiles]:
        out: dict[str, LayerCardFiles] = {}
        order = {id(job): i for i, job in enumerate(self.jobs)}
        for job, chunk, fut in sorted(futures, key=lambda jcf: (order[id(jcf[0])], jcf[1][0])):
            part = fut.result()
            got = out.setdefault(job.info.stored, LayerCardFiles(part.stored, {}, {}, part.size, part.thumb))
            got.cards.update(part.cards)  # chunks in unit order: the files are listed in unit order
            got.thumbs.update(part.thumbs)
            if bar is not None:
                bar.update(len(chunk))
        return out
