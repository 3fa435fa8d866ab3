"""A mergeable, fixed-size sketch of each channel's activation spectrum.

For every channel we count the images' maximum activations in logarithmic
buckets (bucket edges grow by GAMMA, so a quantile read back is within about
7% of the true value), plus one bucket around zero. Few buckets keep the
per-batch update cheap (a dense segment sum over channels x buckets). The counts add up
across batches, shards and resumed runs, and the memory is O(channels x buckets)
whatever the dataset size.
"""

from __future__ import annotations

import math

import numpy as np

GAMMA = 1.15
MIN_ABS = 1e-3  # |v| below this counts as zero
MAX_ABS = 1e3  # larger values land in the last bucket
PER_SIGN = math.ceil(math.log(MAX_ABS / MIN_ABS) / math.log(GAMMA))
BUCKETS = 2 * PER_SIGN + 1  # negatives (most negative first), zero, positives
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def bucket_index(values: tf.Tensor) -> tf.Tensor:
    """Bucket of each value, int32, same shape."""
    import tensorflow as tf  # here, so that the report reads the constants without TensorFlow

    magnitude = tf.abs(values)
    step = tf.math.log(tf.maximum(magnitude, MIN_ABS) / MIN_ABS) / math.log(GAMMA)
    i = tf.clip_by_value(tf.cast(tf.floor(step), tf.int32), 0, PER_SIGN - 1)
    signed = tf.where(values > 0, PER_SIGN + 1 + i, PER_SIGN - 1 - i)
    return tf.where(magnitude < MIN_ABS, PER_SIGN, signed)


def sketch_counts(values: tf.Tensor) -> tf.Tensor:
    """Counts (C, BUCKETS) int32 of values (B, C), to add to a sketch."""
    import tensorflow as tf

    c = tf.shape(values)[1]
    flat = tf.reshape(bucket_index(values) + tf.range(c)[None, :] * BUCKETS, [-1])
    # a dense segment sum beats a scatter into the sketch by several times on CPU
    counts = tf.math.unsorted_segment_sum(tf.ones_like(flat), flat, c * BUCKETS)
    return tf.reshape(counts, (c, BUCKETS))


def bucket_values() -> np.ndarray:
    """The value each bucket stands for (geometric middle of its edges)."""
    mid = MIN_ABS * GAMMA ** (np.arange(PER_SIGN) + 0.5)
    return np.concatenate([-mid[::-1], [0.0], mid]).astype(np.float32)


def sketch_quantiles(sketch: np.ndarray, qs=QUANTILES) -> np.ndarray:
    """Quantiles (C, Q) from counts (C, BUCKETS); NaN for a channel with no counts."""
    counts = np.cumsum(sketch, axis=1)
    total = counts[:, -1:]
    ranks = np.asarray(qs)[None, :] * np.maximum(total - 1, 0)  # 0-based rank of each quantile
    # first bucket whose cumulative count exceeds the rank
    index = (counts[:, None, :] <= ranks[:, :, None]).sum(axis=2)
    out = bucket_values()[np.minimum(index, BUCKETS - 1)]
    return np.where(total > 0, out, np.nan).astype(np.float32)
