"""Receptive-field geometry against a gradient oracle.

Oracle: in a copy of the model with linear activations, average instead of max
pooling, positive constant kernels (1 / fan-in) and zero biases, the gradient of
one output position (summed over channels) with respect to the input is non-zero
exactly on the pixels that position reads. Its bounding box must equal the
geometry's box. The copy runs in float64 so that pixels reached by very few paths
in deep networks do not underflow.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.geometry import layer_geometry
from pipeline.graph import feature_model, flat_layers

L = keras.layers


@pytest.fixture(scope="module", autouse=True)
def float64():
    # the dtype policy too: Keras caches one made from floatx on first use, and a float64
    # policy left behind makes every later module's models float64 (pytest-xdist mixes modules)
    before, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(before)
    keras.config.set_dtype_policy(policy)


# ---------------------------------------------------------------- oracle

def _linear_layer(layer):
    if isinstance(layer, L.MaxPooling2D):
        return L.AveragePooling2D(layer.pool_size, layer.strides, layer.padding,
                                  layer.data_format, name=layer.name, dtype=layer.dtype_policy)
    if isinstance(layer, (L.ReLU, L.LeakyReLU, L.ELU, L.PReLU, L.Activation)):
        return L.Activation("linear", name=layer.name, dtype=layer.dtype_policy)
    config = layer.get_config()
    if "activation" in config:
        config["activation"] = "linear"
    return layer.__class__.from_config(config)


def _positive_weights(model):
    for v in model.weights:
        shape = tuple(v.shape)
        if v.name in ("gamma", "moving_variance"):
            value = np.ones(shape)
        elif v.name in ("beta", "moving_mean", "bias"):
            value = np.zeros(shape)
        elif v.name == "depthwise_kernel":
            value = np.full(shape, 1.0 / (shape[0] * shape[1]))
        elif v.name in ("kernel", "pointwise_kernel"):
            value = np.full(shape, 1.0 / np.prod(shape[:-1]))
        else:
            raise AssertionError(f"oracle does not know weight {v.path}")
        v.assign(value)


def linear_copy(model):
    copy = keras.models.clone_model(model, clone_function=_linear_layer, recursive=True)
    _positive_weights(copy)
    return copy


EVERY_POSITION = 12  # maps up to this side are checked at every position, larger ones at borders and centre


def positions(h, w, full=True):
    if full and h <= EVERY_POSITION and w <= EVERY_POSITION:
        return [(y, x) for y in range(h) for x in range(w)]
    ys = sorted({v for v in (0, 1, 2, h // 3, h // 2, h - 3, h - 2, h - 1) if 0 <= v < h})
    xs = sorted({v for v in (0, 1, 2, w // 3, w // 2, w - 3, w - 2, w - 1) if 0 <= v < w})
    if full:
        return [(y, x) for y in ys for x in xs]
    # every row value and every column value at least once, corners included
    n = max(len(ys), len(xs))
    pairs = {(ys[i % len(ys)], xs[i % len(xs)]) for i in range(n)}
    pairs |= {(ys[i % len(ys)], xs[-1 - i % len(xs)]) for i in range(n)}
    return sorted(pairs)


def oracle_boxes(lin, names, where):
    """{name: (P, 4) boxes} of the gradient support at each position, all channels
    together (a Concatenate's channels come from different branches)."""
    fm = feature_model(lin, names)
    shape = tuple(lin.inputs[0].shape[1:])
    batch = sum(len(where[n]) for n in names)
    x = tf.ones((batch,) + shape, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outs = fm(x, training=False)
        total, start = 0.0, 0
        for name, out in zip(names, outs):
            idx = [[start + i, y, xx] for i, (y, xx) in enumerate(where[name])]
            total += tf.reduce_sum(tf.gather_nd(out, idx))
            start += len(idx)
    grad = tape.gradient(total, x).numpy()
    support = np.abs(grad).sum(axis=-1) != 0  # (batch, H, W)
    result, start = {}, 0
    for name in names:
        boxes = []
        for i in range(len(where[name])):
            s = support[start + i]
            r, c = np.flatnonzero(s.any(axis=1)), np.flatnonzero(s.any(axis=0))
            boxes.append([r[0], c[0], r[-1] + 1, c[-1] + 1] if r.size else [0, 0, 0, 0])
        result[name] = np.array(boxes)
        start += len(where[name])
    return result


def check_against_oracle(model, names=None, full=True, lin=None):
    nodes = {n.name: n for n in flat_layers(model)}
    if names is None:
        names = [n for n, node in nodes.items() if node.kind != "input"]
    geos = {n: layer_geometry(model, n) for n in names}
    where = {}
    for n in names:
        h, w = nodes[n].output_shape[:2]
        where[n] = positions(h, w, full)
    got = oracle_boxes(lin if lin is not None else linear_copy(model), names, where)
    for n in names:
        g = geos[n]
        assert g.mappable, (n, g.message)
        ys, xs = np.array(where[n]).T
        np.testing.assert_array_equal(g.boxes(ys, xs), got[n], err_msg=f"layer {n}")
        _check_frame(g, nodes[n].output_shape[:2])
    return geos


def _check_frame(g, hw):
    h, w = hw
    assert g.rows.shape == (h, 2) and g.cols.shape == (w, 2)
    assert g.rows.dtype == np.int32 and g.row_offset.dtype == np.int32
    # the frame is the centre unit's box; a box that fits the frame lies wholly inside it
    assert g.frame == (g.rows[h // 2, 1] - g.rows[h // 2, 0], g.cols[w // 2, 1] - g.cols[w // 2, 0])
    for boxes, offset, side in ((g.rows, g.row_offset, g.frame[0]), (g.cols, g.col_offset, g.frame[1])):
        size = boxes[:, 1] - boxes[:, 0]
        assert (offset[size <= side] + size[size <= side] <= side).all()
    assert (g.row_offset >= 0).all() and (g.col_offset >= 0).all()
    assert (g.rows[:, 0] >= 0).all() and (g.rows[:, 1] <= g.input_size[0]).all()
    assert (g.cols[:, 0] >= 0).all() and (g.cols[:, 1] <= g.input_size[1]).all()


# ---------------------------------------------------------------- hand-built graphs

def chain(shape, *layers, name="chain"):
    x = keras.Input(shape)
    y = x
    for layer in layers:
        y = layer(y)
    return keras.Model(x, y, name=name)


@pytest.mark.parametrize("size", [16, 15])
def test_strided_same_conv_even_and_odd(size):
    model = chain((size, size + 3, 2),
                  L.Conv2D(3, 3, strides=2, padding="same", name="s2"),
                  L.Conv2D(3, 4, strides=2, padding="same", name="s2k4"),
                  L.Conv2D(3, 3, strides=3, padding="same", name="s3"))
    geos = check_against_oracle(model)
    assert geos["s2"].rf_stride == (2, 2) and geos["s3"].rf_stride == (12, 12)


def test_dilated_convs():
    model = chain((17, 20, 1),
                  L.Conv2D(2, 3, dilation_rate=3, padding="same", name="d3"),
                  L.Conv2D(2, 3, dilation_rate=2, padding="same", name="d2"),
                  L.Conv2D(2, 3, dilation_rate=(2, 3), padding="valid", name="d23v"),
                  L.Conv2D(2, 1, name="k1"))
    geos = check_against_oracle(model)
    # a dilated border unit reads a tap set with holes that starts inside the image
    assert geos["d3"].rows[0].tolist() == [0, 4]
    assert geos["d3"].rows[1].tolist() == [1, 5]


def test_stacked_dilations_keep_holes():
    """The taps of stacked dilated convs have holes; a hole position's own taps would
    reach pixels the unit never reads, so an interval-only propagation gets it wrong."""
    model = chain((20, 9, 1),
                  L.Conv2D(1, (3, 5), dilation_rate=(3, 2), padding="same", name="a"),
                  L.Conv2D(1, (3, 5), dilation_rate=(4, 4), padding="same", name="b"))
    geos = check_against_oracle(model)
    assert geos["b"].rows[1].tolist() == [1, 9]  # not [0, 9]
    assert geos["b"].cols[1].tolist() == [1, 8]  # not [0, 9]


def test_valid_and_pointwise_strided_convs():
    model = chain((21, 18, 3),
                  L.Conv2D(2, 5, padding="valid", name="v5"),
                  L.Conv2D(2, 1, strides=2, name="k1s2"),
                  L.Conv2D(2, (3, 2), strides=(2, 1), padding="valid", name="v32"),
                  L.Conv2D(2, 3, padding="same", name="same3"))
    geos = check_against_oracle(model)
    assert geos["k1s2"].frame == (5, 5) and geos["k1s2"].rf_stride == (2, 2)


@pytest.mark.parametrize("size", [20, 19])
def test_pooling(size):
    model = chain((size, size, 2),
                  L.MaxPooling2D(3, strides=2, padding="same", name="max_same"),
                  L.AveragePooling2D(2, padding="valid", name="avg_valid"),
                  L.MaxPooling2D(2, strides=1, padding="valid", name="max_valid"),
                  L.AveragePooling2D(3, strides=2, padding="same", name="avg_same"))
    check_against_oracle(model)


def test_zero_padding_and_cropping():
    model = chain((14, 15, 2),
                  L.ZeroPadding2D(((1, 3), (2, 0)), name="pad"),
                  L.Conv2D(2, 3, strides=2, padding="valid", name="c1"),
                  L.Cropping2D(((1, 0), (0, 2)), name="crop"),
                  L.Conv2D(2, 3, padding="same", name="c2"),
                  L.ZeroPadding2D(2, name="pad2"),
                  L.Conv2D(2, 1, name="c3"))
    geos = check_against_oracle(model)
    # pad2's border units read only padding: empty boxes
    assert geos["c3"].rows[0].tolist() == [0, 0] and geos["c3"].boxes(0, 5)[2] == 0


def _branches(merge):
    x = keras.Input((18, 13, 2))
    stem = L.Conv2D(4, 3, strides=2, padding="same", name="stem")(x)
    a = L.Conv2D(4, 1, name="narrow")(stem)
    b = L.Conv2D(4, 3, padding="same", name="wide1")(stem)
    b = L.Conv2D(4, 3, dilation_rate=2, padding="same", name="wide2")(b)
    c = L.MaxPooling2D(3, strides=1, padding="same", name="pool")(stem)
    y = merge([a, b, c])
    y = L.BatchNormalization(name="bn")(y)
    y = L.ReLU(name="relu")(y)
    y = L.Conv2D(4, 3, strides=2, padding="same", name="head")(y)
    return keras.Model(x, y, name="branches")


@pytest.mark.parametrize("merge", ["add", "concat", "multiply", "average"])
def test_branches(merge):
    # (Maximum/Minimum are mapped as a union too, but their gradient only reaches the
    # winning branch, so the gradient oracle cannot check them)
    make = {"add": L.Add, "concat": L.Concatenate, "multiply": L.Multiply,
            "average": L.Average}[merge]
    model = _branches(make(name="merge"))
    geos = check_against_oracle(model, full=merge in ("add", "concat"))
    # the union is as wide as the widest branch
    assert geos["merge"].frame == geos["wide2"].frame


def _nested():
    inner_in = keras.Input((12, 11, 4))
    h = L.Conv2D(4, 3, strides=2, padding="same", name="conv")(inner_in)
    h = L.DepthwiseConv2D(3, dilation_rate=2, padding="same", name="dw")(h)
    h = L.Activation("relu", name="act")(h)
    inner = keras.Model(inner_in, h, name="inner")
    block = keras.Sequential([keras.Input((6, 6, 4)),
                              L.SeparableConv2D(4, 3, padding="same", name="sep"),
                              L.ReLU(name="relu")], name="block")
    x = keras.Input((23, 21, 3))
    y = L.Conv2D(4, 3, strides=2, padding="valid", name="stem")(x)
    y = L.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(y)
    y = inner(y)
    y = block(y)
    y = L.SeparableConv2D(4, 3, strides=2, padding="same", name="sep_s2")(y)
    y = L.DepthwiseConv2D(5, padding="same", name="dw5")(y)
    return keras.Model(x, y, name="outer")


def test_nested_models_and_separable_convs():
    model = _nested()
    geos = check_against_oracle(model)
    assert {"inner/dw", "block/sep", "dw5"} <= set(geos)
    assert geos["inner/dw"].rf_stride == (4, 4)


def test_matches_flat_model_with_same_layers():
    nested = layer_geometry(_nested(), "inner/dw")
    flat = chain((23, 21, 3), L.Conv2D(4, 3, strides=2, padding="valid"),
                 L.ZeroPadding2D(((0, 1), (0, 1))), L.Conv2D(4, 3, strides=2, padding="same"),
                 L.DepthwiseConv2D(3, dilation_rate=2, padding="same", name="dw"))
    other = layer_geometry(flat, "dw")
    for field in ("rows", "cols", "row_offset", "col_offset"):
        np.testing.assert_array_equal(getattr(nested, field), getattr(other, field))
    assert nested.frame == other.frame


# ---------------------------------------------------------------- frame and offsets

def test_offsets_place_cut_boxes_in_the_frame():
    model = chain((32, 32, 1), L.Conv2D(1, 7, strides=2, padding="same", name="c"))
    g = layer_geometry(model, "c")
    # same padding, 32 -> 16, total pad 5, 2 before: unit 0 reads rows -2..4, clipped 0..4
    assert g.frame == (7, 7)
    assert g.rows[0].tolist() == [0, 5] and g.row_offset[0] == 2
    assert g.rows[15].tolist() == [28, 32] and g.row_offset[15] == 0
    assert g.rows[8].tolist() == [14, 21] and g.row_offset[8] == 0
    assert g.boxes(np.array([[0, 15]]), np.array([[8, 0]])).shape == (1, 2, 4)
    assert g.offsets(0, 15).tolist() == [2, 0]
    # every box fits in the frame once offset
    assert (g.row_offset + g.rows[:, 1] - g.rows[:, 0] <= g.frame[0]).all()


def test_border_box_stays_whole_when_field_exceeds_image():
    """The centre unit's field is cut on both sides; a border unit's cut box keeps its
    side of the frame (zeros towards the border) but is never pushed out of it."""
    model = chain((9, 9, 1), L.Conv2D(1, 7, padding="same", name="a"),
                  L.Conv2D(1, 7, padding="same", name="b"))
    g = layer_geometry(model, "b")
    assert g.frame == (9, 9)
    assert g.rows[0].tolist() == [0, 7] and g.row_offset[0] == 2  # uncut offset 6, capped at 9 - 7
    assert g.rows[8].tolist() == [2, 9] and g.row_offset[8] == 0
    assert (g.row_offset + g.rows[:, 1] - g.rows[:, 0] <= g.frame[0]).all()


# ---------------------------------------------------------------- unmappable and errors

def test_global_pooling_is_unmappable():
    x = keras.Input((16, 16, 3))
    y = L.Conv2D(4, 3, padding="same", name="conv")(x)
    g = L.GlobalAveragePooling2D(name="gap")(y)
    d = L.Dense(2, name="dense")(g)
    model = keras.Model(x, d)
    for name in ("gap", "dense"):
        geo = layer_geometry(model, name)
        assert not geo.mappable
        assert "'gap'" in geo.message and "whole image" in geo.message
        assert geo.boxes(0, 0).tolist() == [0, 0, 16, 16]
        assert geo.boxes(np.zeros(3, int), np.zeros(3, int)).shape == (3, 4)
    assert layer_geometry(model, "conv").mappable


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (4, 2), (3, 3), (2, 1)])
def test_transposed_convolutions(padding, kernel, stride):
    x = keras.Input((9, 11, 2))
    y = L.Conv2D(2, 3, strides=2, padding="same", name="down")(x)
    y = L.Conv2DTranspose(3, kernel, strides=stride, padding=padding, name="up")(y)
    y = L.Conv2D(2, 3, padding="same", name="after")(y)
    geos = check_against_oracle(keras.Model(x, y), ["up", "after"])
    assert geos["up"].rf_stride == pytest.approx((2 / stride, 2 / stride))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_upsampling_and_resizing(interpolation):
    x = keras.Input((10, 13, 1))
    y = L.Conv2D(2, 3, padding="same", name="conv")(x)
    y = L.UpSampling2D((2, 3), interpolation=interpolation, name="up")(y)
    y = L.Conv2D(2, 3, padding="same", name="after_up")(y)
    y = L.Resizing(20, 39, interpolation=interpolation, name="noop")(y)  # the size it has: a no-op
    y = L.Resizing(10, 13, interpolation=interpolation, name="down")(y)  # integer factors down
    y = L.Resizing(25, 21, interpolation=interpolation, name="odd")(y)  # neither
    y = L.Conv2D(1, 3, padding="same", name="last")(y)
    geos = check_against_oracle(keras.Model(x, y), ["up", "after_up", "noop", "down", "odd", "last"])
    assert geos["up"].rf_stride == (0.5, 1 / 3)


def test_reshape_and_permute_that_keep_the_grid_and_normalisations():
    x = keras.Input((8, 6, 4))
    y = L.Conv2D(4, 3, padding="same", name="conv")(x)
    y = L.Reshape((8, 6, 4), name="noop_reshape")(y)
    y = L.Permute((1, 2, 3), name="noop_permute")(y)
    y = L.Conv2D(2, 3, padding="same", name="after")(y)
    check_against_oracle(keras.Model(x, y), ["noop_reshape", "noop_permute", "after"])
    z = L.GroupNormalization(2, name="group_norm")(L.Conv2D(4, 3, padding="same", name="c")(x))
    z = L.Conv2D(2, 3, padding="same", name="after_norm")(z)
    geo = layer_geometry(keras.Model(x, z), "after_norm")
    assert geo.mappable and geo.frame == (5, 5) and "group_norm" in geo.message
    w = L.Permute((2, 1, 3), name="swap")(L.Conv2D(4, 3, padding="same", name="c2")(x))
    geo = layer_geometry(keras.Model(x, w), "swap")
    assert not geo.mappable and "'swap'" in geo.message and "rearranges" in geo.message


def test_odd_non_square_input_with_strides_dilation_and_nested_sequential():
    inner = keras.Sequential([keras.Input((31, 34, 4)), L.Conv2D(5, 3, strides=2, padding="same", name="s2"),
                              L.Conv2D(5, 3, dilation_rate=2, padding="same", name="dil")], name="inner")
    x = keras.Input((61, 67, 3))
    y = L.Conv2D(4, 3, strides=2, padding="same", name="first")(x)
    y = inner(y)
    y = L.MaxPooling2D(3, strides=2, padding="valid", name="pool")(y)
    model = keras.Model(x, L.Conv2D(3, 2, padding="valid", name="last")(y))
    geos = check_against_oracle(model, ["first", "inner/s2", "inner/dil", "pool", "last"])
    assert geos["last"].input_size == (61, 67) and geos["last"].rows.shape[0] != geos["last"].cols.shape[0]


def test_custom_layers_unmappable_until_declared_pointwise():
    class Scale(L.Layer):
        def call(self, x):
            return x * 2.0

    x = keras.Input((8, 8, 1))
    y = Scale(name="scale")(L.Conv2D(1, 3, padding="same", name="conv")(x))
    model = keras.Model(x, L.Conv2D(1, 3, padding="same", name="after")(y))
    geo = layer_geometry(model, "after")
    assert not geo.mappable and "'scale'" in geo.message and "geometry.pointwise=[Scale]" in geo.message
    geo = layer_geometry(model, "after", pointwise=["Scale"])
    assert geo.mappable and geo.frame == (5, 5)


def test_squeeze_excitation_gate_is_left_out():
    x = keras.Input((16, 16, 3))
    y = L.Conv2D(4, 3, padding="same", name="conv")(x)
    s = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(y)
    s = L.Conv2D(4, 1, activation="sigmoid", name="excite")(s)
    z = L.Multiply(name="gate")([y, s])
    geo = layer_geometry(keras.Model(x, z), "gate")
    assert geo.mappable and geo.frame == (3, 3) and "broadcast" in geo.message


def test_keras_ops_in_the_graph_are_mapped():
    def build(use_ops):
        x = keras.Input((15, 15, 2))
        a = L.Conv2D(2, 3, strides=2, padding="same", name="a")(x)
        b = L.Conv2D(2, 5, strides=2, padding="same", name="b")(x)
        y = keras.ops.relu(keras.ops.add(a, b)) if use_ops else L.ReLU()(L.Add()([a, b]))
        y = L.Conv2D(2, 3, padding="same", name="c")(y)
        return keras.Model(x, y)
    with_ops, with_layers = layer_geometry(build(True), "c"), layer_geometry(build(False), "c")
    assert with_ops.mappable and with_ops.frame == with_layers.frame == (9, 9)
    np.testing.assert_array_equal(with_ops.rows, with_layers.rows)


def test_needs_fixed_input_size():
    model = chain((None, None, 3), L.Conv2D(2, 3, name="c"))
    with pytest.raises(PipelineError, match="input_size"):
        layer_geometry(model, "c")


def test_unknown_layer_name():
    model = chain((8, 8, 1), L.Conv2D(1, 3, name="conv_a"))
    with pytest.raises(PipelineError, match="conv_a"):
        layer_geometry(model, "conv_b")


# ---------------------------------------------------------------- real architectures

def _pick(model, cls, i=0):
    return [layer.name for layer in model.layers if isinstance(layer, cls)][i]


@pytest.mark.slow
def test_vgg16():
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
    geos = check_against_oracle(model, ["block1_conv2", "block3_pool", "block5_conv3"], full=False)
    assert geos["block1_conv2"].frame == (5, 5) and geos["block3_pool"].rf_stride == (8, 8)


@pytest.mark.slow
def test_resnet50():
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(67, 67, 3))
    check_against_oracle(model, ["conv1_relu", "pool1_pool", "conv2_block3_out",
                                 "conv4_block1_out", "conv5_block3_out"], full=False)


@pytest.mark.slow
def test_mobilenet_v2():
    model = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(67, 67, 3))
    check_against_oracle(model, ["Conv1_relu", "block_1_pad", "block_3_depthwise_relu",
                                 "block_6_project_BN", "out_relu"], full=False)


@pytest.mark.slow
def test_inception_v3():
    model = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(75, 75, 3))
    check_against_oracle(model, [_pick(model, L.MaxPooling2D), "mixed1", "mixed7"], full=False)


@pytest.mark.slow
def test_nested_application_backbone():
    """A transfer model: keras.applications backbone as a layer of an outer model."""
    backbone = keras.applications.MobileNetV2(weights=None, include_top=False,
                                              input_shape=(64, 64, 3), alpha=0.35)
    x = keras.Input((64, 64, 3))
    y = backbone(x)
    y = L.Conv2D(8, 3, padding="same", name="head")(y)
    model = keras.Model(x, y)
    prefix = backbone.name + "/"
    check_against_oracle(model, [prefix + "block_2_add", prefix + "block_13_pad", "head"],
                         full=False)


def test_many_gates_log_one_short_line_and_details_at_debug(caplog):
    # EfficientNetB0's 16 squeeze-and-excitation gates made a 1,423-character info line
    x = keras.Input((16, 16, 3))
    y = x
    for i in range(12):
        y = L.Conv2D(4, 3, padding="same", name=f"block{i}_conv")(y)
        s = L.GlobalAveragePooling2D(keepdims=True, name=f"block{i}_squeeze")(y)
        s = L.Conv2D(4, 1, activation="sigmoid", name=f"block{i}_excite")(s)
        y = L.Multiply(name=f"block{i}_gate")([y, s])
    with caplog.at_level(logging.DEBUG, logger="pipeline.geometry"):
        geo = layer_geometry(keras.Model(x, y), "block11_gate")
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(info) == 1 and len(info[0]) < 250, info
    assert "12 layers ignore an input broadcast from a 1x1 map" in info[0] and "such as block" in info[0]
    assert all(any(f"block{i}_gate ignores" in d for d in debug) for i in range(12))
    assert geo.mappable and geo.message.count("broadcast") == 12  # results.h5 keeps every note
