"""Input-space maps of one unit: plain gradient, guided backprop and deconvnet.

`backprop(model, x, layer, seed, method)` returns d<sum(layer_output * seed)>/dx
under one of three backward rules:

* 'gradient': the plain gradient of the model as it is.
* 'guided' (Springenberg et al. 2015, "Striving for simplicity"): at every
  ReLU-family unit the signal passed back is rectified first and then goes
  through the unit's own local derivative, so only positive signals pass, and
  only where the forward input made the unit active. For ReLU6 the clipped
  region (input > 6) has zero derivative and is treated like the negative one.
* 'deconv' (Zeiler & Fergus 2014): at every ReLU-family unit the backward pass
  rectifies the signal, whatever the forward input was. Max pooling routes the
  signal through its switches and convolutions use their transposed filters,
  which is exactly what the plain gradient of those layers does.

ReLU-family units are: keras.layers.ReLU (any max_value, negative_slope,
threshold), LeakyReLU, Activation('relu' | 'relu6' | 'leaky_relu'),
the keras.ops relu / relu6 / leaky_relu calls of a functional graph, and
layers with such a fused activation (Conv2D(..., activation='relu'), Dense, ...).
A leaky unit keeps its slope in the backward rules: 'guided' rectifies the
signal and then applies the unit's derivative (1 above the threshold, the slope
below it), 'deconv' passes the signal through the same leaky rectifier
(g if g > 0 else slope * g). Every other layer (ELU, GELU, swish, PReLU,
sigmoid, Lambda, BatchNorm, pooling, merges) keeps its plain gradient.

How: the forward computation is rebuilt from pipeline.graph.flat_layers (nested
models expanded, topological order, only the ancestors of the target layer) by
calling the model's own layer objects again, so every weight is shared and the
model itself is never changed. At the ReLU-family units the call goes through a
tf.custom_gradient version of the nonlinearity; a fused activation is split off
by evaluating the layer's `call` on a read-only view whose activation is None.
The forward values are exactly the model's.

Guided Grad-CAM and other callers: build one `Backprop(model, layer, method)`
and call it on many batches (one traced tf.function per object); `backprop()`
keeps such objects per model. `seed_at` builds one-hot seeds for a batch, and
`pipeline.render.draw.panel_to_uint8` turns a map into an image for viewers.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from pipeline.graph import flat_layers, replay, resolve_layer_names

logger = logging.getLogger(__name__)

METHODS = ("gradient", "guided", "deconv")

_RELU_ACTIVATIONS = {  # activation function -> slope below the threshold
    keras.activations.relu: 0.0,
    keras.activations.relu6: 0.0,
}
_LEAKY_ACTIVATIONS = (keras.activations.leaky_relu,)


# ---------------------------------------------------------------------------
# public API


def backprop(model, x, layer: str, seed, method: str) -> tf.Tensor:
    """d<sum(layer_output * seed)>/dx under `method`'s backward rules.

    x: (B, H, W, C) float32 normalised model input; layer: a layer name (qualified
    for nested models: 'outer/inner'); seed: (B,) + the layer's output shape
    (e.g. one-hot at (y, x, channel), see `seed_at`); method: 'gradient' |
    'guided' | 'deconv'. Returns (B, H, W, C) float32. Row b of the result
    depends only on x[b] and seed[b], so one call can carry many seeds, the
    same image repeated with a different seed in each row.
    """
    return _cached(model, layer, method)(x, seed)


class Backprop:
    """The backward map of one (model, layer, method), traced once and reused.

    `Backprop(model, layer, method)(x, seed)` equals `backprop(...)`;
    `.outputs(x)` gives the layer's output through the rebuilt graph (equal to
    the model's), `.output_shape` its shape without the batch axis, `.layer`
    the qualified layer name. `input_size=(h, w)` traces the graph for inputs of
    that size instead of the model's (receptive-field crops, pipeline.field_crop);
    `.maps_and_values(x, seed)` also gives sum(layer_output * seed) of every row,
    the seeded unit's value when the seed is one-hot.
    """

    def __init__(self, model, layer: str, method: str, input_size: tuple[int, int] | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown backprop method {method!r}: use one of {', '.join(METHODS)}")
        self.method = method
        self.layer = resolve_layer_names(model, [layer])[0]
        nodes = flat_layers(model)
        inputs = [n for n in nodes if n.kind == "input"]
        if len(inputs) != 1:
            raise ValueError(f"backprop needs a model with one input; {model.name!r} has {len(inputs)}")
        self._input = inputs[0].name
        by_name = {n.name: n for n in nodes}
        needed, stack = set(), [self.layer]
        while stack:  # the target's ancestors: nothing downstream is computed
            q = stack.pop()
            if q not in needed:
                needed.add(q)
                stack.extend(by_name[q].inputs)
        self._nodes = [n for n in nodes if n.name in needed and n.kind != "input"]
        self.output_shape = tuple(by_name[self.layer].output_shape)
        self._rules = {n.name: _relu_rule(n) for n in self._nodes} if method != "gradient" else {}
        opaque = [n.name for n in self._nodes if n.kind == "model"]
        if opaque and method != "gradient":
            logger.warning("%s: nested model(s) %s are called as a whole; the %s rules do not "
                           "reach inside them", model.name, ", ".join(opaque), method)
        input_shape = tuple(inputs[0].output_shape)
        if input_size is not None:
            input_shape = tuple(int(v) for v in input_size) + input_shape[2:]
        x_spec = tf.TensorSpec((None,) + input_shape, tf.float32)
        # each object traces its own closures once: tf.function keys its retracing warning on
        # the Python function, and a bound method's is shared by every Backprop (one a layer)
        self._forward_fn = tf.function(lambda x: self._forward(x), input_signature=[x_spec])
        if input_size is not None:  # the layer's output on inputs of that size
            self.output_shape = tuple(int(v) for v in
                                      self._forward_fn.get_concrete_function().structured_outputs.shape[1:])
        seed_spec = tf.TensorSpec((None,) + self.output_shape, tf.float32)
        # one trace per object, whatever the batch size
        self._fn = tf.function(lambda x, seed: self._gradient(x, seed), input_signature=[x_spec, seed_spec])

    def __call__(self, x, seed) -> tf.Tensor:
        return self.maps_and_values(x, seed)[0]

    def maps_and_values(self, x, seed) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.convert_to_tensor(x, tf.float32)
        seed = tf.convert_to_tensor(seed, tf.float32)
        expected = (x.shape[0],) + self.output_shape
        if tuple(seed.shape) != expected and not _compatible(seed.shape, expected):
            raise ValueError(f"seed shape {tuple(seed.shape)} does not match the output of "
                             f"{self.layer!r} for this batch: {expected}")
        return self._fn(x, seed)

    def outputs(self, x) -> tf.Tensor:
        return self._forward_fn(tf.convert_to_tensor(x, tf.float32))

    def _gradient(self, x, seed):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = self._forward(x)
        seed = tf.cast(seed, out.dtype)
        grad = tape.gradient(out, x, output_gradients=seed)
        values = tf.reduce_sum(tf.reshape(tf.cast(out * seed, tf.float32), (tf.shape(out)[0], -1)), axis=1)
        return (tf.zeros_like(x) if grad is None else tf.cast(grad, tf.float32)), values

    def _forward(self, x):
        def call(node, args, kwargs):
            rule = self._rules.get(node.name)
            if rule is None:
                return node.layer(*args, **kwargs)
            return _apply_rule(rule, node.layer, args, kwargs, self.method)

        values = replay(self._nodes, {(self._input, 0): x}, call)
        return values[(self.layer, 0)]


def seed_at(shape, channel, y=None, x=None) -> tf.Tensor:
    """One-hot seeds (B,) + shape, float32: 1 at (y[b], x[b], channel[b]) of row b.

    shape: the layer's output shape without the batch axis, (h, w, c) or (c,)
    for a flat output (then y and x are ignored). channel, y, x: ints or (B,)
    arrays (broadcast against each other).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        channel = np.atleast_1d(np.asarray(channel, np.int64))
        index = np.stack([np.arange(len(channel)), channel], axis=1)
    elif len(shape) == 3:
        channel, y, x = (np.atleast_1d(a) for a in np.broadcast_arrays(
            np.asarray(channel, np.int64), np.asarray(y, np.int64), np.asarray(x, np.int64)))
        index = np.stack([np.arange(len(channel)), y, x, channel], axis=1)
    else:
        raise ValueError(f"seed_at handles (h, w, c) and (c,) outputs, not {shape}")
    lows, highs = index[:, 1:].min(axis=0, initial=0), index[:, 1:].max(axis=0, initial=0)
    if (lows < 0).any() or (highs >= np.asarray(shape)).any():
        raise ValueError(f"seed position outside the layer output {shape}")
    batch = len(index)
    return tf.scatter_nd(index, tf.ones(batch, tf.float32), (batch,) + shape)


# ---------------------------------------------------------------------------
# backward rules


@tf.custom_gradient
def _rectify_signal(t):
    """Identity forward; the backward signal is rectified."""
    return tf.identity(t), lambda g: tf.nn.relu(g)


def _deconv_unit(fn: Callable, slope: float):
    """fn forward; backward: the signal itself rectified (leaky with `slope`),
    ignoring the forward input."""

    @tf.custom_gradient
    def unit(z):
        def grad(g):
            return tf.nn.relu(g) if slope == 0 else tf.where(g > 0, g, slope * g)

        return fn(z), grad

    return unit


def _nonlinear(fn: Callable, slope: float, z, method: str):
    if method == "guided":
        # the unit's own derivative times the rectified signal: (z active) * (g > 0) * g
        return _rectify_signal(fn(z))
    return _deconv_unit(fn, slope)(z)


class _Rule(NamedTuple):
    kind: str  # 'unit': fn applies to the layer's input; 'fused': to its linear part's output
    fn: Callable
    slope: float  # slope below the threshold (0 for ReLU and ReLU6)


def _relu_rule(node) -> _Rule | None:
    layer = node.layer
    from keras.src.activations.activations import ReLU as _ReluOp
    from keras.src.ops import nn as _nn

    if isinstance(layer, (keras.layers.ReLU, _ReluOp)):
        return _Rule("unit", layer.call, float(layer.negative_slope or 0.0))
    if isinstance(layer, (keras.layers.LeakyReLU, _nn.LeakyRelu)):
        return _Rule("unit", layer.call, float(layer.negative_slope))
    if isinstance(layer, (_nn.Relu, _nn.Relu6)):
        return _Rule("unit", layer.call, 0.0)
    activation = getattr(layer, "activation", None)
    slope = _activation_slope(activation)
    if slope is None:
        return None
    if isinstance(layer, keras.layers.Activation):
        return _Rule("unit", activation, slope)
    if isinstance(layer, keras.layers.Layer) and node.kind == "layer":
        return _Rule("fused", activation, slope)
    return None


def _activation_slope(activation) -> float | None:
    if activation is None:
        return None
    try:
        if activation in _RELU_ACTIVATIONS:
            return _RELU_ACTIVATIONS[activation]
    except TypeError:  # an unhashable callable
        return None
    if activation in _LEAKY_ACTIVATIONS:
        return 0.2  # keras.activations.leaky_relu's default slope
    return None


class _LinearView:
    """Read-only view of a layer whose fused activation is None: evaluating the
    layer's `call` on it gives the pre-activation, with the layer's own weights."""

    activation = None

    def __init__(self, layer):
        object.__setattr__(self, "_layer", layer)

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __setattr__(self, name, value):  # pragma: no cover - guards the user's model
        raise AttributeError("read-only view of a layer")


def _apply_rule(rule: _Rule, layer, args, kwargs, method: str):
    kind, fn, slope = rule
    if kind == "unit":
        (z,) = args[:1]
        return _nonlinear(fn, slope, z, method)
    if method == "guided":  # the layer's own activation, then the rectified signal
        return _rectify_signal(layer(*args, **kwargs))
    args = [tf.cast(a, layer.compute_dtype) if tf.is_tensor(a) and a.dtype.is_floating else a
            for a in args]
    kwargs = {k: v for k, v in kwargs.items() if k != "training" or _takes_training(layer)}
    z = type(layer).call(_LinearView(layer), *args, **kwargs)
    return _nonlinear(fn, slope, z, method)


def _takes_training(layer) -> bool:
    import inspect

    return "training" in inspect.signature(type(layer).call).parameters


def _compatible(shape, expected) -> bool:
    return len(shape) == len(expected) and all(
        e is None or s is None or s == e for s, e in zip(shape, expected))


# ---------------------------------------------------------------------------
# per-model cache of traced Backprop objects

_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _cached(model, layer: str, method: str) -> Backprop:
    per_model = _CACHE.setdefault(model, {})
    key = (layer, method)
    if key not in per_model:
        per_model[key] = Backprop(model, layer, method)
    return per_model[key]
