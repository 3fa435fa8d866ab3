"""Pixels from photo files: the bounded resize, EXIF orientation and JPEG DCT scaling, with
real files, a real scan and crop, and real processes under a memory ceiling."""

import io
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from conftest import ROOT, save_image
from test_pipeline import compose_cfg, tiny_model
from pipeline.datasets import BatchStream, decode_with_pillow, list_images
from pipeline.preprocess import (Preprocessing, _match_channels, dct_ratio, exif_orientation, file_orientation,
                                 normalize, orient, read_photo, to_model_pixels)

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def whole_image_resize(image, spec):
    """The resize as it was: the whole image scaled to resize_plan's size, then the centre crop."""
    image = _match_channels(image, spec.channels)
    height, width = spec.size
    h, w = (tf.cast(tf.shape(image)[k], tf.float32) for k in (0, 1))
    if spec.resize == "exact":
        out = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
    else:
        margin = (spec.resize_size or min(height, width)) / min(height, width)
        scale = tf.maximum(height * margin / h, width * margin / w)
        new_h = tf.maximum(height, tf.cast(tf.round(h * scale), tf.int32))
        new_w = tf.maximum(width, tf.cast(tf.round(w * scale), tf.int32))
        out = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        out = out[top:top + height, left:left + width]
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8).numpy()


def textured(h, w, seed=0):
    """A photo-like image: smooth shapes plus fine noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([128 + 100 * np.sin(yy / 23.0 + xx / 41.0), 128 + 90 * np.cos(xx / 31.0),
                       128 + 60 * np.sin((xx - yy) / 53.0)], axis=-1)
    return np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def test_bounded_resize_gives_the_pixels_of_the_whole_image_resize():
    # float rounding in the filter weights may move a value across .5: at most 1 level, rarely
    specs = (Preprocessing(224, 224, resize_size=256), Preprocessing(24, 24), Preprocessing(32, 32, resize_size=40),
             Preprocessing(64, 64, resize="exact"), Preprocessing(96, 128, resize_size=110), Preprocessing(128, 40))
    shapes = ((375, 500), (500, 375), (1200, 1600), (224, 224), (100, 150), (17, 23), (333, 1001), (61, 60))
    differ = total = 0
    for spec in specs:
        for k, shape in enumerate(shapes):
            image = textured(*shape, seed=k)
            got = to_model_pixels(tf.constant(image), spec).numpy().astype(int)
            diff = np.abs(got - whole_image_resize(tf.constant(image), spec))
            assert diff.max() <= 1, (spec, shape)
            differ, total = differ + int((diff > 0).sum()), total + diff.size
    assert differ <= 1e-3 * total, f"{differ} of {total} values differ"


def test_exif_orientations_are_read_from_the_header_and_turned_as_pillow_turns_them(tmp_path):
    stored = textured(5, 7)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png")):
            path = tmp_path / f"o{o}.{suffix}"
            Image.fromarray(stored).save(path, fmt, exif=exif.tobytes(), quality=100)
            assert exif_orientation(path.read_bytes()) == o and file_orientation(str(path)) == o
        with Image.open(tmp_path / f"o{o}.png") as im:
            expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        np.testing.assert_array_equal(orient(tf.constant(stored), o).numpy(), expected)
    # formats only Pillow decodes: their orientation through Pillow, turned the same way
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "o6.tif", exif=exif.tobytes())
    assert file_orientation(str(tmp_path / "o6.tif")) == 6
    np.testing.assert_array_equal(read_photo(str(tmp_path / "o6.tif")), np.rot90(stored, -1))
    np.testing.assert_array_equal(read_photo(str(tmp_path / "o6.tif"), exif=False), stored)
    assert exif_orientation(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00*") == 1  # cut short: as stored
    assert exif_orientation(b"not an image") == 1


def test_dct_scale_follows_the_upright_need():
    spec = Preprocessing(224, 224, resize_size=256)
    assert dct_ratio(3000, 4000, 1, spec) == 8  # 375x500 still covers 256x341
    assert dct_ratio(4000, 3000, 6, spec) == 8  # stored turned: the same photo
    assert dct_ratio(375, 500, 1, spec) == 1  # ImageNet size: 188x250 would be too small
    assert dct_ratio(1000, 2000, 1, Preprocessing(224, 224, resize="exact")) == 4
    # a model input taller than wide: a stored-wide photo turned upright must cover 448 rows
    # with its stored width (2000 / 4 = 500), as stored it would need 448 of its 600 rows
    tall = Preprocessing(448, 112, resize="exact")
    assert dct_ratio(600, 2000, 6, tall) == 4 and dct_ratio(600, 2000, 1, tall) == 1


@pytest.fixture
def photo_run(tmp_path):
    """A folder of an EXIF-6 phone-style JPEG (stored sideways) and a large JPEG that the
    stream decodes at 1/8, scanned and cropped by a real run."""
    root = tmp_path / "photos"
    upright = textured(72, 48, seed=3)
    upright[:20, :, :] = (250, 20, 20)  # a red band on top: sideways it would be on a side
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter anticlockwise; the viewer turns it back
    save_image(root / "a_turned.jpg", np.ascontiguousarray(np.rot90(upright, 1)), quality=100, subsampling=0,
               exif=exif.tobytes())
    big = textured(900, 1200, seed=4)
    save_image(root / "b_big.jpg", big, quality=95)
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={root}", "layers=[relu1]", "topk=2", "batch_size=2",
                       "stages=[scan,crop]", "crop.max_size=0"])
    from pipeline.runner import run

    run(cfg, tmp_path / "run")
    return cfg, tmp_path / "run" / "results.h5", upright, big


@pytest.mark.slow
def test_exif_photo_is_scanned_cut_and_drawn_upright_and_dct_pixels_are_what_the_scan_saw(photo_run):
    from pipeline.graph import feature_model
    from pipeline.models.sources import load_model
    from pipeline.render.image_sheet import model_view
    from pipeline.store import IDENTITY_KEYS, fingerprint

    cfg, results, upright, big = photo_run
    bundle = load_model(cfg.model)
    spec, table = bundle.preprocessing, list_images(cfg.dataset)
    pixels = {int(i): p for ids, batch in BatchStream(table, spec, 4) for i, p in zip(ids, batch.numpy())}
    table.dct_scale = False
    full = {int(i): p.astype(int) for ids, batch in BatchStream(table, spec, 4) for i, p in zip(ids, batch.numpy())}
    table.dct_scale = True
    want = to_model_pixels(tf.constant(upright), spec).numpy().astype(int)
    sideways = to_model_pixels(tf.constant(np.ascontiguousarray(np.rot90(upright, 1))), spec).numpy().astype(int)
    assert np.abs(full[0] - want).mean() < 1.5 and np.abs(full[0] - sideways).mean() > 30
    # both are decoded at a DCT scale (the turned one at 1/2: its upright need, 36x24, fits
    # its stored 48x72 halved); close to a full decode: within 4 levels on average
    assert dct_ratio(48, 72, 6, spec) == 2 and dct_ratio(900, 1200, 1, spec) == 8
    for i in (0, 1):
        assert 0 < np.abs(full[i] - pixels[i]).mean() < 4
    assert np.abs(full[1] - to_model_pixels(tf.constant(big), spec).numpy()).mean() < 1.5
    # the Pillow path (fallback, viewer, uploads) and the drawing agree with the stream
    pillow, _ = decode_with_pillow(table.paths[0], spec, table)
    assert np.abs(pillow.numpy().astype(int) - pixels[0]).mean() < 1.5
    assert np.abs(model_view(table.paths[0], spec.__dict__).astype(int) - pixels[0]).mean() < 1.5

    features = feature_model(bundle.model, ["relu1"])
    maps = {i: features(normalize(p[None], spec.normalize)).numpy()[0] for i, p in pixels.items()}
    with h5py.File(results, "r") as f:
        assert f["images/orientation"][()].tolist() == [6, 1]
        g = f["layers/relu1"]
        image, box, y, x, value = (g[f"topk/{k}"][()] for k in ("image", "box", "y", "x", "value"))
        patches = g["patches"][()]
        row_offset, col_offset = g["geometry/row_offset"][()], g["geometry/col_offset"][()]
    assert {0, 1} <= set(image.ravel().tolist())
    for c in range(image.shape[0]):
        for k in range(image.shape[1]):
            i = int(image[c, k])
            if i < 0:
                continue
            # the scan saw the pixels the stream gives again (upright, DCT-scaled) ...
            np.testing.assert_allclose(maps[i][y[c, k], x[c, k], c], value[c, k], rtol=1e-4, atol=1e-5)
            # ... and the crop cut its patches from those same pixels
            y0, x0, y1, x1 = box[c, k]
            oy, ox = row_offset[y[c, k]], col_offset[x[c, k]]
            np.testing.assert_array_equal(patches[c, k, oy:oy + y1 - y0, ox:ox + x1 - x0], pixels[i][y0:y1, x0:x1])

    # dataset.exif=false: the pixels as stored, and a scan of another fingerprint
    off = OmegaConf.merge(cfg, {"dataset": {"exif": False}})
    stored = {int(i): p for ids, b in BatchStream(list_images(off.dataset), spec, 4) for i, p in zip(ids, b.numpy())}
    assert np.abs(stored[0] - sideways).mean() < 4 and np.abs(stored[0] - want).mean() > 30  # DCT-scaled too
    assert fingerprint(off, IDENTITY_KEYS) != fingerprint(cfg, IDENTITY_KEYS)


def thin_png(path, width=300_000):
    """A 1 x width PNG (a few hundred bytes), far below dataset.max_pixels."""
    row = (np.arange(width) % 256).astype(np.uint8)
    Image.fromarray(np.repeat(row[None, :, None], 3, axis=2)).save(path)
    return path


def peak_of(code_or_run, *args, timeout=300):
    """(process, peak RSS in MiB) of a child started by a parent of its own, so the peak
    is the child's alone."""
    measure = ("import resource, subprocess, sys; done = subprocess.run([sys.executable] + sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    proc = subprocess.run([sys.executable, "-c", measure, *code_or_run, *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return proc, int(proc.stdout.split("PEAK")[-1]) / 1024


@pytest.mark.slow
def test_a_thin_image_is_scanned_within_a_memory_ceiling(tmp_path):
    # before the bounded resize this scan peaked at 2.9 GB (after: 0.65): the strip was scaled up to 24 x 7.2M
    thin_png(tmp_path / "thin.png")
    save_image(tmp_path / "ok.png", textured(30, 30))
    tiny_model(tmp_path / "tiny.keras")
    proc, peak = peak_of(["run.py"], "model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                         f"dataset.path={tmp_path}", "layers=[relu1]", "stages=[scan]",
                         f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert peak < 1200, f"peak RSS {peak:.0f} MiB"
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert f["images/ok"][()].tolist() == [True, True]


@pytest.mark.slow
def test_uploads_and_drawings_of_a_thin_image_are_bounded(tmp_path):
    # the viewer's upload decoder and the per-image sheet's drawing, for a 224 model: the
    # whole-image resize would need 256 x 77M pixels (over 200 GB)
    thin_png(tmp_path / "thin.png")
    code = ("import sys, numpy as np; from pipeline.datasets import ImageTable, decode_with_pillow; "
            "from pipeline.preprocess import Preprocessing; from pipeline.render.image_sheet import model_view; "
            "spec = Preprocessing(224, 224, resize_size=256); "
            "bounds = ImageTable(paths=[], labels=np.zeros(0, np.int64)); "
            "pixels, problem = decode_with_pillow(sys.argv[1], spec, bounds); "
            "drawn = model_view(sys.argv[1], spec.__dict__); "
            "assert pixels.shape == (224, 224, 3) and drawn.shape == (224, 224, 3), problem; "
            "assert np.abs(drawn.astype(int) - pixels.numpy()).mean() < 2")
    proc, peak = peak_of(["-c", code], str(tmp_path / "thin.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert peak < 1200, f"peak RSS {peak:.0f} MiB"


def test_exif_photo_upload_is_upright(tmp_path):
    upright = textured(40, 30)
    upright[:10] = (250, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned clockwise
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, -1))).save(buf, "JPEG", quality=100, subsampling=0,
                                                                     exif=exif.tobytes())
    (tmp_path / "up.jpg").write_bytes(buf.getvalue())
    spec = Preprocessing(24, 24)
    table = list_images(OmegaConf.create(dict(kind="folder", path=str(tmp_path), limit=None)))
    pixels, _ = decode_with_pillow(str(tmp_path / "up.jpg"), spec, table)
    assert np.abs(pixels.numpy().astype(int) - to_model_pixels(tf.constant(upright), spec).numpy()).mean() < 3
