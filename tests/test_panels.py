"""The panels stage end to end: a tiny real model, real image files, results.h5 read back."""

import json
import shutil

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import save_image
from test_pipeline import compose_cfg
from pipeline.backprop import backprop, seed_at
from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.panel_codec import LEVELS, read_panels
from pipeline.panels import place_in_frame
from pipeline.preprocess import normalize
from pipeline.runner import run
from pipeline.store import Store

METHODS = ("deconv", "guided", "gradient")
LAYERS = ("relu1", "conv2", "gap")


def tiny_model(path):
    """ReLU, max pooling, a fused ReLU, global pooling: every kind of unit the rules touch."""
    rng = np.random.default_rng(11)
    inp = keras.Input((20, 20, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inp, out, name="tiny_panels")
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(path)
    return model




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("panels")
    rng = np.random.default_rng(0)
    for i in range(6):
        save_image(root / "photos" / "a" / f"img{i}.png", (rng.random((30 + 4 * i, 36, 3)) * 255).astype(np.uint8))
    save_image(root / "photos" / "b" / "photo.jpg", (rng.random((40, 50, 3)) * 255).astype(np.uint8), quality=95)
    model = tiny_model(root / "tiny.keras")
    base = ["model=file", f"model.path={root / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
            f"dataset.path={root / 'photos'}", f"layers=[{','.join(LAYERS)}]", "topk=3", "batch_size=4"]
    return root, model, base


@pytest.fixture(scope="module")
def full_run(setup):
    root, model, base = setup
    cfg = compose_cfg(base + ["stages=[scan,crop,panels]", "crop.max_size=0", "panels.batch_size=5", "panels.layers=all"])
    run(cfg, root / "run")
    return model, cfg, root / "run" / "results.h5"


def model_inputs(cfg):
    from pipeline.models.sources import load_model

    spec = load_model(cfg.model).preprocessing
    table = list_images(cfg.dataset)
    return {int(i): p for ids, batch in BatchStream(table, spec, 8)
            for i, p in zip(ids, normalize(batch, spec.normalize).numpy())}


def test_schema(full_run):
    _, _, results = full_run
    with h5py.File(results, "r") as f:
        assert "panels" in json.loads(f.attrs["stages_done"])
        for name in LAYERS:
            g = f[f"layers/{name}"]
            c, k, h, w, ch = g["patches"].shape
            assert json.loads(g["panels"].attrs["methods"]) == list(METHODS)
            for method in METHODS:
                raw, norm = g[f"panels/{method}"], g[f"panels/{method}_norm"]
                assert raw.shape == (c, k, h, w, 3) and raw.dtype == np.int8  # pipeline.panel_codec codes
                assert norm.shape == (c, k, h, w) and norm.dtype == np.int8
                for scale in (g[f"panels/{method}_scale"], g[f"panels/{method}_norm_scale"]):
                    assert scale.shape == (c, k) and scale.dtype == np.float32
                assert raw.is_virtual and norm.is_virtual  # over the stage's chunk files
                filled = g["topk/image"][()] >= 0
                peak = np.abs(read_panels(g, f"panels/{method}", slice(None))).max(axis=(2, 3, 4))
                np.testing.assert_allclose(peak, g[f"panels/{method}_scale"][()], rtol=1e-6)  # code 127 is the peak
                assert (peak[~filled] == 0).all()
                if method == "gradient":  # every active scanned unit has a gradient
                    active = filled & (g["topk/value"][()] > 0)
                    assert active.sum() >= 5 and (peak[active] > 0).all()


def test_panels_equal_a_direct_one_seed_computation(full_run):
    """Read back through the readers' decoder, every value lies within the codec's bound
    (1/127 of its panel's largest |v|) of the float panel computed with one seed."""
    model, cfg, results = full_run
    inputs = model_inputs(cfg)
    with h5py.File(results, "r") as f:
        for name in LAYERS:
            g = f[f"layers/{name}"]
            image, box, y, x = (g[f"topk/{key}"][()] for key in ("image", "box", "y", "x"))
            row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
            shape = tuple(g.attrs["shape"])
            entries = [(c, kk) for c in range(image.shape[0]) for kk in range(image.shape[1]) if image[c, kk] >= 0]
            for c, kk in entries[::4]:
                if name == "gap":  # a flat output: seeded by channel
                    seed = seed_at((shape[-1],), c)
                else:
                    seed = seed_at(shape, c, y[c, kk], x[c, kk])
                y0, x0, y1, x1 = box[c, kk]
                oy, ox = row_offset[y[c, kk]], col_offset[x[c, kk]]
                for method in METHODS:
                    full = backprop(model, inputs[image[c, kk]][None], name, seed, method).numpy()[0]
                    expected = np.zeros(g[f"panels/{method}"].shape[2:], np.float32)
                    expected[oy:oy + y1 - y0, ox:ox + x1 - x0] = full[y0:y1, x0:x1]
                    got = read_panels(g, f"panels/{method}", c, kk)
                    bound = np.abs(expected).max() * (1 / LEVELS + 1e-3)  # the codec's, plus float error
                    np.testing.assert_allclose(got, expected, rtol=0, atol=bound, err_msg=f"{name} {method} {(c, kk)}")
                    norm, want = read_panels(g, f"panels/{method}_norm", c, kk), np.sqrt((expected ** 2).sum(-1))
                    np.testing.assert_allclose(norm, want, rtol=0, atol=want.max() * (1 / LEVELS + 1e-3))


def test_gradient_support_lies_inside_the_box(full_run):
    """Outside the box's place in the frame every panel is exactly zero; and the
    gradient fills the box of a unit whose whole field is inside the image."""
    _, _, results = full_run
    with h5py.File(results, "r") as f:
        for name in ("relu1", "conv2"):
            g = f[f"layers/{name}"]
            image, box, y, x = (g[f"topk/{key}"][()] for key in ("image", "box", "y", "x"))
            row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
            frame = tuple(g["geometry"].attrs["frame"])
            panels = {m: read_panels(g, f"panels/{m}", slice(None)) for m in METHODS}
            inside_seen = False
            for c, kk in zip(*np.nonzero(image >= 0)):
                y0, x0, y1, x1 = box[c, kk]
                oy, ox = row_offset[y[c, kk]], col_offset[x[c, kk]]
                region = np.zeros(frame, bool)
                region[oy:oy + y1 - y0, ox:ox + x1 - x0] = True
                for method, p in panels.items():
                    assert (p[c, kk][~region] == 0).all(), f"{name} {method} {(c, kk)} outside the box"
                if name == "relu1" and (y1 - y0, x1 - x0) == frame:  # 3x3 field, all inside
                    assert (np.abs(panels["gradient"][c, kk]).sum(-1) > 0).sum() >= 5
                    inside_seen = True
            if name == "relu1":
                assert inside_seen


def test_place_in_frame_puts_values_where_crop_puts_pixels(full_run):
    """The same placement as the patches: cut the model-input pixels as floats and
    compare with the crop stage's uint8 patches."""
    _, cfg, results = full_run
    from pipeline.models.sources import load_model

    spec = load_model(cfg.model).preprocessing
    table = list_images(cfg.dataset)
    pixels = {int(i): p for ids, batch in BatchStream(table, spec, 8) for i, p in zip(ids, batch.numpy())}
    with h5py.File(results, "r") as f:
        for name in LAYERS:
            g = f[f"layers/{name}"]
            image, box, y, x = (g[f"topk/{key}"][()] for key in ("image", "box", "y", "x"))
            c, kk = np.nonzero(image >= 0)
            maps = np.stack([pixels[i] for i in image[c, kk]]).astype(np.float32)
            offsets = np.stack([g["geometry/row_offset"][()][y[c, kk]], g["geometry/col_offset"][()][x[c, kk]]], 1)
            placed = place_in_frame(maps, box[c, kk], offsets, tuple(g["geometry"].attrs["frame"]))
            np.testing.assert_array_equal(placed, g["patches"][()][c, kk].astype(np.float32))


def test_shrunk_panels_align_with_shrunk_patches_and_batching_changes_nothing(setup, full_run, monkeypatch):
    root, model, base = setup
    # one channel's panels per block (the stage's memory bound), one seed per backward pass
    cfg = compose_cfg(base + ["stages=[scan,crop,panels]", "crop.max_size=6", "panels.batch_size=1",
                              "checkpoint.block_mb=0.000001",
                              "panels.methods=[guided]", "layers=[conv2]"])
    run(cfg, root / "shrunk")
    _, _, full = full_run
    with h5py.File(root / "shrunk" / "results.h5", "r") as f, h5py.File(full, "r") as ref:
        g = f["layers/conv2"]
        assert sorted(g["panels"]) == ["guided", "guided_norm", "guided_norm_scale", "guided_scale"]
        assert g["panels/guided"].shape[:4] == g["patches"].shape[:4] and g["patches"].shape[2] == 6
        assert g["panels"].attrs["scale"] == pytest.approx(g["patches"].attrs["scale"])
        # one seed per pass and one channel per block here, five seeds per pass and one
        # block in the full run: the same panels once shrunk
        # both sides decoded: each within 1/127 of its own panel's peak (the full one's is the larger)
        big = read_panels(ref["layers/conv2"], "panels/guided", slice(None))
        c, k, h, w, ch = big.shape
        small = tf.image.resize(big.reshape(c * k, h, w, ch), (6, 6), method="area").numpy().reshape(c, k, 6, 6, ch)
        bound = 2 * ref["layers/conv2/panels/guided_scale"][()] / LEVELS
        assert (np.abs(read_panels(g, "panels/guided", slice(None)) - small) <= bound[..., None, None, None] * 1.01
                + 5e-3 * np.abs(small) + 2e-3 * np.abs(small).max()).all()
        big_norm = read_panels(ref["layers/conv2"], "panels/guided_norm", slice(None))
        small_norm = tf.image.resize(big_norm.reshape(c * k, h, w, 1), (6, 6), method="area").numpy().reshape(c, k, 6, 6)
        bound = 2 * ref["layers/conv2/panels/guided_norm_scale"][()] / LEVELS
        assert (np.abs(read_panels(g, "panels/guided_norm", slice(None)) - small_norm) <= bound[..., None, None] * 1.01
                + 5e-3 * np.abs(small_norm) + 2e-3 * np.abs(small_norm).max()).all()


def test_panels_need_a_scan_and_valid_methods(setup, full_run, tmp_path):
    root, _, base = setup
    with pytest.raises(PipelineError, match=r"stages=\[scan,panels\]"):
        run(compose_cfg(base + ["stages=[panels]"]), tmp_path / "empty")
    with pytest.raises(PipelineError, match="panels.methods"):
        run(compose_cfg(base + ["stages=[scan,panels]", "panels.methods=[deconvnet]"]), tmp_path / "bad")


def test_a_new_scan_invalidates_the_panels(setup, full_run, tmp_path):
    root, _, base = setup
    _, _, done = full_run
    results = tmp_path / "copy" / "results.h5"
    shutil.copytree(done.parent, results.parent)  # a run directory moves as a whole: results.h5 and parts/
    cfg = compose_cfg(base + ["stages=[scan,crop,panels]", "crop.max_size=0", "panels.batch_size=5", "panels.layers=all"])
    before = results.read_bytes()
    run(cfg, results.parent)  # the same config: every stage is skipped
    assert results.read_bytes() == before
    assert {"scan", "crop", "panels"} <= set(Store(results.parent).stages_done())
    rescan = compose_cfg(base + ["stages=[scan]", "crop.max_size=0", "panels.batch_size=5", "overwrite=true"])
    run(rescan, results.parent)
    done = Store(results.parent).stages_done()
    assert "panels" not in done and "scan" in done and not (results.parent / "parts" / "panels.h5").exists()


def test_zero_panel_log_names_relu6_only_where_the_model_has_one(caplog):
    import logging

    from pipeline.patterns import has_capped_relu
    from pipeline.panels import log_counts

    def net(*activations):
        inp = keras.Input((8, 8, 3))
        x = inp
        for i, act in enumerate(activations):
            x = keras.layers.Conv2D(2, 3, name=f"c{i}", activation=act if isinstance(act, str) else None)(x)
            if not isinstance(act, str):
                x = act(x)
        return keras.Model(inp, x)

    assert not has_capped_relu(net(keras.layers.ReLU(), "relu"))
    assert has_capped_relu(net(keras.layers.ReLU(), keras.layers.ReLU(max_value=6.0)))
    assert has_capped_relu(net("relu", "relu6"))
    counts = {"missing": 0, "tiny": 0, "huge": 0, "empty guided": 3}
    with caplog.at_level(logging.INFO, logger="pipeline.panels"):
        log_counts({"relu2": counts}, capped=False)
        log_counts({"relu2": counts}, capped=True)
    plain, capped = [r.getMessage() for r in caplog.records]
    assert "3 guided panel(s) are all zero" in plain and "ReLU6" not in plain
    assert "clipped by a ReLU6" in capped
