"""The Grad-CAM family on the embedded ImageNet MobileNetV2 and scikit-image's photos."""

import h5py
import numpy as np
import pytest
import skimage.data
from omegaconf import OmegaConf
from PIL import Image

from conftest import save_image
from pipeline.render import draw
from pipeline.explain import CamExplainer
from pipeline.models.imagenet import class_names
from pipeline.runner import run
from pipeline.preprocess import input_box
from test_pipeline import compose_cfg

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# chelsea (300 x 451): the cat's face, in photo pixels (y0, x0, y1, x1); right of it is background
CAT_FACE = (20, 60, 300, 380)


@pytest.fixture(scope="module")
def mobilenet():
    from pipeline.models.sources import load_model

    return load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))


def peak(heat, size=224):
    up, _ = draw.resample(heat, (size, size))
    return np.unravel_index(np.argmax(up), up.shape), up


def test_gradcam_peak_for_the_cat_lies_on_the_cat(mobilenet):
    photo = skimage.data.chelsea()
    explainer = CamExplainer(mobilenet.model, preprocessing=mobilenet.preprocessing)
    assert explainer.layer == "features_18_2" and explainer.map_shape == (7, 7, 1280)
    out = explainer.compute([photo], None, ("gradcam", "gradcam++"))
    cls = int(out["gradcam"].classes[0])
    assert cls in CATS, class_names()[cls]
    y0, x0, y1, x1 = input_box(*photo.shape[:2], mobilenet.preprocessing)
    for method in ("gradcam", "gradcam++"):
        (py, px), _ = peak(out[method].maps[0])
        # from model-input pixels back to the photo
        oy, ox = y0 + (py + 0.5) * (y1 - y0) / 224, x0 + (px + 0.5) * (x1 - x0) / 224
        assert CAT_FACE[0] <= oy < CAT_FACE[2] and CAT_FACE[1] <= ox < CAT_FACE[3], (method, oy, ox)


def test_each_class_looks_at_its_own_half_of_a_cat_and_coffee_picture(mobilenet):
    def fit(a):
        return np.asarray(Image.fromarray(a).resize((112, 224), Image.BILINEAR))

    cat, coffee = skimage.data.chelsea()[:, 40:340], skimage.data.coffee()[:, 100:500]
    picture = np.concatenate([fit(cat), fit(coffee)], axis=1)  # already the model's 224 x 224
    explainer = CamExplainer(mobilenet.model, preprocessing=mobilenet.preprocessing)
    cat_cls = int(explainer.logits([skimage.data.chelsea()]).argmax())
    coffee_cls = int(explainer.logits([skimage.data.coffee()]).argmax())
    assert cat_cls in CATS and class_names()[coffee_cls] in ("espresso", "cup", "coffee mug")
    out = explainer.compute(picture, np.array([[cat_cls, coffee_cls]]), ("gradcam",))["gradcam"]
    (_, cat_x), cat_up = peak(out.maps[0, 0])
    (_, coffee_x), coffee_up = peak(out.maps[0, 1])
    assert cat_x < 112 <= coffee_x
    assert cat_up[:, :112].sum() > 0.7 * cat_up.sum() and coffee_up[:, 112:].sum() > 0.6 * coffee_up.sum()


def test_cam_stage_on_the_embedded_model(tmp_path):
    for name, image in (("chelsea.png", skimage.data.chelsea()), ("coffee.png", skimage.data.coffee())):
        save_image(tmp_path / "photos" / name, image)
    cfg = compose_cfg(["dataset=folder", f"dataset.path={tmp_path / 'photos'}", "stages=[cam]",
                       "cam.methods=[gradcam,guided_gradcam]", "batch_size=2"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        names = class_names()
        classes = f["cam/gradcam/class"][()]
        assert classes[0] in CATS and names[classes[1]] in ("espresso", "cup", "coffee mug")
        assert f["cam/gradcam/map"].shape == (2, 7, 7) and f["cam"].attrs["layer"] == "features_18_2"
        assert f["cam/guided_gradcam/map"].shape == (2, 224, 224, 3)
        assert (f["cam/gradcam/max"][()] > 0).all()
    assert (tmp_path / "run" / "cam" / "overlays_000.png").stat().st_size > 50_000
    # one image per class: a per-class "mean" would be that image's map, so none is drawn
    assert not (tmp_path / "run" / "cam" / "class_mean_gradcam.png").exists()
