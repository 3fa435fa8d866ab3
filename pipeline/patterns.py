"""Filter patterns: the input image that maximises a channel, by gradient ascent.

Small pieces that compose, in the manner of lucid:

* parameterisations (`FourierImage`, `PixelImage`): trainable variables and a
  function that turns them into a batch of images in [0, 1];
* transformations (`Transforms`): per-image random padding, jitter, scale and
  rotation, fused into one bilinear affine warp applied inside the gradient tape;
* objectives (`channel`, `class_logit`, `Objective`): per-image scores, one target
  per image of the batch, so many channels are optimised in one forward pass; they
  add, scale and negate like numbers;
* the loop (`optimize`) and the recipe that ties everything together
  (`filter_patterns`).

Pixels: the image in [0, 1] is scaled to 0..255 and passed through
`pipeline.preprocess.normalize` inside the tape, so the network sees exactly the
image that is stored as uint8 (up to rounding). Every random number an image uses
(its initial value and its transformation at every step) comes from a generator
seeded with (seed, target, repeat): a pattern depends on neither the batch size nor
which other targets share its batch.

Notebook use:

    from pipeline.patterns import Recipe, filter_patterns
    result = filter_patterns(model, spec, "block3_conv1", range(16), recipe=Recipe(steps=128))
    result.best_images  # (16, H, W, 3) uint8 at the model's input size
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing, normalize

logger = logging.getLogger(__name__)

METHODS = ("fourier", "plain")
OBJECTIVES = ("channel", "class", "neg")
UPSCALE = ("tile", "resize")

# Square root of the colour covariance of ImageNet photos (RGB), as published with lucid:
# colours are optimised in this decorrelated basis so that each variable moves a
# natural colour direction instead of one raw channel.
COLOR_CORRELATION_SQRT = np.array([[0.26, 0.09, 0.02],
                                   [0.27, 0.00, -0.05],
                                   [0.27, -0.09, 0.03]], np.float32)
_COLOR_BASIS = COLOR_CORRELATION_SQRT / np.max(np.linalg.norm(COLOR_CORRELATION_SQRT, axis=0))

FILL = 0.5  # grey shown where a transformation moves the image off the canvas


# --------------------------------------------------------------------------- seeds


def image_rng(seed: int, target: int, repeat: int) -> np.random.Generator:
    """The random generator of one image: a function of (seed, target, repeat) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(target), int(repeat)])


# --------------------------------------------------------------------------- parameterisations


def spectrum_scale(size: int, decay_power: float = 1.0) -> np.ndarray:
    """(size, size//2 + 1) gain per rfft2 frequency: 1/f^decay_power, so every
    frequency band starts with about the same energy as in natural images."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    freqs = np.sqrt(fy * fy + fx * fx)
    return (size / np.maximum(freqs, 1.0 / size) ** decay_power).astype(np.float32)


class FourierImage:
    """A batch of images parameterised by their 2-D Fourier spectra.

    Each image channel is the inverse real FFT of a spectrum scaled by 1/f; the
    channels are a linear map of the colour-decorrelated basis; a sigmoid keeps every
    pixel in (0, 1). The images are periodic in both directions (`extend` tiles them
    without a seam).
    """

    def __init__(self, init: np.ndarray, decay_power: float = 1.0, decorrelate: bool = True):
        # init: (B, C, S, S//2 + 1, 2) float32, real and imaginary parts
        b, c, s, f, two = init.shape
        if f != s // 2 + 1 or two != 2:
            raise ValueError(f"spectrum of shape {init.shape} does not fit a square image")
        self.size, self.channels, self.batch = s, c, b
        self.decorrelate = decorrelate and c == 3
        self.variable = tf.Variable(np.asarray(init, np.float32), name="spectrum")
        self._scale = tf.constant(spectrum_scale(s, decay_power))

    @staticmethod
    def initial(rngs: Sequence[np.random.Generator], size: int, channels: int, sd: float = 0.01) -> np.ndarray:
        """Per-image random spectra, each from its own generator."""
        shape = (channels, size, size // 2 + 1, 2)
        return np.stack([rng.normal(0.0, sd, shape) for rng in rngs]).astype(np.float32)

    def assign(self, init: np.ndarray) -> None:
        self.variable.assign(init)

    def linear(self) -> tf.Tensor:
        """(B, S, S, C) image before the colour map and the sigmoid."""
        spectrum = tf.complex(self.variable[..., 0], self.variable[..., 1])
        spectrum = spectrum * tf.cast(self._scale, tf.complex64)
        image = tf.signal.irfft2d(spectrum, fft_length=[self.size, self.size])  # (B, C, S, S)
        return tf.transpose(image, (0, 2, 3, 1)) / 4.0

    def __call__(self) -> tf.Tensor:
        x = self.linear()
        if self.decorrelate:
            x = tf.tensordot(x, tf.constant(_COLOR_BASIS.T), axes=1)
        return tf.sigmoid(x)

    def project(self) -> None:
        """Nothing to do: the sigmoid already keeps pixels in range."""
        return None


class PixelImage:
    """Plain pixels in [0, 1], kept in range by clipping after every step (the tutorials' variant)."""

    def __init__(self, init: np.ndarray):
        b, s, s2, c = init.shape
        self.size, self.channels, self.batch = s, c, b
        self.variable = tf.Variable(np.asarray(init, np.float32), name="pixels")

    @staticmethod
    def initial(rngs: Sequence[np.random.Generator], size: int, channels: int, spread: float = 20 / 255) -> np.ndarray:
        """Grey with a little uniform noise, as in the tutorials (128 + U(0, 20) in 0..255)."""
        return np.stack([0.5 + spread * rng.random((size, size, channels)) for rng in rngs]).astype(np.float32)

    def assign(self, init: np.ndarray) -> None:
        self.variable.assign(init)

    def __call__(self) -> tf.Tensor:
        return tf.identity(self.variable)

    def project(self) -> None:
        self.variable.assign(tf.clip_by_value(self.variable, 0.0, 1.0))


# --------------------------------------------------------------------------- transformations


@dataclass(frozen=True)
class Transforms:
    """Random transformations applied at every step, in this order: translate by up to
    `pad` + `jitter` px (the canvas beyond the image is grey, as after padding), scale by
    one of `scales`, rotate by one of `angles` degrees about the centre, translate by up
    to `jitter2` px. Pixel amounts are for a `reference`-px image and scale with the size."""

    pad: float = 12
    jitter: float = 8
    scales: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
    angles: tuple[float, ...] = tuple(float(a) for a in range(-10, 11))
    jitter2: float = 4
    reference: int = 128

    def sample(self, rng: np.random.Generator, steps: int, size: int) -> np.ndarray:
        """(steps, 8) warp matrices for ImageProjectiveTransform (output -> input pixel)."""
        k = size / self.reference
        shift1 = round((self.pad + self.jitter) * k)
        shift2 = round(self.jitter2 * k)
        t1 = rng.integers(-shift1, shift1 + 1, (steps, 2)).astype(np.float64)
        scale = rng.choice(np.asarray(self.scales, np.float64), steps)
        angle = np.deg2rad(rng.choice(np.asarray(self.angles, np.float64), steps))
        t2 = rng.integers(-shift2, shift2 + 1, (steps, 2)).astype(np.float64)
        return affine_matrices(size, t1, scale, angle, t2)


def affine_matrices(size: int, t1: np.ndarray, scale: np.ndarray, angle: np.ndarray,
                    t2: np.ndarray) -> np.ndarray:
    """Warp matrices of q = t2 + c + scale * R(angle) (p + t1 - c), p a pixel (x, y) of the
    image, q of the output, c the centre; returned as the inverse map q -> p that
    ImageProjectiveTransform wants, (N, 8) float32."""
    c = (size - 1) / 2.0
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    # inverse: p = A (q - t2 - c) + c - t1, A = R(-angle) / scale
    a00, a01, a10, a11 = cos, sin, -sin, cos
    qx, qy = t2[:, 0] + c, t2[:, 1] + c
    bx = c - t1[:, 0] - (a00 * qx + a01 * qy)
    by = c - t1[:, 1] - (a10 * qx + a11 * qy)
    zeros = np.zeros_like(cos)
    return np.stack([a00, a01, bx, a10, a11, by, zeros, zeros], axis=1).astype(np.float32)


def warp(images: tf.Tensor, matrices: tf.Tensor, fill: float = FILL) -> tf.Tensor:
    """Apply one (8,) warp per image (bilinear, constant `fill` off the image); differentiable."""
    size = tf.shape(images)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=matrices, output_shape=size, fill_value=fill,
        interpolation="BILINEAR", fill_mode="CONSTANT")


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """A per-image score to maximise: fn(outputs by layer name) -> (B,).

    Objectives compose: `a + b`, `a - b`, `2 * a`, `-a`.
    """

    layers: tuple[str, ...]
    fn: Callable[[dict], tf.Tensor] = field(repr=False)
    description: str = ""

    def __call__(self, outputs: dict) -> tf.Tensor:
        return self.fn(outputs)

    def __add__(self, other: "Objective") -> "Objective":
        layers = tuple(dict.fromkeys(self.layers + other.layers))
        return Objective(layers, lambda o: self.fn(o) + other.fn(o), f"{self.description} + {other.description}")

    def __neg__(self) -> "Objective":
        return Objective(self.layers, lambda o: -self.fn(o), f"-({self.description})")

    def __sub__(self, other: "Objective") -> "Objective":
        return self + (-other)

    def __mul__(self, k: float) -> "Objective":
        return Objective(self.layers, lambda o: k * self.fn(o), f"{k} * ({self.description})")

    __rmul__ = __mul__


def _targets(values) -> tf.Tensor | tf.Variable:
    if isinstance(values, tf.Variable):
        return values
    return tf.constant(np.asarray(list(values), np.int32))


def _pick(values: tf.Tensor, index) -> tf.Tensor:
    """values[i, index[i]] for every row i (a one-hot product: differentiable, batched)."""
    return tf.reduce_sum(values * tf.one_hot(index, tf.shape(values)[-1], dtype=values.dtype), axis=-1)


def _spatial_mean(act: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(act, axis=list(range(1, act.shape.rank - 1))) if act.shape.rank > 2 else act


def channel(layer: str, channels, pre: str | None = None, capped: bool = False) -> Objective:
    """Mean activation of channel channels[i] of `layer` over all positions, for image i.
    `channels`: ints, or an int32 tf.Variable (B,) to retarget a compiled step.

    pre: the layer feeding `layer` when `layer` is a ReLU-like activation. The score's
    value is always the layer's; its gradient is redirected, after lucid's redirected
    ReLU: where an image's channel is off everywhere (no gradient through the ReLU), the
    gradient of the pre-activation mean is used instead; capped (ReLU6): the gradient
    ignores the cap, as if the layer were a ReLU, so that saturated positions keep
    pulling the image their way."""
    index = _targets(channels)

    def fn(outputs):
        score = _pick(_spatial_mean(outputs[layer]), index)
        if pre is None:
            return score
        z = outputs[pre]
        if capped:
            uncapped = _pick(_spatial_mean(tf.nn.relu(z)), index)
            score = uncapped - tf.stop_gradient(uncapped) + tf.stop_gradient(score)
        lead = _pick(_spatial_mean(z), index)
        peak = _pick(tf.reduce_max(z, axis=list(range(1, z.shape.rank - 1))) if z.shape.rank > 2 else z, index)
        redirected = lead - tf.stop_gradient(lead) + tf.stop_gradient(score)
        return tf.where(peak > 0, score, redirected)

    layers = (layer,) if pre is None else (layer, pre)
    return Objective(layers, fn, f"channel mean of {layer}")


def class_logit(layer: str, classes, head: Callable | None = None) -> Objective:
    """Logit of class classes[i] for image i; `head` maps the layer output to logits
    (the Dense part of a Dense+softmax output layer). `classes` as in `channel`."""
    index = _targets(classes)

    def fn(outputs):
        logits = outputs[layer] if head is None else head(outputs[layer])
        return _pick(logits, index)

    return Objective((layer,), fn, f"class logit from {layer}")


def negative(objective: Objective) -> Objective:
    """The opposite direction: the image that drives the score as low as possible."""
    return -objective


# --------------------------------------------------------------------------- models


def objective_model(model: keras.Model, layers: Sequence[str], size: int | None = None) -> tuple[Callable, int]:
    """A function pixels -> {layer: output} for the named layers, and the image side it
    runs at. With `size` different from the model's input it rebuilds the graph on an
    input of any size (same layer objects, shared weights); a model that cannot run at
    another size (Flatten, fixed Reshape) falls back to its own input size."""
    from pipeline.graph import feature_model

    layers = list(layers)
    native = tuple(model.input_shape[1:3]) if isinstance(model.input_shape, tuple) else (None, None)
    if size is None or None in native or (size, size) == native:
        fm = feature_model(model, layers)
        return _as_dict(fm, layers), size
    try:
        fm = _resizable_feature_model(model, layers)
        fm(tf.zeros((1, size, size, model.input_shape[-1])), training=False)
    except (ValueError, TypeError, tf.errors.OpError) as err:  # a layer that rejects another size
        if native[0] != native[1]:
            raise PipelineError(f"the model runs only at its own {native[0]}x{native[1]} input "
                                f"({str(err).splitlines()[0][:120]}), and patterns are optimised on squares: "
                                f"this model's filter patterns cannot be made") from None
        logger.info("model does not run at %d px (%s); optimising at its input size %d",
                    size, str(err).splitlines()[0][:120], native[0])
        fm = feature_model(model, layers)
        return _as_dict(fm, layers), native[0]
    return _as_dict(fm, layers), size


def _as_dict(fm: keras.Model, layers: list[str]) -> Callable:
    def call(x):
        out = fm(x, training=False)
        out = [out] if len(layers) == 1 else list(out)
        return dict(zip(layers, out))

    return call


def _resizable_feature_model(model: keras.Model, names: Sequence[str]) -> keras.Model:
    """Replay the layer calls that feed `names` on a new (None, None, C) input."""
    from pipeline.graph import ancestors, flat_layers, replay, resolve_layer_names

    nodes = flat_layers(model)
    qualified = resolve_layer_names(model, names)
    by_name = {n.name: n for n in nodes}
    inputs = [n for n in nodes if n.kind == "input"]
    if len(inputs) != 1:
        raise ValueError("only single-input models can be resized")
    new_input = keras.Input((None, None) + tuple(inputs[0].output_shape[2:]))
    needed = ancestors(by_name, qualified)
    values = replay([n for n in nodes if n.name in needed and n.kind != "input"],
                    {(inputs[0].name, 0): new_input})
    return keras.Model(new_input, [values[(q, 0)] for q in qualified])


# --------------------------------------------------------------------------- the loop


class Optimizer:
    """Adam (for the Fourier parameterisation) or the tutorials' normalised gradient
    step, as plain tensors so that one compiled step serves every batch."""

    def __init__(self, variable: tf.Variable, lr: float, method: str):
        self.lr, self.method = lr, method
        self.m = tf.Variable(tf.zeros_like(variable), trainable=False)
        self.v = tf.Variable(tf.zeros_like(variable), trainable=False)
        self.t = tf.Variable(0.0, trainable=False)

    def reset(self) -> None:
        self.m.assign(tf.zeros_like(self.m))
        self.v.assign(tf.zeros_like(self.v))
        self.t.assign(0.0)

    def apply(self, variable: tf.Variable, grad: tf.Tensor) -> None:
        """Ascent step on `variable` along `grad` (the gradient of the score)."""
        if self.method == "plain":
            axes = list(range(1, grad.shape.rank))
            rms = tf.sqrt(tf.reduce_mean(tf.square(grad), axis=axes, keepdims=True))
            variable.assign_add(self.lr * grad / (rms + 1e-5))
            return
        b1, b2, eps = 0.9, 0.999, 1e-8
        self.t.assign_add(1.0)
        self.m.assign(b1 * self.m + (1 - b1) * grad)
        self.v.assign(b2 * self.v + (1 - b2) * tf.square(grad))
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        variable.assign_add(self.lr * m_hat / (tf.sqrt(v_hat) + eps))


def make_step(features: Callable, objective: Objective, param, optimizer: Optimizer,
              normalize_mode: str, warped: bool) -> Callable:
    """One compiled ascent step: step(matrices (B, 8)) -> scores (B,). The matrices are
    ignored when `warped` is False. Targets held in tf.Variables (see `channel`) can
    change between batches without a new trace."""

    @tf.function(autograph=False)
    def step(matrices):
        with tf.GradientTape() as tape:
            image = param()
            if warped:
                image = warp(image, matrices)
            x = normalize(image * 255.0, normalize_mode)
            score = objective(features(x))
            total = tf.reduce_sum(score)
        grad = tape.gradient(total, param.variable)
        optimizer.apply(param.variable, grad)
        param.project()
        return score

    return step


def optimize(step: Callable, steps: int, matrices: np.ndarray | None = None, batch: int = 1,
             on_step: Callable | None = None) -> np.ndarray:
    """Run `steps` steps; matrices (steps, B, 8) or None. Returns the last scores (B,)."""
    score = None
    idle = tf.zeros((batch, 8), tf.float32)
    for t in range(steps):
        score = step(idle if matrices is None else tf.constant(matrices[t]))
        if on_step is not None:
            on_step(t)
    return score.numpy()


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """How patterns are made. lr None: 0.05 (Adam on the spectrum) for 'fourier',
    0.02 (of the 0..1 range, per normalised step) for 'plain'."""

    method: str = "fourier"
    steps: int = 256
    size: int | None = 128  # optimisation side in px (None: the model's input size)
    lr: float | None = None
    seed: int = 0
    transforms: bool = True  # 'fourier' only; the plain variant never transforms
    upscale: str = "tile"  # to the input size: 'tile' (periodic, same scale) or 'resize'
    decay_power: float = 1.0
    decorrelate: bool = True

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 0.05 if self.method == "fourier" else 0.02

    def check(self) -> None:
        if self.method not in METHODS:
            raise PipelineError(f"filters.method={self.method} is unknown: use {' or '.join(METHODS)}")
        if self.upscale not in UPSCALE:
            raise PipelineError(f"filters.upscale={self.upscale} is unknown: use {' or '.join(UPSCALE)}")
        if self.steps < 1:
            raise PipelineError(f"filters.steps={self.steps}: use at least 1 step")
        if self.size is not None and self.size < 8:
            raise PipelineError(f"filters.size={self.size} is too small: use 8 px or more (null: input size)")
        if self.lr is not None and not self.lr > 0:
            raise PipelineError(f"filters.lr={self.lr}: use a positive learning rate (null: the method's default)")


@dataclass
class Patterns:
    """Patterns of `targets` (channels or classes) at the model's input size."""

    targets: np.ndarray  # (N,) int64
    images: np.ndarray  # (N, R, H, W, 3) uint8, R repeats (seeds)
    values: np.ndarray  # (N, R) float32: the objective of the stored uint8 image at input size
    optimised_size: int  # side the images were optimised at
    final_scores: np.ndarray  # (N, R) float32: the objective at the last step (transformed input)

    @property
    def best(self) -> np.ndarray:
        return np.argmax(self.values, axis=1)

    @property
    def best_images(self) -> np.ndarray:
        return self.images[np.arange(len(self.targets)), self.best]

    @property
    def best_values(self) -> np.ndarray:
        return self.values[np.arange(len(self.targets)), self.best]


def make_objective(kind: str, layer: str, targets, head: Callable | None = None,
                   pre: str | None = None, capped: bool = False) -> Objective:
    """'channel', 'neg' or 'class' objective on `layer` for per-image `targets`. With
    `pre` (the input of a ReLU-like `layer`): 'channel' redirects the gradient of dead
    channels to it, and 'neg' minimises it (a ReLU output has no negative direction)."""
    if kind == "channel":
        return channel(layer, targets, pre, capped)
    if kind == "neg":
        return negative(channel(pre or layer, targets))
    if kind == "class":
        return class_logit(layer, targets, head)
    raise PipelineError(f"filters.objective={kind} is unknown: use {' or '.join(OBJECTIVES)}")


def preactivation(model: keras.Model, layer: str) -> str | None:
    """The layer feeding `layer` when `layer` is a separate ReLU-like activation, else None."""
    return _activation(model, layer)[0]


def is_capped(model: keras.Model, layer: str) -> bool:
    """Whether `layer` is a ReLU with a ceiling (ReLU6: MobileNet's activation)."""
    return _activation(model, layer)[1]


def has_capped_relu(model: keras.Model) -> bool:
    """Whether any activation of `model` is a ReLU with a ceiling (ReLU(max_value), relu6)."""
    from pipeline.graph import flat_layers

    for node in flat_layers(model):
        op = node.layer
        if isinstance(op, keras.layers.ReLU) and op.max_value is not None:
            return True
        if getattr(getattr(op, "activation", None), "__name__", "") == "relu6":  # Activation or a conv's own
            return True
    return False


def _activation(model: keras.Model, layer: str) -> tuple[str | None, bool]:
    from pipeline.graph import flat_layers

    node = next((n for n in flat_layers(model) if n.name == layer), None)
    if node is None or len(node.inputs) != 1:
        return None, False
    op = node.layer
    if isinstance(op, keras.layers.ReLU):
        return node.inputs[0], op.max_value is not None
    if isinstance(op, (keras.layers.LeakyReLU, keras.layers.ELU)):
        return node.inputs[0], False
    activation = getattr(getattr(op, "activation", None), "__name__", "")
    if isinstance(op, keras.layers.Activation) and activation in ("relu", "relu6", "elu", "selu", "gelu",
                                                                  "silu", "swish", "leaky_relu"):
        return node.inputs[0], activation == "relu6"
    return None, False


def extend(images: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """(B, s, s, C) float images in [0, 1] -> (B, height, width, C): 'tile' repeats the
    (periodic) image around its centred copy, 'resize' scales it bilinearly."""
    s = images.shape[1]
    height, width = size
    if (s, s) == (height, width):
        return images
    if mode == "tile" and min(height, width) >= s:
        pad = [(0, 0)] + [((n - s) // 2, n - s - (n - s) // 2) for n in (height, width)] + [(0, 0)]
        return np.pad(images, pad, mode="wrap")
    return tf.image.resize(images, (height, width), method="bilinear", antialias=True).numpy()


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def filter_patterns(model: keras.Model, spec: Preprocessing, layer: str, targets: Iterable[int], *,
                    objective: str = "channel", recipe: Recipe = Recipe(), repeats: int = 1,
                    batch: int = 16, head: Callable | None = None, progress=True,
                    description: str = "") -> Patterns:
    """Optimise one image per (target, repeat) for the objective on `layer`, `batch`
    images at a time, and evaluate each stored uint8 image at the model's input size.

    objective: 'channel' (mean activation of channel t), 'neg' (its opposite), 'class'
    (logit t; `layer`/`head` from `pipeline.graph.logits_head`). progress: True (a bar of
    its own), False, or a tqdm bar to advance by one per target (all its repeats done).
    """
    recipe.check()
    targets = np.asarray(list(targets), np.int64)
    if targets.size == 0:
        raise PipelineError("no channels to optimise: filters.channels selects none")
    items = [(int(t), r) for t in targets for r in range(repeats)]
    channels_in = spec.channels
    size_in = spec.size
    # optimised on a square that fits the input, then tiled or resized to it
    want = min(recipe.size or min(size_in), min(size_in))
    pre = preactivation(model, layer) if objective in ("channel", "neg") else None
    needed = [layer] if pre is None else [layer, pre]
    features, size = objective_model(model, needed, want)
    evaluate, _ = objective_model(model, needed, None)
    method = recipe.method
    use_transforms = recipe.transforms and method == "fourier"
    transforms = Transforms()
    b = max(1, min(batch, len(items)))
    b = math.ceil(len(items) / math.ceil(len(items) / b))  # even batches: little padding in the last

    if method == "fourier":
        param = FourierImage(np.zeros((b, channels_in, size, size // 2 + 1, 2), np.float32),
                             recipe.decay_power, recipe.decorrelate)
    else:
        param = PixelImage(np.zeros((b, size, size, channels_in), np.float32))
    optimizer = Optimizer(param.variable, recipe.learning_rate, method)
    target_var = tf.Variable(np.zeros(b, np.int32), trainable=False)
    obj = make_objective(objective, layer, target_var, head, pre, pre is not None and is_capped(model, layer))
    step = make_step(features, obj, param, optimizer, spec.normalize, use_transforms)

    images = np.zeros((len(items), *size_in, 3), np.uint8)
    values = np.zeros(len(items), np.float32)
    finals = np.zeros(len(items), np.float32)
    logger.info("%s: %d pattern(s) of %s, %s, %d steps at %d px, lr %g, batch %d", description or layer,
                len(items), layer, method, recipe.steps, size, recipe.learning_rate, b)
    own_bar = not hasattr(progress, "update")
    bar = tqdm(total=len(items), desc=description or f"patterns {layer}", unit="pattern",
               disable=not progress) if own_bar else progress
    for start in range(0, len(items), b):
        chunk = items[start:start + b]
        padded = chunk + [chunk[-1]] * (b - len(chunk))  # keep one compiled shape
        rngs = [image_rng(recipe.seed, t, r) for t, r in padded]
        if method == "fourier":
            param.assign(FourierImage.initial(rngs, size, channels_in))
        else:
            param.assign(PixelImage.initial(rngs, size, channels_in))
        matrices = None
        if use_transforms:
            matrices = np.stack([transforms.sample(rng, recipe.steps, size) for rng in rngs], axis=1)
        optimizer.reset()
        target_var.assign(np.asarray([t for t, _ in padded], np.int32))
        score = optimize(step, recipe.steps, matrices, b)
        final = extend(param().numpy(), size_in, recipe.upscale)
        pixels = to_uint8(final)
        value = obj(evaluate(normalize(tf.constant(pixels), spec.normalize))).numpy()
        n = len(chunk)
        if channels_in == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        images[start:start + n] = pixels[:n]
        values[start:start + n] = value[:n]
        finals[start:start + n] = score[:n]
        if own_bar:
            bar.update(n)
        else:  # the caller counts targets
            done_before = start // repeats
            bar.update((start + n) // repeats - done_before)
    if own_bar:
        bar.close()
    shape = (len(targets), repeats)
    return Patterns(targets, images.reshape(shape + images.shape[1:]), values.reshape(shape), size,
                    finals.reshape(shape))


# --------------------------------------------------------------------------- rivals


REFINE_STEPS = 64
REFINE_LR = 0.01
RIVAL_ROUNDS = 12  # each round restarts the channels that a pattern changed in the last one beats
RIVAL_MARGIN = 1e-3  # a rival must beat a channel's own pattern by this fraction (no endless leapfrog)


def strongest_rivals(scores: np.ndarray) -> np.ndarray:
    """scores (N, N): scores[i, k] is target k's objective on pattern i, made for target i.
    Per target, the other pattern that scores it higher than its own does by more than
    RIVAL_MARGIN of its own (the highest such), or -1."""
    n = len(scores)
    own = np.diag(scores)
    best = np.argmax(scores, axis=0)
    beaten = scores[best, np.arange(n)] > own + RIVAL_MARGIN * np.abs(own)
    return np.where(beaten, best, -1)


def channel_scores(evaluate: Callable, spec: Preprocessing, layer: str, images: np.ndarray,
                   channels: np.ndarray, batch: int = 16) -> np.ndarray:
    """(N, len(channels)): the mean of each channel of `layer` over positions, for each
    uint8 image (N, H, W, 3) at the model's input size (the value a pattern reaches);
    `evaluate` from objective_model(model, [layer, ...], None)."""
    out = []
    for start in range(0, len(images), batch):
        pixels = tf.constant(images[start:start + batch, ..., :spec.channels])
        out.append(_spatial_mean(evaluate(normalize(pixels, spec.normalize))[layer]).numpy()[:, channels])
    return np.concatenate(out).astype(np.float32)


class Climber:
    """Plain gradient ascent at the input size, no transformations, from given images:
    one compiled step for every call."""

    def __init__(self, model: keras.Model, spec: Preprocessing, layer: str, batch: int = 16,
                 steps: int = REFINE_STEPS, lr: float = REFINE_LR):
        pre = preactivation(model, layer)
        self.spec, self.layer, self.batch, self.steps = spec, layer, batch, steps
        self.features, _ = objective_model(model, [layer] if pre is None else [layer, pre], None)
        self.param = PixelImage(np.zeros((batch, *spec.size, spec.channels), np.float32))
        self.optimizer = Optimizer(self.param.variable, lr, "plain")
        self.targets = tf.Variable(np.zeros(batch, np.int32), trainable=False)
        self.objective = channel(layer, self.targets, pre, pre is not None and is_capped(model, layer))
        self.step = make_step(self.features, self.objective, self.param, self.optimizer, spec.normalize, False)

    def scores(self, images: np.ndarray, channels: np.ndarray) -> np.ndarray:
        return channel_scores(self.features, self.spec, self.layer, images, channels, self.batch)

    def climb(self, channels: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """On channel channels[i] from the uint8 image starts[i]: per image the best it
        passed through (uint8, RGB; the start where no step beat it) and its value."""
        b, spec = self.batch, self.spec
        images = np.array(starts, np.uint8, copy=True)
        values = np.zeros(len(starts), np.float32)
        for start in range(0, len(starts), b):
            rows = np.arange(start, min(start + b, len(starts)))
            padded = np.concatenate([rows, np.full(b - len(rows), rows[-1])])
            best = starts[padded, ..., :spec.channels].astype(np.float32) / 255.0
            self.param.assign(best)
            self.optimizer.reset()
            self.targets.assign(np.asarray(channels[padded], np.int32))
            best_score = np.full(b, -np.inf, np.float32)
            for _ in range(self.steps + 1):
                before = self.param.variable.numpy()
                score = self.step(tf.zeros((b, 8), tf.float32)).numpy()  # the score of `before`
                up = score > best_score
                best[up], best_score[up] = before[up], score[up]
            pixels = to_uint8(best)
            value = self.objective(self.features(normalize(tf.constant(pixels), spec.normalize))).numpy()
            if spec.channels == 1:
                pixels = np.repeat(pixels, 3, axis=-1)
            images[rows] = pixels[:len(rows)]
            values[rows] = value[:len(rows)]
        return images, values


def outdo_rivals(model: keras.Model, spec: Preprocessing, layer: str, channels: np.ndarray, images: np.ndarray,
                 values: np.ndarray, rounds: int = RIVAL_ROUNDS, batch: int = 16) -> np.ndarray:
    """Where another pattern of the layer excites a channel more than the channel's own
    does (gradient ascent stopped at a local maximum), climb again from that pattern.
    Changes images and values in place; returns per channel the channel whose pattern
    it climbed from last (-1: its own). A channel that cannot climb above its rival's
    pattern keeps a copy of it: the two share a pattern."""
    n = len(channels)
    climber = Climber(model, spec, layer, max(1, min(batch, n)))
    diagonal = (np.arange(n), np.arange(n))
    started_from = np.full(n, -1, np.int64)
    scores = climber.scores(images, channels)
    for _ in range(rounds):
        scores[diagonal] = values  # the stored values decide
        rivals = strongest_rivals(scores)
        todo = np.flatnonzero(rivals >= 0)
        if not todo.size:
            break
        new_images, new_values = climber.climb(channels[todo], images[rivals[todo]])
        better = new_values > values[todo]
        changed = todo[better]
        if not changed.size:
            break
        started_from[changed] = channels[rivals[changed]]
        images[changed], values[changed] = new_images[better], new_values[better]
        scores[changed] = climber.scores(images[changed], channels)
    return started_from
