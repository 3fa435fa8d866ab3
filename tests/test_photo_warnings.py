"""A photo that cannot be read while drawing is one warning that names it and what to do,
and the sheets drawn without it are drawn again once its file is back."""

import json
import logging

import numpy as np

from conftest import save_image
from pipeline.render.maps import RECORD, redraw_stale_sheets
from pipeline.runner import run
from test_panels import tiny_model
from test_pipeline import compose_cfg


def test_an_unreadable_photo_is_one_warning_and_its_sheet_comes_back_with_the_file(tmp_path, caplog):
    tiny_model(tmp_path / "tiny.keras")
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        save_image(photos / name, rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    good = (photos / "b.png").read_bytes()
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={photos}", "stages=[occlusion]",
                       "occlusion.images=[0,1]", "occlusion.size=10"])
    run_dir = tmp_path / "run"
    run(cfg, run_dir)
    sheets = run_dir / "occlusion"
    assert sorted(p.name for p in sheets.glob("*.png")) == ["image_0.png", "image_1.png"]

    (photos / "b.png").write_bytes(good[: len(good) // 3])  # damaged since the stage ran
    for p in sheets.iterdir():
        p.unlink()
    with caplog.at_level(logging.WARNING):
        redraw_stale_sheets(run_dir / "results.h5", run_dir)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "b.png" in lines[0] and "put the file back" in lines[0], lines
    assert sorted(p.name for p in sheets.glob("*.png")) == ["image_0.png"]
    assert list(json.loads((sheets / RECORD).read_text())["unreadable"]) == ["1"]

    caplog.clear()
    assert redraw_stale_sheets(run_dir / "results.h5", run_dir) == []  # the same file: nothing new to draw
    assert not caplog.records or all(r.levelno < logging.WARNING for r in caplog.records)

    (photos / "b.png").write_bytes(good)
    redraw_stale_sheets(run_dir / "results.h5", run_dir)
    assert sorted(p.name for p in sheets.glob("*.png")) == ["image_0.png", "image_1.png"]
    assert "unreadable" not in json.loads((sheets / RECORD).read_text())
