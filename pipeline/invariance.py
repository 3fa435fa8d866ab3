"""What the features ignore (Zeiler & Fergus 2013, Fig. 5): images shifted, rotated and
scaled over a range of values, all on the device with one projective warp, and the
distance of each layer's feature vector from the original's with the probability of a
target class. The invariance stage (pipeline.stages.invariance) chooses the images and
stores what `invariance_curves` returns."""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError

KINDS = ("translation", "rotation", "scale")
IDENTITY = {"translation": 0.0, "rotation": 0.0, "scale": 1.0}
FILL_MODES = ("constant", "nearest", "reflect", "wrap")

# ---------------------------------------------------------------- transformations

def parameter_grid(low: float, high: float, steps: int, identity: float) -> tuple[np.ndarray, int]:
    """`steps` values evenly spaced over [low, high] plus the identity; and the identity's index."""
    if steps < 2 or not high > low:
        raise PipelineError(f"invariance range [{low}, {high}] with {steps} steps: give low < high and steps >= 2")
    values = np.linspace(float(low), float(high), int(steps))
    if not np.isclose(values, identity).any():
        values = np.sort(np.append(values, identity))
    values[np.argmin(np.abs(values - identity))] = identity
    return values, int(np.argmin(np.abs(values - identity)))


def transform_matrices(kind: str, values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, 8) projective transforms, output pixel (x, y) -> input point, for (height, width) images.

    translation: content moves down by value * height pixels; rotation: counter-clockwise
    by value degrees about the image centre; scale: zoom by value about the centre (> 1
    enlarges).
    """
    v = np.asarray(values, np.float64)
    height, width = size
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    m = np.zeros((len(v), 8), np.float64)
    if kind == "translation":
        m[:, 0] = m[:, 4] = 1.0
        m[:, 5] = -v * height
    elif kind == "rotation":
        a = np.deg2rad(v)
        cos, sin = np.cos(a), np.sin(a)
        m[:, 0], m[:, 1], m[:, 2] = cos, -sin, cx - cos * cx + sin * cy
        m[:, 3], m[:, 4], m[:, 5] = sin, cos, cy - sin * cx - cos * cy
    elif kind == "scale":
        if (v <= 0).any():
            raise PipelineError(f"invariance.scale holds {v[v <= 0].tolist()}: scale factors must be positive")
        m[:, 0] = m[:, 4] = 1.0 / v
        m[:, 2] = cx * (1.0 - 1.0 / v)
        m[:, 5] = cy * (1.0 - 1.0 / v)
    else:
        raise ValueError(f"unknown transformation {kind!r}")
    return m.astype(np.float32)


def warp(images, matrices, fill_mode: str = "constant"):
    """Bilinear warp of float images (B, H, W, C) by per-image (B, 8) transforms, on the device."""
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    shape = tf.shape(images)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.convert_to_tensor(matrices, tf.float32), output_shape=shape,
        fill_value=0.0, interpolation="BILINEAR", fill_mode=fill_mode.upper())


# ---------------------------------------------------------------- measurements

def invariance_curves(model, names: list[str], spec, pixels: np.ndarray, targets: np.ndarray,
                      grids: dict[str, np.ndarray], fill_mode: str = "constant", batch_size: int = 32,
                      probabilities: bool | None = None) -> dict[str, tuple]:
    """Distances and class probabilities for each transformation kind over its values.

    pixels (N, S, S, C) uint8 model-input images; targets (N,) class per image; grids
    maps a kind (translation, rotation, scale) to its (T,) values. Every transformed
    image of every kind goes through the model in batches of `batch_size`.
    Returns, per kind: (distance {layer: (N, T) float32}, norm {layer: (N,) float32}
    of the original's feature vector, probability (N, T) float32 of the target class,
    predicted (N, T) int64, transformed pixels (N, T, S, S, C) uint8).
    """
    import tensorflow as tf

    from pipeline.graph import feature_model, flat_layers
    from pipeline.preprocess import normalize
    from pipeline.train import outputs_probabilities

    last = flat_layers(model)[-1].name
    wanted = list(dict.fromkeys(list(names) + [last]))
    features = feature_model(model, wanted)
    if probabilities is None:
        probabilities = outputs_probabilities(model)

    @tf.function(reduce_retracing=True)
    def forward(x):
        outs = features(normalize(x, spec.normalize), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        flat = [tf.reshape(o, (tf.shape(o)[0], -1)) for o in outs]
        logits = flat[wanted.index(last)]
        return [flat[wanted.index(name)] for name in names], logits if probabilities else tf.nn.softmax(logits)

    n = len(pixels)
    originals = tf.constant(pixels.astype(np.float32))
    reference, _ = forward(originals)
    kinds = list(grids)
    counts = [len(grids[k]) for k in kinds]
    # one job per (kind, image, value), kind-major then image-major
    matrices = np.concatenate([np.tile(transform_matrices(k, grids[k], spec.size), (n, 1)) for k in kinds])
    image_of = np.concatenate([np.repeat(np.arange(n), t) for t in counts])
    jobs = len(matrices)
    distance = {name: np.zeros(jobs, np.float32) for name in names}
    probability = np.zeros(jobs, np.float32)
    predicted = np.zeros(jobs, np.int64)
    shown = np.zeros((jobs,) + pixels.shape[1:], np.uint8)
    for start in tqdm(range(0, jobs, batch_size), desc="invariance", unit="batch",
                      total=math.ceil(jobs / batch_size)):
        sl = slice(start, start + batch_size)
        idx = image_of[sl]
        moved = warp(tf.gather(originals, idx), matrices[sl], fill_mode)
        feats, probs = forward(moved)
        for name, f, ref in zip(names, feats, reference):
            distance[name][sl] = tf.norm(f - tf.gather(ref, idx), axis=1).numpy()
        probs = probs.numpy()
        probability[sl] = probs[np.arange(len(idx)), targets[idx]]
        predicted[sl] = probs.argmax(axis=1)
        shown[sl] = np.clip(np.rint(moved.numpy()), 0, 255).astype(np.uint8)
    norm = {name: np.linalg.norm(ref.numpy(), axis=1).astype(np.float32) for name, ref in zip(names, reference)}
    out, offset = {}, 0
    for kind, t in zip(kinds, counts):
        sl = slice(offset, offset + n * t)
        offset += n * t
        out[kind] = ({k: v[sl].reshape(n, t) for k, v in distance.items()}, norm, probability[sl].reshape(n, t),
                     predicted[sl].reshape(n, t), shown[sl].reshape((n, t) + pixels.shape[1:]))
    return out
