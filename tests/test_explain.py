"""pipeline.explain on tiny hand-set Keras models whose correct maps are known."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.render import draw
from pipeline.errors import PipelineError
from pipeline.explain import (CamExplainer, Occluder, blank_channels, default_target_layer, grad_cam,
                              grad_cam_pp, guided_grad_cam, layer_activations, occlusion, occlusion_grid,
                              score_cam)
from pipeline.preprocess import Preprocessing, normalize
from pipeline.graph import feature_model

ALL = ("gradcam", "gradcam++", "scorecam", "guided_gradcam")


# ---------------------------------------------------------------- models


def conv_gap_dense(activation=None, scale=1.0, seed=0):
    """conv (3x3, 3 channels) -> ReLU -> global average pool -> dense (3 classes), hand-set."""
    rng = np.random.default_rng(seed)
    inp = keras.Input((10, 10, 2))
    x = keras.layers.Conv2D(3, 3, name="conv")(inp)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, activation=activation, name="dense")(x)
    model = keras.Model(inp, out)
    kernel = rng.integers(-2, 3, size=(3, 3, 2, 3)).astype(np.float32) / 4
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    w = np.array([[1.0, -2.0, 0.5], [-1.0, 1.5, 2.0], [3.0, 0.5, -1.0]], np.float32) * scale
    b = np.array([0.2, -0.1, 0.0], np.float32) * scale
    model.set_weights([kernel, bias, w, b])
    return model, (kernel, bias, w, b)


def numpy_conv_relu(x, kernel, bias):
    """'valid' cross-correlation + bias + ReLU, by brute force over kernel offsets."""
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], h, w, kernel.shape[3]), np.float64)
    for dy in range(kh):
        for dx in range(kw):
            out += np.einsum("bhwi,io->bhwo", x[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
    return np.maximum(out + bias, 0)


def square_detector(size=32):
    """Two channels at half resolution: 'bright' (a 3x3 mean above 0.5) and 'dark' (below
    0.3); class 0 'square' reads the bright channel, class 1 'background' the dark one."""
    inp = keras.Input((size, size, 1))
    x = keras.layers.Conv2D(2, 3, padding="same", name="detect")(inp)
    x = keras.layers.ReLU(name="act")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(2, name="dense")(x)
    model = keras.Model(inp, out)
    kernel = np.zeros((3, 3, 1, 2), np.float32)
    kernel[..., 0, 0], kernel[..., 0, 1] = 1 / 9, -1 / 9
    model.set_weights([kernel, np.array([-0.5, 0.3], np.float32),
                       np.array([[40.0, -2.0], [0.0, 1.0]], np.float32), np.array([-1.0, 0.0], np.float32)])
    return model


def square_image(y, x, side=6, size=32, seed=0):
    img = np.random.default_rng(seed).random((size, size, 1)).astype(np.float32) * 0.1
    img[y:y + side, x:x + side] = 1.0
    return img


def random_model(seed=1, nested=False, batchnorm=True):
    """conv-BN-ReLU-pool-conv-ReLU-GAP-dropout-dense with random weights; optionally with
    the convolutional part as a nested model."""
    rng = np.random.default_rng(seed)
    layers = [keras.layers.Conv2D(4, 3, padding="same", name="c1"),
              keras.layers.BatchNormalization(name="bn") if batchnorm else keras.layers.Identity(name="bn"),
              keras.layers.ReLU(name="r1"), keras.layers.MaxPooling2D(2, name="p1"),
              keras.layers.Conv2D(6, 3, padding="same", name="c2"), keras.layers.ReLU(name="r2")]
    head = [keras.layers.GlobalAveragePooling2D(name="gap"), keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(5, name="logits")]

    def chain(t, ls):
        for layer in ls:
            t = layer(t)
        return t

    inp = keras.Input((16, 16, 3))
    if nested:
        inner_in = keras.Input((16, 16, 3))
        backbone = keras.Model(inner_in, chain(inner_in, layers), name="backbone")
        out = chain(backbone(inp), head)
    else:
        out = chain(inp, layers + head)
    model = keras.Model(inp, out)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    if batchnorm:  # moving variance must be positive
        for i, w in enumerate(model.weights):
            if "moving_variance" in w.path:
                weights[i] = np.abs(weights[i]) + 0.5
    model.set_weights(weights)
    return model


def random_images(n, shape=(16, 16, 3), seed=0):
    return np.random.default_rng(seed).random((n,) + shape).astype(np.float32)


# ---------------------------------------------------------------- known answers


def test_gradcam_is_the_weighted_channel_sum_of_a_gap_dense_model():
    model, (kernel, bias, w, b) = conv_gap_dense()
    x = np.random.default_rng(5).normal(size=(4, 10, 10, 2)).astype(np.float32)
    a = numpy_conv_relu(x.astype(np.float64), kernel, bias)  # (4, 8, 8, 3)
    logits = a.mean(axis=(1, 2)) @ w + b
    # d logit_c / d A_k(i, j) = w[k, c] / (h w) everywhere, so the map is exact
    for c in range(3):
        expected = np.maximum(np.einsum("bhwk,k->bhw", a, w[:, c] / 64), 0)
        got = grad_cam(model, x, targets=c)
        assert got.maps.shape == (4, 8, 8) and got.layer == "relu"
        np.testing.assert_allclose(got.maps, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.scores, logits[:, c], rtol=1e-5)
        np.testing.assert_allclose(got.maxima, expected.max(axis=(1, 2)), rtol=1e-5, atol=1e-6)
        assert got.maps.max() > 0
    predicted = grad_cam(model, x)
    np.testing.assert_array_equal(predicted.classes, logits.argmax(axis=1))
    top = grad_cam(model, x, targets="top2")
    assert top.maps.shape == (4, 2, 8, 8)
    np.testing.assert_array_equal(top.classes, np.argsort(-logits, axis=1)[:, :2])
    for k in range(2):
        expected = np.maximum(np.einsum("bhwk,bk->bhw", a, w[:, top.classes[:, k]].T / 64), 0)
        np.testing.assert_allclose(top.maps[:, k], expected, rtol=1e-5, atol=1e-6)
    per_image = grad_cam(model, x, targets=np.array([2, 0, 1, 2]))
    np.testing.assert_array_equal(per_image.classes, [2, 0, 1, 2])


def test_gradcam_pp_follows_its_closed_form():
    model, (kernel, bias, w, b) = conv_gap_dense()
    x = np.random.default_rng(6).normal(size=(3, 10, 10, 2)).astype(np.float32)
    a = numpy_conv_relu(x.astype(np.float64), kernel, bias)
    for c in range(3):
        g = w[:, c] / 64  # the gradient, the same at every position
        total = a.sum(axis=(1, 2))  # (B, K)
        denom = 2 * g ** 2 + total * g ** 3
        alpha = np.where(denom != 0, g ** 2 / np.where(denom != 0, denom, 1), 0)
        weights = 64 * alpha * np.maximum(g, 0)
        expected = np.maximum(np.einsum("bhwk,bk->bhw", a, weights), 0)
        got = grad_cam_pp(model, x, targets=c).maps
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
        if (w[:, c] > 0).any():
            assert got.max() > 0


def test_scorecam_equals_masking_one_channel_at_a_time():
    model = random_model(seed=3, batchnorm=False)
    x = random_images(2, seed=4)
    explainer = CamExplainer(model, "r2")
    maps = keras.Model(model.input, model.get_layer("r2").output)(x).numpy()  # (2, 8, 8, 6)
    classes = model(x).numpy().argmax(axis=1)
    expected = np.zeros(maps.shape[:3])
    for i in range(len(x)):
        scores = []
        for k in range(maps.shape[3]):  # the brute force: one masked image per forward pass
            up, _ = draw.resample(maps[i, :, :, k], (16, 16))
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            scores.append(model(x[i:i + 1] * mask[None, :, :, None]).numpy()[0, classes[i]])
        weights = np.exp(scores - np.max(scores))
        weights /= weights.sum()
        expected[i] = np.maximum(np.einsum("hwk,k->hw", maps[i], weights), 0)
    for budget in (1, 4, 1000):  # masked images per forward pass
        got = explainer.compute(x, None, ("scorecam",), scorecam_batch=budget)["scorecam"]
        np.testing.assert_allclose(got.maps, expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got.classes, classes)
    np.testing.assert_allclose(score_cam(model, x, layer="r2", scorecam_batch=3).maps, expected,
                               rtol=1e-4, atol=1e-6)
    assert expected.max() > 0
    # Faster Score-CAM: the same brute force over each image's N channels of highest variance
    for n in (1, 3, 6):
        approx = np.zeros(maps.shape[:3])
        for i in range(len(x)):
            top = np.argsort(-maps[i].var(axis=(0, 1)), kind="stable")[:n]
            scores = []
            for k in top:
                up, _ = draw.resample(maps[i, :, :, k], (16, 16))
                span = up.max() - up.min()
                mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
                scores.append(model(x[i:i + 1] * mask[None, :, :, None]).numpy()[0, classes[i]])
            weights = np.exp(scores - np.max(scores))
            approx[i] = np.maximum(np.einsum("hwk,k->hw", maps[i][..., top], weights / weights.sum()), 0)
        got = score_cam(model, x, layer="r2", channels=n).maps
        np.testing.assert_allclose(got, approx, rtol=1e-4, atol=1e-6, err_msg=f"channels={n}")
    np.testing.assert_allclose(approx, expected, rtol=1e-4, atol=1e-6)  # n = every channel: exact


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "scorecam"])
def test_toy_heatmap_peaks_in_the_bright_square_and_moves_with_it(method):
    model = square_detector()
    corners = [(3, 4), (20, 22), (5, 24), (22, 2)]
    x = np.stack([square_image(y, x, seed=i) for i, (y, x) in enumerate(corners)])
    result = CamExplainer(model, "act").compute(x, targets=0, methods=(method,))[method]
    background = CamExplainer(model, "act").compute(x, targets=1, methods=(method,))[method]
    for i, (y0, x0) in enumerate(corners):
        up, _ = draw.resample(result.maps[i], (32, 32))
        py, px = np.unravel_index(np.argmax(up), up.shape)
        assert y0 <= py < y0 + 6 and x0 <= px < x0 + 6, (method, corners[i], (py, px))
        if method != "scorecam":  # (Score-CAM's weights are all positive by construction)
            # the 'background' class reads the bright channel negatively: nothing on the square
            bg, _ = draw.resample(background.maps[i], (32, 32))
            assert bg[y0 + 1:y0 + 5, x0 + 1:x0 + 5].max() == 0 < bg.max()


def test_guided_gradcam_is_gradcam_times_the_guided_gradient():
    model, (kernel, bias, w, b) = conv_gap_dense()
    conv = keras.Model(model.input, model.get_layer("conv").output)
    x = np.random.default_rng(8).normal(size=(3, 10, 10, 2)).astype(np.float32)
    c = 1
    result = guided_grad_cam(model, x, targets=c)
    assert result.maps.shape == (3, 10, 10, 2)
    # guided backprop through the one ReLU: only active units, only positive signals
    # (w[k, c] / 64 at every position), then the plain gradient of the linear conv
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = conv(xt)
        active = tf.cast(z > 0, tf.float32)
        objective = tf.reduce_sum(tf.stop_gradient(active) * z * np.maximum(w[:, c], 0) / 64)
    guided = tape.gradient(objective, xt).numpy()
    cam = grad_cam(model, x, targets=c).maps
    up = tf.image.resize(cam[..., None], (10, 10), method="bilinear").numpy()
    np.testing.assert_allclose(result.maps, up * guided, rtol=1e-4, atol=1e-7)
    assert np.abs(result.maps).max() > 0


# ---------------------------------------------------------------- the rules


def test_a_batch_gives_the_same_maps_as_one_image_at_a_time():
    model = random_model(seed=2)
    x = random_images(5, seed=1)
    explainer = CamExplainer(model)
    batch = explainer.compute(x, "top2", ALL, batch_size=5, scorecam_batch=7)
    for i in range(len(x)):
        one = explainer.compute(x[i:i + 1], "top2", ALL, batch_size=1, scorecam_batch=64)
        for m in ALL:
            np.testing.assert_allclose(batch[m].maps[i], one[m].maps[0], rtol=1e-4, atol=1e-6, err_msg=m)
            np.testing.assert_array_equal(batch[m].classes[i], one[m].classes[0])
    assert all(batch[m].maps.max() > 0 for m in ALL)
    # other batch sizes split the same images differently: same maps
    split = explainer.compute(x, "top2", ALL, batch_size=2, scorecam_batch=3)
    for m in ALL:
        np.testing.assert_allclose(split[m].maps, batch[m].maps, rtol=1e-4, atol=1e-6)


def test_gradcam_weights_are_each_images_own_gradient():
    """A head whose gradient depends on the image (a ReLU layer after the pooling): weights
    averaged over the batch too, the classic bug, would give every image the same weights."""
    rng = np.random.default_rng(5)
    inp = keras.Input((12, 12, 3))
    maps = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(keras.layers.GlobalAveragePooling2D()(maps))
    model = keras.Model(inp, keras.layers.Dense(3, name="logits")(hidden))
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    x = random_images(4, (12, 12, 3), seed=3) * np.array([1, 3, 0.3, 6], np.float32)[:, None, None, None]
    got = CamExplainer(model, "conv").compute(x, targets=1, methods=("gradcam",), batch_size=4)["gradcam"]
    features = feature_model(model, ["conv", "logits"])
    weights = []
    for i in range(len(x)):  # the textbook recipe, one image at a time
        with tf.GradientTape() as tape:
            a, z = features(x[i:i + 1])
            score = z[0, 1]
        w = tf.reduce_mean(tape.gradient(score, a), axis=(1, 2))[0].numpy()
        weights.append(w)
        want = np.maximum((a[0].numpy() * w).sum(axis=-1), 0)
        np.testing.assert_allclose(got.maps[i], want, rtol=1e-4, atol=1e-6)
    weights = np.stack(weights)  # the images really have different weights:
    assert np.ptp(weights, axis=0).max() > 0.3 * np.abs(weights).max()


@pytest.mark.parametrize("ending", ["dense_softmax", "softmax_layer", "activation_softmax"])
def test_a_saturated_softmax_model_still_gives_the_logit_maps(ending):
    logit_model, _ = conv_gap_dense(scale=400.0)
    inp = logit_model.inputs[0]
    features = logit_model.get_layer("gap").output
    dense = logit_model.get_layer("dense")
    if ending == "dense_softmax":
        soft = keras.layers.Dense(3, activation="softmax")
        out = soft(features)
        soft.set_weights(dense.get_weights())
    elif ending == "softmax_layer":
        out = keras.layers.Softmax()(logit_model.output)
    else:
        out = keras.layers.Activation("softmax")(logit_model.output)
    prob_model = keras.Model(inp, out)
    x = np.random.default_rng(9).normal(size=(3, 10, 10, 2)).astype(np.float32)
    probs = prob_model(x).numpy()
    assert (probs.max(axis=1) == 1.0).all()  # saturated in float32
    # the probability's gradient is gone: a CAM of it would be blank
    xt = tf.constant(x)
    maps_model = keras.Model(inp, [logit_model.get_layer("relu").output, prob_model.output])
    with tf.GradientTape() as tape:
        a, p = maps_model(xt)
        top = tf.reduce_sum(tf.reduce_max(p, axis=1))
    assert np.abs(tape.gradient(top, a).numpy()).max() < 1e-12
    for method in ("gradcam", "gradcam++", "scorecam"):
        got = CamExplainer(prob_model).compute(x, None, (method,))[method]
        want = CamExplainer(logit_model).compute(x, None, (method,))[method]
        np.testing.assert_array_equal(got.classes, want.classes)
        np.testing.assert_allclose(got.maps, want.maps, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.scores, logit_model(x).numpy().max(axis=1), rtol=1e-5)
    assert CamExplainer(prob_model).compute(x, None, ("gradcam",))["gradcam"].maps.max() > 0


def test_nested_and_flat_builds_of_the_same_weights_give_the_same_maps():
    flat = random_model(seed=4, nested=False)
    nested = random_model(seed=99, nested=True)
    nested.set_weights(flat.get_weights())  # same layer order: same weights
    x = random_images(3, seed=2)
    np.testing.assert_allclose(nested(x).numpy(), flat(x).numpy(), rtol=1e-5)
    assert default_target_layer(flat) == "r2" and default_target_layer(nested) == "backbone/r2"
    got = CamExplainer(nested).compute(x, "top2", ALL, scorecam_batch=5)
    want = CamExplainer(flat).compute(x, "top2", ALL, scorecam_batch=5)
    for m in ALL:
        np.testing.assert_allclose(got[m].maps, want[m].maps, rtol=1e-4, atol=1e-6, err_msg=m)
        assert want[m].maps.max() > 0
    # an inner layer by its qualified name, and a shallower one
    np.testing.assert_allclose(grad_cam(nested, x, layer="backbone/r1").maps,
                               grad_cam(flat, x, layer="r1").maps, rtol=1e-4, atol=1e-6)


def test_an_all_negative_map_is_zero_not_nan():
    model, (kernel, bias, w, b) = conv_gap_dense()
    w_neg = -np.abs(w)  # every class weight negative: every weighted sum of ReLU maps <= 0
    model.get_layer("dense").set_weights([w_neg, b])
    x = np.random.default_rng(3).normal(size=(2, 10, 10, 2)).astype(np.float32)
    for method in ("gradcam", "gradcam++"):
        r = CamExplainer(model).compute(x, None, (method,))[method]
        assert np.isfinite(r.maps).all() and (r.maps == 0).all() and (r.maxima == 0).all()
    # a dead layer (every channel constant zero): every method gives zeros, never NaN
    model.get_layer("conv").set_weights([kernel, np.full(3, -100.0, np.float32)])
    out = CamExplainer(model).compute(x, None, ALL)
    for m in ALL:
        assert np.isfinite(out[m].maps).all() and (out[m].maps == 0).all(), m
    photo = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    drawn = draw.overlay(photo, out["gradcam"].maps[0])
    lowest = draw.colorize(np.zeros(1))[0].astype(np.float32)
    np.testing.assert_allclose(drawn, np.clip(0.6 * photo + 0.4 * lowest + 0.5, 0, 255).astype(np.uint8), atol=1)


def test_default_target_layer_is_the_last_spatial_output():
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inp)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, name="c2")(x)
    x = keras.layers.ReLU(name="r2")(x)  # 4x4: the last one with H, W > 1
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)  # 1x1
    x = keras.layers.Conv2D(3, 1, name="head")(x)
    out = keras.layers.Flatten(name="flat")(x)
    model = keras.Model(inp, out)
    assert default_target_layer(model) == "r2"
    assert CamExplainer(model).map_shape == (4, 4, 4)
    with pytest.raises(PipelineError, match="not a .H, W, C. map"):
        CamExplainer(model, layer="flat")
    with pytest.raises(PipelineError, match="unknown layer"):
        CamExplainer(model, layer="r3")


def test_uint8_pixels_with_preprocessing_equal_normalised_inputs():
    model = random_model(seed=5)
    spec = Preprocessing(height=16, width=16, normalize="torch")
    pixels = (np.random.default_rng(1).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    x = normalize(tf.constant(pixels), "torch").numpy()
    np.testing.assert_allclose(grad_cam(model, pixels, preprocessing=spec).maps, grad_cam(model, x).maps,
                               rtol=1e-5, atol=1e-7)
    # photos of any size are resized and cropped as the pipeline does it
    big = (np.random.default_rng(2).random((40, 50, 3)) * 255).astype(np.uint8)
    assert grad_cam(model, [big, big], preprocessing=spec).maps.shape == (2, 8, 8)
    with pytest.raises(PipelineError, match="preprocessing"):
        grad_cam(model, pixels)
    with pytest.raises(PipelineError, match="out of range"):
        grad_cam(model, x, targets=7)


# ---------------------------------------------------------------- occlusion


def test_occlusion_of_the_object_drops_the_class_more_than_the_background():
    model = square_detector()
    x = np.stack([square_image(10, 12, side=8, seed=3)])
    r = occlusion(model, x, targets=0, size=8, stride=4, fill=0.0, layer="act")
    assert r.probability.shape == (1, len(r.rows), len(r.cols))
    np.testing.assert_array_equal(r.rows, occlusion_grid(32, 8, 4))
    covers = ((r.rows[:, None] + 8 > 10) & (r.rows[:, None] < 18)) & ((r.cols[None, :] + 8 > 12) & (r.cols[None, :] < 20))
    p = r.probability[0]
    assert p[covers].mean() < p[~covers].mean() - 0.1
    assert p.min() == p[covers].min() and p[~covers].max() > 0.9 * r.base_probability[0]
    # the followed feature map is the square detector, and hiding the square silences it
    assert r.channel[0] == 0
    a = r.activation[0]
    assert a[covers].mean() < a[~covers].mean() and np.isclose(a[~covers].max(), r.base_activation[0], rtol=1e-4)


def test_occlusion_equals_masking_each_position_by_hand():
    model = random_model(seed=6)
    x = random_images(2, seed=7)
    spec = Preprocessing(height=16, width=16, normalize="none")
    r = Occluder(model, "r2", None).compute(x, None, size=6, stride=5, fill=0.25, batch_size=7)
    np.testing.assert_array_equal(r.rows, [0, 5, 10])
    feats = keras.Model(model.input, [model.get_layer("r2").output, model.output])
    maps0, logits0 = (t.numpy() for t in feats(x))
    classes = logits0.argmax(axis=1)
    channel = maps0.max(axis=(1, 2)).argmax(axis=1)
    np.testing.assert_array_equal(r.classes, classes)
    np.testing.assert_array_equal(r.channel, channel)
    for i in range(2):
        for gy, y0 in enumerate(r.rows):
            for gx, x0 in enumerate(r.cols):
                xi = x[i].copy()
                xi[y0:y0 + 6, x0:x0 + 6] = 0.25
                maps, logits = (t.numpy()[0] for t in feats(xi[None]))
                prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
                assert np.isclose(r.probability[i, gy, gx], prob[classes[i]], rtol=1e-4, atol=1e-7)
                assert r.top_class[i, gy, gx] == logits.argmax()
                assert np.isclose(r.activation[i, gy, gx], maps[..., channel[i]].sum(), rtol=1e-4, atol=1e-5)
    # with preprocessing the fill is a grey level, normalised like the pixels
    assert np.allclose(Occluder(model, "r2", spec).fill_value(128), 128.0)
    assert np.allclose(Occluder(model, "r2", Preprocessing(16, 16, normalize="unit")).fill_value(51), 0.2)


def test_occlusion_grid_ends_flush_with_the_border():
    np.testing.assert_array_equal(occlusion_grid(10, 4, 4), [0, 4, 6])
    np.testing.assert_array_equal(occlusion_grid(12, 4, 4), [0, 4, 8])
    np.testing.assert_array_equal(occlusion_grid(5, 8, 2), [0])


# ---------------------------------------------------------------- activations and drawing


def test_layer_activations_and_blank_channels():
    model = random_model(seed=8)
    x = random_images(3, seed=3)
    got = layer_activations(model, x, ["r1", "r2"], batch_size=2)
    for name in ("r1", "r2"):
        want = keras.Model(model.input, model.get_layer(name).output)(x).numpy()
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6)
    maps = np.zeros((2, 3, 3, 4), np.float32)
    maps[0, 1, 1, 0] = 1.0  # one active position
    maps[:, :, :, 1] = 2.0  # constant: blank
    maps[1, :, :, 2] = np.arange(9).reshape(3, 3)
    np.testing.assert_array_equal(blank_channels(maps), [[False, True, True, True], [True, True, False, True]])
    np.testing.assert_array_equal(blank_channels(np.array([0.0, 1.0]).reshape(1, 1, 1, 2)), [[True, False]])


def test_resample_matches_tensorflow_bilinear_and_places_boxes():
    maps = np.random.default_rng(0).random((2, 5, 7)).astype(np.float32)
    got, inside = draw.resample(maps, (23, 31))
    want = tf.image.resize(maps[..., None], (23, 31), method="bilinear").numpy()[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert inside.all()
    # a map placed in a box: nothing outside, the corners of the box read the map's corners
    got, inside = draw.resample(maps[0], (40, 40), box=(10, 20, 30, 40))
    assert inside[10:30, 20:40].all() and inside.sum() == 400
    assert np.isclose(got[10, 20], maps[0, 0, 0]) and np.isclose(got[29, 39], maps[0, -1, -1])
    assert np.array_equal(draw.unit_scale(np.zeros((2, 3, 3))), np.zeros((2, 3, 3)))
    photo = np.full((40, 40, 3), 200, np.uint8)
    drawn = draw.overlay(photo, maps[0], box=(10, 20, 30, 40))
    assert (drawn[:10] < 200).all() and (drawn[15, 25] != 200).any()
