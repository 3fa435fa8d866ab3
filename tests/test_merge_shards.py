"""Shard scans made and merged in-process on a tiny model: the fast twin of test_shards'
launcher sweeps. Merged sums, maxima and spectra equal the single scan's; shards that
overlap or do not belong together are refused with one line and write nothing."""

import shutil

import h5py
import keras
import numpy as np
import pytest

from conftest import save_image
from pipeline.errors import PipelineError
from pipeline.runner import run
from test_pipeline import compose_cfg, tiny_model
from test_shards import assert_merge_equals_single


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge")
    rng = np.random.default_rng(8)
    for i in range(13):  # 7 + 6 images in two shards; a duplicate ties across them
        save_image(tmp / "data" / f"k{i % 2}" / f"{i:02d}.png", rng.integers(0, 256, (26, 22, 3), np.uint8))
    (tmp / "data" / "k0" / "99_dup.png").write_bytes((tmp / "data" / "k0" / "00.png").read_bytes())
    tiny_model(tmp / "tiny.keras")
    common = ["model=file", f"model.path={tmp / 'tiny.keras'}", "dataset=folder", f"dataset.path={tmp / 'data'}",
              "layers=[relu1,relu2]", "topk=3", "scan.bottomk=2", "batch_size=4"]
    run(compose_cfg(common + ["stages=[scan]"]), tmp / "single")
    for i in (0, 1):
        run(compose_cfg(common + ["shard.count=2", f"shard.index={i}", "stages=[scan]"]), tmp / "sweep" / str(i))
    return tmp, common


def test_in_process_shards_merge_to_the_single_scan(shards, tmp_path):
    tmp, common = shards
    sweep = tmp / "sweep"
    run(compose_cfg(common + ["stages=[merge]", f"merge.inputs=[{sweep}/0,{sweep}/1]"]), tmp_path / "merged")
    assert_merge_equals_single(tmp / "single", tmp_path / "merged", sweep)
    with h5py.File(tmp_path / "merged" / "results.h5", "r") as f:  # sums that add up, not one shard's
        assert f["layers/relu1/stats/spectrum"][()].sum() > 0


def test_merge_refuses_shards_that_do_not_belong_together(shards, tmp_path):
    tmp, common = shards
    sweep = tmp / "sweep"
    merge = common + ["stages=[merge]"]
    # the same shard twice, and a copy of a shard beside its original (the images overlap,
    # the folders differ)
    with pytest.raises(PipelineError, match="scanned images another input scanned too"):
        run(compose_cfg(merge + [f"merge.inputs=[{sweep}/0,{sweep}/0]"]), tmp_path / "twice")
    shutil.copytree(sweep / "1", tmp_path / "copy")
    with pytest.raises(PipelineError, match="scanned images another input scanned too"):
        run(compose_cfg(merge + [f"merge.inputs=[{sweep}/0,{sweep}/1,{tmp_path / 'copy'}]"]), tmp_path / "overlap")
    # a shard of another topk than the merge's config
    other_topk = tmp_path / "topk2"
    run(compose_cfg(common + ["topk=2", "shard.count=2", "shard.index=1", "stages=[scan]"]), other_topk)
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
    for refused in ("twice", "overlap", "mixed_topk", "mixed_weights"):  # a refused merge writes no results
        assert not (tmp_path / refused / "parts" / "scan.h5").exists()
