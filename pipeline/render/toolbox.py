"""The Deep Visualization Toolbox's precomputed unit images, drawn from results.h5 only.

The layout is the one the toolbox's loader reads from `caffevis_unit_jpg_dir`:

    max_im/<layer>/<layer>_%04d.jpg                    the unit's top 9 patches, 3x3, row-major
    max_deconv/<layer>/<layer>_%04d.jpg                the same for their deconv panels
    regularized_opt/<layer>/<layer>_%04d_montage.jpg   the unit's filter pattern, 2x2 grid (below)
    regularized_opt/<layer>/whole_layer.jpg            every pattern, ceil(sqrt(C)) tiles a side
    <layer>/unit_%04d/info.txt                         the crop script's table of the top 9
    settings_local.py                                  what a toolbox user pastes (see docs)

Rules taken from the toolbox's loading code:
- The UI shows the pattern montage through `crop_to_corner(img, 2)`: the image must be
  square with an even side; the UI keeps the bottom-left quarter less 3 px on each side
  (its small padding 1 + large padding 2). The best pattern is placed exactly there; the
  top-left quarter holds every seed when there are several.
- whole_layer.jpg is cut into ceil(sqrt(C))^2 equal tiles, row-major, so its sides are
  multiples of the tile count.
- info.txt starts with '# is_conv val image_idx image_class i(if is_conv) j(if is_conv)
  filename' and has one row per patch, best first: '1 %.6f idx class i j filename', where
  (i, j) is the location in the layer's map. Layers whose map is 1x1 are written as dense
  ones (is_conv 0, no i j).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.render.canvas import EMPTY_GREY, resize_patches
from pipeline.render.patches import layer_patches
from pipeline.render.results import as_str
from pipeline.names import shown
from pipeline.store import read_paths, replacing

logger = logging.getLogger(__name__)

JPEG_QUALITY = 85  # the report's cards use the same; q92 4:4:4 made the export a third of a run
# colour at half resolution (4:2:0) from this side on: a 3x3 montage of 32 px patches or larger;
# smaller montages keep every colour sample (a 7 px patch would lose its colours)
SUBSAMPLE_FROM_PX = 96
TRIM = 3  # what the UI cuts off each side of the quarter it shows
SPRITE_MAX_PX = 4096  # whole_layer.jpg: tiles shrink so the sprite stays within this side
BLOCK = 256  # channels read from results.h5 at a time: memory does not grow with the layer
INFO_HEADER = "# is_conv val image_idx image_class i(if is_conv) j(if is_conv) filename"


def tile(images: np.ndarray, side: int) -> np.ndarray:
    """(C, n, h, w, ch) -> (C, side*h, side*w, ch): image i at row i // side, column
    i % side; missing slots black (as the toolbox's crop script leaves them)."""
    c, n, h, w, ch = images.shape
    full = np.zeros((c, side * side, h, w, ch), np.uint8)
    full[:, :n] = images[:, :side * side]
    return full.reshape(c, side, side, h, w, ch).transpose(0, 1, 3, 2, 4, 5).reshape(c, side * h, side * w, ch)


def fit_squares(images: np.ndarray, side: int) -> np.ndarray:
    """images (N, h, w, ch) scaled to fit side x side squares, centred on grey; one
    vectorised resize for the whole stack."""
    n, h, w, ch = images.shape
    scale = side / max(h, w)
    oh, ow = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.full((n, side, side, ch), EMPTY_GREY, np.uint8)
    y, x = (side - oh) // 2, (side - ow) // 2
    out[:, y:y + oh, x:x + ow] = resize_patches(images, (oh, ow))
    return out


def fit_square(image: np.ndarray, side: int) -> np.ndarray:
    """One image (h, w, ch) as fit_squares draws it."""
    return fit_squares(image[None], side)[0]


def corner_montage(best: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
    """The regularized_opt montage of one unit: a square of side 2 * (max(h, w) + 2 * TRIM),
    even for any pattern size. The bottom-left quarter, less TRIM px a side (what the UI
    shows), is the best pattern at its own size; the top-left quarter shows every seed
    (R > 1) in a square grid; the rest is grey."""
    inner = max(best.shape[:2])
    quarter = inner + 2 * TRIM
    out = np.full((2 * quarter, 2 * quarter, best.shape[2]), EMPTY_GREY, np.uint8)
    out[quarter + TRIM:2 * quarter - TRIM, TRIM:quarter - TRIM] = fit_square(best, inner)
    if seeds is not None and len(seeds) > 1:
        side = math.ceil(math.sqrt(len(seeds)))
        cell = max(1, inner // side)
        grid = tile(fit_squares(np.asarray(seeds), cell)[None], side)[0]
        out[TRIM:TRIM + grid.shape[0], TRIM:TRIM + grid.shape[1]] = grid
    return out


def sprite(tiles: np.ndarray, present: np.ndarray) -> np.ndarray:
    """whole_layer.jpg: (C, t, t, ch) tiles in a square of ceil(sqrt(C)) tiles a side,
    row-major, no gaps; channels not computed are grey."""
    c, th, tw, ch = tiles.shape
    side = math.ceil(math.sqrt(c))
    out = np.full((side * th, side * tw, ch), EMPTY_GREY, np.uint8)
    for i in np.flatnonzero(present):
        r, col = divmod(int(i), side)
        out[r * th:(r + 1) * th, col * tw:(col + 1) * tw] = tiles[i]
    return out


def info_text(value, image, label, y, x, paths, is_conv: bool) -> str:
    """One unit's info.txt: the header, then one row per filled slot, best first."""
    rows = [INFO_HEADER]
    for v, i, yy, xx in zip(value, image, y, x):
        if i < 0:
            continue
        where = f" {yy:d} {xx:d}" if is_conv else ""
        rows.append(f"{1 if is_conv else 0} {v:.6f} {i:d} {label[i]:d}{where} {shown(paths[i])}")  # one line per row
    return "\n".join(rows) + "\n"


def jpeg_options(shape: tuple[int, ...]) -> dict:
    """Pillow's JPEG options for an image of `shape` (h, w[, ch]): 4:2:0 colour for large
    images, 4:4:4 for small ones (SUBSAMPLE_FROM_PX); optimised Huffman tables (a few
    percent smaller, the same pixels)."""
    subsampling = 2 if min(shape[:2]) >= SUBSAMPLE_FROM_PX else 0
    return dict(quality=JPEG_QUALITY, subsampling=subsampling, optimize=True)


def save_jpeg(path: Path, image: np.ndarray) -> None:
    """A JPEG; one-channel images (grey models) as grey JPEGs."""
    with replacing(path) as tmp:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, "JPEG",
                                                                              **jpeg_options(image.shape))


def top9_montages(g: h5py.Group, name: str, valid: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """Channels c0:c1 of layers/<layer>/<name> (`patches` or `panels/<method>`) as the
    toolbox's 3x3 montages, drawn with their outside-image area in flat grey."""
    ds = g[name]
    c1 = min(c1, ds.shape[0])
    images = layer_patches(g, name, c0, c1, 9, tuple(ds.shape[2:4]), flat=True, ds=ds)
    images = np.where(valid[c0:c1, :9, None, None, None], images, 0)
    return tile(images, math.ceil(math.sqrt(min(ds.shape[1], 9))))


def _write_montages(out_dir: Path, kind: str, key: str, g: h5py.Group, name: str, valid: np.ndarray) -> int:
    for c0 in range(0, g[name].shape[0], BLOCK):
        for c, image in enumerate(top9_montages(g, name, valid, c0, c0 + BLOCK), c0):
            save_jpeg(out_dir / kind / key / f"{key}_{c:04d}.jpg", image)
    return g[name].shape[0]


def write_layer(f: h5py.File, key: str, out_dir: Path, paths: list[str], labels: np.ndarray) -> int:
    """max_im, max_deconv (where panels exist) and info.txt of one scanned layer."""
    g = f[f"layers/{key}"]
    t = g["topk"]
    image = t["image"][()]
    valid = image >= 0
    written = 0
    if "patches" in g:
        written += _write_montages(out_dir, "max_im", key, g, "patches", valid)
    else:
        logger.info("toolbox %s: no patches (run the crop stage): max_im skipped", key)
    if "panels/deconv" in g:
        written += _write_montages(out_dir, "max_deconv", key, g, "panels/deconv", valid)
    else:
        logger.info("toolbox %s: no deconv panels (stages=[panels], panels.layers=all): max_deconv skipped", key)
    value, y, x = t["value"][()], t["y"][()], t["x"][()]
    h, w = (int(s) for s in g.attrs["shape"][:2])
    for c in range(image.shape[0]):
        unit = out_dir / key / f"unit_{c:04d}"
        unit.mkdir(parents=True, exist_ok=True)
        with replacing(unit / "info.txt") as tmp:
            tmp.write_text(info_text(value[c], image[c], labels, y[c], x[c], paths, h * w > 1))
    return written + image.shape[0]


def write_regularized_opt(results_path: Path, out_dir: Path) -> list[Path]:
    """regularized_opt/<layer>/: one montage per computed unit and whole_layer.jpg per
    layer, for positive objectives (the folder's meaning in the toolbox)."""
    written = []
    with h5py.File(results_path, "r") as f:
        if "filters" not in f:
            return []
        for key, g in f["filters"].items():
            if not isinstance(g, h5py.Group) or "patterns" not in g:
                continue
            if as_str(g.attrs.get("objective", "channel")) == "neg":
                logger.info("toolbox: %s holds negative patterns; regularized_opt is for positive ones, skipped", key)
                continue
            computed, units = g["computed"][()], g["channels"][()]
            total = int(g.attrs.get("channels_total", int(units.max()) + 1))
            h, w, ch = g["patterns"].shape[1:]
            side = math.ceil(math.sqrt(total))
            t = min(max(h, w), max(1, SPRITE_MAX_PX // side))
            tiles = np.full((total, t, t, ch), EMPTY_GREY, np.uint8)
            present = np.zeros(total, bool)
            folder = Path(out_dir) / "regularized_opt" / key
            for row in tqdm(np.flatnonzero(computed), desc=f"toolbox {key}", unit="unit"):
                unit, best = int(units[row]), g["patterns"][row]
                seeds = g["pattern_seeds"][row] if "pattern_seeds" in g else None
                path = folder / f"{key}_{unit:04d}_montage.jpg"
                save_jpeg(path, corner_montage(best, seeds))
                written.append(path)
                tiles[unit] = fit_square(best, t)
                present[unit] = True
            path = folder / "whole_layer.jpg"
            save_jpeg(path, sprite(tiles, present))
            written.append(path)
    return written


def settings_text(out_dir: Path, layers: list[str], names: dict[str, str]) -> str:
    """The lines a toolbox user adds to settings_local.py for this export."""
    remap = {names[k]: k for k in layers if names.get(k, k) != k}
    return "\n".join([
        "# Paste into the toolbox's settings_local.py (next to the model's own settings).",
        f"caffevis_unit_jpg_dir = {str(Path(out_dir).resolve())!r}",
        f"caffevis_jpgvis_layers = {layers!r}",
        "# live layer name -> folder name, where the network's layer names differ from the folders",
        f"caffevis_jpgvis_remap = {remap!r}",
        "",
    ])


def write_toolbox(results_path: Path, out_dir: Path) -> int:
    """Every toolbox file results.h5 has the data for; returns the number of files."""
    out_dir = Path(out_dir)
    written = 0
    with h5py.File(results_path, "r") as f:
        paths = read_paths(f["images"]) if "images" in f else []
        labels = f["images/label"][()] if "images" in f else np.zeros(0, np.int64)
        layers = sorted(f["layers"], key=lambda k: f[f"layers/{k}"].attrs["depth"]) if "layers" in f else []
        names = {k: as_str(f[f"layers/{k}"].attrs.get("name", k)) for k in layers}
        for key in tqdm(layers, desc="toolbox", unit="layer"):
            written += write_layer(f, key, out_dir, paths, labels)
    written += len(write_regularized_opt(results_path, out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with replacing(out_dir / "settings_local.py") as tmp:
        tmp.write_text(settings_text(out_dir, layers, names))
    return written + 1
