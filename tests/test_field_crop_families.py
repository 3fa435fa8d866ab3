"""Receptive-field crops on the keras.applications families users bring (random weights,
small inputs): crop maps and values equal the whole image's for units at the corners, edges
and centre of a mid/late layer, and a layer no crop can serve is left out of
panels.layers=cropped with one line that says why and what panels.layers=all costs."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_field_crop import crop_maps_in_image
from pipeline.backprop import backprop, seed_at
from pipeline.panels import PanelLayer, chosen, crop_plan_of

pytestmark = pytest.mark.slow  # each builds a keras.applications model (2-10 s on 2 CPU cores)

# family, input size, layer, method (the three rules spread over the families)
CROPPED = [
    ("VGG16", 96, "block3_conv3", "deconv"),
    ("ResNet50", 64, "conv2_block3_out", "guided"),
    ("MobileNet", 64, "conv_pw_5_relu", "gradient"),
    ("MobileNetV2", 96, "block_5_add", "guided"),
    ("InceptionV3", 96, "mixed0", "deconv"),
    ("Xception", 96, "Add:1", "guided"),  # its second residual sum (auto-named add_1 in a fresh process)
    ("DenseNet121", 96, "conv2_block6_concat", "deconv"),
    ("ConvNeXtTiny", 96, "convnext_tiny_stage_0_block_2_layer_scale", "gradient"),
]

# family, input size, layer, the reason the log line must give
LEFT_OUT = [
    ("VGG16", 96, "block5_conv3", "its receptive field spans the image"),
    ("VGG16", 128, "block4_conv3", "104x104 receptive-field crops are 66% of the image"),
    ("EfficientNetB0", 96, "block2a_project_bn", "broadcast from a 1x1 map"),  # squeeze-and-excitation
    ("MobileNetV3Small", 96, "expanded_conv_3_project_bn", "broadcast from a 1x1 map"),
]


def _model(family: str, size: int):
    keras.utils.set_random_seed(0)
    return getattr(keras.applications, family)(weights=None, input_shape=(size, size, 3))


@pytest.mark.parametrize("family,size,name,method", CROPPED, ids=[c[0] for c in CROPPED])
def test_crop_panels_equal_whole_image_panels(family, size, name, method):
    model = _model(family, size)
    if ":" in name:  # class:index, for layers whose automatic names depend on what the process built before
        cls, index = name.split(":")
        name = [layer.name for layer in model.layers if type(layer).__name__ == cls][int(index)]
    x = tf.constant(np.random.default_rng(2).normal(0, 50, (1, size, size, 3)).astype(np.float32))
    h, w = model.get_layer(name).output.shape[1:3]
    activation = keras.Model(model.input, model.get_layer(name).output)(x).numpy()[0]
    # corners, edges and centre; each unit's most active channel, so the maps are not zero
    y = np.array([0, 0, h - 1, h - 1, h // 2, 0, h // 2, h - 1, h // 2])
    xs = np.array([0, w - 1, 0, w - 1, w // 2, w // 2, 0, w // 2, w - 1])
    c = np.argmax(activation[y, xs], axis=-1)
    got, values, plan = crop_maps_in_image(model, name, method, x, c, y, xs)
    assert plan.size[0] < size and plan.size[1] < size
    whole = backprop(model, tf.repeat(x, len(y), 0), name, seed_at(activation.shape, c, y, xs), method).numpy()
    scale = np.abs(activation[y, xs, c]).max()
    np.testing.assert_allclose(values, activation[y, xs, c], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-5 * np.abs(whole).max())
    assert (np.abs(whole).reshape(len(y), -1).max(axis=1) > 0).sum() >= 6  # not a comparison of zeros


@pytest.mark.parametrize("family,size,name,why", LEFT_OUT, ids=[f"{c[0]}-{c[2]}" for c in LEFT_OUT])
def test_a_layer_no_crop_serves_is_left_out_with_its_cost(family, size, name, why, caplog):
    model = _model(family, size)
    channels = model.get_layer(name).output.shape[-1]
    layer = PanelLayer(key=name, name=name, image=np.zeros((channels, 3), np.int64), value=np.ones((channels, 3)),
                   scale=1.0, y=None, x=None, box=None, row_offset=None, col_offset=None, frame=(8, 8),
                   size=(8, 8))
    with caplog.at_level(logging.INFO, logger="pipeline.panels"):
        kept = chosen("cropped", [layer], {name: crop_plan_of(model, name)}, model, ["deconv", "guided"], 32)
    assert kept == []
    lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 1 and why in lines[0], lines
    assert f"panels.layers=all computes its {channels * 3 * 2} panels" in lines[0] and " min here " in lines[0]
    assert chosen("all", [layer], {}, model, ["deconv"], 32) == [layer]
