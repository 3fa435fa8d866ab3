"""The Deep Visualization Toolbox layout, file by file, checked the way the toolbox reads it.

The rules (from the toolbox's loader, restated here as the tests' own code):
- regularized_opt montages go through crop_to_corner(img, 2): square, even side, and the
  UI shows the bottom-left quarter less 3 px a side;
- whole_layer.jpg is cut into ceil(sqrt(C))^2 equal tiles, row-major;
- max_im / max_deconv are 3x3 montages of the top 9, row-major;
- info.txt: the crop script's header, then 'is_conv val idx class [i j] filename' rows.
"""

import math
import re
import runpy

import h5py
import numpy as np
import pytest
from PIL import Image

from test_pipeline import compose_cfg, tiny_model
from pipeline.panel_codec import encode_panels
from pipeline.runner import run
from pipeline.store import read_strings
from pipeline.render.toolbox import INFO_HEADER, corner_montage

COLOURS = np.array([[230, 30, 30], [30, 200, 40], [40, 60, 220], [220, 200, 30], [200, 40, 210]], np.uint8)


def toolbox_corner(img: np.ndarray, corner: int = 2) -> np.ndarray:
    """What the toolbox's UI shows of a regularized_opt montage (its crop_to_corner rule)."""
    assert img.shape[0] == img.shape[1], "not square"
    assert img.shape[0] % 2 == 0, "odd side"
    half, trim = img.shape[0] // 2, 3
    r, c = divmod(corner, 2)
    return img[r * half + trim:(r + 1) * half - trim, c * half + trim:(c + 1) * half - trim]


def slot_colours(c: int, k: int) -> np.ndarray:
    """A distinct flat colour per (channel, slot): each montage cell says which patch it holds."""
    k_ = np.arange(k)
    return np.stack([40 + 20 * k_, np.full(k, 40 + 30 * c), 250 - 20 * k_], -1).astype(np.uint8)


@pytest.fixture
def exported(tmp_path, photo_folder):
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                       f"dataset.path={photo_folder}", "layers=[relu1,relu2,gap]", "stages=[scan,crop]"])
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    with h5py.File(run_dir / "results.h5", "a") as f:  # known pictures where the stages put theirs
        g = f["layers/relu2"]
        c, k, h, w, _ = g["patches"].shape
        flat = np.stack([slot_colours(i, k) for i in range(c)])
        g["patches"][...] = np.broadcast_to(flat[:, :, None, None], g["patches"].shape)
        deconv = np.zeros((c, k, h * w, 3), np.float16)  # slot j: its first 4 (j + 1) pixels bright
        for j in range(k):
            deconv[:, j, :4 * (j + 1)] = 1.0
        deconv = deconv.reshape(c, k, h, w, 3)
        codes, scale = encode_panels(deconv)  # stored as the panels stage stores them: the export decodes
        g.create_dataset("panels/deconv", data=codes)
        g.create_dataset("panels/deconv_scale", data=scale)
        for key, size, seeds in (("relu1", 24, 1), ("conv2", 61, 4)):
            n = 4 if key == "relu1" else 5
            p = f.create_group(f"filters/{key}")
            p["patterns"] = np.broadcast_to(COLOURS[:n, None, None], (n, size, size, 3))
            if seeds > 1:
                p["pattern_seeds"] = np.broadcast_to(COLOURS[:n, None, None, None], (n, seeds, size, size, 3))
            p["channels"] = np.arange(n)
            p["computed"] = np.ones(n, bool)
            p.attrs.update(objective="channel", channels_total=n)
    cfg.stages = ["export"]
    run(cfg, run_dir)
    return run_dir


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_max_im_cells_hold_the_top9_in_row_major_order(exported):
    from pipeline.render.patches import FLAT_GREY, layer_patches

    with h5py.File(exported / "results.h5", "r") as f:
        c, k, h, w, _ = f["layers/relu2/patches"].shape
        valid = f["layers/relu2/topk/image"][()] >= 0
        real = f["layers/relu1/patches"][()]
        # each slot's flat colour, the part of its frame outside the image grey
        shown = layer_patches(f["layers/relu2"], "patches", 0, c, k, (h, w), flat=True)
    assert (shown == FLAT_GREY).all(-1).any()  # some winners sit at the border
    files = sorted((exported / "toolbox" / "max_im" / "relu2").iterdir())
    assert [p.name for p in files] == [f"relu2_{i:04d}.jpg" for i in range(c)]
    for i, path in enumerate(files):
        montage = load(path)
        assert montage.shape == (3 * h, 3 * w, 3)
        colours = slot_colours(i, k)
        wants = shown[i, :, 1:-1, 1:-1].reshape(k, -1, 3).mean(1)
        for slot in range(9):
            r, col = divmod(slot, 3)
            cell = montage[r * h + 1:(r + 1) * h - 1, col * w + 1:(col + 1) * w - 1].reshape(-1, 3).mean(0)
            if slot < k and valid[i, slot]:
                assert (shown[i, slot] == colours[slot]).all(-1).any()  # the slot's own colour is there
                np.testing.assert_allclose(cell, wants[slot], atol=8, err_msg=f"unit {i} slot {slot}")
            else:
                np.testing.assert_allclose(cell, (0, 0, 0), atol=8, err_msg=f"unit {i} slot {slot}")
    first = load(exported / "toolbox" / "max_im" / "relu1" / "relu1_0000.jpg")  # real patches too
    rh, rw = real.shape[2:4]
    assert np.abs(first[:rh, :rw] - real[0, 0]).mean() < np.abs(first[:rh, :rw] - real[0, 1]).mean()


def test_max_deconv_only_where_panels_exist_in_slot_order(exported):
    from pipeline.render.patches import layer_patches

    assert not (exported / "toolbox" / "max_deconv" / "relu1").exists()
    with h5py.File(exported / "results.h5", "r") as f:
        c, k, h, w, _ = f["layers/relu2/panels/deconv"].shape
        valid = f["layers/relu2/topk/image"][()] >= 0
        shown = layer_patches(f["layers/relu2"], "panels/deconv", 0, c, k, (h, w), flat=True).astype(float)
    files = sorted((exported / "toolbox" / "max_deconv" / "relu2").iterdir())
    assert [p.name for p in files] == [f"relu2_{i:04d}.jpg" for i in range(c)]
    for i in range(c):
        montage = load(files[i]).mean(-1)
        for slot in range(min(k, 9)):  # slot j's panel in cell j, row-major
            r, col = divmod(slot, 3)
            cell = montage[r * h:(r + 1) * h, col * w:(col + 1) * w].mean()
            want = shown[i, slot].mean() if valid[i, slot] else 0.0
            assert abs(cell - want) < 6, (i, slot, cell, want)


def test_panels_mark_the_outside_image_area_as_the_patches_do(exported):
    from pipeline.render.patches import CHECKER_GREYS, FLAT_GREY, checker, layer_patches

    with h5py.File(exported / "results.h5", "r") as f:
        g = f["layers/relu2"]
        c, k, h, w, _ = g["patches"].shape
        patches = layer_patches(g, "patches", 0, c, k, (h, w))
        panels = layer_patches(g, "panels/deconv", 0, c, k, (h, w))
        flat = layer_patches(g, "panels/deconv", 0, c, k, (h, w), flat=True)
    outside = (patches == checker((h, w))).all(-1)  # the slot colours are never grey
    assert outside.any() and not outside.all()  # border winners, clipped boxes
    np.testing.assert_array_equal(panels[outside], patches[outside])  # the same checker
    assert (flat[outside] == FLAT_GREY).all()
    assert not np.isin(panels[~outside], CHECKER_GREYS).all(-1).any()  # inside: the stretched map


@pytest.mark.parametrize("key,size", [("relu1", 24), ("conv2", 61)])
def test_pattern_montage_shows_the_best_pattern_where_the_toolbox_looks(exported, key, size):
    folder = exported / "toolbox" / "regularized_opt" / key
    for unit in range(4):
        montage = load(folder / f"{key}_{unit:04d}_montage.jpg")
        shown = toolbox_corner(montage)  # asserts square and even, as the toolbox does
        assert shown.shape[:2] == (size, size)
        np.testing.assert_allclose(shown[2:-2, 2:-2].reshape(-1, 3).mean(0), COLOURS[unit], atol=6)
        other = toolbox_corner(montage, 1)  # top-right: neither the pattern nor its seeds
        np.testing.assert_allclose(other.reshape(-1, 3).mean(0), [128] * 3, atol=4)


def test_pattern_montage_is_even_for_every_odd_size():
    for h, w in ((61, 61), (227, 227), (299, 299), (331, 331), (33, 50)):
        best = np.full((h, w, 3), 200, np.uint8)
        montage = corner_montage(best, np.stack([best] * 4))
        shown = toolbox_corner(montage)
        assert shown.shape[:2] == (max(h, w),) * 2
        assert (shown == 200).mean() == pytest.approx(h * w / max(h, w) ** 2, abs=0.02)


def test_whole_layer_sprite_tiles_row_major(exported):
    for key, n, size in (("relu1", 4, 24), ("conv2", 5, 61)):
        sprite = load(exported / "toolbox" / "regularized_opt" / key / "whole_layer.jpg")
        side = math.ceil(math.sqrt(n))
        assert sprite.shape[0] == sprite.shape[1] and sprite.shape[0] % side == 0
        t = sprite.shape[0] // side
        for i in range(side * side):  # cut as the toolbox cuts it
            r, col = divmod(i, side)
            cell = sprite[r * t + 3:(r + 1) * t - 3, col * t + 3:(col + 1) * t - 3].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(cell, COLOURS[i] if i < n else [128] * 3, atol=6)


def test_info_txt_in_the_crop_scripts_format(exported):
    with h5py.File(exported / "results.h5", "r") as f:
        paths = read_strings(f["images/path"])
        labels = f["images/label"][()]
        tables = {key: {k: f[f"layers/{key}/topk/{k}"][()] for k in ("value", "image", "y", "x")}
                  for key in ("relu2", "gap")}
    conv_row = re.compile(r"^1 (-?\d+\.\d{6}) (\d+) (-?\d+) (\d+) (\d+) (.+)$")
    dense_row = re.compile(r"^0 (-?\d+\.\d{6}) (\d+) (-?\d+) (.+)$")
    for key, t in tables.items():
        for c in range(t["value"].shape[0]):
            lines = (exported / "toolbox" / key / f"unit_{c:04d}" / "info.txt").read_text().splitlines()
            assert lines[0] == INFO_HEADER
            filled = np.flatnonzero(t["image"][c] >= 0)
            assert len(lines) == 1 + len(filled)
            for line, k in zip(lines[1:], filled):
                m = (conv_row if key == "relu2" else dense_row).match(line)
                assert m, line
                v, i, label = float(m[1]), int(m[2]), int(m[3])
                assert v == pytest.approx(t["value"][c, k], abs=1e-6)
                assert (i, label, m.groups()[-1]) == (t["image"][c, k], labels[t["image"][c, k]],
                                                        paths[t["image"][c, k]])
                if key == "relu2":
                    assert (int(m[4]), int(m[5])) == (t["y"][c, k], t["x"][c, k])


def test_settings_local_points_the_toolbox_at_the_export(exported):
    settings = runpy.run_path(str(exported / "toolbox" / "settings_local.py"))
    assert settings["caffevis_unit_jpg_dir"] == str((exported / "toolbox").resolve())
    assert settings["caffevis_jpgvis_layers"] == ["relu1", "relu2", "gap"]
    assert settings["caffevis_jpgvis_remap"] == {}


def test_grey_patterns_make_grey_toolbox_files(tmp_path):
    from pipeline.render.toolbox import write_regularized_opt

    results = tmp_path / "filters.h5"
    with h5py.File(results, "w") as f:  # what the filters stage stores for a one-channel model
        g = f.create_group("filters/conv")
        g["patterns"] = np.broadcast_to(np.array([40, 90, 160], np.uint8)[:, None, None, None], (3, 27, 27, 1))
        g["channels"] = np.arange(3)
        g["computed"] = np.ones(3, bool)
        g.attrs.update(objective="channel", channels_total=3)
    written = write_regularized_opt(results, tmp_path / "toolbox")
    assert len(written) == 4
    for unit, level in enumerate((40, 90, 160)):
        with Image.open(tmp_path / f"toolbox/regularized_opt/conv/conv_{unit:04d}_montage.jpg") as im:
            assert im.mode == "L"
            shown = toolbox_corner(np.asarray(im.convert("RGB")))
        assert shown.shape[:2] == (27, 27) and abs(shown[3:-3, 3:-3].mean() - level) < 4
    with Image.open(tmp_path / "toolbox/regularized_opt/conv/whole_layer.jpg") as im:
        assert im.mode == "L" and im.size[0] % 2 == 0


def test_toolbox_jpegs_halve_colour_only_for_large_montages(tmp_path):
    """Montages of 32 px patches and up are 4:2:0 q85 (a third smaller than 4:4:4 q92 on
    photo-like content); small ones keep every colour sample, so a 7 px patch keeps its colour."""
    from PIL import JpegImagePlugin

    from pipeline.render.toolbox import save_jpeg

    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 256, (12, 12, 3), np.uint8)).resize((192, 192), Image.BICUBIC)
    smooth = np.clip(np.asarray(field, np.float32) + rng.normal(0, 6, (192, 192, 3)), 0, 255).astype(np.uint8)
    save_jpeg(tmp_path / "large.jpg", smooth)
    with Image.open(tmp_path / "large.jpg") as im:
        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
        np.testing.assert_allclose(np.asarray(im, np.float32).mean((0, 1)), smooth.mean((0, 1)), atol=3)
    Image.fromarray(smooth).save(tmp_path / "old.jpg", quality=92, subsampling=0)
    assert (tmp_path / "large.jpg").stat().st_size < 0.75 * (tmp_path / "old.jpg").stat().st_size
    small = np.zeros((21, 21, 3), np.uint8)
    small[::7, ::7] = (255, 0, 0)  # one red pixel a patch: lost at half colour resolution
    small[:7, :7] = (0, 0, 255)
    save_jpeg(tmp_path / "small.jpg", small)
    with Image.open(tmp_path / "small.jpg") as im:
        assert JpegImagePlugin.get_sampling(im) == 0  # 4:4:4
        np.testing.assert_allclose(np.asarray(im, np.float32)[3, 3], (0, 0, 255), atol=24)
