"""The scan: stream every image through the model once, keep per-channel top-k
(and optionally bottom-k) tables, statistics and activation spectra for the
chosen layers, all updated on the device."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline.preprocess import Preprocessing, normalize
from pipeline.selectivity import STATISTICS
from pipeline.spectrum import BUCKETS, sketch_counts
from pipeline.topk import ChannelStats, TopK, locate_columns, merge_candidates, row_maxima


def as_maps(output: tf.Tensor) -> tf.Tensor:
    """Layer output as (B, H, W, C) float32 (float16 and float64 models too: the tables are
    float32); a (B, C) vector becomes a 1x1 map."""
    if output.dtype != tf.float32:
        output = tf.cast(output, tf.float32)
    if output.shape.rank == 2:
        return output[:, None, None, :]
    if output.shape.rank != 4:
        raise ValueError(f"cannot scan a layer output of rank {output.shape.rank}")
    return output


def interior_mask(h: int, w: int, border: int) -> tf.Tensor | None:
    """(1, H, W, 1) bool, False on the `border` outermost rows and columns of an H x W map;
    None where there is nothing to leave out (border 0, or a map too small to have an inside)."""
    if border <= 0 or h <= 2 * border or w <= 2 * border:
        return None
    inside = np.zeros((1, h, w, 1), bool)
    inside[:, border:h - border, border:w - border] = True
    return tf.constant(inside)


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


# Device state: name -> (dtype, shape given (C, K), initial value); C is the channel count
# of every layer together (one table, one merge and one sketch per batch for all layers:
# the per-op cost, not the arithmetic, is what a scan of small maps pays)
_STATE = {
    "value": (tf.float32, lambda c, k: (c, k), -np.inf),
    "image": (tf.int64, lambda c, k: (c, k), -1),
    "pos": (tf.int32, lambda c, k: (c, k), -1),
    "total": (tf.float64, lambda c, k: (c,), 0),
    "zeros": (tf.float64, lambda c, k: (c,), 0),
    "maximum": (tf.float32, lambda c, k: (c,), -np.inf),
    "spectrum": (tf.int32, lambda c, k: (c, BUCKETS), 0),
}
_BOTTOM = {f"bottom_{n}": _STATE[n] for n in ("value", "image", "pos")}


class Scanner:
    """Holds the device-side state for a list of layers of a feature model.

    `state()` / `load_state()` move the whole state to and from numpy arrays, one
    dict per layer, which is what checkpoints and resumes use.
    """

    def __init__(self, feature_model, names: list[str], spec: Preprocessing, k: int, bottomk: int = 0,
                 border: int = 0, labels: np.ndarray | None = None, classes: int = 0,
                 exemplar_classes: np.ndarray | None = None, exemplar_k: int = 0, sketch: bool = False):
        self.model = feature_model
        self.names = list(names)
        self.spec = spec
        self.k = k
        self.bottomk = bottomk
        outputs = feature_model.outputs if isinstance(feature_model.outputs, (list, tuple)) else [feature_model.outputs]
        self.map_shapes = [tuple(int(d) for d in as_maps(tf.zeros((1,) + tuple(t.shape[1:]))).shape[1:])
                           for t in outputs]
        self.bounds = [int(b) for b in np.cumsum([0] + [c for _, _, c in self.map_shapes])]  # layer i: bounds[i]:bounds[i+1]
        self.interiors = [interior_mask(h, w, border) for h, w, _ in self.map_shapes]
        self._fields = dict(_STATE, **(_BOTTOM if bottomk else {}))
        # class-conditional sums of each image's spatial max and mean (pipeline.selectivity)
        self.classes = int(classes) if labels is not None else 0
        self.labels = None if labels is None else np.asarray(labels, np.int32)
        if self.classes:
            self._fields.update({f"class_{s}": (tf.float64, lambda c, k: (c, self.classes), 0) for s in STATISTICS})
        # per-class exemplars: a top-k table per (channel, class) of `exemplar_classes`, held
        # as (C, S * K), class-major along the second axis
        self.exemplar_classes = None
        if labels is not None and exemplar_classes is not None and len(exemplar_classes) and exemplar_k > 0:
            self.exemplar_classes = np.asarray(exemplar_classes, np.int32)
            self.exemplar_k = int(exemplar_k)
            width = len(self.exemplar_classes) * self.exemplar_k
            self._fields.update({f"ex_{n}": (_STATE[n][0], lambda c, k: (c, width), _STATE[n][2])
                                 for n in ("value", "image", "pos")})
        if sketch:  # every activation's histogram: the dissect stage's thresholds without a pass of its own
            from pipeline.dissect import SKETCH_BUCKETS

            self._fields["sketch"] = (tf.int64, lambda c, k: (c, SKETCH_BUCKETS), 0)
        self._vars = {name: tf.Variable(value) for name, value in self._initial().items()}
        self.images_seen = 0
        self.images_resumed = 0  # of images_seen, those a checkpoint brought (scanned by an earlier process)
        # one trace for every batch size (the last batch too), and no per-call retracing check
        self._step = tf.function(self._update, input_signature=[
            tf.TensorSpec((None, *spec.size, spec.channels), tf.uint8), tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,), tf.int32)])

    def _initial(self) -> dict[str, tf.Tensor]:
        c = int(self.bounds[-1])
        return {name: tf.fill(shape(c, self.bottomk if name.startswith("bottom_") else self.k), tf.constant(init, dtype))
                for name, (dtype, shape, init) in self._fields.items()}

    def reset(self) -> None:
        """Back to the empty state (keeps the traced update function)."""
        for name, value in self._initial().items():
            self._vars[name].assign(value)
        self.images_seen = self.images_resumed = 0

    def _update(self, pixels, ids, labels):
        outputs = self.model(normalize(pixels, self.spec.normalize), training=False)
        maps = [as_maps(out) for out in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
        # scan.border: the top-k and bottom-k rank only the positions inside the border ring
        ranked = [m if inside is None else tf.where(inside, m, tf.constant(-np.inf, m.dtype))
                  for m, inside in zip(maps, self.interiors)]
        firsts = [row_maxima(m) for m in ranked]
        batch_max = tf.concat([m for m, _ in firsts], axis=1)  # (B, C) over every layer
        batch_y = tf.concat([y for _, y in firsts], axis=1)
        v = self._vars
        tables = [("value", "image", "pos", batch_max)]
        if "bottom_value" in v:  # the weakest maxima: rank negated values
            tables.append(("bottom_value", "bottom_image", "bottom_pos", -batch_max))
        for value_key, image_key, pos_key, candidates in tables:
            value, image, pos, row = merge_candidates(v[value_key], v[image_key], v[pos_key], candidates, ids,
                                                      batch_y)
            v[value_key].assign(value)
            v[image_key].assign(image)
            v[pos_key].assign(tf.concat([locate_columns(m, pos[a:b], row[a:b], batch_max[:, a:b])
                                         for m, a, b in zip(ranked, self.bounds[:-1], self.bounds[1:])], axis=0))
        if self.exemplar_classes is not None:
            self._merge_exemplars(ranked, batch_max, batch_y, ids, labels)
        if "sketch" in v:  # every position (scan.border leaves none out), as the dissect stage's own pass
            from pipeline.dissect import sketch_counts as activation_counts

            v["sketch"].assign_add(tf.concat([tf.cast(activation_counts(m), tf.int64) for m in maps], axis=0))
        if any(inside is not None for inside in self.interiors):  # the statistics see every position
            batch_max = tf.concat([tf.reduce_max(m, axis=(1, 2)) for m in maps], axis=1)
        sums = [channel_sums(m) for m in maps]
        total = tf.concat([t for t, _ in sums], axis=0)
        zeros = tf.concat([tf.cast(tf.size(m) // tf.shape(m)[-1], tf.float64) - tf.cast(nz, tf.float64)
                           for m, (_, nz) in zip(maps, sums)], axis=0)
        v["total"].assign_add(tf.cast(total, tf.float64))
        v["zeros"].assign_add(zeros)
        v["maximum"].assign(tf.maximum(v["maximum"], tf.reduce_max(batch_max, axis=0)))
        v["spectrum"].assign_add(sketch_counts(batch_max))
        if self.classes:  # (C, B) @ (B, L): an image without a label has an all-zero one-hot row
            onehot = tf.one_hot(labels, self.classes, dtype=batch_max.dtype)
            per_image = {"max": batch_max, "mean": tf.concat([tf.reduce_mean(m, axis=(1, 2)) for m in maps], axis=1)}
            for s in STATISTICS:
                v[f"class_{s}"].assign_add(tf.cast(tf.matmul(per_image[s], onehot, transpose_a=True), tf.float64))

    def _merge_exemplars(self, maps, batch_max, batch_y, ids, labels) -> None:
        """Each image competes only in the tables of its own class: elsewhere its candidate is
        -inf (an empty slot it fills stays marked by that value; see exemplar_results)."""
        v = self._vars
        c, s, k = int(self.bounds[-1]), len(self.exemplar_classes), self.exemplar_k
        mine = tf.equal(labels[:, None], tf.constant(self.exemplar_classes)[None, :])  # (B, S)
        cand = tf.where(mine[:, :, None], batch_max[:, None, :], tf.constant(-np.inf, batch_max.dtype))
        cand = tf.reshape(cand, (-1, s * c))  # class-major, as the tables below
        flat = lambda t: tf.reshape(tf.transpose(tf.reshape(t, (c, s, k)), (1, 0, 2)), (s * c, k))  # noqa: E731
        value, image, pos, row = merge_candidates(flat(v["ex_value"]), flat(v["ex_image"]), flat(v["ex_pos"]), cand,
                                                  ids, tf.tile(batch_y, [1, s]))
        pos = tf.concat([locate_columns(m, pos[j * c + a:j * c + b], row[j * c + a:j * c + b], batch_max[:, a:b])
                         for j in range(s) for m, a, b in zip(maps, self.bounds[:-1], self.bounds[1:])], axis=0)
        back = lambda t: tf.reshape(tf.transpose(tf.reshape(t, (s, c, k)), (1, 0, 2)), (c, s * k))  # noqa: E731
        v["ex_value"].assign(back(value))
        v["ex_image"].assign(back(image))
        v["ex_pos"].assign(back(pos))

    def update(self, pixels, ids: np.ndarray) -> None:
        labels = self.labels[ids] if self.labels is not None else np.full(len(ids), -1, np.int32)
        self._step(tf.convert_to_tensor(pixels, tf.uint8), tf.constant(ids, tf.int64), tf.constant(labels, tf.int32))
        self.images_seen += len(ids)

    def state(self) -> list[dict[str, np.ndarray]]:
        whole = {name: var.numpy() for name, var in self._vars.items()}
        return [{name: array[a:b] for name, array in whole.items()}
                for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def load_state(self, state: list[dict[str, np.ndarray]], images_seen: int) -> None:
        for name, var in self._vars.items():
            var.assign(np.concatenate([layer[name] for layer in state], axis=0))
        self.images_seen = self.images_resumed = images_seen

    def results(self, state: list[dict[str, np.ndarray]] | None = None) -> list[tuple[TopK, ChannelStats]]:
        """Top-k tables and statistics per layer (from `state` when already read)."""
        return [(_table(v["value"], v["image"], v["pos"], w), _stats(v, self.images_seen * h * w))
                for (h, w, c), v in zip(self.map_shapes, state or self.state())]

    def bottom_results(self, state: list[dict[str, np.ndarray]] | None = None) -> list[TopK]:
        """Bottom-k tables: the images whose maximum is smallest, ascending."""
        return [_table(-v["bottom_value"], v["bottom_image"], v["bottom_pos"], w)
                for (h, w, c), v in zip(self.map_shapes, state or self.state())]


    def exemplar_results(self, state: list[dict[str, np.ndarray]] | None = None) -> list[TopK]:
        """Per layer, the (C, S * K) table of each channel's top-K images of each exemplar
        class (class-major: slots s*K .. s*K+K-1 are class s); slots no image of the class
        filled are empty (image -1)."""
        out = []
        for (h, w, c), v in zip(self.map_shapes, state or self.state()):
            image = np.where(np.isfinite(v["ex_value"]), v["ex_image"], -1)
            out.append(_table(v["ex_value"], image, v["ex_pos"], w))
        return out


def _table(value: np.ndarray, image: np.ndarray, pos: np.ndarray, w: int) -> TopK:
    empty = image < 0
    return TopK(value.astype(np.float32), image, np.where(empty, -1, pos // w).astype(np.int32),
                np.where(empty, -1, pos % w).astype(np.int32))


def _stats(v: dict[str, np.ndarray], positions: int) -> ChannelStats:
    return ChannelStats(v["total"], v["zeros"], v["maximum"], positions)
