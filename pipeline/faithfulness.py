"""Deletion and insertion curves of saliency maps (Petsiuk et al. 2018, RISE).

Deletion: the pixels of the model input are set to the baseline (0 in the model's own input
space) in order of decreasing saliency, `steps` equal shares at a time, and the target
class's softmax probability is read after each share; a faithful map makes it fall fast,
so a low area under the curve is good. Insertion starts from the baseline image and puts
the pixels back in the same order; a high area is good. Ties in the map are broken by
pixel index, so a flat map removes pixels in raster order.

Each curve has steps + 1 points (0, 1/steps, ..., 1 of the pixels); the area is the
trapezoid rule over [0, 1]. All curves of a batch of images go through the model in
batches of `batch` masked images.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def saliency_order(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Ranks (B, H*W) of the input pixels, most salient first, for maps (B, h, w) resampled
    bilinearly to the input size (H, W)."""
    up = tf.image.resize(tf.convert_to_tensor(maps, tf.float32)[..., None], size, method="bilinear")
    flat = tf.reshape(up, (len(maps), -1)).numpy()
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[1])[None], axis=1)
    return ranks


def curves(logits_fn, x: np.ndarray, maps: np.ndarray, classes: np.ndarray, steps: int,
           batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves (B, steps + 1) of the target probability.

    x (B, H, W, C) model inputs; maps (B, h, w) saliency per image; classes (B,) targets;
    logits_fn maps a (N, H, W, C) batch to (N, L) logits."""
    b, h, w = x.shape[0], x.shape[1], x.shape[2]
    ranks = saliency_order(maps, (h, w)).reshape(b, h, w)
    shares = np.round(np.linspace(0, h * w, steps + 1)).astype(np.int64)  # pixels changed at each point
    out = {"deletion": np.zeros((b, steps + 1), np.float32), "insertion": np.zeros((b, steps + 1), np.float32)}
    jobs = [(kind, i, s) for kind in out for i in range(b) for s in range(steps + 1)]
    for start in range(0, len(jobs), batch):
        part = jobs[start:start + batch]
        images = np.empty((len(part),) + x.shape[1:], np.float32)
        for j, (kind, i, s) in enumerate(part):
            changed = ranks[i] < shares[s]  # the shares[s] most salient pixels
            keep = ~changed if kind == "deletion" else changed
            images[j] = x[i] * keep[..., None]
        probs = tf.nn.softmax(logits_fn(tf.constant(images)), axis=-1).numpy()
        for j, (kind, i, s) in enumerate(part):
            out[kind][i, s] = probs[j, classes[i]]
    return out["deletion"], out["insertion"]


def area(curve: np.ndarray) -> np.ndarray:
    """Area under curves (..., steps + 1) over [0, 1], trapezoid rule."""
    steps = curve.shape[-1] - 1
    return ((curve[..., :-1] + curve[..., 1:]) / 2).sum(axis=-1) / steps
