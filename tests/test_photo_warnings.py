"""A photo that cannot be read while drawing is one warning that names it and what to do,
and the sheets drawn without it are drawn again once its file is back."""

import json
import logging

import numpy as np
import pytest

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


@pytest.mark.parametrize("min_cards", [1, 512], ids=["card-workers", "this-process"])
def test_a_per_image_sheet_drawn_without_its_photo_warns_once_in_the_stage_log(tmp_path, caplog, monkeypatch,
                                                                               min_cards):
    # the per-image sheets are drawn by the card worker processes where there are any: their
    # warnings reach this process's log (run.log, the console) all the same, once
    from pipeline.render import cards
    from pipeline.render.report import render_report

    tiny_model(tmp_path / "tiny.keras")
    photos = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        save_image(photos / name, rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={photos}", "stages=[scan,occlusion]",
                       "occlusion.images=[0,1]", "occlusion.size=10"])
    run(cfg, tmp_path / "run")
    (photos / "b.png").write_bytes(b"not a png")
    monkeypatch.setattr(cards, "PARALLEL_MIN_CARDS", min_cards)  # 9 cards: workers with 1, none with 512
    with caplog.at_level(logging.WARNING):
        # into the run directory: its occlusion sheets are up to date, only the per-image sheets are drawn
        render_report(tmp_path / "run" / "results.h5", tmp_path / "run", per_image=[0, 1], pdf=False)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "b.png" in lines[0] and "put the file back" in lines[0], lines
    assert sorted(p.name for p in (tmp_path / "run" / "sheets" / "images").glob("*.png")) == ["image_0.png",
                                                                                            "image_1.png"]
