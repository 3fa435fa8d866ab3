"""Layer sheets: every unit of a layer, its top patches as a montage, channel numbers
under each cell; and the sparsity-by-depth figure.

A sheet is composed in numpy at a reduced per-patch size; matplotlib only puts the
title and channel numbers on top of the composed pixels (`canvas.draw_labels`), so
the layout (`sheet_layout`) is a pure function that tests can check without files.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, replace

import h5py
import numpy as np
from matplotlib.figure import Figure

from pipeline.patch_frames import has_frames
from pipeline.render.canvas import (
    BACKGROUND,
    MAX_SLOTS,
    Label,
    draw_labels,
    fit_px,
    grid,
    montage,
)
from pipeline.render.text import draw_text, font
from pipeline.render.patches import distinct_patches
from pipeline.render.results import LayerInfo, fmt

TARGET_PATCH_PX = 32  # per-patch size on the sheet, before the size cap
MIN_PATCH_PX = 4
MAX_SIDE_PX = 6000  # neither side of a sheet grows beyond this
MIN_WIDTH_PX = 800  # room for the title on layers with few channels
LABEL_INK = (51, 51, 51)  # unit numbers under the montages
CHUNK_BYTES = 16 * 2**20  # patches read from the file at a time (small reads stay cache-friendly)
MONTAGE_BLOCK = 256  # channels montaged at a time


@dataclass(frozen=True)
class SheetLayout:
    cols: int
    rows: int
    side: int  # montage is side x side patches
    patch_hw: tuple[int, int]  # patch size on the sheet
    thin: int  # px between patches of one channel
    gap_x: int  # px between channels, horizontally
    label_h: int  # px band under each cell for the channel number
    gap_y: int  # px below the label band
    margin: int
    title_h: int

    @property
    def cell_hw(self) -> tuple[int, int]:
        ph, pw = self.patch_hw
        return (self.side * ph + (self.side - 1) * self.thin,
                self.side * pw + (self.side - 1) * self.thin)

    @property
    def grid_hw(self) -> tuple[int, int]:
        ch, cw = self.cell_hw
        return (self.rows * (ch + self.label_h + self.gap_y) - self.gap_y,
                self.cols * (cw + self.gap_x) - self.gap_x)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole sheet in pixels."""
        gh, gw = self.grid_hw
        return (self.title_h + gh + 2 * self.margin,
                max(MIN_WIDTH_PX, gw + 2 * self.margin))


def sheet_layout(channels: int, k: int, patch_hw: tuple[int, int],
                 target_px: int = TARGET_PATCH_PX, max_side: int = MAX_SIDE_PX) -> SheetLayout:
    """Choose grid shape and per-patch size so the sheet stays within max_side.

    Patches smaller than target_px are enlarged by a whole factor; larger ones are
    shrunk (keeping their aspect) until both sheet sides fit.
    """
    cols = max(1, math.ceil(math.sqrt(channels)))
    rows = max(1, math.ceil(channels / cols))
    side = max(1, math.ceil(math.sqrt(min(max(k, 1), MAX_SLOTS))))
    h, w = patch_hw
    longest = max(h, w)
    if longest <= target_px:
        factor = max(1, target_px // longest)
        sizes = [(h * f, w * f) for f in range(factor, 0, -1)]
    else:
        # sizes that divide the patch evenly shrink fastest (plain box average): try
        # those first, down to 60 % of the target, then every size
        sides = list(range(target_px, MIN_PATCH_PX - 1, -1))
        even = [p for p in sides if longest % p == 0 and p >= 0.6 * target_px]
        sizes = [(max(1, round(h * p / longest)), max(1, round(w * p / longest)))
                 for p in even + sorted(set(sides) - set(even), reverse=True)]
    for ph, pw in sizes:
        p = max(ph, pw)
        thin = 1 if p < 24 else 2
        label_h = max(14, round(p * 0.5))
        layout = SheetLayout(cols=cols, rows=rows, side=side, patch_hw=(ph, pw), thin=thin,
                             gap_x=max(8, p // 2), label_h=label_h, gap_y=max(4, p // 8),
                             margin=24, title_h=0)
        layout = replace(layout, title_h=int(np.clip(layout.size[1] / 20, 84, 240)))
        if max(layout.size) <= max_side:
            break
    return layout


def _title_labels(info: LayerInfo, n_ok: int, k: int, width: int, top: float,
                  title_h: float, kept: int | None = None) -> list[Label]:
    shown = f"top {k} of the {kept} kept" if kept and kept > k else f"top-{k}"
    details = (f"output {fmt(info.shape)} \u00b7 receptive field {fmt(info.rf_size)} px, "
               f"stride {fmt(info.rf_stride)} \u00b7 {shown} patches per channel "
               f"from {n_ok} images")
    return [Label(width / 2, top + 0.32 * title_h, info.name,
                  fit_px(info.name, 0.38 * title_h, 0.9 * width), weight="bold", color="black"),
            Label(width / 2, top + 0.78 * title_h, details,
                  fit_px(details, 0.2 * title_h, 0.9 * width), color="0.25")]



def _placeholder_sheet(info: LayerInfo, n_ok: int, k: int) -> np.ndarray:
    width, height = MIN_WIDTH_PX, 240
    if not info.mappable and info.geometry_message:
        message = f"Layer not mappable to input patches: {info.geometry_message}"
    else:
        message = "No patches stored for this layer (run the crop stage to fill them in)."
    size = 16
    message = textwrap.fill(message, width=int(0.9 * width / (0.6 * size)))
    labels = _title_labels(info, n_ok, k, width, 16, 84)
    labels.append(Label(width / 2, 160, message, size, color="0.3", style="italic"))
    return draw_labels(np.full((height, width, 3), BACKGROUND, np.uint8), labels)


def _read_cells(g: h5py.Group, valid: np.ndarray, layout: SheetLayout, k: int) -> np.ndarray:
    """Read, shrink and montage all channels' patches: the distinct patches of the layer at
    once when they are stored so (a few hundred), else a few channels at a time."""
    ds = g["patches"]
    c = ds.shape[0]
    per_channel = max(1, k * int(np.prod(ds.shape[2:])))
    step = c if has_frames(ds) else max(1, CHUNK_BYTES // per_channel)
    ch, cw = layout.cell_hw
    cells = np.empty((c, ch, cw, 3), np.uint8)
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        drawn = distinct_patches(g, "patches", c0, c1, k, layout.patch_hw, ds=ds)
        for b0 in range(c0, c1, MONTAGE_BLOCK):  # montage in blocks: its temporaries stay small
            b1 = min(c1, b0 + MONTAGE_BLOCK)
            cells[b0:b1] = montage(drawn.rows(b0 - c0, b1 - c0), valid[b0:b1, :k], layout.side, layout.thin)
    return cells


@dataclass(frozen=True)
class SheetGrid:
    """Where compose_sheet put the units' montages on a sheet, in sheet pixels: what the book
    needs to cut a large sheet into pages between whole montages."""

    rows: int
    cols: int
    top: int  # first row of the grid (below the title)
    left: int
    pitch_y: int  # from one grid row to the next (montage, its label, the gap)
    pitch_x: int
    montage_w: int
    height: int  # of the whole sheet
    width: int


def sheet_grid(g: h5py.Group, info: LayerInfo) -> SheetGrid | None:
    """The grid of the sheet compose_sheet draws for this layer group (None: a placeholder)."""
    if not info.has_patches or 0 in g["patches"].shape[:2]:
        return None
    ds = g["patches"]
    layout = sheet_layout(ds.shape[0], min(MAX_SLOTS, ds.shape[1]), ds.shape[2:4])
    ch, cw = layout.cell_hw
    height, width = layout.size
    grid_w = layout.cols * (cw + layout.gap_x) - layout.gap_x
    return SheetGrid(rows=math.ceil(ds.shape[0] / layout.cols), cols=layout.cols, top=layout.margin + layout.title_h,
                     left=(width - grid_w) // 2, pitch_y=ch + layout.label_h + layout.gap_y,
                     pitch_x=cw + layout.gap_x, montage_w=cw, height=height, width=width)


def compose_sheet(g: h5py.Group, info: LayerInfo, n_ok: int) -> np.ndarray:
    """The finished sheet of one layer group, (H, W, 3) uint8."""
    topk_img = g["topk/image"] if "topk/image" in g else None
    if not info.has_patches or 0 in g["patches"].shape[:2]:
        k = min(MAX_SLOTS, topk_img.shape[1]) if topk_img is not None else MAX_SLOTS
        return _placeholder_sheet(info, n_ok, k)
    ds = g["patches"]
    channels, k = ds.shape[0], min(MAX_SLOTS, ds.shape[1])
    valid = (topk_img[:, :k] >= 0) if topk_img is not None else np.ones((channels, k), bool)
    layout = sheet_layout(channels, k, ds.shape[2:4])
    cells = _read_cells(g, valid, layout, k)

    ch, cw = layout.cell_hw
    gridded, origins = grid(cells, layout.cols, layout.gap_x, layout.label_h + layout.gap_y)
    height, width = layout.size
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    top = layout.margin + layout.title_h
    left = (width - gridded.shape[1]) // 2
    canvas[top:top + gridded.shape[0], left:left + gridded.shape[1]] = gridded

    # the title through matplotlib on its band only; the many unit numbers from the cards'
    # glyph atlas (matplotlib over a whole 4000 px sheet cost seconds a layer)
    canvas[:top] = draw_labels(canvas[:top], _title_labels(info, n_ok, k, width, layout.margin, layout.title_h,
                                                            kept=ds.shape[1]))
    size = max(6, round(0.72 * layout.label_h))
    line_h = font(size).height + 2
    for c, (y, x) in enumerate(origins):
        draw_text(canvas, str(c), left + x + cw / 2, top + y + ch + (layout.label_h - line_h) / 2, size, LABEL_INK,
                  align="center")
    return canvas



# ----------------------------------------------------------------------------
# sparsity by depth
# ----------------------------------------------------------------------------

def _layer_boxes(names: list[str], values: list[np.ndarray], figsize_y: float = 4.2):
    """A figure with, per layer in network order, a box of `values` over channels (box:
    quartiles, whiskers: 5th-95th percentile, NaN left out) and a line through the means."""
    n = len(names)
    fig = Figure(figsize=(max(5.5, 0.55 * n + 2.5), figsize_y), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    data = [np.asarray(v, np.float64)[np.isfinite(v)] for v in values]
    if n:
        ax.boxplot(data, positions=x, widths=0.5, whis=(5, 95), showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#c6d8ee", edgecolor="#4a6f9e"),
                   medianprops=dict(color="#4a6f9e"), whiskerprops=dict(color="#4a6f9e"),
                   capprops=dict(color="#4a6f9e"))
        ax.plot(x, [d.mean() if d.size else np.nan for d in data], color="#c0392b", marker="o", ms=4, lw=1.5,
                label="mean over channels")
    ax.set_xticks(x, names, rotation=35 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer (input \u2192 output)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax, x, data


def sparsity_figure(names: list[str], zero_fractions: list[np.ndarray], model: str = "") -> Figure:
    """Per layer (network order) the distribution over channels of the share of zero
    activations: box (quartiles), whiskers (5th-95th percentile), mean (line), and the
    share of channels that were zero everywhere (dead on this data)."""
    fig, ax, x, data = _layer_boxes(names, zero_fractions)
    if len(names):
        ax.plot(x, [(d >= 1.0).mean() if d.size else np.nan for d in data], color="0.35", marker="s", ms=3.5,
                lw=1, ls="--", label="channels zero everywhere")
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_ylabel("share of zero activations", fontsize=9)
    ax.set_title("share of zero activations per channel (box: quartiles, whiskers: 5-95 %)", fontsize=8,
                 color="0.3")
    fig.suptitle(f"Sparsity by depth{': ' + model if model else ''}", fontsize=10)
    return fig


def selectivity_figure(names: list[str], selectivity: list[np.ndarray], model: str = "") -> Figure:
    """Per layer (network order) the distribution over channels of the class selectivity
    index of the per-image maximum (Morcos et al. 2018), and the share of units above 0.5."""
    fig, ax, x, data = _layer_boxes(names, selectivity)
    if len(names):
        ax.plot(x, [(d > 0.5).mean() if d.size else np.nan for d in data], color="0.35", marker="s", ms=3.5,
                lw=1, ls="--", label="share of units with selectivity > 0.5")
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_ylabel("class selectivity index", fontsize=9)
    ax.set_title("(\u03bc_max - \u03bc_rest) / (\u03bc_max + \u03bc_rest) over class means of the per-image max\n"
                 "box: quartiles, whiskers: 5-95 % of units", fontsize=8, color="0.3")
    fig.suptitle(f"Class selectivity by depth{': ' + model if model else ''}", fontsize=10)
    return fig

