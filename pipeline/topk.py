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

def _first_max(t: tf.Tensor, axis: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Max along `axis` and the lowest index that reaches it (tf.argmax promises no tie rule)."""
    best = tf.reduce_max(t, axis=axis, keepdims=True)
    shape = [-1 if a == axis else 1 for a in range(t.shape.rank)]
    index = tf.reshape(tf.range(tf.shape(t)[axis]), shape)
    first = tf.reduce_min(tf.where(t == best, index, tf.int32.max), axis=axis)
    return tf.squeeze(best, axis), first


def row_maxima(maps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, H, W, C) -> each image's maximum (B, C) and the first row holding it (B, C).

    The only pass over the whole maps the top-k bookkeeping needs.
    """
    return _first_max(tf.reduce_max(maps, axis=2), axis=1)


def merge_candidates(value, image, pos, cand_value, ids, cand_y):
    """Merge per-image candidates (B, C) into (C, K) tables, larger value first.

    Returns the new (value, image, pos) tables and `row` (C, K): for entries that
    came from this batch, their index in the batch (their pos holds only y so
    far), -1 for entries kept from the table.

    Only the batch's own top K per channel can enter the table, so those are picked
    first (a top_k over the batch in image-id order, whose lower-index tie rule is then
    lower image id) and the sort that merges them with the table is over 2K entries,
    not K + B.
    """
    c = tf.shape(value)[0]
    k = tf.shape(value)[1]
    by_id = tf.argsort(ids, stable=True)
    in_order = tf.gather(tf.transpose(cand_value), by_id, axis=1)  # (C, B), columns by image id
    batch_value, batch_best = tf.math.top_k(in_order, k=tf.minimum(k, tf.shape(ids)[0]), sorted=True)
    batch_row = tf.gather(by_id, batch_best)  # (C, kb) row in the batch
    all_value = tf.concat([value, batch_value], axis=1)  # (C, K + kb)
    all_image = tf.concat([image, tf.gather(ids, batch_row)], axis=1)
    all_pos = tf.concat([pos, tf.gather(tf.transpose(cand_y), batch_row, batch_dims=1)], axis=1)
    all_row = tf.concat([tf.fill((c, k), -1), batch_row], axis=1)
    # Sorting by image id first makes top_k's documented tie rule (lower index
    # first) break ties by lower image id; empty slots (-1) must rank last.
    order = tf.argsort(tf.where(all_image < 0, tf.int64.max, all_image), axis=1, stable=True)
    new_value, best = tf.math.top_k(tf.gather(all_value, order, batch_dims=1), k=k, sorted=True)
    best = tf.gather(order, best, batch_dims=1)
    take = lambda t: tf.gather(t, best, batch_dims=1)  # noqa: E731
    return new_value, take(all_image), take(all_pos), take(all_row)


def locate_columns(maps: tf.Tensor, pos: tf.Tensor, row: tf.Tensor, batch_max: tf.Tensor) -> tf.Tensor:
    """Complete pos = y * W + x for the table entries that came from this batch.

    x is the first column of row y that holds the image's maximum; only those
    rows are read, so the cost follows the number of new winners, not the maps.
    """
    w = tf.shape(maps)[2]
    fresh = tf.cast(tf.where(row >= 0), tf.int32)  # (E, 2): (channel, slot)
    e = tf.shape(fresh)[0]
    f_row = tf.gather_nd(row, fresh)
    f_y = tf.gather_nd(pos, fresh)
    f_c = fresh[:, 0]
    spread = lambda t: tf.broadcast_to(t[:, None], (e, w))  # noqa: E731
    taps = tf.stack([spread(f_row), spread(f_y), tf.broadcast_to(tf.range(w)[None, :], (e, w)), spread(f_c)], -1)
    rows = tf.gather_nd(maps, taps)  # (E, W)
    target = tf.gather_nd(batch_max, tf.stack([f_row, f_c], axis=1))
    f_x = tf.reduce_min(tf.where(rows == target[:, None], tf.range(w)[None, :], tf.int32.max), axis=1)
    return tf.tensor_scatter_nd_update(pos, fresh, f_y * w + f_x)


def merge_batch(value: tf.Tensor, image: tf.Tensor, pos: tf.Tensor, maps: tf.Tensor, ids: tf.Tensor):
    """Merge a batch of maps (B, H, W, C) with image ids (B,) into (C, K) top-k tables.

    Returns the new (value, image, pos) tables (pos = y * W + x, the lowest
    row-major position holding the image's maximum) and the batch's per-image
    maxima (B, C).
    """
    batch_max, batch_y = row_maxima(maps)
    new_value, new_image, new_pos, row = merge_candidates(value, image, pos, batch_max, ids, batch_y)
    return new_value, new_image, locate_columns(maps, new_pos, row, batch_max), batch_max
