"""The filters stage: kernel table and weights, patterns in results.h5, sheets, the
toolbox's regularized_opt files, resuming, bad config; on tiny hand-set models, the
embedded MobileNetV2 and run.py as a process."""

import json
import math

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.graph import feature_model
from pipeline.preprocess import normalize
from pipeline.runner import run
from pipeline.render import filters as F
from pipeline.store import read_strings
from test_cli import error_lines, run_py
from test_pipeline import compose_cfg

L = keras.layers


def small_model(path, softmax=False):
    """conv1 (5 filters, 3x3 on RGB) -> BN -> ReLU -> depthwise 3x3 -> ReLU -> 1x1 conv -> GAP -> Dense."""
    rng = np.random.default_rng(5)
    inp = keras.Input((20, 20, 3))
    x = L.Conv2D(5, 3, padding="same", name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.ReLU(name="relu2")(x)
    x = L.Conv2D(6, 1, name="pw")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(4, activation="softmax" if softmax else None, name="logits")(x)
    model = keras.Model(inp, out, name="small")
    weights = []
    for w, v in zip(model.get_weights(), model.weights):
        if v.path.endswith(("gamma", "moving_variance")):
            w = np.ones_like(w)
        elif v.path.endswith(("beta", "moving_mean", "bias")):
            w = np.full_like(w, 0.1)
        else:
            w = rng.normal(size=w.shape).astype(np.float32) / np.sqrt(np.prod(w.shape[:-1]))
        weights.append(w)
    model.set_weights(weights)
    model.save(path)
    return model


def cfg_for(tmp_path, *overrides, softmax=False):
    path = tmp_path / ("soft.keras" if softmax else "small.keras")
    model = small_model(path, softmax)
    base = ["model=file", f"model.path={path}", "model.preprocess=torch", "stages=[filters]",
            "filters.steps=24", "filters.batch_size=4"]
    return model, compose_cfg(base + list(overrides))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("filters")
    model, cfg = cfg_for(tmp_path, "layers=[relu1,relu2]")
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    return model, cfg, run_dir


def test_kernel_table_and_weights_are_the_models(small_run):
    model, _, run_dir = small_run
    with h5py.File(run_dir / "results.h5", "r") as f:
        t = f["filters/kernel_table"]
        assert read_strings(t["layer"]) == ["conv1", "dw", "pw"]
        assert read_strings(t["kind"]) == ["Conv2D", "DepthwiseConv2D", "Conv2D"]
        np.testing.assert_array_equal(t["shape"][()], [[3, 3, 3, 5], [3, 3, 5, 1], [1, 1, 5, 6]])
        # selected: the first convolution and those feeding the pattern layers (relu1 <- bn1 <- conv1, relu2 <- dw)
        assert sorted(k for k in f["filters"] if "weights" in f[f"filters/{k}"]) == ["conv1", "dw"]
        np.testing.assert_array_equal(f["filters/conv1/weights"][()], model.get_layer("conv1").kernel.numpy())
        np.testing.assert_array_equal(f["filters/conv1/bias"][()], model.get_layer("conv1").bias.numpy())
        np.testing.assert_array_equal(f["filters/dw/weights"][()], model.get_layer("dw").kernel.numpy())
        assert tuple(f["filters/conv1"].attrs["kernel_shape"]) == (3, 3, 3, 5)
        # each pattern layer records the convolution that makes its units (cards read it)
        assert [f[f"filters/{k}"].attrs["conv"] for k in ("relu1", "relu2")] == ["conv1", "dw"]
    text = (run_dir / "sheets/filters/kernels.txt").read_text().splitlines()
    assert text[0].split() == ["conv1", "(3,", "3,", "3,", "5)"]


def test_patterns_are_stored_at_input_size_with_the_value_they_reach(small_run):
    model, _, run_dir = small_run
    with h5py.File(run_dir / "results.h5", "r") as f:
        # the stage created results.h5 and wrote the scan's root attributes it can
        assert f.attrs["model"] == "small.keras" and list(f.attrs["input_size"]) == [20, 20]
        assert json.loads(f.attrs["preprocessing"])["normalize"] == "torch"
        assert "relu1" in f.attrs["config"] and f.attrs["version"]
        assert "filters" in json.loads(f.attrs["stages_done"])
        assert "images" not in f and "layers" not in f  # no scan needed
        for name, channels in (("relu1", 5), ("relu2", 5)):
            g = f[f"filters/{name}"]
            patterns = g["patterns"][()]
            assert patterns.shape == (channels, 20, 20, 3) and patterns.dtype == np.uint8
            np.testing.assert_array_equal(g["channels"][()], np.arange(channels))
            assert g["computed"][()].all() and g.attrs["optimised_size"] == 20
            acts = feature_model(model, [name])(normalize(tf.constant(patterns), "torch")).numpy().mean(axis=(1, 2))
            np.testing.assert_allclose(g["value"][()], np.diag(acts), rtol=1e-4, atol=1e-6)
            # every pattern excites its own channel more than a grey image does
            grey = feature_model(model, [name])(normalize(tf.fill((1, 20, 20, 3), 128), "torch")).numpy()
            assert (np.diag(acts) > grey.mean(axis=(0, 1, 2)) + 1e-3).all()
            # and at least as much as any other channel's pattern does (rivals outdone)
            for k in range(channels):
                assert acts[k, k] >= (1 - 2e-3) * np.delete(acts[:, k], k).max(), (name, k, acts[:, k])
            assert set(g["started_from"][()].tolist()) <= set(range(-1, channels))


def test_sheets_and_toolbox_files_follow_results(small_run):
    _, _, run_dir = small_run
    sheets = run_dir / "sheets/filters"
    for name in ("weights_conv1_colour.png", "weights_conv1_channels.png", "weights_conv1.png",
                 "weights_dw.png", "patterns_relu1.png", "patterns_relu2.png"):
        with Image.open(sheets / name) as im:
            assert im.size[0] >= 400 and im.size[1] >= 300, name
    assert not (sheets / "weights_dw_colour.png").exists()  # colour tiles only for the first layer
    with h5py.File(run_dir / "results.h5", "r") as f:
        for name in ("relu1", "relu2"):
            patterns = f[f"filters/{name}/patterns"][()]
            folder = run_dir / "toolbox/regularized_opt" / name
            assert sorted(p.name for p in folder.iterdir()) == \
                sorted([f"{name}_{c:04d}_montage.jpg" for c in range(5)] + ["whole_layer.jpg"])
            for c in range(5):
                one = np.asarray(Image.open(folder / f"{name}_{c:04d}_montage.jpg"))
                assert one.shape == (52, 52, 3)  # 2x2 quarters of 20 + 2 * 3 px
                shown = one[26 + 3:52 - 3, 3:26 - 3]  # what the toolbox shows: bottom-left, less 3 px
                assert np.abs(shown.astype(int) - patterns[c]).mean() < 12
            sprite = np.asarray(Image.open(folder / "whole_layer.jpg"))
            assert sprite.shape == (60, 60, 3)  # ceil(sqrt(5)) = 3 tiles a side
            for c in range(5):
                r, col = divmod(c, 3)
                tile = sprite[r * 20:(r + 1) * 20, col * 20:(col + 1) * 20].astype(int)
                assert np.abs(tile - patterns[c]).mean() < 12
            assert np.abs(sprite[40:60, 40:60].astype(int) - 128).mean() < 3  # slot 8: no such channel


def test_weight_tiles_are_min_max_scaled_over_the_layer():
    kernel = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2) - 5
    tiles = F.colour_tiles(kernel)
    assert tiles.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(tiles[1, 0, 1], (kernel[0, 1, :, 1] + 5) / 23)
    np.testing.assert_allclose(F.colour_tiles(kernel, bgr=True)[1, 0, 1], tiles[1, 0, 1, ::-1])
    per_channel = F.channel_tiles(kernel)  # (out, in, kh, kw)
    np.testing.assert_allclose(per_channel[1, 2], (kernel[:, :, 2, 1] + 5) / 23)
    means = F.mean_tiles(kernel)
    expected = kernel.mean(axis=2).transpose(2, 0, 1)
    np.testing.assert_allclose(means, (expected - expected.min()) / (expected.max() - expected.min()))
    depthwise = F.mean_tiles(np.stack([np.eye(3), 2 * np.eye(3)], axis=2)[..., None], "DepthwiseConv2D")
    assert depthwise.shape == (2, 3, 3) and depthwise[1].max() == 1 and depthwise[0].max() == 0.5
    grid = F.tile_grid(np.ones((3, 2, 2)), cols=2, scale=2)
    assert grid.shape == (9, 9, 3)  # 2x2 tiles of 4x4 px, 1 px gaps
    assert (grid[:4, :4] == 1).all() and np.allclose(grid[4, :4], F.GAP_RGB) and np.allclose(grid[:4, 4], F.GAP_RGB)
    assert (grid[4:, 4:] == 1).all()  # the empty fourth slot is page white


def test_channel_list_seeds_and_resume(tmp_path):
    model, cfg = cfg_for(tmp_path, "layers=[relu2]", "filters.channels=[3,1]", "filters.restarts=4",
                         "filters.weights=all", "filters.steps=16")
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    results = run_dir / "results.h5"
    with h5py.File(results, "r") as f:
        g = f["filters/relu2"]
        np.testing.assert_array_equal(g["channels"][()], [3, 1])
        seeds, values = g["pattern_seeds"][()], g["seed_values"][()]
        assert seeds.shape == (2, 4, 20, 20, 3) and values.shape == (2, 4)
        best = values.argmax(axis=1)
        np.testing.assert_array_equal(g["patterns"][()], seeds[[0, 1], best])
        np.testing.assert_array_equal(g["value"][()], values.max(axis=1))
        assert sorted(k for k in f["filters"] if "weights" in f[f"filters/{k}"]) == ["conv1", "dw", "pw"]
        original = g["patterns"][()]
    folder = run_dir / "toolbox/regularized_opt/relu2"
    assert sorted(p.name for p in folder.iterdir()) == ["relu2_0001_montage.jpg", "relu2_0003_montage.jpg",
                                                       "whole_layer.jpg"]
    montage = np.asarray(Image.open(folder / "relu2_0003_montage.jpg"))
    assert montage.shape == (52, 52, 3)
    assert np.abs(montage[29:49, 3:23].astype(int) - seeds[0, best[0]]).mean() < 12  # the best, where the UI looks
    assert np.abs(montage[13:23, 13:23].astype(int) - seeds[0, 3, ::2, ::2]).mean() < 16  # top-left: the seeds, 2x2
    sprite = np.asarray(Image.open(folder / "whole_layer.jpg"))
    assert sprite.shape == (60, 60, 3)
    assert np.abs(sprite[20:40, 0:20].astype(int) - original[0]).mean() < 12  # channel 3: row 1, column 0
    assert np.abs(sprite[0:20, 0:20].astype(int) - 128).mean() < 3  # channel 0 not computed: grey

    # a run killed before it assembled its chunks, and one killed before its first chunk
    parts = run_dir / "parts"
    for lost in ("assembly", "chunks"):
        (parts / "filters.done").unlink()
        (parts / "filters.h5").unlink()
        chunks = sorted(parts.glob("filters.*/0*.h5"))
        assert len(chunks) == 1
        if lost == "chunks":
            chunks[0].unlink()
        run(cfg, run_dir)
        with h5py.File(results, "r") as f:
            np.testing.assert_array_equal(f["filters/relu2/patterns"][()], original)  # same seed: same image
            assert f["filters/relu2/computed"][()].all()
    # done for this config: skipped; another config in the same directory needs overwrite=true
    stamp = results.stat().st_mtime_ns
    run(cfg, run_dir)
    assert results.stat().st_mtime_ns == stamp
    _, other = cfg_for(tmp_path, "layers=[relu2]", "filters.channels=[3,1]", "filters.steps=17")
    with pytest.raises(PipelineError, match="overwrite=true"):
        run(other, run_dir)


def test_class_objective_uses_logits_before_the_softmax(tmp_path):
    model, cfg = cfg_for(tmp_path, "filters.objective=class", "filters.classes=[2,0]", "filters.steps=16",
                         "filters.toolbox=false", softmax=True)
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run/results.h5", "r") as f:
        g = f["filters/logits"]  # the output layer; its logit is computed from the Dense's input
        assert g.attrs["objective_layer"] == "gap"
        np.testing.assert_array_equal(g["channels"][()], [2, 0])
        assert json.loads(g.attrs["class_names"]) == ["2", "0"]
        assert g.attrs["objective"] == "class" and f["filters"].attrs["upscale"] == "resize"
        pooled = feature_model(model, ["gap"])(normalize(tf.constant(g["patterns"][()]), "torch")).numpy()
        kernel, bias = model.get_layer("logits").get_weights()
        logits = pooled @ kernel + bias
        np.testing.assert_allclose(g["value"][()], logits[[0, 1], [2, 0]], rtol=1e-4, atol=1e-5)
        grey_pooled = feature_model(model, ["gap"])(normalize(tf.fill((1, 20, 20, 3), 128), "torch")).numpy()
        grey_logits = grey_pooled @ kernel + bias
        assert g["value"][0] > grey_logits[0, 2] and g["value"][1] > grey_logits[0, 0]
    assert not (tmp_path / "run/toolbox").exists()


def test_negative_patterns_lower_the_preactivation_and_stay_out_of_the_toolbox(tmp_path):
    model, cfg = cfg_for(tmp_path, "layers=[relu1]", "filters.objective=neg", "filters.channels=[0,1]")
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run/results.h5", "r") as f:
        g = f["filters/relu1"]
        assert g.attrs["objective"] == "neg" and g.attrs["objective_layer"] == "bn1"
        pre = feature_model(model, ["bn1"])(normalize(tf.constant(g["patterns"][()]), "torch")).numpy()
        np.testing.assert_allclose(g["value"][()], -pre.mean(axis=(1, 2))[[0, 1], [0, 1]], rtol=1e-4, atol=1e-6)
        grey = feature_model(model, ["bn1"])(normalize(tf.fill((1, 20, 20, 3), 128), "torch")).numpy()
        assert (g["value"][()] > -grey.mean(axis=(0, 1, 2))[:2]).all()  # lower than grey
    assert not (tmp_path / "run/toolbox/regularized_opt/relu1").exists()
    assert (tmp_path / "run/sheets/filters/patterns_relu1.png").exists()


def test_stage_after_a_scan_keeps_the_scan(tmp_path, photo_folder):
    model, cfg = cfg_for(tmp_path, "layers=[relu1]", "dataset=folder", f"dataset.path={photo_folder}",
                         "stages=[scan,filters]", "filters.channels=2", "filters.steps=8")
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run/results.h5", "r") as f:
        assert f["layers/relu1/topk/value"].shape == (5, 9) and len(f["images/path"]) > 5
        assert f["filters/relu1/patterns"].shape == (2, 20, 20, 3)
        assert set(json.loads(f.attrs["stages_done"])) == {"scan", "filters"}


@pytest.mark.parametrize("override, words", [
    ("filters.method=dream", "filters.method"),
    ("filters.objective=max", "filters.objective"),
    ("filters.channels=[7]", "channel 7"),
    ("filters.objective=class", "filters.classes"),
    ("filters.weights=some", "filters.weights"),
    ("filters.upscale=zoom", "filters.upscale"),
])
def test_bad_filters_config_is_one_line_and_writes_nothing(tmp_path, override, words):
    _, cfg = cfg_for(tmp_path, "layers=[relu1]", override)
    with pytest.raises(PipelineError) as err:
        run(cfg, tmp_path / "run")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run/results.h5").exists()


@pytest.fixture(scope="module")
def mobilenet_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mnv2") / "run"
    cfg = compose_cfg(["layers=[features_0_2]", "stages=[filters]", "filters.channels=[0,5]",
                       "filters.steps=6", "filters.size=64"])
    run(cfg, run_dir)
    return run_dir


def test_mobilenet_first_layer_weights_and_patterns(mobilenet_run):
    from pipeline.models.sources import load_model
    from omegaconf import OmegaConf

    model = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None))).model
    with h5py.File(mobilenet_run / "results.h5", "r") as f:
        t = f["filters/kernel_table"]
        layers = read_strings(t["layer"])
        assert len(layers) == 52 and layers[0] == "features_0_0" and layers[-1] == "features_18_0"
        np.testing.assert_array_equal(t["shape"][0], [3, 3, 3, 32])
        assert read_strings(t["kind"]).count("DepthwiseConv2D") == 17
        np.testing.assert_array_equal(f["filters/features_0_0/weights"][()],
                                      model.get_layer("features_0_0").kernel.numpy())
        g = f["filters/features_0_2"]
        assert g["patterns"].shape == (2, 224, 224, 3) and g.attrs["optimised_size"] == 64
        assert f.attrs["weights_sha256"] == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    with Image.open(mobilenet_run / "sheets/filters/weights_features_0_0_colour.png") as im:
        assert im.size[0] >= 500
    sprite = np.asarray(Image.open(mobilenet_run / "toolbox/regularized_opt/features_0_2/whole_layer.jpg"))
    side = math.ceil(math.sqrt(32))
    assert sprite.shape[0] == sprite.shape[1] and sprite.shape[0] % side == 0


def test_mobilenet_class_names_resolve(tmp_path):
    cfg = compose_cfg(["stages=[filters]", "filters.objective=class", "filters.classes=[goldfish,417]",
                       "filters.steps=2", "filters.size=32", "filters.weights=none", "filters.toolbox=false"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run/results.h5", "r") as f:
        g = f["filters/classifier_1"]
        np.testing.assert_array_equal(g["channels"][()], [1, 417])
        assert json.loads(g.attrs["class_names"]) == ["goldfish", "balloon"]
        assert not [k for k in f["filters"] if "weights" in f[f"filters/{k}"]]
    bad = compose_cfg(["stages=[filters]", "filters.objective=class", "filters.classes=[goldfsh]"])
    with pytest.raises(PipelineError, match="nearest: goldfish"):
        run(bad, tmp_path / "bad")


def test_run_py_computes_weights_and_patterns(tmp_path):
    small_model(tmp_path / "small.keras")
    run_dir = tmp_path / "cli"
    proc = run_py("model=file", f"model.path={tmp_path / 'small.keras'}", "model.preprocess=torch",
                  "layers=[relu2]", "stages=[filters]", "filters.steps=4", "filters.channels=[0,2]",
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert f["filters/relu2/patterns"].shape == (2, 20, 20, 3)
        assert "weights" in f["filters/conv1"] and "weights" in f["filters/dw"]
    assert (run_dir / "toolbox/regularized_opt/relu2/relu2_0002_montage.jpg").exists()
    proc = run_py("model=file", f"model.path={tmp_path / 'small.keras'}", "stages=[filters]",
                  "filters.method=dream", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode == 2 and len(error_lines(proc)) == 1 and "filters.method" in error_lines(proc)[0]
    assert not (tmp_path / "bad").exists()
