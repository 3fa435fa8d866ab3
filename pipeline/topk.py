"""Top-k bookkeeping: per channel, the k images whose spatial maximum is largest.

One location per image and channel (its spatial argmax, lowest (y, x) on ties);
ranking by larger value, then lower image id. The numpy functions are the
reference and do merging (resume, shards); the TensorFlow functions do the
per-batch update on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

EMPTY_IMAGE = -1


@dataclass
class TopK:
    """Per-channel top-k table of one layer; arrays are (C, K), best first."""

    value: np.ndarray  # float32, -inf in empty slots
    image: np.ndarray  # int64, -1 in empty slots
    y: np.ndarray  # int32, -1 in empty slots
    x: np.ndarray  # int32

    @classmethod
    def empty(cls, channels: int, k: int) -> "TopK":
        return cls(np.full((channels, k), -np.inf, np.float32),
                   np.full((channels, k), EMPTY_IMAGE, np.int64),
                   np.full((channels, k), -1, np.int32),
                   np.full((channels, k), -1, np.int32))

    @property
    def k(self) -> int:
        return self.value.shape[1]


def merge_topk(a: TopK, b: TopK, k: int | None = None) -> TopK:
    """The top-k of the union of two tables (the tables hold disjoint images)."""
    k = k or a.k
    value = np.concatenate([a.value, b.value], axis=1)
    image = np.concatenate([a.image, b.image], axis=1)
    y = np.concatenate([a.y, b.y], axis=1)
    x = np.concatenate([a.x, b.x], axis=1)
    # empty slots last, then larger value, lower image id, lower (y, x)
    order = np.lexsort((x, y, image, -value.astype(np.float64), image == EMPTY_IMAGE), axis=1)[:, :k]
    pick = lambda arr: np.take_along_axis(arr, order, axis=1)  # noqa: E731
    return TopK(pick(value), pick(image), pick(y), pick(x))


def topk_from_maps(maps: np.ndarray, image_ids: np.ndarray, k: int) -> TopK:
    """Brute-force top-k of activation maps (N, H, W, C) in numpy: the reference."""
    n, h, w, c = maps.shape
    flat = maps.reshape(n, h * w, c)
    pos = np.argmax(flat, axis=1)  # first (lowest) flat index on ties
    value = np.take_along_axis(flat, pos[:, None, :], axis=1)[:, 0, :]
    batch = TopK(value.T.astype(np.float32), np.broadcast_to(image_ids[None, :], (c, n)).astype(np.int64),
                 (pos // w).T.astype(np.int32), (pos % w).T.astype(np.int32))
    return merge_topk(TopK.empty(c, k), batch, k)


@dataclass
class ChannelStats:
    """Running per-channel statistics over every position of every image."""

    total: np.ndarray  # float64 (C,) sum of activations
    zeros: np.ndarray  # float64 (C,) number of exactly-zero activations
    maximum: np.ndarray  # float32 (C,)
    positions: int  # number of positions summed per channel

    @classmethod
    def empty(cls, channels: int) -> "ChannelStats":
        return cls(np.zeros(channels), np.zeros(channels), np.full(channels, -np.inf, np.float32), 0)

    def merged(self, other: "ChannelStats") -> "ChannelStats":
        return ChannelStats(self.total + other.total, self.zeros + other.zeros,
                            np.maximum(self.maximum, other.maximum), self.positions + other.positions)

    @property
    def mean(self) -> np.ndarray:
        return (self.total / max(self.positions, 1)).astype(np.float32)

    @property
    def zero_fraction(self) -> np.ndarray:
        return (self.zeros / max(self.positions, 1)).astype(np.float32)


# ------------------------------------------------------------- on the device

def spatial_argmax(maps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, H, W, C) -> value (B, C), flat position (B, C) int32, lowest index on ties."""
    shape = tf.shape(maps)
    flat = tf.reshape(maps, (shape[0], shape[1] * shape[2], shape[3]))
    value = tf.reduce_max(flat, axis=1)
    index = tf.range(shape[1] * shape[2], dtype=tf.int32)[None, :, None]
    # tf.argmax does not promise which index wins a tie; this does.
    big = tf.int32.max
    pos = tf.reduce_min(tf.where(flat == value[:, None, :], index, big), axis=1)
    return value, pos


def update_topk(value: tf.Tensor, image: tf.Tensor, pos: tf.Tensor,
                batch_value: tf.Tensor, batch_image: tf.Tensor, batch_pos: tf.Tensor):
    """Merge a batch's (B, C) candidates into a (C, K) table; returns the new table.

    Sorting candidates by image id first makes top_k's documented tie rule (lower
    index first) break ties by lower image id.
    """
    k = tf.shape(value)[1]
    channels = tf.shape(value)[0]
    cand_value = tf.concat([value, tf.transpose(batch_value)], axis=1)
    cand_image = tf.concat([image, tf.broadcast_to(batch_image[None, :], (channels, tf.shape(batch_image)[0]))], axis=1)
    cand_pos = tf.concat([pos, tf.transpose(batch_pos)], axis=1)
    # empty slots (-1) must not win ties against real images: rank them as the largest id
    sort_key = tf.where(cand_image < 0, tf.int64.max, cand_image)
    order = tf.argsort(sort_key, axis=1, stable=True)
    cand_value = tf.gather(cand_value, order, batch_dims=1)
    cand_image = tf.gather(cand_image, order, batch_dims=1)
    cand_pos = tf.gather(cand_pos, order, batch_dims=1)
    new_value, best = tf.math.top_k(cand_value, k=k, sorted=True)
    return new_value, tf.gather(cand_image, best, batch_dims=1), tf.gather(cand_pos, best, batch_dims=1)
