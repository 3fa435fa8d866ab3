"""Class selectivity: the closed form, and the scan's class-conditional sums on a model whose
units are wired to known classes, single run, shards merged, and a resumed run."""

import json

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from conftest import save_image
from pipeline.runner import run
from pipeline.selectivity import class_selectivity
from pipeline.store import read_strings
from test_pipeline import compose_cfg

COLOURS = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200)}


def test_selectivity_closed_form():
    counts = np.array([2, 4, 4, 0])  # the last class has no images: left out
    sums = np.array([[10.0, 0, 0, 0],     # fires on class 0 only
                     [2.0, 4, 4, 0],      # the same mean (1) on every class
                     [0.0, 0, 0, 0],      # silent
                     [2.0, 8, 4, 0]])     # means 1, 2, 1: (2 - 1) / (2 + 1)
    found = class_selectivity(sums, counts)
    np.testing.assert_allclose(found.index, [1.0, 0.0, 0.0, 1 / 3], rtol=1e-6)
    assert found.preferred.tolist() == [0, 0, 0, 1]  # ties: the lowest class
    assert np.isnan(found.means[:, 3]).all() and found.means[0, 0] == 5.0
    one = class_selectivity(sums[:, :1], counts[:1])  # one class: undefined
    assert np.isnan(one.index).all() and (one.preferred == 0).all()


def wired_model(path):
    """Unit 0 reads red only, unit 1 is a constant, unit 2 sums the channels: on pure-colour
    classes of equal brightness, selectivity 1 (red), 0 and 0."""
    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(3, 1, name="conv")
    x = keras.layers.ReLU(name="relu")(conv(inp))
    out = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    kernel[0, 0, 0, 0] = 1.0
    kernel[0, 0, :, 2] = 1.0
    conv.set_weights([kernel, np.array([0.0, 0.5, 0.0], np.float32)])
    model.save(path)
    return model


@pytest.fixture
def colour_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    for name, rgb in COLOURS.items():
        for i in range(3 + len(name) % 2):  # unequal class sizes
            image = np.broadcast_to(np.asarray(rgb, np.uint8), (8, 8, 3)).copy()
            image[rng.integers(0, 8), rng.integers(0, 8)] = 0  # a dark pixel: max and mean differ
            save_image(root / name / f"{i}.png", image)
    return root


def config(tmp_path, folder, *extra):
    return compose_cfg(["model=file", f"model.path={tmp_path / 'wired.keras'}", "model.preprocess=unit",
                        "dataset=folder", f"dataset.path={folder}", "layers=[relu]", "topk=2", "batch_size=2",
                        "stages=[scan]", *extra])


def classes_of(run_dir):
    with h5py.File(run_dir / "results.h5", "r") as f:
        return {k: v[()] for k, v in f["layers/relu/classes"].items()}


def test_units_wired_to_a_class_are_selective_for_it(tmp_path, colour_folder):
    model = wired_model(tmp_path / "wired.keras")
    run(config(tmp_path, colour_folder), tmp_path / "run")
    got = classes_of(tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        names = json.loads(f["images"].attrs["class_names"])
        paths = read_strings(f["images/path"])
        labels = f["images/label"][()]
    assert names == ["blue", "green", "red"]
    red = names.index("red")
    np.testing.assert_allclose(got["selectivity_max"], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(got["selectivity_mean"], [1.0, 0.0, 0.0], atol=1e-6)
    assert got["preferred_max"][0] == red
    assert got["count"].tolist() == [3, 4, 4]  # blue, green, red images
    # the sums equal numpy over the model's own activations, image by image
    relu = keras.Model(model.input, model.get_layer("relu").output)
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.float32) / 255
    acts = relu(pixels).numpy()
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(got["sum_max"], acts.max(axis=(1, 2)).T @ onehot, rtol=1e-5)
    np.testing.assert_allclose(got["sum_mean"], acts.mean(axis=(1, 2)).T @ onehot, rtol=1e-5)
    assert not np.allclose(got["sum_max"], got["sum_mean"])
    # shown: each card's line, the figure by depth on the index and in the book
    from pipeline.render.card_data import ImageIndex, UnitClasses

    cfg = config(tmp_path, colour_folder, "stages=[report]", "report.per_image=0")
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        unit = UnitClasses.read(f["layers/relu"])
        index = ImageIndex.read(f)
    assert unit.line(0, index).startswith("class selectivity 1.00 \u00b7 prefers red")
    assert unit.line(1, index).startswith("class selectivity 0.00")
    assert (tmp_path / "run" / "sheets" / "run" / "selectivity.png").stat().st_size > 10_000
    assert "Class selectivity by depth" in (tmp_path / "run" / "index.html").read_text()


def test_shards_merged_give_the_sums_of_one_scan(tmp_path, colour_folder):
    wired_model(tmp_path / "wired.keras")
    run(config(tmp_path, colour_folder), tmp_path / "whole")
    whole = classes_of(tmp_path / "whole")
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        run(config(tmp_path, colour_folder, "shard.count=2", f"shard.index={i}"), shards[-1])
    merged = config(tmp_path, colour_folder, "stages=[merge]", f"merge.inputs=[{shards[0]},{shards[1]}]")
    run(merged, tmp_path / "merged")
    got = classes_of(tmp_path / "merged")
    assert classes_of(shards[0])["count"].sum() < whole["count"].sum()
    for key, value in whole.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)
    # a killed scan resumes to the same sums: test_resume compares every dataset of a resumed
    # run, classes/ included (its dataset has class folders), with an uninterrupted one


def test_unlabelled_images_and_scan_classes_false_store_no_classes(tmp_path, colour_folder):
    wired_model(tmp_path / "wired.keras")
    run(config(tmp_path, colour_folder, "scan.classes=false"), tmp_path / "off")
    flat = tmp_path / "flat"
    save_image(flat / "a.png", np.full((8, 8, 3), 100, np.uint8))
    save_image(flat / "b.png", np.full((8, 8, 3), 50, np.uint8))
    run(config(tmp_path, flat), tmp_path / "unlabelled")
    for name in ("off", "unlabelled"):
        with h5py.File(tmp_path / name / "results.h5", "r") as f:
            assert "classes" not in f["layers/relu"]


def evidence_model(path):
    """Units 0-2 read red, green, blue and are the only evidence for classes 0-2; unit 3 is a
    constant that feeds nothing; class 3 ('none') wins when the evidence is gone."""
    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 1, name="conv")
    x = keras.layers.ReLU(name="relu")(conv(inp))
    dense = keras.layers.Dense(4, name="logits")
    out = dense(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inp, out)
    kernel = np.zeros((1, 1, 3, 4), np.float32)
    kernel[0, 0, [0, 1, 2], [0, 1, 2]] = 1.0
    conv.set_weights([kernel, np.array([0, 0, 0, 0.5], np.float32)])
    weights = np.zeros((4, 4), np.float32)
    weights[[0, 1, 2], [0, 1, 2]] = 1.0
    dense.set_weights([weights, np.array([0, 0, 0, 0.1], np.float32)])
    model.save(path)
    return model


def test_ablating_the_only_evidence_for_a_class_costs_that_class_only(tmp_path, colour_folder):
    model = evidence_model(tmp_path / "evidence.keras")
    order = ["red", "green", "blue"]  # the model's classes 0-2
    lines = [f"{p} {order.index(p.parent.name)}" for p in sorted(colour_folder.rglob("*.png"))]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'evidence.keras'}", "model.preprocess=unit",
                       "dataset=filelist", f"dataset.path={tmp_path / 'list.txt'}", "layers=[relu]", "topk=2",
                       "stages=[scan,ablation]", "ablation.units=3", "ablation.batch_size=3"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["ablation/relu"]
        assert g.attrs["selected"] == "selectivity"
        assert g["units"][()].tolist() == [0, 1, 2]  # the constant unit 3 is not selective
        assert g["classes"][()].tolist() == [0, 1, 2] and (g["base_accuracy"][()] == 1).all()
        np.testing.assert_array_equal(g["accuracy_delta"][()], -np.eye(3))  # its class to 0, others kept
        counts = g["count"][()]
        np.testing.assert_allclose(g["overall_delta"][()], -counts / counts.sum(), rtol=1e-6)
        image, label, logit = f["ablation/image"][()], f["ablation/label"][()], g["logit"][()]
        paths = read_strings(f["images/path"])
        from pipeline.render.card_data import ImageIndex, UnitAblation

        shown = UnitAblation.read(f, "relu")
        assert shown.line(0, ImageIndex(paths, label, order)).endswith("most hurt: red -100")
        assert shown.line(3, ImageIndex(paths, label, order)) is None  # not ablated
    # the oracle: the same model with the unit's filter and bias set to zero
    pixels = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in image]).astype(np.float32) / 255
    for u in range(3):
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        kernel, bias = clone.get_layer("conv").get_weights()
        kernel[..., u], bias[u] = 0.0, 0.0
        clone.get_layer("conv").set_weights([kernel, bias])
        want = clone(pixels).numpy()[np.arange(len(image)), label]
        np.testing.assert_allclose(logit[:, u], want, rtol=1e-5, atol=1e-6)


def test_per_class_exemplars_are_each_classes_own_top_k_and_merge_across_shards(tmp_path, colour_folder):
    from pipeline.topk import topk_from_maps

    model = wired_model(tmp_path / "wired.keras")
    extra = ["scan.exemplars=[red,blue]", "scan.exemplars_k=2"]
    run(config(tmp_path, colour_folder, *extra, "stages=[scan,crop,report]", "report.per_image=0"),
        tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        t = f["layers/relu/class_topk"]
        names = json.loads(f["images"].attrs["class_names"])
        assert [names[c] for c in t.attrs["classes"]] == ["blue", "red"] and t.attrs["k"] == 2
        image, value, y, x = t["image"][()], t["value"][()], t["y"][()], t["x"][()]
        paths, labels = read_strings(f["images/path"]), f["images/label"][()]
        assert f["layers/relu/class_patches"].shape[:2] == (3, 4)
        whole = {k: v[()] for k, v in t.items()}
    relu = keras.Model(model.input, model.get_layer("relu").output)
    acts = relu(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).astype(np.float32) / 255).numpy()
    for block, cls in enumerate([names.index("blue"), names.index("red")]):
        ids = np.flatnonzero(labels == cls)
        want = topk_from_maps(acts[ids], ids, 2)  # the brute force over that class's images only
        got = slice(2 * block, 2 * block + 2)
        np.testing.assert_array_equal(image[:, got], want.image)
        np.testing.assert_allclose(value[:, got], want.value, rtol=1e-5)
        np.testing.assert_array_equal(y[:, got], want.y)
        np.testing.assert_array_equal(x[:, got], want.x)
    assert (tmp_path / "run" / "report" / "cards" / "relu" / "unit_0000.jpg").exists()
    from pipeline.render.card_data import Exemplars  # a card shows its preferred class's block, else the first

    shown = Exemplars(np.array([0, 2]), 2, image)
    assert shown.block_of(np.array([2, 0, 1]), 3).tolist() == [1, 0, 0]
    # two shards merged give the same tables
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"shard{i}")
        run(config(tmp_path, colour_folder, *extra, "shard.count=2", f"shard.index={i}"), shards[-1])
    run(config(tmp_path, colour_folder, *extra, "stages=[merge]", f"merge.inputs=[{shards[0]},{shards[1]}]"),
        tmp_path / "merged")
    with h5py.File(tmp_path / "merged" / "results.h5", "r") as f:
        for key, want in whole.items():
            np.testing.assert_array_equal(f[f"layers/relu/class_topk/{key}"][()], want, err_msg=key)
