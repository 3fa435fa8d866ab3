"""Filter sheets, drawn from results.h5 only: kernels as colour or per-channel tiles
(scaled as the tutorials scale them), filter patterns with the value each reached, and
the kernel table as text.

    sheets/filters/weights_<conv>[_channels].png  kernels of a convolution
    sheets/filters/patterns_<layer>.png           one pattern per channel (or class)
    sheets/filters/kernels.txt                    every kernel of the model: layer and shape
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.render.results import as_str
from pipeline.names import shown
from pipeline.store import read_strings, replacing, stored_name

logger = logging.getLogger(__name__)

KERNEL_TABLE = "kernel_table"  # the group of filters/ that lists every kernel
SHEETS_DIR = ("sheets", "filters")


@dataclass(frozen=True)
class Kernel:
    layer: str  # qualified layer name
    kind: str  # Keras class name
    variable: str  # kernel | depthwise_kernel | pointwise_kernel
    shape: tuple[int, ...]  # (kh, kw, in, out) as Keras holds it


def kernel_table_text(kernels: list[Kernel]) -> str:
    """One line per kernel, as the tutorials print it: 'block1_conv1 (3, 3, 3, 64)'."""
    width = max((len(k.layer) for k in kernels), default=0)
    lines = []
    for k in kernels:
        extra = "" if k.variable == "kernel" else f"  {k.variable}"
        lines.append(f"{k.layer:<{width}}  {k.shape}{extra}")
    return "\n".join(lines)


def min_max(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] with the min and max of the whole array (as the tutorials do)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x, np.float32) if hi <= lo else ((x - lo) / (hi - lo)).astype(np.float32)


def colour_tiles(kernel: np.ndarray, bgr: bool = False) -> np.ndarray:
    """First-layer kernel (kh, kw, 3, out) -> (out, kh, kw, 3) RGB tiles in [0, 1]."""
    tiles = min_max(kernel).transpose(3, 0, 1, 2)
    return tiles[..., ::-1] if bgr else tiles


def channel_tiles(kernel: np.ndarray) -> np.ndarray:
    """(kh, kw, in, out) -> (out, in, kh, kw) grey tiles in [0, 1]: filters in rows, input
    channels in columns."""
    return min_max(kernel).transpose(3, 2, 0, 1)


def mean_tiles(kernel: np.ndarray, kind: str = "Conv2D") -> np.ndarray:
    """(kh, kw, in, out) -> (filters, kh, kw): each filter's mean over its input channels,
    min-max scaled over the layer. Depthwise kernels (kh, kw, C, m) give C*m filters."""
    kh, kw = kernel.shape[:2]
    if kind in ("DepthwiseConv2D", "SeparableConv2D"):
        means = kernel.reshape(kh, kw, -1)
    else:
        means = kernel.mean(axis=2)
    return min_max(means.transpose(2, 0, 1))


GAP_RGB = (0.80, 0.87, 0.95)  # between tiles: a colour no grey weight can take


def tile_grid(tiles: np.ndarray, cols: int, scale: int, gap: int = 1) -> np.ndarray:
    """(N, h, w) grey or (N, h, w, 3) colour tiles in [0, 1] -> one RGB image, row-major,
    each weight a scale x scale block, tiles separated by `gap` px of GAP_RGB."""
    if tiles.ndim == 3:
        tiles = np.repeat(tiles[..., None], 3, axis=-1)
    tiles = np.repeat(np.repeat(tiles, scale, axis=1), scale, axis=2)
    n, h, w = tiles.shape[:3]
    rows = max(1, math.ceil(n / cols))
    out = np.empty((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), np.float32)
    out[...] = GAP_RGB
    for i in range(n):  # one block copy per tile
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tiles[i]
    for i in range(n, rows * cols):  # empty slots of the last row: page white
        r, c = divmod(i, cols)
        out[max(0, r * (h + gap) - gap):, max(0, c * (w + gap) - gap):] = 1.0
    return out


def _figure(image: np.ndarray, title: str, vrange=None, xlabel=None, ylabel=None, xticks=None, yticks=None):
    """A figure of an RGB image in [0, 1] at a whole pixel zoom, with a title, optional axis
    labels and ticks, and (vrange) a grey colour bar of the weight values."""
    import matplotlib.cm
    import matplotlib.colors
    from matplotlib.figure import Figure

    dpi = 100
    h, w = image.shape[:2]
    zoom = max(1, int(700 // max(w, h)))
    iw, ih = w * zoom / dpi, h * zoom / dpi  # inches
    left = 0.35 + (0.45 if ylabel else 0) + (0.2 if yticks else 0)
    right = 0.35 + (1.1 if vrange is not None else 0)
    bottom = 0.25 + (0.45 if xlabel else 0) + (0.1 if xticks else 0)
    fig_w = max(left + iw + right, 4.0)
    title = textwrap.fill(title, width=max(30, int(fig_w * 72 / (10.5 * 0.55))))
    top = 0.35 + 0.2 * (title.count("\n") + 1)
    fig_h = bottom + ih + top
    left = (fig_w - iw - right + left) / 2 if vrange is None else left
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    ax = fig.add_axes((left / fig_w, bottom / fig_h, iw / fig_w, ih / fig_h))
    ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    ax.set_xticks(*(xticks or ([], [])))
    ax.set_yticks(*(yticks or ([], [])))
    for spine in ax.spines.values():
        spine.set_visible(False)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.text(0.5, 1 - 0.15 / fig_h, title, ha="center", va="top", fontsize=10.5, linespacing=1.4)
    if vrange is not None:
        cax = fig.add_axes(((left + iw + 0.25) / fig_w, bottom / fig_h, 0.15 / fig_w, ih / fig_h))
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(*vrange), cmap="gray")
        fig.colorbar(mappable, cax=cax, label="weight")
    return fig


def _channels_figure(tiles: np.ndarray, names: list[str], title: str, vrange, per_block: int = 16):
    """(out, in, kh, kw) grey tiles: filters in rows, input channels in columns, in blocks of
    `per_block` filters side by side, each block with its own filter numbers."""
    import matplotlib.cm
    import matplotlib.colors
    from matplotlib.figure import Figure

    out, cin, kh, kw = tiles.shape
    blocks = math.ceil(out / per_block)
    rows = min(out, per_block)
    scale = int(np.clip(560 // max(1, rows * (kh + 1)), 2, 24))
    ih, iw = rows * (kh * scale + 1) / 100, cin * (kw * scale + 1) / 100  # inches per block
    left, gap, right, bottom = 0.55, 0.55, 1.2, 0.65
    fig_w = max(left + blocks * iw + (blocks - 1) * gap + right, 4.0)
    title = textwrap.fill(title, width=max(30, int(fig_w * 72 / (10.5 * 0.55))))
    top = 0.35 + 0.2 * (title.count("\n") + 1)
    fig_h = bottom + ih + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=100, facecolor="white")
    for b in range(blocks):
        part = tiles[b * per_block:(b + 1) * per_block]
        image = tile_grid(part.reshape(-1, kh, kw), cin, scale)
        full = np.ones((rows * (kh * scale + 1) - 1, image.shape[1], 3), np.float32)
        full[:image.shape[0]] = image
        x0 = left + b * (iw + gap)
        ax = fig.add_axes((x0 / fig_w, bottom / fig_h, iw / fig_w, ih / fig_h))
        ax.imshow(full, interpolation="nearest")
        step = kw * scale + 1
        ax.set_xticks([step * i + kw * scale / 2 - 0.5 for i in range(cin)], names)
        marks = list(range(0, len(part), 4 if rows > 8 else 1))
        ax.set_yticks([(kh * scale + 1) * r + kh * scale / 2 - 0.5 for r in marks],
                      [str(b * per_block + r) for r in marks])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if b == 0:
            ax.set_ylabel("filter")
        ax.set_xlabel("input channel")
    fig.text(0.5, 1 - 0.15 / fig_h, title, ha="center", va="top", fontsize=10.5, linespacing=1.4)
    cax = fig.add_axes(((left + blocks * iw + (blocks - 1) * gap + 0.3) / fig_w, bottom / fig_h, 0.15 / fig_w,
                        ih / fig_h))
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(*vrange), cmap="gray"), cax=cax,
                 label="weight")
    return fig


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=fig.dpi, facecolor="white")
    return path


def _scale_for(h: int, cols: int, target: int = 900) -> int:
    return int(np.clip(target // max(1, cols * (h + 1)), 1, 16))


def weight_sheets(g: h5py.Group, out_dir: Path, first: bool, bgr: bool) -> list[Path]:
    kernel = g["weights"][()]
    name, kind = as_str(g.attrs.get("name", "")), as_str(g.attrs.get("kind", "Conv2D"))
    stored = stored_name(name)
    kh, kw, cin, cout = kernel.shape
    lo, hi = float(kernel.min()), float(kernel.max())
    written = []
    if first and cin == 3 and kind == "Conv2D":
        tiles = colour_tiles(kernel, bgr)
        cols = math.ceil(math.sqrt(cout))
        image = tile_grid(tiles, cols, _scale_for(kh, cols))
        title = (f"{name}: {cout} filters {kh}\u00d7{kw}\u00d7{cin} as colour "
                 f"(min-max over the layer: black {lo:.3g}, white {hi:.3g})")
        written.append(_save(_figure(image, title), out_dir / f"weights_{stored}_colour.png"))
    if first and kind == "Conv2D":
        names = ["R", "G", "B"] if cin == 3 else [str(i) for i in range(cin)]
        if bgr and cin == 3:
            names = ["B", "G", "R"]
        title = f"{name}: every filter (rows) on every input channel (columns), min-max over the layer"
        written.append(_save(_channels_figure(channel_tiles(kernel), names, title, (lo, hi)),
                             out_dir / f"weights_{stored}_channels.png"))
    if kh * kw > 1:
        tiles = mean_tiles(kernel, kind)
        n = tiles.shape[0]
        cols = math.ceil(math.sqrt(n))
        image = tile_grid(tiles, cols, _scale_for(kh, cols))
        what = "each depthwise filter" if kind in ("DepthwiseConv2D", "SeparableConv2D") else \
            "mean over input channels of each filter"
        means = kernel.reshape(kh, kw, -1) if kind in ("DepthwiseConv2D", "SeparableConv2D") else kernel.mean(axis=2)
        title = f"{name} {tuple(kernel.shape)}: {what}, {n} filters, row-major (min-max over the layer)"
        written.append(_save(_figure(image, title, vrange=(float(means.min()), float(means.max()))),
                             out_dir / f"weights_{stored}.png"))
    return written


def pattern_sheet(g: h5py.Group, attrs) -> np.ndarray:
    """Every computed pattern of one layer group as a labelled grid, (H, W, 3) uint8."""
    from pipeline.render.canvas import Label, draw_labels, grid, resize_patches

    computed = g["computed"][()]
    rows = np.flatnonzero(computed)
    channels = g["channels"][()][rows]
    values = g["value"][()][rows]
    n = len(rows)
    cols = max(1, math.ceil(math.sqrt(n)))
    size = g["patterns"].shape[1]
    tile = int(np.clip(5000 // cols - 12, 48, 224 if cols <= 4 else 160 if cols <= 8 else 112))
    tile = min(size, tile) if size >= tile else size * max(1, round(tile / size))  # small: whole-pixel zoom
    tiles = np.empty((n, tile, tile, 3), np.uint8)
    for start in range(0, n, 256):
        part = rows[start:start + 256]
        tiles[start:start + len(part)] = resize_patches(g["patterns"][part[0]:part[-1] + 1][part - part[0]],
                                                        (tile, tile))
    label_h = max(14, tile // 5)
    gap = max(6, tile // 10)
    grid_img, origins = grid(tiles, cols, gap, label_h + gap // 2)
    title_h, margin = 90, 24
    width = max(800, grid_img.shape[1] + 2 * margin)
    height = title_h + grid_img.shape[0] + label_h + 2 * margin  # the last row's labels too
    canvas = np.full((height, width, 3), 255, np.uint8)
    left = (width - grid_img.shape[1]) // 2
    top = margin + title_h
    canvas[top:top + grid_img.shape[0], left:left + grid_img.shape[1]] = grid_img
    name = as_str(g.attrs.get("name", ""))
    objective = as_str(g.attrs.get("objective", "channel"))
    labels = json.loads(as_str(g.attrs["class_names"])) if "class_names" in g.attrs else None
    what = {"channel": "maximise the channel's mean activation", "neg": "minimise the channel's mean activation",
            "class": "maximise the class logit"}.get(objective, objective)
    details = (f"{as_str(attrs.get('method', ''))}, {int(attrs.get('steps', 0))} steps at "
               f"{int(g.attrs.get('optimised_size', attrs.get('size', 0)))} px, stored at {size} px; "
               f"label: {'class' if labels else 'channel'} \u00b7 objective value reached")
    head = f"{name}: {what}"
    text = [Label(width / 2, margin + 28, head, min(26, 0.9 * width / (0.62 * len(head))), weight="bold",
                  color="black"),
            Label(width / 2, margin + 66, details, min(15, 0.9 * width / (0.55 * len(details))), color="0.25")]
    tags = [f"{shown(labels[rows[i]]) if labels else channels[i]} \u00b7 {values[i]:.3g}" for i in range(n)]
    longest = max((len(t) for t in tags), default=1)
    label_px = min(0.7 * label_h, (tile + 0.8 * gap) / (0.6 * longest))  # one size for every label
    for tag, (y, x) in zip(tags, origins):
        text.append(Label(left + x + tile / 2, top + y + tile + label_h / 2, tag, label_px))
    return draw_labels(canvas, text)


def render_filter_sheets(results_path: Path, out_dir: Path, bgr: bool | None = None) -> list[Path]:
    """Weight sheets, the kernel table and one pattern sheet per layer, from results.h5
    (or the stage's part; `bgr`: caffe-ordered first-layer kernels, default from the attrs)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(results_path, "r") as f:
        if "filters" not in f:
            return []
        root = f["filters"]
        if KERNEL_TABLE in root:
            t = root[KERNEL_TABLE]
            kernels = [Kernel(l, k, v, tuple(int(d) for d in s if d))
                       for l, k, v, s in zip(read_strings(t["layer"]), read_strings(t["kind"]),
                                             read_strings(t["variable"]), t["shape"][()])]
            path = out_dir / "kernels.txt"
            with replacing(path) as tmp:
                tmp.write_text(kernel_table_text(kernels) + "\n")
            written.append(path)
            first = kernels[0].layer if kernels else None
        else:
            first = None
        if bgr is None:
            bgr = json.loads(as_str(f.attrs.get("preprocessing", "{}"))).get("normalize") == "caffe"
        groups = [(k, g) for k, g in root.items() if isinstance(g, h5py.Group) and k != KERNEL_TABLE]
        for key, g in tqdm(groups, desc="filter sheets", unit="layer"):
            if "weights" in g:
                written += weight_sheets(g, out_dir, as_str(g.attrs.get("name", "")) == first, bgr)
            if "patterns" in g and g["computed"][()].any():
                path = out_dir / f"patterns_{key}.png"
                with replacing(path) as tmp:
                    Image.fromarray(pattern_sheet(g, root.attrs)).save(tmp, compress_level=1)
                written.append(path)
    logger.info("filter sheets: %d file(s) in %s", len(written), out_dir)
    return written
