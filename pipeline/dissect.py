"""Network dissection on the device: per-unit thresholds from a quantile sketch, then
intersections and unions of every unit's thresholded map with every concept's mask.

Thresholds. T_k is the level unit k exceeds at `quantile` (0.5 %) of all its positions over
the dataset. The sketch counts every activation in a fixed histogram that needs no range:
the bucket is the value's float32 sign, exponent and top MANTISSA_BITS mantissa bits
(a bucket spans 1/64 of its power of two), for |v| in [2**-EXPONENTS, 2**EXPONENTS); smaller
magnitudes share one zero bucket, larger ones the outermost buckets. Counts add across
batches, shards and resumes, so the sketch merges exactly.

Error of the threshold read back (`thresholds`): numpy's linear quantile interpolates
between two order statistics s_a <= s_b; each is estimated inside its bucket (placed by
rank), so |T - q| <= 2**-MANTISSA_BITS * max(|s_a|, |s_b|, 2**-EXPONENTS) (1.6 % of the
larger value), and its rank error (the share of positions whose order against T is
uncertain) is at most the share of positions in those buckets, stored per unit as
`threshold_rank_error`. A quantile in the zero
bucket is 0 exactly (a ReLU unit silent on more than 99.5 % of its positions keeps T = 0:
its mask is where it fires at all).

Tallies (`Tally`): each map is upsampled bilinearly to the mask resolution (the model
input / downsample), compared with T_k, and summed per concept, one image at a time, by a
matrix product of the binary maps with the many-hot matrix of the concepts present in the
image (a segment sum when the concepts are too many for it): intersections (C, L), unit
areas (C,), concept areas (L,). IoU = I / (A_k + A_c - I). A channel whose map stays below
T_k on an image (by SKIP_MARGIN) adds nothing there and is not upsampled.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError

MANTISSA_BITS = 6
EXPONENTS = 20
PER_SIGN = 2 * EXPONENTS << MANTISSA_BITS  # buckets of one sign, the zero bucket apart
SKETCH_BUCKETS = 2 * PER_SIGN + 1  # negatives (most negative first), zero, positives
_LOW = (127 - EXPONENTS) << MANTISSA_BITS  # the biased exponent and mantissa bits of 2**-EXPONENTS
UPSAMPLE_BUDGET = 8 * 2**20  # the most upsampled values (float32) held at once; channels go in blocks
# pixels x concept slots of an image up to which intersections are a one-hot matrix product
# (3x faster than a segment sum on CPU; Broden's 1,200 concepts at 224x224 fit); more take
# the segment sum
ONEHOT_BUDGET = 64 * 2**20
# a bilinear value is off the mix of its map's values by a few float32 roundings of the map's
# largest magnitude (about 1e-6 of it); a channel is skipped only when its peak is below T_k
# by more than this share of that magnitude
SKIP_MARGIN = 1e-5


def sketch_index(values):
    """Bucket (0 .. SKETCH_BUCKETS - 1, int32) of each float32 value, order-preserving."""
    import tensorflow as tf

    bits = tf.bitcast(tf.cast(values, tf.float32), tf.int32)
    top = tf.bitwise.right_shift(tf.bitwise.bitwise_and(bits, 0x7FFFFFFF), 23 - MANTISSA_BITS)
    b = tf.clip_by_value(top - _LOW + 1, 0, PER_SIGN)  # 0: below 2**-EXPONENTS
    return tf.where(bits < 0, PER_SIGN - b, PER_SIGN + b)


def _unit_buckets(flat):
    """(positions, C) values -> their bucket in one histogram of all units (unit k's
    buckets at k * SKETCH_BUCKETS)."""
    import tensorflow as tf

    return sketch_index(flat) + tf.range(tf.shape(flat)[-1])[None, :] * SKETCH_BUCKETS


_fused = {}


def sketch_counts(maps):
    """(C, SKETCH_BUCKETS) int32 counts of every position of maps (B, H, W, C)."""
    import tensorflow as tf

    if "buckets" not in _fused:  # XLA fuses the bit operations into one loop: the sketch 2x faster on CPU
        _fused["buckets"] = tf.function(_unit_buckets, jit_compile=True, autograph=False)
    c = tf.shape(maps)[-1]
    index = _fused["buckets"](tf.reshape(maps, (-1, c)))
    counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=c * SKETCH_BUCKETS,
                              maxlength=c * SKETCH_BUCKETS, dtype=tf.int32)
    return tf.reshape(counts, (c, SKETCH_BUCKETS))


def bucket_edges() -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) float64 value edges of every bucket; the outermost ones are clamped
    (their edge away from zero is where the sketch stops resolving)."""
    b = np.arange(1, PER_SIGN + 1)
    top = _LOW + b - 1
    exponent, mantissa = top >> MANTISSA_BITS, top & ((1 << MANTISSA_BITS) - 1)
    low = np.ldexp(1 + mantissa / 2**MANTISSA_BITS, exponent - 127)
    high = np.ldexp(1 + (mantissa + 1) / 2**MANTISSA_BITS, exponent - 127)
    tiny = 2.0 ** -EXPONENTS
    lower = np.concatenate([-high[::-1], [-tiny], low])
    upper = np.concatenate([-low[::-1], [tiny], high])
    return lower, upper


def thresholds(sketch: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """(T (C,) float32, rank error (C,) float32) from counts (C, SKETCH_BUCKETS): numpy's
    linear quantile at 1 - quantile (the level exceeded by `quantile` of the positions), to
    the error stated in the module docstring; NaN for a unit with no counts."""
    counts = np.asarray(sketch, np.int64)
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    rank = (1.0 - quantile) * np.maximum(total - 1, 0)  # 0-based rank of the quantile
    below = np.floor(rank).astype(np.int64)
    above = np.minimum(below + 1, np.maximum(total - 1, 0))
    low, low_bucket = _order_statistic(counts, cum, below)
    high, high_bucket = _order_statistic(counts, cum, above)
    value = low + (rank - below) * (high - low)  # numpy's interpolation between the two
    rows = np.arange(len(counts))
    uncertain = counts[rows, low_bucket] + np.where(high_bucket != low_bucket, counts[rows, high_bucket], 0)
    error = uncertain / np.maximum(total, 1)
    return (np.where(total > 0, value, np.nan).astype(np.float32),
            np.where(total > 0, error, np.nan).astype(np.float32))


def _order_statistic(counts: np.ndarray, cum: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimate of each unit's k-th smallest value (0-based) and its bucket: placed by rank
    inside its bucket, so within one bucket width of the truth; 0 in the zero bucket."""
    rows = np.arange(len(counts))
    bucket = np.minimum((cum <= k[:, None]).sum(axis=1), SKETCH_BUCKETS - 1)
    inside = counts[rows, bucket]
    before = cum[rows, bucket] - inside
    lower, upper = bucket_edges()
    share = np.clip((k - before + 0.5) / np.maximum(inside, 1), 0, 1)
    value = lower[bucket] + share * (upper[bucket] - lower[bucket])
    return np.where(bucket == PER_SIGN, 0.0, value), bucket


class Tally:
    """Device-side sums of one dissection pass over the layers of a feature model.

    Pass "sketch": per-unit histograms. Pass "tally" (given thresholds): intersections with
    every concept, unit areas, concept areas. `state()` / `load_state()` move the sums to and
    from numpy for checkpoints; shards' states add.
    """

    def __init__(self, feature_model, names: list[str], spec, n_concepts: int, limits=None,
                 downsample: int = 1):
        import tensorflow as tf

        from pipeline.preprocess import normalize
        from pipeline.scan import as_maps

        self.model, self.names, self.spec = feature_model, list(names), spec
        self.n_concepts = int(n_concepts)
        # masks (and the maps upsampled to them) at the input size / downsample
        self.mask_size = (spec.height // downsample, spec.width // downsample)
        pixels = self.mask_size[0] * self.mask_size[1]
        # channel blocks bound the upsampled maps of one image held at once (mask pixels x block)
        self.block = max(1, UPSAMPLE_BUDGET // max(1, pixels))
        self.onehot = pixels * (self.n_concepts + 1) <= ONEHOT_BUDGET
        outputs = feature_model.outputs if isinstance(feature_model.outputs, (list, tuple)) else [feature_model.outputs]
        self.channels = [int(t.shape[-1]) for t in outputs]
        self.limits = None if limits is None else [tf.constant(np.asarray(t, np.float32)) for t in limits]
        slots = self.n_concepts + 1  # the last slot: unlabelled pixels (and padding)
        self._normalize, self._as_maps = normalize, as_maps
        if self.limits is None:
            self._vars = {f"sketch_{i}": tf.Variable(tf.zeros((c, SKETCH_BUCKETS), tf.int64))
                          for i, c in enumerate(self.channels)}
        else:
            self._vars = {f"inter_{i}": tf.Variable(tf.zeros((c, slots), tf.int64)) for i, c in enumerate(self.channels)}
            self._vars.update({f"area_{i}": tf.Variable(tf.zeros((c,), tf.int64)) for i, c in enumerate(self.channels)})
            self._vars["label_area"] = tf.Variable(tf.zeros((slots,), tf.int64))
        self.images_seen = 0
        self._step = tf.function(self._update, input_signature=[
            tf.TensorSpec((None, *spec.size, spec.channels), tf.uint8),
            tf.TensorSpec((None, None, *self.mask_size), tf.int32)])

    def _update(self, pixels, labels):
        import tensorflow as tf

        outputs = self.model(self._normalize(pixels, self.spec.normalize), training=False)
        maps = [self._as_maps(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
        v = self._vars
        if self.limits is None:
            for i, m in enumerate(maps):
                v[f"sketch_{i}"].assign_add(tf.cast(sketch_counts(m), tf.int64))
            return
        slots = self.n_concepts + 1
        v["label_area"].assign_add(tf.math.bincount(tf.reshape(labels, [-1]), minlength=slots, maxlength=slots,
                                                    dtype=tf.int64))

        pixels_per_image = self.mask_size[0] * self.mask_size[1]
        # a channel whose map stays below T_k on an image passes it nowhere once upsampled (a
        # bilinear value mixes the map's; SKIP_MARGIN covers its float rounding): per image and
        # block of channels, only the others are upsampled (identical sums); one at least, as
        # the resize takes no empty image. Found for the whole batch at once (fewer ops per image)
        hits = []
        for m, limit, c in zip(maps, self.limits, self.channels):
            peak, size = tf.reduce_max(m, axis=(1, 2)), tf.reduce_max(tf.abs(m), axis=(1, 2))  # (B, C)
            hit = peak + SKIP_MARGIN * size > limit
            blocks = []
            for a in range(0, c, self.block):
                h = hit[:, a:a + self.block]
                first = tf.range(tf.shape(h)[1])[None, :] == 0
                blocks.append(tf.logical_or(h, tf.logical_and(first, ~tf.reduce_any(h, axis=1, keepdims=True))))
            hits.append(blocks)

        def one_image(j, sums):
            """Image j's intersections and areas: one image at a time keeps the upsampled maps
            in cache (2.5x faster than the whole batch at once on CPU). Its label planes
            (K, h, w) hold each concept at most once per pixel (`distinct_planes`), so a pixel
            counts once for each of its labels."""
            planes = tf.reshape(labels[j], (-1, pixels_per_image))  # (K, pixels)
            if self.onehot:
                # the (pixels, n) many-hot matrix of the n concepts present in the image (3x faster than
                # scatter_nd); the absent ones and the unlabelled slot would add only zero columns to
                # the product that is most of the pass (an image holds a few of the concepts)
                found = tf.math.bincount(planes, minlength=slots, maxlength=slots)[:-1] > 0
                # an image without labels keeps the unlabelled slot (dropped later): no empty product
                found = tf.concat([found, [tf.logical_not(tf.reduce_any(found))]], axis=0)
                present = tf.cast(tf.where(found)[:, 0], tf.int32)
                hot = tf.reduce_sum(tf.cast(planes[:, :, None] == present[None, None, :], tf.float32), axis=0)
            else:
                planes = tf.reshape(planes, [-1])  # K * pixels, plane after plane
                pixel = tf.tile(tf.range(pixels_per_image), [tf.shape(labels)[1]])
            rows = tf.shape(hot)[1] if self.onehot else slots
            out = []
            for m, limit, c, (inter, area), blocks in zip(maps, self.limits, self.channels, sums, hits):
                got, got_area = tf.zeros((c, rows)), tf.zeros((c,))
                for a, hit in zip(range(0, c, self.block), blocks):
                    keep = tf.where(hit[j])[:, 0] + a
                    up = tf.image.resize(tf.gather(m[j], keep, axis=-1)[None], self.mask_size, method="bilinear")
                    flat = tf.reshape(tf.cast(up > tf.gather(limit, keep), tf.float32), (pixels_per_image, -1))
                    # counts: exact in float32 below 2**24 pixels
                    part = (tf.matmul(hot, flat, transpose_a=True) if self.onehot
                            else tf.math.unsorted_segment_sum(tf.gather(flat, pixel), planes, slots))
                    channel = keep[:, None]
                    got = tf.tensor_scatter_nd_add(got, channel, tf.transpose(part))
                    got_area = tf.tensor_scatter_nd_add(got_area, channel, tf.reduce_sum(flat, axis=0))
                if self.onehot:  # back to every concept's column
                    got = tf.transpose(tf.scatter_nd(present[:, None], tf.transpose(got), (slots, c)))
                out.append((inter + tf.cast(got, tf.int64), area + tf.cast(got_area, tf.int64)))
            return j + 1, out

        start = [(tf.zeros((c, slots), tf.int64), tf.zeros((c,), tf.int64)) for c in self.channels]
        _, sums = tf.while_loop(lambda j, _: j < tf.shape(labels)[0], one_image, (tf.constant(0), start))
        for i, (inter, area) in enumerate(sums):
            v[f"inter_{i}"].assign_add(inter)
            v[f"area_{i}"].assign_add(area)

    def update(self, pixels, labels: np.ndarray | None = None) -> None:
        """Add a batch: pixels (n, H, W, channels) uint8, labels (n, K, h, w) int32 (the
        sketch pass needs none)."""
        import tensorflow as tf

        if labels is None:
            labels = np.zeros((len(pixels), 0, *self.mask_size), np.int32)
        self._step(tf.convert_to_tensor(pixels, tf.uint8), tf.constant(labels, tf.int32))
        self.images_seen += len(labels)

    def state(self) -> dict[str, np.ndarray]:
        return {name: var.numpy() for name, var in self._vars.items()}

    def load_state(self, state: dict[str, np.ndarray], images_seen: int) -> None:
        for name, var in self._vars.items():
            var.assign(state[name])
        self.images_seen = images_seen


def iou_table(inter: np.ndarray, unit_area: np.ndarray, label_area: np.ndarray) -> np.ndarray:
    """IoU (C, L) float32 from summed intersections (C, L), unit areas (C,), concept areas (L,);
    0 where the union is empty."""
    union = unit_area[:, None].astype(np.float64) + label_area[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)


def best_labels(iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column of each unit's best concept (C,) int64, -1 where every IoU is 0; its IoU (C,))."""
    if iou.shape[1] == 0:
        return np.full(len(iou), -1, np.int64), np.zeros(len(iou), np.float32)
    best = iou.argmax(axis=1)
    value = iou[np.arange(len(iou)), best]
    return np.where(value > 0, best, -1).astype(np.int64), value.astype(np.float32)


def mask_step(setting, height: int, width: int) -> int:
    """The mask resolution's step: dissect.downsample, or where it is null 2 when 2 divides
    both sides of the model input (NetDissect-Lite's 112x112 masks for 224 inputs), else 1."""
    if setting is None:
        return 1 if height % 2 or width % 2 else 2
    step = int(setting)
    if height % step or width % step:
        raise PipelineError(f"dissect.downsample={step} does not divide the {height}x{width} model input: "
                            f"use a divisor of both sides (1 keeps the input's resolution)")
    return step
