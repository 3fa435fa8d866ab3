"""Per-image explanations: feature maps, the Grad-CAM family, occlusion sensitivity.

A Python API, usable from a notebook: a Keras model, a batch of images and the
classes to explain go in, raw maps come out as numpy arrays. The `activations`,
`cam` and `occlusion` stages are thin wrappers over it.

Images are either model inputs (float, already normalised, (B, S, S, C)) or uint8
pixels with the model's `Preprocessing` (any size: they are resized and cropped the
way the pipeline does it, then normalised).

Targets (which class to explain, per image):

* ``None`` or ``"predicted"``: the highest-scoring class of each image;
* ``"top<n>"`` (e.g. ``"top3"``): the n highest-scoring classes, one map each;
* an int: that class for every image;
* an int array (B,) or (B, K): per-image classes; a negative entry -r means the
  r-th highest-scoring class of that image (-1: the predicted class), so a label
  array with -1 for "unknown" falls back to the prediction.

Results keep a target axis K only when the targets have one ("top<n>", (B, K)).

Rules every method here follows (see DESIGN.md, "Grad-CAM family"):

* the score is the class logit, never a softmax probability: when the model ends in a
  softmax (a Softmax/Activation layer, or a Dense layer with a softmax or sigmoid
  activation) the pre-activation value is used, computed as x @ W + b from the
  Dense layer's input where needed;
* gradients are averaged over height and width per image, never over the batch;
* ReLU is applied once, to the weighted channel sum; the raw map is returned, an
  all-zero map stays zero (no normalisation here; `pipeline.render.draw` does that);
* the target layer defaults to the last rank-4 output with height and width > 1;
* models nested inside models work: conv maps and logits come from one graph in
  which every layer on the way is called again (`connected_model`), so the logits
  are computed from the very maps the gradient is taken of;
* a batch gives the same maps as its images one by one (BatchNorm and Dropout run
  in inference mode).

Example::

    from pipeline.explain import CamExplainer, grad_cam
    maps = grad_cam(model, pixels, preprocessing=spec).maps      # (B, h, w)
    cams = CamExplainer(model).compute(x, "top3", methods=("gradcam", "scorecam"))
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.graph import (ancestors, choose_output, feature_model, flat_layers, logits_head, replay,
                            resolve_layer_names)
from pipeline.preprocess import Preprocessing, normalize, to_model_pixels

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++", "scorecam", "guided_gradcam")
# methods whose maps are at the input resolution, (S, S, C): thousands of times the values of a
# map at the target layer, and a backward pass to the input each
INPUT_RESOLUTION = ("guided_gradcam",)


# ----------------------------------------------------------------------------
# results


@dataclass
class CamResult:
    """Raw maps of one method.

    maps: (B, [K,] h, w) float32 at the target layer's resolution, ReLU applied once;
    for guided Grad-CAM (B, [K,] S, S, C) at the input resolution.
    classes: (B, [K]) int64 explained class; scores: (B, [K]) float32 its logit on the
    unmodified image.
    """

    method: str
    layer: str
    maps: np.ndarray
    classes: np.ndarray
    scores: np.ndarray

    @property
    def maxima(self) -> np.ndarray:
        """Per-map maximum (0 for an all-zero map), shape of `classes`."""
        axes = tuple(range(self.classes.ndim, self.maps.ndim))
        return self.maps.max(axis=axes) if self.maps.size else np.zeros(self.classes.shape, np.float32)


@dataclass
class OcclusionResult:
    """Zeiler & Fergus occlusion maps: one value per position of the grey square.

    The square's top-left corner at grid cell (i, j) is (rows[i], cols[j]) in model-input
    pixels; it covers `size` pixels a side.
    """

    probability: np.ndarray  # (B, gh, gw) float32: softmax probability of the target class
    top_class: np.ndarray  # (B, gh, gw) int64: the most probable class with the square there
    activation: np.ndarray  # (B, gh, gw) float32: total activation of the strongest channel
    classes: np.ndarray  # (B,) int64 target class
    base_probability: np.ndarray  # (B,) float32: probability without the square
    base_activation: np.ndarray  # (B,) float32: the channel's total activation without the square
    channel: np.ndarray  # (B,) int64: the strongest channel of `layer` on the unoccluded image
    rows: np.ndarray  # (gh,) int64
    cols: np.ndarray  # (gw,) int64
    size: int
    stride: int
    layer: str


# ----------------------------------------------------------------------------
# inputs, layers, logits


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities of logits along `axis` (shifted by the maximum: no overflow)."""
    shifted = np.exp(logits - np.max(logits, axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def model_inputs(images, preprocessing: Preprocessing | None = None) -> tf.Tensor:
    """A float32 (B, S, S, C) batch of model inputs.

    `images`: float model inputs (B, S, S, C) or (S, S, C); or uint8 pixels, an array or
    a list of arrays of any size, with `preprocessing` (resized, cropped, normalised as
    the pipeline does it).
    """
    if isinstance(images, (list, tuple)):
        items = [np.asarray(i) if not tf.is_tensor(i) else i for i in images]
        if not items:
            raise PipelineError("no images given: pass at least one image")
        if items[0].dtype == np.uint8 and preprocessing is not None:
            return normalize(tf.stack([_model_pixels(tf.convert_to_tensor(i), preprocessing)
                                       for i in items]), preprocessing.normalize)
        images = tf.stack([tf.convert_to_tensor(i) for i in items])
    x = images if tf.is_tensor(images) else tf.convert_to_tensor(np.asarray(images))
    if x.shape.rank == 3 or (x.shape.rank == 2 and x.dtype == tf.uint8):
        x = x[None]
    if x.dtype == tf.uint8:
        if preprocessing is None:
            raise PipelineError("uint8 pixels need the model's preprocessing: pass preprocessing=<Preprocessing>, "
                                "or pass normalised float32 inputs")
        if x.shape.rank != 4 or tuple(x.shape[1:]) != (*preprocessing.size, preprocessing.channels):
            x = tf.stack([_model_pixels(img, preprocessing) for img in tf.unstack(x)])
        return normalize(x, preprocessing.normalize)
    if x.shape.rank != 4:
        raise PipelineError(f"images of shape {tuple(x.shape)}: pass a (B, S, S, C) batch or one (S, S, C) image")
    return tf.cast(x, tf.float32)


def _model_pixels(image: tf.Tensor, spec: Preprocessing) -> tf.Tensor:
    if image.shape.rank == 2:
        image = image[..., None]
    return to_model_pixels(image, spec)


def default_target_layer(model) -> str:
    """The last layer output of rank 4 (batch, H, W, C) with H and W > 1."""
    spatial = [n for n in flat_layers(model) if n.kind != "input" and len(n.output_shape) == 3
               and (n.output_shape[0] is None or n.output_shape[0] > 1)
               and (n.output_shape[1] is None or n.output_shape[1] > 1)]
    if not spatial:
        raise PipelineError(f"model {model.name!r} has no spatial (H, W > 1) layer output for a class "
                            "activation map: pass cam.layer=<a convolutional layer>")
    return spatial[-1].name


def connected_model(model, names: Sequence[str], name: str | None = None) -> keras.Model:
    """A model from the inputs to the named layer outputs in which every layer call on the
    way is made again, so a later output is computed from the earlier outputs themselves.

    `pipeline.graph.feature_model` reuses the outer graph's tensors, so when a map inside a
    nested model is asked for together with the logits, the logits still come from the
    original nested call and carry no gradient to that map. Here nothing is reused: the
    same layer objects (and weights) are called on fresh tensors, in topological order.
    """
    nodes = flat_layers(model)
    qualified = resolve_layer_names(model, list(names))
    by_name = {n.name: n for n in nodes}
    needed = ancestors(by_name, qualified)
    values = {(n.name, 0): n.tensors[0] for n in nodes if n.kind == "input" and n.name in needed}
    values = replay([n for n in nodes if n.name in needed and n.kind != "input"], values)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.input
    return keras.Model(inputs=inputs, outputs=[values[(q, 0)] for q in qualified],
                       name=name or f"{model.name}_connected")


def encode_targets(targets, batch: int, num_classes: int | None = None) -> tuple[np.ndarray, bool]:
    """Targets -> (codes (B, K) int32, keep_k). Codes >= 0 are classes, -r the r-th best class."""
    keep_k = False
    if targets is None:
        codes = np.full((batch, 1), -1, np.int64)
    elif isinstance(targets, str):
        match = re.fullmatch(r"top(\d+)", targets)
        if targets == "predicted":
            codes = np.full((batch, 1), -1, np.int64)
        elif match and int(match.group(1)) >= 1:
            n = int(match.group(1))
            codes = np.tile(-np.arange(1, n + 1, dtype=np.int64), (batch, 1))
            keep_k = True
        else:
            raise PipelineError(f"targets={targets!r}: use 'predicted', 'top<n>', a class index or an array")
    else:
        codes = np.asarray(targets)
        if codes.dtype.kind not in "iu":
            raise PipelineError(f"targets of dtype {codes.dtype}: pass integer class indices")
        if codes.ndim == 0:
            codes = np.full((batch, 1), int(codes), np.int64)
        elif codes.ndim == 1:
            codes = codes.reshape(-1, 1)
        else:
            keep_k = True
        if codes.ndim != 2 or codes.shape[0] != batch:
            raise PipelineError(f"targets of shape {np.shape(targets)} for {batch} images: "
                                "pass one class per image (B,) or several (B, K)")
    if num_classes is not None and codes.size and (codes.max() >= num_classes or codes.min() < -num_classes):
        raise PipelineError(f"target class {int(codes.max())} is out of range: the model has {num_classes} classes")
    return codes.astype(np.int32), keep_k


def _resolve_codes(codes: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Codes (B, K) -> classes (B, K): negative -r is the r-th highest logit."""
    depth = tf.minimum(tf.maximum(-tf.reduce_min(codes), 1), tf.shape(logits)[-1])
    ranked = tf.math.top_k(logits, k=depth, sorted=True).indices  # ties: lower index first
    rank = tf.clip_by_value(-codes - 1, 0, depth - 1)
    return tf.where(codes >= 0, codes, tf.gather(ranked, rank, batch_dims=1))


def any_batch(fn, traced: set, tensors: tuple, static: tuple = ()):
    """fn(*tensors, *static) for a tf.function `fn` traced once with every leading (batch)
    axis None (`traced` records it): a dataset's last, shorter batch, or the last group of
    occlusion positions, reuses that trace instead of tracing the model again (seconds)."""
    specs = tuple(tf.TensorSpec((None,) + tuple(t.shape[1:]) if t.shape.rank else (), t.dtype) for t in tensors)
    key = (fn.__name__, specs, static)
    if key not in traced:
        fn.get_concrete_function(*specs, *static)
        traced.add(key)
    return fn(*tensors, *static)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ----------------------------------------------------------------------------
# the Grad-CAM family


def map_layer(model: keras.Model, layer: str | None, key: str) -> tuple[str, tuple]:
    """The qualified target layer (default: the last spatial map) and its (h, w, C) shape."""
    name = resolve_layer_names(model, [layer])[0] if layer else default_target_layer(model)
    node = next(n for n in flat_layers(model) if n.name == name)
    if len(node.output_shape) != 3:
        raise PipelineError(f"layer {name!r} outputs shape {node.output_shape}, not a (H, W, C) map: "
                            f"pick a convolutional layer for {key}")
    return name, tuple(node.output_shape)


class CamExplainer:
    """Grad-CAM, Grad-CAM++, Score-CAM and guided Grad-CAM for one model and target layer.

    Build once, call per batch: the feature model (target-layer maps and logits in one
    graph, nested models included) and the compiled functions are reused.
    """

    def __init__(self, model: keras.Model, layer: str | None = None,
                 preprocessing: Preprocessing | None = None, output=None):
        self.model = model
        self.preprocessing = preprocessing
        self.layer, self.map_shape = map_layer(model, layer, "cam.layer")  # map_shape: (h, w, C)
        self.logits_layer, self._head = logits_head(model, output)
        if self.logits_layer == self.layer:
            raise PipelineError(f"layer {self.layer!r} is the model output: pick a convolutional layer")
        # maps and logits in one connected graph: gradients reach maps inside nested models
        self._features = connected_model(model, [self.layer, self.logits_layer], name="cam_features")
        self._logits_model = feature_model(model, [self.logits_layer], name="cam_logits")
        self.num_classes = int(model.outputs[choose_output(model, output)].shape[-1])
        self._zero_logits = None
        self._traced: set = set()

    # -- building blocks -------------------------------------------------------

    def _logits(self, x):
        z = self._logits_model(x, training=False)
        return self._head(z) if self._head is not None else z

    def _forward(self, x):
        maps, z = self._features(x, training=False)
        return maps, (self._head(z) if self._head is not None else z)

    @tf.function(reduce_retracing=True)
    def _gradients(self, x, codes, k_targets: int):
        """maps (B,h,w,C), grads (B,K,h,w,C) of each target logit, classes (B,K), logits (B,N).
        `k_targets` (K, a Python int) is static so the backward passes unroll."""
        with tf.GradientTape(persistent=True) as tape:
            maps, logits = self._forward(x)
            classes = _resolve_codes(codes, logits)
            onehot = tf.one_hot(classes, tf.shape(logits)[-1], dtype=logits.dtype)  # (B, K, N)
            scores = tf.einsum("bn,bkn->bk", logits, onehot)
            # sum over the batch: image b's logit depends on image b's maps only
            totals = [tf.reduce_sum(scores[:, k]) for k in range(k_targets)]
        grads = [tape.gradient(t, maps) for t in totals]
        del tape
        grads = [tf.zeros_like(maps) if g is None else g for g in grads]
        return maps, tf.stack(grads, axis=1), classes, logits

    @tf.function(reduce_retracing=True)
    def _forward_classes(self, x, codes):
        maps, logits = self._forward(x)
        return maps, _resolve_codes(codes, logits), logits

    @staticmethod
    @tf.function(reduce_retracing=True)
    def _gradcam_maps(maps, grads):
        weights = tf.reduce_mean(grads, axis=(2, 3))  # (B, K, C): per image, over H and W
        return tf.nn.relu(tf.einsum("bhwc,bkc->bkhw", maps, weights))

    @staticmethod
    @tf.function(reduce_retracing=True)
    def _gradcam_pp_maps(maps, grads):
        # Chattopadhay et al. 2018, closed form for an exponential of the score
        g2 = tf.square(grads)
        g3 = g2 * grads
        total = tf.reduce_sum(maps, axis=(1, 2))[:, None, None, None, :]  # (B, 1, 1, 1, C)
        denom = 2.0 * g2 + total * g3
        alpha = tf.where(denom != 0.0, g2 / tf.where(denom != 0.0, denom, 1.0), 0.0)
        weights = tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(2, 3))  # (B, K, C)
        return tf.nn.relu(tf.einsum("bhwc,bkc->bkhw", maps, weights))

    @tf.function(reduce_retracing=True)
    def _masked_scores(self, x, maps_bchw, pairs, classes):
        """Target logits (m, K) of x[b] * normalised upsampled map (b, c), for m (b, c) pairs."""
        size = tf.shape(x)[1:3]
        chosen = tf.gather_nd(maps_bchw, pairs)  # (m, h, w)
        up = tf.image.resize(chosen[..., None], size, method="bilinear")  # (m, S, S, 1)
        low = tf.reduce_min(up, axis=(1, 2, 3), keepdims=True)
        span = tf.reduce_max(up, axis=(1, 2, 3), keepdims=True) - low
        mask = tf.where(span > 0, (up - low) / tf.where(span > 0, span, 1.0), 0.0)
        logits = self._logits(tf.gather(x, pairs[:, 0]) * mask)
        return tf.gather(logits, tf.gather(classes, pairs[:, 0]), batch_dims=1)

    def _scorecam_weights(self, x, maps, classes, mask_batch: int, channels: int | None = None) -> tf.Tensor:
        """Softmax over channels of the target logit of each masked image: (B, K, C).

        channels=N: only each image's N channels of highest spatial variance are masked
        and weighted (Faster Score-CAM); the others get weight 0."""
        c = maps.shape[-1]
        if self._zero_logits is None:  # a constant map gives an all-zero mask: the zero image
            self._zero_logits = self._logits(tf.zeros((1,) + tuple(x.shape[1:]))).numpy()[0]
        scores = np.repeat(self._zero_logits[classes.numpy()][:, :, None], c, axis=2).astype(np.float32)
        maps_np = maps.numpy()
        active = maps_np.max(axis=(1, 2)) > maps_np.min(axis=(1, 2))  # (B, C)
        kept = np.ones_like(active)
        if channels is not None and channels < c:
            variance = maps_np.var(axis=(1, 2))  # (B, C)
            top = np.argsort(-variance, axis=1, kind="stable")[:, :channels]
            kept = np.zeros_like(active)
            np.put_along_axis(kept, top, True, axis=1)
            active &= kept
        pairs = np.argwhere(active).astype(np.int32)  # (P, 2) image, channel
        maps_bchw = tf.transpose(maps, (0, 3, 1, 2))
        for part in _batches(len(pairs), mask_batch):
            chunk = pairs[part]
            m = len(chunk)
            if m < mask_batch and len(pairs) > mask_batch:  # one shape for every call: no retracing
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], mask_batch - m, axis=0)])
            values = self._masked_scores(x, maps_bchw, tf.constant(chunk), classes).numpy()[:m]
            scores[chunk[:m, 0], :, chunk[:m, 1]] = values
        scores = np.where(kept[:, None, :], scores, -np.inf)  # left-out channels: weight 0
        return tf.nn.softmax(tf.constant(scores), axis=-1)

    def _guided(self, x, classes) -> tf.Tensor:
        """Guided backprop of each target logit to the input: (B, K, S, S, C)."""
        from pipeline.backprop import backprop

        z = self._logits_model(x, training=False) if self._head is not None else None
        out = []
        for k in range(classes.shape[1]):
            onehot = tf.one_hot(classes[:, k], self.num_classes, dtype=tf.float32)
            if self._head is None:
                seed = onehot
            else:  # d logit / d z through the head (x @ W + b: a column of W)
                with tf.GradientTape() as tape:
                    tape.watch(z)
                    score = tf.reduce_sum(self._head(z) * onehot)
                seed = tape.gradient(score, z)
            out.append(tf.convert_to_tensor(backprop(self.model, x, self.logits_layer, seed, "guided")))
        return tf.stack(out, axis=1)

    # -- public ------------------------------------------------------------------

    def logits(self, images, batch_size: int = 32) -> np.ndarray:
        """Class logits (B, N) of the images."""
        x = model_inputs(images, self.preprocessing)
        return np.concatenate([self._logits(x[s]).numpy() for s in _batches(len(x), batch_size)])

    def compute(self, images, targets=None, methods: Iterable[str] = ("gradcam",), batch_size: int = 32,
                scorecam_batch: int = 256, progress: bool = False,
                scorecam_channels: int | None = None) -> dict[str, CamResult]:
        """Maps of several methods for the same images and targets, sharing each forward pass.

        `scorecam_batch` bounds Score-CAM's memory: masked images per forward pass.
        `scorecam_channels`: None for exact Score-CAM; N masks only each image's N channels
        of highest variance (Faster Score-CAM), about C / N times fewer forward passes.
        """
        return self.compute_with_logits(images, targets, methods, batch_size, scorecam_batch, progress,
                                        scorecam_channels)[0]

    def compute_with_logits(self, images, targets=None, methods: Iterable[str] = ("gradcam",), batch_size: int = 32,
                            scorecam_batch: int = 256, progress: bool = False,
                            scorecam_channels: int | None = None) -> tuple[dict[str, CamResult], np.ndarray]:
        """`compute`, and the class logits (B, N) of the same forward passes (no pass of its own)."""
        methods = tuple(methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise PipelineError(f"unknown CAM method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
        x = model_inputs(images, self.preprocessing)
        codes, keep_k = encode_targets(targets, len(x), self.num_classes)
        parts: dict[str, list] = {m: [] for m in methods}
        classes_parts, score_parts, logit_parts = [], [], []
        bar = tqdm(total=len(x), desc="cam", unit="img", disable=not progress)
        for s in _batches(len(x), batch_size):
            batch = self._compute_batch(x[s], tf.constant(codes[s]), methods, scorecam_batch, scorecam_channels)
            classes, scores = batch.pop("_classes"), batch.pop("_scores")
            classes_parts.append(classes)
            score_parts.append(scores)
            logit_parts.append(batch.pop("_logits"))
            for m, maps in batch.items():
                parts[m].append(maps)
            bar.update(s.stop - s.start)
        bar.close()
        classes = np.concatenate(classes_parts).astype(np.int64)
        scores = np.concatenate(score_parts).astype(np.float32)
        out = {}
        for m in methods:
            maps = np.concatenate(parts[m]).astype(np.float32)
            if keep_k:
                out[m] = CamResult(m, self.layer, maps, classes, scores)
            else:
                out[m] = CamResult(m, self.layer, maps[:, 0], classes[:, 0], scores[:, 0])
        return out, np.concatenate(logit_parts).astype(np.float32)

    def _compute_batch(self, x, codes, methods, scorecam_batch: int,
                       scorecam_channels: int | None = None) -> dict[str, np.ndarray]:
        needs_grads = any(m in ("gradcam", "gradcam++", "guided_gradcam") for m in methods)
        if needs_grads:
            maps, grads, classes, logits = any_batch(self._gradients, self._traced, (x, codes), (int(codes.shape[1]),))
        else:
            maps, classes, logits = any_batch(self._forward_classes, self._traced, (x, codes))
        out = {"_classes": classes.numpy(), "_scores": tf.gather(logits, classes, batch_dims=1).numpy(),
               "_logits": logits.numpy()}
        gradcam = None
        if "gradcam" in methods or "guided_gradcam" in methods:
            gradcam = self._gradcam_maps(maps, grads)
            if "gradcam" in methods:
                out["gradcam"] = gradcam.numpy()
        if "gradcam++" in methods:
            out["gradcam++"] = self._gradcam_pp_maps(maps, grads).numpy()
        if "scorecam" in methods:
            weights = self._scorecam_weights(x, maps, classes, max(int(scorecam_batch), 1), scorecam_channels)
            out["scorecam"] = tf.nn.relu(tf.einsum("bhwc,bkc->bkhw", maps, weights)).numpy()
        if "guided_gradcam" in methods:
            out["guided_gradcam"] = self.guided_gradcam(x, classes, gradcam)
        return out

    def guided_gradcam(self, x, classes, gradcam) -> np.ndarray:
        """Guided Grad-CAM (B, K, S, S, C) of model inputs x (B, S, S, C) from their Grad-CAM
        maps (B, K, h, w) for the classes (B, K): the map upsampled bilinearly to the input,
        times guided backpropagation of the same logit. Maps already computed are reused:
        no forward pass of the feature model here."""
        x = tf.convert_to_tensor(x, tf.float32)
        classes = tf.convert_to_tensor(classes, tf.int32)
        gradcam = tf.convert_to_tensor(gradcam, tf.float32)
        b, k, h, w = gradcam.shape
        size = tf.shape(x)[1:3]
        up = tf.image.resize(tf.reshape(gradcam, (b * k, h, w, 1)), size, method="bilinear")
        up = tf.reshape(up, (b, k, size[0], size[1], 1))
        return (up * self._guided(x, classes)).numpy()


def _one(method: str, model, images, targets, layer, preprocessing, batch_size, **kw) -> CamResult:
    return CamExplainer(model, layer, preprocessing).compute(images, targets, (method,), batch_size, **kw)[method]


def grad_cam(model, images, targets=None, layer: str | None = None, preprocessing: Preprocessing | None = None,
             batch_size: int = 32) -> CamResult:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_c mean_hw(d logit / d A_c) * A_c)."""
    return _one("gradcam", model, images, targets, layer, preprocessing, batch_size)


def grad_cam_pp(model, images, targets=None, layer: str | None = None, preprocessing: Preprocessing | None = None,
                batch_size: int = 32) -> CamResult:
    """Grad-CAM++ (Chattopadhay et al. 2018): positive gradients weighted per position."""
    return _one("gradcam++", model, images, targets, layer, preprocessing, batch_size)


def score_cam(model, images, targets=None, layer: str | None = None, preprocessing: Preprocessing | None = None,
              batch_size: int = 32, scorecam_batch: int = 256, channels: int | None = None) -> CamResult:
    """Score-CAM (Wang et al. 2020): channel weights from the target logit of the image
    masked by each upsampled, min-max normalised channel; softmax over channels.
    `scorecam_batch` masked images go through the model per forward pass; `channels=N`
    keeps only the N channels of highest variance per image (Faster Score-CAM)."""
    return _one("scorecam", model, images, targets, layer, preprocessing, batch_size, scorecam_batch=scorecam_batch,
                scorecam_channels=channels)


def guided_grad_cam(model, images, targets=None, layer: str | None = None,
                    preprocessing: Preprocessing | None = None, batch_size: int = 32) -> CamResult:
    """Guided Grad-CAM: the Grad-CAM map upsampled bilinearly to the input, times guided
    backpropagation of the same logit; maps (B, [K,] S, S, C)."""
    return _one("guided_gradcam", model, images, targets, layer, preprocessing, batch_size)


# ----------------------------------------------------------------------------
# occlusion


def occlusion_grid(side: int, size: int, stride: int) -> np.ndarray:
    """Top (or left) corners of the square along one axis: every stride, the last flush with the border."""
    if size < 1 or stride < 1:
        raise PipelineError(f"occlusion size={size} stride={stride}: both must be at least 1")
    if size >= side:
        return np.zeros(1, np.int64)
    starts = np.arange(0, side - size + 1, stride, dtype=np.int64)
    if starts[-1] != side - size:
        starts = np.append(starts, side - size)
    return starts


class Occluder:
    """Zeiler & Fergus (2014, section 4.2) occlusion sensitivity for one model.

    A square of constant `fill` slides over each image with a stride; for every position
    the model gives the probability of the target class, the most probable class, and
    the total activation of one feature map of `layer` (the channel with the strongest
    response on the unoccluded image). All positions of all images go through the model
    in batches.
    """

    def __init__(self, model: keras.Model, layer: str | None = None,
                 preprocessing: Preprocessing | None = None, output=None):
        self.model = model
        self.preprocessing = preprocessing
        self.layer, _ = map_layer(model, layer, "occlusion.layer")
        self.logits_layer, self._head = logits_head(model, output)
        self.num_classes = int(model.outputs[choose_output(model, output)].shape[-1])
        self._features = feature_model(model, [self.layer, self.logits_layer], name="occlusion_features")
        self._traced: set = set()

    def _forward(self, x):
        maps, z = self._features(x, training=False)
        return maps, (self._head(z) if self._head is not None else z)

    def fill_value(self, fill) -> np.ndarray:
        """The square's value in model-input units, per channel: `fill` is a uint8 grey level
        when preprocessing is known, else already a model-input value."""
        if self.preprocessing is not None:
            grey = np.full((1, 1, self.preprocessing.channels), int(fill), np.uint8)
            return normalize(tf.constant(grey), self.preprocessing.normalize).numpy().reshape(-1)
        return np.asarray([float(fill)], np.float32)

    @tf.function(reduce_retracing=True)
    def _base(self, x, codes):
        maps, logits = self._forward(x)
        classes = _resolve_codes(codes, logits)[:, 0]
        prob = tf.gather(tf.nn.softmax(logits), classes, batch_dims=1)
        channel = tf.argmax(tf.reduce_max(maps, axis=(1, 2)), axis=-1, output_type=tf.int32)
        total = tf.gather(tf.reduce_sum(maps, axis=(1, 2)), channel, batch_dims=1)
        return classes, prob, channel, total

    @tf.function(reduce_retracing=True)
    def _occluded(self, x, image, y0, x0, size, fill, classes, channel):
        """x[image] with the square at (y0, x0): (probability, top class, channel total), (m,) each."""
        side_y, side_x = tf.shape(x)[1], tf.shape(x)[2]
        rows = tf.range(side_y)[None, :]
        cols = tf.range(side_x)[None, :]
        in_y = (rows >= y0[:, None]) & (rows < y0[:, None] + size)
        in_x = (cols >= x0[:, None]) & (cols < x0[:, None] + size)
        square = (in_y[:, :, None] & in_x[:, None, :])[..., None]  # (m, S, S, 1)
        xs = tf.where(square, fill, tf.gather(x, image))
        maps, logits = self._forward(xs)
        prob = tf.gather(tf.nn.softmax(logits), tf.gather(classes, image), batch_dims=1)
        top = tf.argmax(logits, axis=-1, output_type=tf.int32)
        total = tf.gather(tf.reduce_sum(maps, axis=(1, 2)), tf.gather(channel, image), batch_dims=1)
        return prob, top, total

    def compute(self, images, targets=None, size: int = 32, stride: int = 16, fill=128,
                batch_size: int = 64, progress: bool = False) -> OcclusionResult:
        """Occlusion maps for the images; one target class per image (see module doc)."""
        x = model_inputs(images, self.preprocessing)
        codes, keep_k = encode_targets(targets, len(x))
        if keep_k and codes.shape[1] != 1:
            raise PipelineError("occlusion explains one class per image: pass targets of shape (B,)")
        rows = occlusion_grid(int(x.shape[1]), size, stride)
        cols = occlusion_grid(int(x.shape[2]), size, stride)
        classes, base_prob, channel, base_total = any_batch(self._base, self._traced, (x, tf.constant(codes)))
        fill_t = tf.constant(self.fill_value(fill), tf.float32)
        gh, gw = len(rows), len(cols)
        b = len(x)
        image = np.repeat(np.arange(b, dtype=np.int32), gh * gw)
        y0 = np.tile(np.repeat(rows.astype(np.int32), gw), b)
        x0 = np.tile(np.tile(cols.astype(np.int32), gh), b)
        prob = np.empty(len(image), np.float32)
        top = np.empty(len(image), np.int64)
        total = np.empty(len(image), np.float32)
        with tqdm(total=len(image), desc="occlusion", unit="pos", disable=not progress) as bar:
            for s in _batches(len(image), batch_size):
                p, t, a = any_batch(self._occluded, self._traced, (
                    x, tf.constant(image[s]), tf.constant(y0[s]), tf.constant(x0[s]), tf.constant(size, tf.int32),
                    fill_t, classes, channel))
                prob[s], top[s], total[s] = p.numpy(), t.numpy(), a.numpy()
                bar.update(s.stop - s.start)
        return OcclusionResult(
            probability=prob.reshape(b, gh, gw), top_class=top.reshape(b, gh, gw),
            activation=total.reshape(b, gh, gw), classes=classes.numpy().astype(np.int64),
            base_probability=base_prob.numpy().astype(np.float32),
            base_activation=base_total.numpy().astype(np.float32), channel=channel.numpy().astype(np.int64),
            rows=rows, cols=cols, size=int(size), stride=int(stride), layer=self.layer)


def occlusion(model, images, targets=None, size: int = 32, stride: int = 16, fill=128, layer: str | None = None,
              preprocessing: Preprocessing | None = None, batch_size: int = 64) -> OcclusionResult:
    """Occlusion sensitivity (Zeiler & Fergus 2014): see `Occluder`. `fill` is a uint8 grey
    level with `preprocessing`, else a value in model-input units."""
    return Occluder(model, layer, preprocessing).compute(images, targets, size, stride, fill, batch_size)


# ----------------------------------------------------------------------------
# intermediate activations


class ActivationExtractor:
    """Feature maps of chosen layers, one feature model built once and reused per batch."""

    def __init__(self, model: keras.Model, layers: Sequence[str], preprocessing: Preprocessing | None = None):
        self.layers = resolve_layer_names(model, list(layers))
        self.preprocessing = preprocessing
        self._features = feature_model(model, self.layers, name="activation_features")

    def __call__(self, images, batch_size: int = 32) -> dict[str, np.ndarray]:
        """{qualified layer name: (B, H, W, C) float32} for the images."""
        x = model_inputs(images, self.preprocessing)
        parts: dict[str, list] = {n: [] for n in self.layers}
        for s in _batches(len(x), batch_size):
            outs = self._features(x[s], training=False)
            outs = [outs] if len(self.layers) == 1 else outs
            for n, o in zip(self.layers, outs):
                parts[n].append(np.asarray(o))
        return {n: np.concatenate(p) for n, p in parts.items()}


def layer_activations(model, images, layers: Sequence[str], preprocessing: Preprocessing | None = None,
                      batch_size: int = 32) -> dict[str, np.ndarray]:
    """Feature maps of the named layers: {qualified name: (B, H, W, C) float32}."""
    return ActivationExtractor(model, layers, preprocessing)(images, batch_size)


def blank_channels(maps: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, C) bool: the channel is the same value everywhere (all zero after
    a ReLU) and so carries nothing about this image; a 1x1 map is blank when zero."""
    maps = np.asarray(maps)
    hi = maps.max(axis=(1, 2))
    lo = maps.min(axis=(1, 2))
    if maps.shape[1] * maps.shape[2] == 1:
        return (hi == 0) & (lo == 0)
    return hi == lo
