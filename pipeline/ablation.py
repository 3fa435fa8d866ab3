"""Unit ablation (Zhou et al. 2018; Bau et al. 2020): zero one unit of a layer and see what
the model's class scores do, image by image.

`Ablator` builds one model with a second input, a keep mask over the layer's channels, by
calling every layer of the graph again with the chosen layer's output multiplied by the
mask. A batch of B images and U units becomes one pass of U * B rows, each image once per
unit with that unit zeroed. The per-class summaries are pure functions of the per-image
rows, so the stage can stream, commit and resume them like every per-image stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from pipeline.graph import ancestors, flat_layers, logits_head, replay, resolve_layer_names


class Ablator:
    """Class logits of images with single units of `layer` zeroed."""

    def __init__(self, model, layer: str, output=None):
        nodes = flat_layers(model)
        self.layer = resolve_layer_names(model, [layer])[0]
        by_name = {n.name: n for n in nodes}
        target = by_name[self.layer]
        self.channels = int(target.output_shape[-1])
        head_node, head = logits_head(model, output)
        needed = ancestors(by_name, [head_node])
        if self.layer not in needed:
            from pipeline.errors import PipelineError

            raise PipelineError(f"ablation: the class scores do not depend on layer {layer}: choose a layer "
                                f"before {head_node}")
        keep = keras.Input((self.channels,), name="keep")

        def call(node, args, kwargs):
            out = node.layer(*args, **kwargs)
            if node.name != self.layer:
                return out
            shape = [-1] + [1] * (len(node.output_shape) - 1) + [self.channels]
            return out * keras.ops.reshape(keep, shape)

        values = {(n.name, 0): n.tensors[0] for n in nodes if n.kind == "input" and n.name in needed}
        values = replay([n for n in nodes if n.name in needed and n.kind != "input"], values, call)
        logits = values[(head_node, 0)]
        if head is not None:
            logits = head(logits)
        image = model.inputs[0] if len(model.inputs) == 1 else model.input
        self.model = keras.Model([image, keep], logits, name=f"{model.name}_ablation")
        self.num_classes = int(self.model.outputs[0].shape[-1])

    def logits(self, x: tf.Tensor, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (B, H, W, C) normalised: the intact logits (B, L) and, per unit, the logits with
        that unit zeroed (U, B, L)."""
        b, u = int(x.shape[0]), len(units)
        keep = np.ones((u + 1, b, self.channels), np.float32)
        keep[np.arange(u), :, units] = 0.0  # row u: unit u zeroed; the last row: intact
        tiled = tf.tile(x, [u + 1] + [1] * (len(x.shape) - 1))
        out = self.model([tiled, tf.constant(keep.reshape((u + 1) * b, self.channels))], training=False)
        out = np.asarray(out).reshape(u + 1, b, -1)
        return out[-1], out[:-1]


def per_image_rows(intact: np.ndarray, ablated: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """What the stage stores per image: correct before and after, the true class's logit
    before and after (labels (B,) are model class indices)."""
    rows = np.arange(len(labels))
    return {"base_correct": intact.argmax(-1) == labels,
            "base_logit": intact[rows, labels].astype(np.float32),
            "correct": (ablated.argmax(-1) == labels[None]).T,  # (B, U)
            "logit": ablated[:, rows, labels].T.astype(np.float32)}


@dataclass
class ClassEffects:
    classes: np.ndarray  # (L',) the classes that have images
    count: np.ndarray  # (L',)
    base_accuracy: np.ndarray  # (L',)
    accuracy_delta: np.ndarray  # (U, L') accuracy with the unit zeroed minus without
    logit_delta: np.ndarray  # (U, L') mean change of the true class's logit
    overall_delta: np.ndarray  # (U,) change of the accuracy over every image


def class_effects(labels: np.ndarray, base_correct: np.ndarray, correct: np.ndarray, base_logit: np.ndarray,
                  logit: np.ndarray) -> ClassEffects:
    """Per class means of the per-image rows (labels (N,), correct/logit (N, U))."""
    classes, inverse, count = np.unique(labels, return_inverse=True, return_counts=True)
    onehot = np.zeros((len(labels), len(classes)))
    onehot[np.arange(len(labels)), inverse] = 1.0
    mean = lambda v: (v.T @ onehot) / count  # noqa: E731  (…, N) -> per class
    base = mean(base_correct.astype(np.float64)[:, None])[0]
    return ClassEffects(classes.astype(np.int64), count.astype(np.int64), base.astype(np.float32),
                        (mean(correct.astype(np.float64)) - base).astype(np.float32),
                        mean((logit - base_logit[:, None]).astype(np.float64)).astype(np.float32),
                        (correct.mean(axis=0) - base_correct.mean()).astype(np.float32))
