"""The models users bring: non-square, grey, self-normalising, multi-output, nested, and the
ones cnn-lens cannot read (said in one line)."""

import json
import logging

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from test_pipeline import compose_cfg
from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.graph import feature_model
from pipeline.models.sources import load_model
from pipeline.preprocess import normalize
from pipeline.runner import run
from pipeline.topk import topk_from_maps

L = keras.layers


def _set_weights(model, seed):
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) * 0.5 for w in model.get_weights()])


def _save(model, path, seed=0):
    _set_weights(model, seed)
    model.save(path)
    return path


def _files(overrides, path):
    return ["model=file", f"model.path={path}", *overrides]


def _pixels(cfg):
    spec = load_model(cfg.model).preprocessing
    return spec, {int(i): p for ids, batch in BatchStream(list_images(cfg.dataset), spec, 8)
                  for i, p in zip(ids, batch.numpy())}


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """61 x 67 input, 'same' stride 2, dilation, a nested Sequential, then a classifier."""
    path = tmp_path_factory.mktemp("odd") / "odd.keras"
    inner = keras.Sequential([keras.Input((31, 34, 4)), L.Conv2D(5, 3, strides=2, padding="same", name="s2"),
                              L.ReLU(name="r2"), L.Conv2D(6, 3, dilation_rate=2, padding="same", name="dil"),
                              L.ReLU(name="r3")], name="inner")
    x = keras.Input((61, 67, 3))
    y = L.ReLU(name="r1")(L.Conv2D(4, 3, strides=2, padding="same", name="first")(x))
    y = inner(y)
    out = L.Dense(3, name="logits")(L.GlobalAveragePooling2D(name="gap")(y))
    return _save(keras.Model(x, out, name="odd"), path)


@pytest.mark.slow
def test_a_non_square_model_through_every_stage(tmp_path, photo_folder, odd_model):
    stages = "stages=[scan,crop,panels,activations,cam,occlusion,filters,report,export]"
    cfg = compose_cfg(_files(["model.preprocess=unit", "dataset=folder", f"dataset.path={photo_folder}",
                              "layers=[r1,inner,inner/r2]", "topk=3", "batch_size=4", "crop.max_size=0",
                              "panels.methods=[guided]", "filters.steps=4", "filters.size=24", "filters.channels=2",
                              "occlusion.size=16", "occlusion.stride=12", "activations.images=2",
                              "cam.methods=[gradcam]", "report.per_image=2", stages], odd_model))
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    spec, pixels = _pixels(cfg)
    assert spec.size == (61, 67) and next(iter(pixels.values())).shape == (61, 67, 3)
    model = keras.models.load_model(odd_model, compile=False)
    ids = np.array(sorted(pixels))
    x = normalize(np.stack([pixels[i] for i in ids]), "unit")
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert list(f.attrs["input_size"]) == [61, 67]
        # a nested model asked for by its name is stored under that name
        assert sorted(f["layers"]) == ["inner", "inner.r2", "r1"]
        assert f["layers/inner"].attrs["name"] == "inner/r3"
        for key, name in (("r1", "r1"), ("inner", "inner/r3"), ("inner.r2", "inner/r2")):
            g = f[f"layers/{key}"]
            maps = feature_model(model, [name])(x).numpy()
            want = topk_from_maps(maps, ids, 3)
            np.testing.assert_array_equal(g["topk/image"][()], want.image)
            np.testing.assert_array_equal(g["topk/y"][()], want.y)
            np.testing.assert_array_equal(g["topk/x"][()], want.x)
            image, box, y, xx = (g[f"topk/{k}"][()] for k in ("image", "box", "y", "x"))
            patches = g["patches"][()]
            row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
            assert g["geometry/rows"].shape[0] == maps.shape[1] and g["geometry/cols"].shape[0] == maps.shape[2]
            for c in range(image.shape[0]):
                for k in range(image.shape[1]):
                    y0, x0, y1, x1 = box[c, k]
                    assert 0 <= y0 < y1 <= 61 and 0 <= x0 < x1 <= 67
                    oy, ox = row_offset[y[c, k]], col_offset[xx[c, k]]
                    expected = np.zeros_like(patches[c, k])
                    expected[oy:oy + y1 - y0, ox:ox + x1 - x0] = pixels[image[c, k]][y0:y1, x0:x1]
                    np.testing.assert_array_equal(patches[c, k], expected)
            assert g["panels/guided"].shape[:2] == patches.shape[:2]
        assert f["cam/gradcam/map"].shape[1:] == (16, 17)  # inner/r3 of a 61 x 67 input
        assert f["occlusion/rows"].shape == (5,) and f["occlusion/cols"].shape == (6,)  # 16 px every 12 px
        assert f["occlusion/probability"].shape[1:] == (5, 6)
        assert f["activations/r1"].shape[1:] == (31, 34, 4)
        assert f["filters/r1/patterns"].shape == (2, 61, 67, 3)
    with h5py.File(run_dir / "results.h5", "r") as f:
        frame = f["layers/inner/patches"].shape[2:4]
    with Image.open(run_dir / "toolbox/max_im/inner/inner_0000.jpg") as im:
        assert im.size == (2 * frame[1], 2 * frame[0])  # top-3: a 2 x 2 montage of (h, w) patches
    assert (run_dir / "index.html").exists() and (run_dir / "report.pdf").exists()


@pytest.mark.slow
def test_a_grey_model_through_the_default_stages_and_the_export(tmp_path, photo_folder):
    x = keras.Input((20, 20, 1))
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(x)
    y = L.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="conv2")(y)
    path = _save(keras.Model(x, L.Dense(3, name="logits")(L.GlobalAveragePooling2D()(y))), tmp_path / "grey.keras")
    cfg = compose_cfg(_files(["dataset=folder", f"dataset.path={photo_folder}", "layers=[conv1,conv2]",
                              "occlusion.size=8", "occlusion.stride=8", "report.pdf=false"], path))
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert f["layers/conv2/patches"].shape[-1] == 1
        assert json.loads(f.attrs["preprocessing"])["channels"] == 1
    montage = tmp_path / "run/toolbox/max_im/conv2/conv2_0000.jpg"
    with Image.open(montage) as im:
        assert im.mode == "L"
    assert (tmp_path / "run" / "index.html").exists()


def _rescaling_model(path):
    x = keras.Input((16, 16, 3))
    y = L.Rescaling(1 / 255.0, name="rescale")(x)
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(y)
    return _save(keras.Model(x, L.Dense(2, name="logits")(L.GlobalAveragePooling2D()(y))), path)


def test_a_model_that_scales_its_input_gets_raw_pixels(tmp_path, photo_folder, caplog):
    path = _rescaling_model(tmp_path / "rescale.keras")
    cfg = compose_cfg(_files(["dataset=folder", f"dataset.path={photo_folder}", "layers=[conv]",
                              "stages=[activations]", "activations.images=2"], path))
    run(cfg, tmp_path / "run")
    spec, pixels = _pixels(cfg)
    assert spec.normalize == "none"
    model = keras.models.load_model(path, compile=False)
    want = feature_model(model, ["conv"])(np.stack([pixels[0], pixels[1]]).astype(np.float32)).numpy()
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        np.testing.assert_allclose(f["activations/conv"][()].astype(np.float32), want, rtol=2e-3, atol=1e-3)
    with caplog.at_level(logging.WARNING, logger="pipeline.models.sources"):
        load_model(compose_cfg(_files(["model.preprocess=unit"], path)).model)
    assert any("scales them again" in r.getMessage() and "rescale" in r.getMessage() for r in caplog.records)


def test_model_output_chooses_the_head_that_is_explained(tmp_path, photo_folder):
    x = keras.Input((16, 16, 3))
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(x)
    pooled = L.GlobalAveragePooling2D()(y)
    path = _save(keras.Model(x, [L.Dense(3, name="head_a")(pooled), L.Dense(5, name="head_b")(pooled)]),
                 tmp_path / "two.keras")
    model = keras.models.load_model(path, compile=False)
    got = {}
    for output, want in (("head_a", 0), ("1", 1), (None, 0)):
        cfg = compose_cfg(_files(["model.preprocess=unit", "dataset=folder", f"dataset.path={photo_folder}",
                                  "stages=[cam]", "cam.methods=[gradcam]", "cam.draw=0"]
                                 + ([] if output is None else [f"model.output={output}"]), path))
        run(cfg, tmp_path / f"run_{output}")
        spec, pixels = _pixels(cfg)
        with h5py.File(tmp_path / f"run_{output}" / "results.h5", "r") as f:
            ids, score = f["cam/image"][()], f["cam/gradcam/score"][()]
            logits = model(normalize(np.stack([pixels[int(i)] for i in ids]), "unit"))[want].numpy()
            np.testing.assert_allclose(score, logits.max(axis=1), rtol=1e-5)
            assert f["predictions/class"].shape[1] == min(5, logits.shape[1])
            got[output] = score
    assert not np.allclose(got["head_a"], got["1"])
    with pytest.raises(PipelineError, match="model.output=head_c is not an output.*head_a, head_b"):
        run(compose_cfg(_files(["dataset=folder", f"dataset.path={photo_folder}", "stages=[cam]",
                                "model.output=head_c"], path)), tmp_path / "bad")


def test_models_that_are_not_channels_last_images_are_one_line(tmp_path):
    cases = {}
    x = keras.Input((3, 24, 24))
    y = L.Conv2D(4, 3, data_format="channels_first", name="cf")(x)
    cases["channels_first"] = (keras.Model(x, y), "channels_first")
    x = keras.Input((10,))
    cases["vector"] = (keras.Model(x, L.Dense(2)(x)), "image models")
    x = keras.Input((16, 16, 4))
    cases["four"] = (keras.Model(x, L.Conv2D(2, 3)(x)), "4-channel")
    for name, (model, message) in cases.items():
        path = tmp_path / f"{name}.keras"
        model.save(path)
        with pytest.raises(PipelineError, match=message):
            load_model(compose_cfg(_files([], path)).model)
    with pytest.raises(PipelineError, match="model.preprocess=scale is unknown"):
        load_model(compose_cfg(_files(["model.preprocess=scale"], path)).model)
    with pytest.raises(PipelineError, match=r"model.input_size=\[0, 3\]"):
        load_model(compose_cfg(_files(["model.input_size=[0,3]"], path)).model)


def test_random_keras_application_weights_are_marked(tmp_path, photo_folder):
    cfg = compose_cfg(["model=keras_app", "model.name=MobileNetV2", "model.weights=null", "model.input_size=[64,96]",
                       "dataset=folder", f"dataset.path={photo_folder}", "layers=last",
                       "stages=[scan,cam]", "cam.methods=[gradcam]", "cam.draw=0"])
    bundle = load_model(cfg.model)
    assert bundle.preprocessing.size == (64, 96) and bundle.model.output_shape == (None, 1000)  # keeps the classifier
    assert bundle.random_weights and not bundle.imagenet_classes and "random weights" in bundle.name
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert f.attrs["random_weights"] and "random weights" in f.attrs["model"]
        assert not f.attrs["imagenet_classes"] and f["cam/gradcam/map"].shape[1:] == (2, 3)


def test_random_keras_application_weights_are_the_same_network_in_every_stage():
    """Each stage loads the model again: unseeded random weights made the panels stage of a
    VGG16 run see another network than its scan (every crop 'differed', hours on whole images)."""
    import random

    cfg = compose_cfg(["model=keras_app", "model.name=MobileNet", "model.weights=null", "model.input_size=[32,32]"])
    random.seed(7)
    before = random.random()
    random.seed(7)
    first, second = (load_model(cfg.model).model.get_weights() for _ in range(2))
    assert random.random() == before  # the caller's random state is untouched
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert np.std(first[0]) > 0


def test_keras_app_normalisation_equals_each_familys_preprocess_input():
    """The family table against Keras' own preprocess_input, module by module (caffe's BGR
    and mean, torch's mean and std, tf's [-1, 1], and 'none' for models that scale inside)."""
    from pipeline.models.sources import _APP_NORMALIZE
    from pipeline.preprocess import normalize

    import sys

    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    modules = {getattr(keras.applications, n).__module__ for n in dir(keras.applications) if n[0].isupper()}
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(_APP_NORMALIZE)  # every family known, none dead
    for module in sorted(modules):  # looked up as the model source looks it up: the constructor's module
        mode = _APP_NORMALIZE[module.rsplit(".", 1)[-1]]
        expected = sys.modules[module].preprocess_input(pixels.astype(np.float32))
        np.testing.assert_allclose(np.asarray(normalize(pixels, mode)), np.asarray(expected), rtol=1e-5, atol=1e-4,
                                   err_msg=module)
