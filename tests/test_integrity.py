"""What a resume reuses is verified: damaged or missing chunks and checkpoints are computed
again (results identical to an uninterrupted run), a missing part reruns its stage, a
damaged part is one line; files are replaced atomically, report files included."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, save_image
from test_pipeline import compose_cfg, tiny_model
from pipeline.errors import PipelineError
from pipeline.runner import run
from pipeline.store import PARTS_DIR, damage, replacing, sum_path, verify_all, walk, write_checked

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
STAGES = "stages=[scan,crop,cam]"


# --------------------------------------------------------------------------- plain files


def test_atomic_file_keeps_the_old_bytes_when_its_writer_is_killed(tmp_path):
    """SIGKILL a child half-way through a big write over an existing file: the file must
    hold its old bytes (it would be truncated, or half new, if written in place)."""
    target = tmp_path / "data.bin"
    old = os.urandom(1 << 20)
    target.write_bytes(old)
    child = textwrap.dedent(f"""
        import sys, time
        from pipeline.store import atomic_file
        with atomic_file({str(target)!r}) as fh:
            for i in range(256):  # 256 MiB: far more than is written before the kill
                fh.write(bytes([i % 251]) * (1 << 20))
                if i == 8:
                    fh.flush()
                    print("writing", flush=True)
                    time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, env=dict(ENV, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert target.read_bytes() == old


def test_replacing_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "sheets" / "selectivity.pdf"
    with replacing(target) as tmp:
        tmp.write_bytes(b"first")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_bytes(b"")  # matplotlib opens its file first, then fails
            raise RuntimeError("killed mid-way")
    assert target.read_bytes() == b"first" and os.listdir(target.parent) == ["selectivity.pdf"]


def _flip(path, offset, count=4):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(count))
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in data))


def test_damage_sees_flipped_bytes_truncation_and_a_missing_checksum(tmp_path):
    path = tmp_path / "chunk.h5"
    write_checked(path, b"a" * 1000)
    assert damage(path) is None
    _flip(path, 500)
    assert "checksum" in damage(path)
    write_checked(path, b"b" * 1000)
    path.write_bytes(b"b" * 999)
    assert "truncated" in damage(path)
    write_checked(path, b"c" * 10)
    sum_path(path).unlink()
    os.utime(path, ns=(1, 1))  # as a later process sees it (this one trusts what it wrote)
    assert "no checksum" in damage(path)
    assert damage(tmp_path / "gone.h5") == "missing"


def test_the_version_in_place_verifies_until_its_successor_is_renamed(tmp_path):
    """The sidecar is written before the rename: a kill between the two leaves the old file,
    which must still verify (and so must the new one, after the rename)."""
    path = tmp_path / "state.h5"
    write_checked(path, b"old state")
    old_sum = sum_path(path).read_text()
    write_checked(path, b"new state!")
    assert sum_path(path).read_text().splitlines()[1] == old_sum.strip()
    path.write_bytes(b"old state")  # as if the kill came before the rename
    os.utime(path, ns=(1, 1))  # another stamp: this process must read it again
    assert damage(path) is None


def test_a_checkpoint_killed_at_any_moment_of_its_rewrites_still_verifies(tmp_path):
    """A child rewrites one checkpoint (every version the same size, as a scan's are) in a
    loop and is SIGKILLed at three moments; a later process must find a version that
    verifies each time."""
    from pipeline import store

    child = textwrap.dedent("""
        import sys
        import numpy as np
        from pipeline.store import atomic_h5
        rng = np.random.default_rng()
        print("writing", flush=True)
        while True:
            with atomic_h5(sys.argv[1], checked=True) as f:
                f["state"] = rng.random(20000)
    """)
    for delay in (0.05, 0.2, 0.4):
        path = tmp_path / f"state_{delay}.h5"
        proc = subprocess.Popen([sys.executable, "-c", child, str(path)], cwd=ROOT,
                                env=dict(ENV, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "writing"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        store._trusted.clear()  # as the resumed process: it wrote nothing itself
        assert path.exists() and damage(path) is None, damage(path)


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, 200 images, and one uninterrupted scan, crop and cam (the reference)."""
    tmp = tmp_path_factory.mktemp("integrity")
    tiny_model(tmp / "tiny.keras")
    rng = np.random.default_rng(5)
    for i in range(200):
        save_image(tmp / "data" / f"c{i % 3}" / f"{i:04d}.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    base = ["model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
            f"dataset.path={tmp / 'data'}", "layers=[relu1,relu2]", "topk=5", "batch_size=4", "crop.max_size=0",
            "checkpoint.batches=1", "checkpoint.block_mb=0.0002", "report.cards=false", "report.pdf=false",
            "cam.methods=[gradcam]", "cam.draw=0"]
    run(compose_cfg(base + [STAGES]), tmp / "reference")
    return tmp, base, _arrays(tmp / "reference" / "results.h5")


def _arrays(results):
    with h5py.File(results, "r") as f:
        return {name: d[()] for name, d in walk(f)}


def _same(got, reference, prefixes, but=None):
    def chosen(names):
        return sorted(n for n in names if n.startswith(prefixes) and not (but and but in n))

    names = chosen(reference)
    assert names and chosen(got) == names
    for name in names:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


def _copy(tmp, name):
    shutil.copytree(tmp / "reference", tmp / name)
    return tmp / name


def _work(run_dir, stage):
    [work] = [p for p in (run_dir / PARTS_DIR).glob(f"{stage}.*") if p.is_dir()]
    return work


def _offset(path, key):
    with h5py.File(path, "r") as f:
        d = f[key]
        return d.id.get_offset() if d.chunks is None else d.id.get_chunk_info(0).byte_offset


@pytest.mark.slow
def test_a_damaged_scan_checkpoint_restarts_the_scan_to_identical_results(setup):
    tmp, base, reference = setup
    run_dir = tmp / "checkpoint"
    command = [sys.executable, "run.py", *base, "stages=[scan]", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, state = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and state is None:
        found = list(run_dir.glob(f"{PARTS_DIR}/scan.*/state.h5"))
        state = found[0] if found else None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state is not None, "the scan finished before a checkpoint could be caught"
    _flip(state, _offset(state, "layer_0000/value"))  # the case: a top value of 2.7e38

    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint" in done.stdout and "is damaged" in done.stdout and "starts again" in done.stdout
    _same(_arrays(run_dir / "results.h5"), reference, ("layers/", "images/"), but="patches")


@pytest.mark.slow
def test_damaged_and_missing_chunks_come_back_and_a_missing_part_reruns_its_stage(setup, caplog):
    tmp, base, reference = setup
    run_dir = _copy(tmp, "chunks")
    cam, crop = _work(run_dir, "cam"), _work(run_dir, "crop")
    assert len(list(cam.glob("[0-9]*.h5"))) > 10 and len(list(crop.glob("[0-9]*.h5"))) > 3
    _flip(cam / "000002.h5", _offset(cam / "000002.h5", "predictions/probability"))  # the 1.66e38
    (crop / "000001.h5").unlink()
    for stage in ("cam", "crop"):  # finished stages whose part file is gone
        (run_dir / PARTS_DIR / f"{stage}.h5").unlink()
    with caplog.at_level(logging.INFO):
        run(compose_cfg(base + [STAGES]), run_dir)
    said = caplog.text
    assert "crop.h5 is missing" in said and "cam.h5 is missing" in said and "checksum mismatch" in said
    assert "resuming, " in said  # crop kept its verified blocks
    _same(_arrays(run_dir / "results.h5"), reference, ("cam/", "predictions/", "layers/"))


@pytest.mark.slow
def test_a_chunk_removed_from_a_cam_stream_brings_its_images_back(setup):
    """The issue's case: a removed cam chunk used to end with its images silently missing."""
    tmp, base, reference = setup
    run_dir = _copy(tmp, "removed")
    (_work(run_dir, "cam") / "000020.h5").unlink()
    (run_dir / PARTS_DIR / "cam.h5").unlink()
    run(compose_cfg(base + ["stages=[cam]"]), run_dir)
    got = _arrays(run_dir / "results.h5")
    assert len(np.unique(got["cam/image"])) == 200
    _same(got, reference, ("cam/", "predictions/"))


@pytest.mark.slow
def test_a_damaged_part_is_one_line_with_the_command_that_rebuilds_it(setup):
    tmp, base, reference = setup
    run_dir = _copy(tmp, "damaged_part")
    part = run_dir / PARTS_DIR / "crop.h5"
    _flip(part, part.stat().st_size // 2)
    chunk = _work(run_dir, "cam") / "000003.h5"
    chunk.unlink()  # a finished stage's chunk: runs do not read them again, `verify` does
    assert [line.split(": ")[0] for line in verify_all(run_dir)] == [str(part), str(chunk)]
    rebuild = r"crop\.h5 is damaged .*: run stages=\[crop\] overwrite=true hydra\.run\.dir="
    with pytest.raises(PipelineError, match=rebuild):
        run(compose_cfg(base + ["stages=[report]"]), run_dir)
    run(compose_cfg(base + ["stages=[crop]", "overwrite=true"]), run_dir)
    _same(_arrays(run_dir / "results.h5"), reference, ("layers/",))


@pytest.mark.slow
def test_report_temporaries_of_a_killed_run_are_removed_by_the_next(setup):
    tmp, base, _ = setup
    run_dir = _copy(tmp, "report")
    left = [run_dir / "report" / f".rendered.json.tmp-{os.getpid() + 1}",
            run_dir / "sheets" / "run" / f".selectivity.pdf.tmp-{os.getpid() + 1}.pdf"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    run(compose_cfg(base + ["stages=[report]"]), run_dir)
    assert (run_dir / "index.html").stat().st_size > 0
    assert not [p for p in run_dir.rglob(".*.tmp-*")]


@pytest.mark.slow
def test_a_full_disk_during_the_report_is_one_line_and_leaves_no_partial_file(setup):
    from pipeline.store import StorageError

    tmp, base, _ = setup
    disk = tmp / "small_disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a disk-full test needs root to mount a small tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run_dir = disk / "run"
        shutil.copytree(tmp / "reference", run_dir)
        stat = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 48 * 1024))
        with pytest.raises(StorageError, match=r"^disk full while writing .*: free space on that disk"):
            run(compose_cfg(base + ["stages=[report]"]), run_dir)
        assert not [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != "filler"]
        assert not list(run_dir.rglob(".*.tmp-*"))
        with h5py.File(run_dir / "results.h5", "r") as f:
            assert f["layers/relu2/topk/value"].shape == (6, 5)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
