"""Unit cards: text, PNG encoding, panels, weights, spectra, and the cards of a results file
written with h5py in the documented shapes (known colours, weights and counts)."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline.panel_codec import encode_panels
from pipeline.render import card_layout, cards, text as txt
from pipeline.render.card_charts import diverging_lut, spectrum_bars, weight_tiles
from pipeline.render.card_data import ImageIndex, find_weights, spectrum_values
from pipeline.render.cards import LayerCards, card_bytes, render_layer_cards
from pipeline.render.text import GlyphFont, draw_text, fmt_value, wrap
from pipeline.spectrum import BUCKETS as SPECTRUM, GAMMA, MIN_ABS  # the sketch's layout
from pipeline.render.canvas import EMPTY_GREY
from pipeline.render.patches import panel_image
from pipeline.render.results import read_layers

C, K, S = 5, 4, 6  # channels, top-k, stored patch side
ZERO = (SPECTRUM - 1) // 2  # the spectrum's zero bucket
PATHS = [f"data/{c}/img{i}.png" for i, c in enumerate(["cat", "dog", "cat", "dog", "cat", "dog"])]
LABELS = [0, 1, 0, 1, 0, -1]


def colour(c: int, k: int) -> tuple[int, int, int]:
    return (10 + 40 * c, 20 + 50 * k, 200)


def bottom_colour(c: int, k: int) -> tuple[int, int, int]:
    return (230, 30 * c, 100 + 60 * k)


def write_results(path, panels=True, filters=True, bottom=True, spectrum=True):
    s = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update(model="synthetic", input_size=np.array([24, 24]), version="0")
        g = f.create_group("images")
        g.create_dataset("path", data=np.array(PATHS, dtype=object), dtype=s)
        g["label"] = np.array(LABELS, np.int64)
        g["ok"] = np.ones(len(PATHS), bool)
        g.create_dataset("error", data=np.array([""] * len(PATHS), dtype=object), dtype=s)
        g.attrs["class_names"] = json.dumps(["cat", "dog"])
        layer = f.create_group("layers/block.conv")
        layer.attrs.update(name="block/conv", shape=np.array([8, 8, C]), depth=0, rf_size=np.array([6, 6]),
                           rf_stride=np.array([2, 2]), mappable=True, geometry_message="")
        image = np.tile(np.arange(K, dtype=np.int64), (C, 1))
        image[2, 3] = -1  # an empty slot
        layer["topk/value"] = np.sort(np.random.default_rng(0).random((C, K)).astype(np.float32), axis=1)[:, ::-1]
        layer["topk/image"] = image
        patches = np.zeros((C, K, S, S, 3), np.uint8)
        for c in range(C):
            for k in range(K):
                patches[c, k] = colour(c, k)
        layer["patches"] = patches
        if bottom:
            layer["bottomk/value"] = np.zeros((C, 2), np.float32)
            layer["bottomk/image"] = np.tile(np.array([4, 5], np.int64), (C, 1))
            bp = np.zeros((C, 2, S, S, 3), np.uint8)
            for c in range(C):
                for k in range(2):
                    bp[c, k] = bottom_colour(c, k)
            layer["bottom_patches"] = bp
        st = layer.create_group("stats")
        st["mean"] = np.full(C, 0.5, np.float32)
        st["max"] = np.full(C, 2.0, np.float32)
        st["zero_fraction"] = np.linspace(0.1, 0.9, C).astype(np.float32)
        st["quantiles"] = np.tile(np.linspace(0.1, 2.0, 7, dtype=np.float32), (C, 1))
        st.attrs["quantiles"] = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
        if spectrum:
            counts = np.zeros((C, SPECTRUM), np.int32)
            counts[:, ZERO + 30] = 4
            counts[:, ZERO + 50] = 2
            st["spectrum"] = counts
            st.attrs.update(spectrum_gamma=GAMMA, spectrum_min_abs=MIN_ABS)
        if panels:
            pg = layer.create_group("panels")
            pg.attrs["methods"] = json.dumps(["deconv"])
            raw = np.zeros((C, K, S, S, 3), np.float16)
            raw[:, :, :, :S // 2] = 0.5  # left half positive, right half negative
            raw[:, :, :, S // 2:] = -0.5
            for name, values, dims in (("deconv", raw, 3), ("deconv_norm", np.abs(raw).max(axis=-1), 2)):
                pg[name], pg[name + "_scale"] = encode_panels(values, dims)  # as the panels stage stores them
        if filters:
            fg = f.create_group("filters/block.conv")
            fg.attrs.update(name="block/conv", objective="channel", channels_total=C)
            fg["channels"] = np.array([1, 3], np.int64)
            fg["computed"] = np.array([True, True])
            fg["value"] = np.array([0.5, 0.7], np.float32)
            pat = np.zeros((2, 24, 24, 3), np.uint8)
            pat[0] = (250, 120, 0)
            pat[1] = (0, 120, 250)
            fg["patterns"] = pat
            wg = f.create_group("filters/block.conv_pre")  # the conv feeding block/conv
            wg.attrs.update(name="block/conv_pre", kind="Conv2D")
            w = np.zeros((1, 1, 4, C), np.float32)
            w[..., 0] = 1.0  # unit 0: all inputs +1 (the layer's largest |weight|)
            w[..., 1] = -1.0  # unit 1: all -1
            wg["weights"] = w
            wg["bias"] = np.arange(C, dtype=np.float32)
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return write_results(tmp_path_factory.mktemp("cards") / "results.h5")


@pytest.fixture(scope="module")
def rendered(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("cards_out")
    with h5py.File(results, "r") as f:
        info = read_layers(f)[0]
        files = render_layer_cards(f, info, out / "cards", out / "thumbs")
        lc = LayerCards.read(f, info, ImageIndex.read(f))
        # the composed pixels, before the lossy encoding: what pixel-exact tests compare
        lc.px = lc.compose(0, C, lc.template())[0]
    return files, lc


def load(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- text and encoding

def test_glyph_text_matches_matplotlib_rendering_of_the_same_string():
    text = "features_7_conv_0_2 \u00b7 unit 17 (x=3.14)"
    size = 14
    mask = GlyphFont(size).mask(text)
    ys, xs = np.nonzero(mask > 0.5)
    # reference: matplotlib's own Agg text at 72 dpi (1 pt = 1 px)
    fig = Figure(figsize=(6, 1), dpi=72)
    fig.text(0.02, 0.5, text, fontsize=size, family="DejaVu Sans", va="center")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    ink = 255 - np.asarray(canvas.buffer_rgba())[..., 0].astype(int)
    ry, rx = np.nonzero(ink > 127)
    assert abs((xs.max() - xs.min()) - (rx.max() - rx.min())) <= 3
    assert abs((ys.max() - ys.min()) - (ry.max() - ry.min())) <= 1


def _blank_runs(ink_columns: np.ndarray) -> list[int]:
    cols = np.flatnonzero(ink_columns)
    filled = ink_columns[cols[0]:cols[-1] + 1]
    edges = np.flatnonzero(np.diff(filled.astype(int)))  # ink -> blank and blank -> ink
    return list(np.diff(edges)[::2])


def test_glyphs_are_spaced_as_matplotlib_spaces_them():
    # hinted glyphs on unhinted advances, or a bitmap offset rounded the wrong way, left
    # gaps inside words ("motorcy cle") and glued letters together elsewhere
    text = "motorcycle_left.png features_7 unit 17"
    size = 12
    ours = GlyphFont(size).mask(text).max(axis=0) > 0.5
    fig = Figure(figsize=(6, 1), dpi=72)
    fig.text(0.02, 0.5, text, fontsize=size, family="DejaVu Sans", va="center")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    reference = (255 - np.asarray(canvas.buffer_rgba())[..., 0].astype(int)).max(axis=0) > 127
    ours_runs, reference_runs = _blank_runs(ours), _blank_runs(reference)
    assert len(ours_runs) == len(reference_runs)  # every gap between glyphs is there, none extra
    assert max(ours_runs) <= max(reference_runs)


def test_draw_text_only_inks_its_line_box_and_ellipsises():
    canvas = np.full((40, 300, 3), 255, np.uint8)
    width = draw_text(canvas, "Hello 123", 20, 10, 12, (0, 0, 0))
    dark = np.argwhere(canvas[..., 0] < 128)
    assert dark.size and dark[:, 0].min() >= 10 and dark[:, 0].max() < 10 + GlyphFont(12).height + 2
    assert dark[:, 1].min() >= 20 and dark[:, 1].max() < 20 + width
    long = "a rather long label that will not fit"
    f = GlyphFont(12)
    cut = f.fit(long, 60)
    assert cut.endswith("\u2026") and f.width(cut) <= 60 < f.width(long)
    assert wrap("one two three four five six", 12, f.width("one two three")) == ["one two three", "four five six"]


def test_lines_pasted_from_cached_words_equal_the_glyph_by_glyph_drawing():
    from pipeline.render import text

    lines = ["activation: mean 0.123 \u00b7 max 4.56 \u00b7 zero at 12.3 % of positions", "a  b   c  ",
             " lead and trail ", "\u4e2d\u6587 \u540d\u5b57 \u7684 \u56fe\u7247 jpg", "(j) {y} [g] \u2016w\u2016 1.2e-05 q"]
    for size, bold in ((10, False), (12, False), (18, True)):
        f = text.font(size, bold)
        for line in lines:
            glyphs = np.zeros((f.height + 2, max(1, f.width(line) + 2)), np.float32)
            text._draw_glyphs(f, line, glyphs, 0)
            np.testing.assert_array_equal(f.mask(line), glyphs)
            assert f.mask(line).any()
        assert text._composable(f, lines[0])  # the card's statistics line is pasted from words


def test_card_files_are_jpegs_close_to_the_composed_pixels(rendered):
    files, lc = rendered
    for u in range(C):
        with Image.open(files.cards[u]) as im:
            assert im.format == "JPEG" and files.cards[u].suffix == ".jpg"
            back = np.asarray(im.convert("RGB")).astype(int)
        assert back.shape == lc.px[u].shape
        assert np.abs(back - lc.px[u]).mean() < 3  # text and cells survive the encoding
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert Image.open(io.BytesIO(card_bytes(image))).size == (53, 37)


def test_panel_image_and_spectrum_values_match_the_pipeline_helpers():
    from pipeline.spectrum import bucket_values

    panels = np.zeros((2, 3, 5, 5, 3), np.float16)
    panels[0, 0, 0, 0] = 2.0  # each panel scaled by its own max |v|: +max white, -max black, 0 grey
    panels[0, 0, 1, 1] = -2.0
    panels[0, 0, 2, 2] = 1.0
    panels[1, 2, 4, 4] = -0.5  # a panel of one negative value: that value is black
    view = panel_image(panels)
    assert view.dtype == np.uint8 and view.shape == panels.shape
    assert (view[0, 0, 0, 0] == 255).all() and (view[0, 0, 1, 1] == 0).all() and (view[0, 0, 2, 2] == 192).all()
    assert (view[0, 0, 3, 3] == 128).all() and (view[0, 1] == 128).all()  # an all-zero panel is flat grey
    assert (view[1, 2, 4, 4] == 0).all() and (view[1, 2, 0, 0] == 128).all()
    # contrast stretched per panel (robust percentile): one outlier does not grey out the structure
    sparse = np.zeros((1, 1, 20, 20, 3), np.float32)
    sparse[0, 0, 2:10, 2:10] = 1.0
    sparse[0, 0, 15, 15] = 100.0
    shown = panel_image(sparse)
    assert (shown[0, 0, 2:10, 2:10] == 255).all() and (shown[0, 0, 15, 15] == 255).all()
    # the card reads the spectrum buckets back with the values the scan wrote them with
    np.testing.assert_allclose(spectrum_values(SPECTRUM, GAMMA, MIN_ABS), bucket_values(), rtol=1e-6)


def test_spectrum_bars_heights_follow_the_counts():
    counts = np.zeros((1, SPECTRUM), np.int32)
    a, b = ZERO + 30, ZERO + 40
    counts[0, a], counts[0, b] = 4, 2
    counts[0, ZERO] = 7  # the zero bucket is left out of the bars
    mask, lo, hi = spectrum_bars(counts, 41, 200)
    # a..b padded by 2 a side, then widened to 24 buckets about its middle
    assert (lo[0], hi[0]) == (ZERO + 35 - 12, ZERO + 35 + 11)
    heights = mask[0].sum(axis=0)
    col = lambda k: int((k - lo[0] + 0.5) * 200 / (hi[0] - lo[0] + 1))  # noqa: E731
    assert heights[col(a)] == 40 and heights[col(b)] == 20
    assert heights[col(ZERO + 35)] == 0


def test_weight_tiles_colour_the_sign_and_size_of_each_input():
    lut = diverging_lut()
    k = np.array([2.0, -2.0, 0.0, 1.0], np.float32).reshape(1, 1, 1, 4)
    tiles, shown = weight_tiles(k, 2.0, 41)
    assert shown == 4
    # 2 x 2 grid of 1x1 kernels, each 20 px (41 - 1 gap) // 2, centred
    centres = {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 3}
    for (r, c), i in centres.items():
        pixel = tiles[0, r * 21 + 10, c * 21 + 10]
        expected = lut[int(np.rint((np.clip(k[0, 0, 0, i] / 2.0, -1, 1) + 1) * 127.5))]
        np.testing.assert_array_equal(pixel, expected)
    many, shown = weight_tiles(np.ones((1, 3, 3, 400), np.float32), 1.0, 60)
    assert shown < 400 and many.shape == (1, 60, 60, 3)


def test_find_weights_own_named_inferred_and_ambiguous(tmp_path):
    from pipeline.render.results import LayerInfo

    def info(stored):
        return LayerInfo(stored, stored, (4, 4, 6), (3, 3), (1, 1), 0, True, "", None, True)

    with h5py.File(tmp_path / "w.h5", "w") as f:
        f.create_group("layers/x")
        for name in ("x", "a.conv0", "b.conv", "d.dw"):
            g = f.create_group(f"filters/{name}")
            g.attrs.update(name=name.replace(".", "/"), kind="DepthwiseConv2D" if name == "d.dw" else "Conv2D")
            shape = (3, 3, 3, 2) if name == "d.dw" else (1, 1, 3, 6)
            g["weights"] = np.random.default_rng(len(name)).normal(size=shape).astype(np.float32)
        assert find_weights(f, info("x"), 6).conv == "x" and find_weights(f, info("x"), 6).inferred == ""
        got = find_weights(f, info("a.relu0"), 6)
        assert got.conv == "a/conv0" and got.inferred == "name and output count"
        f.create_group("layers/a.relu0").attrs["conv"] = "b/conv"  # recorded link wins
        assert find_weights(f, info("a.relu0"), 6).conv == "b/conv"
        assert find_weights(f, info("zz"), 6) is None  # x, a.conv0 and b.conv all fit: no guess
        dw = find_weights(f, info("d.relu"), 6)  # depthwise: unit u = channel u // 2, multiplier u % 2
        w = f["filters/d.dw/weights"][()]
        assert dw.conv == "d/dw"
        for u in range(6):
            np.testing.assert_array_equal(dw.kernel[:, :, 0, u], w[:, :, u // 2, u % 2])


# ---------------------------------------------------------------- cards of a results file

def _cell(lc, key):
    cell = lc.layout.slot(key)
    assert cell is not None, key
    return cell


def test_each_thumbnail_is_its_units_top_montage_area_averaged(results, rendered):
    from pipeline.render.canvas import resize_patches

    files, _ = rendered
    with h5py.File(results, "r") as f:
        lc = LayerCards.read(f, read_layers(f)[0], ImageIndex.read(f))
        top = lc.compose(0, C, lc.template())[1]
    want = resize_patches(top, (files.thumb, files.thumb)).astype(int)
    for u in range(C):
        err = np.abs(load(files.thumbs[u]).astype(int) - want).mean(axis=(1, 2, 3))
        assert err[u] < 6, (u, err)  # JPEG q88 and the box filter's rounding, nothing more
        assert err[u] == err.min(), (u, err)  # and no other unit's montage


def test_every_unit_gets_a_card_and_a_thumbnail_of_fixed_size(rendered):
    files, lc = rendered
    assert sorted(files.cards) == list(range(C)) and sorted(files.thumbs) == list(range(C))
    for u in range(C):
        assert files.cards[u].name == f"unit_{u:04d}.jpg"
        assert load(files.cards[u]).shape == (lc.layout.height, lc.layout.width, 3)
        assert load(files.thumbs[u]).shape == (files.thumb, files.thumb, 3)
    assert [c.key for c in lc.layout.cells] == ["top", "panel:deconv", "pattern", "bottom", "weights", "spectrum"]
    assert lc.absent == []


def test_card_cells_show_each_units_patches_panels_and_pattern(rendered):
    files, lc = rendered
    ph, pw = lc.layout.patch_hw
    assert (ph, pw) == (48, 48)  # 6 px patches enlarged 8 times
    top = _cell(lc, "top")
    assert lc.layout.patch_in(top) == (96, 96)  # the top-k, the card's main picture, twice as large
    assert lc.layout.px(top)[1] >= lc.layout.px(_cell(lc, "spectrum"))[1]  # as wide as the histogram
    side = 2  # 4 patches: a 2 x 2 montage
    m = side * ph + (side - 1) * card_layout.THIN
    for u in range(C):
        card = lc.px[u].astype(int)
        for key, k_max, col in (("top", K, colour), ("bottom", 2, bottom_colour)):
            cell = _cell(lc, key)
            ph, pw = lc.layout.patch_in(cell)
            m = side * ph + (side - 1) * card_layout.THIN
            frame_h, frame_w = lc.layout.px(cell)
            y0 = cell.y + (frame_h - m) // 2
            x0 = cell.x + (frame_w - m) // 2
            for r in range(side * side):
                cy = y0 + (r // side) * (ph + card_layout.THIN) + ph // 2
                cx = x0 + (r % side) * (pw + card_layout.THIN) + pw // 2
                want = EMPTY_GREY if r >= k_max or (key == "top" and (u, r) == (2, 3)) else None
                got = tuple(card[cy, cx])
                assert got == ((want,) * 3 if want is not None else col(u, r)), (u, key, r)
        ph, pw = lc.layout.patch_hw
        m = side * ph + (side - 1) * card_layout.THIN
        deconv = _cell(lc, "panel:deconv")
        y0 = deconv.y + (lc.layout.cell - m) // 2 + ph // 2
        x0 = deconv.x + (lc.layout.cell - m) // 2
        assert tuple(card[y0, x0 + 4]) == (255, 255, 255)  # +max -> white
        assert tuple(card[y0, x0 + pw - 4]) == (0, 0, 0)  # -max -> black
        pattern = _cell(lc, "pattern")
        centre = card[pattern.y + 8, pattern.x + 8]
        expected = {1: (250, 120, 0), 3: (0, 120, 250)}.get(u, (EMPTY_GREY,) * 3)
        assert tuple(centre) == expected


def test_weights_cell_and_spectrum_chart(rendered):
    files, lc = rendered
    lut = diverging_lut()
    w = _cell(lc, "weights")
    for u, expected in ((0, lut[255]), (1, lut[0]), (2, lut[128])):
        card = lc.px[u]
        tile = card[w.y + lc.layout.cell // 2 - 20:w.y + lc.layout.cell // 2 + 20,
                    w.x + lc.layout.cell // 2 - 20:w.x + lc.layout.cell // 2 + 20]
        colours, counts = np.unique(tile.reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == tuple(expected), u
    spec = _cell(lc, "spectrum")
    card = lc.px[0]
    chart = card[spec.y:spec.y + lc.layout.cell, spec.x:spec.x + 2 * lc.layout.cell + card_layout.GAP]
    bar = np.all(chart == cards.BAR, axis=-1)
    columns = bar.sum(axis=0)
    short, tall = np.unique(columns[columns > 0])[-2:]
    assert short / tall == pytest.approx(0.5, abs=0.05)  # counts 4 and 2


def test_cards_are_identical_whatever_the_block_size(results, rendered, tmp_path, monkeypatch):
    files, _ = rendered
    monkeypatch.setattr(cards, "BLOCK_PIXELS", 1)  # one unit per block
    with h5py.File(results, "r") as f:
        small = render_layer_cards(f, read_layers(f)[0], tmp_path / "c", None, units=[3, 1])
    assert sorted(small.cards) == [1, 3] and not small.thumbs
    for u in (1, 3):
        np.testing.assert_array_equal(load(small.cards[u]), load(files.cards[u]))


def test_shared_patches_are_drawn_once_and_cards_are_the_same_whatever_the_span(tmp_path, monkeypatch):
    # units that win at the same image and place share one stored patch: a span draws each
    # distinct patch once for all its blocks, and every unit still gets its own patches
    from pipeline.render.patches import distinct_patches, layer_patches

    path = write_results(tmp_path / "results.h5", panels=False, filters=False, bottom=False)
    with h5py.File(path, "r+") as f:
        g = f["layers/block.conv"]
        image = (np.arange(C)[:, None] + np.arange(K)[None, :]) % 3  # 3 distinct places, 20 slots
        del g["topk/image"], g["patches"]
        g["topk/image"], g["topk/y"], g["topk/x"] = image, np.zeros_like(image), np.zeros_like(image)
        g["patches"] = np.stack([np.broadcast_to(np.asarray(colour(i, 0), np.uint8), (C, K, S, S, 3))
                                 for i in range(3)])[image, np.arange(C)[:, None], np.arange(K)[None, :]]
    with h5py.File(path, "r") as f:
        g = f["layers/block.conv"]
        got = distinct_patches(g, "patches", 1, C, K, (12, 12))
        assert got.drawn.shape[0] == 3 and got.index.shape == (C - 1, K)
        np.testing.assert_array_equal(got.rows(1, 3), layer_patches(g, "patches", 2, 4, K, (12, 12)))
        assert (got.rows(0, C - 1)[:, :, 5, 5] == np.asarray([colour(i, 0) for i in range(3)])[image[1:]]).all()
        info = read_layers(f)[0]
        whole = render_layer_cards(f, info, tmp_path / "whole", tmp_path / "whole_t")
        monkeypatch.setattr(cards, "BLOCK_PIXELS", 1)  # a unit a block, spans of two units
        monkeypatch.setattr(cards, "SPAN_UNITS", 2)
        split = render_layer_cards(f, info, tmp_path / "split", tmp_path / "split_t")
    for u in range(C):
        assert split.cards[u].read_bytes() == whole.cards[u].read_bytes(), u
        assert split.thumbs[u].read_bytes() == whole.thumbs[u].read_bytes(), u


def test_cards_drawn_by_worker_processes_are_the_same_files(results, rendered, tmp_path, monkeypatch):
    files, _ = rendered
    monkeypatch.setattr(cards, "CHUNK_UNITS", 2)  # units 0-1, 2-3, 4: three chunks on two processes
    with h5py.File(results, "r") as f:
        info = read_layers(f)[0]
        with cards.CardRender(f, [cards.CardJob(info, None, tmp_path / "c", tmp_path / "t")], workers=2,
                              min_cards=1, first={"block.conv": [3]}) as render:
            assert render.pool is not None and [c for _, c, _ in render.futures] == [[2, 3], [0, 1], [4]]
            assert sorted(render.first_files()["block.conv"].cards) == [2, 3]  # the book's chunk, first
            got = render.result()["block.conv"]
    assert sorted(got.cards) == list(range(C)) and sorted(got.thumbs) == list(range(C))
    assert got.size == files.size and got.thumb == files.thumb
    for u in range(C):
        assert got.cards[u].read_bytes() == files.cards[u].read_bytes(), u
        assert got.thumbs[u].read_bytes() == files.thumbs[u].read_bytes(), u


def test_missing_parts_are_named_on_the_card(tmp_path):
    path = write_results(tmp_path / "bare.h5", panels=False, filters=False, bottom=False, spectrum=False)
    with h5py.File(path, "a") as f:
        f["layers/block.conv"].attrs.update(mappable=False, geometry_message="a Dense layer has no map")
        del f["layers/block.conv/patches"]
    with h5py.File(path, "r") as f:
        info = read_layers(f)[0]
        lc = LayerCards.read(f, info, ImageIndex.read(f))
        files = render_layer_cards(f, info, tmp_path / "c", tmp_path / "t")
    assert lc.layout.cells == []
    text = " ".join(lc.absent)
    for part in ("a Dense layer has no map", "filter pattern", "bottom-k", "weights", "spectrum"):
        assert part in text, part
    card = load(files.cards[0])
    assert card.shape == (lc.layout.height, lc.layout.width, 3)
    footer = card[lc.layout.footer_y:lc.layout.footer_y + 14]
    assert (footer < 160).any()  # the footer text is drawn
    thumb = load(files.thumbs[0])
    assert (np.abs(thumb.astype(int) - EMPTY_GREY) <= 2).all()  # no patches: a grey thumbnail


def test_table_rows_show_every_filled_entry(rendered, results):
    files, lc = rendered
    card = lc.px[2]
    cols = lc._columns()
    for r in range(K):
        band = card[lc.layout.table_y + (r + 1) * card_layout.ROW_H:lc.layout.table_y + (r + 2) * card_layout.ROW_H]
        value_ink = (band[:, cols[1]:cols[2]] < 128).any()
        label_ink = (band[:, cols[3]:cols[4]] < 128).any()
        if r == 3:  # the empty slot of unit 2: no value, no label
            assert not label_ink
        else:
            assert value_ink and label_ink
    with h5py.File(results, "r") as f:
        index = ImageIndex.read(f)
    assert [index.label(i) for i in range(6)] == ["cat", "dog", "cat", "dog", "cat", "\u2013"]
    assert index.file(1) == "img1.png"


def test_table_values_are_each_units_own(rendered):
    # each row's value cell must hold exactly the text of that unit's own top-k value: drawn
    # here on a blank card and compared pixel for pixel (a card showing unit c-1's values fails)
    files, lc = rendered
    cols = lc._columns()
    for u in range(C):
        card = lc.px[u]
        for r in range(K):
            if lc.data.image[u, r] < 0:
                continue
            y = lc.layout.table_y + (r + 1) * card_layout.ROW_H
            expected = np.full_like(card, txt.CARD_BG)
            draw_text(expected, fmt_value(float(lc.data.value[u, r])), cols[1], y, 11)
            band = np.s_[y:y + card_layout.ROW_H, cols[1]:cols[2]]
            assert (expected[band] < 128).any()
            np.testing.assert_array_equal(card[band], expected[band], err_msg=f"unit {u} rank {r + 1}")


def _drawn_lines(card, lines, y0, size, color=txt.INK, x=card_layout.MARGIN, step=card_layout.LINE_H):
    """The card's rows y0.. next to the same lines drawn on a blank card."""
    expected = np.full_like(card, txt.CARD_BG)
    for i, line in enumerate(lines):
        draw_text(expected, line, x, y0 + i * step, size, color)
    band = np.s_[y0:y0 + len(lines) * step]
    return card[band], expected[band]


def test_quantile_line_shows_every_quantile(rendered):
    files, lc = rendered
    levels = np.array([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    wide = np.array([-2.45e4, 0.664, 0.764, 0.879, 1.02, 12345.6, 98765.4])
    lines = cards.quantile_lines(levels, wide, 520)  # the narrowest card: 4 cells of 120 px
    assert len(lines) == 2 and all(txt.font(12).width(line) <= 520 for line in lines)
    assert lines[1].split(" / ")[-1] == "9.88e+04" and "99 %" in lines[0]  # the 90 and 99 % values kept
    width = lc.layout.width - 2 * card_layout.MARGIN
    for u in (0, 4):
        card = lc.px[u]
        want = cards.quantile_lines(levels, lc.data.stats["quantiles"][u], width)
        assert want[-1].endswith(fmt_value(2.0))
        got, expected = _drawn_lines(card, want, lc.layout.stats_y + card_layout.LINE_H, 12)
        np.testing.assert_array_equal(got, expected)


def test_card_header_says_which_scanned_layer_it_is(rendered):
    files, lc = rendered
    card = lc.px[0]
    sub = "output 8\u00d78\u00d75 \u00b7 receptive field 6\u00d76 px, stride 2\u00d72 \u00b7 scanned layer 1 of 1"
    got, expected = _drawn_lines(card, [sub], 32, 12, cards.MUTED, step=16)
    np.testing.assert_array_equal(got, expected)
