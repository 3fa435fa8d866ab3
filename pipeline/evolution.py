"""How features form during training (Zeiler & Fergus 2013, Fig. 4): the top-k tables
of every snapshot stacked on an epoch axis, their patches, and how much of each
channel's top-k set is replaced from one snapshot to the next. The evolution stage
(pipeline.stages.evolution) scans the snapshots and draws the sheets."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError


def choose_channels(spec, channels: int) -> np.ndarray:
    """Channel indices for a layer of `channels`: N spread evenly (first and last
    included), or an explicit list (checked against the layer's size)."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        n = max(1, min(int(spec), channels))
        return np.unique(np.round(np.linspace(0, channels - 1, n)).astype(np.int64))
    chosen = np.asarray([int(c) for c in spec], np.int64)
    if chosen.size == 0 or (chosen < 0).any() or (chosen >= channels).any():
        raise PipelineError(f"evolution.channels={list(map(int, chosen))} is outside 0..{channels - 1} for a "
                            f"layer of {channels} channels: give indices below {channels} or a count")
    return chosen


def topk_change(image: np.ndarray) -> np.ndarray:
    """(E-1, C) fraction of each channel's top-k images at snapshot e that are gone at e+1.

    image (E, C, K) int64 top-k image ids, -1 for empty slots. A channel with no
    images at snapshot e counts as unchanged (0).
    """
    before, after = image[:-1], image[1:]
    valid = before >= 0
    kept = (before[..., :, None] == after[..., None, :]) & (after[..., None, :] >= 0)
    kept = kept.any(axis=-1) & valid
    n = valid.sum(axis=-1)
    return np.where(n > 0, 1.0 - kept.sum(axis=-1) / np.maximum(n, 1), 0.0).astype(np.float32)


class SnapshotLayer:
    """Per-layer tables of all snapshots, stacked on a leading epoch axis."""

    def __init__(self, name, geo, shape, results, k, max_size):
        from pipeline.crop import patch_size

        self.name, self.geo, self.shape = name, geo, shape
        self.value = np.stack([r[0].value for r in results])
        self.image = np.stack([r[0].image for r in results])
        self.y = np.stack([r[0].y for r in results])
        self.x = np.stack([r[0].x for r in results])
        empty = self.image < 0
        boxes = geo.boxes(np.maximum(self.y, 0), np.maximum(self.x, 0))
        self.box = np.where(empty[..., None], 0, boxes).astype(np.int32)
        self.mean = np.stack([r[1].mean for r in results]).astype(np.float32)
        self.max = np.stack([r[1].maximum for r in results]).astype(np.float32)
        self.zero_fraction = np.stack([r[1].zero_fraction for r in results]).astype(np.float32)
        self.size = patch_size(geo.frame, max_size)
        e, c, kk = self.image.shape
        self.patches = np.zeros((e, c, kk) + self.size + (3,), np.uint8)

    def cut(self, batch_ids: np.ndarray, images: np.ndarray) -> None:
        """Fill the patches of every table entry whose image is in this batch (all snapshots at once)."""
        from pipeline.crop import cut_patches, shrink

        hit = np.isin(self.image, batch_ids)
        if not hit.any():
            return
        idx = np.nonzero(hit)
        order = np.argsort(batch_ids)
        which = order[np.searchsorted(batch_ids[order], self.image[idx])]
        boxes = self.box[idx]
        offsets = self.geo.offsets(self.y[idx], self.x[idx])
        keys = np.concatenate([which[:, None], boxes, offsets], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        patches = cut_patches(images, unique[:, 0], unique[:, 1:5], unique[:, 5:7], self.geo.frame)
        self.patches[idx] = shrink(patches, self.size)[inverse.ravel()]


def all_snapshots(bundles, names):
    """One model from the image to the named layers of every snapshot, snapshot-major:
    a single traced update scans them all."""
    import keras

    from pipeline.graph import feature_model

    inp = keras.Input(bundles[0].model.input_shape[1:], name="image")
    outputs = []
    for e, b in enumerate(bundles):
        out = feature_model(b.model, names, name=f"snapshot_{e}")(inp)
        outputs.extend(out if isinstance(out, (list, tuple)) else [out])
    return keras.Model(inp, outputs, name="snapshots")


def write_layer(g, layer: SnapshotLayer, depth: int, change: np.ndarray, channels: np.ndarray) -> None:
    g.attrs.update(name=layer.name, shape=np.asarray(layer.shape, np.int64), depth=depth,
                   rf_size=np.asarray(layer.geo.rf_size, np.int64), rf_stride=np.asarray(layer.geo.rf_stride),
                   mappable=layer.geo.mappable, geometry_message=layer.geo.message)
    t = g.create_group("topk")
    t["value"], t["image"], t["y"], t["x"], t["box"] = layer.value, layer.image, layer.y, layer.x, layer.box
    s = g.create_group("stats")
    s["mean"], s["max"], s["zero_fraction"] = layer.mean, layer.max, layer.zero_fraction
    g["change"] = change
    g["channels"] = channels
    geo = g.create_group("geometry")
    geo["rows"], geo["cols"] = layer.geo.rows, layer.geo.cols
    geo["row_offset"], geo["col_offset"] = layer.geo.row_offset, layer.geo.col_offset
    geo.attrs["frame"] = np.asarray(layer.geo.frame, np.int64)
    e, c, k, h, w, ch = layer.patches.shape
    g.create_dataset("patches", data=layer.patches, chunks=(1, 1, k, h, w, ch), compression="gzip",
                     compression_opts=4)
    g["patches"].attrs.update(frame=np.asarray(layer.geo.frame, np.int64), scale=h / layer.geo.frame[0])
