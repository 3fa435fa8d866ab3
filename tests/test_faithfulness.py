"""Deletion and insertion curves: known orderings of oracle, random and inverted maps."""

import numpy as np

from pipeline.faithfulness import area, curves, saliency_order
from test_explain import square_detector, square_image


def test_saliency_order_ranks_pixels_most_salient_first_ties_by_index():
    maps = np.array([[[0.0, 2.0], [1.0, 1.0]]])
    assert saliency_order(maps, (2, 2)).tolist() == [[3, 0, 1, 2]]


def test_an_oracle_map_deletes_fastest_and_inserts_fastest():
    model = square_detector()
    corners = [(3, 4), (20, 22), (5, 24), (22, 2)]
    x = np.stack([square_image(y, x, seed=i) for i, (y, x) in enumerate(corners)])
    oracle = np.zeros((len(x), 32, 32), np.float32)
    for i, (y, x0) in enumerate(corners):
        oracle[i, y:y + 6, x0:x0 + 6] = 1.0
    rng = np.random.default_rng(0)
    random_maps = rng.random(oracle.shape).astype(np.float32)
    classes = np.zeros(len(x), np.int64)  # 'square'
    logits = lambda batch: model(batch)  # noqa: E731
    auc = {}
    for name, maps in (("oracle", oracle), ("random", random_maps), ("inverted", 1 - oracle)):
        deletion, insertion = curves(logits, x, maps, classes, steps=16, batch=50)
        assert deletion.shape == insertion.shape == (len(x), 17)
        np.testing.assert_allclose(deletion[:, 0], insertion[:, -1], rtol=1e-5)  # both: the whole image
        np.testing.assert_allclose(deletion[:, -1], insertion[:, 0], rtol=1e-5)  # both: the baseline
        auc[name] = (area(deletion).mean(), area(insertion).mean())
    assert auc["oracle"][0] < auc["random"][0] < auc["inverted"][0]
    assert auc["oracle"][1] > auc["random"][1] > auc["inverted"][1]


def test_area_is_the_trapezoid_rule_over_the_unit_interval():
    np.testing.assert_allclose(area(np.array([1.0, 1.0, 1.0])), 1.0)
    np.testing.assert_allclose(area(np.array([1.0, 0.0])), 0.5)
    np.testing.assert_allclose(area(np.array([[0.0, 1.0, 0.0]])), [0.5])


def test_model_randomization_decorrelates_gradcam_and_restores_the_weights(tmp_path):
    import h5py
    import keras

    from conftest import save_image
    from pipeline.randomization import spearman
    from pipeline.runner import run
    from test_explain import random_model
    from test_pipeline import compose_cfg

    a = np.random.default_rng(0).random((2, 12))
    np.testing.assert_allclose(spearman(a, a ** 3), 1.0)  # ranks only
    np.testing.assert_allclose(spearman(a, -a), -1.0)
    np.testing.assert_allclose(spearman(a, np.ones_like(a)), 0.0)  # a constant map: no correlation

    model = random_model(seed=3, batchnorm=True)
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(1)
    for i in range(4):
        save_image(tmp_path / "photos" / f"{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'm.keras'}", "model.preprocess=unit", "dataset=folder",
                       f"dataset.path={tmp_path / 'photos'}", "stages=[randomization,report]", "cam.layer=r2",
                       "randomization.steps=3", "report.cards=false", "report.pdf=false"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["randomization"]
        cam, guided = g["gradcam"][()], g["guided_backprop"][()]
        assert cam.shape == guided.shape == (3, 4) and len(g["layers"]) == 3
        assert cam[-1].mean() < 0.5 and cam[-1].mean() < cam[0].mean()  # every layer random: Grad-CAM decorrelates
    assert "Model randomization" in (tmp_path / "run" / "index.html").read_text()
    # the run restored the weights: the same file's model gives the same logits as before
    again = keras.models.load_model(tmp_path / "m.keras")
    x = rng.random((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(again(x), model(x), rtol=1e-5)
