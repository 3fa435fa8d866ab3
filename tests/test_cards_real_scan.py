"""Unit cards drawn from a real scan's results.h5 (the tiny model over real image files,
in-process), not a hand-built one: every image is one flat colour, so each top-k and
bottom-k slot of a card must show, at its centre, the colour of the image the scan
recorded for that slot."""

import h5py
import numpy as np
import pytest

from conftest import save_image
from pipeline.render import card_layout
from pipeline.render.card_data import ImageIndex
from pipeline.render.cards import LayerCards
from pipeline.render.results import read_layers
from pipeline.runner import run
from test_cards import _cell
from test_pipeline import compose_cfg, tiny_model

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (150, 60, 200)]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards_scan")
    for i, rgb in enumerate(COLOURS):
        save_image(tmp / "photos" / f"img{i}.png", np.full((30 + 2 * i, 28, 3), rgb, np.uint8))
    tiny_model(tmp / "tiny.keras")
    run(compose_cfg(["model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
                     f"dataset.path={tmp / 'photos'}", "layers=[relu2]", "topk=4", "scan.bottomk=4",
                     "stages=[scan,crop]", "crop.max_size=0"]), tmp / "run")
    return tmp / "run" / "results.h5"


def test_each_card_slot_shows_the_image_the_scan_recorded(scanned):
    with h5py.File(scanned, "r") as f:
        info = read_layers(f)[0]
        lc = LayerCards.read(f, info, ImageIndex.read(f))
        units = lc.data.channels
        px = lc.compose(0, units, lc.template())[0].astype(int)
        tables = {key: f[f"layers/relu2/{table}/image"][()] for key, table in (("top", "topk"), ("bottom", "bottomk"))}
    assert units == 6 and all((t >= 0).all() for t in tables.values())  # 6 images fill the 4 slots
    side = 2  # 4 slots: a 2 x 2 montage
    checked = 0
    for key, images in tables.items():
        cell = _cell(lc, key)
        ph, pw = lc.layout.patch_in(cell)
        m = side * ph + (side - 1) * card_layout.THIN
        frame_h, frame_w = lc.layout.px(cell)
        y0, x0 = cell.y + (frame_h - m) // 2, cell.x + (frame_w - m) // 2
        for u in range(units):
            for r in range(side * side):
                cy = y0 + (r // side) * (ph + card_layout.THIN) + ph // 2
                cx = x0 + (r % side) * (pw + card_layout.THIN) + pw // 2
                assert tuple(px[u, cy, cx]) == COLOURS[images[u, r]], (key, u, r)
                checked += 1
    assert checked == 2 * 6 * 4
