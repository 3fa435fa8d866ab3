"""Network dissection where users look: the layer pages' figure and detector table, the
detectors-by-depth figure on the index and in the book, 'concept:NAME' in the HTML search
(real headless chromium), the viewer's answer, and the toolbox export left as it was.

One run of the hand-wired colour model (tests/test_dissect.py): unit 0 of `relu` fires on
red pixels and must come out as the detector of 'red' with IoU 1; unit 2 detects the green
concept, named in another script here so that the figures must draw it."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import h5py
import pytest

from conftest import watched_page
from test_dissect import colour_dataset, colour_model, seg_overrides
from test_pipeline import compose_cfg
from test_report import _media_boxes, _pdf_pages
from test_site import _open, _wait_card, needs_browser

GREEN = "\u7dd1"  # the green concept's name: a CJK character
CONCEPTS = f"1 red colour\n2 {GREEN} colour\n3 sky scene\n"


@pytest.fixture(scope="module")
def dissected(tmp_path_factory):
    """(run directory, the same results without any dissection): scan, crop, dissect and
    the report, in process."""
    from pipeline.runner import run

    root = tmp_path_factory.mktemp("dissected")
    colour_model(root / "colour.keras")
    share = colour_dataset(root)
    (root / "concepts.txt").write_text(CONCEPTS, encoding="utf-8")
    run_dir = root / "run"
    run(compose_cfg(seg_overrides(root, root / "colour.keras", f"dissect.quantile={share}", "dissect.downsample=1",
                                  "report.units=1",
                                  "report.per_image=0", "stages=[scan,crop,dissect,report]")), run_dir)
    plain = root / "plain"  # the index and its parts (linked by relative paths), less the links to dissect's
    shutil.copytree(run_dir / "parts", plain / "parts", ignore=shutil.ignore_patterns("dissect.*"))
    shutil.copy(run_dir / "results.h5", plain / "results.h5")
    with h5py.File(plain / "results.h5", "a") as f:
        del f["dissection"]
        for key in f["layers"]:
            del f[f"layers/{key}/dissection"]
    return run_dir, plain


def _iou(run_dir: Path, layer: str, unit: int) -> float:
    with h5py.File(run_dir / "results.h5", "r") as f:
        return float(f[f"layers/{layer}/dissection/label_iou"][unit])


def _detector_rows(page: Path) -> list[tuple[str, ...]]:
    table = re.search(r'<table id="detectors">.*?<tbody>(.*?)</tbody>', page.read_text(encoding="utf-8"), re.S)
    return [tuple(re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row))
            for row in re.findall(r"<tr>(.*?)</tr>", table.group(1))]


def test_layer_pages_and_index_show_the_detectors(dissected):
    run_dir, _ = dissected
    relu = run_dir / "report" / "relu.html"
    # the table: detector units, best IoU first, each linked to its card
    assert _detector_rows(relu) == [("0", "red", "colour", "1.00"),
                                    ("2", GREEN, "colour", f"{_iou(run_dir, 'relu', 2):.2f}")]
    text = relu.read_text(encoding="utf-8")
    assert '<a href="#u0">0</a>' in text and "2 detectors of 2 concepts" in text
    assert 'src="dissection/relu.png"' in text
    assert (run_dir / "report" / "dissection" / "relu.png").stat().st_size > 5000
    pool = _detector_rows(run_dir / "report" / "pool.html")  # coarser map: red still first, blurred
    assert pool[0][:3] == ("0", "red", "colour") and float(pool[0][3]) > 0.3
    index = (run_dir / "index.html").read_text(encoding="utf-8")
    assert "<h2>Detectors by depth</h2>" in index and 'src="sheets/run/detectors.png"' in index
    assert "concept:NAME" in index  # the search box says it
    assert (run_dir / "sheets" / "run" / "detectors.pdf").read_bytes()[:5] == b"%PDF-"


def test_figures_draw_names_in_any_script(dissected):
    """The figures choose their fonts themselves: drawn outside the runner's figure_fonts,
    the CJK concept and layer names find a glyph (no 'missing from font' warning)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from pipeline.render.dissection import LayerDissection, category_figure, depth_figure
    from pipeline.render.fonts import fallback_files

    if not fallback_files():
        pytest.skip("no CJK font on this system (apt-get install fonts-noto-cjk)")
    layer = LayerDissection("l1", "\u5c64_1", 8, [GREEN, "scene"], {GREEN: 2}, [(3, "red", GREEN, 0.5)], 0.04)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fig in (category_figure(layer), depth_figure([layer, layer], "\u6a21\u578b")):
            FigureCanvasAgg(fig).draw()
    assert not [str(w.message) for w in caught if "missing from" in str(w.message)]


def test_book_gains_the_detectors_by_depth_page(dissected, tmp_path):
    from pipeline.render.report import render_report

    run_dir, plain = dissected
    render_report(plain / "results.h5", plain, cards="chosen", units=1, per_image=0)
    assert _pdf_pages(run_dir / "report.pdf") == _pdf_pages(plain / "report.pdf") + 1
    assert _media_boxes(run_dir / "report.pdf") == {(595, 842)}  # A4 portrait, the figure's page too
    assert not (plain / "sheets" / "run" / "detectors.png").exists()
    assert "concept:NAME" not in (plain / "index.html").read_text(encoding="utf-8")  # no concepts to find


def test_toolbox_info_txt_is_unchanged_by_dissection(dissected, tmp_path):
    from pipeline.render.toolbox import write_toolbox

    run_dir, plain = dissected
    write_toolbox(run_dir / "results.h5", tmp_path / "dissected")
    write_toolbox(plain / "results.h5", tmp_path / "plain")
    infos = sorted(p.relative_to(tmp_path / "dissected") for p in (tmp_path / "dissected").rglob("info.txt"))
    assert len(infos) == 6  # 3 units in each of 2 layers
    assert infos == sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("info.txt"))
    for rel in infos:
        text = (tmp_path / "dissected" / rel).read_text()
        assert text == (tmp_path / "plain" / rel).read_text(), rel
        assert text.startswith("# is_conv val image_idx") and "red" not in text and "IoU" not in text


def test_viewer_answers_the_units_label(dissected):
    from pipeline.viewer.session import RunView

    run_dir, plain = dissected
    view = RunView(run_dir)
    assert view.unit("relu", 0)["concept"] == "red (IoU 1.00)"
    assert view.unit("relu", 1)["concept"] == "no concept (best IoU 0.00)"  # the constant unit
    assert view.unit("pool", 0)["concept"] == f"red (IoU {_iou(run_dir, 'pool', 0):.2f})"
    assert "concept" not in RunView(plain).unit("relu", 0)


@needs_browser
def test_search_finds_a_concept_and_the_table_opens_its_cards(browser, dissected):
    run_dir, _ = dissected
    context, page = watched_page(browser, 1200, 850)
    try:
        _open(page, run_dir / "index.html")
        assert "concept:NAME" in page.get_attribute("#search", "placeholder")
        page.fill("#search", "concept:red")
        page.wait_for_selector("#search-results li")
        found = page.eval_on_selector_all("#search-results li", "els => els.map(e => e.innerText)")
        pool = f"{_iou(run_dir, 'pool', 0):.2f}"
        assert [re.sub(r"\s+", " ", t) for t in found] == [
            "relu \u00b7 unit 0 \u00b7 red (IoU 1.00)", f"pool \u00b7 unit 0 \u00b7 red (IoU {pool})"], found
        page.press("#search", "Enter")
        page.wait_for_url(re.compile(r".*/report/relu\.html#u0$"))
        assert "red (IoU 1.00)" in _wait_card(page, 0)["title"]
        page.keyboard.press("Escape")
        page.wait_for_function("document.getElementById('viewer').hidden")
        rows = page.eval_on_selector_all("#detectors tbody tr", "els => els.map(e => e.innerText)")
        assert [r.split("\t") for r in rows][0] == ["0", "red", "colour", "1.00"]
        page.click("#detectors a[href='#u2']")  # a unit in the table opens its card
        assert GREEN in _wait_card(page, 2)["title"]
        page.fill("#search", f"concept:{GREEN}")
        page.press("#search", "Enter")
        _wait_card(page, 2)
        page.keyboard.press("Escape")
        page.eval_on_selector("#dissection ~ p img", "i => i.scrollIntoView()")  # lazy: loads once in view
        page.wait_for_function("(() => { const i = document.querySelector('#dissection ~ p img');"
                               " return i.complete && i.naturalWidth > 0; })()")
        assert page.errors == []
    finally:
        context.close()


@needs_browser
def test_viewer_page_titles_the_unit_with_its_label(browser, dissected):
    """The live viewer's page, served in process without the model (stored pictures only)."""
    import threading

    from pipeline.viewer.server import Viewer, make_server

    run_dir, _ = dissected
    server = make_server(Viewer(run_dir, live=False))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    context, page = watched_page(browser, 1400, 900)
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
        title = "document.getElementById('unit-title').textContent"
        page.wait_for_function(f"{title}.includes('IoU')")
        assert re.sub(r"\s+", " ", page.evaluate(title)) == "relu unit 0 \u00b7 red (IoU 1.00)"
        page.keyboard.press("l")  # the next unit: the constant one, no concept
        page.wait_for_function(f"{title}.includes('unit 1 ')")
        assert "no concept (best IoU 0.00)" in page.evaluate(title)
        assert page.errors == []
    finally:
        context.close()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_the_report_redraws_its_layer_part_after_a_dissection(dissected):
    """The cards' titles and the run figures come from the dissect stage: its token is in
    the key of the report's layer part (a kept part would show stale labels)."""
    from pipeline.stages.report import render_inputs
    from pipeline.store import Store

    run_dir, plain = dissected
    assert "dissect" in Store(run_dir).markers() and "dissect" not in Store(plain).markers()
    assert render_inputs(Store(run_dir), {})["layers"] != render_inputs(Store(plain), {})["layers"]
