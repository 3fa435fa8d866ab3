"""Names in any script and in any bytes: a folder dataset whose file and class names are not
UTF-8, are Chinese, hold a newline, a tab or a bell, or look like markup, through a real
run.py (scan, crop, report, export), read back with h5py, served by the viewer and shown
in a headless Chromium; and the cards' text renderer with and without a CJK font."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT, watched_page
from test_pipeline import tiny_model
from test_viewer import Server
from pipeline.names import readable, shown
from pipeline.render import text
from pipeline.render.fonts import fallback_files
from pipeline.store import read_path, read_paths, read_strings

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
SCRIPT = "<!--<script>"
# file name (bytes, under the dataset folder) -> what the report shows of it
FILES = {b"c/good.png": "good.png", b"c/\xff\xfe.png": "\\xff\\xfe.png",
         b"c/line\nbreak\ttab\x07.png": "line\\nbreak\\ttab\\x07.png", b"d\xe9/x.png": "x.png",
         "猫/写真.png".encode(): "写真.png", "猫/b.png".encode(): "b.png",
         f"{SCRIPT}/s.png".encode(): "s.png", f"{SCRIPT}/t.png".encode(): "t.png"}
BROKEN = b"c/\xfdbroken.png"  # not an image: skipped, its name shown in the report


def test_readable_and_shown_keep_one_line_of_valid_text():
    raw = os.fsdecode(b"a\xff\xfe/\xe9t\xc3\xa9.png")
    assert readable(raw) == "a\\xff\\xfe/\\xe9té.png" and readable("猫") == "猫"
    assert readable("x\ud800") == "x\\ud800"  # a lone surrogate that stands for no byte
    assert shown("a\nb\tc\rd\x07e\x7f\x85\u2028猫") == "a\\nb\\tc\\rd\\x07e\\x7f\\x85\\u2028猫"
    assert shown(raw).encode("utf-8") and "\n" not in shown("x\ny")


def test_cjk_is_drawn_from_a_fallback_font_and_a_placeholder_without_one():
    bare = text.GlyphFont(11, fallbacks=())
    box = bare.mask("日")
    assert np.array_equal(box, bare.mask("猫"))  # every missing character: the same boxed '?'
    ink = box > 0.5
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert ink[rows[0], cols[0]:cols[-1] + 1].all() and ink[rows[0]:rows[-1] + 1, cols[0]].all()  # a box
    assert ink[rows[0] + 2:rows[-1] - 1, cols[0] + 2:cols[-1] - 1].any()  # with a mark inside
    assert bare.width("a日b") == bare.width("a") + bare.width("日") + bare.width("b")
    # control characters are drawn escaped, on one line
    canvas, escaped = np.full((2, 20, 200, 3), 255, np.uint8)
    text.draw_text(canvas, "a\nb\x07", 0, 0, 11)
    text.draw_text(escaped, "a\\nb\\x07", 0, 0, 11)
    assert np.array_equal(canvas, escaped)
    files = fallback_files()
    if not files:
        pytest.skip("no CJK font on this system (apt-get install fonts-noto-cjk): the placeholder path only")
    full = text.GlyphFont(11, fallbacks=files)
    for ch in "日猫한あ":
        glyph = full.mask(ch)
        assert (glyph > 0.5).sum() > 10 and not np.array_equal(glyph[:box.shape[0], :box.shape[1]], box), ch
    assert full.mask("日").tobytes() != full.mask("猫").tobytes()
    assert np.array_equal(full.mask("abc"), bare.mask("abc"))  # Latin still comes from DejaVu Sans


def test_a_filelist_names_files_by_their_bytes_and_keeps_markup_labels(tmp_path):
    from pipeline.datasets import list_images

    (tmp_path / "list.txt").write_bytes(b"\xff\xfe.png " + SCRIPT.encode() + b"\n\xe7\x8c\xab.png cat\n")
    table = list_images(OmegaConf.create(dict(kind="filelist", path=str(tmp_path / "list.txt"), limit=None)))
    assert [os.fsencode(p) for p in table.paths] == [os.fsencode(tmp_path) + b"/\xff\xfe.png",
                                                     os.fsencode(tmp_path) + "/猫.png".encode()]
    assert table.class_names == [SCRIPT, "cat"] and table.labels.tolist() == [0, 1]


def test_figures_get_the_fallback_fonts_only_inside_figure_fonts(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    from pipeline.render.fonts import family_list, figure_fonts

    import pipeline.runner  # noqa: F401  (every stage's imports)
    import pipeline.stages.report  # noqa: F401

    before = list(matplotlib.rcParams["font.family"])
    assert "Noto Sans CJK JP" not in before  # importing the project changed nothing global
    assert matplotlib.rcParams["text.parse_math"]
    with figure_fonts():  # names are drawn literally, never as math, inside the block only
        assert not matplotlib.rcParams["text.parse_math"]
        fig = Figure(figsize=(3, 1))
        fig.text(0.05, 0.5, "$\\undefinedmacro$ a^b_{c}")
        fig.savefig(tmp_path / "literal.png")
    assert matplotlib.rcParams["text.parse_math"]
    if not fallback_files():
        pytest.skip("no CJK font on this system (apt-get install fonts-noto-cjk)")
    with figure_fonts():
        assert matplotlib.rcParams["font.family"] == list(family_list())
        fig = Figure(figsize=(3, 1))
        fig.text(0.05, 0.5, shown("写真.png 한 line\nbreak"))
        fig.savefig(tmp_path / "names.pdf")
    assert list(matplotlib.rcParams["font.family"]) == before
    assert b"CJK" in (tmp_path / "names.pdf").read_bytes()  # the PDF embeds the CJK font it drew with


@pytest.fixture(scope="module")
def names_run(tmp_path_factory):
    """A real run.py over the folder (scan, crop, report, export), started as a process."""
    tmp = tmp_path_factory.mktemp("names")
    root = os.fsencode(tmp / "data")
    rng = np.random.default_rng(5)
    for rel in FILES:
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        low = 200 if rel.startswith(SCRIPT.encode()) else 0  # bright: units come to prefer this class
        pixels = rng.integers(low, low + 56, (28, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, rel), format="PNG")
    with open(os.path.join(root, BROKEN), "wb") as f:
        f.write(b"not a picture")
    tiny_model(tmp / "tiny.keras")
    from pipeline.datasets import list_images

    table = list_images(OmegaConf.create(dict(kind="folder", path=str(tmp / "data"), limit=None)))
    ids = {os.fsencode(p)[len(root) + 1:]: i for i, p in enumerate(table.paths)}
    run_dir = tmp / "run"
    sheets = [ids["猫/写真.png".encode()], ids[b"c/line\nbreak\ttab\x07.png"]]
    proc = subprocess.run([sys.executable, "run.py", "model=file", f"model.path={tmp / 'tiny.keras'}", "dataset=folder",
                           f"dataset.path={tmp / 'data'}", "layers=[relu1,relu2]", "stages=[scan,crop,report,export]",
                           f"report.per_image=[{sheets[0]},{sheets[1]}]",
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          errors="backslashreplace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir, ids, proc


@pytest.mark.slow
def test_every_name_is_scanned_stored_exactly_and_shown_readably(names_run):
    root, run_dir, ids, proc = names_run
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert f"({os.fsdecode(root)}/c/\\xfdbroken.png): not an image" in proc.stdout + proc.stderr  # the log line
    with h5py.File(run_dir / "results.h5", "r") as f:
        g = f["images"]
        raw = g["path_bytes"][()].tobytes()
        offsets = g["path_offsets"][()]
        stored = [raw[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        text = read_strings(g["path"])
        paths = read_paths(g)
        one = read_path(g, ids[b"c/\xff\xfe.png"])
        ok, errors = g["ok"][()], read_strings(g["error"])
        classes = json.loads(g.attrs["class_names"])
        patches = f["layers/relu1/patches"][()]
        top = f["layers/relu1/topk/image"][()]
    # the exact bytes of every file the folder holds, in the order of the image ids
    assert stored == [os.path.join(root, rel) for rel in sorted(ids, key=ids.get)]
    assert sorted(os.path.relpath(p, root) for p in stored) == sorted([*FILES, BROKEN])
    assert [os.fsencode(p) for p in paths] == stored and os.fsencode(one) == os.path.join(root, b"c/\xff\xfe.png")
    # the text column: valid UTF-8, bytes that are not as \xNN
    assert text[ids[b"c/\xff\xfe.png"]].endswith("/c/\\xff\\xfe.png")
    assert text[ids["猫/写真.png".encode()]].endswith("猫/写真.png")
    assert classes == sorted(["c", os.fsdecode(b"d\xe9"), "猫", SCRIPT])  # JSON: \udce9 stands for byte 0xe9
    # every image but the broken one was read, by TensorFlow or Pillow, and cut into patches
    assert [rel for rel, i in ids.items() if not ok[i]] == [BROKEN] and "not an image" in errors[ids[BROKEN]]
    odd = ids[b"c/\xff\xfe.png"]
    rank = np.argwhere(top == odd)
    assert len(rank) and all(patches[c, k].std() > 0 for c, k in rank)
    # the report: the page, the cards and the per-image sheets show the names readably
    html = (run_dir / "index.html").read_text(encoding="utf-8")
    for shown_name in ("写真.png", "line\\nbreak\\ttab\\x07.png", "c/\\xfdbroken.png"):
        assert shown_name in html, shown_name
    assert len(list((run_dir / "sheets" / "images").glob("image_*.png"))) == 2
    assert len(list((run_dir / "report" / "cards" / "relu1").glob("unit_*.jpg"))) == 4
    # the toolbox's info.txt: one row per line, the crop script's 7 fields each
    for info in (run_dir / "toolbox").rglob("info.txt"):
        rows = info.read_text(encoding="utf-8").splitlines()[1:]
        assert rows and all(len(r.split(" ")) == 7 for r in rows), rows
        assert {r.split(" ")[-1].rsplit("/", 1)[-1] for r in rows} <= set(FILES.values())


@pytest.mark.slow
def test_the_viewer_finds_every_file_again_and_lists_the_names_readably(names_run):
    from pipeline.datasets import ImageTable, decode_with_pillow
    from pipeline.preprocess import Preprocessing

    root, run_dir, ids, _ = names_run
    s = Server(run_dir, "--no-model")
    try:
        status, body = s.get("/api/run")
        assert status == 200
        names = {im["name"] for im in json.loads(body)["images"]}
        assert set(FILES.values()) | {"\\xfdbroken.png"} == names
        for rel in (b"c/\xff\xfe.png", "猫/写真.png".encode(), b"d\xe9/x.png"):
            status, body = s.get(f"/api/image?image={ids[rel]}")
            assert status == 200, body[:300]
            png = base64.b64decode(json.loads(body)["png"].split(",", 1)[1])
            got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            expected, _ = decode_with_pillow(os.fsdecode(os.path.join(root, rel)), Preprocessing(24, 24),
                                             ImageTable(paths=[], labels=np.zeros(0, np.int64)))
            assert got.shape[:2] == (24, 24) and np.abs(got.astype(int) - expected.numpy().astype(int)).max() <= 1
    finally:
        assert s.stop() == 0, "".join(s.log)


@pytest.mark.slow
def test_a_label_that_looks_like_a_script_keeps_the_search_working(names_run, browser):
    _, run_dir, _, _ = names_run
    html = (run_dir / "index.html").read_text(encoding="utf-8")
    data = html.split('id="lens-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in data and ">" not in data and "&" not in data and SCRIPT in json.loads(data)["classes"]
    context, page = watched_page(browser, 1200, 850)
    try:
        page.goto((run_dir / "index.html").resolve().as_uri())
        page.wait_for_load_state("load")
        page.fill("#search", f"class:{SCRIPT}")
        page.wait_for_selector("#search-results li")
        found = page.eval_on_selector_all("#search-results li", "els => els.map(e => e.innerText)")
        assert found and all(f"selective for {SCRIPT}" in t for t in found), found
        page.fill("#search", "relu2 4")
        page.wait_for_selector("#search-results li")
        assert "unit 4" in page.inner_text("#search-results li")
        assert page.errors == []
    finally:
        context.close()
