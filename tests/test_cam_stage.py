"""The cam, activations and occlusion stages on a tiny real model, real files, real HDF5."""

import json

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import save_image
from pipeline.datasets import BatchStream, list_images
from pipeline.render.draw import unit_scale
from pipeline.errors import PipelineError
from pipeline.explain import blank_channels
from pipeline.models.sources import load_model
from pipeline.preprocess import normalize
from pipeline.runner import run
from pipeline.store import read_strings
from test_cli import run_py
from test_pipeline import compose_cfg, tiny_model


@pytest.fixture
def tiny(tmp_path, photo_folder):
    """The tiny conv net of test_pipeline (24x24 input, relu2 is 6x6x6, 3 logits), a photo
    folder with two class folders and one file that is not an image."""
    (photo_folder / "b_cls" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    model = tiny_model(tmp_path / "tiny.keras")
    base = ["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
            f"dataset.path={photo_folder}", "batch_size=4"]
    return model, base


def model_pixels(cfg):
    """{image id: model input} for every readable image, through the pipeline's own stream."""
    spec = load_model(cfg.model).preprocessing
    table = list_images(cfg.dataset)
    return {int(i): x for ids, p in BatchStream(table, spec, 8)
            for i, x in zip(ids, normalize(p, spec.normalize).numpy())}


def tutorial_gradcam(model, x, cls):
    """Grad-CAM the textbook way, one image at a time, written independently of pipeline.explain."""
    grad_model = keras.Model(model.input, [model.get_layer("relu2").output, model.output])
    with tf.GradientTape() as tape:
        maps, logits = grad_model(x[None])
        score = logits[0, cls]
    grads = tape.gradient(score, maps)[0].numpy()
    return np.maximum(np.einsum("hwc,c->hw", maps[0].numpy(), grads.mean(axis=(0, 1))), 0)


def test_cam_stage_stores_every_image_and_draws_sheets(tmp_path, tiny):
    model, base = tiny
    drawn = [9, 2, 7, 0, 4, 5, 6, 10]  # 10 is the broken file: listed, never drawn
    cfg = compose_cfg(base + ["stages=[cam]", "cam.methods=[gradcam,gradcam++,scorecam,guided_gradcam]",
                              "cam.scorecam_batch=5", f"cam.draw=[{','.join(map(str, drawn))}]"])
    run(cfg, tmp_path / "run")
    pixels = model_pixels(cfg)
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        ids = f["cam/image"][()]
        assert sorted(ids) == sorted(pixels) and len(ids) == len(f["images/path"]) - 1  # the broken file
        assert "not" not in "".join(read_strings(f["images/error"])[i] for i in ids)
        assert f["images/ok"][()].sum() == len(ids)
        assert f["cam"].attrs["layer"] == "relu2" and json.loads(f["cam"].attrs["methods"]) == [
            "gradcam", "gradcam++", "scorecam", "guided_gradcam"]
        for m in ("gradcam", "gradcam++", "scorecam"):
            g = f[f"cam/{m}"]
            assert g["map"].shape == (len(ids), 6, 6) and g["map"].dtype == np.float32
            np.testing.assert_allclose(g["max"][()], g["map"][()].max(axis=(1, 2)))
            assert np.isfinite(g["map"][()]).all() and (g["map"][()] >= 0).all()
        # the model's top classes of every image, with softmax probabilities of the logits
        p = f["predictions"]
        for row, i in enumerate(p["image"][()]):
            logits = model(pixels[int(i)][None]).numpy()[0]  # the tiny model outputs logits
            assert list(p["class"][row]) == list(np.argsort(-logits)[:3])
            np.testing.assert_allclose(p["logit"][row], np.sort(logits)[::-1], rtol=1e-4, atol=1e-5)
            softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            np.testing.assert_allclose(p["probability"][row], np.sort(softmax)[::-1], rtol=1e-4, atol=1e-6)
        maps = f["cam/gradcam/map"][()]
        classes, scores = f["cam/gradcam/class"][()], f["cam/gradcam/score"][()]
        for row, i in enumerate(ids):
            logits = model(pixels[i][None]).numpy()[0]
            assert classes[row] == logits.argmax()
            assert np.isclose(scores[row], logits.max(), rtol=1e-5)
            np.testing.assert_allclose(maps[row], tutorial_gradcam(model, pixels[i], classes[row]),
                                       rtol=1e-4, atol=1e-6)
        assert maps.max() > 0
        # every other method stored under its own name: each equals that method computed
        # directly on the same inputs and classes (their closed forms are in test_explain)
        from pipeline.explain import grad_cam_pp, guided_grad_cam, score_cam

        x = np.stack([pixels[int(i)] for i in ids])
        for name, method in (("gradcam++", grad_cam_pp), ("scorecam", score_cam)):
            want = method(model, x, targets=classes, layer="relu2")
            np.testing.assert_array_equal(f[f"cam/{name}/class"][()], classes)
            np.testing.assert_allclose(f[f"cam/{name}/map"][()], want.maps, rtol=1e-4, atol=1e-6, err_msg=name)
        # guided Grad-CAM (input resolution) only for the drawn images that could be read, as
        # float16 over a per-map scale: equal to the method computed directly on those images
        g = f["cam/guided_gradcam"]
        got = g["image"][()]
        assert sorted(got) == sorted(set(drawn) - {10}) and (g["rank"][()] == 0).all()
        assert g["map"].dtype == np.float16 and g["map"].shape == (len(got), 24, 24, 3)
        for src in g["map"].virtual_sources():  # the chunk files under the virtual dataset
            with h5py.File(tmp_path / "run" / "parts" / src.file_name, "r") as part:
                assert part[src.dset_name].compression == "gzip" and part[src.dset_name].chunks is not None
        row_of = {int(i): r for r, i in enumerate(ids)}
        want = guided_grad_cam(model, np.stack([pixels[int(i)] for i in got]),
                               targets=classes[[row_of[int(i)] for i in got]], layer="relu2")
        np.testing.assert_array_equal(g["class"][()], want.classes)
        raw = g["map"][()].astype(np.float32) * g["scale"][()][:, None, None, None]
        np.testing.assert_allclose(g["scale"][()], np.abs(want.maps).max(axis=(1, 2, 3)), rtol=1e-4)
        assert (np.abs(raw - want.maps) <= 1e-3 * g["scale"][()][:, None, None, None]).all()
        np.testing.assert_allclose(g["max"][()], want.maps.max(axis=(1, 2, 3)), rtol=1e-4, atol=1e-9)
        for name in ("gradcam++", "scorecam"):  # and they differ from Grad-CAM on this model
            assert not np.allclose(unit_scale(f[f"cam/{name}/map"][()]), unit_scale(maps), atol=1e-3), name
        # the per-class mean of the max-normalised maps
        cm = f["cam/gradcam/class_mean"]
        for cls, count, mean in zip(cm["class"][()], cm["count"][()], cm["map"][()]):
            chosen = classes == cls
            assert chosen.sum() == count
            np.testing.assert_allclose(mean, unit_scale(maps[chosen]).mean(axis=0), rtol=1e-5, atol=1e-7)
        assert cm["count"][()].sum() == len(ids)
    sheets = tmp_path / "run" / "cam"
    pages = sorted(sheets.glob("overlays_*.png"))
    assert [p.name for p in pages] == ["overlays_000.png", "overlays_001.png"]  # 7 images, 6 rows a page
    for name in ("class_mean_gradcam.png", "class_mean_gradcam_pp.png", "class_mean_scorecam.png"):
        assert (sheets / name).exists()
    page = np.asarray(Image.open(pages[0]).convert("RGB")).astype(int)
    # jet's saturated colours are there: the heatmaps were drawn
    assert ((page[..., 0] > 200) & (page[..., 2] < 80)).sum() > 500
    assert ((page[..., 2] > 200) & (page[..., 0] < 80)).sum() > 500


def test_cam_draws_the_top_images_of_chosen_units_and_only_those_get_guided_maps(tmp_path, tiny):
    from matplotlib.text import Text

    from pipeline.render.image_sheet import PerImage, image_sheet
    from pipeline.render.results import class_namer

    _, base = tiny
    cfg = compose_cfg(base + ["stages=[scan,cam]", "layers=[relu2]", "cam.methods=[gradcam,guided_gradcam]",
                              "cam.draw={layer: relu2, channels: [1, 3], k: 2}"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        top = f["layers/relu2/topk/image"][()][[1, 3], :2].reshape(-1)
        ids = f["cam/image"][()]
        assert len(ids) == 10 and len(f["cam/gradcam/map"]) == 10  # the small maps: every image
        assert sorted(f["cam/guided_gradcam/image"][()]) == sorted(set(top.tolist()))
        # what every image gets is small: about two maps at the layer's resolution (the
        # input-resolution maps, 3,072 times more values on MobileNetV2, only for the drawn rows)
        h, w = f["cam"].attrs["map_shape"]
        sizes = []  # stored bytes of the stage's datasets but the drawn images' (part and chunk files)
        for path in (tmp_path / "run" / "parts").rglob("*.h5"):
            if path.name == "cam.h5" or path.parent.name.startswith("cam."):
                with h5py.File(path, "r") as part:
                    part.visititems(lambda name, d: sizes.append(d.id.get_storage_size()) if isinstance(
                        d, h5py.Dataset) and not d.is_virtual and "guided" not in name else None)
        assert sum(sizes) / len(ids) <= 2 * 4 * h * w, sum(sizes)  # 132 bytes an image here
        other = int(next(i for i in ids if i not in top))
        fig, _ = image_sheet(f, PerImage.read(f), other, class_namer(f), {"height": 24, "width": 24}, 50)
        assert any("drawn\nimages only (cam.draw)" in t.get_text() for t in fig.findobj(Text))
    pages = sorted((tmp_path / "run" / "cam").glob("overlays_*.png"))
    assert len(pages) == 1
    from pipeline.store import Store

    assert Store(tmp_path / "run").markers()["cam"]["depends_on"] == ["scan"]  # a new scan makes them stale

    # the sheets are drawn by render/ from results.h5 and the photos: the report stage draws a
    # deleted page, and a page drawn from an older run of the stage, again, byte for byte
    page = pages[0].read_bytes()
    record = tmp_path / "run" / "cam" / ".sheets.json"
    kept = record.read_text()
    pages[0].unlink()
    run(compose_cfg(base + ["stages=[report]", "report.cards=none", "report.pdf=false"]), tmp_path / "run")
    assert pages[0].read_bytes() == page and record.read_text() == kept
    pages[0].write_bytes(b"stale")
    record.write_text(json.dumps(dict(json.loads(kept), part=[0, 0])))
    run(compose_cfg(base + ["stages=[report]", "report.cards=none", "report.pdf=false"]), tmp_path / "run")
    assert pages[0].read_bytes() == page and record.read_text() == kept
    stamp = pages[0].stat().st_mtime_ns
    run(compose_cfg(base + ["stages=[report]", "report.cards=none", "report.pdf=false"]), tmp_path / "run")
    assert pages[0].stat().st_mtime_ns == stamp  # up to date: kept


def test_cam_faithfulness_curves_start_at_the_models_probability_and_reach_the_report(tmp_path, tiny):
    model, base = tiny
    cfg = compose_cfg(base + ["stages=[cam,report]", "cam.methods=[gradcam,guided_gradcam]",
                              "cam.faithfulness_steps=4", "cam.draw=1", "report.cards=false", "report.pdf=false"])
    run(cfg, tmp_path / "run")
    pixels = model_pixels(cfg)
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["cam/gradcam"]
        ids, classes = f["cam/image"][()], g["class"][()]
        deletion, insertion = g["deletion"][()], g["insertion"][()]
        assert deletion.shape == insertion.shape == (len(ids), 5) and g.attrs["faithfulness_steps"] == 4
        assert "deletion" not in f["cam/guided_gradcam"]  # a colour image, not a map over positions
        x = np.stack([pixels[int(i)] for i in ids])
        probs = tf.nn.softmax(model(x), axis=-1).numpy()[np.arange(len(ids)), classes]
        np.testing.assert_allclose(deletion[:, 0], probs, rtol=1e-5)  # nothing deleted: the model's own
        np.testing.assert_allclose(insertion[:, -1], probs, rtol=1e-5)  # everything inserted
        blank = tf.nn.softmax(model(np.zeros_like(x[:1])), axis=-1).numpy()[0, classes]
        np.testing.assert_allclose(deletion[:, -1], blank, rtol=1e-5)
        np.testing.assert_allclose(g["deletion_auc"][()], (deletion[:, :-1] + deletion[:, 1:]).sum(1) / 8, rtol=1e-5)
    html = (tmp_path / "run" / "index.html").read_text()
    assert "Faithfulness of the class activation maps" in html and "deletion AUC" in html


def test_per_class_means_are_drawn_only_for_classes_with_several_images():
    from pipeline.render.maps import CLASS_MEANS_DRAWN, classes_with_means

    assert classes_with_means(np.array([5, 3, 2, 1, 1])).tolist() == [0, 1, 2]
    assert classes_with_means(np.array([1, 1])).tolist() == []
    assert len(classes_with_means(np.full(CLASS_MEANS_DRAWN + 5, 4))) == CLASS_MEANS_DRAWN


def test_occlusion_colours_show_the_drop_on_one_scale():
    from pipeline.render.maps import drop_scale

    assert drop_scale(np.array([[0.0, 0.02], [0.1, 0.05]])) == (0.0, 0.1, "magma")  # data range, not 0..1
    lo, hi, cmap = drop_scale(np.array([[-0.03, 0.01], [0.2, 0.0]]))  # the square raises p somewhere
    assert (lo, hi, cmap) == (-0.2, 0.2, "RdBu_r")
    lo, hi, _ = drop_scale(np.zeros((2, 2)))
    assert lo == 0.0 < hi


def test_cam_targets_label_class_list_and_top_n(tmp_path, tiny):
    model, base = tiny
    pixels = None
    for target, extra in (("label", []), ("classes", ["cam.classes=[2,0]"]), ("top", ["cam.top_n=2"])):
        cfg = compose_cfg(base + ["stages=[cam]", "cam.methods=[gradcam]", "cam.draw=2", f"cam.target={target}"]
                          + extra)
        run(cfg, tmp_path / target)
        pixels = pixels or model_pixels(cfg)
        table = list_images(cfg.dataset)
        with h5py.File(tmp_path / target / "results.h5", "r") as f:
            ids, rank = f["cam/image"][()], f["cam/rank"][()]
            classes = f["cam/gradcam/class"][()]
            maps = f["cam/gradcam/map"][()]
            if target == "label":  # a_cls -> 0, b_cls -> 1
                np.testing.assert_array_equal(classes, table.labels[ids])
            else:
                assert len(ids) == 2 * len(pixels) and (np.bincount(rank) == len(pixels)).all()
                for row, (i, k) in enumerate(zip(ids, rank)):
                    logits = model(pixels[i][None]).numpy()[0]
                    want = [2, 0][k] if target == "classes" else np.argsort(-logits)[k]
                    assert classes[row] == want
                    np.testing.assert_allclose(maps[row], tutorial_gradcam(model, pixels[i], want),
                                               rtol=1e-4, atol=1e-6)


def test_cam_bad_config_is_one_clear_line_and_writes_nothing(tmp_path, tiny):
    _, base = tiny
    cases = [(["cam.methods=[gradcam,lime]"], "lime"),
             (["cam.target=classes", "cam.classes=[7]"], "classes 0 to 2"),
             (["cam.target=classes", "cam.classes=[tabby]"], "unknown class"),
             (["cam.target=sometimes"], "predicted\\|label"),
             (["cam.layer=relu9"], "unknown layer"),
             (["cam.layer=gap"], "not a \\(H, W, C\\) map")]
    for overrides, message in cases:
        cfg = compose_cfg(base + ["stages=[cam]"] + overrides)
        with pytest.raises(PipelineError, match=message) as err:
            run(cfg, tmp_path / "bad")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "bad" / "results.h5").exists()
    unlabelled = tmp_path / "list.txt"
    unlabelled.write_text(str(next((tmp_path / "photos" / "a_cls").glob("*.png"))) + "\n")
    cfg = compose_cfg(base + ["stages=[cam]", "dataset=filelist", f"dataset.path={unlabelled}", "cam.target=label"])
    with pytest.raises(PipelineError, match="no labels"):
        run(cfg, tmp_path / "bad")


def test_activations_stage_stores_maps_and_draws_sheets(tmp_path, tiny):
    model, base = tiny
    cfg = compose_cfg(base + ["stages=[scan,activations]", "layers=[relu1,relu2]",
                              "activations.images={layer: relu2, channels: [0, 3], k: 2}"])
    run(cfg, tmp_path / "run")
    pixels = model_pixels(cfg)
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        top = f["layers/relu2/topk/image"][()][[0, 3], :2].reshape(-1)
        ids = f["activations/image"][()]
        np.testing.assert_array_equal(ids, list(dict.fromkeys(top.tolist())))  # top images, first seen first
        fractions = f["activations/blank_fraction"][()]
        assert json.loads(f["activations/blank_fraction"].attrs["layers"]) == ["relu1", "relu2"]
        for depth, name in enumerate(("relu1", "relu2")):
            d = f[f"activations/{name}"]
            assert d.dtype == np.float16 and d.attrs["name"] == name and d.attrs["depth"] == depth
            want = keras.Model(model.input, model.get_layer(name).output)(np.stack([pixels[i] for i in ids])).numpy()
            assert d.shape == want.shape
            np.testing.assert_allclose(d[()].astype(np.float32), want, rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(fractions[:, depth], blank_channels(want).mean(axis=1))
    out = tmp_path / "run" / "activations"
    for i in ids:
        for name in ("relu1", "relu2"):
            assert (out / f"{name}_grid_{i}.png").exists() and (out / f"{name}_{i}.png").exists()
    assert (out / "blank_fraction.png").stat().st_size > 10_000

    # the first N, a list of ids, and the errors that name the fix
    cfg = compose_cfg(base + ["stages=[activations]", "layers=[relu2]", "activations.images=[5,1]"])
    run(cfg, tmp_path / "list")
    with h5py.File(tmp_path / "list" / "results.h5", "r") as f:
        np.testing.assert_array_equal(f["activations/image"][()], [5, 1])
    for images, message in (("[0,99]", "ids 0 to"), ("{layer: relu2, channels: [0]}", "list scan before activations"),
                            ("-3", "the first N")):
        cfg = compose_cfg(base + ["stages=[activations]", f"activations.images={images}"])
        with pytest.raises(PipelineError, match=message):
            run(cfg, tmp_path / f"bad{len(message)}")


def test_activations_sheet_shows_blank_channels_grey(tmp_path):
    """A layer with a dead channel (bias -100): its tile is flat grey, the others are not."""
    inp = keras.Input((12, 12, 3))
    out = keras.layers.ReLU(name="act")(keras.layers.Conv2D(4, 3, name="conv")(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(out)))
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    weights[1] = np.array([0.0, -100.0, 0.0, 0.0], np.float32)
    model.set_weights(weights)
    model.save(tmp_path / "m.keras")
    save_image(tmp_path / "photos" / "a.png", (rng.random((12, 12, 3)) * 255).astype(np.uint8))
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'm.keras'}", "model.preprocess=unit", "dataset=folder",
                       f"dataset.path={tmp_path / 'photos'}", "stages=[activations]", "layers=[act]",
                       "activations.images=1", "activations.per_row=4"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert np.isclose(f["activations/blank_fraction"][0, 0], 0.25)
        maps = f["activations/act"][0].astype(np.float32)
    from PIL import Image

    from pipeline.render import draw
    from pipeline.render.maps import PALETTE_ERROR, TILE_PX

    # the sheet as written (a 256-colour PNG): the composed tiles sit at whole-pixel scale below the title
    with Image.open(tmp_path / "run" / "activations" / "act_0.png") as im:
        assert im.mode == "P"
        sheet = np.asarray(im.convert("RGB")).astype(int)
    tiles = draw.channel_tiles(maps, blank_channels(maps[None])[0], max(TILE_PX, maps.shape[0]))
    composed = draw.tile(tiles, 4)
    rep = max(1, 640 // composed.shape[1])
    composed = np.repeat(np.repeat(composed, rep, axis=0), rep, axis=1)
    h, w = composed.shape[:2]
    top, left = 36, (max(w, 640) - w) // 2
    drawn = sheet[top:top + h, left:left + w]
    assert np.abs(drawn - composed).max() <= PALETTE_ERROR
    assert np.abs(drawn - composed).mean() < 2
    assert (sheet[:top] < 100).all(-1).sum() > 50  # the title's dark ink above the tiles
    t = tiles.shape[1] * rep  # tile 1 (the dead channel) flat grey, the others not
    step = (tiles.shape[1] + 2) * rep
    assert (np.abs(drawn[:t, step:step + t] - int(draw.BLANK_GREY * 255)) <= PALETTE_ERROR).all()
    for c in (0, 2, 3):
        assert len(np.unique(drawn[:t, c * step:c * step + t].reshape(-1, 3), axis=0)) > 3


def test_occlusion_stage_stores_maps_equal_to_masking_by_hand(tmp_path, tiny):
    model, base = tiny
    cfg_overrides = base + ["stages=[occlusion]", "occlusion.images=[0,2]", "occlusion.size=8",
                            "occlusion.stride=8", "occlusion.fill=0", "occlusion.batch_size=5"]
    cfg = compose_cfg(cfg_overrides)
    run(cfg, tmp_path / "run")
    pixels = model_pixels(cfg)
    feats = keras.Model(model.input, [model.get_layer("relu2").output, model.output])
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["occlusion"]
        np.testing.assert_array_equal(g["image"][()], [0, 2])
        np.testing.assert_array_equal(g["rows"][()], [0, 8, 16])
        assert g["probability"].shape == (2, 3, 3) and g.attrs["layer"] == "relu2"
        for row, i in enumerate((0, 2)):
            maps, logits = (t.numpy()[0] for t in feats(pixels[i][None]))
            cls, channel = logits.argmax(), maps.max(axis=(0, 1)).argmax()
            assert g["class"][row] == cls and g["channel"][row] == channel
            for gy, y0 in enumerate((0, 8, 16)):
                for gx, x0 in enumerate((0, 8, 16)):
                    x = pixels[i].copy()
                    x[y0:y0 + 8, x0:x0 + 8] = 0.0  # grey level 0, normalised by /255
                    m, lg = (t.numpy()[0] for t in feats(x[None]))
                    p = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
                    assert np.isclose(g["probability"][row, gy, gx], p[cls], rtol=1e-4, atol=1e-7)
                    assert np.isclose(g["activation"][row, gy, gx], m[..., channel].sum(), rtol=1e-4, atol=1e-5)
    for i in (0, 2):
        assert (tmp_path / "run" / "occlusion" / f"image_{i}.png").stat().st_size > 10_000
    # the occlusion sheet and the per-image sheet draw each map kind on one scale: the drop
    # from the unoccluded value, over its data range, said on the colour bar
    from matplotlib.collections import QuadMesh

    from pipeline.render.image_sheet import PerImage, image_sheet
    from pipeline.render.maps import drop_scale, occlusion_figure
    from pipeline.render.results import class_namer

    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        g = f["occlusion"]
        want = [g["base_probability"][1] - g["probability"][1], g["base_activation"][1] - g["activation"][1]]
        names = class_namer(f)
        sheets = (occlusion_figure(pixels[2], g, 1, names(int(g["class"][1]))),
                  image_sheet(f, PerImage.read(f), 2, names, {"height": 24, "width": 24}, 50)[0])
        for fig in sheets:
            meshes = [m for m in fig.findobj(QuadMesh) if m.axes.get_label() != "<colorbar>"]
            assert len(meshes) == 2
            for mesh, drop in zip(meshes, want):
                np.testing.assert_allclose(mesh.get_array(), drop, rtol=1e-6)
                lo, hi, cmap = drop_scale(drop)
                assert np.allclose(mesh.get_clim(), (lo, hi)) and mesh.get_cmap().name == cmap
            labels = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
            assert len(labels) == 2 and "minus with the square" in labels[0] and labels[0].startswith("p(")
            assert f"{g['base_probability'][1]:.3g}" in labels[0] and "total" in labels[1]
    # occlusion never reads `layers`: changing them neither recomputes nor refuses its results
    stamp = (tmp_path / "run" / "results.h5").stat().st_mtime_ns
    run(compose_cfg(list(cfg_overrides) + ["layers=[relu1]"]), tmp_path / "run")
    assert (tmp_path / "run" / "results.h5").stat().st_mtime_ns == stamp


def test_per_image_stages_from_the_command_line(tmp_path, tiny):
    _, base = tiny
    proc = run_py(*base, "stages=[activations,cam,occlusion]", "layers=[relu2]", "activations.images=2",
                  "occlusion.images=1", "cam.methods=[gradcam,gradcam++]", f"hydra.run.dir={tmp_path / 'cli'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(tmp_path / "cli" / "results.h5", "r") as f:
        assert {"activations", "cam", "occlusion", "images"} <= set(f)
        assert set(json.loads(f.attrs["stages_done"])) == {"activations", "cam", "occlusion"}
    proc = run_py(*base, "stages=[cam]", "cam.methods=[gradcam,nope]", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode != 0 and "nope" in proc.stderr and not (tmp_path / "bad" / "results.h5").exists()


def test_all_zero_gradcam_is_logged_and_marked_on_every_sheet(tmp_path, tiny, caplog):
    # negative logit weights: every channel weight of Grad-CAM at relu2 is negative, its maps
    # are exactly zero; the log counts them and each sheet says why instead of a dark overlay
    import logging

    from matplotlib.text import Text

    from pipeline.render.image_sheet import PerImage, image_sheet
    from pipeline.render.maps import class_mean_figure
    from pipeline.render.results import class_namer

    model, base = tiny
    dense = model.get_layer("logits")
    kernel, bias = dense.get_weights()
    dense.set_weights([-np.abs(kernel) - 0.1, bias])
    model.save(tmp_path / "negative.keras")
    cfg = compose_cfg(base + [f"model.path={tmp_path / 'negative.keras'}", "stages=[cam]",
                              "cam.methods=[gradcam,guided_gradcam]", "cam.draw=2"])
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.cam"):
        run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        n = len(f["cam/image"])
        assert not f["cam/gradcam/map"][()].any()
        lines = [r.getMessage() for r in caplog.records]
        assert any(line.startswith(f"cam: {n} of {n} Grad-CAM maps are all zero") for line in lines), lines
        fig, _ = image_sheet(f, PerImage.read(f), int(f["cam/image"][0]), class_namer(f), {"input_size": 24}, 50)
        notes = [t.get_text() for t in fig.findobj(Text)]
        assert any(t.startswith("Grad-CAM is zero here") and "see Grad-CAM++" in t for t in notes)
        assert any(t.startswith("guided Grad-CAM is zero here") for t in notes)
        cm = f["cam/gradcam/class_mean"]
        mean = class_mean_figure("gradcam", cm["class"][()], cm["count"][()], cm["map"][()], (24, 24),
                                 ["a", "b", "c"], "relu2")
        texts = [t.get_text() for t in mean.findobj(Text)]
        assert sum("maps\nare zero" in t for t in texts) == len(cm["class"])
    assert (tmp_path / "run" / "cam" / "class_mean_gradcam.png").exists()
