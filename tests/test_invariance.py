"""The invariance stage: warps checked against exact answers, feature distances and class
probabilities against brute force on a hand-set model; run.py end to end with train and evolution."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.render.maps import redraw_stale_sheets
from pipeline.runner import run
from pipeline.layers import default_layers
from pipeline.invariance import parameter_grid, transform_matrices, warp
from test_cli import run_py
from test_pipeline import compose_cfg
from test_train import shapes_idx, write_idx

S = 16


def assert_redrawn(run_dir, names):
    """The report's redraw hook keeps figures drawn from the stage's current part, and draws
    again, from results.h5 alone, byte for byte, the ones deleted or drawn from an older part."""
    sheets = run_dir / "sheets"
    drawn = {n: (sheets / n).read_bytes() for n in names}
    assert redraw_stale_sheets(run_dir / "results.h5", run_dir) == []  # up to date: nothing redrawn
    for n in names:
        (sheets / n).unlink()
    redrawn = redraw_stale_sheets(run_dir / "results.h5", run_dir)
    assert {p.relative_to(sheets).as_posix() for p in redrawn} >= set(names)
    assert {n: (sheets / n).read_bytes() for n in names} == drawn
    return redrawn


def warped(kind, value, image, fill="constant"):
    m = transform_matrices(kind, np.array([value]), image.shape[:2])
    return warp(image[None].astype(np.float32), m, fill).numpy()[0]


# ---------------------------------------------------------------- the warps

def test_integer_shifts_and_quarter_turns_are_exact():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (S, S, 1)).astype(np.float32)
    down = np.zeros_like(image)
    down[4:] = image[:-4]
    np.testing.assert_allclose(warped("translation", 4 / S, image), down, atol=1e-3)
    up = np.zeros_like(image)
    up[:-2] = image[2:]
    np.testing.assert_allclose(warped("translation", -2 / S, image), up, atol=1e-3)
    np.testing.assert_allclose(warped("rotation", 90, image), np.rot90(image), atol=1e-3)  # counter-clockwise
    np.testing.assert_allclose(warped("rotation", -90, image), np.rot90(image, -1), atol=1e-3)
    np.testing.assert_allclose(warped("rotation", 180, image), np.rot90(image, 2), atol=1e-3)
    np.testing.assert_array_equal(warped("scale", 1.0, image), image)


def test_bilinear_warps_of_a_linear_ramp_are_exact():
    """Bilinear sampling reproduces a linear function exactly wherever it samples inside
    the image: the expected values follow from the geometry alone."""
    size, c = 21, 10.0
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    ramp = (3 * yy + 2 * xx + 10)[..., None].astype(np.float32)
    zoom = warped("scale", 1.5, ramp)  # zoom in: every sample lies inside
    np.testing.assert_allclose(zoom[..., 0], 3 * (c + (yy - c) / 1.5) + 2 * (c + (xx - c) / 1.5) + 10, atol=1e-3)
    angle = np.deg2rad(30)
    src_x = np.cos(angle) * (xx - c) - np.sin(angle) * (yy - c) + c
    src_y = np.sin(angle) * (xx - c) + np.cos(angle) * (yy - c) + c
    inside = (src_x >= 0) & (src_x <= size - 1) & (src_y >= 0) & (src_y <= size - 1)
    rotated = warped("rotation", 30, ramp)[..., 0]
    np.testing.assert_allclose(rotated[inside], (3 * src_y + 2 * src_x + 10)[inside], atol=1e-3)
    assert (rotated[~inside & ((src_x < -1) | (src_x > size) | (src_y < -1) | (src_y > size))] == 0).all()


def test_rotation_matches_scikit_image():
    from skimage.transform import rotate

    rng = np.random.default_rng(1)
    image = rng.random((S, S, 1)).astype(np.float32) * 255
    ours = warped("rotation", 30, image)[..., 0]
    theirs = rotate(image[..., 0], 30, order=1, mode="constant", cval=0, preserve_range=True)
    np.testing.assert_allclose(ours[3:-3, 3:-3], theirs[3:-3, 3:-3], atol=1e-2)


def test_parameter_grid_always_holds_the_identity():
    values, i = parameter_grid(-0.3, 0.3, 4, 0.0)
    assert values[i] == 0.0 and len(values) == 5 and (np.diff(values) > 0).all()
    values, i = parameter_grid(0.5, 2.0, 4, 1.0)
    assert list(values) == [0.5, 1.0, 1.5, 2.0] and i == 1
    with pytest.raises(PipelineError, match="low < high"):
        parameter_grid(1.0, 1.0, 5, 1.0)


# ---------------------------------------------------------------- the stage on a hand-set model

def hand_set_model(path):
    """'pix' copies the (unit-scaled) pixels: its distance is the pixel distance.
    'relu' is a fixed edge detector; a softmax over three fixed scores ends it."""
    inp = keras.Input((S, S, 1))
    pix = keras.layers.Conv2D(1, 1, use_bias=False, name="pix")(inp)
    edges = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="relu")(pix)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(edges)
    logits = keras.layers.Dense(3, name="logits")(pooled)
    model = keras.Model(inp, keras.layers.Softmax(name="probs")(logits))
    sobel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
    model.get_layer("pix").set_weights([np.ones((1, 1, 1, 1), np.float32)])
    model.get_layer("relu").set_weights([np.stack([sobel, sobel.T], -1)[:, :, None, :], np.zeros(2, np.float32)])
    model.get_layer("logits").set_weights([np.array([[3.0, -1.0, 0.5], [-2.0, 2.0, 0.5]], np.float32),
                                           np.array([0.0, 0.1, -0.1], np.float32)])
    model.save(path)
    return model


def blobs():
    """Six grey Gaussian blobs at different places, labels 0, 1, 2, 0, 1, 2."""
    yy, xx = np.mgrid[:S, :S]
    centres = [(7, 7), (8, 6), (6, 9), (9, 8), (7, 9), (8, 8)]
    images = [200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0 ** 2)) for cy, cx in centres]
    return np.stack(images).astype(np.uint8), np.array([0, 1, 2, 0, 1, 2], np.uint8)


@pytest.fixture(scope="module")
def invariance_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("invariance")
    model = hand_set_model(root / "hand.keras")
    images, labels = blobs()
    write_idx(root / "train-images-idx3-ubyte", images)
    write_idx(root / "train-labels-idx1-ubyte", labels)
    cfg = compose_cfg(["model=file", f"model.path={root / 'hand.keras'}", "model.preprocess=unit", "dataset=idx",
                       f"dataset.path={root}", "layers=[pix,relu]", "stages=[invariance]", "batch_size=8",
                       "invariance.images=3", "invariance.steps=5", "invariance.translation=[-0.25,0.25]",
                       "invariance.rotation=[-90,90]", "invariance.scale=[0.5,2.0]", "invariance.target=label"])
    run(cfg, root / "run")
    return model, images, labels, root / "run" / "results.h5"


def test_curves_are_zero_at_the_identity_and_grow_for_the_first_layer(invariance_run):
    _, _, _, results = invariance_run
    with h5py.File(results, "r") as f:
        g = f["invariance"]
        # the scanned layers, then the classifier's input (here the pooled edge energy)
        assert json.loads(g.attrs["layers"]) == ["pix", "relu", "gap"]
        for kind in ("translation", "rotation", "scale"):
            identity = g[kind].attrs["identity"]
            for layer in ("pix", "relu", "gap"):
                d = g[f"{kind}/distance/{layer}"][()]
                assert d.shape == (3, len(g[f"{kind}/values"]))
                np.testing.assert_allclose(d[:, identity], 0.0, atol=1e-5)
                if layer != "gap":
                    assert (d[:, np.arange(d.shape[1]) != identity] > 1e-3).all()
            np.testing.assert_allclose(g[f"{kind}/probability"][:, identity], g["reference_probability"][()],
                                       rtol=1e-5)
        values = g["translation/values"][()]
        d = g["translation/distance/pix"][()]
        np.testing.assert_allclose(values, [-0.25, -0.125, 0.0, 0.125, 0.25])
        assert (d[:, 0] > d[:, 1]).all() and (d[:, 4] > d[:, 3]).all()  # grows with the shift
        scale = g["scale/distance/pix"][()]
        np.testing.assert_allclose(g["scale/values"][()], [0.5, 0.875, 1.0, 1.25, 1.625, 2.0])
        assert (np.diff(scale[:, 2:], axis=1) > 0).all() and (np.diff(scale[:, :3], axis=1) < 0).all()
        # global pooling forgets where the blob is: a 2-pixel shift or a rotation barely moves it
        relative = {(layer, kind): g[f"{kind}/distance/{layer}"][()] / g[f"norm/{layer}"][()][:, None]
                    for layer in ("pix", "gap") for kind in ("translation", "rotation")}
        assert (relative["pix", "translation"][:, [1, 3]] > 0.5).all()
        assert (relative["gap", "translation"][:, [1, 3]] < 0.1).all()
        assert (relative["gap", "rotation"] < 0.1).all()


def test_first_layer_distance_and_probability_equal_brute_force(invariance_run):
    model, images, labels, results = invariance_run
    with h5py.File(results, "r") as f:
        g = f["invariance"]
        ids = g["images"][()]
        assert list(ids) == [0, 1, 2]  # one image of each class
        assert list(g["target"][()]) == [0, 1, 2] and g["target_is_label"][()].all()
        shifts = np.rint(g["translation/values"][()] * S).astype(int)
        pix = g["translation/distance/pix"][()]
        probability = g["translation/probability"][()]
        rot = g["rotation/distance/pix"][()]
        rot_values = g["rotation/values"][()]
        stored = g["translation/pixels"][()]
    for n, i in enumerate(ids):
        x = images[i].astype(np.float64)
        for t, shift in enumerate(shifts):
            moved = np.zeros_like(x)
            if shift >= 0:
                moved[shift:] = x[:S - shift]
            else:
                moved[:shift] = x[-shift:]
            assert pix[n, t] == pytest.approx(np.linalg.norm(moved - x) / 255, rel=1e-4)
            np.testing.assert_array_equal(stored[n, t, ..., 0], moved.astype(np.uint8))
            p = model.predict((moved / 255)[None, ..., None].astype(np.float32), verbose=0)[0]
            assert probability[n, t] == pytest.approx(p[labels[i]], rel=1e-4)
        quarter = list(rot_values).index(90.0)
        assert rot[n, quarter] == pytest.approx(np.linalg.norm(np.rot90(x) - x) / 255, rel=1e-3)


def test_store_layout_and_figure(invariance_run):
    _, _, _, results = invariance_run
    with h5py.File(results, "r") as f:
        g = f["invariance"]
        assert g["translation/pixels"].shape == (3, 5, S, S, 1)
        assert g["rotation/pixels"].shape == (3, 5, S, S, 1)
        assert g["scale/predicted"].dtype == np.int64
        assert g["norm/pix"].shape == (3,)
        assert g.attrs["fill"] == "constant"
        assert "invariance" in json.loads(f.attrs["stages_done"])
    for suffix in (".png", ".pdf"):
        assert (results.parent / "sheets" / f"invariance{suffix}").stat().st_size > 10_000
    assert_redrawn(results.parent, ["invariance.png"])


def test_default_layers():
    from pipeline.train import build_convnet

    net = build_convnet((16, 16), 1, 3)
    assert default_layers(net, ["conv1", "conv4"]) == ["conv1", "conv4", "dense"]


# ---------------------------------------------------------------- correspondence (section 4.3)

def test_sign_disagreement_equals_pairwise_hamming_distances():
    from pipeline.correspondence import sign_disagreement

    rng = np.random.default_rng(3)
    eps = rng.integers(-1, 2, (2, 5, 40)) * rng.random((2, 5, 40))
    for b in range(2):
        pairs = [np.mean(np.sign(eps[b, i]) != np.sign(eps[b, j])) for i in range(5) for j in range(5) if i != j]
        assert sign_disagreement(eps[b]) == pytest.approx(np.mean(pairs))
    np.testing.assert_allclose(sign_disagreement(eps), [sign_disagreement(eps[0]), sign_disagreement(eps[1])])
    assert sign_disagreement(np.ones((3, 7))) == 0.0


def test_correspondence_stage_against_brute_force(tmp_path, invariance_run):
    from pipeline.correspondence import pixel_box

    _, images, _, results = invariance_run
    root = results.parent.parent
    cfg_args = ["model=file", f"model.path={root / 'hand.keras'}", "model.preprocess=unit", "dataset=idx",
                f"dataset.path={root}", "layers=[pix]", "batch_size=4"]
    run(compose_cfg(cfg_args + ["stages=[correspondence]", "correspondence.images=[0,2,3,5]",
                                "correspondence.parts=[[0.25,0.25,0.5,0.75]]", "correspondence.part_names=[middle]",
                                "correspondence.random=3"]), tmp_path / "run")
    np.testing.assert_array_equal(pixel_box([0.25, 0.25, 0.5, 0.75], (S, S)), [4, 4, 8, 12])
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["correspondence"]
        assert json.loads(g.attrs["layers"]) == ["pix", "gap"] and json.loads(g.attrs["parts"]) == ["middle"]
        assert list(g["images"][()]) == [0, 2, 3, 5]
        boxes = np.concatenate([g["boxes"][()], g["random_boxes"][0]])
        scores = np.concatenate([g["score"][()], g["random_score"][0]])
    assert scores.shape == (4, 2)
    x = images[[0, 2, 3, 5]].astype(np.float64) / 255
    for (y0, x0, y1, x1), score in zip(boxes, scores):
        assert (y1 - y0, x1 - x0) == (4, 8)
        eps = np.zeros_like(x)
        eps[:, y0:y1, x0:x1] = x[:, y0:y1, x0:x1]  # occluded with black: the pixels are what is lost
        signs = np.sign(eps.reshape(4, -1))
        expected = np.mean([np.mean(signs[i] != signs[j]) for i in range(4) for j in range(4) if i != j])
        assert score[0] == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "run" / "sheets" / "correspondence.png").stat().st_size > 5_000
    assert_redrawn(tmp_path / "run", ["correspondence.png"])
    # through the report stage, which calls the redraw hook: a figure drawn from an earlier run is drawn again
    figure = tmp_path / "run" / "sheets" / "correspondence.png"
    drawn = figure.read_bytes()
    figure.write_bytes(b"stale")
    record = tmp_path / "run" / "sheets" / ".correspondence.sheets.json"
    record.write_text(json.dumps(dict(json.loads(record.read_text()), part=[0, 0])))
    run(compose_cfg(cfg_args + ["stages=[report]", "report.cards=none", "report.pdf=false"]), tmp_path / "run")
    assert figure.read_bytes() == drawn


# ---------------------------------------------------------------- run.py end to end

def test_run_py_trains_evolves_measures_and_skips_on_rerun(tmp_path):
    data = shapes_idx(tmp_path / "data", n=600, size=16)
    run_dir = tmp_path / "run"
    args = ["dataset=idx", f"dataset.path={data}", "stages=[train,evolution,invariance]", "train.epochs=2",
            "train.snapshots=[1,2]", "evolution.channels=4", "invariance.steps=4", f"hydra.run.dir={run_dir}"]
    proc = run_py(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert set(json.loads(f.attrs["stages_done"])) == {"train", "evolution", "invariance"}
        assert list(f["evolution/epochs"][()]) == [1, 2]
        assert f["train/val_accuracy"].shape == (2,)
        assert f["evolution/conv1/patches"].shape[:3] == (2, 32, 9)
        assert json.loads(f["invariance"].attrs["layers"]) == ["conv1", "conv2", "conv3", "conv4", "dense"]
    for name in ("conv1", "conv2", "conv3", "conv4", "topk_change"):
        assert (run_dir / "sheets" / "evolution" / f"{name}.png").exists()
    assert sorted(os.listdir(run_dir / "snapshots")) == ["epoch_001.keras", "epoch_002.keras", "preprocessing.json"]
    redrawn = assert_redrawn(run_dir, ["training_curve.png", "evolution/conv2.png", "evolution/topk_change.png"])
    assert {p.name for p in redrawn} >= {"training_curve.pdf", "conv1.png", "topk_change.pdf"}  # all of a stage's
    before = (run_dir / "results.h5").read_bytes()
    again = run_py(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("train", "evolution", "invariance"):
        assert f"stage {stage}: already in" in again.stderr + again.stdout
    assert (run_dir / "results.h5").read_bytes() == before
