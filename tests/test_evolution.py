"""The evolution stage: every snapshot scanned with the same images and layers, checked
against brute force; the per-layer sheet (channels x snapshots) and the top-k change."""

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from conftest import save_image
from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.graph import feature_model
from pipeline.preprocess import Preprocessing, normalize
from pipeline.runner import run
from pipeline.render.training import compose_evolution_sheet
from pipeline.evolution import choose_channels, topk_change
from pipeline.topk import topk_from_maps
from pipeline.models.sources import save_spec, snapshot_path
from test_pipeline import compose_cfg

EPOCHS = (1, 2, 5)
LAYERS = ("c1", "c2")


def tiny_net(seed):
    rng = np.random.default_rng(seed)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(2, name="p1")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inp, keras.layers.Activation("softmax", name="softmax")(x), name="tiny")
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    """Hand-made snapshots: epoch 2 is epoch 1 unchanged, epoch 5 has other weights."""
    root = tmp_path_factory.mktemp("evolution")
    train_dir = root / "train_run"
    nets = {1: tiny_net(1), 2: tiny_net(1), 5: tiny_net(5)}
    for epoch, net in nets.items():
        snapshot_path(train_dir, epoch).parent.mkdir(parents=True, exist_ok=True)
        net.save(snapshot_path(train_dir, epoch))
    save_spec(train_dir, Preprocessing(height=12, width=12, channels=3, normalize="unit"), ["a", "b", "c"])
    rng = np.random.default_rng(0)
    photos = root / "photos"
    for i in range(30):
        save_image(photos / f"img{i:02d}.png", (rng.random((12, 12, 3)) * 255).astype(np.uint8))
    cfg = compose_cfg(["model=snapshot", f"model.run_dir={train_dir}", "dataset=folder", f"dataset.path={photos}",
                       "layers=[c1,c2]", "topk=4", "batch_size=7", "stages=[evolution]", "crop.max_size=0",
                       "evolution.channels=[0,2,3]"])
    run_dir = root / "run"
    run(cfg, run_dir)
    return cfg, nets, run_dir


def brute_force_tables(cfg, net):
    table = list_images(cfg.dataset)
    spec = Preprocessing(height=12, width=12, channels=3, normalize="unit")
    features = feature_model(net, list(LAYERS))
    ids, maps, pixels = [], {n: [] for n in LAYERS}, {}
    for batch_ids, batch in BatchStream(table, spec, 4):
        outs = features(normalize(batch, "unit"))
        ids.append(batch_ids)
        for name, out in zip(LAYERS, outs):
            maps[name].append(out.numpy())
        pixels.update(zip(batch_ids.tolist(), batch.numpy()))
    ids = np.concatenate(ids)
    return {n: topk_from_maps(np.concatenate(m), ids, 4) for n, m in maps.items()}, pixels


def test_every_snapshot_equals_brute_force_top_k(evolved):
    cfg, nets, run_dir = evolved
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert list(f["evolution/epochs"][()]) == list(EPOCHS)
        for e, epoch in enumerate(EPOCHS):
            expected, _ = brute_force_tables(cfg, nets[epoch])
            for name in LAYERS:
                g = f[f"evolution/{name}/topk"]
                np.testing.assert_array_equal(g["image"][e], expected[name].image)
                np.testing.assert_array_equal(g["y"][e], expected[name].y)
                np.testing.assert_array_equal(g["x"][e], expected[name].x)
                np.testing.assert_allclose(g["value"][e], expected[name].value, rtol=1e-5)


def test_top_k_change_against_set_arithmetic(evolved):
    _, _, run_dir = evolved
    with h5py.File(run_dir / "results.h5", "r") as f:
        for name in LAYERS:
            image = f[f"evolution/{name}/topk/image"][()]
            change = f[f"evolution/{name}/change"][()]
            assert change.shape == (2, image.shape[1])
            assert (change[0] == 0).all()  # epoch 2 is epoch 1 unchanged
            for c in range(image.shape[1]):
                before, after = set(image[1, c]), set(image[2, c])
                assert change[1, c] == pytest.approx(len(before - after) / 4)
            assert change[1].mean() > 0  # other weights, other winners


def test_topk_change_known_answers():
    image = np.array([[[1, 2, 3, 4], [5, 6, -1, -1]],
                      [[4, 3, 2, 1], [5, 7, 8, -1]],
                      [[9, 8, 7, 6], [-1, -1, -1, -1]]])
    np.testing.assert_allclose(topk_change(image), [[0.0, 0.5], [1.0, 1.0]])


def test_patches_are_the_model_input_pixels_of_each_snapshot(evolved):
    cfg, nets, run_dir = evolved
    _, pixels = brute_force_tables(cfg, nets[1])
    with h5py.File(run_dir / "results.h5", "r") as f:
        for name in LAYERS:
            g = f[f"evolution/{name}"]
            image, box, y, x = (g[f"topk/{k}"][()] for k in ("image", "box", "y", "x"))
            patches = g["patches"][()]
            row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
            assert patches.shape[:3] == image.shape and patches.shape[-1] == 3
            for e, c, k in np.ndindex(*image.shape):
                y0, x0, y1, x1 = box[e, c, k]
                oy, ox = row_offset[y[e, c, k]], col_offset[x[e, c, k]]
                expected = np.zeros_like(patches[e, c, k])
                expected[oy:oy + y1 - y0, ox:ox + x1 - x0] = pixels[image[e, c, k]][y0:y1, x0:x1]
                np.testing.assert_array_equal(patches[e, c, k], expected)


def test_sheet_has_one_column_per_snapshot_holding_the_top1_patch(evolved):
    _, _, run_dir = evolved
    with h5py.File(run_dir / "results.h5", "r") as f:
        g = f["evolution/c2"]
        channels = g["channels"][()]
        patches = g["patches"][()][:, channels, :1]
        valid = g["topk/image"][()][:, channels, :1] >= 0
    assert list(channels) == [0, 2, 3]
    # the layout with a subtitle, as the stage draws it; the cells are read from the saved PNG
    sheet, origins, (ch, cw) = compose_evolution_sheet(patches, valid, EPOCHS, channels, "c2", "subtitle")
    saved = np.asarray(Image.open(run_dir / "sheets" / "evolution" / "c2.png").convert("RGB"))
    assert saved.shape == sheet.shape
    assert len(np.unique(origins[..., 1])) == len(EPOCHS)  # one column per snapshot
    assert len(np.unique(origins[..., 0])) == len(channels)  # one row per channel
    h = patches.shape[3]
    factor = ch // h
    assert factor >= 2 and ch == h * factor
    for r in range(len(channels)):
        for e in range(len(EPOCHS)):
            y, x = origins[r, e]
            expected = np.repeat(np.repeat(patches[e, r, 0], factor, axis=0), factor, axis=1)
            np.testing.assert_array_equal(saved[y:y + ch, x:x + cw], expected)
    assert (run_dir / "sheets" / "evolution" / "topk_change.png").stat().st_size > 5_000
    assert (run_dir / "sheets" / "evolution" / "c1.png").exists()


def test_montage_cells_show_the_top_patches_in_rank_order():
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 255, (2, 1, 4, 5, 5, 3), dtype=np.uint8)
    valid = np.ones((2, 1, 4), bool)
    valid[1, 0, 3] = False
    sheet, origins, (ch, cw) = compose_evolution_sheet(patches, valid, [3, 9], [7], "layer")
    y, x = origins[0, 1]
    side = 5 * (26 // 5)  # each patch enlarged by a whole factor, 1 px between them
    cell = sheet[y:y + ch, x:x + cw]
    assert ch == 2 * side + 1
    top_right = cell[:side, side + 1:]
    np.testing.assert_array_equal(top_right[::5, ::5], patches[1, 0, 1])
    assert (cell[side + 1:, side + 1:] == 128).all()  # empty slot: grey


def test_channel_choice():
    np.testing.assert_array_equal(choose_channels(4, 10), [0, 3, 6, 9])
    np.testing.assert_array_equal(choose_channels(50, 3), [0, 1, 2])
    np.testing.assert_array_equal(choose_channels([5, 1], 8), [5, 1])
    with pytest.raises(PipelineError, match="below 8"):
        choose_channels([8], 8)


def test_without_snapshots_it_says_what_to_do(tmp_path, photo_folder):
    cfg = compose_cfg(["dataset=folder", f"dataset.path={photo_folder}", "stages=[evolution]"])
    with pytest.raises(PipelineError, match="list train before evolution"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "results.h5").exists()
