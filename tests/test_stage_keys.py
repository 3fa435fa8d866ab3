"""Every stage reads only the config keys it declares (its STAGE.keys, and the run keys any stage
may read): a key read but not declared would change results without changing the
stage's fingerprint, so a rerun would skip work it must redo.

The stages run through the real runner on a real composed config; every key lookup
on that config (DictConfig._get_node, which attribute, item, `get`, `in`, select and
to_container all go through) is recorded against the stage whose `run` is on the stack.
"""

import importlib

import pytest
from omegaconf import DictConfig, OmegaConf

import pipeline.store
from conftest import save_image
from pipeline.runner import run
from pipeline.stages import RUN_KEYS
from test_panels import tiny_model
from test_pipeline import compose_cfg

STAGES = ("scan", "crop", "panels", "filters", "cam", "occlusion", "activations", "ablation", "randomization",
          "correspondence", "invariance")
# on a segmentation dataset: dissect, and merge of dissect shards, whose dissection tables
# (pipeline.dissect_tables.merge_shards) are fingerprinted with the dissect stage's keys
SEGMENTATION_STAGES = ("dissect", "merge")
MERGED_DISSECTION = "merge:dissect"
TRAINING_STAGES = ("train", "evolution")
# export and report declare no keys (STAGE.keys == ()): they always run, from results.h5 only


class KeyReads:
    """Full config keys read while a stage's `run` is on the stack, per stage."""

    def __init__(self):
        self.stage = None
        self.reads: dict[str, set[str]] = {}

    def install(self, monkeypatch, stages) -> None:
        import importlib

        original = DictConfig._get_node
        log = self

        def get_node(node, key, *args, **kwargs):
            stage = log.stage
            if stage is not None and isinstance(key, str):
                log.stage = None  # _get_full_key looks nodes up itself
                try:
                    log.reads.setdefault(stage, set()).add(node._get_full_key(key))
                finally:
                    log.stage = stage
            return original(node, key, *args, **kwargs)

        monkeypatch.setattr(DictConfig, "_get_node", get_node)
        for stage in stages:
            module = importlib.import_module(f"pipeline.stages.{stage}")
            monkeypatch.setattr(module, "run", self._watched(stage, module.run))
        # the run record keeps the whole config as text: bookkeeping, not a result's input
        monkeypatch.setattr(pipeline.store, "write_run_attrs", self._unwatched(pipeline.store.write_run_attrs))
        # so does the merge's copy of the run record (the config as text)
        monkeypatch.setattr(OmegaConf, "to_yaml", self._unwatched(OmegaConf.to_yaml))
        tables = importlib.import_module("pipeline.dissect_tables")
        monkeypatch.setattr(tables, "merge_shards", self._watched(MERGED_DISSECTION, tables.merge_shards))

    def _watched(self, stage, run_stage):
        def watched(*args, **kwargs):
            outer, self.stage = self.stage, stage
            try:
                return run_stage(*args, **kwargs)
            finally:
                self.stage = outer
        return watched

    def _unwatched(self, function):
        def unwatched(*args, **kwargs):
            stage, self.stage = self.stage, None
            try:
                return function(*args, **kwargs)
            finally:
                self.stage = stage
        return unwatched


def undeclared(reads: set[str], keys) -> list[str]:
    """The keys in `reads` that are neither under a declared key nor a section above one."""
    declared = tuple(keys) + RUN_KEYS
    return sorted(k for k in reads if not any(k == d or k.startswith(d + ".") or d.startswith(k + ".")
                                              for d in declared))


def declared_keys(stage: str, cfg) -> tuple[str, ...]:
    """The keys a stage may read: its own, and those of the results it makes besides its own
    (merge writes a scan, recorded under the scan's keys)."""
    spec = importlib.import_module(f"pipeline.stages.{stage}").STAGE
    return spec.keys + tuple(k for made in spec.made(cfg) for k in importlib.import_module(
        f"pipeline.stages.{made}").STAGE.keys)


def test_undeclared_finds_reads_outside_the_declaration():
    assert undeclared({"filters", "filters.steps", "invariance.fill", "topk", "checkpoint.seconds"},
                      ("filters", "invariance.fill")) == ["topk"]
    assert undeclared({"invariance", "invariance.steps"}, ("invariance.fill",)) == ["invariance.steps"]


@pytest.fixture(scope="module")
def key_reads(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    tiny_model(root / "tiny.keras")
    import numpy as np

    rng = np.random.default_rng(3)
    for i in range(4):
        save_image(root / "photos" / f"{'ab'[i % 2]}" / f"img{i}.png", rng.integers(0, 256, (20, 20, 3), np.uint8))
    cfg = compose_cfg(["model=file", f"model.path={root / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
                       f"dataset.path={root / 'photos'}", "layers=[relu1,conv2]", "topk=2", "batch_size=2",
                       f"stages=[{','.join(STAGES)}]", "crop.max_size=0", "panels.methods=[deconv]",
                       "filters.steps=2", "filters.size=null", "filters.channels=2", "filters.batch_size=2",
                       "filters.toolbox=false", "cam.methods=[gradcam]", "cam.draw=1", "occlusion.images=1",
                       "occlusion.size=10", "occlusion.stride=10", "activations.images=1", "activations.grid=4",
                       "ablation.units=2", "randomization.images=1", "randomization.steps=2",
                       "correspondence.images=2", "correspondence.random=1", "invariance.images=1",
                       "invariance.steps=2"])
    log = KeyReads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        log.install(monkeypatch, STAGES)
        run(cfg, root / "run")
    return log.reads


@pytest.fixture(scope="module")
def segmentation_reads(tmp_path_factory):
    """Two dissect shards on a segmentation dataset, then their merge."""
    from test_dissect import colour_dataset, colour_model, seg_overrides

    root = tmp_path_factory.mktemp("seg_keys")
    colour_model(root / "colour.keras")
    colour_dataset(root, n=4)
    log = KeyReads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        log.install(monkeypatch, SEGMENTATION_STAGES)
        for i in range(2):
            run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[scan,dissect]", "shard.count=2",
                                          f"shard.index={i}")), root / f"shard{i}")
        run(compose_cfg(seg_overrides(root, root / "colour.keras", "stages=[merge]",
                                      f"merge.inputs=[{root / 'shard0'},{root / 'shard1'}]")), root / "merged")
    return log.reads


@pytest.fixture(scope="module")
def training_reads(tmp_path_factory):
    """train on a small labelled folder, then evolution over this run's snapshots."""
    import numpy as np

    root = tmp_path_factory.mktemp("train_keys")
    rng = np.random.default_rng(4)
    for i in range(12):
        save_image(root / "photos" / f"class_{i % 2}" / f"{i:02d}.png", rng.integers(0, 256, (16, 16, 3), np.uint8))
    cfg = compose_cfg(["dataset=folder", f"dataset.path={root / 'photos'}", "stages=[train,evolution]",
                       "model=snapshot", "train.epochs=2", "train.snapshots=[1]", "train.input_size=16",
                       "train.filters=[4,4,4,4]", "train.dense=8", "topk=2", "batch_size=6", "crop.max_size=0"])
    log = KeyReads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        log.install(monkeypatch, TRAINING_STAGES)
        run(cfg, root / "run")
    return log.reads


def test_the_recorder_sees_each_stage_read_its_own_keys(key_reads):
    assert set(key_reads) == set(STAGES)
    assert {"topk", "layers", "dataset.path"} <= key_reads["scan"]
    assert {"filters.steps", "filters.channels"} <= key_reads["filters"]
    assert "occlusion.size" in key_reads["occlusion"] and "panels.methods" in key_reads["panels"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_reads_only_the_keys_it_declares(key_reads, stage):
    import importlib

    module = importlib.import_module(f"pipeline.stages.{stage}")
    assert undeclared(key_reads[stage], module.STAGE.keys) == [], f"add them to the keys of {stage}'s STAGE"


@pytest.mark.parametrize("stage", SEGMENTATION_STAGES + (MERGED_DISSECTION,))
def test_dissect_and_its_merge_read_only_their_keys(segmentation_reads, stage):
    from pipeline.dissect_tables import DISSECT_KEYS

    assert {"dissect.quantile", "dataset.masks"} <= segmentation_reads["dissect"]
    assert {"merge.inputs", "dissect.min_iou"} <= segmentation_reads["merge"] | segmentation_reads[MERGED_DISSECTION]
    keys = DISSECT_KEYS if stage == MERGED_DISSECTION else declared_keys(stage, compose_cfg([]))
    assert undeclared(segmentation_reads[stage], keys) == [], f"add them to the keys of {stage}'s STAGE"


@pytest.mark.parametrize("stage", TRAINING_STAGES)
def test_train_and_evolution_read_only_their_keys(training_reads, stage):
    assert "train.epochs" in training_reads["train"] and "evolution.channels" in training_reads["evolution"]
    keys = importlib.import_module(f"pipeline.stages.{stage}").STAGE.keys
    assert undeclared(training_reads[stage], keys) == [], f"add them to the keys of {stage}'s STAGE"
