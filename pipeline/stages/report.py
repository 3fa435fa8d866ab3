"""Report stage: render per-layer sheets and a static index.html from results.h5.

Everything here is read from the results file; no model is loaded. A sheet shows
every channel of one layer as a small montage of its top patches (best first,
row-major), composed in numpy at a reduced per-patch size. Matplotlib is only used
to put the title and channel numbers on top of the composed pixels.

The composition helpers (`resize_patches`, `montage`, `grid`, `sheet_layout`, `draw_labels`)
are pure functions on arrays so they can be tested without any files.
"""

from __future__ import annotations

import html
import logging
import math
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import IdentityTransform
from PIL import Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

MAX_SLOTS = 9  # top-9 patches per channel
TARGET_PATCH_PX = 32  # per-patch size on the sheet, before the size cap
MIN_PATCH_PX = 4
MAX_SIDE_PX = 6000  # neither side of a sheet grows beyond this
MIN_WIDTH_PX = 800  # room for the title on layers with few channels
DPI = 150
EMPTY_GREY = 128
BACKGROUND = 255
CHUNK_BYTES = 16 * 2**20  # patches read from the file at a time (small reads stay cache-friendly)


# ----------------------------------------------------------------------------
# pure composition helpers
# ----------------------------------------------------------------------------

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
    """Resize uint8 images (..., h, w, 3) to (..., out_h, out_w, 3).

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
    x = patches.reshape((-1, h, w, 3))
    if h % oh == 0 and w % ow == 0:  # whole-factor box average: integer sums of strided views
        fh, fw = h // oh, w // ow
        acc_t = np.uint16 if fh * fw * 255 < 2**16 else np.uint32
        rows = np.zeros((x.shape[0], oh, w, 3), acc_t)
        for t in range(fh):
            np.add(rows, x[:, t::fh], out=rows)
        acc = np.zeros((x.shape[0], oh, ow, 3), acc_t)
        for t in range(fw):
            np.add(acc, rows[:, :, t::fw], out=acc)
        out = (acc + (fh * fw) // 2) // (fh * fw)
    else:
        out = np.rint(_resample_axis(_resample_axis(x, 1, oh), 2, ow))
    return np.clip(out, 0, 255).astype(np.uint8).reshape(lead + (oh, ow, 3))


def montage(patches: np.ndarray, valid: np.ndarray, side: int, thin: int,
            empty: int = EMPTY_GREY, background: int = BACKGROUND) -> np.ndarray:
    """Compose each channel's patches into one side x side montage.

    patches (C, K, h, w, 3) uint8, valid (C, K) bool. Rank k goes to row k // side,
    column k % side; its top-left pixel is (row * (h + thin), col * (w + thin)).
    Invalid slots and slots beyond K are filled with `empty`; the `thin` lines
    between patches with `background`. Returns (C, side*h + (side-1)*thin,
    side*w + (side-1)*thin, 3) uint8.
    """
    c, k, h, w = patches.shape[:4]
    out = np.full((c, side * h + (side - 1) * thin, side * w + (side - 1) * thin, 3),
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


# ----------------------------------------------------------------------------
# reading results.h5
# ----------------------------------------------------------------------------

def _as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _as_str(value.item())
    return str(value)


def _ints(value, default=(0, 0)) -> tuple[int, ...]:
    if value is None:
        return tuple(default)
    return tuple(int(v) for v in np.atleast_1d(value))


@dataclass(frozen=True)
class LayerInfo:
    stored: str
    name: str
    shape: tuple[int, ...]
    rf_size: tuple[int, ...]
    rf_stride: tuple[int, ...]
    depth: int
    mappable: bool
    geometry_message: str
    sparsity: float | None  # mean zero fraction over channels
    has_patches: bool


def _layer_info(stored: str, g: h5py.Group) -> LayerInfo:
    a = g.attrs
    zf = g["stats/zero_fraction"][()] if "stats/zero_fraction" in g else None
    return LayerInfo(
        stored=stored,
        name=_as_str(a.get("name", stored)),
        shape=_ints(a.get("shape"), ()),
        rf_size=_ints(a.get("rf_size")),
        rf_stride=_ints(a.get("rf_stride")),
        depth=int(a.get("depth", 0)),
        mappable=bool(a.get("mappable", True)),
        geometry_message=_as_str(a.get("geometry_message", "")),
        sparsity=float(np.mean(zf)) if zf is not None and zf.size else None,
        has_patches="patches" in g,
    )


def _layers(f: h5py.File) -> list[LayerInfo]:
    if "layers" not in f:
        return []
    infos = [_layer_info(name, g) for name, g in f["layers"].items() if isinstance(g, h5py.Group)]
    return sorted(infos, key=lambda i: (i.depth, i.stored))


def layer_names(results_path: Path) -> list[str]:
    """Stored layer names in network order (depth)."""
    with h5py.File(results_path, "r") as f:
        return [i.stored for i in _layers(f)]


def _str_array(ds) -> list[str]:
    return [_as_str(s) for s in ds.asstr()[()]] if ds.dtype.kind in "OS" else list(map(str, ds[()]))


# ----------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------

def _fmt(t: tuple[int, ...], sep: str = "\u00d7") -> str:
    return sep.join(str(v) for v in t) if t else "?"


@dataclass(frozen=True)
class Label:
    x: float  # centre, pixels from the left
    y: float  # centre, pixels from the top
    text: str
    size_px: float
    weight: str = "normal"
    color: str = "0.2"
    style: str = "normal"


def _fit_px(text: str, size_px: float, width: float) -> float:
    """Font size in px, shrunk so that one line of `text` roughly fits `width`."""
    longest = max((len(line) for line in text.splitlines()), default=1)
    return min(size_px, width / (0.6 * max(longest, 1)))


def draw_labels(canvas: np.ndarray, labels: list[Label]) -> np.ndarray:
    """Return canvas (H, W, 3) uint8 with the labels' text drawn on it.

    Matplotlib renders the text alone on white at the canvas' exact pixel size; the
    two layers are combined by keeping the darker pixel, so text must go on light
    background (title band, label bands) and leaves the patches untouched.
    """
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


def _title_labels(info: LayerInfo, n_ok: int, k: int, width: int, top: float,
                  title_h: float) -> list[Label]:
    details = (f"output {_fmt(info.shape)} \u00b7 receptive field {_fmt(info.rf_size)} px, "
               f"stride {_fmt(info.rf_stride)} \u00b7 top-{k} patches per channel "
               f"from {n_ok} images")
    return [Label(width / 2, top + 0.32 * title_h, info.name,
                  _fit_px(info.name, 0.38 * title_h, 0.9 * width), weight="bold", color="black"),
            Label(width / 2, top + 0.78 * title_h, details,
                  _fit_px(details, 0.2 * title_h, 0.9 * width), color="0.25")]


def _write_png(path: Path, image: np.ndarray) -> None:
    # low zlib effort: sheets are mostly photo pixels, higher levels cost seconds for little
    Image.fromarray(image).save(path, format="PNG", compress_level=1, dpi=(DPI, DPI))


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


def _read_cells(ds: h5py.Dataset, valid: np.ndarray, layout: SheetLayout, k: int) -> np.ndarray:
    """Read, shrink and montage all channels' patches, a few channels at a time."""
    c = ds.shape[0]
    per_channel = max(1, k * int(np.prod(ds.shape[2:])))
    step = max(1, CHUNK_BYTES // per_channel)
    ch, cw = layout.cell_hw
    cells = np.empty((c, ch, cw, 3), np.uint8)
    for c0 in range(0, c, step):
        c1 = min(c, c0 + step)
        small = resize_patches(ds[c0:c1, :k], layout.patch_hw)
        cells[c0:c1] = montage(small, valid[c0:c1, :k], layout.side, layout.thin)
    return cells


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
    cells = _read_cells(ds, valid, layout, k)

    ch, cw = layout.cell_hw
    gridded, origins = grid(cells, layout.cols, layout.gap_x, layout.label_h + layout.gap_y)
    height, width = layout.size
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    top = layout.margin + layout.title_h
    left = (width - gridded.shape[1]) // 2
    canvas[top:top + gridded.shape[0], left:left + gridded.shape[1]] = gridded

    labels = _title_labels(info, n_ok, k, width, layout.margin, layout.title_h)
    label_px = 0.72 * layout.label_h
    labels += [Label(left + x + cw / 2, top + y + ch + layout.label_h / 2, str(c), label_px)
               for c, (y, x) in enumerate(origins)]
    return draw_labels(canvas, labels)


# ----------------------------------------------------------------------------
# index.html
# ----------------------------------------------------------------------------

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.4em 0.8em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.thumb { max-width: 320px; max-height: 320px; border: 1px solid #ccc; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #777; font-size: 0.85em; }
"""


def _esc(value) -> str:
    return html.escape(_as_str(value), quote=True)


def _index_html(attrs, infos: list[LayerInfo], sheets: dict[str, Path], out_dir: Path,
                paths: list[str], ok: np.ndarray, errors: list[str]) -> str:
    model = _as_str(attrs.get("model", "model"))
    skipped = [(p, e) for p, good, e in zip(paths, ok, errors) if not good]
    rows = []
    for i in infos:
        rel = sheets[i.stored].relative_to(out_dir).as_posix()
        href = _esc(quote(rel))
        sparsity = "&ndash;" if i.sparsity is None else f"{i.sparsity:.3f}"
        note = "" if i.mappable else f'<div class="note">{_esc(i.geometry_message)}</div>'
        rows.append(
            f"<tr><td class=\"num\">{i.depth}</td><td>{_esc(i.name)}{note}</td>"
            f"<td>{_esc(_fmt(i.shape))}</td>"
            f"<td>{_esc(_fmt(i.rf_size))} / {_esc(_fmt(i.rf_stride))}</td>"
            f"<td class=\"num\">{sparsity}</td>"
            f"<td><a href=\"{href}\"><img class=\"thumb\" loading=\"lazy\" src=\"{href}\" "
            f"alt=\"sheet of {_esc(i.name)}\"></a></td></tr>")
    skipped_html = ""
    if skipped:
        items = "".join(f"<li><code>{_esc(p)}</code>: {_esc(e)}</li>" for p, e in skipped)
        skipped_html = f"<h3>Skipped images</h3><ul class=\"skipped\">{items}</ul>"
    input_size = _fmt(_ints(attrs.get("input_size"), ()))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{_esc(model)} &ndash; channel report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_esc(model)}</h1>
<p>Top-{MAX_SLOTS} receptive-field patches per channel.
Input {_esc(input_size)} &middot; preprocessing <code>{_esc(attrs.get("preprocessing", "?"))}</code>
&middot; version {_esc(attrs.get("version", "?"))}</p>
<h2>Images</h2>
<p id="summary">{int(np.sum(ok))} images scanned, {len(skipped)} skipped.</p>
{skipped_html}
<h2>Layers</h2>
<table id="layers">
<thead><tr><th>depth</th><th>layer</th><th>shape</th><th>receptive field / stride</th>
<th title="mean over channels of the fraction of zero activations">sparsity</th><th>sheet</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
<h2>Configuration</h2>
<pre>{_esc(attrs.get("config", ""))}</pre>
</body>
</html>
"""


# ----------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------

def render_report(results_path: Path, out_dir: Path) -> list[Path]:
    """Render one sheet per layer and index.html; return the written files.

    Sheets come first, in network order, then index.html.
    """
    results_path, out_dir = Path(results_path), Path(out_dir)
    sheet_dir = out_dir / "sheets"
    sheet_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(results_path, "r") as f:
        attrs = {key: f.attrs[key] for key in f.attrs}
        if "images" in f:
            paths = _str_array(f["images/path"])
            ok = f["images/ok"][()].astype(bool)
            errors = _str_array(f["images/error"]) if "images/error" in f else [""] * len(paths)
        else:
            paths, ok, errors = [], np.zeros(0, bool), []
        n_ok = int(ok.sum())
        infos = _layers(f)
        sheets: dict[str, Path] = {}
        for info in tqdm(infos, desc="report", unit="layer"):
            path = sheet_dir / f"{info.stored}.png"
            _write_png(path, compose_sheet(f["layers"][info.stored], info, n_ok))
            sheets[info.stored] = path
            logger.debug("sheet %s -> %s", info.name, path)
    index = out_dir / "index.html"
    index.write_text(_index_html(attrs, infos, sheets, out_dir, paths, ok, errors),
                     encoding="utf-8")
    logger.info("report: %d sheets, index at %s", len(sheets), index)
    return [sheets[i.stored] for i in infos] + [index]


KEYS = ()  # rendering is cheap and reads only results.h5: it always runs


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.errors import PipelineError
    from pipeline.store import RESULTS_FILE

    results = Path(run_dir) / RESULTS_FILE
    if not results.exists():
        raise PipelineError(f"no results.h5 in {run_dir}: run the scan stage first")
    files = render_report(results, Path(run_dir))
    logger.info("report: %d files, open %s", len(files), Path(run_dir) / "index.html")
