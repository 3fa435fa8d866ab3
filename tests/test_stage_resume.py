"""Fast, in-process kills of every chunked stage (crop, panels, filters, and the per-image
cam and activations): each stops after a few committed chunks (an exception where it
would compute the next one), and the next run must say where it resumes, compute only
the chunks that are missing, and end with the uninterrupted run's results. A stage that
restarted from zero, or resumed from another position, fails here, not only in the slow
SIGKILL tests of test_store_runs."""

import logging
import re

import h5py
import numpy as np
import pytest

import pipeline.panels
import pipeline.patterns
import pipeline.scan_io
import pipeline.stages.crop
from pipeline.chunks import ChunkedStream
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


# stage -> (its overrides, the object and function called once per chunk, what the stage
# writes, the units its resume line counts per chunk): panels cuts a block per channel (4),
# filters a block per layer (2), crop a block per channel (a BatchStream each); the per-image
# stages add a batch of 2 images at a time and commit each (6 images, 3 chunks)
PER_IMAGE = ["batch_size=2", "checkpoint.batches=1"]
CASES = {"panels": (["stages=[scan,panels]", "layers=[relu1]"], pipeline.panels, "block_panels", "/panels/", 1),
         "filters": (["stages=[filters]", "layers=[relu1,conv2]"], pipeline.patterns, "filter_patterns", "filters/", 1),
         "crop": (["stages=[scan,crop]", "layers=[relu1]"], pipeline.stages.crop, "BatchStream", "/patches", 1),
         "cam": (["stages=[cam]", "cam.methods=[gradcam]", "cam.draw=0", *PER_IMAGE], ChunkedStream, "add", "cam/", 2),
         "activations": (["stages=[activations]", "activations.images=6", *PER_IMAGE], ChunkedStream, "add",
                         "activations/", 2)}


@pytest.mark.parametrize("stage", sorted(CASES))
def test_a_stage_stopped_after_some_chunks_computes_only_the_rest(base, stage, tmp_path, monkeypatch, caplog):
    _, overrides = base
    options, module, engine, written, per_chunk = CASES[stage]
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
    said = said and (int(said[1]), int(said[2]))
    assert said == (stop_after * per_chunk, len(fresh) * per_chunk), caplog.text[-2000:]
    assert len(resumed) == len(fresh) - stop_after  # the committed chunks were not computed again
    got, expected = _arrays(tmp_path / "killed", written), _arrays(tmp_path / "fresh", written)
    assert got and sorted(got) == sorted(expected)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_scan_stopped_after_a_checkpoint_resumes_where_it_stood(base, tmp_path, monkeypatch, caplog):
    """The scan's checkpoint holds the stream position and every layer's running state:
    a resume from another position, or with a layer's state lost, ends with other tables."""
    _, overrides = base
    cfg = compose_cfg(overrides + ["stages=[scan]", "layers=[relu1,conv2]", "scan.bottomk=1", *PER_IMAGE])
    run(cfg, tmp_path / "fresh")
    with monkeypatch.context() as patch:
        counting(patch, pipeline.scan_io, "_checkpoint", stop_after=1)
        with pytest.raises(Stopped):
            run(cfg, tmp_path / "killed")
    with caplog.at_level(logging.INFO):
        run(cfg, tmp_path / "killed")
    assert "resuming the scan at image 2 of 6 (2 images already scanned)" in caplog.text, caplog.text[-2000:]
    assert re.search(r"scan finished: 6 images scanned \(4 by this process", caplog.text), caplog.text[-2000:]
    got, expected = _arrays(tmp_path / "killed", "layers/"), _arrays(tmp_path / "fresh", "layers/")
    assert any("topk/value" in name for name in got) and sorted(got) == sorted(expected)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
