"""Flattening nested Keras models, and feature models on nested layers."""

import keras
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.graph import feature_model, flat_layers, resolve_layer_names

L = keras.layers


def build():
    """outer: stem -> shared conv twice -> nested model twice -> add -> nested Sequential -> gap."""
    inner_in = keras.Input((8, 8, 4), name="inner_in")
    h = L.Conv2D(5, 3, padding="same", name="c1")(inner_in)
    h = L.ReLU(name="r1")(h)
    inner = keras.Model(inner_in, h, name="inner")
    seq = keras.Sequential([keras.Input((8, 8, 5)), L.Conv2D(3, 1, name="sc"),
                            L.Activation("tanh", name="st")], name="seq")
    x = keras.Input((16, 16, 3), name="img")
    y = L.Conv2D(4, 3, strides=2, padding="same", name="stem")(x)
    shared = L.Conv2D(4, 1, name="shared")
    a = shared(y)
    b = shared(a)
    z = L.Add(name="add")([inner(b), inner(a)])
    w = seq(z)
    out = L.GlobalAveragePooling2D(name="gap")(w)
    return keras.Model(x, out, name="outer"), inner, seq, {"a": a, "b": b, "z": z}


@pytest.fixture(scope="module")
def model():
    return build()


def test_flat_names_order_and_shapes(model):
    outer = model[0]
    nodes = flat_layers(outer)
    names = [n.name for n in nodes]
    assert names == ["img", "stem", "shared", "shared@1", "inner/c1", "inner/r1",
                     "inner@1/c1", "inner@1/r1", "add", "seq/sc", "seq/st", "gap"]
    by = {n.name: n for n in nodes}
    assert by["img"].kind == "input" and by["img"].inputs == []
    assert by["inner/c1"].inputs == ["shared@1"] and by["inner@1/c1"].inputs == ["shared"]
    assert by["add"].inputs == ["inner/r1", "inner@1/r1"]
    assert by["seq/sc"].inputs == ["add"]
    assert by["inner/c1"].output_shape == (8, 8, 5) and by["gap"].output_shape == (3,)
    assert by["inner/c1"].layer is by["inner@1/c1"].layer  # same layer object, two calls
    assert by["inner/c1"].depth == 1 and by["stem"].depth == 0
    seen = set()
    for n in nodes:  # topological
        assert set(n.inputs) <= seen, n.name
        seen.add(n.name)


def test_sequential_outer_model():
    model = keras.Sequential([keras.Input((10, 10, 1)), L.Conv2D(2, 3, name="a"),
                              keras.Sequential([L.Conv2D(2, 3, name="b")], name="block"),
                              L.Flatten(name="f")], name="s")
    names = [n.name for n in flat_layers(model)]
    assert names[1:] == ["a", "block/b", "f"] and flat_layers(model)[0].kind == "input"
    x = np.random.default_rng(0).random((2, 10, 10, 1)).astype("float32")
    fb = feature_model(model, ["block/b"])(x)  # one name: Keras returns a bare tensor
    expect = model.get_layer("block")(model.get_layer("a")(x))
    np.testing.assert_allclose(np.asarray(fb), np.asarray(expect), rtol=1e-5, atol=1e-6)


def test_unbuilt_sequential_is_an_error():
    with pytest.raises(PipelineError, match="input shape"):
        flat_layers(keras.Sequential([L.Conv2D(2, 3)]))


def test_feature_model_matches_nested_activations(model):
    outer, inner, seq, tensors = model
    x = np.random.default_rng(1).random((3, 16, 16, 3)).astype("float32")
    fm = feature_model(outer, ["inner/c1", "inner@1/r1", "seq/sc", "stem", "shared@1"])
    got = [np.asarray(t) for t in fm(x)]

    # the same activations computed another way: the outer model up to what feeds the
    # nested model, then the nested model's own layers alone
    feeds = keras.Model(outer.input, [tensors["a"], tensors["b"], tensors["z"]])
    a, b, z = [np.asarray(t) for t in feeds(x)]
    inner_c1 = keras.Model(inner.input, inner.get_layer("c1").output)
    seq_sc = keras.Model(seq.inputs[0], seq.get_layer("sc").output)
    np.testing.assert_allclose(got[0], np.asarray(inner_c1(b)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], np.asarray(inner(a)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[2], np.asarray(seq_sc(z)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[4], b, rtol=1e-5, atol=1e-6)
    assert got[3].shape == (3, 8, 8, 4)


def test_feature_model_shares_weights_and_prunes(model):
    outer, inner, _, _ = model
    fm = feature_model(outer, ["inner/c1"])
    ids = {id(v) for v in outer.weights}
    assert fm.weights and all(id(v) in ids for v in fm.weights)
    names = {layer.name for layer in fm.layers}
    assert "seq" not in names and "gap" not in names and "add" not in names
    # changing the model's weights changes the feature model
    x = np.ones((1, 16, 16, 3), "float32")
    before = np.asarray(fm(x))
    kernel = inner.get_layer("c1").kernel
    kernel.assign(kernel.numpy() * 2)
    assert not np.allclose(np.asarray(fm(x)), before)
    kernel.assign(kernel.numpy() / 2)


def test_feature_model_multi_input_and_ops():
    x1 = keras.Input((6, 6, 2), name="left")
    x2 = keras.Input((6, 6, 2), name="right")
    s = keras.ops.add(L.Conv2D(2, 3, padding="same", name="ca")(x1),
                      L.Conv2D(2, 3, padding="same", name="cb")(x2))
    s = keras.ops.relu(s)
    inner_in = keras.Input((6, 6, 2))
    inner = keras.Model(inner_in, L.Conv2D(1, 1, name="k")(inner_in), name="head")
    model = keras.Model([x1, x2], inner(s))
    nodes = {n.name: n for n in flat_layers(model)}
    assert nodes["left"].kind == nodes["right"].kind == "input"
    assert [n.kind for n in nodes.values()].count("op") == 2
    fm = feature_model(model, ["head/k"])
    a = np.random.default_rng(2).random((2, 6, 6, 2)).astype("float32")
    b = np.random.default_rng(3).random((2, 6, 6, 2)).astype("float32")
    np.testing.assert_allclose(np.asarray(fm([a, b])), np.asarray(model([a, b])),
                               rtol=1e-5, atol=1e-6)


def test_resolve_aliases_and_suffixes(model):
    outer = model[0]
    assert resolve_layer_names(outer, ["inner", "seq", "sc", "stem"]) == \
        ["inner/r1", "seq/st", "seq/sc", "stem"]
    assert resolve_layer_names(outer, "inner@1/c1") == ["inner@1/c1"]
    with pytest.raises(PipelineError, match="ambiguous.*inner/c1.*inner@1/c1"):
        resolve_layer_names(outer, ["c1"])


def test_unknown_name_lists_nearest(model):
    outer = model[0]
    with pytest.raises(PipelineError) as err:
        resolve_layer_names(outer, ["stem", "inner/r2"])
    message = str(err.value)
    assert "\n" not in message
    assert "'inner/r2'" in message and "inner/r1" in message
    assert "model summary" in message
    with pytest.raises(PipelineError, match="no similar names"):
        feature_model(outer, ["zzzzzzzz"])
