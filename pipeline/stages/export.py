"""`export` stage: the Deep Visualization Toolbox's precomputed unit images.

Written from results.h5 only, under <run_dir>/toolbox/ (point the toolbox's
unit_jpg_dir there):

    max_im/<layer>/<layer>_%04d.jpg                    3x3 montage of the unit's top 9 patches
    max_deconv/<layer>/<layer>_%04d.jpg                the same for the deconv panels
    regularized_opt/<layer>/<layer>_%04d_montage.jpg   the unit's filter pattern
    regularized_opt/<layer>/whole_layer.jpg            all patterns, ceil(sqrt(C)) tiles a side, row-major
    <layer>/unit_%04d/info.txt                         per patch: value, image id, label, y, x, path

<layer> is the stored layer name ('/' becomes '.'). A part whose data is not in
results.h5 (no crop, no panels, no filter patterns) is skipped with a log line.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.draw import panel_to_uint8
from pipeline.stages.filters import export_regularized_opt
from pipeline.store import Store, read_strings

logger = logging.getLogger(__name__)

KEYS = ()  # cheap and reads only results.h5: always runs
JPEG_QUALITY = 92


def tile(images: np.ndarray, side: int) -> np.ndarray:
    """(C, n, h, w, 3) -> (C, side*h, side*w, 3): image i at row i // side, column i % side;
    missing slots black."""
    c, n, h, w, ch = images.shape
    full = np.zeros((c, side * side, h, w, ch), np.uint8)
    full[:, :n] = images[:, :side * side]
    return full.reshape(c, side, side, h, w, ch).transpose(0, 1, 3, 2, 4, 5).reshape(c, side * h, side * w, ch)


def _save(path: Path, image: np.ndarray) -> None:
    """A JPEG; one-channel images (grey models) as grey JPEGs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        path, quality=JPEG_QUALITY)


BLOCK = 256  # channels read from results.h5 at a time: memory does not grow with the layer


def _montages(out_dir: Path, kind: str, layer: str, dataset, valid: np.ndarray, convert=None) -> int:
    side = math.ceil(math.sqrt(min(dataset.shape[1], 9)))
    for c0 in range(0, dataset.shape[0], BLOCK):
        images = dataset[c0:c0 + BLOCK]
        images = convert(images) if convert is not None else images
        images = np.where(valid[c0:c0 + BLOCK, :, None, None, None], images, 0)
        for c, montage in enumerate(tile(images[:, :9], side), c0):
            _save(out_dir / kind / layer / f"{layer}_{c:04d}.jpg", montage)
    return dataset.shape[0]


def export_layer(f: h5py.File, key: str, out_dir: Path, paths: list[str], labels: np.ndarray) -> int:
    g = f[f"layers/{key}"]
    image = g["topk/image"][()]
    valid = image >= 0
    written = 0
    if "patches" in g:
        written += _montages(out_dir, "max_im", key, g["patches"], valid)
    else:
        logger.info("export %s: no patches (run the crop stage) - max_im skipped", key)
    if "panels/deconv" in g:
        written += _montages(out_dir, "max_deconv", key, g["panels/deconv"], valid,
                             lambda block: panel_to_uint8(block, panel_dims=3))
    value, y, x = g["topk/value"][()], g["topk/y"][()], g["topk/x"][()]
    for c in range(image.shape[0]):
        lines = [f"{value[c, k]:.6g} {image[c, k]} {labels[image[c, k]]} {y[c, k]} {x[c, k]} {paths[image[c, k]]}"
                 for k in range(image.shape[1]) if valid[c, k]]
        unit = out_dir / key / f"unit_{c:04d}"
        unit.mkdir(parents=True, exist_ok=True)
        (unit / "info.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return written + image.shape[0]


def run(cfg, run_dir: Path, stage_print: str) -> None:
    results = Store(run_dir).require("stages=[scan,crop,export]")
    out_dir = Path(run_dir) / "toolbox"
    written = 0
    with h5py.File(results, "r") as f:
        paths = read_strings(f["images/path"]) if "images" in f else []
        labels = f["images/label"][()] if "images" in f else np.zeros(0, np.int64)
        layers = sorted(f["layers"], key=lambda k: f[f"layers/{k}"].attrs["depth"]) if "layers" in f else []
        for key in tqdm(layers, desc="export", unit="layer"):
            written += export_layer(f, key, out_dir, paths, labels)
    written += len(export_regularized_opt(results, out_dir))  # the filters stage knows its layout
    logger.info("export: %d files under %s", written, out_dir)
