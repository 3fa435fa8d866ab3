"""The static HTML report in a real headless browser (Debian's chromium through playwright):
pages load without console errors, every image resolves, a click opens a unit's card, the
arrow keys step through units, the search box lands on a unit, thumbnails load lazily."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np
import pytest

from conftest import CHROMIUM, watched_page
from test_report import full_run  # noqa: F401  (session fixture: a real run through every stage)
from pipeline.render.report import render_report


needs_browser = pytest.mark.skipif(not CHROMIUM.exists(),
                                   reason="/usr/bin/chromium is missing (apt-get install chromium; .ci/run does)")


@pytest.fixture
def page(browser):
    context, pg = watched_page(browser, 1200, 850)
    yield pg
    context.close()


def _open(page, path: Path) -> None:
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")


def _scroll_all_images_in(page) -> None:
    """Scroll to the bottom in viewport steps so every lazy image starts loading, then wait."""
    height = page.evaluate("document.body.scrollHeight")
    for y in range(0, height + 850, 600):
        page.evaluate(f"window.scrollTo(0, {y})")
        page.wait_for_timeout(15)
    page.wait_for_function("Array.from(document.images).filter(i => i.getAttribute('src'))"
                           ".every(i => i.complete)", timeout=60_000)


def _broken_images(page) -> list[str]:
    return page.evaluate("Array.from(document.images).filter(i => i.getAttribute('src') && "
                         "!(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))")


def _card_state(page) -> dict:
    return page.evaluate("""() => { const v = document.getElementById('viewer'), c = document.getElementById('card');
        return {open: !v.hidden, src: c.getAttribute('src') || '', width: c.naturalWidth,
                title: document.getElementById('card-title').textContent, hash: location.hash}; }""")


def _wait_card(page, unit: int) -> dict:
    page.wait_for_function(f"""() => {{ const c = document.getElementById('card');
        return !document.getElementById('viewer').hidden
               && (c.getAttribute('src') || '').endsWith('unit_{unit:04d}.jpg')
               && c.complete && c.naturalWidth > 0; }}""", timeout=20_000)
    return _card_state(page)


# ---------------------------------------------------------------- static structure (no browser)

class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.lazy, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.refs.append(a[key])
        if tag == "img" and a.get("src"):
            self.lazy.append(a.get("loading"))
        if "id" in a:
            self.ids.append(a["id"])


def test_pages_are_offline_and_every_reference_resolves(full_run):  # noqa: F811
    _, run_dir = full_run[:2]
    pages = [run_dir / "index.html", run_dir / "report" / "relu1.html", run_dir / "report" / "relu2.html"]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text) and "@import" not in text
        refs = _Refs()
        refs.feed(text)
        assert refs.lazy and all(v == "lazy" for v in refs.lazy), page
        for ref in refs.refs:
            if ref.startswith("#"):
                continue
            assert not re.match(r"^[a-z]+:", ref), ref
            assert (page.parent / unquote(ref)).is_file(), (page, ref)
        data = json.loads(re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', text,
                                    re.S).group(1))
        assert [layer["name"] for layer in data["layers"]] == ["relu1", "relu2"]
    units = _Refs()
    text = pages[2].read_text(encoding="utf-8")
    units.feed(text)
    assert [i for i in units.ids if i.startswith("t")] == [f"t{u}" for u in range(6)]
    data = json.loads(re.search(r'id="lens-data">(.*?)</script>', text, re.S).group(1))
    base = next(layer["cards"] for layer in data["layers"] if layer["stored"] == "relu2")
    for u in range(6):  # the URL the page builds for each unit's card
        assert (pages[2].parent / unquote(base + f"{u:04d}.jpg")).is_file()


# ---------------------------------------------------------------- in the browser

@needs_browser
def test_every_page_loads_cleanly_and_every_image_resolves(page, full_run):  # noqa: F811
    _, run_dir = full_run[:2]
    for path in (run_dir / "index.html", run_dir / "report" / "relu1.html", run_dir / "report" / "relu2.html"):
        _open(page, path)
        _scroll_all_images_in(page)
        assert _broken_images(page) == [], path
        n = page.evaluate("document.images.length")
        assert n >= 3, path
    assert page.errors == []


@needs_browser
def test_click_opens_the_card_and_arrows_step_through_units(page, full_run, tmp_path):  # noqa: F811
    _, run_dir = full_run[:2]
    _open(page, run_dir / "report" / "relu2.html")
    assert not _card_state(page)["open"]
    page.click("#t2")
    state = _wait_card(page, 2)
    from PIL import Image

    with Image.open(run_dir / "report" / "cards" / "relu2" / "unit_0002.jpg") as im:
        assert state["width"] == im.size[0]
    assert state["hash"] == "#u2" and "unit 2 of 6" in state["title"]
    page.keyboard.press("ArrowRight")
    assert _wait_card(page, 3)["hash"] == "#u3"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert _wait_card(page, 2)["hash"] == "#u2"
    page.screenshot(path=str(tmp_path / "card.png"))
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('viewer').hidden")
    assert _card_state(page)["hash"] == ""
    page.keyboard.press("ArrowRight")  # with no card open: the first unit
    _wait_card(page, 0)
    page.click("#next")
    _wait_card(page, 1)
    page.click("#close")
    page.wait_for_function("document.getElementById('viewer').hidden")
    # a link straight to a unit opens its card
    page.goto((run_dir / "report" / "relu1.html").resolve().as_uri() + "#u3")
    _wait_card(page, 3)
    assert page.errors == []
    shot = np.asarray(Image.open(tmp_path / "card.png").convert("RGB"))
    assert shot.shape == (850, 1200, 3) and shot.std() > 20


@needs_browser
def test_search_box_lands_on_a_unit(page, full_run, tmp_path):  # noqa: F811
    _, run_dir = full_run[:2]
    _open(page, run_dir / "index.html")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "search"
    # on the index a bare number is that unit of every layer that has one, in network order
    page.keyboard.type("3")
    page.wait_for_selector("#search-results li")
    found = page.eval_on_selector_all("#search-results li", "els => els.map(e => e.innerText)")
    assert all("unit 3" in text for text in found)
    assert [text.split()[0] for text in found][:2] == ["relu1", "relu2"], found
    page.fill("#search", "")
    page.keyboard.type("relu2 4")
    page.wait_for_selector("#search-results li")
    first = page.inner_text("#search-results li")
    assert "relu2" in first and "unit 4" in first
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/report/relu2\.html#u4$"))
    _wait_card(page, 4)
    # on a layer page a bare number is a unit of this layer
    page.fill("#search", "1")
    page.press("#search", "Enter")
    _wait_card(page, 1)
    # 'class:NAME' lists the units most selective for that class, from results.h5
    with h5py.File(run_dir / "results.h5", "r") as f:
        names = json.loads(f["images"].attrs["class_names"])
        best = max(((layer, u, v) for layer in ("relu1", "relu2")
                    for u, (c, v) in enumerate(zip(f[f"layers/{layer}/classes/preferred_max"][()],
                                                   f[f"layers/{layer}/classes/selectivity_max"][()]))
                    if names[c] == "b_cls"), key=lambda e: e[2])
    page.fill("#search", "class:b_cls")
    page.wait_for_selector("#search-results li")
    found = page.eval_on_selector_all("#search-results li", "els => els.map(e => e.innerText)")
    assert all("selective for b_cls" in text for text in found), found
    assert found[0].startswith(f"{best[0]}") and f"unit {best[1]} " in found[0] and f"({best[2]:.2f})" in found[0]
    # a layer name alone opens the layer's page
    page.fill("#search", "RELU1")
    page.press("#search", "Enter")
    page.wait_for_url(re.compile(r".*/report/relu1\.html$"))
    page.wait_for_selector("#t3")
    page.screenshot(path=str(tmp_path / "layer.png"), full_page=True)
    assert page.errors == []


# ---------------------------------------------------------------- a layer of 1,280 units

@pytest.fixture(scope="module")
def wide_layer(tmp_path_factory):
    """results.h5 with one layer of 1,280 units (documented shapes), rendered."""
    tmp = tmp_path_factory.mktemp("wide")
    c, k, s = 1280, 4, 4
    rng = np.random.default_rng(0)
    with h5py.File(tmp / "results.h5", "w") as f:
        f.attrs.update(model="wide", input_size=np.array([32, 32]), version="0", config="layers: [wide]\n")
        strings = h5py.string_dtype("utf-8")
        f.create_dataset("images/path", data=np.array([f"img{i}.png" for i in range(8)], dtype=object), dtype=strings)
        f["images/label"] = np.full(8, -1, np.int64)
        f["images/ok"] = np.ones(8, bool)
        g = f.create_group("layers/wide")
        g.attrs.update(name="wide", shape=np.array([2, 2, c]), depth=0, rf_size=np.array([4, 4]),
                       rf_stride=np.array([2, 2]), mappable=True, geometry_message="")
        g["topk/value"] = np.sort(rng.random((c, k)).astype(np.float32), axis=1)[:, ::-1]
        g["topk/image"] = rng.integers(0, 8, (c, k))
        g["patches"] = rng.integers(0, 256, (c, k, s, s, 3), dtype=np.uint8)
        g["stats/zero_fraction"] = rng.random(c).astype(np.float32)
    render_report(tmp / "results.h5", tmp, pdf=False, per_image=0)
    return tmp


@needs_browser
def test_a_layer_of_1280_units_loads_thumbnails_lazily(page, wide_layer):
    _open(page, wide_layer / "report" / "wide.html")
    total = page.evaluate("document.querySelectorAll('.units img').length")
    assert total == 1280
    page.wait_for_timeout(300)
    loaded = page.evaluate("Array.from(document.querySelectorAll('.units img'))"
                           ".filter(i => i.complete && i.naturalWidth > 0).length")
    assert 0 < loaded < total // 2  # only what is near the viewport
    page.click("#t1279")
    _wait_card(page, 1279)
    page.keyboard.press("ArrowRight")  # the last unit stays the last
    page.wait_for_timeout(100)
    assert _card_state(page)["hash"] == "#u1279"
    page.keyboard.press("Escape")
    _scroll_all_images_in(page)
    assert _broken_images(page) == []
    assert page.errors == []
