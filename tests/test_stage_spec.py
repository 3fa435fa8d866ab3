"""Each stage declares itself once (`STAGE`, pipeline.stage_spec.Stage) and the runner reads
nothing else: what a declaration resolves to for a config, and the one error every stage
raises when none of its images could be read."""

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, save_image
from pipeline.errors import PipelineError
from pipeline.per_image import none_read
from pipeline.runner import run
from pipeline.stage_spec import Stage
from pipeline.stages import STAGES
from test_panels import tiny_model
from test_pipeline import compose_cfg


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_is_declared_by_its_stage_value_alone(stage):
    module = importlib.import_module(f"pipeline.stages.{stage}")
    assert isinstance(module.STAGE, Stage)
    for old in ("KEYS", "needs", "reads", "makes", "DEPENDS"):  # the names the runner used to probe
        assert not hasattr(module, old), f"pipeline/stages/{stage}.py still has {old}"
    assert module.STAGE.part in (None, f"{stage}.h5")  # the store records a stage's part by this name


def stages_imported(source: str) -> set[str]:
    """The stage modules that the stage module `source` imports, at its top or inside a
    function, absolutely or relatively."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "pipeline.stages" if node.level == 1 else "pipeline" if node.level == 2 else node.module or ""
            if node.level and node.module:
                base = f"{base}.{node.module}"
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["pipeline", "stages"] and len(parts) > 2 and parts[2] in STAGES:
                found.add(parts[2])
    return found


def test_the_import_check_sees_every_form_of_a_stage_import():
    assert stages_imported("from pipeline.stages.scan import x\nimport pipeline.stages.crop") == {"scan", "crop"}
    assert stages_imported("def f():\n    from pipeline.stages import dissect, RUN_KEYS") == {"dissect"}
    assert stages_imported("from .merge import y\nfrom . import cam") == {"merge", "cam"}
    assert stages_imported("from pipeline.scan_io import shard_ids\nfrom pipeline.stages import RUN_KEYS") == set()


def test_no_stage_imports_another():
    """Stages talk through results.h5 only; what two of them share is an engine in pipeline/."""
    found = {}
    for path in sorted((Path(ROOT) / "pipeline" / "stages").glob("*.py")):
        if path.stem != "__init__":
            found[path.stem] = stages_imported(path.read_text()) - {path.stem}
    assert len(found) == len(STAGES)
    assert {stage: sorted(names) for stage, names in found.items() if names} == {}


def test_a_declaration_resolves_what_a_config_needs_reads_makes_and_resumes_with():
    cfg = compose_cfg(["stages=[scan]", "batch_size=6", "ablation.batch_size=4"])
    cam = importlib.import_module("pipeline.stages.cam").STAGE
    ablation = importlib.import_module("pipeline.stages.ablation").STAGE
    assert cam.needed(cfg) == () and cam.resume_settings(cfg) == {"batch_size": 6}
    assert ablation.resume_settings(cfg) == {"batch_size": 4}  # its own batches, not the run's
    assert cam.needed(compose_cfg(["cam.draw={layer: relu1, channels: [0], k: 1}"])) == ("scan",)
    assert ablation.needed(compose_cfg(["ablation.units=[0,1]"])) == ()
    assert ablation.needed(compose_cfg(["ablation.units=2"])) == ("scan",)
    merge = importlib.import_module("pipeline.stages.merge").STAGE
    assert merge.made(cfg) == ("scan",) and merge.needed(cfg) == ()

    spec = Stage(keys=("model",), needs=lambda c: ("scan",), reads=("train", "crop"))
    snapshot = compose_cfg(["model=snapshot"])  # this run's own snapshot: its train stage too
    assert spec.needed(snapshot) == ("scan", "train") and spec.needed(cfg) == ("scan",)
    assert spec.depends_on(cfg) == ("crop", "scan", "train") and spec.resume_settings(cfg) == {}
    assert Stage(needs=("scan",)).needed(snapshot) == ("scan",)  # no model key: the snapshot is not its input


def test_none_read_names_the_first_reason_and_the_key_to_change():
    err = none_read("occlusion", "occlusion.images", {7: "empty file (0 bytes)", 3: "truncated"},
                    [f"p{i}.png" for i in range(8)])
    assert str(err) == ("occlusion: none of the chosen images could be read (e.g. p3.png: truncated): "
                        "choose others with occlusion.images")
    err = none_read("scan", "dataset.path", {0: "not an image"}, ["a.png"], "1 images", listed_in="results.h5")
    assert str(err) == ("scan: none of the 1 images could be read (e.g. a.png: not an image): check dataset.path; "
                        "images/error in results.h5 lists each reason")


def test_a_per_image_stage_whose_chosen_images_are_unreadable_says_which_key_to_change(tmp_path):
    tiny_model(tmp_path / "tiny.keras")
    save_image(tmp_path / "photos" / "a.png", np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "photos" / "b.png").write_bytes(b"")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "model.preprocess=unit",
                       "dataset=folder", f"dataset.path={tmp_path / 'photos'}", "stages=[occlusion]",
                       "occlusion.images=[1]", "occlusion.size=10"])
    with pytest.raises(PipelineError, match=r"^occlusion: none of the chosen images could be read \(e\.g\. .*b\.png: "
                                            r"empty file \(0 bytes\)\): choose others with occlusion\.images$"):
        run(cfg, tmp_path / "run")
