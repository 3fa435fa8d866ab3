"""pipeline.backprop: plain gradient, guided backprop and deconvnet on real Keras models
with hand-set weights, against hand-computed values and tf.GradientTape."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.backprop import Backprop, backprop, seed_at
from pipeline.render.draw import panel_to_uint8
from pipeline.graph import feature_model


def tape_gradient(fn, x, seed):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        score = tf.reduce_sum(fn(x) * seed)
    return tape.gradient(score, x).numpy()


def random_weights(model, seed):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def branchy_model():
    """Branches (Add, Concatenate), max pooling, ReLU6, LeakyReLU, a fused ReLU and a
    nested backbone."""
    inner_in = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inner_in)
    h = keras.layers.ReLU(max_value=6.0, name="relu6")(h)
    backbone = keras.Model(inner_in, h, name="backbone")
    inp = keras.Input((12, 12, 3))
    side = keras.layers.Conv2D(4, 1, name="side")(inp)
    m = keras.layers.Add(name="add")([backbone(inp), side])
    m = keras.layers.MaxPooling2D(2, name="pool")(m)
    m = keras.layers.LeakyReLU(negative_slope=0.1, name="leaky")(m)
    m = keras.layers.Concatenate(name="cat")([m, keras.layers.Activation("relu", name="act")(m)])
    out = keras.layers.Dense(3, name="logits")(keras.layers.Flatten(name="flat")(m))
    return random_weights(keras.Model(inp, out, name="branchy"), 7), backbone


@pytest.fixture(scope="module")
def branchy():
    return branchy_model()


@pytest.mark.parametrize("layer", ["backbone/conv", "backbone/relu6", "cat", "logits"])
def test_gradient_equals_gradient_tape_on_the_original_model(branchy, layer):
    model, backbone = branchy
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 12, 12, 3)).astype(np.float32)
    program = Backprop(model, layer, "gradient")
    seed = rng.normal(size=(3,) + program.output_shape).astype(np.float32)
    if layer == "logits":
        reference = tape_gradient(model, x, seed)
    elif layer.startswith("backbone/"):  # the nested model on its own
        inner = feature_model(backbone, layer.split("/")[1])
        reference = tape_gradient(inner, x, seed)
    else:
        reference = tape_gradient(feature_model(model, layer), x, seed)
    got = backprop(model, x, layer, seed, "gradient").numpy()
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
    assert np.abs(reference).max() > 0.1


def test_rebuilt_forward_equals_the_model(branchy):
    model, _ = branchy
    x = np.random.default_rng(2).normal(size=(2, 12, 12, 3)).astype(np.float32)
    for method in ("guided", "deconv"):
        np.testing.assert_allclose(Backprop(model, "logits", method).outputs(x), model(x), rtol=1e-5, atol=1e-5)


# ---- hand-built 1-D network: x (1, 3, 1) -> 1x1 conv [+1, -1] -> ReLU -> (1, 3) conv -> one unit

X = np.array([2.0, -1.0, 3.0], np.float32)
UP = np.array([1.0, -1.0], np.float32)  # the 1x1 convolution: channel 0 = x, channel 1 = -x
V = np.array([[1.0, 3.0], [-2.0, 4.0], [-0.5, -1.0]], np.float32)  # (tap, channel) of the top conv


def line_model(form: str, max_value=None, slope=0.0):
    """The 1-D network with its ReLU written in one of the ways Keras allows."""
    inp = keras.Input((1, 3, 1))
    fused = "relu" if form == "fused" else None
    z = keras.layers.Conv2D(2, 1, use_bias=False, activation=fused, name="up")(inp)
    if form == "layer":
        a = keras.layers.ReLU(max_value=max_value, negative_slope=slope, name="nl")(z)
    elif form == "activation":
        a = keras.layers.Activation("relu", name="nl")(z)
    elif form == "ops":
        a = keras.ops.relu(z)
    elif form == "leaky":
        a = keras.layers.LeakyReLU(negative_slope=slope, name="nl")(z)
    else:
        a = z
    out = keras.layers.Conv2D(1, (1, 3), use_bias=False, name="top")(a)
    model = keras.Model(inp, out)
    model.get_layer("up").set_weights([UP.reshape(1, 1, 1, 2)])
    model.get_layer("top").set_weights([V.reshape(1, 3, 2, 1)])
    return model


def by_hand(x, method, max_value=None, slope=0.0):
    """d top / d x under each rule, written out with numpy."""
    z = x[:, None] * UP[None, :]  # (3 taps, 2 channels)
    g = V  # the top conv's backward signal at the ReLU outputs
    active = (z > 0) & (z < (np.inf if max_value is None else max_value))
    local = np.where(active, 1.0, np.where(z > 0, 0.0, slope))  # the unit's derivative
    if method == "gradient":
        gz = g * local
    elif method == "guided":
        gz = np.maximum(g, 0) * local
    else:  # deconv: rectify the signal, forward ignored
        gz = np.where(g > 0, g, slope * g)
    return gz @ UP  # through the 1x1 conv (transposed)


@pytest.mark.parametrize("form", ["layer", "activation", "fused", "ops"])
def test_guided_and_deconv_by_hand(form):
    model = line_model(form)
    x = X.reshape(1, 1, 3, 1)
    seed = np.ones((1, 1, 1, 1), np.float32)
    got = {m: backprop(model, x, "top", seed, m).numpy().reshape(3) for m in ("gradient", "guided", "deconv")}
    # z = [[2, -2], [-1, 1], [3, -3]]: active units (0, 0), (1, 1), (2, 0); signal V
    np.testing.assert_allclose(got["gradient"], [1.0, -4.0, -0.5])
    # guided drops the active unit (2, 0) whose signal -0.5 is negative
    np.testing.assert_allclose(got["guided"], [1.0, -4.0, 0.0])
    # deconv passes the inactive unit (0, 1) (z = -2) because its signal 3 is positive,
    # and drops every negative signal: [1 - 3, 0 - 4, 0 - 0]
    np.testing.assert_allclose(got["deconv"], [-2.0, -4.0, 0.0])
    for m, values in got.items():
        np.testing.assert_allclose(values, by_hand(X, m), err_msg=m)


def test_relu6_guided_zeroes_the_clipped_region_deconv_rectifies():
    model = line_model("layer", max_value=6.0)
    x = np.array([7.0, -1.0, 3.0], np.float32)  # unit (0, 0) is clipped: z = 7 > 6
    seed = np.ones((1, 1, 1, 1), np.float32)
    got = {m: backprop(model, x.reshape(1, 1, 3, 1), "top", seed, m).numpy().reshape(3)
           for m in ("gradient", "guided", "deconv")}
    np.testing.assert_allclose(got["gradient"], [0.0, -4.0, -0.5])
    np.testing.assert_allclose(got["guided"], [0.0, -4.0, 0.0])
    np.testing.assert_allclose(got["deconv"], [-2.0, -4.0, 0.0])
    for m, values in got.items():
        np.testing.assert_allclose(values, by_hand(x, m, max_value=6.0), err_msg=m)


def test_leaky_relu_keeps_its_slope():
    model = line_model("leaky", slope=0.25)
    seed = np.ones((1, 1, 1, 1), np.float32)
    for method in ("gradient", "guided", "deconv"):
        got = backprop(model, X.reshape(1, 1, 3, 1), "top", seed, method).numpy().reshape(3)
        np.testing.assert_allclose(got, by_hand(X, method, slope=0.25), rtol=1e-6, err_msg=method)
    # deconv: leaky-rectified signal, e.g. tap 2: channel 0 gets 0.25 * -0.5, channel 1 gets 0.25 * -1
    got = backprop(model, X.reshape(1, 1, 3, 1), "top", seed, "deconv").numpy().reshape(3)
    assert got[2] == pytest.approx(0.25 * -0.5 - 0.25 * -1.0)


def test_max_pooling_routes_through_its_switches():
    """conv 3x3 (all ones) -> ReLU -> max pool 2: a pooled unit's map is the 3x3 field of
    the conv unit that won its pooling window, and nothing else."""
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(1, 3, padding="same", use_bias=False, name="conv")(inp)
    h = keras.layers.ReLU(name="relu")(h)
    out = keras.layers.MaxPooling2D(2, name="pool")(h)
    model = keras.Model(inp, out)
    model.get_layer("conv").set_weights([np.ones((3, 3, 1, 1), np.float32)])
    rng = np.random.default_rng(5)
    x = rng.random((1, 8, 8, 1)).astype(np.float32) + 0.1
    conv = feature_model(model, "conv")(x).numpy()[0, ..., 0]
    for py, px in [(0, 0), (1, 2), (3, 3)]:
        window = conv[2 * py:2 * py + 2, 2 * px:2 * px + 2]
        wy, wx = np.unravel_index(np.argmax(window), window.shape)
        cy, cx = 2 * py + wy, 2 * px + wx
        expected = np.zeros((8, 8), bool)
        expected[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2] = True
        seed = seed_at((4, 4, 1), 0, py, px)
        for method in ("gradient", "guided", "deconv"):
            panel = backprop(model, x, "pool", seed, method).numpy()[0, ..., 0]
            np.testing.assert_array_equal(panel != 0, expected, err_msg=f"{method} at {(py, px)}")
            np.testing.assert_allclose(panel[expected], 1.0)


def test_the_original_model_is_untouched(branchy):
    model, backbone = branchy
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    seed = rng.normal(size=(2, 3)).astype(np.float32)
    before_grad = tape_gradient(model, x, seed)
    before_out = model(x).numpy()
    weights = [w.copy() for w in model.get_weights()]
    layers = {layer.name: layer for layer in model.layers + backbone.layers}
    guided = backprop(model, x, "logits", seed, "guided").numpy()
    deconv = backprop(model, x, "logits", seed, "deconv").numpy()
    assert np.abs(guided - before_grad).max() > 1e-3 and np.abs(deconv - before_grad).max() > 1e-3
    np.testing.assert_array_equal(tape_gradient(model, x, seed), before_grad)
    np.testing.assert_array_equal(model(x).numpy(), before_out)
    for w, saved in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(w, saved)
    assert backbone.get_layer("conv").activation is keras.activations.relu
    assert backbone.get_layer("relu6").max_value == 6.0
    assert {layer.name: layer for layer in model.layers + backbone.layers} == layers
    # the plain method of the same module still equals the model's gradient
    np.testing.assert_allclose(backprop(model, x, "logits", seed, "gradient"), before_grad, rtol=1e-5, atol=1e-5)


def test_rules_reach_inside_nested_models(branchy):
    """Guided/deconv through a nested backbone equal the same layers called in one flat graph."""
    model, backbone = branchy
    inp = keras.Input((12, 12, 3))
    h = backbone.get_layer("relu6")(backbone.get_layer("conv")(inp))
    m = keras.layers.Add()([h, model.get_layer("side")(inp)])
    flat = keras.Model(inp, model.get_layer("pool")(m))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 12, 12, 3)).astype(np.float32) * 3
    seed = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    for method in ("guided", "deconv"):
        nested = backprop(model, x, "pool", seed, method).numpy()
        reference = backprop(flat, x, flat.layers[-1].name, seed, method).numpy()
        np.testing.assert_allclose(nested, reference, rtol=1e-5, atol=1e-6)
        assert np.abs(nested - backprop(model, x, "pool", seed, "gradient").numpy()).max() > 1e-3


@pytest.mark.parametrize("method", ["gradient", "guided", "deconv"])
def test_batched_equals_one_by_one(branchy, method):
    """The same image repeated with different one-hot seeds, and different images."""
    model, _ = branchy
    rng = np.random.default_rng(6)
    images = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    which = np.array([0, 0, 0, 1, 1, 0])
    channel, y, x = np.array([0, 3, 1, 2, 0, 0]), np.array([0, 5, 2, 4, 1, 0]), np.array([1, 0, 5, 5, 3, 1])
    batch = backprop(model, images[which], "add", seed_at((12, 12, 4), channel, y, x), method).numpy()
    for b in range(len(which)):
        one = backprop(model, images[which[b]][None], "add",
                       seed_at((12, 12, 4), channel[b], y[b], x[b]), method).numpy()[0]
        np.testing.assert_allclose(batch[b], one, rtol=1e-5, atol=1e-6)
    assert (np.abs(batch).max(axis=(1, 2, 3)) > 0).all()
    assert not np.allclose(batch[0], batch[1])
    np.testing.assert_allclose(batch[0], batch[5], rtol=1e-6)


def test_one_program_per_layer_traces_once_without_retracing_warnings(branchy, caplog):
    """A panels stage builds one Backprop per layer and method: each traces once, and
    TensorFlow must not take the many objects for one function retraced again and again."""
    model, _ = branchy
    x = np.random.default_rng(2).normal(size=(2, 12, 12, 3)).astype(np.float32)
    with caplog.at_level("WARNING", logger="tensorflow"):
        for _ in range(4):
            for method in ("guided", "deconv"):
                program = Backprop(model, "add", method)
                for n in (1, 2):  # batch sizes: one trace serves both
                    program(x[:n], seed_at((12, 12, 4), np.zeros(n, int), np.zeros(n, int), np.zeros(n, int)))
                assert program._fn.experimental_get_tracing_count() == 1
    assert "retracing" not in caplog.text


def test_seed_at():
    seeds = seed_at((4, 5, 3), [2, 0], [1, 3], [4, 0]).numpy()
    expected = np.zeros((2, 4, 5, 3), np.float32)
    expected[0, 1, 4, 2] = expected[1, 3, 0, 0] = 1
    np.testing.assert_array_equal(seeds, expected)
    np.testing.assert_array_equal(seed_at((6,), [5, 1]).numpy(), np.eye(6, dtype=np.float32)[[5, 1]])
    with pytest.raises(ValueError, match="outside"):
        seed_at((4, 5, 3), 3, 0, 0)


def test_seed_of_the_wrong_shape_and_unknown_method(branchy):
    model, _ = branchy
    x = np.zeros((1, 12, 12, 3), np.float32)
    with pytest.raises(ValueError, match="seed shape"):
        backprop(model, x, "pool", np.zeros((1, 5, 5, 4), np.float32), "gradient")
    with pytest.raises(ValueError, match="guided"):
        Backprop(model, "pool", "smoothgrad")


def test_panel_to_uint8():
    panel = np.array([[-2.0, 0.0], [1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(panel_to_uint8(panel), [[0, 128], [192, 255]])
    np.testing.assert_array_equal(panel_to_uint8(np.zeros((2, 2))), np.full((2, 2), 128))
    np.testing.assert_array_equal(panel_to_uint8(np.array([0.0, 0.5, 1.0]), centred=False), [0, 128, 255])
    stack = np.stack([panel, panel * 10])  # per-panel scaling
    out = panel_to_uint8(stack, panel_dims=2)
    np.testing.assert_array_equal(out[0], out[1])
    assert out.dtype == np.uint8


def test_embedded_mobilenet_v2():
    """ZeroPadding, depthwise convolutions, BatchNorm, ReLU6 and residual Adds: the plain
    method equals the tape, the rebuilt forward equals the model, and guided/deconv
    maps of a top unit stay inside its receptive field."""
    from omegaconf import OmegaConf

    from pipeline.geometry import layer_geometry
    from pipeline.models.sources import load_model

    model = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None))).model
    layer = "features_3_add"
    x = np.random.default_rng(8).normal(size=(2, 224, 224, 3)).astype(np.float32)
    program = Backprop(model, layer, "gradient")
    out = feature_model(model, layer)(x).numpy()
    np.testing.assert_allclose(Backprop(model, layer, "guided").outputs(x), out, rtol=1e-4, atol=1e-4)
    c = 5
    y, xx = np.unravel_index(out[..., c].reshape(2, -1).argmax(1), out.shape[1:3])
    seed = seed_at(program.output_shape, c, y, xx)
    reference = tape_gradient(feature_model(model, layer), x, seed)
    np.testing.assert_allclose(program(x, seed), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
    geo = layer_geometry(model, layer)
    boxes = geo.boxes(y, xx)
    for method in ("guided", "deconv"):
        maps = backprop(model, x, layer, seed, method).numpy()
        assert not np.allclose(maps, reference)
        for b in range(2):
            y0, x0, y1, x1 = boxes[b]
            inside = np.zeros((224, 224), bool)
            inside[y0:y1, x0:x1] = True
            support = np.abs(maps[b]).sum(-1) > 0
            assert support.any() and not support[~inside].any()
