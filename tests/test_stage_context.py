"""The runner's stage context: the model is loaded once for all the stages of a run, and a
stage gets only what its declaration names (the model only with `model` in its keys, a
result it reads when there only when its declaration names that stage)."""

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

import pipeline.models.sources
from conftest import save_image
from pipeline.runner import run
from pipeline.stage_context import StageContext
from pipeline.stage_spec import Stage
from test_panels import tiny_model
from test_pipeline import compose_cfg


def test_one_model_load_serves_every_stage_of_a_run(tmp_path, monkeypatch, caplog):
    tiny_model(tmp_path / "tiny.keras")
    rng = np.random.default_rng(7)
    for i in range(2):
        save_image(tmp_path / "photos" / f"img{i}.png", rng.integers(0, 256, (20, 20, 3), np.uint8))
    loads = []
    load = pipeline.models.sources.load_model
    monkeypatch.setattr(pipeline.models.sources, "load_model", lambda *a, **k: loads.append(1) or load(*a, **k))
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={tmp_path / 'photos'}", "layers=[relu1]", "topk=1",
                       "stages=[scan,activations]", "activations.images=1", "activations.grid=4"])
    with caplog.at_level(logging.INFO, logger="pipeline.runner"):
        run(cfg, tmp_path / "run")
    assert len(loads) == 1  # two stages that use the model, one load
    assert "the model was loaded 1 time(s) for the stages of this run" in caplog.text


def test_a_stage_gets_only_what_it_declares(tmp_path):
    cfg = OmegaConf.create({"model": {"kind": "file"}, "cache_dir": None})
    bare = StageContext("export", Stage(), cfg, tmp_path)
    with pytest.raises(RuntimeError, match="stage export uses the model but its declared keys do not name model"):
        bare.bundle
    with pytest.raises(RuntimeError, match="stage export reads train results but its declaration does not name"):
        bare.holds("train")
    spec = Stage(keys=("model",), reads=("train",))
    declared = StageContext("invariance", spec, cfg, tmp_path, depends_on=spec.depends_on(cfg))
    assert declared.holds("train") is False  # declared, and this empty run directory holds none
