"""run.py started as a real process: the default job, Hydra habits, bad config."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import ROOT
from pipeline.store import read_strings
from test_pipeline import tiny_model


def run_py(*overrides, timeout=900):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_default_job_end_to_end(tmp_path):
    run_dir = tmp_path / "default"
    proc = run_py(f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(run_dir / "results.h5", "r") as f:
        paths = read_strings(f["images/path"])
        assert len(paths) >= 12 and f["images/ok"][()].all()
        assert f.attrs["weights_sha256"] == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
        layers = list(f["layers"])
        assert len(layers) >= 4
        for name in layers:
            g = f[f"layers/{name}"]
            c = g.attrs["shape"][2]
            assert g["topk/value"].shape == (c, 9)
            assert (g["topk/image"][()] >= 0).all()  # 16 photos fill every one of the 9 slots
            assert g["patches"].shape[:2] == (c, 9)
            # patches are real image content, not empty frames
            assert g["patches"][: min(c, 8)].mean() > 10
            assert (run_dir / "sheets" / f"{name}.png").stat().st_size > 10_000
    html = (run_dir / "index.html").read_text()
    assert all(f"sheets/{name}.png" in html for name in layers)


def test_cfg_job_and_help_print_without_running(tmp_path):
    proc = run_py("--cfg", "job", "topk=5", "model=keras_app", "model.name=VGG16")
    assert proc.returncode == 0
    assert "topk: 5" in proc.stdout and "name: VGG16" in proc.stdout


def test_help_is_one_page_naming_every_preset_stage_and_key():
    import re
    from pathlib import Path

    from omegaconf import OmegaConf

    from pipeline.stages import STAGES

    proc = run_py("--help")
    assert proc.returncode == 0
    text = proc.stdout
    assert len(text.splitlines()) <= 60 and "base_model" not in text and "top-9" in text
    for group in ("model", "dataset"):  # every preset file, and nothing but them
        presets = {p.stem for p in (Path(ROOT) / "conf" / group).glob("*.yaml")}
        assert set(re.findall(rf"^{group}=(\w+)", text, re.M)) == presets
    launchers = {p.stem for p in (Path(ROOT) / "conf/hydra/launcher").glob("*.yaml")}
    assert set(re.search(r"hydra/launcher=(\S+)", text)[1].split("|")) == launchers
    stages_part = text.split("== Stages")[1].split("==")[1]
    named = re.findall(r"^(\w+(?:, \w+)*)\s", stages_part, re.M)
    assert {s for line in named for s in line.split(", ")} == set(STAGES)
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        cfg = compose(config_name="config")
    keys_part = text.split("== Keys used most ==")[1].split("==")[0]
    for key in re.findall(r"(?<![\w.$])([a-z_]+(?:\.[a-z_]+)*)=", keys_part):
        if not key.startswith("hydra"):
            assert OmegaConf.select(cfg, key, default="missing") != "missing", key


def test_unknown_config_key_is_an_error():
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="config", overrides=["topkk=3"])
        with pytest.raises((ConfigCompositionException, ConfigKeyError)):
            compose(config_name="config", overrides=["model.colour=red"])
        cfg = compose(config_name="config", overrides=["layers=[a,b]", "topk=4"])
        assert list(cfg.layers) == ["a", "b"] and cfg.topk == 4


@pytest.fixture
def tiny_file(tmp_path):
    tiny_model(tmp_path / "tiny.keras")
    return tmp_path / "tiny.keras"


@pytest.mark.parametrize("case", ["unknown_layer", "missing_dataset", "unknown_app", "missing_model"])
def test_bad_config_is_one_line_nonzero_and_writes_nothing(tmp_path, tiny_file, photo_folder, case):
    run_dir = tmp_path / "never"
    args = {
        "unknown_layer": ["model=file", f"model.path={tiny_file}", "dataset=folder",
                          f"dataset.path={photo_folder}", "layers=[reluu2]"],
        "missing_dataset": ["model=file", f"model.path={tiny_file}", "dataset=folder",
                            f"dataset.path={tmp_path / 'nowhere'}"],
        "unknown_app": ["model=keras_app", "model.name=VGG61", "model.weights=null"],
        "missing_model": ["model=file", f"model.path={tmp_path / 'nope.keras'}"],
    }[case]
    proc = run_py(*args, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    expected = {"unknown_layer": "relu2", "missing_dataset": "dataset.path=", "unknown_app": "VGG16",
                "missing_model": "model.path="}[case]
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_weights_hash_mismatch_is_one_line_and_writes_nothing(tmp_path):
    wrong = tmp_path / "mobilenet_v2-b0353104.pth"
    wrong.write_bytes(b"not the torchvision weights" * 100)
    run_dir = tmp_path / "never"
    proc = run_py(f"model.weights_path={wrong}", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "sha256" in lines[0]
    assert not run_dir.exists()


def test_multirun_sweep_writes_one_directory_per_job(tmp_path, tiny_file, photo_folder):
    sweep = tmp_path / "sweep"
    proc = run_py("-m", "model=file", f"model.path={tiny_file}", "dataset=folder", f"dataset.path={photo_folder}",
                  "layers=[relu1],[relu2]", "stages=[scan]", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(sweep / "0" / "results.h5", "r") as f0, h5py.File(sweep / "1" / "results.h5", "r") as f1:
        assert list(f0["layers"]) == ["relu1"] and list(f1["layers"]) == ["relu2"]
        assert np.array_equal(f0["images/ok"][()], f1["images/ok"][()])


@pytest.mark.slow
def test_relative_paths_are_recorded_absolute(tmp_path, photo_folder, monkeypatch):
    # the README's `model.path=fmnist.keras`, given relative in one folder: a viewer started
    # from another folder must still find the model and the images
    from omegaconf import OmegaConf

    from pipeline.models.sources import load_model
    from pipeline.store import read_paths
    from pipeline.viewer.session import RunView

    work = tmp_path / "work"
    work.mkdir()
    tiny_model(work / "tiny.keras")
    os.rename(photo_folder, work / "photos")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "model=file", "model.path=tiny.keras",
                           "dataset=folder", "dataset.path=photos", "layers=[relu2]", "stages=[scan,crop]",
                           "hydra.run.dir=run"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    view = RunView(work / "run")
    cfg = OmegaConf.create(view.config)
    assert cfg.model.path == str(work / "tiny.keras") and cfg.dataset.path == str(work / "photos")
    assert load_model(cfg.model).model.name == "tiny"
    with h5py.File(work / "run" / "results.h5", "r") as f:
        paths = read_paths(f["images"])
    assert paths and all(os.path.isabs(p) and os.path.exists(p) for p in paths)


def test_report_cards_is_all_chosen_or_none():
    from pipeline.errors import PipelineError
    from pipeline.validate import card_mode, check_config

    assert [card_mode(v) for v in ("all", "chosen", "none", True, False)] == ["all", "chosen", "none", "all", "chosen"]
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        assert compose(config_name="config").report.cards == "all"
        check_config(compose(config_name="config", overrides=["report.cards=none"]))
        with pytest.raises(PipelineError) as err:
            check_config(compose(config_name="config", overrides=["report.cards=some"]))
    assert "\n" not in str(err.value) and "report.cards=some" in str(err.value) and "chosen" in str(err.value)
