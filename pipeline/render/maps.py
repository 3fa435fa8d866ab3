"""Per-image sheets of the map stages, drawn from each stage's part and the images:
Grad-CAM family overlays and per-class means (cam/), activation grids and the blank
fraction by depth (activations/), occlusion sensitivity maps (occlusion/).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from pipeline.names import shown
from pipeline.preprocess import input_box
from pipeline.render.draw import CAM_TITLES, cell_edges, open_photo, to_rgb

if TYPE_CHECKING:
    from pipeline.datasets import ImageTable

logger = logging.getLogger(__name__)

ROWS_PER_PAGE = 6
CLASS_MEANS_DRAWN = 24
MIN_CLASS_IMAGES = 2
DISPLAY_SIDE = 448  # longest side of a photo on the sheets
TILE_PX = 32  # small maps are enlarged by whole factors to about this size


def original_photo(table: ImageTable, image_id: int, spec=None) -> np.ndarray | None:
    """The image as the stream decodes it (upright; a JPEG at the DCT scale the model's
    resize allows for `spec`), uint8 RGB, or None when it cannot be read."""
    if table.arrays is not None:
        return to_rgb(table.arrays[image_id])
    return open_photo(table.paths[image_id], getattr(table, "exif", True), spec)


def display_photo(table: ImageTable, image_id: int, spec, pixels: np.ndarray):
    """(photo, box): the original photo shrunk to DISPLAY_SIDE and where the model's input
    lies in it (y0, x0, y1, x1); the model-input pixels when the file cannot be reopened."""
    from PIL import Image


    photo = original_photo(table, image_id, spec)
    if photo is None:
        return to_rgb(pixels), (0.0, 0.0, float(pixels.shape[0]), float(pixels.shape[1]))
    h, w = photo.shape[:2]
    box = input_box(h, w, spec)
    scale = min(1.0, DISPLAY_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR, reducing_gap=2.0))
        sy, sx = photo.shape[0] / h, photo.shape[1] / w
        box = (box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx)
    return photo, box



def file_slug(method: str) -> str:
    return method.replace("++", "_pp")



def drawn_maps(part: Path, table: ImageTable, spec, methods: list[str], limit: int, batch_size: int) -> dict:
    """image id -> its pixels and, per method, (maps, classes, scores) of its targets, for
    the images below `limit`, read back from the stage's part (a resumed run has them too)."""
    import h5py

    from pipeline.datasets import BatchStream

    with h5py.File(part, "r") as f:
        image = f["cam/image"][()]
        rows = np.flatnonzero(image < limit)
        drawn = {int(i): {"maps": {}} for i in np.unique(image[rows])}
        for m in methods:
            g = f[f"cam/{m}"]
            maps = g["map"][rows] if len(rows) else np.zeros((0,) + g["map"].shape[1:], np.float32)
            classes, scores = g["class"][()][rows], g["score"][()][rows]
            for image_id in drawn:
                sel = image[rows] == image_id
                drawn[image_id]["maps"][m] = (maps[sel], classes[sel], scores[sel])
    for ids, pixels in BatchStream(table, spec, batch_size, ids=np.asarray(sorted(drawn), np.int64)):
        for image_id, p in zip(ids, pixels.numpy()):
            drawn[int(image_id)]["pixels"] = p
    return {i: item for i, item in drawn.items() if "pixels" in item}



def classes_with_means(counts: np.ndarray) -> np.ndarray:
    """Rows of class_mean worth drawing: the most frequent classes with at least
    MIN_CLASS_IMAGES images (a mean of one map is that map, not a class's typical evidence)."""
    rows = np.flatnonzero(np.asarray(counts) >= MIN_CLASS_IMAGES)
    return rows[np.argsort(-np.asarray(counts)[rows], kind="stable")][:CLASS_MEANS_DRAWN]


def cam_sheets(part: Path, out_dir: Path, table: ImageTable, spec, names: list[str], methods: list[str],
                alpha: float, limit: int, batch_size: int) -> list[Path]:
    """Overlay pages (photo, then one panel per method; a row per image and target) and
    the per-class mean maps, as PNG files in out_dir."""
    import h5py
    from matplotlib.figure import Figure

    from pipeline.render import draw
    from pipeline.render.results import as_str

    drawn = drawn_maps(part, table, spec, methods, limit, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = []
    for image_id in sorted(drawn):
        item = drawn[image_id]
        photo, box = display_photo(table, image_id, spec, item["pixels"])
        for k in range(len(item["maps"][methods[0]][1])):  # one row per target
            rows.append((image_id, k, photo, box, item))
    pages = math.ceil(len(rows) / ROWS_PER_PAGE)
    for page in tqdm(range(pages), desc="cam sheets", unit="page"):
        chunk = rows[page * ROWS_PER_PAGE:(page + 1) * ROWS_PER_PAGE]
        aspect = max(photo.shape[0] / photo.shape[1] for _, _, photo, _, _ in chunk)
        fig = Figure(figsize=(2.3 * (len(methods) + 1), (2.3 * aspect + 0.45) * len(chunk) + 0.3), dpi=draw.DPI,
                     layout="constrained")
        axes = fig.subplots(len(chunk), len(methods) + 1, squeeze=False)
        for r, (image_id, k, photo, box, item) in enumerate(chunk):
            cls = int(item["maps"][methods[0]][1][k])
            score = float(item["maps"][methods[0]][2][k])
            axes[r, 0].imshow(draw.to_rgb(photo))
            axes[r, 0].set_title(f"#{image_id} {shown(Path(table.paths[image_id]).name)}", fontsize=6)
            axes[r, 0].set_ylabel(f"{names[cls][:28]}\nlogit {score:.2f}", fontsize=7)
            for col, m in enumerate(methods, 1):
                one = item["maps"][m][0][k]
                if m == "guided_gradcam":
                    axes[r, col].imshow(draw.paste_in_box(photo, draw.guided_image(one), box))
                else:
                    axes[r, col].imshow(draw.overlay(photo, one, alpha=alpha, box=box))
                draw.mark_zero(axes[r, col], m, one)
                if r == 0:
                    axes[r, col].set_title(CAM_TITLES[m], fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"class activation maps, page {page + 1} of {pages}", fontsize=9)
        written.append(draw.save(fig, out_dir / f"overlays_{page:03d}.png"))
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
            written.append(draw.save(fig, out_dir / f"class_mean_{file_slug(m)}.png"))
    logger.info("cam: %d sheet(s) in %s", len(written), out_dir)
    return written


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


def activation_sheets(part: Path, out_dir: Path, grid: int, per_row: int) -> list[Path]:
    import h5py

    from pipeline.explain import blank_channels
    from pipeline.render import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(part, "r") as f:
        g = f["activations"]
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
            written.append(draw.save(draw.image_figure(image, title, _legend(blank[:first])),
                                     out_dir / f"{key}_grid_{ids[row]}.png"))
            image = draw.tile(tiles, per_row)
            title = f"{name}: all {c} channels ({h}x{w}), image #{ids[row]}"
            written.append(draw.save(draw.image_figure(image, title, _legend(blank)),
                                     out_dir / f"{key}_{ids[row]}.png"))
        fractions = g["blank_fraction"][()]
    written.append(draw.save(blank_fraction_figure(names, fractions, ids), out_dir / "blank_fraction.png"))
    logger.info("activations: %d sheet(s) in %s", len(written), out_dir)
    return written



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

def occlusion_limits(values: np.ndarray, base: float) -> tuple[float, float]:
    """Colour limits of one image's occlusion map: its own range and the unoccluded value, so
    that a confident prediction (p from 0.97 to 0.999) shows where the square hurts, not a
    flat square on a fixed 0..1 scale."""
    lo, hi = min(float(np.min(values)), base), max(float(np.max(values)), base)
    if hi - lo < 1e-12:  # a flat map: a visible range around it
        pad = max(abs(hi) * 1e-3, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def occlusion_sheets(part: Path, out_dir: Path, table, spec, names: list[str], batch_size: int) -> list[Path]:
    """Per image: the photo (as the model saw it) with the square's size marked, the target
    probability map and the followed feature map's activation map, on the photo's axes."""
    import h5py
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from pipeline.datasets import BatchStream
    from pipeline.render import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(part, "r") as f:
        g = f["occlusion"]
        pixels_of = {int(i): p for ids, batch in BatchStream(table, spec, batch_size, ids=g["image"][()])
                     for i, p in zip(ids, batch.numpy())}
        size, stride, layer = int(g.attrs["size"]), int(g.attrs["stride"]), str(g.attrs["layer"])
        rows, cols = g["rows"][()], g["cols"][()]
        for i, image_id in enumerate(tqdm(g["image"][()], desc="occlusion sheets", unit="sheet")):
            if int(image_id) not in pixels_of:
                continue  # unreadable now, though it was read for the maps
            photo = draw.to_rgb(pixels_of[int(image_id)])
            side_y, side_x = photo.shape[:2]
            cls, channel = int(g["class"][i]), int(g["channel"][i])
            # each cell drawn around the square's centre, halfway to its neighbours
            y_edges, x_edges = cell_edges(rows + size / 2, side_y), cell_edges(cols + size / 2, side_x)
            fig = Figure(figsize=(9.0, 3.3), dpi=draw.DPI, layout="constrained")
            axes = fig.subplots(1, 3)
            axes[0].imshow(photo)
            axes[0].add_patch(Rectangle((2, 2), size, size, facecolor=(0.5, 0.5, 0.5), edgecolor="white", lw=0.8))
            axes[0].set_title(f"#{image_id}: {names[cls][:30]} (p={g['base_probability'][i]:.2f})", fontsize=8)
            panels = (
                (g["probability"][i], g["base_probability"][i], f"p({names[cls][:24]}) with the square there",
                 "magma"),
                (g["activation"][i], g["base_activation"][i], f"{layer} channel {channel}: total activation",
                 "viridis"),
            )
            for ax, (values, base, title, cmap) in zip(axes[1:], panels):
                ax.imshow(photo, alpha=0.25)
                lo, hi = occlusion_limits(values, float(base))
                im = ax.pcolormesh(x_edges, y_edges, values, cmap=cmap, alpha=0.9, vmin=lo, vmax=hi)
                ax.set_xlim(0, side_x)
                ax.set_ylim(side_y, 0)
                ax.set_title(title, fontsize=8)
                bar = fig.colorbar(im, ax=ax, shrink=0.8)
                bar.ax.axhline(float(base), color="white", lw=1.5)
                bar.ax.axhline(float(base), color="black", lw=0.6, ls="--")
                bar.set_label(f"unoccluded: {float(base):.3g} (line)", fontsize=6)
                bar.ax.tick_params(labelsize=6)
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"occlusion sensitivity: grey square {size} px, stride {stride} px", fontsize=9)
            written.append(draw.save(fig, out_dir / f"image_{int(image_id)}.png"))
    logger.info("occlusion: %d sheet(s) in %s", len(written), out_dir)
    return written
