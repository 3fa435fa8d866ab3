"""The scan's activation sketch (scan.sketch) and the dissect stage's single pass: a scan
that sketches hands the dissect stage thresholds, rank errors and sketches identical to
the stage's own thresholds pass over the same images (a resumed scan too, and merged
shards); any other set of images falls back to the two passes, said in one line."""

import logging

import h5py
import numpy as np
import pytest

import pipeline.dissect_pass
import pipeline.scan_io
from test_dissect import colour_dataset, colour_model, seg_overrides
from test_pipeline import compose_cfg
from test_stage_resume import Stopped, counting
from pipeline.runner import run
from pipeline.scan_io import wants_sketch

LAYERS = ("relu", "pool")
SINGLE = "dissect: thresholds from the scan's activation sketch (12 images): the IoU pass only"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The colour dataset, plus an unreadable image and a readable one without a mask: the
    thresholds count the second (every readable image), the IoU pass neither."""
    root = tmp_path_factory.mktemp("sketch")
    colour_model(root / "colour.keras")
    colour_dataset(root, n=11)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really a png")
    (root / "images" / "unmasked.png").write_bytes((root / "images" / "img00.png").read_bytes())
    return root


def overrides(root, *extra):
    return seg_overrides(root, root / "colour.keras", "batch_size=4", *extra)


@pytest.fixture(scope="module")
def two_pass(data, tmp_path_factory):
    """The dissect stage alone: its own thresholds pass."""
    out = tmp_path_factory.mktemp("two") / "run"
    run(compose_cfg(overrides(data, "stages=[dissect]")), out)
    return out


def dissection(run_dir):
    with h5py.File(run_dir / "results.h5", "r") as f:
        return {f"{layer}/{key}": f[f"layers/{layer}/dissection/{key}"][()] for layer in LAYERS
                for key in ("threshold", "threshold_rank_error", "sketch", "intersection", "unit_area", "iou")}


def scan_sketch(run_dir):
    with h5py.File(run_dir / "results.h5", "r") as f:
        return {layer: f[f"layers/{layer}/stats/sketch"][()] for layer in LAYERS}


def assert_same(got, expected):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_a_resumed_scan_hands_the_dissect_stage_the_two_pass_thresholds(data, two_pass, tmp_path, monkeypatch,
                                                                         caplog):
    cfg = compose_cfg(overrides(data, "stages=[scan,dissect]", "checkpoint.batches=1"))
    with monkeypatch.context() as patch:  # killed after one committed batch of the scan
        counting(patch, pipeline.scan_io, "_checkpoint", stop_after=1)
        with pytest.raises(Stopped):
            run(cfg, tmp_path / "run")
    passes, stream_pass = [], pipeline.dissect_pass.stream_pass
    monkeypatch.setattr(pipeline.dissect_pass, "stream_pass", lambda *a: passes.append(a[5]) or stream_pass(*a))
    with caplog.at_level(logging.INFO):
        run(cfg, tmp_path / "run")
    assert "resuming the scan at image 5 of 13 (4 images already scanned)" in caplog.text
    assert SINGLE in caplog.text and passes == ["IoU"]  # no thresholds pass ran
    expected = dissection(two_pass)
    assert_same(dissection(tmp_path / "run"), expected)
    for layer, sketch in scan_sketch(tmp_path / "run").items():
        np.testing.assert_array_equal(sketch, expected[f"{layer}/sketch"])
        # 12 readable images (the unmasked one too) of a 24x32 map (relu), 12x16 (pool)
        assert (sketch.sum(axis=1) == 12 * (24 * 32 if layer == "relu" else 12 * 16)).all()


def test_shard_sketches_add_in_the_merge_and_other_images_fall_back(data, two_pass, tmp_path, caplog):
    shards = [tmp_path / f"shard{i}" for i in range(2)]
    for i, shard in enumerate(shards):
        run(compose_cfg(overrides(data, "stages=[scan]", "shard.count=2", f"shard.index={i}")), shard)
    merged = tmp_path / "merged"
    run(compose_cfg(overrides(data, "stages=[merge]", f"merge.inputs=[{shards[0]},{shards[1]}]")), merged)
    expected = dissection(two_pass)
    for layer, sketch in scan_sketch(merged).items():
        np.testing.assert_array_equal(sketch, expected[f"{layer}/sketch"])
    with caplog.at_level(logging.INFO):
        run(compose_cfg(overrides(data, "stages=[dissect]")), merged)
    assert SINGLE in caplog.text
    assert_same(dissection(merged), expected)
    # shard 0's scan covers 7 of the 13 images, an unsharded dissection all of them: its own pass
    caplog.clear()
    with caplog.at_level(logging.INFO):
        run(compose_cfg(overrides(data, "stages=[dissect]")), shards[0])
    assert ("dissect: the scan's sketch is not used (it scanned 7 of the images, this dissection reads 13): "
            "the thresholds come from a pass of their own") in caplog.text
    assert_same(dissection(shards[0]), expected)


def test_the_sketch_is_decided_by_keys_the_scan_fingerprint_holds(data, tmp_path, caplog):
    seg = overrides(data)
    assert wants_sketch(compose_cfg(seg)) and not wants_sketch(compose_cfg(seg + ["scan.sketch=false"]))
    folder = ["dataset=folder", f"dataset.path={data / 'images'}"]
    assert not wants_sketch(compose_cfg(folder)) and wants_sketch(compose_cfg(folder + ["scan.sketch=true"]))
    with caplog.at_level(logging.INFO):
        run(compose_cfg(overrides(data, "stages=[scan,dissect]", "scan.sketch=false", "layers=[relu]")),
            tmp_path / "off")
    with h5py.File(tmp_path / "off" / "results.h5", "r") as f:
        assert "sketch" not in f["layers/relu/stats"] and "spectrum" in f["layers/relu/stats"]
    assert ("dissect: the scan's sketch is not used (it kept no activation sketch of relu (scan.sketch=true keeps "
            "one)): the thresholds come from a pass of their own") in caplog.text
