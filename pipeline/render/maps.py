"""Per-image sheets of the map stages, drawn from each stage's part and the images:
Grad-CAM family overlays and per-class means (cam/), activation grids and the blank
fraction by depth (activations/), occlusion sensitivity maps (occlusion/). Also the
report's hook that draws again the sheets, and the training stages' figures
(render.training.FIGURES), that are missing or older than their stage's part.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline.names import shown
from pipeline.preprocess import Preprocessing, input_box
from pipeline.render.draw import CAM_TITLES, cell_edges, open_photo, to_rgb

if TYPE_CHECKING:
    from pipeline.datasets import ImageTable

logger = logging.getLogger(__name__)

ROWS_PER_PAGE = 6
CLASS_MEANS_DRAWN = 24
MIN_CLASS_IMAGES = 2
DISPLAY_SIDE = 352  # longest side of a photo on the sheets: about its 2.3 in panel at 150 dpi
MIN_CELL_PX = 176  # a smaller photo is enlarged on the overlay pages
TILE_PX = 32  # small maps are enlarged by whole factors to about this size
FAST_PNG = 1  # zlib level of the per-image sheets: a fixed cost of every run, encoded fast


@dataclass
class Photos:
    """The photos the sheets are drawn on: image files (upright by EXIF when `exif`, decoded
    as the stream decodes them) or in-memory arrays, seen through the model's `spec`. The
    stage passes its image table, the report stage what results.h5 records: one drawing."""

    paths: list
    spec: Preprocessing
    exif: bool = True
    arrays: np.ndarray | None = None
    # ids whose file could not be opened while drawing (open_photo warned, naming it): the
    # sheets' record keeps them, so a report redraws the sheets once the files are back
    unreadable: set = field(default_factory=set)

    @classmethod
    def of_table(cls, table: ImageTable, spec: Preprocessing) -> "Photos":
        return cls(list(table.paths), spec, bool(getattr(table, "exif", True)), table.arrays)

    @classmethod
    def of_results(cls, f) -> "Photos":
        from pipeline.render.results import stored_exif, stored_preprocessing
        from pipeline.store import read_paths

        paths = read_paths(f["images"]) if "images" in f else []
        return cls(paths, Preprocessing(**stored_preprocessing(f.attrs)), stored_exif(f.attrs))

    def readable(self, ids) -> bool:
        """Whether every one of the images can be opened again (in memory, or a file)."""
        return self.arrays is not None or all(Path(self.paths[int(i)]).is_file() for i in ids)

    def original(self, image_id: int) -> np.ndarray | None:
        """The image as the stream decodes it (upright; a JPEG at the DCT scale the model's
        resize allows), uint8 RGB, or None when it cannot be read."""
        if self.arrays is not None:
            return to_rgb(self.arrays[image_id])
        return self._seen(image_id, open_photo(self.paths[image_id], self.exif, self.spec))

    def model_view(self, image_id: int) -> np.ndarray | None:
        """The image as the model saw it (before normalisation), uint8 RGB, or None."""
        from PIL import Image

        from pipeline.render.image_sheet import model_view

        if self.arrays is None:
            return self._seen(image_id, model_view(self.paths[image_id], self.spec.__dict__, self.exif))
        photo = to_rgb(self.arrays[image_id])
        size = (self.spec.width, self.spec.height)
        if photo.shape[1::-1] != size:
            photo = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))
        return photo

    def _seen(self, image_id: int, photo: np.ndarray | None) -> np.ndarray | None:
        if photo is None:
            self.unreadable.add(int(image_id))
        return photo

    def display(self, image_id: int, pixels: np.ndarray):
        """(photo, box): the original photo shrunk to DISPLAY_SIDE and where the model's
        input lies in it (y0, x0, y1, x1); the model-input `pixels` when it cannot be reopened."""
        from PIL import Image

        photo = self.original(image_id)
        if photo is None:
            return to_rgb(pixels), (0.0, 0.0, float(pixels.shape[0]), float(pixels.shape[1]))
        h, w = photo.shape[:2]
        box = input_box(h, w, self.spec)
        scale = min(1.0, DISPLAY_SIDE / max(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            photo = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR, reducing_gap=2.0))
            sy, sx = photo.shape[0] / h, photo.shape[1] / w
            box = (box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx)
        return photo, box


def stored_class_names(f, num_classes: int) -> list[str]:
    """The names the explaining stages give the model's classes (selection.class_names),
    from what results.h5 records: ImageNet's, the dataset's folders, or numbers."""
    from pipeline.render.results import as_str

    if bool(f.attrs.get("imagenet_classes", False)) and num_classes == 1000:
        from pipeline.models.imagenet import class_names

        return class_names()
    folders = json.loads(as_str(f["images"].attrs.get("class_names", "[]")) or "[]") if "images" in f else []
    return list(folders) if len(folders) == num_classes else [f"class {i}" for i in range(num_classes)]


def file_slug(method: str) -> str:
    return method.replace("++", "_pp")



def method_rows(g, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(image id, target rank) of each row of cam/<method>: the method's own tables where it
    keeps rows for the drawn images only (input-resolution maps), else cam/image, cam/rank."""
    own = g[method]
    if "image" in own:
        return own["image"][()], own["rank"][()]
    image = g["image"][()]
    return image, g["rank"][()] if "rank" in g else np.zeros(len(image), np.int32)


def stored_maps(d, rows) -> np.ndarray:
    """Raw float32 maps of the given rows (increasing) of one cam/<method> group; maps kept
    as float16 over a per-map `scale` are scaled back."""
    rows = np.asarray(rows, np.int64)
    maps = d["map"][rows] if len(rows) else np.zeros((0,) + d["map"].shape[1:], d["map"].dtype)
    maps = maps.astype(np.float32)
    if "scale" in d:
        maps *= d["scale"][()][rows].reshape((-1,) + (1,) * (maps.ndim - 1))
    return maps


def drawn_maps(g, photos: Photos, methods: list[str], ids) -> dict:
    """image id -> its model-input pixels and, per method, (maps, classes, scores) of its
    targets in rank order, for the images `ids` that can be read, from the group cam/."""
    wanted = np.asarray(ids, np.int64)
    drawn: dict[int, dict] = {}
    for m in methods:
        image, rank = method_rows(g, m)
        rows = np.flatnonzero(np.isin(image, wanted))
        rows = rows[np.lexsort((rank[rows], image[rows]))]  # by image, then target rank
        if not len(rows):
            continue
        maps = stored_maps(g[m], np.sort(rows))[np.argsort(np.argsort(rows))]
        classes, scores = g[m]["class"][()][rows], g[m]["score"][()][rows]
        starts = np.flatnonzero(np.r_[True, np.diff(image[rows]) != 0])
        for a, b in zip(starts, list(starts[1:]) + [len(rows)]):
            item = drawn.setdefault(int(image[rows[a]]), {"maps": {}})
            item["maps"][m] = (maps[a:b], classes[a:b], scores[a:b])
    order = [int(i) for i in dict.fromkeys(wanted.tolist()) if int(i) in drawn]
    for image_id in order:
        drawn[image_id]["pixels"] = photos.model_view(image_id)
    return {i: drawn[i] for i in order if drawn[i]["pixels"] is not None}


def classes_with_means(counts: np.ndarray) -> np.ndarray:
    """Rows of class_mean worth drawing: the most frequent classes with at least
    MIN_CLASS_IMAGES images (a mean of one map is that map, not a class's typical evidence)."""
    rows = np.flatnonzero(np.asarray(counts) >= MIN_CLASS_IMAGES)
    return rows[np.argsort(-np.asarray(counts)[rows], kind="stable")][:CLASS_MEANS_DRAWN]


def cam_sheets(part: Path, out_dir: Path, photos: Photos) -> list[Path]:
    """Overlay pages of the images cam.draw chose (photo, then one panel per method; a row
    per image and target) and the per-class mean maps, as PNG files in out_dir; drawn from
    the group cam/ of `part` (the stage's part or results.h5) and the photos only."""
    import h5py

    from pipeline.render import draw
    from pipeline.render.results import as_str

    with h5py.File(part, "r") as f:
        g = f["cam"]
        methods = json.loads(as_str(g.attrs["methods"]))
        alpha = float(g.attrs.get("alpha", 0.4))
        names = stored_class_names(f, int(g.attrs.get("num_classes", 0)))
        drawn = drawn_maps(g, photos, methods, g.attrs.get("drawn", np.zeros(0, np.int64)))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = []
    for image_id, item in drawn.items():  # in the order cam.draw chose them
        photo, box = photos.display(image_id, item["pixels"])
        rep = max(1, MIN_CELL_PX // max(photo.shape[:2]))  # small images enlarged by whole factors
        if rep > 1:
            photo, box = np.repeat(np.repeat(photo, rep, axis=0), rep, axis=1), tuple(v * rep for v in box)
        first = next(iter(item["maps"].values()))
        for k in range(len(first[1])):  # one row per target
            rows.append((image_id, k, photo, box, item))
    pages = math.ceil(len(rows) / ROWS_PER_PAGE)
    for page in tqdm(range(pages), desc="cam sheets", unit="page"):
        chunk = rows[page * ROWS_PER_PAGE:(page + 1) * ROWS_PER_PAGE]
        image = overlay_page(chunk, methods, names, photos.paths, alpha)
        title = f"class activation maps, page {page + 1} of {pages}"
        written.append(save_rgb(sheet_image(image, title, min_width=0), out_dir / f"overlays_{page:03d}.png"))
    with h5py.File(part, "r") as f:
        size = tuple(int(v) for v in f["cam"].attrs["input_size"])  # (H, W)
        for m in methods:
            if "class_mean" not in f[f"cam/{m}"]:
                continue
            cm = f[f"cam/{m}/class_mean"]
            keep = classes_with_means(cm["count"][()])
            if not len(keep):
                logger.info("cam: no class has %d or more explained images; no per-class mean sheet for %s",
                            MIN_CLASS_IMAGES, m)
                continue
            classes, counts, maps = cm["class"][()][keep], cm["count"][()][keep], cm["map"][()][keep]
            fig = class_mean_figure(m, classes, counts, maps, size, names, as_str(f["cam"].attrs["layer"]))
            written.append(draw.save(fig, out_dir / f"class_mean_{file_slug(m)}.png", FAST_PNG))
    logger.info("cam: %d sheet(s) in %s", len(written), out_dir)
    return written


CAPTION_PX = 40  # the two caption lines above each row of an overlay page
HEADER_PX = 24  # the method titles above the columns


def overlay_page(chunk, methods: list[str], names: list[str], paths, alpha: float) -> np.ndarray:
    """One overlay page as an RGB array, composed in numpy (no figure): a column per method
    after the photo, a row per (image, target) with its file, class and logit above it; an
    all-zero map carries zero_cam_note, a method without a map for the row says so."""
    from pipeline.render import draw

    cell_w = max(photo.shape[1] for _, _, photo, _, _ in chunk)
    gap = 6
    width = (cell_w + gap) * (len(methods) + 1) - gap
    parts = [np.full((HEADER_PX, width, 3), 255, np.uint8)]
    for col, title in enumerate(["photo"] + [CAM_TITLES[m] for m in methods]):
        x0 = col * (cell_w + gap)
        parts[0][:, x0:x0 + cell_w] = text_strip(title, cell_w, HEADER_PX, 8)
    for image_id, k, photo, box, item in chunk:
        _, classes, scores = next(iter(item["maps"].values()))
        cls, score = int(classes[k]), float(scores[k])
        name = names[cls] if 0 <= cls < len(names) else f"class {cls}"
        caption = f"#{image_id} {shown(Path(paths[image_id]).name)}\n{name[:40]}, logit {score:.2f}"
        h = photo.shape[0]
        row = np.full((CAPTION_PX + h, width, 3), 255, np.uint8)
        row[:CAPTION_PX, :cell_w] = text_strip(caption, cell_w, CAPTION_PX, 6.5)
        cells = [draw.to_rgb(photo)]
        for m in methods:
            if m not in item["maps"] or k >= len(item["maps"][m][0]):
                cells.append(_note_cell(np.full_like(cells[0], 235), "not stored"))
                continue
            one = item["maps"][m][0][k]
            if m == "guided_gradcam":
                cell = draw.paste_in_box(photo, draw.guided_image(one), box)
            else:
                cell = draw.overlay(photo, one, alpha=alpha, box=box)
            note = draw.zero_cam_note(m, one)
            cells.append(_note_cell(cell, note) if note else cell)
        for col, cell in enumerate(cells):
            x0 = col * (cell_w + gap) + (cell_w - cell.shape[1]) // 2
            row[CAPTION_PX:, x0:x0 + cell.shape[1]] = cell
        parts.append(row)
    return np.concatenate(parts, axis=0)


def _note_cell(cell: np.ndarray, note: str) -> np.ndarray:
    """`cell` with `note` on a white band across its middle."""
    cell = np.array(cell, np.uint8)
    lines = note.count("\n") + 1
    band = min(cell.shape[0], 16 * lines + 8)
    y0 = (cell.shape[0] - band) // 2
    cell[y0:y0 + band] = text_strip(note, cell.shape[1], band, 5.5)
    return cell


def save_rgb(image: np.ndarray, path: Path) -> Path:
    """An RGB sheet as PNG, encoded fast (FAST_PNG): photos do not suit a palette."""
    from PIL import Image

    from pipeline.store import replacing

    with replacing(Path(path)) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, "PNG", compress_level=FAST_PNG)
    return Path(path)


def class_mean_figure(method: str, classes: np.ndarray, counts: np.ndarray, maps: np.ndarray, size, names,
                      layer: str):
    """The mean map of each class as a grid; a class whose maps are all zero (its mean is
    zero: the maps are never negative) is marked as such, not drawn as a blank panel."""
    from matplotlib.figure import Figure

    from pipeline.render import draw

    n = len(maps)
    cols = min(6, n)
    grid_rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.9 * cols, 2.0 * grid_rows + 0.4), dpi=draw.DPI, layout="constrained")
    axes = fig.subplots(grid_rows, cols, squeeze=False)
    up, _ = draw.resample(maps, size)
    image = None
    empty = 0
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            image = ax.imshow(up[i], cmap=draw.CMAP, vmin=0.0, vmax=1.0)
            ax.set_title(f"{names[int(classes[i])][:24]} (n={int(counts[i])})", fontsize=7)
            if not np.any(maps[i]):
                empty += 1
                ax.text(0.5, 0.5, f"all {int(counts[i])} maps\nare zero", transform=ax.transAxes, ha="center",
                        va="center", fontsize=7, bbox=dict(boxstyle="round", facecolor="white", alpha=0.85,
                                                           linewidth=0))
    bar = fig.colorbar(image, ax=axes, shrink=0.6)
    bar.set_label("mean of max-normalised maps", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    note = f"; {empty} class(es) with every map zero" if empty else ""
    fig.suptitle(f"{CAM_TITLES[method]}: mean map per class ({layer}){note}", fontsize=9)
    return fig


def activation_sheets(part: Path, out_dir: Path, photos: Photos | None = None) -> list[Path]:
    """Per image and layer: a grid of the first activations.grid channels and every
    channel, activations.per_row tiles a row; the blank fraction by depth."""
    import h5py

    from pipeline.explain import blank_channels
    from pipeline.render import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(part, "r") as f:
        g = f["activations"]
        grid, per_row = int(g.attrs.get("grid", 64)), int(g.attrs.get("per_row", 16))
        ids = g["image"][()]
        names = json.loads(g["blank_fraction"].attrs["layers"])
        keys = json.loads(g["blank_fraction"].attrs["keys"])
        side = max(1, int(math.isqrt(grid)))
        jobs = [(i, n, key) for i in range(len(ids)) for n, key in zip(names, keys)]
        for row, name, key in tqdm(jobs, desc="activation sheets", unit="sheet"):
            maps = g[key][row].astype(np.float32)  # (H, W, C)
            h, w, c = maps.shape
            blank = blank_channels(maps[None])[0]
            tiles = draw.channel_tiles(maps, blank, max(TILE_PX, h))
            first = min(c, side * side)
            image = draw.tile(tiles[:first], side)
            title = f"{name}: channels 0-{first - 1} of {c}, image #{ids[row]}"
            written.append(save_sheet(sheet_image(image, title, _legend(blank[:first])),
                                      out_dir / f"{key}_grid_{ids[row]}.png"))
            image = draw.tile(tiles, per_row)
            title = f"{name}: all {c} channels ({h}x{w}), image #{ids[row]}"
            written.append(save_sheet(sheet_image(image, title, _legend(blank)), out_dir / f"{key}_{ids[row]}.png"))
        fractions = g["blank_fraction"][()]
    written.append(draw.save(blank_fraction_figure(names, fractions, ids), out_dir / "blank_fraction.png",
                             FAST_PNG))
    logger.info("activations: %d sheet(s) in %s", len(written), out_dir)
    return written



def text_strip(text: str, width: int, height: int, fontsize: float, grey: float = 0.0) -> np.ndarray:
    """`text` (lines split at newlines) centred on a white (height, width, 3) uint8 strip,
    pasted from render.text's glyph atlas: no figure per strip (two a sheet, every sheet)."""
    from pipeline.render.draw import DPI
    from pipeline.render.text import draw_text, font

    out = np.full((height, width, 3), 255, np.uint8)
    lines = text.split("\n")
    size = round(fontsize * DPI / 72)  # the figures' points at the sheets' 150 dpi
    while size > 6 and font(size).height * len(lines) > height:
        size -= 1
    step = font(size).height
    y = (height - step * len(lines)) / 2
    ink = (round(255 * grey),) * 3
    for line in lines:
        draw_text(out, line, width / 2, y, size, ink, align="center", max_width=width - 4)
        y += step
    return out


def sheet_image(image: np.ndarray, title: str, note: str = "", min_width: int = 640) -> np.ndarray:
    """A composed image at whole-pixel scale (enlarged by repetition to at least
    `min_width` pixels where it is small), a title above and a wrapped note below, as one
    uint8 RGB array."""
    import textwrap

    image = np.asarray(image)
    rep = max(1, min_width // max(image.shape[1], 1))
    if rep > 1:
        image = np.repeat(np.repeat(image, rep, axis=0), rep, axis=1)
    h, w = image.shape[:2]
    width = max(w, min_width)
    lines = textwrap.wrap(note, width=max(40, width // 8)) if note else []
    top, bottom = 36, 10 + 13 * len(lines)
    out = np.full((top + h + bottom, width, 3), 255, np.uint8)
    out[:top] = text_strip(title, width, top, 8)
    x0 = (width - w) // 2
    out[top:top + h, x0:x0 + w] = image[..., :3] if image.ndim == 3 else image[..., None]
    if lines:
        out[top + h:] = text_strip("\n".join(lines), width, bottom, 6, 0.3)
    return out


PALETTE_ERROR = 16  # what the tests allow a tile's colour to move in the palette (levels of 255)


def save_sheet(image: np.ndarray, path: Path) -> Path:
    """A sheet (H, W, 3) uint8 as a 256-colour PNG: its tiles come from one 256-entry colour
    map plus grey and white, so an octree palette moves a colour by a few levels (the mean
    about 1.5, the tests allow PALETTE_ERROR), for about a fifth of the bytes of RGB; with no
    matplotlib figure of the large image, about four times faster than drawing one."""
    from PIL import Image

    from pipeline.store import replacing

    path = Path(path)
    paletted = Image.fromarray(np.ascontiguousarray(image)).quantize(256, method=Image.Quantize.FASTOCTREE,
                                                                      dither=Image.Dither.NONE)
    with replacing(path) as tmp:
        paletted.save(tmp, "PNG", compress_level=3)
    return path


def _legend(blank: np.ndarray) -> str:
    return (f"row-major; each channel standardised (mean/std, clipped), viridis; "
            f"flat grey: blank channel ({int(blank.sum())} of {len(blank)})")



def blank_fraction_figure(names: list[str], fractions: np.ndarray, ids: np.ndarray):
    """Share of blank channels per layer, layers in network order; one faint line per
    image and their mean."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.5, 0.3 * len(names) + 2), 3.8), dpi=150, layout="constrained")
    ax = fig.subplots()
    depth = np.arange(len(names))
    for i in range(len(fractions)):
        ax.plot(depth, fractions[i], color="0.7", lw=0.8)
    if len(fractions):
        ax.plot(depth, fractions.mean(axis=0), color="C0", lw=2, marker="o", ms=4,
                label=f"mean over {len(fractions)} image(s)")
        ax.legend(fontsize=7, frameon=False)
    ax.set_xticks(depth)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("blank channels (share)", fontsize=8)
    ax.set_xlabel("layer (input to output)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("sparsity of activations by depth", fontsize=9)
    return fig

def drop_scale(drop: np.ndarray) -> tuple[float, float, str]:
    """(vmin, vmax, colour map) of an occlusion map drawn as the drop from the unoccluded
    value: the data range, from 0; symmetric about 0 on a diverging map when the square
    also raises the value somewhere (a signed drop), so 0 is the same colour on both sides."""
    lo, hi = min(float(np.min(drop)), 0.0), max(float(np.max(drop)), 0.0)
    if lo < 0:
        top = max(-lo, hi)
        return -top, top, "RdBu_r"
    return 0.0, hi if hi > 0 else 1e-6, "magma"


def occlusion_panels(fig, axes, backdrop: np.ndarray, g, row: int, class_name: str) -> None:
    """The two occlusion maps of one stored row on `axes`, over the photo the model saw: the
    drop of the target's probability and of the followed channel's total activation when
    the square covers each cell; one colour scale per map kind (drop_scale), said on the bar.
    The per-image sheet and the occlusion stage's sheet both draw with this."""
    from pipeline.render.results import as_str

    size = int(g.attrs.get("size", 0))
    side_y, side_x = backdrop.shape[:2]
    # each cell drawn around the square's centre, halfway to its neighbours
    y_edges, x_edges = cell_edges(g["rows"][()] + size / 2, side_y), cell_edges(g["cols"][()] + size / 2, side_x)
    channel = int(g["channel"][row])
    layer = as_str(g.attrs.get("layer", "?"))
    panels = ((g["probability"][row], float(g["base_probability"][row]), f"p({class_name[:24]})",
               f"drop of p({class_name[:24]}) with the square there"),
              (g["activation"][row], float(g["base_activation"][row]), f"{layer} ch {channel} total",
               f"drop of {layer} channel {channel}'s total activation"))
    for ax, (values, base, short, title) in zip(axes, panels):
        drop = base - np.asarray(values, np.float64)
        lo, hi, cmap = drop_scale(drop)
        ax.imshow(backdrop, alpha=0.25)
        mesh = ax.pcolormesh(x_edges, y_edges, drop, cmap=cmap, alpha=0.9, vmin=lo, vmax=hi)
        ax.set_xlim(0, side_x)
        ax.set_ylim(side_y, 0)
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(mesh, ax=ax, shrink=0.85)
        bar.set_label(f"{short}: unoccluded {base:.3g}\nminus with the square"  # two lines: no longer than the map
                      f"{' (< 0: the square raises it)' if lo < 0 else ''}", fontsize=6)
        bar.ax.tick_params(labelsize=6)


def occlusion_sheets(part: Path, out_dir: Path, photos: Photos) -> list[Path]:
    """Per image: the photo (as the model saw it) with the square's size marked, and the
    drops of the target probability and of the followed feature map (occlusion_panels)."""
    import h5py

    from pipeline.render import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(part, "r") as f:
        g = f["occlusion"]
        names = stored_class_names(f, int(g.attrs.get("num_classes", 0)))
        for i, image_id in enumerate(tqdm(g["image"][()], desc="occlusion sheets", unit="sheet")):
            pixels = photos.model_view(int(image_id))
            if pixels is None:
                continue  # unreadable now, though it was read for the maps: open_photo warned, naming it
            cls = int(g["class"][i])
            fig = occlusion_figure(pixels, g, i, names[cls] if cls < len(names) else f"class {cls}")
            written.append(draw.save(fig, out_dir / f"image_{int(image_id)}.png", FAST_PNG))
    logger.info("occlusion: %d sheet(s) in %s", len(written), out_dir)
    return written


def occlusion_figure(pixels: np.ndarray, g, row: int, class_name: str):
    """The occlusion stage's sheet of one stored row: the photo with the square's size in
    the corner, then occlusion_panels."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from pipeline.render import draw

    size, stride = int(g.attrs["size"]), int(g.attrs["stride"])
    photo = draw.to_rgb(pixels)
    fig = Figure(figsize=(9.0, 3.3), dpi=draw.DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].imshow(photo)
    axes[0].add_patch(Rectangle((2, 2), size, size, facecolor=(0.5, 0.5, 0.5), edgecolor="white", lw=0.8))
    axes[0].set_title(f"#{int(g['image'][row])}: {class_name[:30]} (p={g['base_probability'][row]:.2f})", fontsize=8)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    occlusion_panels(fig, axes[1:], photo, g, row, class_name)
    fig.suptitle(f"occlusion sensitivity: grey square {size} px, stride {stride} px", fontsize=9)
    return fig


# ----------------------------------------------------------------------------
# drawn at the end of each stage; redrawn by the report stage when missing or stale

SHEETS = {"activations": activation_sheets, "cam": cam_sheets, "occlusion": occlusion_sheets}
NEEDED = {"activations": "grid", "cam": "drawn", "occlusion": "num_classes"}  # attrs the drawing reads
RECORD = ".sheets.json"  # in each stage's sheet folder: the part they were drawn from, the files


def _stamp(f, stage: str) -> list:
    """Identity of the file that holds the stage's group (its part: a re-run writes it anew)."""
    import os

    st = os.stat(f[stage].file.filename)
    return [st.st_mtime_ns, st.st_size]


def _file_state(path) -> list | None:
    """[mtime_ns, size] of a photo's file, None when there is none."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def draw_stage_sheets(part: Path, run_dir: Path, stage: str, photos: Photos) -> list[Path]:
    """Draw the sheets of `stage` into run_dir/<stage>/ from `part` (the stage's part or
    results.h5) and the photos, and record what they were drawn from."""
    import h5py

    from pipeline.store import atomic_file

    out_dir = Path(run_dir) / stage
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(photos.unreadable)
    written = SHEETS[stage](Path(part), out_dir, photos)
    with h5py.File(part, "r") as f:
        stamp = _stamp(f, stage)
    record = dict(part=stamp, files=[Path(p).relative_to(out_dir).as_posix() for p in written])
    if photos.unreadable - before:  # drawn without these photos: drawn again once their files change
        record["unreadable"] = {str(i): _file_state(photos.paths[i]) for i in sorted(photos.unreadable - before)}
    with atomic_file(out_dir / RECORD, "w") as fh:
        json.dump(record, fh)
    return written


def _read_record(path: Path) -> dict:
    """What a drawing's record says it was drawn from ({} when there is none or it is damaged)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _figure_record(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "sheets" / f".{stage}{RECORD}"


def draw_stage_figures(part: Path, run_dir: Path, stage: str) -> list[Path]:
    """Draw the figures of a stage that trains or measures a network (render.training.FIGURES)
    into run_dir/sheets/ from `part` (the stage's part or results.h5) alone, and record
    what they were drawn from."""
    import h5py

    from pipeline.render.training import FIGURES
    from pipeline.store import atomic_file

    with h5py.File(part, "r") as f:
        written = FIGURES[stage][1](f, Path(run_dir))
        stamp = _stamp(f, stage)
    record = _figure_record(run_dir, stage)
    record.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(record, "w") as fh:
        json.dump(dict(part=stamp, files=[Path(p).relative_to(run_dir).as_posix() for p in written]), fh)
    return written


def redraw_stale_figures(results_path: Path, run_dir: Path) -> list[Path]:
    """Redraw from results.h5 the figures of each stage of render.training.FIGURES that are
    missing or were drawn from an older run of the stage; keep the others."""
    import h5py

    from pipeline.render.training import FIGURES

    stale = []
    with h5py.File(results_path, "r") as f:
        for stage, (needed, _) in FIGURES.items():
            if stage not in f or (needed not in f[stage] and needed not in f[stage].attrs):
                continue  # not run, or by a version that did not keep all the figures need
            record = _read_record(_figure_record(run_dir, stage))
            if record.get("part") != _stamp(f, stage) or \
                    not all((Path(run_dir) / n).exists() for n in record.get("files", [])):
                stale.append(stage)
    written = []
    for stage in stale:
        logger.info("report: %s figures missing or older than the stage's results: drawn again", stage)
        written += draw_stage_figures(Path(results_path), run_dir, stage)
    return written


def redraw_stale_sheets(results_path: Path, run_dir: Path) -> list[Path]:
    """Redraw, from results.h5 and the photos, the sheets of each per-image stage whose
    sheets are missing or were drawn from an older run of the stage, and the figures of
    the stages that train or measure a network (redraw_stale_figures); keep the others."""
    import h5py

    from pipeline.errors import PipelineError

    written = redraw_stale_figures(results_path, run_dir)
    stale = []
    with h5py.File(results_path, "r") as f:
        try:
            photos = Photos.of_results(f)
        except (TypeError, PipelineError):  # no preprocessing recorded, or another version's
            return written
        for stage in SHEETS:
            if stage not in f or "image" not in f[stage] or NEEDED[stage] not in f[stage].attrs:
                continue  # not run, or drawn by a version that kept what the sheets need elsewhere
            folder = Path(run_dir) / stage
            record = _read_record(folder / RECORD)
            back = [i for i, state in record.get("unreadable", {}).items()  # files put back or replaced since
                    if int(i) < len(photos.paths) and _file_state(photos.paths[int(i)]) != state]
            if record.get("part") == _stamp(f, stage) and all((folder / n).exists() for n in record["files"]) \
                    and not back:
                continue
            ids = f[stage]["image"][()] if stage != "cam" else f["cam"].attrs.get("drawn", np.zeros(0, np.int64))
            if stage != "activations" and not photos.readable(ids):
                logger.warning("%s sheets: the images are not files that can be read again (an in-memory dataset "
                               "or moved files): run stages=[%s] to draw them", stage, stage)
                continue
            stale.append(stage)
    for stage in stale:
        logger.info("report: %s sheets missing or older than the stage's results: drawn again", stage)
        written += draw_stage_sheets(Path(results_path), run_dir, stage, photos)
    return written
