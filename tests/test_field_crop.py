"""Receptive-field crops: the crop rules, and backward maps on crops equal to the
whole image's (awkward graph, MobileNetV2, border and centre units), and the
panels stage falling back to whole images where a crop cannot be exact."""

import logging

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import save_image
from test_pipeline import compose_cfg
from test_panels import model_inputs
from pipeline.backprop import Backprop, backprop, seed_at
from pipeline.field_crop import axis_crop, crop_index, crop_positions
from pipeline.panel_codec import LEVELS, read_panels
from pipeline.panels import crop_plan_of
from pipeline.runner import run


@pytest.mark.parametrize("stride", [1, 2, 3, 8])
@pytest.mark.parametrize("length", [29, 64, 224])
def test_axis_crops_keep_the_grid_cover_every_field_and_are_the_smallest(stride, length):
    rng = np.random.default_rng(stride * 1000 + length)
    field = int(rng.integers(3, length // 2))
    outputs = -(-length // stride)
    lo = np.arange(outputs) * stride - field // 2  # a 'same'-padded field, clipped by the borders
    ranges = np.stack([np.clip(lo, 0, length), np.clip(lo + field, 0, length)], axis=1)
    crop = axis_crop(ranges, stride, length)
    assert crop.size < length
    assert (crop.start % stride == 0).all() and crop.size % stride == length % stride
    assert (crop.start >= 0).all() and (crop.start + crop.size <= length).all()
    assert (crop.start <= ranges[:, 0]).all() and (crop.start + crop.size >= ranges[:, 1]).all()
    # one stride shorter keeps n = L (mod S) but leaves some field uncovered, wherever it starts
    shorter = crop.size - stride
    cover = [any(s <= a and s + shorter >= b for s in range(0, length - shorter + 1, stride)) for a, b in ranges]
    assert shorter < field or not all(cover)


def test_a_field_as_large_as_the_image_is_not_cropped():
    crop = axis_crop(np.array([[0, 20], [0, 20]]), 2, 20)
    assert crop.size == 20 and (crop.start == 0).all()


def awkward_model():
    """Non-square grey input of odd size, 'same' stride 2 on odd maps, max pooling and a
    dilated leaky branch merged by Add, asymmetric zero padding before a valid stride 2
    convolution with a fused ReLU6."""
    rng = np.random.default_rng(5)
    inp = keras.Input((29, 23, 2))
    a = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    b = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c2")(a)
    b = keras.layers.ReLU(name="r2")(b)
    p = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="pool")(b)
    d = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", name="dil")(b)
    d = keras.layers.LeakyReLU(0.1, name="leaky")(d)
    m = keras.layers.Add(name="add")([p, d])
    z = keras.layers.ZeroPadding2D(((0, 1), (1, 0)), name="zpad")(m)
    e = keras.layers.Conv2D(3, 3, strides=2, padding="valid", activation="relu6", name="c3")(z)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(e))
    model = keras.Model(inp, out)
    model.set_weights([rng.normal(0, 0.4, w.shape).astype(np.float32) for w in model.get_weights()])
    c3 = model.get_layer("c3")
    c3.kernel.assign(c3.kernel * 0.2)  # most units between 0 and 6, where ReLU6 passes gradients
    return model


def crop_maps_in_image(model, name, method, x, c, y, xs):
    """Maps of units (c, y, xs) of image x computed on their crops, pasted into the image."""
    plan, why = crop_plan_of(model, name)
    assert plan is not None, why
    program = Backprop(model, name, method, input_size=plan.size)
    starts, inside = crop_positions(plan, y, xs)
    rows = tf.gather_nd(x, crop_index(np.zeros(len(y), np.int64), starts, plan.size))
    maps, values = program.maps_and_values(rows, seed_at(program.output_shape, c, inside[:, 0], inside[:, 1]))
    canvas = np.zeros((len(y),) + tuple(x.shape[1:]), np.float32)
    for e, (r0, c0) in enumerate(starts):
        canvas[e, r0:r0 + plan.size[0], c0:c0 + plan.size[1]] = maps.numpy()[e]
    return canvas, values.numpy(), plan


@pytest.mark.parametrize("name", ["r2", "add", "c3"])
def test_crop_maps_equal_whole_image_maps_on_an_awkward_graph(name):
    model = awkward_model()
    x = tf.constant(np.random.default_rng(1).normal(size=(1, 29, 23, 2)).astype(np.float32))
    h, w, channels = model.get_layer(name).output.shape[1:]
    y, xs = (a.ravel() for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))  # every unit
    c = np.arange(len(y)) % channels
    for method in ("gradient", "guided", "deconv"):
        got, values, plan = crop_maps_in_image(model, name, method, x, c, y, xs)
        assert plan.size[0] < 29 and plan.size[1] < 23
        seeds = seed_at((h, w, channels), c, y, xs)
        whole = backprop(model, tf.repeat(x, len(y), 0), name, seeds, method).numpy()
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max(), err_msg=method)
        activation = keras.Model(model.input, model.get_layer(name).output)(x).numpy()[0]
        np.testing.assert_allclose(values, activation[y, xs, c], rtol=1e-5, atol=1e-6)
        assert (np.abs(whole).reshape(len(y), -1).max(axis=1) > 0).mean() > 0.3  # not all zero maps


def test_crop_maps_equal_whole_image_maps_on_mobilenet_v2():
    from omegaconf import OmegaConf

    from pipeline.models.sources import load_model

    model = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None))).model
    name = "features_7_conv_0_2"
    x = tf.constant(np.random.default_rng(2).normal(size=(1, 224, 224, 3)).astype(np.float32))
    y, xs = np.array([0, 27, 14, 0, 27, 1]), np.array([0, 27, 14, 27, 0, 26])  # corners, centre, edges
    c = np.array([0, 5, 7, 3, 2, 1])
    for method in ("guided", "deconv"):
        got, _, plan = crop_maps_in_image(model, name, method, x, c, y, xs)
        assert plan.size == (64, 64)
        whole = backprop(model, tf.repeat(x, len(y), 0), name, seed_at((28, 28, 192), c, y, xs), method).numpy()
        np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max(), err_msg=method)
        assert (np.abs(whole).reshape(len(y), -1).max(axis=1) > 0).sum() >= 3


def test_a_gate_over_the_whole_map_means_whole_images():
    inp = keras.Input((16, 16, 3))
    f = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    gate = keras.layers.Dense(4, activation="sigmoid")(keras.layers.GlobalAveragePooling2D(keepdims=True)(f))
    out = keras.layers.Multiply(name="gated")([f, gate])
    plan, why = crop_plan_of(keras.Model(inp, out), "gated")
    assert plan is None and "broadcast from a 1x1 map" in why


@keras.saving.register_keras_serializable(package="test_field_crop")
class CentreMaps(keras.layers.Layer):
    """Subtracts each map's spatial mean: it reads the whole map, but is declared pointwise,
    so the geometry (wrongly) allows crops; only the value check can tell."""

    def call(self, x):
        return x - keras.ops.mean(x, axis=(1, 2), keepdims=True)


def test_the_stage_checks_crop_values_and_falls_back_to_whole_images(tmp_path, caplog):
    rng = np.random.default_rng(3)
    inp = keras.Input((20, 20, 3))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv")(inp)
    x = keras.layers.ReLU(name="relu")(CentreMaps(name="centre")(x))
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(tmp_path / "centred.keras")
    for i in range(3):
        save_image(tmp_path / "photos" / f"img{i}.png", (rng.random((24, 24, 3)) * 255).astype(np.uint8))
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'centred.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={tmp_path / 'photos'}", "layers=[relu,gap]", "topk=2",
                       "stages=[scan,crop,panels]", "crop.max_size=0", "panels.methods=[gradient]",
                       "geometry.pointwise=[CentreMaps]"])
    with caplog.at_level(logging.INFO, logger="pipeline"):
        run(cfg, tmp_path / "run")
    assert "differ on their receptive-field crop" in caplog.text and "computing it on whole images" in caplog.text
    assert "none for gap" in caplog.text  # panels.layers=cropped: the pooled layer is left out
    images = model_inputs(cfg)
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert "panels" not in f["layers/gap"]
        g = f["layers/relu"]
        image, y, xs, box = (g[f"topk/{k}"][()] for k in ("image", "y", "x", "box"))
        row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
        for c in range(3):
            for k in range(2):
                full = backprop(model, images[image[c, k]][None], "relu", seed_at((20, 20, 3), c, y[c, k], xs[c, k]),
                                "gradient").numpy()[0]
                y0, x0, y1, x1 = box[c, k]
                oy, ox = row_offset[y[c, k]], col_offset[xs[c, k]]
                expected = np.zeros(g["panels/gradient"].shape[2:], np.float32)
                expected[oy:oy + y1 - y0, ox:ox + x1 - x0] = full[y0:y1, x0:x1]
                np.testing.assert_allclose(read_panels(g, "panels/gradient", c, k), expected,
                                           rtol=0, atol=np.abs(expected).max() * (1 / LEVELS + 1e-3))
