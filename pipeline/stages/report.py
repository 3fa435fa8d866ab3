"""Report stage: everything a person reads about a run, rendered from results.h5 only.

No model is loaded and TensorFlow is never imported, so `stages=[report]` (or
`stages=[report,export]`) on an existing run directory re-renders without recomputing.

    sheets/<layer>.png            every unit of a layer: its top patches as a montage
    sheets/run/sparsity.png, .pdf the share of zero activations by depth
    sheets/images/image_<id>.png  per-image sheets: photo, stored predictions, Grad-CAM,
                                  occlusion maps, activation grids
    report/cards/<layer>/...      one card per unit (pipeline.cards)
    report/thumbs/<layer>/...     one small thumbnail per unit
    report/<layer>.html           the units of a layer; a card on click (pipeline.site)
    report.pdf                    the book: sheets, chosen cards, per-image sheets (pipeline.book)
    index.html                    the run, its layers and everything above

A sheet is composed in numpy at a reduced per-patch size; matplotlib only puts the
title and channel numbers on top of the composed pixels. The composition helpers
(`resize_patches`, `montage`, `grid`, `sheet_layout`, `draw_labels`) are pure functions
on arrays so they can be tested without any files.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import h5py
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import IdentityTransform
from PIL import Image
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.montage import BACKGROUND, EMPTY_GREY, montage, resize_patches
from pipeline.preprocess import Preprocessing, resize_plan

logger = logging.getLogger(__name__)

MAX_SLOTS = 9  # top-9 patches per channel
TARGET_PATCH_PX = 32  # per-patch size on the sheet, before the size cap
MIN_PATCH_PX = 4
MAX_SIDE_PX = 6000  # neither side of a sheet grows beyond this
MIN_WIDTH_PX = 800  # room for the title on layers with few channels
DPI = 150
CHUNK_BYTES = 16 * 2**20  # patches read from the file at a time (small reads stay cache-friendly)


# ----------------------------------------------------------------------------
# pure composition helpers
# ----------------------------------------------------------------------------

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
    rf_stride: tuple
    depth: int
    mappable: bool
    geometry_message: str
    sparsity: float | None  # mean zero fraction over channels
    has_patches: bool
    topk: int = 0  # images kept per channel


def _layer_info(stored: str, g: h5py.Group) -> LayerInfo:
    a = g.attrs
    zf = g["stats/zero_fraction"][()] if "stats/zero_fraction" in g else None
    return LayerInfo(
        stored=stored,
        name=_as_str(a.get("name", stored)),
        shape=_ints(a.get("shape"), ()),
        rf_size=_ints(a.get("rf_size")),
        rf_stride=tuple(int(v) if float(v).is_integer() else round(float(v), 4)  # 1/2 after an upsampling
                        for v in np.atleast_1d(a.get("rf_stride", (0, 0)))),
        depth=int(a.get("depth", 0)),
        mappable=bool(a.get("mappable", True)),
        geometry_message=_as_str(a.get("geometry_message", "")),
        sparsity=float(np.mean(zf)) if zf is not None and zf.size else None,
        has_patches="patches" in g,
        topk=int(g["topk/value"].shape[1]) if "topk/value" in g else 0,
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
                  title_h: float, kept: int | None = None) -> list[Label]:
    shown = f"top {k} of the {kept} kept" if kept and kept > k else f"top-{k}"
    details = (f"output {_fmt(info.shape)} \u00b7 receptive field {_fmt(info.rf_size)} px, "
               f"stride {_fmt(info.rf_stride)} \u00b7 {shown} patches per channel "
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

    labels = _title_labels(info, n_ok, k, width, layout.margin, layout.title_h, kept=ds.shape[1])
    label_px = 0.72 * layout.label_h
    labels += [Label(left + x + cw / 2, top + y + ch + layout.label_h / 2, str(c), label_px)
               for c, (y, x) in enumerate(origins)]
    return draw_labels(canvas, labels)


# ----------------------------------------------------------------------------
# sparsity by depth
# ----------------------------------------------------------------------------

def sparsity_figure(names: list[str], zero_fractions: list[np.ndarray], model: str = "") -> Figure:
    """Per layer (network order) the distribution over channels of the share of zero
    activations: box (quartiles), whiskers (5th-95th percentile), mean (line), and the
    share of channels that were zero everywhere (dead on this data)."""
    n = len(names)
    fig = Figure(figsize=(max(5.5, 0.55 * n + 2.5), 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    data = [np.asarray(z, np.float64) for z in zero_fractions]
    if n:
        ax.boxplot(data, positions=x, widths=0.5, whis=(5, 95), showfliers=False, patch_artist=True,
                   boxprops=dict(facecolor="#c6d8ee", edgecolor="#4a6f9e"),
                   medianprops=dict(color="#4a6f9e"), whiskerprops=dict(color="#4a6f9e"),
                   capprops=dict(color="#4a6f9e"))
        ax.plot(x, [d.mean() if d.size else np.nan for d in data], color="#c0392b", marker="o", ms=4, lw=1.5,
                label="mean over channels")
        ax.plot(x, [(d >= 1.0).mean() if d.size else np.nan for d in data], color="0.35", marker="s", ms=3.5,
                lw=1, ls="--", label="channels zero everywhere")
        ax.legend(fontsize=8, frameon=False, loc="upper left")
    ax.set_xticks(x, names, rotation=35 if n > 3 else 0, ha="right" if n > 3 else "center", fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("share of zero activations", fontsize=9)
    ax.set_xlabel("layer (input \u2192 output)", fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("share of zero activations per channel (box: quartiles, whiskers: 5-95 %)", fontsize=8,
                 color="0.3")
    fig.suptitle(f"Sparsity by depth{': ' + model if model else ''}", fontsize=10)
    return fig


def _save_figure(fig: Figure, path: Path, dpi: int) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
    return path


# ----------------------------------------------------------------------------
# per-image sheets
# ----------------------------------------------------------------------------

CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM",
              "guided_gradcam": "guided Grad-CAM"}
ACTIVATION_GRID = 16  # channels per activation grid on a per-image sheet (4 x 4)


def model_view(path: str, spec: dict) -> np.ndarray | None:
    """The photo as the model saw it (resize, centre crop; before normalisation), uint8 RGB,
    or None when the file cannot be opened (moved, an array dataset)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, np.float64)
                im = Image.fromarray((np.clip(a / max(a.max(), 1.0), 0, 1) * 255 + 0.5).astype(np.uint8))
            im = im.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any unreadable file just has no photo
        logger.debug("no photo for %s: %s", path, err)
        return None
    w, h = im.size
    try:
        model_spec = Preprocessing(**spec)
    except (TypeError, PipelineError):  # not stored, or by another version: the photo as it is
        return np.asarray(im)
    new_h, new_w, top, left = resize_plan(h, w, model_spec)
    im = im.resize((new_w, new_h), Image.BILINEAR, reducing_gap=3.0)
    return np.asarray(im)[top:top + model_spec.height, left:left + model_spec.width]


@dataclass
class _PerImage:
    """The per-image groups of a results file, indexed by image id."""

    cam_rows: dict[int, np.ndarray]
    cam_methods: list[str]
    occlusion_row: dict[int, int]
    activation_row: dict[int, int]
    activation_layers: list[tuple[str, str]]  # (dataset key, layer name)

    @classmethod
    def read(cls, f: h5py.File) -> "_PerImage":
        cam_rows, methods = {}, []
        if "cam" in f and "image" in f["cam"]:
            g = f["cam"]
            ids = g["image"][()]
            order = np.argsort(ids, kind="stable")
            uniq, start = np.unique(ids[order], return_index=True)
            for i, s, e in zip(uniq, start, list(start[1:]) + [len(ids)]):
                cam_rows[int(i)] = order[s:e]
            listed = json.loads(_as_str(g.attrs.get("methods", "[]")) or "[]")
            methods = [m for m in listed if m in g and "map" in g[m]]
        occ = {}
        if "occlusion" in f and "image" in f["occlusion"]:
            occ = {int(i): r for r, i in enumerate(f["occlusion/image"][()])}
        act, layers = {}, []
        if "activations" in f and "image" in f["activations"]:
            g = f["activations"]
            act = {int(i): r for r, i in enumerate(g["image"][()])}
            found = [(key, _as_str(d.attrs.get("name", key)), int(d.attrs.get("depth", 0)))
                     for key, d in g.items() if isinstance(d, h5py.Dataset) and d.ndim == 4]
            layers = [(key, name) for key, name, _ in sorted(found, key=lambda t: (t[2], t[0]))]
        return cls(cam_rows, methods, occ, act, layers)

    def ids(self) -> list[int]:
        return sorted(set(self.cam_rows) | set(self.occlusion_row) | set(self.activation_row))


def class_namer(f: h5py.File):
    """class index -> name: ImageNet's for an ImageNet model, the class names a train stage
    recorded for a network trained in this run, else 'class i' (results.h5 does not say
    whether the dataset's folders name the model's outputs)."""
    names: list[str] = []
    if bool(f.attrs.get("imagenet_classes", False)):
        from pipeline.models.imagenet import class_names

        names = class_names()
    elif "train" in f and "class_names" in f["train"].attrs:
        names = [str(n) for n in json.loads(_as_str(f["train"].attrs["class_names"]) or "[]")]

    def name(i: int) -> str:
        i = int(i)
        return names[i] if 0 <= i < len(names) else f"class {i}"

    return name


def _blank(maps: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (C,) bool: channels constant over the map."""
    return (maps.max(axis=(0, 1)) - maps.min(axis=(0, 1))) == 0


def _edges(starts: np.ndarray, size: int, side: int) -> np.ndarray:
    """Edges of the occlusion grid cells: the square's centres, halfway between neighbours."""
    centres = np.asarray(starts, np.float64) + size / 2
    if len(centres) == 1:
        return np.array([0.0, float(side)])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def image_sheet(f: h5py.File, pi: _PerImage, image_id: int, names, spec: dict, dpi: int) -> tuple[Figure, list[str]]:
    """The per-image sheet of one image as a Figure, and what it lacks."""
    from pipeline import draw

    paths = f["images/path"].asstr()
    path = _as_str(paths[image_id])
    size = (int(spec.get("height") or 224), int(spec.get("width") or 224))
    photo = model_view(path, spec)
    missing = []
    if photo is None:
        missing.append("the photo (file not readable; maps drawn without it)")
    grey = photo if photo is not None else np.full(size + (3,), 200, np.uint8)
    label = int(f["images/label"][image_id]) if "images/label" in f else -1

    cam_rows = pi.cam_rows.get(image_id)
    occ_row = pi.occlusion_row.get(image_id)
    act_row = pi.activation_row.get(image_id)
    act_layers = pi.activation_layers if act_row is not None else []
    rows = ["top"]
    if cam_rows is not None and pi.cam_methods:
        rows.append("cam")
    else:
        missing.append("Grad-CAM maps (stages=[cam])")
    if occ_row is not None:
        rows.append("occlusion")
    else:
        missing.append("occlusion maps (occlusion.images)")
    act_rows = math.ceil(len(act_layers) / 4)
    rows += ["activations"] * act_rows
    if act_row is None:
        missing.append("activation grids (activations.images)")
    heights = {"top": 2.5, "cam": 2.25, "occlusion": 2.35, "activations": 2.25}
    width = 8.27
    fig = Figure(figsize=(width, 0.55 + sum(heights[r] for r in rows) + (0.35 if missing else 0)), dpi=dpi,
                 layout="constrained")
    subs = fig.subfigures(len(rows), 1, height_ratios=[heights[r] for r in rows], squeeze=False)[:, 0]
    title = f"image #{image_id}: {Path(path).name}"
    if label >= 0:
        title += f"  (label: {_label_name(f, label)})"
    fig.suptitle(title, fontsize=11, weight="bold")

    # photo and predictions
    ax_photo, ax_pred = subs[0].subplots(1, 2, width_ratios=[1, 1.6])
    ax_photo.imshow(grey)
    ax_photo.set_title("as the model sees it" if photo is not None else "photo not readable", fontsize=8)
    ax_photo.set_axis_off()
    _predictions(ax_pred, f, image_id, cam_rows, occ_row, pi, names)

    r = 1
    if "cam" in rows:
        g = f["cam"]
        methods = pi.cam_methods
        axes = subs[r].subplots(1, len(methods), squeeze=False)[0]
        first = int(cam_rows[0])
        for ax, m in zip(axes, methods):
            one = g[m]["map"][first]
            cls, score = int(g[m]["class"][first]), float(g[m]["score"][first])
            if m == "guided_gradcam":
                ax.imshow(draw.guided_image(one))
            else:
                ax.imshow(draw.overlay(grey, one))
            ax.set_title(f"{CAM_TITLES.get(m, m)}\n{names(cls)[:26]} (logit {score:.2f})", fontsize=7)
            ax.set_axis_off()
        subs[r].suptitle(f"class activation maps at {_as_str(g.attrs.get('layer', '?'))}", fontsize=9)
        r += 1
    if "occlusion" in rows:
        g = f["occlusion"]
        osize, stride = int(g.attrs.get("size", 0)), int(g.attrs.get("stride", 0))
        ye, xe = _edges(g["rows"][()], osize, size[0]), _edges(g["cols"][()], osize, size[1])
        cls, channel = int(g["class"][occ_row]), int(g["channel"][occ_row])
        axes = subs[r].subplots(1, 2)
        for ax, values, what, cmap, lim in (
                (axes[0], g["probability"][occ_row], f"p({names(cls)[:24]}) with the square there", "magma", (0, 1)),
                (axes[1], g["activation"][occ_row],
                 f"{_as_str(g.attrs.get('layer', '?'))} channel {channel}: total activation", "viridis", None)):
            ax.imshow(grey, alpha=0.3)
            mesh = ax.pcolormesh(xe, ye, values, cmap=cmap, alpha=0.85, vmin=lim[0] if lim else None,
                                 vmax=lim[1] if lim else None)
            ax.set_xlim(0, size[1])
            ax.set_ylim(size[0], 0)
            ax.set_title(what, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(mesh, ax=ax, shrink=0.85).ax.tick_params(labelsize=6)
        subs[r].suptitle(f"occlusion sensitivity: grey square {osize} px, stride {stride} px", fontsize=9)
        r += 1
    if act_layers:
        g = f["activations"]
        for row in range(act_rows):
            chunk = act_layers[row * 4:(row + 1) * 4]
            axes = subs[r].subplots(1, 4, squeeze=False)[0]
            for ax, (key, lname) in zip(axes, chunk):
                maps = np.asarray(g[key][act_row], np.float32)
                h, w, c = maps.shape
                n = min(c, ACTIVATION_GRID)
                tiles = draw.channel_tiles(maps[..., :n], _blank(maps[..., :n]), max(32, h))
                ax.imshow(draw.tile(tiles, math.isqrt(ACTIVATION_GRID)), interpolation="nearest")
                ax.set_title(f"{lname}\nchannels 0-{n - 1} of {c} ({h}\u00d7{w})", fontsize=7)
                ax.set_axis_off()
            for ax in axes[len(chunk):]:
                ax.set_axis_off()
            if row == 0:
                subs[r].suptitle("activations (each channel standardised; grey: constant)", fontsize=9)
            r += 1
    if missing:
        fig.text(0.01, 0.004, "not in results.h5 for this image: " + "; ".join(missing), fontsize=6.5,
                 color="0.4", va="bottom")
    return fig, missing


def _label_name(f: h5py.File, label: int) -> str:
    folders = json.loads(_as_str(f["images"].attrs.get("class_names", "[]")) or "[]") if "images" in f else []
    return str(folders[label]) if 0 <= label < len(folders) else str(label)


def _predictions(ax, f: h5py.File, image_id: int, cam_rows, occ_row, pi: _PerImage, names) -> None:
    """Bar chart of the stored predictions: the model's top-5 (predictions/, written by the
    cam stage); in older files the cam stage's top-N classes (cam.target=top), else
    its explained class, with the occlusion stage's base probability where there is one."""
    ax.set_axis_off()
    rows = np.flatnonzero(f["predictions/image"][()] == image_id) if "predictions" in f else []
    if len(rows):
        g = f["predictions"]
        row = int(rows[0])
        classes, probability = g["class"][row], g["probability"][row]
        ax.set_axis_on()
        y = np.arange(len(classes))[::-1]
        ax.barh(y, probability, color="#4a6f9e", height=0.6)
        ax.set_yticks(y, [names(int(c))[:30] for c in classes], fontsize=7)
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlabel("probability", fontsize=7)
        ax.set_title(f"top-{len(classes)} predictions", fontsize=8)
        return
    if cam_rows is not None and pi.cam_methods:
        g = f["cam"]
        m = pi.cam_methods[0]
        ranks = g["rank"][()][cam_rows] if "rank" in g else np.zeros(len(cam_rows), np.int32)
        order = np.argsort(ranks, kind="stable")
        rows = cam_rows[order][:5]
        classes = g[m]["class"][()][rows]
        scores = g[m]["score"][()][rows]
        target = _as_str(g.attrs.get("target", ""))
        ax.set_axis_on()
        y = np.arange(len(rows))[::-1]
        ax.barh(y, scores, color="#4a6f9e", height=0.6)
        ax.set_ylim(len(rows) - 5.5, len(rows) - 0.5)  # five slots, filled from the top
        ax.set_yticks(y, [names(c)[:30] for c in classes], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlabel("logit", fontsize=7)
        if target == "top" and len(rows) > 1:
            what = f"top-{len(rows)} predictions"
        else:
            what = {"predicted": "the predicted class", "label": "the labelled class"}.get(
                target, "explained class(es)")
            what += " (top-5 not stored: run cam with cam.target=top cam.top_n=5)"
        ax.set_title(what, fontsize=8)
        if occ_row is not None and "base_probability" in f["occlusion"]:
            p = float(f["occlusion/base_probability"][occ_row])
            ax.text(1.0, -0.25, f"p({names(int(f['occlusion/class'][occ_row]))[:24]}) = {p:.3f} (occlusion stage)",
                    transform=ax.transAxes, ha="right", fontsize=7, color="0.3")
        return
    if occ_row is not None:
        g = f["occlusion"]
        cls, p = int(g["class"][occ_row]), float(g["base_probability"][occ_row])
        ax.text(0.0, 0.6, f"occlusion target: {names(cls)}\np = {p:.3f}", fontsize=9, va="center")
        ax.text(0.0, 0.25, "no top-5 predictions stored (run cam with cam.target=top cam.top_n=5)", fontsize=7,
                color="0.4")
        return
    ax.text(0.0, 0.5, "no predictions stored for this image\n(stages=[cam] with cam.target=top cam.top_n=5)",
            fontsize=8, color="0.4", va="center")


def choose_images(pi: _PerImage, per_image, n_images: int) -> list[int]:
    """Image ids with a per-image sheet: N (the first N ids that have maps, those with the
    most kinds of maps first), or an explicit list."""
    have = pi.ids()
    if isinstance(per_image, (list, tuple)) or (hasattr(per_image, "__iter__") and not isinstance(per_image, str)):
        wanted = [int(i) for i in per_image]
        bad = [i for i in wanted if not 0 <= i < n_images]
        if bad:
            raise PipelineError(f"report.per_image has image id {bad[0]}: the run has ids 0 to {n_images - 1}")
        return wanted
    n = int(per_image or 0)
    if n <= 0:
        return []
    kinds = {i: (i in pi.cam_rows) + (i in pi.occlusion_row) + (i in pi.activation_row) for i in have}
    return sorted(sorted(have, key=lambda i: (-kinds[i], i))[:n])


# ----------------------------------------------------------------------------
# other stages' sheets (linked from the index)
# ----------------------------------------------------------------------------

EXTRA_SHEETS = (  # (results.h5 group, section title, files relative to the run directory)
    ("train", "Training", ("sheets/training_curve.png", "sheets/training_curve.pdf")),
    ("evolution", "Feature evolution during training", ("sheets/evolution/*.png",)),
    ("invariance", "Invariance", ("sheets/invariance.png", "sheets/invariance.pdf")),
    ("correspondence", "Correspondence", ("sheets/correspondence.png", "sheets/correspondence.pdf")),
    ("filters", "Filters: weights and patterns", ("sheets/filters/*.png", "sheets/filters/kernels.txt")),
    ("cam", "Class activation maps (cam stage)", ("cam/*.png",)),
    ("activations", "Activations (activations stage)", ("activations/blank_fraction.png", "activations/*_grid_*.png")),
    ("occlusion", "Occlusion (occlusion stage)", ("occlusion/*.png",)),
)


def _extras(f: h5py.File, run_dir: Path) -> list[tuple[str, list[tuple[str, Path]]]]:
    out = []
    for group, title, patterns in EXTRA_SHEETS:
        if group not in f:
            continue
        files = []
        for pattern in patterns:
            for p in sorted(run_dir.glob(pattern)):
                if p.is_file() and p not in [q for _, q in files]:
                    files.append((p.relative_to(run_dir).as_posix(), p))
        if files:
            out.append((title, files))
    toolbox = run_dir / "toolbox"
    if toolbox.is_dir():
        files = [(p.relative_to(run_dir).as_posix(), p) for p in sorted(toolbox.glob("*/*/*_0000*.jpg"))[:6]]
        files += [(p.relative_to(run_dir).as_posix(), p)
                  for p in sorted(toolbox.glob("regularized_opt/*/whole_layer.jpg"))]
        if files:
            out.append(("Deep Visualization Toolbox export (toolbox/, examples)", files))
    return out


# ----------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------

PRINT_DPI = 300  # figures (sparsity, per-image sheets) as PNG
PREVIEW_PX = 480  # sheet previews on the index


def _preview(image: np.ndarray, path: Path) -> Path:
    h, w = image.shape[:2]
    f = max(1, math.ceil(max(h, w) / PREVIEW_PX))
    if f > 1:  # whole-factor box average (integer sums of strided views)
        h2, w2 = h // f, w // f
        image = resize_patches(image[None, :h2 * f, :w2 * f], (h2, w2))[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=85)
    return path


def _preprocessing(attrs) -> dict:
    """The stored Preprocessing fields (JSON); {} when absent or not JSON."""
    try:
        spec = json.loads(_as_str(attrs.get("preprocessing", "{}")) or "{}")
    except ValueError:
        return {}
    return spec if isinstance(spec, dict) else {}


def _chosen_units(units, channels: int) -> list[int]:
    if isinstance(units, (list, tuple)) or (hasattr(units, "__iter__") and not isinstance(units, str)):
        return sorted({int(u) for u in units if 0 <= int(u) < channels})
    return list(range(min(int(units or 0), channels)))


def _render_layers(f, infos, n_ok: int, make_sparsity, chosen: dict, cards: bool, sheet_dir: Path,
                   report_dir: Path):
    """Layer sheets and their previews, the sparsity figure, unit cards and thumbnails."""
    from pipeline.cards import ImageIndex, render_layer_cards

    sheets: dict[str, Path] = {}
    previews: dict[str, Path] = {}
    for info in tqdm(infos, desc="layer sheets", unit="layer"):
        path = sheet_dir / f"{info.stored}.png"
        image = compose_sheet(f["layers"][info.stored], info, n_ok)
        _write_png(path, image)
        sheets[info.stored] = path
        previews[info.stored] = _preview(image, report_dir / "previews" / f"{info.stored}.jpg")
    sparsity_png = None
    if make_sparsity is not None:
        fig = make_sparsity()
        sparsity_png = _save_figure(fig, sheet_dir / "run" / "sparsity.png", PRINT_DPI)
        _save_figure(fig, sheet_dir / "run" / "sparsity.pdf", PRINT_DPI)
    images = ImageIndex.read(f)
    card_files = {}
    total = sum((int(i.shape[-1]) if i.shape else 0) if cards else len(chosen.get(i.stored, [])) for i in infos)
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=total, desc="unit cards", unit="card") as bar:
        for info in infos:
            wanted = None if cards else chosen.get(info.stored, [])
            if wanted is not None and not wanted:
                continue
            card_files[info.stored] = render_layer_cards(
                f, info, report_dir / "cards" / info.stored, report_dir / "thumbs" / info.stored if cards else None,
                units=wanted, images=images, pool=pool, bar=bar)
    return sheets, previews, sparsity_png, card_files


class RenderCache:
    """What the last render drew, per part of the report, from which inputs
    (report/.rendered.json); written after each part is drawn."""

    FILE = ".rendered.json"

    def __init__(self, out_dir: Path, report_dir: Path, inputs: dict[str, str] | None):
        self.out_dir, self.path, self.inputs = Path(out_dir), Path(report_dir) / self.FILE, inputs or {}
        self.saved = {}
        if self.inputs and self.path.exists():
            try:
                self.saved = json.loads(self.path.read_text())
            except ValueError:
                self.saved = {}

    def kept(self, part: str):
        """The files of `part` from the last render, if its inputs are the same and its files exist."""
        entry = self.saved.get(part)
        if not self.inputs or entry is None or entry["key"] != self.inputs.get(part):
            return None
        if not all((self.out_dir / rel).exists() for rel in entry["files"]):
            return None
        return getattr(self, f"_load_{part}")(entry["data"])

    def record(self, part: str, value) -> None:
        if not self.inputs:
            return
        data, files = getattr(self, f"_dump_{part}")(value)
        self.saved[part] = dict(key=self.inputs.get(part), data=data, files=files)
        from pipeline.store import atomic_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path, "w") as fh:
            json.dump(self.saved, fh)

    def _rel(self, path: Path | None) -> str | None:
        return None if path is None else Path(path).relative_to(self.out_dir).as_posix()

    def _abs(self, rel: str | None) -> Path | None:
        return None if rel is None else self.out_dir / rel

    def _dump_layers(self, value):
        sheets, previews, sparsity, card_files = value
        cards = {k: dict(cards={u: self._rel(p) for u, p in c.cards.items()},
                         thumbs={u: self._rel(p) for u, p in c.thumbs.items()}, size=list(c.size), thumb=c.thumb)
                 for k, c in card_files.items()}
        data = dict(sheets={k: self._rel(p) for k, p in sheets.items()},
                    previews={k: self._rel(p) for k, p in previews.items()}, sparsity=self._rel(sparsity), cards=cards)
        files = list(data["sheets"].values()) + list(data["previews"].values()) + \
            [rel for c in cards.values() for rel in (*c["cards"].values(), *c["thumbs"].values())]
        return data, files + ([data["sparsity"]] if sparsity else [])

    def _load_layers(self, data):
        from pipeline.cards import LayerCardFiles

        cards = {k: LayerCardFiles(k, {int(u): self._abs(p) for u, p in c["cards"].items()},
                                   {int(u): self._abs(p) for u, p in c["thumbs"].items()}, tuple(c["size"]), c["thumb"])
                 for k, c in data["cards"].items()}
        return ({k: self._abs(p) for k, p in data["sheets"].items()},
                {k: self._abs(p) for k, p in data["previews"].items()}, self._abs(data["sparsity"]), cards)

    def _dump_images(self, value):
        data = [[int(i), self._rel(p), caption] for i, p, caption in value]
        return data, [rel for _, rel, _ in data]

    def _load_images(self, data):
        return [(i, self._abs(rel), caption) for i, rel, caption in data]

    def _dump_site(self, value):
        book, pages = value
        data = dict(book=self._rel(book), pages=[self._rel(p) for p in pages])
        return data, data["pages"] + ([data["book"]] if book else [])

    def _load_site(self, data):
        return self._abs(data["book"]), [self._abs(p) for p in data["pages"]]


def render_report(results_path: Path, out_dir: Path, *, cards: bool = True, units=8, pdf: bool = True,
                  per_image=8, inputs: dict[str, str] | None = None) -> list[Path]:
    """Render everything from results.h5 into out_dir (the run directory); return the files.

    sheets/<layer>.png (network order, first in the list), sheets/run/sparsity.png and .pdf,
    report/previews/<layer>.jpg, report/cards/<layer>/unit_%04d.png and
    report/thumbs/<layer>/unit_%04d.jpg (cards=True: every unit; else only the units the
    book shows), sheets/images/image_<id>.png (per_image: N or a list of ids),
    report.pdf (pdf=True; `units` per layer: N first units or a list), report/<layer>.html,
    and index.html (last in the list).

    `inputs`: a key per part of the report (layers, images, site) that changes whenever
    what it is drawn from changes; a part whose key equals the last render's, with its
    files still there, is kept instead of drawn again.
    """
    from pipeline.book import Book, BookLayer, write_book
    from pipeline.site import REPORT_DIR, Site, SiteImage, SiteLayer, write_site

    results_path, out_dir = Path(results_path), Path(out_dir)
    sheet_dir = out_dir / "sheets"
    report_dir = out_dir / REPORT_DIR
    cache = RenderCache(out_dir, report_dir, inputs)
    written: list[Path] = []
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
        model = _as_str(attrs.get("model", "model"))
        pi = _PerImage.read(f)
        ids = choose_images(pi, per_image, len(paths))  # a bad list stops here, before any file is written
        sheet_dir.mkdir(parents=True, exist_ok=True)

        # layer sheets, previews, the sparsity figure, unit cards and thumbnails
        zero = [(i.name, f["layers"][i.stored]["stats/zero_fraction"][()]) for i in infos
                if "stats/zero_fraction" in f["layers"][i.stored]]
        make_sparsity = partial(sparsity_figure, [n for n, _ in zero], [z for _, z in zero], model) if zero else None
        chosen = {i.stored: _chosen_units(units, int(i.shape[-1]) if i.shape else 0) for i in infos} if pdf else {}
        kept = cache.kept("layers")
        if kept is not None:
            sheets, previews, sparsity_png, card_files = kept
            logger.info("report: layer sheets and %d unit cards kept, their inputs did not change",
                        sum(len(c.cards) for c in card_files.values()))
        else:
            sheets, previews, sparsity_png, card_files = _render_layers(f, infos, n_ok, make_sparsity, chosen,
                                                                         cards, sheet_dir, report_dir)
            cache.record("layers", (sheets, previews, sparsity_png, card_files))
        written += [sheets[i.stored] for i in infos]
        if sparsity_png is not None:
            written += [sparsity_png, sparsity_png.with_suffix(".pdf")]
        for files in card_files.values():
            written += list(files.cards.values()) + list(files.thumbs.values())

        # per-image sheets
        names = class_namer(f)
        spec = _preprocessing(attrs)
        image_sheets = cache.kept("images")
        if image_sheets is None:
            image_sheets = []
            for image_id in tqdm(ids, desc="per-image sheets", unit="image"):
                fig, _ = image_sheet(f, pi, image_id, names, spec, PRINT_DPI)
                path = _save_figure(fig, sheet_dir / "images" / f"image_{image_id}.png", PRINT_DPI)
                image_sheets.append((image_id, path, f"image #{image_id}: {Path(paths[image_id]).name}"))
            cache.record("images", image_sheets)
        written += [path for _, path, _ in image_sheets]
        extras = _extras(f, out_dir)

        # what the run lacks, said once on the index and in the book
        notes = []
        if infos and not any(i.has_patches for i in infos):
            notes.append("receptive-field patches: run stages=[crop]")
        if infos and not any("panels" in f["layers"][i.stored] for i in infos):
            notes.append("deconv / backprop panels: run stages=[panels]")
        if "filters" not in f:
            notes.append("filter weights and patterns: run stages=[filters]")
        if not pi.ids():
            notes.append("per-image maps (activation grids, Grad-CAM, occlusion): "
                         "run stages=[activations,cam,occlusion]")
        elif not pi.cam_rows:
            notes.append("predictions and Grad-CAM: run stages=[cam] (cam.target=top cam.top_n=5 for the top-5)")

    facts = [("model", model), ("input", _fmt(_ints(attrs.get("input_size"), ()))),
             ("preprocessing", _as_str(attrs.get("preprocessing", "?"))),
             ("images", f"{n_ok} scanned, {len(paths) - n_ok} skipped"),
             ("layers", f"{len(infos)} ({sum(int(i.shape[-1]) for i in infos if i.shape)} units)"),
             ("version", _as_str(attrs.get("version", "?")))]
    kept = cache.kept("site")
    if kept is not None:
        book_path, pages = kept
        logger.info("report: nothing changed since the last render; open %s", pages[-1])
        return written + ([book_path] if book_path else []) + pages
    book_path = None
    if pdf:
        book = Book(title=model, facts=facts,
                    layers=[BookLayer(i.name, sheets[i.stored],
                                      [(u, card_files[i.stored].cards[u]) for u in chosen.get(i.stored, [])
                                       if i.stored in card_files and u in card_files[i.stored].cards])
                            for i in infos],
                    images=[(caption, path) for _, path, caption in image_sheets],
                    config=_as_str(attrs.get("config", "")), sparsity=make_sparsity, notes=notes)
        book_path = out_dir / "report.pdf"
        write_book(book, book_path)
        written.append(book_path)

    site_layers = []
    for i in infos:
        files = card_files.get(i.stored) if cards else None
        site_layers.append(SiteLayer(
            name=i.name, stored=i.stored, depth=i.depth, shape=_fmt(i.shape),
            receptive_field=f"{_fmt(i.rf_size)} / {_fmt(i.rf_stride)}",
            units=int(i.shape[-1]) if i.shape else 0, sparsity=i.sparsity,
            note="" if i.mappable else i.geometry_message, sheet=sheets[i.stored], preview=previews.get(i.stored),
            cards=dict(files.cards) if files else {}, thumbs=dict(files.thumbs) if files else {},
            thumb_px=files.thumb if files else 64, card_hw=files.size if files else (0, 0)))
    skipped = [(p, e) for p, good, e in zip(paths, ok, errors) if not good]
    images_note = "" if image_sheets else (
        "No per-image maps in results.h5: run stages=[activations,cam,occlusion] to draw per-image sheets."
        if not pi.ids() else "Per-image sheets are off (report.per_image=0).")
    kept = max((i.topk for i in infos), default=MAX_SLOTS)
    lead = (f"Top-{min(kept, MAX_SLOTS)} receptive-field patches per channel"
            + (f" (of the {kept} kept)" if kept > MAX_SLOTS else "") + ", unit cards and per-image maps.")
    site = Site(title=model, lead=lead,
                facts=facts, images_line=f"{n_ok} images scanned, {len(skipped)} skipped.", skipped=skipped,
                layers=site_layers, sparsity=sparsity_png,
                images=[SiteImage(i, caption, path) for i, path, caption in image_sheets], images_note=images_note,
                extras=extras, book=book_path, config=_as_str(attrs.get("config", "")), notes=notes)
    pages = write_site(site, out_dir)
    cache.record("site", (book_path, pages))
    written += pages
    logger.info("report: %d sheets, %d cards, %d per-image sheets%s; open %s", len(sheets),
                sum(len(c.cards) for c in card_files.values()), len(image_sheets),
                ", report.pdf" if book_path else "", pages[-1])
    return written


KEYS = ()  # rendering reads only results.h5: it always runs, and redraws only what changed


def render_inputs(store, options: dict) -> dict[str, str]:
    """A key per part of the report, from the tokens of the stages each part is drawn from
    (a token changes whenever its stage finishes again), the run record and the options."""
    import hashlib

    import pipeline

    markers = store.markers()
    stamps = {n: (store.parts / n).stat().st_mtime_ns for n in ("run.h5", "images.h5") if store.has(n)}

    def key(stages) -> str:
        items = dict(options=options, version=pipeline.__version__, parts=stamps,
                     stages={s: markers[s]["token"] for s in stages if s in markers})
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()

    return dict(layers=key(("scan", "crop", "panels", "filters")), images=key(("cam", "occlusion", "activations")),
                site=key(sorted(markers)))


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.store import Store

    results = Store(run_dir).require("stages=[scan,crop,report]")
    rc = cfg.get("report") if hasattr(cfg, "get") else None
    options = {}
    if rc is not None:
        from omegaconf import OmegaConf

        def plain(value):
            return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

        options = dict(cards=bool(rc.cards), units=plain(rc.units), pdf=bool(rc.pdf), per_image=plain(rc.per_image))
    inputs = None if cfg.get("overwrite") else render_inputs(Store(run_dir), options)
    files = render_report(results, Path(run_dir), **options, inputs=inputs)
    logger.info("report: %d files, open %s", len(files), Path(run_dir) / "index.html")
