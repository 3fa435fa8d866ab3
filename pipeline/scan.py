"""The scan: stream every image through the model once, keep per-channel top-k
tables and statistics for the chosen layers, all updated on the device."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.preprocess import Preprocessing, normalize
from pipeline.topk import ChannelStats, TopK, merge_batch


def as_maps(output: tf.Tensor) -> tf.Tensor:
    """Layer output as (B, H, W, C); a (B, C) vector becomes a 1x1 map."""
    if output.shape.rank == 2:
        return output[:, None, None, :]
    if output.shape.rank != 4:
        raise ValueError(f"cannot scan a layer output of rank {output.shape.rank}")
    return output


def channel_sums(maps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-channel sum and number of non-zero activations over (B, H, W).

    A ones-vector matrix product sums several times faster on CPU than
    reduce_sum over three axes, and x / x (0 where x == 0) is the cheapest
    non-zero indicator (one elementwise pass). Counts stay exact in float32 up
    to 2**24 positions per batch; totals are accumulated in float64.
    """
    flat = tf.reshape(maps, (-1, tf.shape(maps)[-1]))
    ones = tf.ones((1, tf.shape(flat)[0]), flat.dtype)
    total = tf.matmul(ones, flat)[0]
    nonzero = tf.matmul(ones, tf.math.divide_no_nan(flat, flat))[0]
    return total, nonzero


class Scanner:
    """Holds the device-side state for a list of layers of a feature model."""

    def __init__(self, feature_model, names: list[str], spec: Preprocessing, k: int):
        self.model = feature_model
        self.names = list(names)
        self.spec = spec
        self.k = k
        shapes = [as_maps(tf.zeros((1,) + tuple(t.shape[1:]))).shape for t in _outputs(feature_model)]
        self.map_shapes = [tuple(int(d) for d in s[1:]) for s in shapes]
        self._vars = []
        for h, w, c in self.map_shapes:
            self._vars.append(dict(
                value=tf.Variable(tf.fill((c, k), -np.inf)),
                image=tf.Variable(tf.fill((c, k), tf.constant(-1, tf.int64))),
                pos=tf.Variable(tf.fill((c, k), -1)),
                total=tf.Variable(tf.zeros(c, tf.float64)),
                zeros=tf.Variable(tf.zeros(c, tf.float64)),
                maximum=tf.Variable(tf.fill((c,), -np.inf)),
            ))
        self.images_seen = 0

    @tf.function(reduce_retracing=True)
    def _update(self, pixels, ids):
        x = normalize(pixels, self.spec.normalize)
        outputs = self.model(x, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        for out, v in zip(outputs, self._vars):
            maps = as_maps(out)
            new_value, new_image, new_pos, batch_max = merge_batch(
                v["value"], v["image"], v["pos"], maps, ids)
            v["value"].assign(new_value)
            v["image"].assign(new_image)
            v["pos"].assign(new_pos)
            total, nonzero = channel_sums(maps)
            v["total"].assign_add(tf.cast(total, tf.float64))
            v["zeros"].assign_add(tf.cast(tf.size(maps) // tf.shape(maps)[-1], tf.float64)
                                  - tf.cast(nonzero, tf.float64))
            v["maximum"].assign(tf.maximum(v["maximum"], tf.reduce_max(batch_max, axis=0)))

    def update(self, pixels, ids: np.ndarray) -> None:
        self._update(pixels, tf.constant(ids, tf.int64))
        self.images_seen += len(ids)

    def results(self) -> list[tuple[TopK, ChannelStats]]:
        out = []
        for (h, w, c), v in zip(self.map_shapes, self._vars):
            pos = v["pos"].numpy()
            image = v["image"].numpy()
            empty = image < 0
            table = TopK(v["value"].numpy(), image,
                         np.where(empty, -1, pos // w).astype(np.int32),
                         np.where(empty, -1, pos % w).astype(np.int32))
            stats = ChannelStats(v["total"].numpy(), v["zeros"].numpy(), v["maximum"].numpy(),
                                 self.images_seen * h * w)
            out.append((table, stats))
        return out


def _outputs(model) -> list:
    outs = model.outputs
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]
