"""Sharded scans through a real Hydra launcher merge to the unsharded result."""

import csv
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, save_image
from test_pipeline import compose_cfg, tiny_model
from pipeline.errors import PipelineError
from pipeline.runner import run
from pipeline.stages.scan import shard_ids


def test_shard_ids_are_disjoint_contiguous_and_cover_everything():
    parts = [shard_ids(103, 4, i) for i in range(4)]
    assert np.array_equal(np.concatenate(parts), np.arange(103))
    assert all(np.all(np.diff(p) == 1) for p in parts)
    with pytest.raises(PipelineError, match="shard.index"):
        shard_ids(10, 2, 2)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    data = tmp / "data"
    for i in range(61):
        save_image(data / f"k{i % 2}" / f"{i:03d}.png", rng.integers(0, 256, (30, 26, 3), dtype=np.uint8))
    # duplicates across the two halves: ties broken by image id must survive the merge
    save_image(data / "k1" / "999_dup.png", np.asarray(rng.integers(0, 256, (30, 26, 3), dtype=np.uint8)))
    save_image(data / "k0" / "000a_dup.png", np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(data / "k1" / "999_dup.png")))
    (data / "k0" / "050_broken.jpg").write_bytes(b"\xff\xd8 broken")
    tiny_model(tmp / "tiny.keras")
    common = ["model=file", f"model.path={tmp / 'tiny.keras'}", "dataset=folder", f"dataset.path={data}",
              "layers=[relu1,relu2]", "topk=5", "scan.bottomk=2", "batch_size=8"]
    run(compose_cfg(common + ["stages=[scan]"]), tmp / "single")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    sweep = tmp / "sweep"
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=shards_local", *common,
                           "shard.count=2", "shard.index=0,1", "stages=[scan]", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = tmp / "merged"
    proc = subprocess.run([sys.executable, "run.py", *common, "stages=[merge,crop]", f"merge.inputs=[{sweep}/*]",
                           f"hydra.run.dir={merged}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, sweep, common


@pytest.mark.slow
def test_joblib_shards_merge_to_the_unsharded_tables(sharded):
    tmp, sweep, _ = sharded
    with h5py.File(tmp / "single" / "results.h5", "r") as a, h5py.File(tmp / "merged" / "results.h5", "r") as b:
        for shard in ("0", "1"):
            with h5py.File(sweep / shard / "results.h5", "r") as s:
                assert 0 < s["images/scanned"][()].sum() < len(s["images/path"])
        for name in ("images/ok", "images/scanned"):
            assert np.array_equal(a[name][()], b[name][()])
        assert list(a["images/error"].asstr()[()]) == list(b["images/error"].asstr()[()])
        for layer in ("relu1", "relu2"):
            for table in ("topk", "bottomk"):
                for key in ("value", "image", "y", "x", "box"):
                    assert np.array_equal(a[f"layers/{layer}/{table}/{key}"][()],
                                          b[f"layers/{layer}/{table}/{key}"][()]), (layer, table, key)
            for key in ("mean", "zero_fraction", "max"):
                np.testing.assert_allclose(a[f"layers/{layer}/stats/{key}"][()],
                                           b[f"layers/{layer}/stats/{key}"][()], rtol=1e-6)
            assert np.array_equal(a[f"layers/{layer}/stats/spectrum"][()], b[f"layers/{layer}/stats/spectrum"][()])
        assert b["layers/relu1/patches"].shape[:2] == (4, 5)  # crop ran on the merged tables


@pytest.mark.slow
def test_sweep_summary_lists_and_links_every_job(sharded):
    _, sweep, _ = sharded
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["job"] for r in rows] == ["0", "1"]
    assert all(r["status"] == "done" and "shard.index=" in r["overrides"] for r in rows)
    assert sum(int(r["images_scanned"]) for r in rows) == 63  # 64 files, one unreadable
    assert sum(int(r["images_skipped"]) for r in rows) == 1
    html = (sweep / "summary.html").read_text()
    for r in rows:
        assert f'href="{r["results"]}"' in html and (sweep / r["results"]).exists()


def test_slurm_launcher_config_composes():
    proc = subprocess.run([sys.executable, "run.py", "hydra/launcher=shards_slurm", "--cfg", "hydra"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "submitit_launcher.SlurmLauncher" in proc.stdout and "array_parallelism: 32" in proc.stdout


@pytest.mark.slow
def test_merge_refuses_shards_that_do_not_belong_together(sharded, tmp_path):
    import keras

    tmp, sweep, common = sharded
    merge = common + ["stages=[merge]"]
    # the same shard twice
    with pytest.raises(PipelineError, match="scanned images another input scanned too"):
        run(compose_cfg(merge + [f"merge.inputs=[{sweep}/0,{sweep}/0]"]), tmp_path / "twice")
    # a shard of another topk than the merge's config
    other_topk = tmp_path / "topk3"
    run(compose_cfg(common + ["topk=3", "shard.count=2", "shard.index=1", "stages=[scan]"]), other_topk)
    with pytest.raises(PipelineError, match=f"shard {other_topk} scanned other layers, topk"):
        run(compose_cfg(merge + [f"merge.inputs=[{sweep}/0,{other_topk}]"]), tmp_path / "mixed_topk")
    # a shard of the same config whose model file changed in between
    model_file = tmp / "tiny.keras"
    original = model_file.read_bytes()
    model = keras.models.load_model(model_file, compile=False)
    model.set_weights([w + 0.5 for w in model.get_weights()])
    model.save(model_file)
    try:
        other_weights = tmp_path / "weights"
        run(compose_cfg(common + ["shard.count=2", "shard.index=1", "stages=[scan]"]), other_weights)
    finally:
        model_file.write_bytes(original)
    with pytest.raises(PipelineError, match=f"shard {other_weights} has another model weights"):
        run(compose_cfg(merge + [f"merge.inputs=[{sweep}/0,{other_weights}]"]), tmp_path / "mixed_weights")
    assert not (tmp_path / "mixed_weights" / "parts" / "scan.h5").exists()  # a refused merge writes no results
