"""The panels engine: deconvnet / guided-backprop / gradient maps of top-k units, cut
into the layer's frame where the crop stage puts the patch's pixels.

For each unit (y, x, c) of a scanned layer the unit is seeded with 1 on its image and
the input-space map is computed with pipeline.backprop. A unit depends on nothing
outside its receptive field, so where the layer's geometry allows (pipeline.field_crop)
the passes run on receptive-field crops, batched across units: the maps are the whole
image's, at the cost of the crop. Every pass also gives the unit's value, checked
against the scan's; where a crop does not reproduce it (a gate or normalisation over
the whole map) `Projector.use_whole_images` switches to whole images. The stage
(pipeline.stages.panels) reads the scan and stores what `block_panels` returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.crop import cut_patches, patch_size
from pipeline.datasets import BatchStream
from pipeline.errors import PipelineError
from pipeline.field_crop import crop_index, crop_plan, crop_positions
from pipeline.panel_codec import SCALE, encode_panels
from pipeline.preprocess import Preprocessing, normalize

logger = logging.getLogger(__name__)

# panels.layers=cropped leaves out layers whose crops exceed this share of the image: they
# cost about a whole-image pass each (VGG16's block5_conv3 at 224: 208x208, 86 %)
MAX_CROPPED_AREA = 0.5
MAX_BATCH_GROWTH = 32  # crops this many times smaller than the image batch this many more seeds


@dataclass
class PanelLayer:
    """One scanned layer's top-k table and geometry, as the panels need them."""

    key: str  # stored name
    name: str  # qualified layer name
    image: np.ndarray  # (C, K)
    value: np.ndarray  # (C, K) the scan's values: a crop must reproduce them
    scale: float  # the largest of them, for the tolerance
    y: np.ndarray
    x: np.ndarray
    box: np.ndarray  # (C, K, 4)
    row_offset: np.ndarray
    col_offset: np.ndarray
    frame: tuple[int, int]
    size: tuple[int, int]  # stored panel size (frame shrunk to crop.max_size)


def crop_plan_of(model, name: str, pointwise=()):
    """(the crop plan of a layer's units, or None and why they need whole images)."""
    from pipeline.geometry import layer_geometry

    geometry = layer_geometry(model, name, pointwise)
    if not geometry.mappable or geometry.message:
        return None, geometry.message or "it has no spatial receptive field"
    return crop_plan(geometry.rows, geometry.cols, geometry.rf_stride, geometry.input_size)


def chosen(choice, layers: list[PanelLayer], plans: dict, model, methods: list[str], batch_size: int
            ) -> list[PanelLayer]:
    if choice == "all":
        return layers
    if choice == "cropped":
        kept, input_size = [], tuple(int(v) for v in model.inputs[0].shape[1:3])
        for layer in layers:
            plan, why = plans[layer.key]
            if plan is not None and plan.area_fraction(input_size) <= MAX_CROPPED_AREA:
                kept.append(layer)
                continue
            if plan is not None:
                why = (f"its {plan.size[0]}x{plan.size[1]} receptive-field crops are "
                       f"{100 * plan.area_fraction(input_size):.0f}% of the image")
            count = int((layer.image >= 0).sum()) * len(methods)
            seconds = count * panel_seconds(model, layer.name, methods[0], min(batch_size, 8),
                                            None if plan is None else plan.size)
            logger.info("panels: none for %s: %s; panels.layers=all computes its %d panels %s, about %.0f min "
                        "here (%.2f s a panel, measured)", layer.name, why, count,
                        "on whole images" if plan is None else "on those crops", seconds / 60,
                        seconds / max(count, 1))
        return kept
    wanted = [str(n) for n in choice]
    known = {name for layer in layers for name in (layer.key, layer.name)}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise PipelineError(f"panels.layers: {', '.join(unknown)} not scanned in this run: pick among "
                            f"{', '.join(layer.key for layer in layers)}, or cropped, or all")
    return [layer for layer in layers if layer.key in wanted or layer.name in wanted]


def panel_seconds(model, name: str, method: str, rows: int, size: tuple[int, int] | None = None) -> float:
    """Measured seconds of one seed's backward map on a whole image, or on a crop of
    `size` (a pass of `rows` seeds after the trace), to say what a layer left out costs."""
    from pipeline.backprop import Backprop

    program = Backprop(model, name, method, input_size=size)
    shape = tuple(int(v) for v in model.inputs[0].shape[1:])
    x = tf.zeros((rows,) + (shape if size is None else tuple(size) + shape[2:]), tf.float32)
    seed = tf.zeros((rows,) + program.output_shape, tf.float32)
    program.maps_and_values(x[:1], seed[:1])  # the trace is not part of the cost
    start = time.perf_counter()
    program.maps_and_values(x, seed)[0].numpy()
    return (time.perf_counter() - start) / rows


def read_layer(key: str, g, max_size: int) -> PanelLayer:
    frame = tuple(int(v) for v in g["geometry"].attrs["frame"])
    value = g["topk/value"][()]
    return PanelLayer(key=key, name=str(g.attrs["name"]), image=g["topk/image"][()], value=value,
                  scale=float(np.abs(value[np.isfinite(value)]).max(initial=0)), y=g["topk/y"][()],
                  x=g["topk/x"][()], box=g["topk/box"][()], row_offset=g["geometry/row_offset"][()],
                  col_offset=g["geometry/col_offset"][()], frame=frame, size=patch_size(frame, max_size))


def block_panels(layer: PanelLayer, c0: int, c1: int, projector: Projector, table, spec: Preprocessing,
                 batch_size: int, bar: tqdm) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Every panel of channels c0:c1 of one layer (`batch_size` images read at a time);
    zero where a slot is empty or its image cannot be read again. A block whose crops
    miss the scan's values is computed again on whole images (earlier blocks passed)."""
    before = bar.n
    try:
        return _block_panels(layer, c0, c1, projector, table, spec, batch_size, bar)
    except CropInexact as err:
        logger.warning("panels of layer %s: %s; computing it on whole images", layer.name, err)
        projector.use_whole_images()
        bar.update(before - bar.n)
        return _block_panels(layer, c0, c1, projector, table, spec, batch_size, bar)


def _block_panels(layer: PanelLayer, c0: int, c1: int, projector: Projector, table, spec: Preprocessing,
                  batch_size: int, bar: tqdm) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    k = layer.image.shape[1]
    h, w = layer.size
    # int8 codes with a float32 scale per panel (pipeline.panel_codec): half of float16's bytes
    out = {}
    for m in projector.methods:
        out[m] = np.zeros((c1 - c0, k, h, w, spec.channels), np.int8)
        out[m + "_norm"] = np.zeros((c1 - c0, k, h, w), np.int8)
        out[m + SCALE] = np.zeros((c1 - c0, k), np.float32)
        out[m + "_norm" + SCALE] = np.zeros((c1 - c0, k), np.float32)
    counts = {"missing": 0}
    counts.update({f"empty {m}": 0 for m in projector.methods})
    c_idx, k_idx = np.nonzero(layer.image[c0:c1] >= 0)
    c_idx += c0
    images = layer.image[c_idx, k_idx]
    order = np.lexsort((k_idx, c_idx, images))  # grouped by image
    c_idx, k_idx, images = c_idx[order], k_idx[order], images[order]
    if len(images) == 0:
        return out, counts
    stream = BatchStream(table, spec, batch_size, ids=np.unique(images))
    pending = _Pending(projector.batch_size)
    done = np.zeros(len(c_idx), bool)

    def compute(entries, rows, starts):
        _compute(layer, projector, c_idx[entries], k_idx[entries], rows, starts, out, c0, counts)
        done[entries] = True
        bar.update(len(entries))

    for ids, pixels in stream:
        x = normalize(pixels, spec.normalize)
        sort = np.argsort(ids)
        pos = sort[np.clip(np.searchsorted(ids[sort], images), 0, len(ids) - 1)]
        hit = np.nonzero(ids[pos] == images)[0]
        if len(hit) == 0:
            continue
        rows, starts = projector.cut(x, pos[hit], layer.y[c_idx[hit], k_idx[hit]], layer.x[c_idx[hit], k_idx[hit]])
        pending.add(hit, rows, starts)
        for batch in pending.full():
            compute(*batch)
    for batch in pending.rest():
        compute(*batch)
    counts["missing"] = int((~done).sum())  # images that could not be decoded again: their panels stay zero
    bar.update(counts["missing"])
    return out, counts


class CropInexact(Exception):
    """Receptive-field crops do not reproduce a layer's values."""


class Projector:
    """The backward maps of one layer's units, on receptive-field crops where
    pipeline.field_crop finds them exact, else on whole images.

    `cut(x, which, y, x)` gives the model inputs of the units at (y, x) of images
    x[which] (their crops, or the images) and where each starts in the image;
    `maps(method, rows, c, y, x)` their backward maps and values.
    """

    def __init__(self, model, layer: PanelLayer, methods: list[str], batch_size: int, plan, why: str):
        self.model, self.layer, self.methods, self.whole_batch = model, layer, methods, batch_size
        self.input_size = tuple(int(v) for v in model.inputs[0].shape[1:3])
        if plan is not None:
            try:
                self._use(plan, {m: self._program(m, plan.size) for m in methods})
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as err:
                plan, why = None, f"its layers do not run on {plan.size[0]}x{plan.size[1]} crops ({err})"
        if plan is None:
            logger.info("panels of layer %s on whole images: %s", layer.name, why)
            self.use_whole_images()
        else:
            logger.info("panels of layer %s on %dx%d receptive-field crops (%.1f%% of the image), %d seeds a pass",
                        layer.name, *plan.size, 100 * plan.area_fraction(self.input_size), self.batch_size)

    def _program(self, method: str, size=None):
        from pipeline.backprop import Backprop

        return Backprop(self.model, self.layer.name, method, input_size=size)

    def _use(self, plan, programs: dict) -> None:
        self.plan, self.programs = plan, programs
        growth = 1 if plan is None else min(MAX_BATCH_GROWTH, int(1 / plan.area_fraction(self.input_size)))
        self.batch_size = self.whole_batch * max(1, growth)  # about the same memory per pass

    def use_whole_images(self) -> None:
        self._use(None, {m: self._program(m) for m in self.methods})

    def cut(self, x: tf.Tensor, which: np.ndarray, y: np.ndarray, xs: np.ndarray) -> tuple[tf.Tensor, np.ndarray]:
        if self.plan is None:
            return tf.gather(x, which), np.zeros((len(which), 2), np.int64)
        starts, _ = crop_positions(self.plan, y, xs)
        return tf.gather_nd(x, crop_index(which, starts, self.plan.size)), starts

    def maps(self, method: str, rows: tf.Tensor, c: np.ndarray, y: np.ndarray, x: np.ndarray):
        program = self.programs[method]
        if self.plan is not None:
            _, inside = crop_positions(self.plan, y, x)
            y, x = inside[:, 0], inside[:, 1]
        maps, values = program.maps_and_values(rows, seed_for(program.output_shape, c, y, x))
        return maps.numpy(), values.numpy()


def log_counts(stats: dict[str, dict[str, int]], capped: bool) -> None:
    """Log the stage's panel counts; `capped`: the model has a ReLU with a ceiling (ReLU6)."""
    why = "the unit is inactive, or clipped by a ReLU6" if capped else "the unit is inactive there"
    for name, counts in stats.items():
        if counts["missing"]:
            logger.warning("layer %s: %d panel(s) left zero, their images could not be read again",
                           name, counts["missing"])
        for key, count in counts.items():
            if key.startswith("empty ") and count:
                logger.info("layer %s: %d %s panel(s) are all zero (%s, where only deconv passes a signal)",
                            name, count, key[6:], why)


class _Pending:
    """Rows waiting for a backward pass: full batches first, the remainder at the end."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.entries: list[np.ndarray] = []
        self.rows: list[tf.Tensor] = []
        self.starts: list[np.ndarray] = []
        self.count = 0

    def add(self, entries: np.ndarray, rows: tf.Tensor, starts: np.ndarray) -> None:
        self.entries.append(entries)
        self.rows.append(rows)
        self.starts.append(starts)
        self.count += len(entries)

    def full(self):
        if self.count < self.batch_size:
            return
        entries, rows, starts = np.concatenate(self.entries), tf.concat(self.rows, 0), np.concatenate(self.starts)
        n = (self.count // self.batch_size) * self.batch_size
        for i in range(0, n, self.batch_size):
            yield entries[i:i + self.batch_size], rows[i:i + self.batch_size], starts[i:i + self.batch_size]
        self.entries, self.rows, self.starts, self.count = [entries[n:]], [rows[n:]], [starts[n:]], self.count - n

    def rest(self):
        if self.count:
            yield np.concatenate(self.entries), tf.concat(self.rows, 0), np.concatenate(self.starts)
        self.entries, self.rows, self.starts, self.count = [], [], [], 0


def _compute(layer: PanelLayer, projector: Projector, c: np.ndarray, k: np.ndarray, rows: tf.Tensor,
             starts: np.ndarray, out: dict, c0: int, counts: dict) -> None:
    """Panels of the entries (c, k) whose model inputs (crops starting at `starts`
    in their images, or the images) are `rows`, into `out`."""
    y, x = layer.y[c, k], layer.x[c, k]
    boxes = layer.box[c, k] - np.tile(starts, 2)  # in the crop's pixels
    offsets = np.stack([layer.row_offset[y], layer.col_offset[x]], axis=1)
    for method in projector.methods:
        maps, values = projector.maps(method, rows, c, y, x)
        if projector.plan is not None:
            _check_values(values, layer.value[c, k], layer.scale)
        raw = place_in_frame(maps, boxes, offsets, layer.frame)
        norm = np.sqrt(np.square(raw).sum(axis=-1))
        raw, norm = shrink_float(raw, layer.size), shrink_float(norm[..., None], layer.size)[..., 0]
        codes, scale = encode_panels(raw, panel_dims=3)
        counts[f"empty {method}"] += int((scale == 0).sum())
        out[method][c - c0, k], out[method + SCALE][c - c0, k] = codes, scale
        out[method + "_norm"][c - c0, k], out[method + "_norm" + SCALE][c - c0, k] = encode_panels(norm, panel_dims=2)


def _check_values(got: np.ndarray, expected: np.ndarray, scale: float) -> None:
    """The units' values on their crops must be the scan's (float tolerance)."""
    error = np.abs(got - expected)
    bad = error > 1e-3 * np.abs(expected) + 1e-4 * scale + 1e-6
    if bad.any():
        worst = int(np.argmax(error))
        raise CropInexact(f"{int(bad.sum())} of {len(got)} units differ on their receptive-field crop "
                          f"(e.g. {got[worst]:.6g} instead of the scan's {expected[worst]:.6g})")


def seed_for(output_shape: tuple, c: np.ndarray, y: np.ndarray, x: np.ndarray) -> tf.Tensor:
    """One-hot seeds at the scanned units (a flat output is seeded by channel alone)."""
    from pipeline.backprop import seed_at

    if len(output_shape) == 1:
        return seed_at(output_shape, c)
    return seed_at(output_shape, c, y, x)


def _coordinate_image(size: tuple[int, int]) -> np.ndarray:
    """(1, H, W, 4) uint8: (row + 1, col + 1) of every pixel, as two bytes each."""
    h, w = size
    rows = np.broadcast_to(np.arange(1, h + 1)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(1, w + 1)[None, :], (h, w))
    return np.stack([rows >> 8, rows & 255, cols >> 8, cols & 255], axis=-1).astype(np.uint8)[None]


def place_in_frame(maps: np.ndarray, boxes: np.ndarray, offsets: np.ndarray, frame: tuple[int, int],
                   coords: np.ndarray | None = None) -> np.ndarray:
    """Input-space maps (E, S, S, C) cut into the layer frame (E, fh, fw, C) like the patches.

    pipeline.crop.cut_patches decides where every patch pixel comes from; cutting
    an image of pixel coordinates with it gives, for every frame pixel, the
    model-input pixel it shows (0 outside the box), and the maps are read there.
    """
    if coords is None:
        coords = _coordinate_image(maps.shape[1:3])
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
