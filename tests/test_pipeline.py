"""The scan, crop and store stages on a tiny real model and real image files."""

import json

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir

from conftest import ROOT, save_image
from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.graph import feature_model
from pipeline.models.sources import load_model
from pipeline.preprocess import normalize
from pipeline.runner import run
from pipeline.store import read_strings
from pipeline.topk import topk_from_maps


def tiny_model(path):
    """Two convolutions and a pooling, with hand-set weights: deterministic and non-trivial."""
    rng = np.random.default_rng(42)
    inp = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(4, 3, strides=1, padding="same", name="conv1")(inp)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    out = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inp, out, name="tiny")
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(path)
    return model


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def tiny_run(tmp_path, photo_folder):
    save_image(photo_folder / "b_cls" / "zz_broken.jpg", np.zeros((4, 4, 3), np.uint8))
    (photo_folder / "b_cls" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={photo_folder}", "layers=[relu1,relu2,gap]",
                       "topk=4", "scan.bottomk=2", "batch_size=3", "stages=[scan,crop]", "crop.max_size=0"])
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    return model, cfg, run_dir / "results.h5"


def test_top_k_equals_brute_force_over_all_activations(tiny_run):
    model, cfg, results = tiny_run
    table = list_images(cfg.dataset)
    from pipeline.models.sources import load_model
    spec = load_model(cfg.model).preprocessing
    ids, maps = [], {n: [] for n in ("relu1", "relu2", "gap")}
    features = feature_model(model, list(maps))
    for batch_ids, pixels in BatchStream(table, spec, 5):  # other batch size on purpose
        outs = features(normalize(pixels, "unit"))
        ids.append(batch_ids)
        for name, out in zip(maps, outs):
            out = out.numpy()
            maps[name].append(out[:, None, None, :] if out.ndim == 2 else out)
    ids = np.concatenate(ids)
    with h5py.File(results, "r") as f:
        assert list(f["images/ok"][()]).count(False) == 1
        for name, parts in maps.items():
            expected = topk_from_maps(np.concatenate(parts), ids, 4)
            got = f[f"layers/{name}/topk"]
            np.testing.assert_array_equal(got["image"][()], expected.image)
            np.testing.assert_allclose(got["value"][()], expected.value, rtol=1e-5)
            np.testing.assert_array_equal(got["y"][()], expected.y)
            np.testing.assert_array_equal(got["x"][()], expected.x)
            all_maps = np.concatenate(parts)
            np.testing.assert_allclose(f[f"layers/{name}/stats/mean"][()], all_maps.mean(axis=(0, 1, 2)), rtol=1e-4)
            np.testing.assert_allclose(f[f"layers/{name}/stats/zero_fraction"][()],
                                       (all_maps == 0).mean(axis=(0, 1, 2)), rtol=1e-6)


def test_duplicate_images_tie_and_lower_id_wins(tiny_run):
    _, _, results = tiny_run
    with h5py.File(results, "r") as f:
        paths = read_strings(f["images/path"])
        original = next(i for i, p in enumerate(paths) if p.endswith("a_cls/img0.png"))
        duplicate = next(i for i, p in enumerate(paths) if p.endswith("dup_of_img0.png"))
        assert original < duplicate
        image = f["layers/relu1/topk/image"][()]
        value = f["layers/relu1/topk/value"][()]
        for c in range(image.shape[0]):
            row = list(image[c])
            if duplicate in row:  # the twin ties with the original and ranks right after it
                assert original in row and row.index(original) + 1 == row.index(duplicate)
                assert value[c, row.index(original)] == value[c, row.index(duplicate)]


def test_patches_are_the_model_input_pixels_in_the_box(tiny_run):
    _, cfg, results = tiny_run
    from pipeline.models.sources import load_model
    spec = load_model(cfg.model).preprocessing
    table = list_images(cfg.dataset)
    pixels = {int(i): p for ids, batch in BatchStream(table, spec, 8) for i, p in zip(ids, batch.numpy())}
    with h5py.File(results, "r") as f:
        for name, table, dataset in (("relu1", "topk", "patches"), ("relu2", "topk", "patches"),
                                     ("relu2", "bottomk", "bottom_patches")):
            g = f[f"layers/{name}"]
            image, box, y, x = (g[f"{table}/{k}"][()] for k in ("image", "box", "y", "x"))
            patches = g[dataset][()]
            row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
            assert patches.shape[2:4] == tuple(g["geometry"].attrs["frame"])
            for c in range(image.shape[0]):
                for k in range(image.shape[1]):
                    y0, x0, y1, x1 = box[c, k]
                    oy, ox = row_offset[y[c, k]], col_offset[x[c, k]]
                    expected = np.zeros_like(patches[c, k])
                    expected[oy:oy + y1 - y0, ox:ox + x1 - x0] = pixels[image[c, k]][y0:y1, x0:x1]
                    np.testing.assert_array_equal(patches[c, k], expected)
        # a layer after global pooling: whole image as the box, and a message saying why
        g = f["layers/gap"]
        assert not g.attrs["mappable"] and g.attrs["geometry_message"]
        assert (g["topk/box"][()][g["topk/image"][()] >= 0] == [0, 0, 24, 24]).all()


def test_results_schema(tiny_run):
    _, _, results = tiny_run
    with h5py.File(results, "r") as f:
        for key in ("config", "model", "input_size", "preprocessing", "version"):
            assert key in f.attrs
        n = len(f["images/path"])
        assert f["images/label"].dtype == np.int64 and f["images/label"].shape == (n,)
        assert f["images/ok"].dtype == bool
        errors = read_strings(f["images/error"])
        assert [bool(e) for e in errors] == list(~f["images/ok"][()])
        g = f["layers/relu2"]
        h, w, c = g.attrs["shape"]
        assert (h, w, c) == (6, 6, 6)
        assert g["topk/value"].dtype == np.float32 and g["topk/value"].shape == (c, 4)
        assert g["topk/image"].dtype == np.int64 and g["topk/y"].dtype == np.int32
        assert g["topk/box"].shape == (c, 4, 4) and g["topk/box"].dtype == np.int32
        assert g["patches"].dtype == np.uint8 and g["patches"].shape[:2] == (c, 4)
        assert g["patches"].is_virtual  # over the crop's chunk files, stored one HDF5 chunk per channel
        for source in g["patches"].virtual_sources():
            with h5py.File(results.parent / "parts" / source.file_name, "r") as part:
                piece = part[source.dset_name]
                assert piece.chunks[:2] == (1, 4) and piece.compression == "gzip"
        assert (np.diff(g["topk/value"][()], axis=1) <= 0).all()


def test_same_config_twice_gives_identical_tables_and_skips(tmp_path, tiny_run):
    _, cfg, results = tiny_run
    with h5py.File(results, "r") as f:
        first = {k: f[f"layers/relu2/topk/{k}"][()] for k in ("value", "image", "y", "x")}
    parts = results.parent / "parts"
    stored = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts.iterdir() if p.is_file()}
    run(cfg, results.parent)  # same dir: stages already done, skipped
    # a skip writes no part: same bytes and modification times, and nothing new
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in parts.iterdir() if p.is_file()} == stored
    run(cfg, tmp_path / "again")
    with h5py.File(tmp_path / "again" / "results.h5", "r") as f:
        for k, v in first.items():
            np.testing.assert_array_equal(f[f"layers/relu2/topk/{k}"][()], v)


def test_a_different_config_never_overwrites_silently(tiny_run):
    _, cfg, results = tiny_run
    before = results.read_bytes()
    cfg.topk = 2
    with pytest.raises(PipelineError, match="overwrite=true"):
        run(cfg, results.parent)
    assert results.read_bytes() == before
    cfg.overwrite = True
    run(cfg, results.parent)
    with h5py.File(results, "r") as f:
        assert f["layers/relu1/topk/value"].shape[1] == 2


def test_a_stage_listed_before_what_it_reads_is_refused_before_anything_runs(tmp_path, photo_folder):
    tiny_model(tmp_path / "tiny.keras")
    base = ["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder", f"dataset.path={photo_folder}",
            "layers=[relu1]"]
    for stages, message in (("[crop]", "list scan before crop"), ("[panels,scan]", "list scan before panels"),
                            ("[scan,evolution]", "list train before evolution"), ("[scan,activations]", None), ("[occlusion,scan]", "list scan before occlusion")):
        cfg = compose_cfg(base + [f"stages={stages}", "occlusion.images={layer: relu1, channels: [0]}",
                                  "activations.images={layer: relu1, channels: [0]}"])
        run_dir = tmp_path / stages.strip("[]").replace(",", "_")
        if message is None:  # in order: the top images of the scan just made
            run(cfg, run_dir)
            continue
        with pytest.raises(PipelineError, match=message):
            run(cfg, run_dir)
        assert not (run_dir / "results.h5").exists()  # refused before the scan listed after it ran


def test_sheet_shrinks_large_frames(tmp_path, photo_folder):
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                       f"dataset.path={photo_folder}", "layers=[relu2]", "stages=[scan,crop]",
                       "crop.max_size=6"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        patches = f["layers/relu2/patches"]
        frame = tuple(patches.attrs["frame"])
        assert max(frame) > 6 and max(patches.shape[2:4]) == 6


def test_nested_model_layers_scan_and_store_with_dots(tmp_path, photo_folder):
    """A backbone used as a layer: its inner layers are scanned by qualified name."""
    rng = np.random.default_rng(3)
    inner_in = keras.Input((24, 24, 3))
    h = keras.layers.Conv2D(5, 3, strides=2, padding="same", name="conv")(inner_in)
    h = keras.layers.ReLU(name="act")(h)
    backbone = keras.Model(inner_in, h, name="backbone")
    inp = keras.Input((24, 24, 3))
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(backbone(inp)))
    model = keras.Model(inp, out)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(tmp_path / "nested.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'nested.keras'}", "dataset=folder",
                       f"dataset.path={photo_folder}", "layers=[backbone/act]", "stages=[scan,crop]"])
    run(cfg, tmp_path / "run")
    # reference: the backbone alone on the same pixels
    from pipeline.models.sources import load_model
    spec = load_model(cfg.model).preprocessing
    table = list_images(cfg.dataset)
    ids, maps = [], []
    for batch_ids, pixels in BatchStream(table, spec, 4):
        ids.append(batch_ids)
        maps.append(backbone(normalize(pixels, spec.normalize)).numpy())
    expected = topk_from_maps(np.concatenate(maps), np.concatenate(ids), 9)
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["layers/backbone.act"]
        assert g.attrs["name"] == "backbone/act"
        np.testing.assert_array_equal(g["topk/image"][()], expected.image)
        np.testing.assert_array_equal(g["topk/y"][()], expected.y)
        assert tuple(g.attrs["rf_size"]) == (3, 3) and tuple(g.attrs["rf_stride"]) == (2, 2)
        assert g["patches"].shape[2:4] == (3, 3)


@pytest.mark.slow
def test_keras_application_with_random_weights(tmp_path, photo_folder):
    cfg = compose_cfg(["model=keras_app", "model.name=MobileNetV2", "model.weights=null", "dataset=folder",
                       f"dataset.path={photo_folder}", "layers=last", "stages=[scan]"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert list(f["layers"]) == ["out_relu"]
        assert f["layers/out_relu"].attrs["shape"].tolist() == [7, 7, 1280]
        assert json.loads(f.attrs["preprocessing"])["normalize"] == "tf"  # MobileNetV2's own [-1, 1] scaling
        assert (f["layers/out_relu/topk/image"][()][:, 0] >= 0).all()


def test_scan_border_leaves_the_outer_ring_out_of_the_ranking_not_the_statistics(tmp_path, photo_folder):
    model = tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={photo_folder}", "layers=[relu1,relu2,gap]",
                       "topk=4", "scan.bottomk=2", "scan.border=1", "batch_size=3", "stages=[scan]"])
    run(cfg, tmp_path / "run")
    table = list_images(cfg.dataset)
    ids, maps = [], {n: [] for n in ("relu1", "relu2", "gap")}
    for batch_ids, pixels in BatchStream(table, load_model(cfg.model).preprocessing, 5):
        ids.append(batch_ids)
        for name, out in zip(maps, feature_model(model, list(maps))(normalize(pixels, "unit"))):
            out = out.numpy()
            maps[name].append(out[:, None, None, :] if out.ndim == 2 else out)
    ids = np.concatenate(ids)
    ring_winners = 0
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        for name, parts in maps.items():
            every = np.concatenate(parts)
            ranked = every.copy()
            if every.shape[1] > 2:  # the 1x1 map of gap has no inside: nothing is left out
                ranked[:, 0], ranked[:, -1], ranked[:, :, 0], ranked[:, :, -1] = -np.inf, -np.inf, -np.inf, -np.inf
            plain = topk_from_maps(every, ids, 4)
            ring_winners += int(((plain.y == 0) | (plain.x == 0) | (plain.y == every.shape[1] - 1)
                                 | (plain.x == every.shape[2] - 1)).sum()) if every.shape[1] > 2 else 0
            expected = topk_from_maps(ranked, ids, 4)
            got = f[f"layers/{name}/topk"]
            np.testing.assert_array_equal(got["image"][()], expected.image, err_msg=name)
            np.testing.assert_allclose(got["value"][()], expected.value, rtol=1e-5)
            np.testing.assert_array_equal(got["y"][()], expected.y)
            np.testing.assert_array_equal(got["x"][()], expected.x)
            lowest = topk_from_maps(-ranked.max(axis=(1, 2))[:, None, None], ids, 2)  # smallest inside maxima
            np.testing.assert_array_equal(f[f"layers/{name}/bottomk/image"][()], lowest.image, err_msg=name)
            # the statistics still cover every position
            np.testing.assert_allclose(f[f"layers/{name}/stats/max"][()], every.max(axis=(0, 1, 2)), rtol=1e-5)
            np.testing.assert_allclose(f[f"layers/{name}/stats/mean"][()], every.mean(axis=(0, 1, 2)), rtol=1e-4)
    assert ring_winners > 0  # without the option, some winners sat on the ring


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_scan_of_a_model_computing_in_another_float_type(dtype):
    from pipeline.preprocess import Preprocessing
    from pipeline.scan import Scanner

    rng = np.random.default_rng(3)
    inp = keras.Input((12, 12, 3), dtype=dtype)
    out = keras.layers.ReLU(name="relu", dtype=dtype)(keras.layers.Conv2D(4, 3, name="conv", dtype=dtype)(inp))
    model = keras.Model(inp, out)
    model.set_weights([rng.normal(size=w.shape) for w in model.get_weights()])
    spec = Preprocessing(12, 12, normalize="unit")
    scanner = Scanner(model, ["relu"], spec, k=3, labels=np.array([0, 1, 0, 1, 0]), classes=2)
    images = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    scanner.update(images, np.arange(5))
    (top, stats), = scanner.results()
    maps = model(tf.cast(images, dtype) / 255).numpy().astype(np.float32)
    expected = topk_from_maps(maps, np.arange(5), 3)
    np.testing.assert_array_equal(top.image, expected.image)
    np.testing.assert_allclose(top.value, expected.value, rtol=1e-2 if dtype == "float16" else 1e-5)
