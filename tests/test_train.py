"""The train stage: the tutorials' small convnet trained from scratch on real IDX and image files."""

import gzip
import json
import os
import random
import struct
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from conftest import save_image
from pipeline.errors import PipelineError
from pipeline.runner import run
from pipeline.store import read_strings
from test_pipeline import compose_cfg

FASHION = "/usr/share/datasets/fashion-mnist"


# ---------------------------------------------------------------- test data

def write_idx(path, array):
    """An IDX file (gzipped when the name ends in .gz), as MNIST ships them."""
    array = np.asarray(array)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return path


def shapes(n, size=20, seed=0):
    """Grey images of four drawn shapes (horizontal bar, vertical bar, filled square,
    ring) at random places, sizes and brightness, with noise: labels 0..3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size), np.float32)
    labels = rng.integers(0, 4, n)
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        half = rng.uniform(size * 0.15, size * 0.3)
        thick = rng.uniform(1.0, 2.0)
        if label == 0:
            mask = (abs(yy - cy) < thick) & (abs(xx - cx) < half)
        elif label == 1:
            mask = (abs(xx - cx) < thick) & (abs(yy - cy) < half)
        elif label == 2:
            mask = (abs(yy - cy) < half * 0.7) & (abs(xx - cx) < half * 0.7)
        else:
            r = np.hypot(yy - cy, xx - cx)
            mask = abs(r - half) < thick * 0.8
        images[i] = mask * rng.uniform(150, 255) + rng.normal(0, 12, (size, size))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def shapes_idx(folder, n=1600, size=20, seed=0, labels=True):
    folder.mkdir(parents=True, exist_ok=True)
    images, classes = shapes(n, size, seed)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    if labels:
        write_idx(folder / "train-labels-idx1-ubyte.gz", classes)
    return folder


def train_overrides(data, *extra):
    return ["dataset=idx", f"dataset.path={data}", "stages=[train]", "train.epochs=2",
            "train.snapshots=[0,1,2]", "train.batch_size=32", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = shapes_idx(root / "shapes")
    cfg = compose_cfg(train_overrides(data))
    run_dir = root / "run"
    run(cfg, run_dir)
    return cfg, run_dir


# ---------------------------------------------------------------- tests

def test_training_reaches_far_above_chance_and_records_curves(trained):
    cfg, run_dir = trained
    with h5py.File(run_dir / "results.h5", "r") as f:
        g = f["train"]
        assert list(g["epoch"][()]) == [1, 2]
        val = g["val_accuracy"][()]
        assert val[-1] > 0.85, val  # four classes: chance is 0.25
        assert g["loss"][1] < g["loss"][0]
        assert len(g["val_ids"]) == 160 and len(g["train_ids"]) == 1440
        assert not set(g["val_ids"][()]) & set(g["train_ids"][()])
        assert list(g["snapshot_epoch"][()]) == [0, 1, 2]
        assert read_strings(g["snapshot_file"]) == [f"snapshots/epoch_00{e}.keras" for e in (0, 1, 2)]
        assert list(g.attrs["input_size"]) == [20, 20] and g.attrs["channels"] == 1 and g.attrs["classes"] == 4
        assert json.loads(f.attrs["stages_done"]).keys() == {"train"}
        assert f["images/ok"][()].all() and len(f["images/path"]) == 1600
        assert json.loads(f.attrs["preprocessing"])["normalize"] == "unit"
    for suffix in (".png", ".pdf"):
        assert (run_dir / "sheets" / f"training_curve{suffix}").stat().st_size > 5_000


def test_snapshots_reload_and_give_the_recorded_predictions(trained):
    from pipeline.datasets import read_idx
    from pipeline.models.sources import load_model

    cfg, run_dir = trained
    data = Path(cfg.dataset.path)
    images = read_idx(data / "train-images-idx3-ubyte.gz")
    labels = read_idx(data / "train-labels-idx1-ubyte.gz")
    with h5py.File(run_dir / "results.h5", "r") as f:
        val_ids = f["train/val_ids"][()]
        recorded = f["train/val_predicted"][()]
        val_accuracy = f["train/val_accuracy"][()]
    x = images[val_ids][..., None].astype(np.float32) / 255.0
    predictions = {}
    for row, epoch in enumerate((0, 1, 2)):
        bundle = load_model(OmegaConf.create(dict(kind="snapshot", run_dir=str(run_dir), epoch=epoch)))
        assert bundle.preprocessing.size == (20, 20) and bundle.preprocessing.channels == 1
        assert bundle.preprocessing.normalize == "unit"
        probs = bundle.model.predict(x, verbose=0)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        predictions[epoch] = probs.argmax(axis=1)
        np.testing.assert_array_equal(predictions[epoch], recorded[row])
        if epoch > 0:  # Keras' own validation pass at the end of that epoch
            assert abs((predictions[epoch] == labels[val_ids]).mean() - val_accuracy[epoch - 1]) < 1e-6
    assert (predictions[0] != predictions[2]).mean() > 0.3  # the untrained start is another model
    last = load_model(OmegaConf.create(dict(kind="snapshot", run_dir=str(run_dir), epoch=None)))
    assert "epoch 2" in last.name


def test_rerun_skips_and_a_changed_config_is_refused(trained):
    cfg, run_dir = trained
    before = (run_dir / "results.h5").read_bytes()
    stamp = os.stat(run_dir / "snapshots" / "epoch_002.keras").st_mtime_ns
    run(cfg, run_dir)
    assert (run_dir / "results.h5").read_bytes() == before
    assert os.stat(run_dir / "snapshots" / "epoch_002.keras").st_mtime_ns == stamp
    changed = compose_cfg(train_overrides(cfg.dataset.path, "train.lr=0.01"))
    with pytest.raises(PipelineError, match="overwrite=true"):
        run(changed, run_dir)
    assert (run_dir / "results.h5").read_bytes() == before


def test_architecture_adapts_to_the_input_size():
    from pipeline.layers import select_layers
    from pipeline.train import build_convnet

    small = build_convnet((28, 28), 1, 10)
    shapes_by_name = {l.name: l.output.shape[1:] for l in small.layers}
    assert shapes_by_name["conv1"] == (28, 28, 32) and shapes_by_name["conv4"] == (3, 3, 128)
    assert shapes_by_name["flatten"] == (128,) and shapes_by_name["dense"] == (512,)
    assert shapes_by_name["softmax"] == (10,)
    assert select_layers(small, "default") == ["conv1", "conv2", "conv3", "conv4"]
    big = build_convnet((64, 64), 3, 5, filters=(8, 16, 32, 32), dense=64)
    assert big.get_layer("flatten").output.shape[1:] == (4 * 4 * 32,)
    out = big.predict(np.random.default_rng(0).random((2, 64, 64, 3)), verbose=0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(PipelineError, match="train.input_size to at least 16"):
        build_convnet((12, 12), 1, 10)


def test_image_folder_rgb_and_unlabelled_images_left_out(tmp_path):
    images, labels = shapes(60, size=24, seed=1)
    root = tmp_path / "folder"
    for i, (im, c) in enumerate(zip(images, labels)):
        rgb = np.stack([im, im // 2, 255 - im], axis=-1)
        save_image(root / f"class_{c}" / f"{i:03d}.png", rgb)
    save_image(root / "loose.png", np.zeros((24, 24, 3), np.uint8))  # no class folder: no label
    (root / "class_0" / "broken.png").write_bytes(b"not a png at all")
    cfg = compose_cfg(["dataset=folder", f"dataset.path={root}", "stages=[train]", "train.epochs=1",
                       "train.snapshots=[]", "train.input_size=16", "train.filters=[4,8,8,8]", "train.dense=16"])
    random.seed(5), np.random.seed(5), tf.random.set_seed(5)
    expected = random.random(), np.random.random(), float(tf.random.uniform(()))
    random.seed(5), np.random.seed(5), tf.random.set_seed(5)
    run(cfg, tmp_path / "run")
    # the stage seeds only its own generators: the caller's random state goes on where it was
    assert (random.random(), np.random.random(), float(tf.random.uniform(()))) == expected
    run(cfg, tmp_path / "again")  # and the same seed trains the same network, whatever the global state
    first, again = (keras.saving.load_model(tmp_path / d / "snapshots" / "epoch_001.keras") for d in ("run", "again"))
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["train"]
        assert g.attrs["channels"] == 3 and list(g.attrs["input_size"]) == [16, 16]
        assert list(g["snapshot_epoch"][()]) == [1]  # the last epoch is always saved
        used = np.concatenate([g["train_ids"][()], g["val_ids"][()]])
        paths = read_strings(f["images/path"])
        assert len(used) == 60 and not any(paths[i].endswith(("loose.png", "broken.png")) for i in used)
        broken = next(i for i, p in enumerate(paths) if p.endswith("broken.png"))
        assert not f["images/ok"][broken] and f["images/error"][broken]
    spec = json.loads((tmp_path / "run" / "snapshots" / "preprocessing.json").read_text())
    assert spec["preprocessing"]["channels"] == 3 and spec["class_names"] == [f"class_{c}" for c in range(4)]


@pytest.mark.parametrize("case", ["no_labels", "snapshot_beyond_epochs", "missing_epoch", "bad_optimizer"])
def test_bad_config_is_one_clear_line_and_writes_nothing(tmp_path, trained, case):
    from pipeline.models.sources import load_model

    _, trained_dir = trained
    if case == "missing_epoch":
        with pytest.raises(PipelineError, match="model.epoch to one of 0, 1, 2"):
            load_model(OmegaConf.create(dict(kind="snapshot", run_dir=str(trained_dir), epoch=7)))
        return
    data = shapes_idx(tmp_path / "data", n=40, labels=case != "no_labels")
    extra = {"no_labels": [], "snapshot_beyond_epochs": ["train.snapshots=[1,5]"],
             "bad_optimizer": ["train.optimizer=adamw"]}[case]
    match = {"no_labels": "no labels", "snapshot_beyond_epochs": "raise train.epochs",
             "bad_optimizer": "adam, rmsprop, sgd"}[case]
    with pytest.raises(PipelineError, match=match) as err:
        run(compose_cfg(train_overrides(data, *extra)), tmp_path / "run")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "results.h5").exists()


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_subset_learns(tmp_path):
    cfg = compose_cfg(["dataset=idx", f"dataset.path={FASHION}", "dataset.limit=2000", "stages=[train]",
                       "train.epochs=2", "train.snapshots=[1]", "train.batch_size=32"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert f["train"].attrs["classes"] == 10
        assert f["train/val_accuracy"][-1] > 0.6  # ten classes: chance is 0.1
