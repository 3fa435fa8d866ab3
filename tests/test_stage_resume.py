"""Fast, in-process kills of the panels and filters stages: each stops after a few
committed chunks (an exception where its engine would compute the next one), and the
next run must say where it resumes, compute only the chunks that are missing, and end
with the uninterrupted run's results. A stage that restarted from zero fails here, not
only in the slow SIGKILL tests of test_store_runs."""

import logging
import re

import h5py
import numpy as np
import pytest

import pipeline.panels
import pipeline.patterns
from conftest import save_image
from pipeline.runner import run
from pipeline.store import walk
from test_panels import tiny_model
from test_pipeline import compose_cfg


class Stopped(Exception):
    """Where a kill would land: before the engine computes one more chunk."""


def counting(monkeypatch, module, name, stop_after=None) -> list:
    """Count the calls of module.name (one per chunk); raise Stopped instead of the call
    after `stop_after` of them."""
    original, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise Stopped
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny_model(root / "tiny.keras")
    rng = np.random.default_rng(5)
    for i in range(6):
        save_image(root / "photos" / f"img{i}.png", rng.integers(0, 256, (20, 20, 3), np.uint8))
    return root, ["model=file", f"model.path={root / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
                  f"dataset.path={root / 'photos'}", "topk=2", "crop.max_size=0",
                  "checkpoint.block_mb=0.0002", "panels.methods=[deconv]", "filters.steps=3", "filters.size=null",
                  "filters.batch_size=1", "filters.rivals=false", "filters.toolbox=false"]


def _arrays(run_dir, prefix):
    with h5py.File(run_dir / "results.h5", "r") as f:
        return {name: d[()] for name, d in walk(f) if prefix in name}


# stage -> (its overrides, the engine module and function called once per chunk, what the
# stage writes): panels cuts a block per channel (4), filters a block per layer (2)
CASES = {"panels": (["stages=[scan,panels]", "layers=[relu1]"], pipeline.panels, "block_panels", "/panels/"),
         "filters": (["stages=[filters]", "layers=[relu1,conv2]"], pipeline.patterns, "filter_patterns", "filters/")}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_stage_stopped_after_some_chunks_computes_only_the_rest(base, stage, tmp_path, monkeypatch, caplog):
    _, overrides = base
    options, module, engine, written = CASES[stage]
    cfg = compose_cfg(overrides + options)
    with monkeypatch.context() as patch:
        fresh = counting(patch, module, engine)
        run(cfg, tmp_path / "fresh")
    assert len(fresh) >= 2, f"{stage} made one chunk: nothing to resume"
    stop_after = len(fresh) // 2
    with monkeypatch.context() as patch:
        counting(patch, module, engine, stop_after=stop_after)
        with pytest.raises(Stopped):
            run(cfg, tmp_path / "killed")
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO, logger="pipeline.store"):
        resumed = counting(patch, module, engine)
        run(cfg, tmp_path / "killed")
    said = re.search(rf"{stage}: resuming, (\d+) of (\d+) ", caplog.text)
    assert said and (int(said[1]), int(said[2])) == (stop_after, len(fresh)), caplog.text[-2000:]
    assert len(resumed) == len(fresh) - stop_after  # the committed chunks were not computed again
    got, expected = _arrays(tmp_path / "killed", written), _arrays(tmp_path / "fresh", written)
    assert got and sorted(got) == sorted(expected)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
