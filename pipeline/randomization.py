"""The model-randomization sanity check (Adebayo et al. 2018): re-initialise the weights
from the top of the network down, cumulatively, and see whether the maps change.

A map that explains the model must decorrelate from the original as the weights it
depends on become random (Grad-CAM does); guided backpropagation is the known negative
control, whose maps stay much like edge detections of the image. The weights are changed in
place, on the very layers the explainer's graphs call, so nothing is rebuilt between steps,
and restored afterwards.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from pipeline.graph import flat_layers


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rank correlation of each row pair of a, b (n, ...) over their flattened values (ties
    take the mean rank; a constant row gives 0)."""
    def ranks(v):
        v = v.reshape(len(v), -1)
        order = np.argsort(v, axis=1, kind="stable")
        r = np.empty(v.shape)
        np.put_along_axis(r, order, np.arange(v.shape[1], dtype=np.float64)[None], axis=1)
        for i in range(len(v)):  # mean ranks for ties
            _, inverse, counts = np.unique(v[i], return_inverse=True, return_counts=True)
            sums = np.bincount(inverse, weights=r[i])
            r[i] = (sums / counts)[inverse]
        return r - r.mean(axis=1, keepdims=True)
    ra, rb = ranks(a), ranks(b)
    norm = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    return np.divide((ra * rb).sum(axis=1), norm, out=np.zeros(len(ra)), where=norm > 0)


def weighted_layers_top_down(model) -> list:
    """The layers that hold weights, each once, from the output to the input."""
    seen, out = set(), []
    for node in reversed(flat_layers(model)):
        layer = node.layer
        if layer.weights and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def cascade(explainer, x: tf.Tensor, steps: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """Grad-CAM and guided-backprop maps of the originally predicted classes after re-initialising the
    top 1/steps, 2/steps, ... of the weighted layers; returns the lowest layer re-initialised
    at each step, the Spearman correlation (steps, n) of each method's maps with the
    original ones, and the classes (n,). Weights are drawn N(0, sd) per array with the sd
    of the original array."""
    layers = weighted_layers_top_down(explainer.model)
    saved = [[w.numpy() for w in layer.weights] for layer in layers]
    rng = np.random.default_rng(seed)

    def maps(targets):  # the originally predicted classes at every step
        out = explainer.compute(x, targets, ("gradcam",), batch_size=len(x))["gradcam"]
        guided = explainer._guided(x, tf.constant(out.classes[:, None].astype(np.int32)))[:, 0]
        return out.maps, np.abs(np.asarray(guided)).sum(axis=-1), out.classes

    base_cam, base_guided, classes = maps(None)
    names, cam_rho, guided_rho, done = [], [], [], 0
    try:
        for s in range(1, steps + 1):
            upto = math.ceil(s * len(layers) / steps)
            for layer in layers[done:upto]:
                for w in layer.weights:
                    if w.trainable:  # kernels and biases; batch-norm statistics are kept
                        sd = float(np.std(w.numpy())) or 0.05
                        w.assign(rng.normal(0.0, sd, w.shape).astype(np.dtype(w.dtype)))
            done = upto
            cam, guided, _ = maps(classes)
            names.append(layers[upto - 1].name)
            cam_rho.append(spearman(base_cam, cam))
            guided_rho.append(spearman(base_guided, guided))
    finally:
        for layer, weights in zip(layers, saved):
            for w, value in zip(layer.weights, weights):
                w.assign(value)
    return names, np.asarray(cam_rho, np.float32), np.asarray(guided_rho, np.float32), classes
