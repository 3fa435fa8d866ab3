"""Activation maximisation (pipeline.patterns): parameterisation, transforms, objectives,
the update rules, and known answers on hand-set and trained-from-scratch models."""

import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import patterns as P
from pipeline.errors import PipelineError
from pipeline.graph import feature_model, logits_head
from pipeline.preprocess import Preprocessing, normalize

L = keras.layers
FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- parameterisation


def test_fourier_image_is_the_inverse_fft_of_the_scaled_spectrum():
    rngs = [np.random.default_rng(i) for i in range(2)]
    init = P.FourierImage.initial(rngs, 12, 3, sd=0.5)
    param = P.FourierImage(init)
    spectrum = init[..., 0] + 1j * init[..., 1]
    scale = np.zeros((12, 7))
    for y in range(12):
        for x in range(7):
            f = math.hypot(min(y, 12 - y) / 12, x / 12)
            scale[y, x] = 12 / max(f, 1 / 12)
    linear = np.fft.irfft2(spectrum * scale, s=(12, 12)).transpose(0, 2, 3, 1) / 4
    np.testing.assert_allclose(param.linear().numpy(), linear, rtol=1e-4, atol=1e-5)
    basis = P.COLOR_CORRELATION_SQRT / np.linalg.norm(P.COLOR_CORRELATION_SQRT, axis=0).max()
    expected = 1 / (1 + np.exp(-(linear @ basis.T)))
    image = param().numpy()
    np.testing.assert_allclose(image, expected, rtol=1e-4, atol=1e-5)
    assert image.min() > 0 and image.max() < 1


def test_fourier_image_tiles_without_a_seam():
    param = P.FourierImage(P.FourierImage.initial([np.random.default_rng(3)], 16, 3, sd=0.3))
    image = param().numpy()
    big = P.extend(image, (40, 40), "tile")
    before = (40 - 16) // 2
    yy, xx = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    np.testing.assert_array_equal(big[0], image[0][(yy - before) % 16, (xx - before) % 16])
    wide = P.extend(image, (20, 37), "tile")  # a non-square input: each axis wraps on its own
    yy, xx = np.meshgrid(np.arange(20), np.arange(37), indexing="ij")
    np.testing.assert_array_equal(wide[0], image[0][(yy - 2) % 16, (xx - 10) % 16])
    # periodic: the jump across the wrap is no larger than between ordinary neighbours
    wrap = np.abs(image[0, 0] - image[0, -1]).mean()
    inner = np.abs(np.diff(image[0], axis=0)).mean()
    assert wrap < 2 * inner
    resized = P.extend(image, (40, 40), "resize")
    assert resized.shape == (1, 40, 40, 3) and P.extend(image, (24, 40), "resize").shape == (1, 24, 40, 3)


def test_grey_models_get_one_channel_without_colour_mixing():
    param = P.FourierImage(P.FourierImage.initial([np.random.default_rng(0)], 8, 1, sd=0.5))
    np.testing.assert_allclose(param().numpy(), 1 / (1 + np.exp(-param.linear().numpy())), rtol=1e-5)


# ---------------------------------------------------------------- transforms


def _warp(image, t1=(0, 0), scale=1.0, angle=0.0, t2=(0, 0), fill=0.5):
    m = P.affine_matrices(image.shape[1], np.asarray([t1], float), np.asarray([scale]), np.asarray([angle]),
                          np.asarray([t2], float))
    return P.warp(tf.constant(image, tf.float32), tf.constant(m), fill).numpy()


def test_warp_identity_shift_and_quarter_turn_are_exact():
    image = np.random.default_rng(0).random((1, 9, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(_warp(image), image, atol=1e-6)
    # translate by (x +2, y -1) in two parts: content moves, grey comes in
    shifted = _warp(image, t1=(1, 0), t2=(1, -1))
    expected = np.full_like(image, 0.5)
    expected[0, 0:8, 2:9] = image[0, 1:9, 0:7]
    np.testing.assert_allclose(shifted, expected, atol=1e-6)
    turned = _warp(image, angle=np.pi / 2)
    np.testing.assert_allclose(turned[0], np.rot90(image[0], k=-1), atol=1e-5)


def test_transforms_are_seeded_bounded_and_per_image():
    t = P.Transforms()
    a = t.sample(P.image_rng(7, 3, 0), 50, 128)
    np.testing.assert_array_equal(a, t.sample(P.image_rng(7, 3, 0), 50, 128))
    assert not np.array_equal(a, t.sample(P.image_rng(7, 4, 0), 50, 128))
    scale = 1 / np.sqrt(a[:, 0] * a[:, 4] - a[:, 1] * a[:, 3])
    assert scale.min() >= 0.9 - 1e-6 and scale.max() <= 1.1 + 1e-6
    angle = np.degrees(np.arctan2(a[:, 1], a[:, 0]))
    assert np.abs(angle).max() <= 10 + 1e-4 and len(np.unique(np.round(angle))) > 5
    # where does the centre go: at most pad + jitter + jitter2 (scaled by the rotation)
    c = 127 / 2
    moved = np.hypot(a[:, 0] * c + a[:, 1] * c + a[:, 2] - c, a[:, 3] * c + a[:, 4] * c + a[:, 5] - c)
    assert moved.max() <= math.hypot(20, 20) + 1.1 * math.hypot(4, 4) + 1e-3


# ---------------------------------------------------------------- objectives and update rules


def test_channel_objective_takes_each_images_own_channel_and_composes():
    rng = np.random.default_rng(0)
    act = tf.constant(rng.normal(size=(3, 4, 5, 6)), tf.float32)
    vec = tf.constant(rng.normal(size=(3, 6)), tf.float32)
    outputs = {"a": act, "v": vec}
    a = P.channel("a", [5, 0, 2])
    expected = act.numpy().mean(axis=(1, 2))[[0, 1, 2], [5, 0, 2]]
    np.testing.assert_allclose(a(outputs).numpy(), expected, rtol=1e-6)
    v = P.channel("v", [1, 1, 4])
    np.testing.assert_allclose(v(outputs).numpy(), vec.numpy()[[0, 1, 2], [1, 1, 4]], rtol=1e-6)
    combo = a - 2 * v
    assert set(combo.layers) == {"a", "v"}
    np.testing.assert_allclose(combo(outputs).numpy(), expected - 2 * vec.numpy()[[0, 1, 2], [1, 1, 4]], rtol=1e-5)
    np.testing.assert_allclose(P.negative(a)(outputs).numpy(), -expected, rtol=1e-6)
    targets = tf.Variable([0, 0, 0])
    moving = P.channel("a", targets)
    targets.assign([1, 2, 3])  # a compiled step sees new targets without a new trace
    np.testing.assert_allclose(moving(outputs).numpy(), act.numpy().mean(axis=(1, 2))[[0, 1, 2], [1, 2, 3]],
                               rtol=1e-6)


def test_dead_relu_channel_gets_the_preactivation_gradient():
    z = tf.Variable(np.full((2, 3, 3, 2), -1.0, np.float32))
    with tf.GradientTape() as tape:
        outputs = {"relu": tf.nn.relu(z), "conv": z}
        score = P.channel("relu", [0, 1], pre="conv")(outputs)
        total = tf.reduce_sum(score)
    np.testing.assert_array_equal(score.numpy(), [0, 0])  # the value is the ReLU's
    grad = tape.gradient(total, z).numpy()
    np.testing.assert_allclose(grad[0, ..., 0], 1 / 9)  # but the gradient climbs the pre-activation
    np.testing.assert_allclose(grad[0, ..., 1], 0)
    np.testing.assert_allclose(grad[1, ..., 1], 1 / 9)


def test_relu6_gradient_ignores_the_cap_but_the_value_keeps_it():
    z = tf.Variable(np.array([[[[7.0], [1.0]], [[-1.0], [9.0]]]], np.float32))  # (1, 2, 2, 1)
    with tf.GradientTape() as tape:
        outputs = {"relu6": tf.nn.relu6(z), "bn": z}
        score = P.channel("relu6", [0], pre="bn", capped=True)(outputs)
    np.testing.assert_allclose(score.numpy(), [(6 + 1 + 0 + 6) / 4])
    np.testing.assert_allclose(tape.gradient(score, z).numpy().ravel(), [0.25, 0.25, 0, 0.25])


def test_capped_relus_are_recognised():
    inp = keras.Input((8, 8, 3))
    z = L.Conv2D(2, 3, name="conv")(inp)
    model = keras.Model(inp, [L.ReLU(6.0, name="r6")(z), L.Activation("relu6", name="a6")(z),
                              L.ReLU(name="r")(z)])
    assert [P.preactivation(model, n) for n in ("r6", "a6", "r", "conv")] == ["conv", "conv", "conv", None]
    assert [P.is_capped(model, n) for n in ("r6", "a6", "r", "conv")] == [True, True, False, False]


def test_strongest_rivals_are_the_other_patterns_that_beat_a_channels_own():
    scores = np.array([[1.0, 5.0, 0.0],
                       [2.0, 4.0, 3.0],
                       [1.5, 4.0, 2.0]])  # scores[i, k]: channel k on pattern i
    # channel 0: pattern 1 (2.0) beats its own 1.0, more than pattern 2 does; channel 1:
    # pattern 0 beats 4.0; channel 2: pattern 1 beats 2.0
    np.testing.assert_array_equal(P.strongest_rivals(scores), [1, 0, 1])
    np.testing.assert_array_equal(P.strongest_rivals(np.diag([1.0, 1.0]) + 0.5), [-1, -1])
    # a rival within RIVAL_MARGIN does not count: no endless leapfrog over rounding
    np.testing.assert_array_equal(P.strongest_rivals(np.array([[1.0, 0.0], [1.0 + 1e-5, 1.0]])), [-1, -1])


def test_class_logit_is_the_input_of_the_softmax():
    inp = keras.Input((6,))
    out = L.Dense(4, activation="softmax", name="probs")(L.Dense(5, name="hidden")(inp))
    model = keras.Model(inp, out)
    layer, head = logits_head(model)
    assert layer == "hidden" and head is not None
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    hidden = feature_model(model, ["hidden"])(x).numpy()
    kernel, bias = model.get_layer("probs").get_weights()
    logits = hidden @ kernel + bias
    score = P.class_logit(layer, [3, 0, 2], head)({"hidden": tf.constant(hidden)}).numpy()
    np.testing.assert_allclose(score, logits[[0, 1, 2], [3, 0, 2]], rtol=1e-5)
    separate = keras.Model(inp, L.Softmax(name="sm")(L.Dense(4, name="logits")(inp)))
    assert logits_head(separate) == ("logits", None)
    plain = keras.Model(inp, L.Dense(4, name="out")(inp))
    assert logits_head(plain) == ("out", None)


def test_plain_step_is_the_tutorials_normalised_gradient_ascent():
    # mean over positions of a 1x1 convolution: d score / d pixel = w_c / (H W), constant
    w = np.array([0.5, -1.0, 2.0], np.float32)
    inp = keras.Input((4, 4, 3))
    model = keras.Model(inp, L.Conv2D(1, 1, use_bias=False, name="c")(inp))
    model.get_layer("c").set_weights([w.reshape(1, 1, 3, 1)])
    start = np.full((1, 4, 4, 3), 0.5, np.float32)
    param = P.PixelImage(start)
    opt = P.Optimizer(param.variable, 0.1, "plain")
    features, size = P.objective_model(model, ["c"], None)
    step = P.make_step(features, P.channel("c", [0]), param, opt, "unit", warped=False)
    P.optimize(step, 1, batch=1)
    expected = np.clip(0.5 + 0.1 * w / np.sqrt(np.mean(w ** 2)), 0, 1)
    np.testing.assert_allclose(param.variable.numpy()[0], np.broadcast_to(expected, (4, 4, 3)), rtol=1e-4)


def test_adam_first_step_moves_every_variable_by_the_learning_rate():
    var = tf.Variable(np.zeros((1, 5), np.float32))
    opt = P.Optimizer(var, 0.05, "fourier")
    opt.apply(var, tf.constant([[3.0, -0.001, 10.0, -7.0, 0.5]]))
    np.testing.assert_allclose(var.numpy(), [[0.05, -0.05, 0.05, -0.05, 0.05]], rtol=1e-4)


def test_model_runs_at_another_size_with_the_same_weights():
    rng = np.random.default_rng(1)
    inp = keras.Input((32, 32, 3))
    x = L.Conv2D(4, 3, strides=2, padding="same", name="c1")(inp)
    x = L.ReLU(name="r1")(x)
    out = L.Dense(2, name="d")(L.GlobalAveragePooling2D(name="g")(x))
    model = keras.Model(inp, out)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    features, size = P.objective_model(model, ["r1", "d"], 20)
    assert size == 20
    inp20 = keras.Input((20, 20, 3))
    y = L.Conv2D(4, 3, strides=2, padding="same")(inp20)
    ref = keras.Model(inp20, [L.ReLU()(y), L.Dense(2)(L.GlobalAveragePooling2D()(L.ReLU()(y)))])
    ref.set_weights(model.get_weights())
    x20 = rng.random((2, 20, 20, 3)).astype(np.float32)
    got = features(tf.constant(x20))
    want = ref(x20)
    np.testing.assert_allclose(got["r1"].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["d"].numpy(), want[1].numpy(), rtol=1e-5, atol=1e-6)
    # a Flatten ties the model to its size: optimise at the input size instead
    flat = keras.Model(inp, L.Dense(2, name="d2")(L.Flatten()(x)))
    _, size = P.objective_model(flat, ["d2"], 20)
    assert size == 32


def test_bad_recipe_is_one_clear_line():
    for recipe, word in [(P.Recipe(method="dream"), "filters.method"), (P.Recipe(steps=0), "filters.steps"),
                         (P.Recipe(upscale="x"), "filters.upscale"), (P.Recipe(lr=-1.0), "filters.lr")]:
        with pytest.raises(PipelineError) as err:
            recipe.check()
        assert word in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- known answers


ANGLES = (0.0, 45.0, 90.0, 135.0)
PERIOD = 6.0


def edge_model(size=32):
    """One 7x7 convolution + ReLU; filter k is an odd Gabor (an edge/grating detector)
    whose luminance gradient points at ANGLES[k] degrees, the same on R, G and B."""
    inp = keras.Input((size, size, 3))
    x = L.Conv2D(len(ANGLES), 7, name="conv")(inp)
    model = keras.Model(inp, L.ReLU(name="relu")(x))
    r = np.arange(7) - 3
    yy, xx = np.meshgrid(r, r, indexing="ij")
    kernel = np.zeros((7, 7, 3, len(ANGLES)), np.float32)
    for k, a in enumerate(np.radians(ANGLES)):
        u = xx * np.cos(a) + yy * np.sin(a)
        g = np.sin(2 * np.pi * u / PERIOD) * np.exp(-(xx ** 2 + yy ** 2) / (2 * 2.0 ** 2))
        kernel[:, :, :, k] = (g / np.abs(g).sum())[:, :, None]
    model.get_layer("conv").set_weights([kernel, np.zeros(len(ANGLES), np.float32)])
    return model


def dominant_orientation(image: np.ndarray) -> tuple[float, float]:
    """(direction of the luminance gradient in degrees mod 180, coherence 0..1) of an
    image, from its structure tensor (gradients averaged as doubled angles)."""
    grey = image.astype(np.float64).mean(axis=-1)
    gy, gx = np.gradient(grey)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    angle = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy)) % 180
    coherence = np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy)
    return float(angle), float(coherence)


def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % 180
    return min(d, 180 - d)


def channel_means(model, layer, spec, images) -> np.ndarray:
    out = feature_model(model, [layer])(normalize(tf.constant(images), spec.normalize)).numpy()
    return out.mean(axis=(1, 2))


@pytest.fixture(scope="module")
def edge_patterns():
    model = edge_model()
    spec = Preprocessing(height=32, width=32, channels=3, resize="exact", normalize="unit")
    result = P.filter_patterns(model, spec, "relu", range(4), recipe=P.Recipe(steps=96, size=None, seed=3),
                               batch=4, progress=False)
    return model, spec, result


def test_edge_filter_patterns_have_the_filters_orientation(edge_patterns):
    model, spec, result = edge_patterns
    assert result.images.shape == (4, 1, 32, 32, 3) and result.images.dtype == np.uint8
    for k, angle in enumerate(ANGLES):
        found, coherence = dominant_orientation(result.best_images[k])
        assert angle_error(found, angle) <= 15 and coherence > 0.3, (k, found, coherence)


def test_each_pattern_excites_its_own_channel_most(edge_patterns):
    model, spec, result = edge_patterns
    acts = channel_means(model, "relu", spec, result.best_images)  # (pattern, channel)
    np.testing.assert_allclose(np.diag(acts), result.best_values, rtol=1e-4)  # the stored value
    rng = np.random.default_rng(0)
    noise = (rng.random((16, 32, 32, 3)) * 255).astype(np.uint8)
    random_acts = channel_means(model, "relu", spec, noise)
    for k in range(4):
        others = np.delete(acts[:, k], k)
        assert acts[k, k] > 1.3 * others.max(), (k, acts[:, k])
        assert acts[k, k] > 5 * random_acts[:, k].max(), (k, acts[k, k], random_acts[:, k].max())


def test_plain_gradient_ascent_finds_the_orientation_too():
    model = edge_model()
    spec = Preprocessing(height=32, width=32, channels=3, resize="exact", normalize="unit")
    result = P.filter_patterns(model, spec, "relu", [1, 3], recipe=P.Recipe(method="plain", steps=40, size=None),
                               batch=2, progress=False)
    for k, angle in enumerate((ANGLES[1], ANGLES[3])):
        found, coherence = dominant_orientation(result.best_images[k])
        assert angle_error(found, angle) <= 15 and coherence > 0.3, (k, found, coherence)


def test_patterns_are_reproducible_and_independent_of_the_batch(edge_patterns):
    model, spec, result = edge_patterns
    again = P.filter_patterns(model, spec, "relu", [2, 3], recipe=P.Recipe(steps=96, size=None, seed=3),
                              batch=1, progress=False)
    # same seed, other batch size and other batch companions: the same images
    diff = np.abs(again.best_images.astype(int) - result.best_images[2:].astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 8
    twice = P.filter_patterns(model, spec, "relu", [2, 3], recipe=P.Recipe(steps=96, size=None, seed=3),
                              batch=1, progress=False)
    np.testing.assert_array_equal(twice.images, again.images)
    other = P.filter_patterns(model, spec, "relu", [2], recipe=P.Recipe(steps=96, size=None, seed=4),
                              batch=1, progress=False)
    assert np.abs(other.best_images.astype(int) - again.best_images[:1].astype(int)).mean() > 5
    still = P.filter_patterns(model, spec, "relu", [2], recipe=P.Recipe(steps=96, size=None, seed=3,
                                                                        transforms=False), progress=False)
    assert np.abs(still.best_images.astype(int) - again.best_images[:1].astype(int)).mean() > 5  # transforms act


def colour_model():
    """3x3 convolution + ReLU; channel k sums colour k over the window (a red, a green and
    a blue detector), zero bias."""
    inp = keras.Input((16, 16, 3))
    model = keras.Model(inp, L.ReLU(name="relu")(L.Conv2D(3, 3, name="conv")(inp)))
    kernel = np.zeros((3, 3, 3, 3), np.float32)
    for k in range(3):
        kernel[:, :, k, k] = 1 / 9
    model.get_layer("conv").set_weights([kernel, np.zeros(3, np.float32)])
    return model


def test_positive_and_negative_directions_of_colour_detectors():
    model = colour_model()
    spec = Preprocessing(height=16, width=16, channels=3, resize="exact", normalize="torch")
    recipe = P.Recipe(steps=64, size=None, lr=0.2)
    pos = P.filter_patterns(model, spec, "relu", range(3), recipe=recipe, progress=False)
    neg = P.filter_patterns(model, spec, "relu", range(3), objective="neg", recipe=recipe, progress=False)
    colour_pos = pos.best_images.reshape(3, -1, 3).mean(axis=1)  # (pattern, rgb)
    colour_neg = neg.best_images.reshape(3, -1, 3).mean(axis=1)
    # the decorrelated colour basis moves brightness fastest, but the own colour leads
    for k in range(3):
        assert np.argmax(colour_pos[k]) == k and colour_pos[k, k] > 180, (k, colour_pos[k])
        assert np.argmin(colour_neg[k]) == k and colour_neg[k, k] < 60, (k, colour_neg[k])
    # without the colour basis the answer is the pure colour
    pure = P.filter_patterns(model, spec, "relu", range(3), recipe=P.Recipe(steps=64, size=None, lr=0.2,
                                                                         decorrelate=False), progress=False)
    colour_pure = pure.best_images.reshape(3, -1, 3).mean(axis=1)
    for k in range(3):
        assert colour_pure[k, k] > 170 and np.delete(colour_pure[k], k).max() < 140, (k, colour_pure[k])
    # the negative value is minus the mean of the pre-activation (the ReLU output has no negative side)
    pre = feature_model(model, ["conv"])(normalize(tf.constant(neg.best_images), "torch")).numpy().mean(axis=(1, 2))
    np.testing.assert_allclose(neg.best_values, -np.diag(pre), rtol=1e-4)
    # (0 - mean) / std is about -2 for every colour; each pattern lowers its own channel most
    assert (np.diag(pre) < -1.2).all() and (np.argmin(pre, axis=1) == np.arange(3)).all(), pre


def test_the_stored_image_is_the_one_the_network_saw():
    # no transformations, optimised at the input size: the score of the last step (the
    # float image inside the tape, through the model's normalisation) is the value of the
    # stored uint8 image up to rounding and the last small update
    model = colour_model()
    spec = Preprocessing(height=16, width=16, channels=3, resize="exact", normalize="torch")
    result = P.filter_patterns(model, spec, "relu", range(3), recipe=P.Recipe(steps=48, size=None, transforms=False),
                               progress=False)
    np.testing.assert_allclose(result.final_scores, result.values, rtol=0.03)
    assert (result.values > 0.3).all()


def test_seeds_give_several_patterns_and_the_best_is_picked(edge_patterns):
    model, spec, _ = edge_patterns
    result = P.filter_patterns(model, spec, "relu", [0], recipe=P.Recipe(steps=12, size=None), repeats=3,
                               progress=False)
    assert result.images.shape == (1, 3, 32, 32, 3)
    assert len({result.images[0, r].tobytes() for r in range(3)}) == 3
    assert result.best_values[0] == result.values[0].max()


@pytest.fixture(scope="module")
def fashion_model():
    """A small convnet trained for two epochs on 3000 Fashion-MNIST images."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
    from pipeline.datasets import read_idx

    keras.utils.set_random_seed(0)
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:3000, :, :, None]
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:3000].astype(np.int64)
    inp = keras.Input((28, 28, 1))
    x = L.ReLU(name="relu1")(L.Conv2D(16, 5, name="conv1")(inp))
    x = L.MaxPooling2D(2, name="pool1")(x)
    x = L.Conv2D(16, 3, name="conv2")(x)
    x = L.MaxPooling2D(2, name="pool2")(L.ReLU(name="relu2")(x))
    out = L.Dense(10, name="logits")(L.Flatten(name="flat")(x))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(images / 255.0, labels, epochs=2, batch_size=64, verbose=0)
    assert history.history["accuracy"][-1] > 0.65  # it learned something
    return model, images


def test_trained_from_scratch_model_patterns_beat_real_and_random_images(fashion_model):
    model, images = fashion_model
    spec = Preprocessing(height=28, width=28, channels=1, resize="exact", normalize="unit")
    result = P.filter_patterns(model, spec, "conv2", range(16), recipe=P.Recipe(), batch=16, progress=False)
    assert result.images.shape == (16, 1, 28, 28, 3) and result.optimised_size == 28
    assert (result.best_images[..., 0] == result.best_images[..., 2]).all()  # grey, stored as RGB
    acts = channel_means(model, "conv2", spec, result.best_images[..., :1])  # (pattern, channel)
    np.testing.assert_allclose(np.diag(acts), result.best_values, rtol=1e-4)
    noise = (np.random.default_rng(1).random((32, 28, 28, 1)) * 255).astype(np.uint8)
    random_acts = channel_means(model, "conv2", spec, noise)
    real = images[:500]
    real_acts = channel_means(model, "conv2", spec, real)
    # channels that respond almost alike over real images may share a pattern
    maps = feature_model(model, ["conv2"])(real / 255.0).numpy().reshape(-1, 16)
    twins = np.corrcoef(maps.T) > 0.9
    for k in range(16):
        spread = random_acts[:, k].std()
        assert acts[k, k] > random_acts[:, k].max() and acts[k, k] - random_acts[:, k].mean() > 5 * spread, k
        assert acts[k, k] > real_acts[:, k].max(), k  # above the best of 500 real images
        for j in range(16):
            if j != k:
                assert acts[k, k] > (0.95 if twins[j, k] else 1.0) * acts[j, k], (k, j, acts[:, k])


@pytest.mark.parametrize("layer", ["relu1", "relu2"])
def test_first_and_middle_layer_patterns_excite_their_own_channel_most(fashion_model, layer):
    model, _ = fashion_model
    spec = Preprocessing(height=28, width=28, channels=1, resize="exact", normalize="unit")
    channels = np.arange(16)
    result = P.filter_patterns(model, spec, layer, channels, recipe=P.Recipe(), batch=16, progress=False)
    images, values = result.best_images.copy(), result.best_values.copy()
    started_from = P.outdo_rivals(model, spec, layer, channels, images, values)
    acts = channel_means(model, layer, spec, images[..., :1])  # (pattern, channel)
    np.testing.assert_allclose(np.diag(acts), values, rtol=1e-4)  # the values are the stored images'
    assert (values >= result.best_values).all()  # climbing again only ever raises a value
    for k in channels:  # at least as much as any other channel's pattern (equal where they share one)
        assert acts[k, k] >= (1 - P.RIVAL_MARGIN) * np.delete(acts[:, k], k).max(), (layer, k, acts[:, k])
    assert started_from.min() >= -1 and started_from.max() < 16
