"""Where everything goes on a unit card: sizes, the cells a layer's cards carry (and what
the footer says is absent), and the packing of cells, statistics, tables and footer.

Pure functions of the layer's data: no pixels are drawn here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.render.canvas import MAX_SLOTS
from pipeline.render.card_data import LayerData
from pipeline.render.text import wrap

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
MIN_CELL = 120  # a cell's side at the least (room for its caption and the weights grid)
STATS_LINES = 3  # the activation line and the quantiles (one line, or two where they do not fit)

PANEL_TITLES = {"deconv": "deconv", "guided": "guided backprop", "gradient": "gradient"}


def patch_px(hw: tuple[int, int]) -> tuple[int, int]:
    """Size of one patch on a card: small patches enlarged by a whole factor, large ones shrunk."""
    h, w = int(hw[0]), int(hw[1])
    longest = max(h, w, 1)
    if longest <= MAX_PATCH:
        f = max(1, TARGET_PATCH // longest)
        return h * f, w * f
    return max(1, round(h * TARGET_PATCH / longest)), max(1, round(w * TARGET_PATCH / longest))


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
                footer: list[str], side: int = 3) -> CardLayout:
    """Pack the cells, in order, into the first free place of a grid COLS slots wide (a
    cell spans `slots` columns and `rows` rows), and stack the statistics, the table(s)
    and the footer below them."""
    ph, pw = patch_hw
    cell = max(side * max(ph, pw) + (side - 1) * THIN, MIN_CELL)
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
    y += (min(k, MAX_SLOTS) + 1) * ROW_H + 8 if k else 0
    bottom_table_y = None
    if bottom_k:
        bottom_table_y = y
        y += (min(bottom_k, MAX_SLOTS) + 1) * ROW_H + 8
    footer_y = y
    y += len(footer) * (LINE_H - 2) + MARGIN - 4
    return CardLayout(patch_hw=(ph, pw), cell=cell, cells=placed, width=width, height=y, stats_y=stats_y,
                      table_y=table_y, bottom_table_y=bottom_table_y, footer_y=footer_y, footer=footer, k=k,
                      bottom_k=bottom_k)


def layer_layout(d: LayerData) -> tuple[CardLayout, list[str]]:
    """The layout of a layer's cards, and what results.h5 does not hold for them (each with
    the stage or key that would fill it in): the cells follow from what the layer has."""
    patch_hw = d.patch_hw
    cells, absent = [], []
    kk = min(d.k, MAX_SLOTS)
    if patch_hw is not None:
        shown = f"top {kk} of {d.k}" if d.k > kk else f"top-{kk}"
        cells.append(Cell("top", f"{shown} patches", slots=2, rows=2))  # the card's main picture
    elif d.info.mappable:
        absent.append("patches (stages=[crop])")
    else:
        absent.append(f"patches: {d.info.geometry_message or 'layer not mappable to the input'}")
    if d.exemplars is not None:
        cells.append(Cell("class", f"top-{d.exemplars.k} within one class"))
    for m in d.panel_methods:
        cells.append(Cell(f"panel:{m}", PANEL_TITLES.get(m, m)))
    if not d.panel_methods and patch_hw is not None:
        absent.append("deconv/backprop panels (stages=[panels], panels.layers=all)")
    if d.pattern_rows is not None:
        cells.append(Cell("pattern", "filter pattern" + (" (minimised)" if d.pattern_objective == "neg" else "")))
    else:
        absent.append("filter pattern (stages=[filters])")
    bk = min(d.bottom_image.shape[1], MAX_SLOTS) if d.bottom_image is not None else 0
    if "bottom_patches" in d.group and d.bottom_image is not None:
        cells.append(Cell("bottom", f"bottom-{bk} patches"))
    elif d.bottom_image is None:
        absent.append(f"bottom-k (scan.bottomk={MAX_SLOTS})")
    if d.weights is not None:
        cells.append(Cell("weights", "weights" + (" (RGB)" if d.weights.rgb else " per input")))
    else:
        absent.append("weights (stages=[filters])")
    if d.spectrum is not None:
        cells.append(Cell("spectrum", "per-image maximum: log-bucket counts", slots=2))
    else:
        absent.append("activation spectrum")
    stats_lines = STATS_LINES + sum(x is not None for x in (d.weights, d.pattern_value, d.classes, d.ablation))
    ph, pw = patch_px(patch_hw or (40, 40))
    text_w = COLS * max(3 * max(ph, pw) + 2 * THIN, MIN_CELL) + (COLS - 1) * GAP
    footer = wrap("not in results.h5: " + " \u00b7 ".join(absent), 11, text_w) if absent else []
    if d.k > kk:  # the card has room for MAX_SLOTS; the rest are one read away
        footer += wrap(f"ranks {kk + 1}-{d.k} of every unit: results.h5 layers/{d.info.stored}/topk and patches",
                       11, text_w)
    bottom_k = bk if d.bottom_value is not None else 0
    return card_layout(cells, (ph, pw), d.k, bottom_k, stats_lines, footer), absent
