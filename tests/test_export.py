"""The Deep Visualization Toolbox layout, file by file, from a real run's results.h5."""

import math

import h5py
import numpy as np
import pytest
from PIL import Image

from test_pipeline import compose_cfg, tiny_model
from pipeline.runner import run
from pipeline.store import read_strings


@pytest.fixture
def exported(tmp_path, photo_folder):
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                       f"dataset.path={photo_folder}", "layers=[relu1,relu2]", "stages=[scan,crop]"])
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    rng = np.random.default_rng(0)
    with h5py.File(run_dir / "results.h5", "a") as f:  # what the panels and filters stages add
        g = f["layers/relu2"]
        g.create_dataset("panels/deconv", data=rng.normal(size=g["patches"].shape[:4] + (3,)).astype(np.float16))
        colours = np.array([[60 * c, 255 - 60 * c, 100] for c in range(4)], np.uint8)  # flat: JPEG keeps them
        g = f.create_group("filters/relu1")  # as the filters stage writes them
        g["patterns"] = np.broadcast_to(colours[:, None, None], (4, 24, 24, 3))
        g["channels"] = np.arange(4)
        g["computed"] = np.ones(4, bool)
        g.attrs.update(objective="channel", channels_total=4)
    cfg.stages = ["export"]
    run(cfg, run_dir)
    return run_dir


def test_max_im_montages_are_3x3_of_the_patches(exported):
    with h5py.File(exported / "results.h5", "r") as f:
        for layer in ("relu1", "relu2"):
            patches = f[f"layers/{layer}/patches"][()]
            c, k, h, w, _ = patches.shape
            files = sorted((exported / "toolbox" / "max_im" / layer).iterdir())
            assert [p.name for p in files] == [f"{layer}_{i:04d}.jpg" for i in range(c)]
            for i, path in enumerate(files):
                montage = np.asarray(Image.open(path))
                assert montage.shape == (3 * h, 3 * w, 3)
                # the middle cell holds the 5th best patch: JPEG blurs it, but it is
                # closer to that patch than to any other of the unit's patches
                errors = np.abs(montage[h:2 * h, w:2 * w].astype(int)[None] - patches[i]).mean(axis=(1, 2, 3))
                assert errors.argmin() == 4 or errors[4] == errors.min()


def test_max_deconv_only_where_panels_exist(exported):
    assert not (exported / "toolbox" / "max_deconv" / "relu1").exists()
    files = sorted((exported / "toolbox" / "max_deconv" / "relu2").iterdir())
    assert len(files) == 6 and files[0].name == "relu2_0000.jpg"


def test_regularized_opt_montages_and_whole_layer_sprite(exported):
    folder = exported / "toolbox" / "regularized_opt" / "relu1"
    assert sorted(p.name for p in folder.iterdir()) == \
        [f"relu1_{i:04d}_montage.jpg" for i in range(4)] + ["whole_layer.jpg"]
    sprite = np.asarray(Image.open(folder / "whole_layer.jpg"))
    side = math.ceil(math.sqrt(4))
    assert sprite.shape == (side * 24, side * 24, 3)
    with h5py.File(exported / "results.h5", "r") as f:
        patterns = f["filters/relu1/patterns"][()]
    for c in range(4):  # tile c sits at row c // 2, column c % 2
        y, x = (c // side) * 24, (c % side) * 24
        cell = sprite[y + 4:y + 20, x + 4:x + 20].reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(cell, patterns[c, 0, 0], atol=6)


def test_info_txt_lists_each_patch(exported):
    with h5py.File(exported / "results.h5", "r") as f:
        paths = read_strings(f["images/path"])
        labels = f["images/label"][()]
        t = f["layers/relu2/topk"]
        value, image, y, x = (t[k][()] for k in ("value", "image", "y", "x"))
    for c in range(value.shape[0]):
        lines = (exported / "toolbox" / "relu2" / f"unit_{c:04d}" / "info.txt").read_text().splitlines()
        assert len(lines) == int((image[c] >= 0).sum())
        for k, line in enumerate(lines):
            v, i, label, yy, xx, path = line.split(" ", 5)
            assert float(v) == pytest.approx(value[c, k], rel=1e-5)
            assert (int(i), int(label), int(yy), int(xx), path) == \
                (image[c, k], labels[image[c, k]], y[c, k], x[c, k], paths[image[c, k]])
