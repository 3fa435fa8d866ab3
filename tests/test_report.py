"""Tests for the report stage: composition helpers, sheets, index.html, a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import h5py
import matplotlib.image as mpimg
import numpy as np
import pytest

from pipeline.stages import report
from pipeline.stages.report import (
    EMPTY_GREY,
    grid,
    layer_names,
    montage,
    render_report,
    resize_patches,
    sheet_layout,
)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def colour(c: int, k: int) -> tuple[int, int, int]:
    """The fill colour of patch (channel c, rank k) in the synthetic results."""
    return (10 + 12 * c, 20 + 25 * k, 200)


def coloured_patches(channels: int, k: int, size: int) -> np.ndarray:
    out = np.empty((channels, k, size, size, 3), np.uint8)
    for c in range(channels):
        for r in range(k):
            out[c, r] = colour(c, r)
    return out


# (original name, depth, channels, K, patch size or None, mappable)
LAYERS = [
    ("block2/conv", 1, 20, 4, 30, True),
    ("block1/conv", 0, 5, 9, 11, True),
    ("head <dense>", 2, 3, 9, None, False),
]
# (channel, rank) slots of block1/conv that stay empty
EMPTY_SLOTS = [(2, 7), (2, 8), (4, 8)]
PATHS = ["img/a.jpg", "img/b & c.png", "img/broken.jpg", "img/d.jpg"]
OK = [True, True, False, True]
ERRORS = ["", "", "cannot identify image <file>", ""]
CONFIG = "model:\n  name: tiny_net\nthreshold: 0.5 # <not a tag>\n"


def write_results(path: Path) -> Path:
    str_dt = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["config"] = CONFIG
        f.attrs["model"] = "tiny_net & co"
        f.attrs["input_size"] = np.array([64, 64])
        f.attrs["preprocessing"] = "resize=shorter crop=64 normalize=unit"
        f.attrs["version"] = "0.1.0"
        f.create_dataset("images/path", data=np.array(PATHS, dtype=object), dtype=str_dt)
        f.create_dataset("images/label", data=np.array([0, 1, -1, 2], np.int64))
        f.create_dataset("images/ok", data=np.array(OK))
        f.create_dataset("images/error", data=np.array(ERRORS, dtype=object), dtype=str_dt)
        for name, depth, c, k, size, mappable in LAYERS:
            g = f.create_group(f"layers/{name.replace('/', '.')}")
            g.attrs.update(name=name, shape=np.array([8, 8, c]), rf_size=np.array([11, 11]),
                           rf_stride=np.array([2, 2]), depth=depth, mappable=mappable,
                           geometry_message="" if mappable else "dense layer has no spatial map")
            value = np.sort(np.random.default_rng(depth).random((c, k), np.float32), axis=1)[:, ::-1]
            image = np.tile(np.arange(k, dtype=np.int64), (c, 1)) % 3
            if name == "block1/conv":
                for ch, r in EMPTY_SLOTS:
                    image[ch, r] = -1
            g["topk/value"] = value
            g["topk/image"] = image
            g["topk/y"] = np.zeros((c, k), np.int32)
            g["topk/x"] = np.zeros((c, k), np.int32)
            g["topk/box"] = np.zeros((c, k, 4), np.int32)
            g["stats/mean"] = np.ones(c, np.float32)
            g["stats/max"] = np.ones(c, np.float32)
            g["stats/zero_fraction"] = np.full(c, 0.25, np.float32)
            if size is not None:
                g["patches"] = coloured_patches(c, k, size)
        f.create_group("cam")  # other groups are ignored
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    results = write_results(tmp / "results.h5")
    out = tmp / "out"
    written = render_report(results, out)
    return results, out, written


# ---------------------------------------------------------------- pure helpers

def test_montage_places_patch_ck_at_its_cell():
    c, k, size, thin = 4, 9, 5, 1
    patches = coloured_patches(c, k, size)
    valid = np.ones((c, k), bool)
    valid[1, 5] = False
    out = montage(patches, valid, side=3, thin=thin)
    assert out.shape == (c, 3 * size + 2 * thin, 3 * size + 2 * thin, 3)
    for ch in range(c):
        for r in range(k):
            y0, x0 = (r // 3) * (size + thin), (r % 3) * (size + thin)
            block = out[ch, y0:y0 + size, x0:x0 + size]
            expected = (EMPTY_GREY,) * 3 if (ch, r) == (1, 5) else colour(ch, r)
            assert (block == expected).all(), (ch, r)
    # the thin separators are background white
    assert (out[:, size, :] == 255).all()
    assert (out[:, :, size] == 255).all()


def test_montage_with_fewer_slots_fills_the_rest_grey():
    patches = coloured_patches(2, 5, 4)
    out = montage(patches, np.ones((2, 5), bool), side=3, thin=1)
    for r in range(5, 9):
        y0, x0 = (r // 3) * 5, (r % 3) * 5
        assert (out[:, y0:y0 + 4, x0:x0 + 4] == EMPTY_GREY).all()


def test_grid_is_row_major_with_gaps():
    cells = np.stack([np.full((3, 4, 3), 10 * i, np.uint8) for i in range(7)])
    image, origins = grid(cells, cols=3, gap_x=2, gap_y=5)
    assert image.shape == (3 * 3 + 2 * 5, 3 * 4 + 2 * 2, 3)
    for i, (y, x) in enumerate(origins):
        assert (y, x) == ((i // 3) * 8, (i % 3) * 6)
        assert (image[y:y + 3, x:x + 4] == 10 * i).all()
    assert (image[0:3, 4:6] == 255).all()  # horizontal gap
    assert (image[-3:, 6:] == 255).all()  # unused grid slots stay background


def test_resize_patches_area_average_and_integer_upscale():
    x = np.zeros((2, 1, 4, 4, 3), np.uint8)
    x[..., :2, :2, :] = 200
    x[..., 2:, 2:, :] = 100
    small = resize_patches(x, (2, 2))
    assert small.shape == (2, 1, 2, 2, 3)
    assert small[0, 0, :, :, 0].tolist() == [[200, 0], [0, 100]]
    odd = resize_patches(np.full((1, 7, 7, 3), 77, np.uint8), (3, 3))
    assert (odd == 77).all()
    big = resize_patches(x, (8, 8))
    assert big.shape == (2, 1, 8, 8, 3) and (big[0, 0, :4, :4] == 200).all()


def test_resize_patches_uneven_factor_matches_exact_area_average():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 23, 17, 3), dtype=np.uint8)

    def area(n_in, n_out):  # dense reference: overlap of source pixel j with output cell i
        lo = np.arange(n_out)[:, None] * n_in / n_out
        j = np.arange(n_in)[None, :]
        return np.clip(np.minimum(lo + n_in / n_out, j + 1) - np.maximum(lo, j), 0, None) * n_out / n_in

    expected = np.einsum("ih,bhwc,jw->bijc", area(23, 5), x.astype(float), area(17, 4))
    got = resize_patches(x, (5, 4))
    assert got.shape == (3, 5, 4, 3)
    assert np.abs(got.astype(float) - expected).max() <= 0.5 + 1e-4


def test_layout_caps_large_layers():
    layout = sheet_layout(1280, 9, (224, 224))
    assert max(layout.size) <= report.MAX_SIDE_PX
    assert layout.cols * layout.rows >= 1280 and layout.side == 3
    huge = sheet_layout(8192, 9, (224, 224))
    assert max(huge.size) <= report.MAX_SIDE_PX
    small = sheet_layout(5, 9, (11, 11))
    assert small.patch_hw == (22, 22)  # small patches are enlarged by a whole factor
    assert sheet_layout(20, 4, (30, 30)).side == 2
    assert sheet_layout(64, 9, (224, 224)).patch_hw == (32, 32)
    assert sheet_layout(64, 9, (299, 299)).patch_hw == (23, 23)  # divides 299: box average


# ---------------------------------------------------------------- files

def test_layer_names_in_depth_order(rendered):
    results, _, _ = rendered
    assert layer_names(results) == ["block1.conv", "block2.conv", "head <dense>"]


def test_one_png_sheet_per_layer(rendered):
    _, out, written = rendered
    sheets = sorted((out / "sheets").glob("*.png"))
    assert {p.name for p in sheets} == {"block1.conv.png", "block2.conv.png", "head <dense>.png"}
    assert written[-1] == out / "index.html"
    assert [p.name for p in written[:-1]] == ["block1.conv.png", "block2.conv.png",
                                             "head <dense>.png"]
    for p in sheets:
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(p)
        h, w = img.shape[:2]
        assert 200 <= w <= report.MAX_SIDE_PX and 200 <= h <= report.MAX_SIDE_PX, (p, img.shape)
        assert img[..., :3].std() > 0.01  # not blank


def test_sheet_pixels_show_the_patch_colours(rendered):
    _, out, _ = rendered
    img = (mpimg.imread(out / "sheets" / "block1.conv.png")[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in img.reshape(-1, 3)[::7]}
    for c in range(5):
        assert colour(c, 0) in colours
    assert (EMPTY_GREY,) * 3 in colours
    assert img.min() < 60  # dark title / channel-number text is drawn


def test_sheet_without_patches_is_a_placeholder(rendered):
    _, out, _ = rendered
    img = mpimg.imread(out / "sheets" / "head <dense>.png")
    assert img.shape[0] < 400  # small text-only sheet, no grid


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.lazy = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.srcs.append(a["src"])
            self.lazy.append(a.get("loading"))


def test_index_links_every_sheet_and_resolves(rendered):
    _, out, _ = rendered
    text = (out / "index.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(text)
    sheets = {p.name for p in (out / "sheets").glob("*.png")}
    linked = {Path(unquote(h)).name for h in parser.hrefs}
    assert sheets <= linked
    assert parser.srcs and all(v == "lazy" for v in parser.lazy)
    for src in parser.srcs + parser.hrefs:
        assert not re.match(r"^[a-z]+:", src), src  # relative, offline
        assert (out / unquote(src)).is_file(), src
    assert "http://" not in text and "https://" not in text and "<script" not in text
    # layers in depth order
    assert text.index("block1/conv") < text.index("block2/conv") < text.index("head &lt;dense&gt;")


def test_index_summary_skipped_images_and_escaping(rendered):
    _, out, _ = rendered
    text = (out / "index.html").read_text(encoding="utf-8")
    assert "<title>tiny_net &amp; co" in text
    assert "3 images scanned, 1 skipped" in text
    assert "img/broken.jpg" in text
    assert "cannot identify image &lt;file&gt;" in text
    assert "img/b &amp; c.png" not in text.split('id="summary"')[1].split("<h2>")[0]
    assert "threshold: 0.5 # &lt;not a tag&gt;" in text
    assert "dense layer has no spatial map" in text
    assert "0.250" in text


def test_module_does_not_import_tensorflow():
    code = "import sys, pipeline.stages.report; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


# ---------------------------------------------------------------- real browser

def _chromium(url: str, profile: Path, *extra: str, timeout: int = 90):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,900",
           *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_index_renders_in_headless_chromium(rendered, tmp_path):
    _, out, _ = rendered
    url = (out / "index.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    _chromium(url, tmp_path / "profile", f"--screenshot={shot}")
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    assert pixels[..., :3].var() > 0

    dom = _chromium(url, tmp_path / "profile2", "--dump-dom").stdout
    assert '<table id="layers">' in dom
    assert dom.count("<tr>") == 1 + len(LAYERS)
    assert dom.count('loading="lazy"') == len(LAYERS)
