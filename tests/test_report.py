"""Tests for the report stage: composition helpers, sheets, index.html, a real run rendered
from results.h5 alone (sheets, cards, per-image sheets, the PDF book), a real browser."""

from __future__ import annotations

import math
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

from pipeline.render.canvas import EMPTY_GREY, grid, montage, resize_patches
from pipeline.render.report import render_report
from pipeline.render.results import layer_names
from pipeline.render.sheets import MAX_SIDE_PX, sheet_layout
from pipeline.store import pack
from conftest import CHROMIUM as SITE_CHROMIUM

CHROMIUM = str(SITE_CHROMIUM) if SITE_CHROMIUM.exists() else None  # the same browser as the site tests

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
    # many patches are resized a few at a time (temporaries in cache): the same pixels as one by one
    many = rng.integers(0, 256, (2, 60, 64, 64, 3), dtype=np.uint8)
    for size in ((96, 96), (48, 40), (32, 32)):
        one_by_one = np.stack([resize_patches(p, size) for p in many.reshape(-1, 64, 64, 3)])
        np.testing.assert_array_equal(resize_patches(many, size), one_by_one.reshape((2, 60) + size + (3,)))


def test_layout_caps_large_layers():
    layout = sheet_layout(1280, 9, (224, 224))
    assert max(layout.size) <= MAX_SIDE_PX
    assert layout.cols * layout.rows >= 1280 and layout.side == 3
    huge = sheet_layout(8192, 9, (224, 224))
    assert max(huge.size) <= MAX_SIDE_PX
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
    assert [p.name for p in written[:3]] == ["block1.conv.png", "block2.conv.png",
                                            "head <dense>.png"]
    for p in sheets:
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(p)
        h, w = img.shape[:2]
        assert 200 <= w <= MAX_SIDE_PX and 200 <= h <= MAX_SIDE_PX, (p, img.shape)
        assert img[..., :3].std() > 0.01  # not blank


def test_sheet_cells_hold_each_channels_patches_in_slot_order(rendered):
    """Every (channel, rank) patch at the place the layout gives it, empty slots grey."""
    _, out, _ = rendered
    img = (mpimg.imread(out / "sheets" / "block1.conv.png")[..., :3] * 255).round().astype(int)
    channels, k, size = 5, 9, 11
    layout = sheet_layout(channels, k, (size, size))
    assert img.shape[:2] == layout.size
    ch, cw = layout.cell_hw
    _, origins = grid(np.zeros((channels, ch, cw, 3), np.uint8), layout.cols, layout.gap_x,
                             layout.label_h + layout.gap_y)
    top = layout.margin + layout.title_h
    left = (layout.size[1] - (layout.cols * (cw + layout.gap_x) - layout.gap_x)) // 2
    ph, pw = layout.patch_hw
    for c, (y, x) in enumerate(origins):
        for slot in range(k):
            r, col = divmod(slot, layout.side)
            y0, x0 = top + y + r * (ph + layout.thin), left + x + col * (pw + layout.thin)
            cell = img[y0 + 1:y0 + ph - 1, x0 + 1:x0 + pw - 1].reshape(-1, 3)
            want = (EMPTY_GREY,) * 3 if (c, slot) in EMPTY_SLOTS else colour(c, slot)
            assert (np.abs(cell - want).max(axis=1) <= 1).all(), (c, slot)
    assert img[:layout.margin + layout.title_h].min() < 60  # the title's dark text is drawn


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
    assert "http://" not in text and "https://" not in text
    assert "<script src" not in text and "<link" not in text  # everything inline
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


def test_modules_do_not_import_tensorflow():
    code = ("import sys, pipeline.stages.report, pipeline.render.cards, pipeline.render.site, pipeline.render.book; "
            "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
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
    pixels = (mpimg.imread(shot)[..., :3] * 255).round()
    assert pixels.shape[:2] == (900, 1200)
    # the page's own styles were applied: the sticky header bar is #fafafa, the body white
    # with dark text (the run's title) below it
    assert (np.abs(pixels[2:10, 300:900] - 250) <= 2).all(axis=-1).mean() > 0.6
    body = pixels[60:300]
    assert (body == 255).all(axis=-1).mean() > 0.5 and (body.max(axis=-1) < 100).mean() > 0.002

    dom = _chromium(url, tmp_path / "profile2", "--dump-dom").stdout
    assert '<table id="layers">' in dom
    assert dom.count('<tr id="layer-') == len(LAYERS)
    assert dom.count('loading="lazy"') == len(LAYERS) + 1  # the sheets' previews and the sparsity figure


# ---------------------------------------------------------------- a real run, every stage, rendered

REPORT_OVERRIDES = ["report.per_image=3"]


def full_run_overrides(tmp: Path, photos: Path) -> list[str]:
    return ["model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
            f"dataset.path={photos}", "layers=[relu1,relu2]", "topk=4", "scan.bottomk=2", "batch_size=4",
            "panels.methods=[deconv,guided]", "filters.channels=3", "filters.steps=4", "filters.size=null",
            "filters.batch_size=4", "activations.images=3", "cam.target=top", "cam.top_n=3",
            "cam.methods=[gradcam,guided_gradcam]", "cam.draw=2", "occlusion.images=2", "occlusion.size=8",
            "occlusion.stride=8",
            *REPORT_OVERRIDES]


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """The tiny model over real image files through every stage that feeds the report, then
    the report: (cfg, run directory, files the report wrote)."""
    from conftest import save_image
    from test_pipeline import compose_cfg, tiny_model
    from pipeline.runner import run

    tmp = tmp_path_factory.mktemp("full_run")
    rng = np.random.default_rng(0)
    photos = tmp / "photos"
    for i in range(6):
        save_image(photos / f"a_cls/img{i}.png", (rng.random((40 + 3 * i, 48, 3)) * 255).astype(np.uint8))
    save_image(photos / "b_cls/flat.png", np.full((32, 32, 3), 200, np.uint8))
    save_image(photos / "b_cls/photo.jpg", (rng.random((50, 60, 3)) * 255).astype(np.uint8), quality=95)
    tiny_model(tmp / "tiny.keras")
    cfg = compose_cfg(full_run_overrides(tmp, photos)
                      + ["stages=[scan,crop,panels,filters,activations,cam,occlusion,report]"])
    run_dir = tmp / "run"
    run(cfg, run_dir)
    return cfg, run_dir


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _pdf_pages(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", path.read_bytes()))


def test_real_run_renders_every_sheet_card_and_page(full_run):
    _, run_dir, = full_run[:2]
    channels = {"relu1": 4, "relu2": 6}
    for layer, c in channels.items():
        assert (run_dir / "sheets" / f"{layer}.png").read_bytes()[:8] == PNG_MAGIC
        cards = sorted((run_dir / "report" / "cards" / layer).glob("*.jpg"))
        thumbs = sorted((run_dir / "report" / "thumbs" / layer).glob("*.jpg"))
        assert [p.name for p in cards] == [f"unit_{u:04d}.jpg" for u in range(c)]
        assert [p.name for p in thumbs] == [f"unit_{u:04d}.jpg" for u in range(c)]
        sizes = {_png_size(p) for p in cards}
        assert len(sizes) == 1  # one card size per layer
        h, w = sizes.pop()
        assert 400 <= w <= 900 and 300 <= h <= 1200
        assert {_png_size(p) for p in thumbs} == {(74, 74)}  # half a 148 px cell
        assert (run_dir / "report" / f"{layer}.html").is_file()
    # figures at print quality: 300 dpi
    h, w = _png_size(run_dir / "sheets" / "run" / "sparsity.png")
    assert (h, w) == (round(4.2 * 300), round(5.5 * 300))
    assert (run_dir / "sheets" / "run" / "sparsity.pdf").read_bytes()[:5] == b"%PDF-"
    # per-image sheets: the 3 images with the most kinds of maps (activations 0-2, occlusion 0-1)
    sheets = sorted((run_dir / "sheets" / "images").glob("*.png"))
    assert [p.name for p in sheets] == ["image_0.png", "image_1.png", "image_2.png"]
    # A4 wide; a row per kind of map: photo and predictions 2.5 in, Grad-CAM 2.25, occlusion 2.35,
    # activation grids 2.25, title 0.55; a 0.35 in note names what an image lacks (image 2: occlusion)
    heights = {"image_0.png": 9.9, "image_1.png": 9.9, "image_2.png": 9.9 - 2.35 + 0.35}
    from PIL import Image

    from pipeline.render.book import MAX_IMAGE_PX, _load, _reduce
    from pipeline.render.report import SHEET_DPI

    for p in sheets:
        # RGB at up to SHEET_DPI, as large as the book embeds pixel for pixel (no alpha, no reduction)
        dpi = min(SHEET_DPI, MAX_IMAGE_PX // heights[p.name])
        assert dpi >= 150 and abs(np.subtract(_png_size(p), (heights[p.name] * dpi, 8.27 * dpi))).max() <= 1, p.name
        with Image.open(p) as im:
            assert im.mode == "RGB"
        pixels = _load(p)
        assert _reduce(pixels).shape == pixels.shape and max(pixels.shape) <= MAX_IMAGE_PX
    assert (run_dir / "index.html").is_file()


def test_pdf_book_page_count(full_run):
    _, run_dir = full_run[:2]
    with h5py.File(run_dir / "results.h5", "r") as f:
        config_lines = len(f.attrs["config"].rstrip("\n").splitlines())
        assert all("classes" in f[f"layers/{k}"] for k in f["layers"])  # class folders: a selectivity page
    # title, sparsity, selectivity, per layer its sheet and min(8, C) cards two a page, 3 per-image
    # sheets, config
    expected = 1 + 1 + 1 + (1 + 2) + (1 + 3) + 3 + math.ceil(config_lines / 90)
    assert _pdf_pages(run_dir / "report.pdf") == expected
    assert _media_boxes(run_dir / "report.pdf") == {(595, 842)}  # one page size: A4 portrait, figures too


def test_report_and_export_rerender_without_the_model(full_run, tmp_path):
    from test_pipeline import compose_cfg
    from pipeline.runner import run

    cfg, run_dir = full_run[:2]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    model_file = Path(cfg.model.path)
    hidden = model_file.with_suffix(".hidden")
    model_file.rename(hidden)  # nothing may load the model
    try:
        before = (copy / "results.h5").read_bytes()
        (copy / "index.html").unlink()
        shutil.rmtree(copy / "report")
        overrides = [o for o in full_run_overrides(model_file.parent, Path(cfg.dataset.path))]
        run(compose_cfg(overrides + ["stages=[report,export]"]), copy)
        assert (copy / "results.h5").read_bytes() == before
        assert (copy / "index.html").is_file() and (copy / "report" / "relu2.html").is_file()
        assert len(list((copy / "report" / "cards" / "relu2").glob("*.jpg"))) == 6
        assert (copy / "toolbox" / "max_im" / "relu2" / "relu2_0000.jpg").is_file()
    finally:
        hidden.rename(model_file)


def test_report_redraws_only_what_changed(full_run, tmp_path):
    from test_pipeline import compose_cfg
    from pipeline.runner import run

    cfg, run_dir = full_run[:2]
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    overrides = full_run_overrides(Path(cfg.model.path).parent, Path(cfg.dataset.path))

    def stamps(*patterns):
        return {p: p.stat().st_mtime_ns for pattern in patterns for p in copy.glob(pattern)}

    card, sheet, image, book = "report/cards/*/*.jpg", "sheets/*.png", "sheets/images/*.png", "report.pdf"
    run(compose_cfg(overrides + ["stages=[report]"]), copy)  # the first render with input keys
    before = stamps(card, sheet, image, book, "index.html")
    assert len([p for p in before if p.parent.parent.name == "cards"]) == 10  # relu1 4 + relu2 6 units
    run(compose_cfg(overrides + ["stages=[report]"]), copy)  # nothing changed: nothing is drawn
    assert stamps(card, sheet, image, book, "index.html") == before
    # new per-image maps: the per-image sheets, book and index are drawn again, the cards are not
    run(compose_cfg(overrides + ["stages=[cam]", "cam.methods=[gradcam]", "overwrite=true"]), copy)
    run(compose_cfg(overrides + ["stages=[report]", "cam.methods=[gradcam]"]), copy)
    after = stamps(card, sheet, image, book, "index.html")
    assert {p: t for p, t in after.items() if "cards" in p.parts or p.parent.name == "sheets"} == \
        {p: t for p, t in before.items() if "cards" in p.parts or p.parent.name == "sheets"}
    for path in [*copy.glob(image), copy / book, copy / "index.html"]:
        assert after[path] != before[path], path
    # a deleted card is drawn again
    victim = sorted(copy.glob(card))[0]
    victim.unlink()
    run(compose_cfg(overrides + ["stages=[report]", "cam.methods=[gradcam]"]), copy)
    assert victim.exists()


def test_report_options_cards_pdf_and_per_image(full_run, tmp_path):
    _, run_dir = full_run[:2]
    results = run_dir / "results.h5"
    out = tmp_path / "few"
    render_report(results, out, cards="chosen", units=[1, 5, 99], pdf=True, per_image=[4])
    assert not (out / "report" / "relu1.html").exists() and not (out / "report" / "thumbs").exists()
    # cards only for the book's units (that exist), book pages: 1 + 1 + (1 + 1) + (1 + 1) + 1 + config
    assert sorted(p.name for p in (out / "report" / "cards" / "relu2").iterdir()) == ["unit_0001.jpg", "unit_0005.jpg"]
    assert sorted(p.name for p in (out / "report" / "cards" / "relu1").iterdir()) == ["unit_0001.jpg"]
    assert [p.name for p in (out / "sheets" / "images").iterdir()] == ["image_4.png"]
    pages = _pdf_pages(out / "report.pdf")
    assert pages == _pdf_pages(run_dir / "report.pdf") - (3 + 4 + 3) + (2 + 2 + 1)
    text = (out / "index.html").read_text()
    assert "report/relu1.html" not in text and "report.pdf" in text
    none = tmp_path / "none"
    render_report(results, none, cards=False, pdf=False, per_image=0)
    assert not (none / "report.pdf").exists() and not (none / "sheets" / "images").exists()
    assert not (none / "report" / "cards").exists()
    sweep = tmp_path / "sweep"  # report.cards=none: the book without cards, no card files at all
    render_report(results, sweep, cards="none", units=[1, 5], pdf=True, per_image=0)
    assert (sweep / "report.pdf").is_file() and not (sweep / "report" / "cards").exists()
    assert _pdf_pages(sweep / "report.pdf") == pages - (2 + 1)
    assert "report.per_image=0" in (none / "index.html").read_text()


def test_bad_per_image_is_one_line_error(full_run, tmp_path):
    from pipeline.errors import PipelineError

    _, run_dir = full_run[:2]
    with pytest.raises(PipelineError) as err:
        render_report(run_dir / "results.h5", tmp_path / "bad", per_image=[99])
    assert "\n" not in str(err.value) and "report.per_image" in str(err.value)
    assert not (tmp_path / "bad").exists()  # nothing written


def test_per_image_predictions_are_the_stored_top_n(full_run):
    from pipeline.render.image_sheet import PerImage, image_sheet
    from pipeline.render.results import class_namer

    _, run_dir = full_run[:2]
    with h5py.File(run_dir / "results.h5", "r") as f:
        pi = PerImage.read(f)
        row = int(np.flatnonzero(f["predictions/image"][()] == 1)[0])
        classes = f["predictions/class"][row]
        logits = f["predictions/probability"][row]  # the bars show probabilities
        fig, missing = image_sheet(f, pi, 1, class_namer(f), {"input_size": 24}, 50)
    assert missing == []
    bars = next(ax for ax in fig.axes if ax.get_title().startswith("top-3"))
    widths = [p.get_width() for p in bars.patches]  # drawn top to bottom: rank 0 first
    ys = [p.get_y() for p in bars.patches]
    np.testing.assert_allclose(np.asarray(widths)[np.argsort(ys)[::-1]], logits, rtol=1e-6)
    ticks = {t.get_position()[1]: t.get_text() for t in bars.get_yticklabels()}
    assert [ticks[y] for y in sorted(ticks, reverse=True)] == [f"class {c}" for c in classes]  # top: rank 0
    # the occlusion panel shows the stored map on the image's axes, the activation grids each layer
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("relu1\n") for t in titles) and any(t.startswith("relu2\n") for t in titles)
    # a fixed layout: no panel, title or colour-bar label runs over another panel
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    boxes = [ax.get_window_extent().padded(-1) for ax in fig.axes]
    for i, ax in enumerate(fig.axes):
        texts = [ax.title] + ([ax.yaxis.label, ax.xaxis.label] + ax.get_yticklabels() + ax.get_xticklabels()
                              if ax.axison else [])  # an axis turned off draws none of them
        for j, other in enumerate(boxes):
            if j != i:
                assert not boxes[i].overlaps(other), (ax.get_title(), fig.axes[j].get_title())
                for t in texts:
                    if t.get_visible() and t.get_text():
                        assert not t.get_window_extent().padded(-1).overlaps(other), t.get_text()


def test_model_view_matches_the_pipeline_preprocessing(tmp_path):
    import tensorflow as tf
    from PIL import Image

    from pipeline.preprocess import Preprocessing, to_model_pixels
    from pipeline.render.image_sheet import model_view

    yy, xx = np.mgrid[0:300, 0:451]
    smooth = np.stack([128 + 100 * np.sin(yy / 23.0), 128 + 100 * np.cos(xx / 31.0),
                       128 + 60 * np.sin((xx + yy) / 41.0)], axis=-1).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "p.png")
    for spec in (Preprocessing(224, 224, resize_size=256), Preprocessing(24, 24), Preprocessing(64, 64, resize="exact"),
                 Preprocessing(61, 67), Preprocessing(96, 128, resize_size=110), Preprocessing(128, 40)):
        expected = to_model_pixels(tf.constant(smooth), spec).numpy()
        got = model_view(str(tmp_path / "p.png"), spec.__dict__)
        assert got.shape == expected.shape
        assert np.abs(got.astype(int) - expected).mean() < 1.0, spec
    assert model_view(str(tmp_path / "missing.png"), {"height": 24, "width": 24}) is None


def test_sparsity_figure_draws_the_means_and_dead_share():
    from pipeline.render.sheets import sparsity_figure

    zero = [np.array([0.0, 0.5, 1.0, 0.5]), np.array([1.0, 1.0, 0.9])]
    fig = sparsity_figure(["a", "b"], zero)
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].lines
             if not line.get_label().startswith("_")}
    np.testing.assert_allclose(lines["mean over channels"], [0.5, 2.9 / 3])
    np.testing.assert_allclose(lines["channels zero everywhere"], [0.25, 2 / 3])


def test_renders_a_run_without_a_scan(full_run, tmp_path):
    """Only per-image stages ran (no layers/): the index, per-image sheets and book still come."""
    _, run_dir = full_run[:2]
    results = tmp_path / "results.h5"
    pack(run_dir / "results.h5", results)  # one self-contained file to edit
    with h5py.File(results, "a") as f:
        del f["layers"]
        del f["filters"]
        config_lines = len(f.attrs["config"].rstrip("\n").splitlines())
    written = render_report(results, tmp_path, per_image=1)
    assert written[-1] == tmp_path / "index.html"
    assert [p.name for p in (tmp_path / "sheets" / "images").iterdir()] == ["image_0.png"]
    text = (tmp_path / "index.html").read_text()
    assert '<tr id="layer-' not in text and "run stages=[filters]" in text
    assert _pdf_pages(tmp_path / "report.pdf") == 1 + 1 + math.ceil(config_lines / 90)  # title, image, config


def test_other_stages_sheets_are_listed_in_network_order():
    from pipeline.render.report import in_network_order

    stored = ["features_2", "features_4", "features_7", "features_14", "features_18"]
    names = ["patterns_features_14.png", "patterns_features_2.png", "kernels.txt", "patterns_features_18.png",
             "weights_features_7.png", "notes_10.png", "notes_9.png"]
    got = [p.name for p in in_network_order([Path(n) for n in names], stored)]
    assert got == ["patterns_features_2.png", "weights_features_7.png", "patterns_features_14.png",
                   "patterns_features_18.png", "kernels.txt", "notes_9.png", "notes_10.png"]


def _media_boxes(path: Path) -> set[tuple[float, float]]:
    return {(round(float(w)), round(float(h)))
            for w, h in re.findall(rb"/MediaBox\s*\[\s*0\s+0\s+([\d.]+)\s+([\d.]+)\s*\]", path.read_bytes())}


def test_large_sheet_continues_over_a4_pages_with_readable_montages(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from pipeline.render import book as bk
    from pipeline.render.sheets import sheet_grid

    with h5py.File(tmp_path / "r.h5", "w") as f:  # shapes only: 1,280 units of 64 px patches
        f.create_dataset("layers/big/patches", shape=(1280, 9, 64, 64, 3), dtype=np.uint8)
        grid_ = sheet_grid(f["layers/big"], SimpleNamespace(has_patches=True))
    layout = sheet_layout(1280, 9, (64, 64))
    assert (grid_.height, grid_.width) == layout.size and grid_.rows * grid_.cols >= 1280
    tiles = bk.sheet_tiles(grid_)
    assert len(tiles) > 1
    box_w, box_h = bk.A4[0] - 2 * bk.MARGIN_SIDE, bk.A4[1] - bk.MARGIN_TOP - bk.MARGIN_BOTTOM
    covered = np.zeros((grid_.rows, grid_.cols), int)
    for y0, y1, x0, x1 in tiles:
        scale = min(box_w / (x1 - x0), box_h / (y1 - y0))  # inches per sheet pixel on its page
        assert grid_.montage_w * scale * bk.BOOK_DPI >= bk.MIN_MONTAGE_PX
        assert (y0 - grid_.top) % grid_.pitch_y == 0 and (x0 - grid_.left) % grid_.pitch_x == 0  # whole montages
        covered[(y0 - grid_.top) // grid_.pitch_y:(y1 - grid_.top) // grid_.pitch_y,
                (x0 - grid_.left) // grid_.pitch_x:(x1 - grid_.left) // grid_.pitch_x] += 1
    assert (covered == 1).all()  # every montage on exactly one page
    # on one page they would be too small to read
    assert grid_.montage_w * min(box_w / grid_.width, box_h / grid_.height) * bk.BOOK_DPI < bk.MIN_MONTAGE_PX
    sheet = tmp_path / "big.png"
    Image.fromarray(np.full(layout.size + (3,), 200, np.uint8)).save(sheet)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((300, 900, 3), 90, np.uint8)).save(small)  # wide: once a landscape page
    book = bk.Book("m", [("model", "m")], [bk.BookLayer("big", sheet, [], grid_), bk.BookLayer("small", small)],
                   images=[("wide", small)], config="a: 1\n")
    out = tmp_path / "book.pdf"
    assert bk.write_book(book, out) == bk.page_count(book) == 1 + len(tiles) + 1 + 1 + 1
    assert _pdf_pages(out) == bk.page_count(book)
    assert _media_boxes(out) == {(595, 842)}  # A4 portrait, every page


def test_layer_page_counts_the_winners_on_the_map_border(full_run):
    from pipeline.render.report import border_line

    _, run_dir = full_run[:2]
    with h5py.File(run_dir / "results.h5", "r") as f:
        g = f["layers/relu2"]
        h, w = (int(v) for v in g.attrs["shape"][:2])
        image, y, x = g["topk/image"][()], g["topk/y"][()], g["topk/x"][()]
        won = image >= 0
        n = int((won & ((y == 0) | (y == h - 1) | (x == 0) | (x == w - 1))).sum())
        line = border_line(g, g.attrs["shape"], 0)
        assert line.startswith(f"{n:,} of {int(won.sum()):,} top-k winners") and "scan.border=1" in line
        # with scan.border=1 the ring one in is where the padding still reaches
        inner = int((won & ((y <= 1) | (y >= h - 2) | (x <= 1) | (x >= w - 2))).sum())
        assert border_line(g, g.attrs["shape"], 1).startswith(f"{inner:,} of ")
        assert border_line(g, np.array([2, 2, 6]), 0) == ""  # a map with no inside: nothing to say
    page = (run_dir / "report" / "relu2.html").read_text()
    assert f"{n:,} of {int(won.sum()):,} top-k winners" in page
