"""Hostile input: endless and huge files, names that look like markup, bad numbers,
unreadable datasets, odd list files and folders; each one line or recorded, nothing lost."""

import contextlib
import gzip
import os
import struct
import subprocess
import sys
import zipfile
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


def run_py_peak(*overrides, timeout=300):
    """run.py under a parent of its own, so that the peak RSS measured (KiB) is run.py's alone."""
    measure = ("import resource, subprocess, sys; done = subprocess.run([sys.executable, 'run.py'] + sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")
    proc = subprocess.run([sys.executable, "-c", measure, *overrides], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc, int(proc.stdout.split("PEAK")[-1])


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
    proc, peak = run_py_peak("model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=filelist",
                             f"dataset.path={tmp_path / 'list.txt'}", "layers=[relu1]", "stages=[scan]",
                             f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
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


def test_max_pixels_is_exact_on_the_tensorflow_path_and_defaults_to_50_megapixels(tmp_path):
    """The fast twin of the bomb test above: 900 pixels pass max_pixels=900, 930 do not,
    in TensorFlow's stream (decoded or dropped) and in Pillow's retry."""
    save_image(tmp_path / "a_fits.png", np.full((30, 30, 3), 90, np.uint8))
    save_image(tmp_path / "b_over.png", np.full((31, 30, 3), 90, np.uint8))
    table = list_images(OmegaConf.create(dict(kind="folder", path=str(tmp_path), limit=None, max_pixels=900)))
    stream = BatchStream(table, Preprocessing(16, 16), 4)
    assert [int(i) for ids, _ in stream.main() for i in ids] == [0] and stream.dropped == [1]
    assert list(stream.fallback()) == [] and "30x31" in stream.errors[1] and "max_pixels=900" in stream.errors[1]
    png_claiming(tmp_path / "c_bomb.png", 10000, 5001)  # 50,010,000 pixels, just over the default
    table = list_images(OmegaConf.create(dict(kind="folder", path=str(tmp_path), limit=None)))
    stream = BatchStream(table, Preprocessing(16, 16), 4)
    assert [int(i) for ids, _ in stream.main() for i in ids] == [0, 1] and stream.dropped == [2]
    list(stream.fallback())
    assert "10000x5001" in stream.errors[2] and "max_pixels=50000000" in stream.errors[2]


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
               ("shard.index=3", "shard.index=3 is not in 0..0"),
               ("filters.batch=4", "filters.batch is now filters.batch_size")]


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
                       "stages=[scan,crop,cam,filters,report,export]", "report.pdf=false",
                       # the name TensorFlow refused, as the cam target and a filters layer too
                       "cam.layer='a<b(c)'", "cam.methods=[gradcam]", "cam.draw=1", "filters.channels=1",
                       "filters.steps=2", "filters.size=null", "filters.rivals=false", "filters.toolbox=false"])
    run(cfg, run_dir)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["run"]  # nothing written beside it
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert sorted(f["layers"]) == ["_..", "a_b_c_"]
        assert f["layers/_.."].attrs["name"] == ".." and f["layers/a_b_c_"].attrs["keras_name"] == "a<b(c)"
        assert f["layers/_../topk/value"].shape == (3, 16)
        assert f["cam"].attrs["layer"] == "a_b_c_"
        assert f["filters/a_b_c_"].attrs["name"] == "a_b_c_" and f["filters/a_b_c_/patterns"].shape[0] == 1
    assert (run_dir / "sheets" / "_...png").exists() and (run_dir / "toolbox" / "max_im" / "_..").is_dir()
    card = (run_dir / "report" / "cards" / "_..").iterdir().__next__()
    assert card.suffix == ".jpg"


def gzip_idx_bomb(path, images: int) -> None:
    """A gzipped IDX file of `images` 28x28 zero images, a thousand times smaller than what
    it inflates to: one 16 MiB member of zeros, compressed once, repeated."""
    block = 16 * 2**20
    member = gzip.compress(bytes(block), compresslevel=9)
    total = images * 784
    with open(path, "wb") as f:  # gzip readers read concatenated members as one stream
        f.write(gzip.compress(struct.pack(">BBBBIII", 0, 0, 0x08, 3, images, 28, 28)))
        for _ in range(total // block):
            f.write(member)
        f.write(gzip.compress(bytes(total % block)))


@pytest.mark.slow
def test_a_gzip_bomb_idx_is_refused_from_its_header_and_a_truncated_one_is_one_line(tmp_path):
    (tmp_path / "bomb").mkdir()
    gzip_idx_bomb(tmp_path / "bomb" / "train-images-idx3-ubyte.gz", 2**30 // 784)  # 1 MB that inflates to 1 GiB
    assert (tmp_path / "bomb" / "train-images-idx3-ubyte.gz").stat().st_size < 2 * 2**20
    tiny_model(tmp_path / "tiny.keras")
    model = ["model=file", f"model.path={tmp_path / 'tiny.keras'}", "layers=[relu1]", "stages=[scan]",
             "dataset=idx", "dataset.limit=4"]
    proc, peak = run_py_peak(*model, f"dataset.path={tmp_path / 'bomb'}", f"hydra.run.dir={tmp_path / 'run'}")
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "inflates to 1024 MiB" in lines[0] and "dataset.max_mb=512" in lines[0]
    assert peak < 2**20, f"peak RSS {peak / 2**10:.0f} MiB"  # inflating it first took 2.7 GB
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()

    (tmp_path / "cut-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03\0\0")  # 6 bytes of a header
    proc = run_py(*model, f"dataset.path={tmp_path / 'cut-images-idx3-ubyte'}", f"hydra.run.dir={tmp_path / 'run'}")
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "is truncated" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_gzip_idx_is_read_within_its_header_and_the_limit(tmp_path):
    from pipeline.datasets import read_idx
    from pipeline.errors import PipelineError

    images = np.random.default_rng(1).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    header = struct.pack(">BBBBIII", 0, 0, 0x08, 3, 10, 28, 28)
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(header + images.tobytes()))
    np.testing.assert_array_equal(read_idx(good, max_bytes=10 * 784), images)  # exactly at the limit
    with pytest.raises(PipelineError, match="inflates to 0 MiB .* above dataset.max_mb"):
        read_idx(good, max_bytes=10 * 784 - 1)
    cases = {"short.gz": (header + images.tobytes()[:-784], "is truncated: its header promises 7840 values"),
             "long.gz": (header + images.tobytes() + b"\0", "trailing bytes"),
             "huge.gz": (struct.pack(">BBBBIII", 0, 0, 0x08, 3, 2**20, 28, 28), "more than .* gzip bytes can hold"),
             "dims.gz": (header[:6], "truncated: its header names 3 dimensions")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(gzip.compress(data))
        with pytest.raises(PipelineError, match=message):
            read_idx(tmp_path / name, max_bytes=2**40)
    damaged = bytearray(good.read_bytes())
    damaged[len(damaged) // 2: len(damaged) // 2 + 8] = b"\xff" * 8
    (tmp_path / "damaged.gz").write_bytes(bytes(damaged))
    with pytest.raises(PipelineError, match="cannot be read as an IDX file|truncated|trailing"):
        read_idx(tmp_path / "damaged.gz")
    with pytest.raises(PipelineError, match="neither an IDX file nor a folder"):
        list_images(OmegaConf.create(dict(kind="idx", path="/dev/zero", split=None, limit=None)))


def keras_with_member(source, target, name: str, size: int) -> None:
    """A copy of the .keras archive `source` whose member `name` is padded to `size` bytes of
    JSON whitespace (or added with them), deflated: a MB or two that inflate to `size`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
        for info in src.infolist():
            if info.filename != name:
                out.writestr(info.filename, src.read(info.filename))
        data = src.read(name) if name in src.namelist() else b""
        with out.open(name, "w", force_zip64=True) as f:
            f.write(data)
            for _ in range(size // 2**22):
                f.write(b" " * 2**22)


def test_keras_archives_are_checked_before_keras_opens_them(tmp_path):
    import tracemalloc

    from test_pipeline import compose_cfg
    from pipeline.errors import PipelineError
    from pipeline.models.sources import load_model

    model = tiny_model(tmp_path / "tiny.keras")

    def load(path):
        return load_model(compose_cfg(["model=file", f"model.path={path}"]).model)

    keras_with_member(tmp_path / "tiny.keras", tmp_path / "config_bomb.keras", "config.json", 160 * 2**20)
    keras_with_member(tmp_path / "tiny.keras", tmp_path / "member_bomb.keras", "assets/blob", 400 * 2**20)
    for name, message in (("config_bomb", "config.json inflates to 160 MiB"),
                          ("member_bomb", "members inflate to 400 MiB from a 1.\\d MiB file")):
        assert (tmp_path / f"{name}.keras").stat().st_size < 2 * 2**20
        tracemalloc.start()
        try:
            with pytest.raises(PipelineError, match=message):
                load(tmp_path / f"{name}.keras")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2**20, f"{name}: {peak / 2**20:.0f} MiB allocated"  # nothing inflated
    (tmp_path / "text.keras").write_text("a model, honestly\n")
    with pytest.raises(PipelineError, match="text.keras is not a Keras archive .* model.save"):
        load(tmp_path / "text.keras")
    model.save(tmp_path / "legacy.h5")
    (tmp_path / "legacy.h5").rename(tmp_path / "legacy.keras")
    with pytest.raises(PipelineError, match="legacy.keras is an HDF5 .* rename it to legacy.h5"):
        load(tmp_path / "legacy.keras")
    assert load(tmp_path / "tiny.keras").name == "tiny.keras"  # a real archive still loads


@contextlib.contextmanager
def read_only(folder):
    """`folder` made unwritable for this process: chmod for a user, the immutable flag for root
    (whom permission bits do not stop); skipped where neither is possible."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    else:
        folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        yield
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


@pytest.mark.slow
def test_a_run_directory_that_cannot_be_written_is_one_line_and_untouched(tmp_path):
    from test_viewer import files_state

    (tmp_path / "a_file").write_text("keep me")
    for target, message in ((tmp_path / "a_file", "is not a folder (an existing file)"),
                            (tmp_path / "a_file" / "run", f"lies below {tmp_path / 'a_file'}, which is not a folder")):
        proc = run_py(f"hydra.run.dir={target}", timeout=120)
        lines = error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and (tmp_path / "a_file").read_text() == "keep me"
    finished = tmp_path / "finished"
    (finished / "parts").mkdir(parents=True)
    (finished / "results.h5").write_bytes(b"stand-in")
    before = files_state(finished)
    with read_only(finished):
        for target, message in ((finished, "is read-only for this user"),
                                (finished / "new", f"cannot be created: {finished} is read-only")):
            proc = run_py(f"hydra.run.dir={target}", timeout=120)
            lines = error_lines(proc)
            assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr
    assert files_state(finished) == before and sorted(p.name for p in finished.iterdir()) == ["parts", "results.h5"]


def test_dataset_max_mb_is_mebibytes(tmp_path):
    """dataset.max_mb=1: an image of 0.8 MiB is read, one of 1.5 MiB is recorded as skipped
    with the reason (a limit read as KiB or kB would refuse both or take both)."""
    from test_pipeline import compose_cfg
    from pipeline.runner import run

    rng = np.random.default_rng(5)
    sizes = {}
    for name, side in (("a_big.png", 724), ("b_small.png", 529)):  # noise: PNG cannot shrink it
        save_image(tmp_path / "data" / name, rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        sizes[name] = (tmp_path / "data" / name).stat().st_size / 2**20
    assert 1.45 < sizes["a_big.png"] < 1.6 and 0.75 < sizes["b_small.png"] < 0.85, sizes
    tiny_model(tmp_path / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder",
                       f"dataset.path={tmp_path / 'data'}", "dataset.max_mb=1", "layers=[relu1]", "stages=[scan]"])
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "results.h5", "r") as f:
        ok = f["images/ok"][()].tolist()
        errors = read_strings(f["images/error"])
    assert ok == [False, True]
    assert "file of 2 MiB is above dataset.max_mb=1: not read" in errors[0] and errors[1] == ""
