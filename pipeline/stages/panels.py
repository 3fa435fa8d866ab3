"""`panels` stage: deconvnet / guided-backprop / gradient image of every top-k patch.

For each scanned layer and each filled top-k slot (channel c, rank k) the unit
(y, x, c) of that layer is seeded with 1 on its image, the input-space map is
computed with pipeline.backprop for every method in `panels.methods`, and the
map is cut into the layer's frame where the crop stage puts the patch's pixels
and shrunk the same way, so `panels/<method>[c, k]` lies pixel for pixel on
`patches[c, k]`. These are the Deep Visualization Toolbox's precomputed
"deconv" and "backprop" views of the top-9 patches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.crop import cut_patches, patch_size
from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing, normalize
from pipeline.store import RESULTS_FILE, mark_done, read_strings, stages_done, transaction

logger = logging.getLogger(__name__)

# crop: the panels are shrunk to crop.max_size exactly like the patches
KEYS = ("model", "dataset", "layers", "topk", "crop", "panels")

# in-memory panels of one block of channels (all methods), before it is written
BLOCK_BYTES = 256 * 2**20
FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16


@dataclass
class _Layer:
    key: str  # stored name
    name: str  # qualified layer name
    image: np.ndarray  # (C, K)
    y: np.ndarray
    x: np.ndarray
    box: np.ndarray  # (C, K, 4)
    row_offset: np.ndarray
    col_offset: np.ndarray
    frame: tuple[int, int]
    size: tuple[int, int]  # stored panel size (frame shrunk to crop.max_size)


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.backprop import METHODS, Backprop
    from pipeline.models.sources import load_model

    results = run_dir / RESULTS_FILE
    if "scan" not in stages_done(results):
        raise PipelineError(f"no scan results in {run_dir}: run stages=[scan,panels] first")
    methods = [str(m) for m in cfg.panels.methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise PipelineError(f"panels.methods={methods} is not valid: pick distinct names among "
                            f"{', '.join(METHODS)}, e.g. panels.methods=[deconv,guided]")
    if int(cfg.panels.batch_size) < 1:
        raise PipelineError(f"panels.batch_size={cfg.panels.batch_size}: use a positive number of seeds per pass")
    with h5py.File(results, "r") as f:
        spec = Preprocessing(**json.loads(f.attrs["preprocessing"]))
        stored_paths = read_strings(f["images/path"])
        layers = [_read_layer(key, g, cfg.crop.max_size) for key, g in f["layers"].items()]
    table = list_images(cfg.dataset)
    if table.paths != stored_paths:
        raise PipelineError(f"the dataset changed since the scan of {run_dir}: compute panels with "
                            f"the same dataset, or scan again in a new hydra.run.dir")
    bundle = load_model(cfg.model, cfg.cache_dir)
    total = sum(int((layer.image >= 0).sum()) for layer in layers)
    logger.info("panels: %d top-k entries in %d layers, methods %s", total, len(layers), ", ".join(methods))
    coords = _coordinate_image(spec.input_size)
    with transaction(results) as f, tqdm(total=total, desc="panels", unit="patch") as bar:
        for layer in layers:
            programs = {m: Backprop(bundle.model, layer.name, m) for m in methods}
            _layer_panels(f, layer, programs, table, spec, cfg, coords, bar)
        mark_done(f, "panels", stage_print)


def _read_layer(key: str, g: h5py.Group, max_size: int) -> _Layer:
    frame = tuple(int(v) for v in g["geometry"].attrs["frame"])
    return _Layer(key=key, name=str(g.attrs["name"]), image=g["topk/image"][()], y=g["topk/y"][()],
                  x=g["topk/x"][()], box=g["topk/box"][()], row_offset=g["geometry/row_offset"][()],
                  col_offset=g["geometry/col_offset"][()], frame=frame, size=patch_size(frame, max_size))


def _layer_panels(f: h5py.File, layer: _Layer, programs: dict, table, spec: Preprocessing, cfg,
                  coords: np.ndarray, bar: tqdm) -> None:
    """Compute and write every panel of one layer, a block of channels at a time."""
    channels, k = layer.image.shape
    h, w = layer.size
    ch = spec.channels
    g = f[f"layers/{layer.key}"]
    if "panels" in g:
        del g["panels"]
    group = g.create_group("panels")
    group.attrs.update(methods=json.dumps(list(programs)), frame=np.asarray(layer.frame, np.int64),
                       scale=h / layer.frame[0], layer=layer.name,
                       input="gradient w.r.t. the normalised model input")
    datasets = {}
    for m in programs:
        datasets[m] = group.create_dataset(m, (channels, k, h, w, ch), np.float16, chunks=(1, k, h, w, ch),
                                           compression="gzip", compression_opts=4, shuffle=True, fillvalue=0)
        datasets[m + "_norm"] = group.create_dataset(m + "_norm", (channels, k, h, w), np.float16,
                                                     chunks=(1, k, h, w), compression="gzip",
                                                     compression_opts=4, shuffle=True, fillvalue=0)
    per_channel = k * h * w * (ch + 1) * len(programs) * 2
    block = max(1, BLOCK_BYTES // max(per_channel, 1))
    bar.set_postfix_str(layer.name)
    tiny = huge = missing = 0
    empty = dict.fromkeys(programs, 0)
    for c0 in range(0, channels, block):
        c1 = min(channels, c0 + block)
        c_idx, k_idx = np.nonzero(layer.image[c0:c1] >= 0)
        c_idx += c0
        images = layer.image[c_idx, k_idx]
        order = np.lexsort((k_idx, c_idx, images))  # grouped by image
        c_idx, k_idx, images = c_idx[order], k_idx[order], images[order]
        if len(images) == 0:
            continue  # no filled slot in these channels: the datasets' fill value (0) stands
        out = {m: np.zeros((c1 - c0, k, h, w, ch), np.float16) for m in programs}
        out.update({m + "_norm": np.zeros((c1 - c0, k, h, w), np.float16) for m in programs})
        needed = np.unique(images)
        stream = BatchStream(table, spec, cfg.batch_size, ids=needed)
        pending = _Pending(int(cfg.panels.batch_size))
        done = np.zeros(len(c_idx), bool)
        for ids, pixels in stream:
            x = normalize(pixels, spec.normalize)
            sort = np.argsort(ids)
            pos = sort[np.clip(np.searchsorted(ids[sort], images), 0, len(ids) - 1)]
            hit = np.nonzero(ids[pos] == images)[0]
            if len(hit) == 0:
                continue
            pending.add(hit, tf.gather(x, pos[hit]))
            for entries, rows in pending.full():
                t, s = _compute(layer, programs, c_idx[entries], k_idx[entries], rows, coords, out, c0, empty)
                tiny, huge = tiny + t, huge + s
                done[entries] = True
                bar.update(len(entries))
        for entries, rows in pending.rest():
            t, s = _compute(layer, programs, c_idx[entries], k_idx[entries], rows, coords, out, c0, empty)
            tiny, huge = tiny + t, huge + s
            done[entries] = True
            bar.update(len(entries))
        if not done.all():  # images that could not be decoded again: their panels stay zero
            missing += int((~done).sum())
            bar.update(int((~done).sum()))
        for name, array in out.items():
            datasets[name][c0:c1] = array
    if missing:
        logger.warning("layer %s: %d panel(s) left zero, their images could not be read again",
                       layer.name, missing)
    for method, count in empty.items():
        if count:
            logger.info("layer %s: %d %s panel(s) are all zero (the unit is inactive, or clipped by a "
                        "ReLU6, where only deconv passes a signal)", layer.name, count, method)
    if tiny:
        logger.warning("layer %s: %d panel(s) peak below %.1e and lose precision as float16",
                       layer.name, tiny, FLOAT16_TINY)
    if huge:
        logger.warning("layer %s: %d panel(s) exceed the float16 range and were clipped to +-%g",
                       layer.name, huge, FLOAT16_MAX)


class _Pending:
    """Rows waiting for a backward pass: full batches first, the remainder at the end."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.entries: list[np.ndarray] = []
        self.rows: list[tf.Tensor] = []
        self.count = 0

    def add(self, entries: np.ndarray, rows: tf.Tensor) -> None:
        self.entries.append(entries)
        self.rows.append(rows)
        self.count += len(entries)

    def full(self):
        if self.count < self.batch_size:
            return
        entries, rows = np.concatenate(self.entries), tf.concat(self.rows, 0)
        n = (self.count // self.batch_size) * self.batch_size
        for i in range(0, n, self.batch_size):
            yield entries[i:i + self.batch_size], rows[i:i + self.batch_size]
        self.entries, self.rows, self.count = [entries[n:]], [rows[n:]], self.count - n

    def rest(self):
        if self.count:
            yield np.concatenate(self.entries), tf.concat(self.rows, 0)
        self.entries, self.rows, self.count = [], [], 0


def _compute(layer: _Layer, programs: dict, c: np.ndarray, k: np.ndarray, rows: tf.Tensor,
             coords: np.ndarray, out: dict, c0: int, empty: dict) -> tuple[int, int]:
    """Panels of the entries (c, k) whose model inputs are `rows`, into `out`."""
    any_program = next(iter(programs.values()))
    y, x = layer.y[c, k], layer.x[c, k]
    seeds = seed_for(any_program.output_shape, c, y, x)
    boxes = layer.box[c, k]
    offsets = np.stack([layer.row_offset[y], layer.col_offset[x]], axis=1)
    tiny = huge = 0
    for method, program in programs.items():
        maps = program(rows, seeds).numpy()
        raw = place_in_frame(maps, boxes, offsets, layer.frame, coords)
        norm = np.sqrt(np.square(raw).sum(axis=-1))
        raw, norm = shrink_float(raw, layer.size), shrink_float(norm[..., None], layer.size)[..., 0]
        peak = np.abs(raw).reshape(len(raw), -1).max(axis=1)
        tiny += int(((peak > 0) & (peak < FLOAT16_TINY)).sum())
        huge += int((peak > FLOAT16_MAX).sum())
        empty[method] += int((peak == 0).sum())
        out[method][c - c0, k] = np.clip(raw, -FLOAT16_MAX, FLOAT16_MAX)
        out[method + "_norm"][c - c0, k] = np.clip(norm, 0, FLOAT16_MAX)
    return tiny, huge


def seed_for(output_shape: tuple, c: np.ndarray, y: np.ndarray, x: np.ndarray) -> tf.Tensor:
    """One-hot seeds at the scanned units (a flat output is seeded by channel alone)."""
    from pipeline.backprop import seed_at

    if len(output_shape) == 1:
        return seed_at(output_shape, c)
    return seed_at(output_shape, c, y, x)


def _coordinate_image(size: int) -> np.ndarray:
    """(1, S, S, 4) uint8: (row + 1, col + 1) of every pixel, as two bytes each."""
    r = np.arange(1, size + 1)
    rows = np.broadcast_to(r[:, None], (size, size))
    cols = np.broadcast_to(r[None, :], (size, size))
    return np.stack([rows >> 8, rows & 255, cols >> 8, cols & 255], axis=-1).astype(np.uint8)[None]


def place_in_frame(maps: np.ndarray, boxes: np.ndarray, offsets: np.ndarray, frame: tuple[int, int],
                   coords: np.ndarray | None = None) -> np.ndarray:
    """Input-space maps (E, S, S, C) cut into the layer frame (E, fh, fw, C) like the patches.

    pipeline.crop.cut_patches decides where every patch pixel comes from; cutting
    an image of pixel coordinates with it gives, for every frame pixel, the
    model-input pixel it shows (0 outside the box), and the maps are read there.
    """
    if coords is None:
        coords = _coordinate_image(maps.shape[1])
    where = cut_patches(coords, np.zeros(len(maps), np.int64), boxes, offsets, frame).astype(np.int64)
    rows = where[..., 0] * 256 + where[..., 1] - 1  # (E, fh, fw), -1 outside the box
    cols = where[..., 2] * 256 + where[..., 3] - 1
    inside = rows >= 0
    e = np.arange(len(maps))[:, None, None]
    values = maps[e, np.maximum(rows, 0), np.maximum(cols, 0)]
    return np.where(inside[..., None], values, 0).astype(np.float32)


def shrink_float(panels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average float panels (E, h, w, C) down to `size`, as crop.shrink does
    for the patches (without rounding to uint8)."""
    if panels.shape[1:3] == tuple(size) or len(panels) == 0:
        return panels
    return tf.image.resize(tf.convert_to_tensor(panels, tf.float32), size, method="area").numpy()
