"""Hostile input: endless and huge files, names that look like markup, bad numbers,
unreadable datasets, odd list files and folders; each one line or recorded, nothing lost."""

import os
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import ROOT, save_image
from test_pipeline import tiny_model
from pipeline.datasets import BatchStream, list_images
from pipeline.preprocess import Preprocessing
from pipeline.store import read_strings

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def run_py(*overrides, timeout=600):
    return subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def png_claiming(path, width, height):
    """A small PNG file whose header says width x height (an image bomb for any decoder)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\x00" * 3 * 16
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(row * 16)) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_endless_huge_and_bomb_files_are_refused_before_any_byte_is_decoded(tmp_path):
    good = save_image(tmp_path / "good.png", np.full((30, 30, 3), 120, np.uint8))
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB, no byte on disk
    png_claiming(tmp_path / "bomb.png", 40000, 40000)
    big_jpeg = save_image(tmp_path / "photo.jpg", np.full((4000, 6000, 3), 60, np.uint8), quality=80)
    (tmp_path / "list.txt").write_text(f"{good}\n/dev/zero\n{sparse}\n{tmp_path / 'bomb.png'}\n{big_jpeg}\n")
    tiny_model(tmp_path / "tiny.keras")
    # a parent of its own, so that the peak RSS measured is run.py's alone
    measure = ("import resource, subprocess, sys; done = subprocess.run([sys.executable, 'run.py'] + sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    proc = subprocess.run([sys.executable, "-c", measure, "model=file", f"model.path={tmp_path / 'tiny.keras'}",
                           "dataset=filelist", f"dataset.path={tmp_path / 'list.txt'}", "layers=[relu1]",
                           "stages=[scan]", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.split("PEAK")[-1])  # KiB
    assert peak < 2 * 2**20, f"peak RSS {peak / 2**20:.1f} GiB"  # a 40000x40000 decode alone needs 4.5 GiB
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        ok = f["images/ok"][()].tolist()
        errors = read_strings(f["images/error"])
    assert ok == [True, False, False, False, True]
    assert "not a regular file" in errors[1]
    assert "above dataset.max_mb" in errors[2] and "8192 MiB" in errors[2]
    assert "40000x40000" in errors[3] and "dataset.max_pixels" in errors[3]


def test_pillow_path_has_the_same_bounds(tmp_path):
    png_claiming(tmp_path / "bomb.png", 30000, 20000)
    table = list_images(OmegaConf.create(dict(kind="folder", path=str(tmp_path), limit=None, max_pixels=1000)))
    stream = BatchStream(table, Preprocessing(16, 16), 4)
    assert list(stream) == []
    assert "30000x20000" in stream.errors[0] and "max_pixels=1000" in stream.errors[0]


def test_names_that_look_like_math_are_drawn_literally(tmp_path):
    from test_pipeline import compose_cfg
    from pipeline.runner import run

    rng = np.random.default_rng(4)
    for name in ("$\\undefinedmacro$.png", "a^b_{c}%.png", "plain.png", "$x$ & <b>.png"):
        save_image(tmp_path / "data" / name, rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                       f"dataset.path={tmp_path / 'data'}", "layers=[relu1,relu2]",
                       "stages=[scan,crop,cam,occlusion,report]", "cam.methods=[gradcam]", "occlusion.images=4",
                       "occlusion.size=8", "occlusion.stride=8", "report.per_image=4"])
    run(cfg, tmp_path / "run")
    assert len(list((tmp_path / "run" / "cam").glob("overlays_*.png"))) == 1
    assert len(list((tmp_path / "run" / "sheets" / "images").glob("image_*.png"))) == 4
    html = (tmp_path / "run" / "index.html").read_text()
    assert "image #0: $\\undefinedmacro$.png" in html and "$x$ &amp; &lt;b&gt;.png" in html and "<b>.png" not in html


BAD_NUMBERS = [("topk=0", "topk=0: use a whole number >= 1"), ("topk=-3", "topk=-3"),
               ("scan.bottomk=-2", "scan.bottomk=-2: use a whole number >= 0"), ("batch_size=0", "batch_size=0"),
               ("checkpoint.seconds=0", "checkpoint.seconds=0.0: use a number > 0"),
               ("checkpoint.batches=0", "checkpoint.batches=0"), ("dataset.limit=-1", "dataset.limit=-1"),
               ("+foo=1", "foo is not a config key"), ("+scan.chekpoint=3", "scan.chekpoint is not a config key"),
               ("stages=[]", "stages=[] runs nothing"), ("occlusion.fill=300", "occlusion.fill=300"),
               ("cam.alpha=2", "cam.alpha=2"), ("report.units=[1,-4]", "report.units=[1, -4]"),
               ("shard.index=3", "shard.index=3 is not in 0..0")]


@pytest.mark.slow
@pytest.mark.parametrize("override,message", BAD_NUMBERS, ids=[o for o, _ in BAD_NUMBERS])
def test_a_bad_number_is_one_line_exit_2_and_no_run_directory(tmp_path, override, message):
    run_dir = tmp_path / "never"
    proc = run_py(override, f"hydra.run.dir={run_dir}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not run_dir.exists()


def test_a_dataset_with_no_readable_image_is_an_error_that_keeps_the_reasons(tmp_path):
    from test_pipeline import compose_cfg
    from pipeline.errors import PipelineError
    from pipeline.runner import run

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_text("not an image")
    (tmp_path / "data" / "b.jpg").write_bytes(b"")
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                       f"dataset.path={tmp_path / 'data'}", "layers=[relu1]"])
    with pytest.raises(PipelineError, match="none of the 2 images could be read"):
        run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        assert read_strings(f["images/error"]) == ["not an image file (format not recognised)", "empty file (0 bytes)"]
    assert not (tmp_path / "run" / "index.html").exists()


def test_filelists_take_word_labels_spaces_and_name_bad_lines(tmp_path):
    (tmp_path / "my photo.png").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# comment\nchelsea.png cat\ncoffee.png cup\nmy photo.png\n"
                                       "other photo.png dog\n\n/abs/x.png cat\n")
    table = list_images(OmegaConf.create(dict(kind="filelist", path=str(tmp_path / "list.txt"), limit=None)))
    assert table.class_names == ["cat", "cup", "dog"]
    assert table.labels.tolist() == [0, 1, -1, 2, 0]
    assert table.paths == [str(tmp_path / "chelsea.png"), str(tmp_path / "coffee.png"), str(tmp_path / "my photo.png"),
                           str(tmp_path / "other photo.png"), "/abs/x.png"]
    (tmp_path / "ints.txt").write_text("a.png 3\nb.png\n")
    table = list_images(OmegaConf.create(dict(kind="filelist", path=str(tmp_path / "ints.txt"), limit=None)))
    assert table.labels.tolist() == [3, -1] and table.class_names == []
    (tmp_path / "nul.txt").write_bytes(b"a.png 1\nb\x00.png 2\n")
    from pipeline.errors import PipelineError
    with pytest.raises(PipelineError, match="line 2"):
        list_images(OmegaConf.create(dict(kind="filelist", path=str(tmp_path / "nul.txt"), limit=None)))


def test_folders_follow_symlinked_class_folders_once_and_refuse_system_roots(tmp_path):
    from pipeline.errors import PipelineError

    save_image(tmp_path / "elsewhere" / "cats" / "c1.png", np.zeros((4, 4, 3), np.uint8))
    save_image(tmp_path / "data" / "dogs" / "d1.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "data" / "cats").symlink_to(tmp_path / "elsewhere" / "cats", target_is_directory=True)
    (tmp_path / "data" / "dogs" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    table = list_images(OmegaConf.create(dict(kind="folder", path=str(tmp_path / "data"), limit=None)))
    assert [p.rsplit("/", 2)[-2:] for p in table.paths] == [["cats", "c1.png"], ["dogs", "d1.png"]]
    assert table.class_names == ["cats", "dogs"] and table.labels.tolist() == [0, 1]
    (tmp_path / "root").symlink_to("/", target_is_directory=True)
    with pytest.raises(PipelineError, match="system folder /"):
        list_images(OmegaConf.create(dict(kind="folder", path=str(tmp_path / "root"), limit=None)))


def test_layer_names_never_leave_the_run_directory(tmp_path):
    import keras

    from test_pipeline import compose_cfg
    from pipeline.runner import run

    x = keras.Input((16, 16, 3))
    y = keras.layers.ReLU(name="..")(keras.layers.Conv2D(3, 3, name="a<b(c)")(x))
    out = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(y))
    keras.Model(x, out).save(tmp_path / "odd.keras")
    rng = np.random.default_rng(2)
    for i in range(4):
        save_image(tmp_path / "data" / f"{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    run_dir = tmp_path / "deep" / "run"
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'odd.keras'}", "dataset=folder",
                       f"dataset.path={tmp_path / 'data'}", "layers=['a<b(c)','..']", "topk=16",
                       "stages=[scan,crop,report,export]", "report.pdf=false"])
    run(cfg, run_dir)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["run"]  # nothing written beside it
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert sorted(f["layers"]) == ["_..", "a_b_c_"]
        assert f["layers/_.."].attrs["name"] == ".." and f["layers/a_b_c_"].attrs["keras_name"] == "a<b(c)"
        assert f["layers/_../topk/value"].shape == (3, 16)
    assert (run_dir / "sheets" / "_...png").exists() and (run_dir / "toolbox" / "max_im" / "_..").is_dir()
    card = (run_dir / "report" / "cards" / "_..").iterdir().__next__()
    assert card.suffix == ".png"
