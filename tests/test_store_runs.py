"""The store under real runs: a block-chunked and a per-image stage killed mid-way by
SIGKILL resume to identical results (every chunked stage's resume is also proven
in-process, in test_stage_resume); a second run on a busy directory, a full disk and
broken files are one line."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, save_image
from test_pipeline import compose_cfg, tiny_model
from pipeline.runner import run
from pipeline.store import PARTS_DIR, Store, pack, walk

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store_runs")
    tiny_model(tmp / "tiny.keras")
    rng = np.random.default_rng(11)
    for i in range(200):  # 50 chunks a stage at checkpoint.batches=1: a kill after two lands mid-way
        save_image(tmp / "data" / f"c{i % 3}" / f"{i:04d}.png", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    (tmp / "data" / "c0" / "9999_broken.png").write_bytes(b"\x89PNG broken")
    base = ["model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=unit", "dataset=folder",
            f"dataset.path={tmp / 'data'}", "layers=[relu1,relu2]", "topk=5", "scan.bottomk=2", "batch_size=4",
            "crop.max_size=0", "checkpoint.batches=1", "checkpoint.block_mb=0.0002", "report.cards=false"]
    return tmp, base


def _arrays(results):
    with h5py.File(results, "r") as f:
        return {name: d[()] for name, d in walk(f)}


def _start(overrides):
    return subprocess.Popen([sys.executable, "run.py", *overrides], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_chunks(run_dir, stage, proc, count=2, timeout=300):
    """True once `count` chunk files of `stage` are committed while the run goes on."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list(run_dir.glob(f"{PARTS_DIR}/{stage}.*/[0-9]*.h5"))) >= count:
            return True
        time.sleep(0.01)
    return False


# stage -> (the stages listed (the stage is last), its own settings, what it writes). A real
# SIGKILL of one block-chunked stage and one per-image stage; every chunked stage's resume
# (position, reuse, identical results) is proven in-process in test_stage_resume, faster
STAGE_RUNS = {
    "crop": (["stages=[scan,crop]"], ("/patches", "/bottom_patches")),
    "cam": (["stages=[cam]", "cam.methods=[gradcam,gradcam++]", "cam.draw=2"], ("cam/", "predictions/")),
}


@pytest.fixture(scope="module")
def reference(setup):
    """One uninterrupted run.py of every stage above, with all their settings (a stage's
    results depend on its own keys only): the same process setup as the runs it is compared with."""
    tmp, base = setup
    settings = [o for options, _ in STAGE_RUNS.values() for o in options if not o.startswith("stages=")]
    stages = "stages=[scan,crop,cam]"
    done = subprocess.run([sys.executable, "run.py", *base, *settings, stages, f"hydra.run.dir={tmp / 'reference'}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return _arrays(tmp / "reference" / "results.h5")


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGE_RUNS))
def test_a_stage_killed_mid_way_resumes_to_identical_results(setup, reference, stage):
    tmp, base = setup
    options, written = STAGE_RUNS[stage]
    run_dir = tmp / f"killed_{stage}"
    command = base + options + [f"hydra.run.dir={run_dir}"]
    proc = _start(command)
    caught = _wait_for_chunks(run_dir, stage, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert caught, f"{stage} finished before two of its chunks could be seen"
    with h5py.File(run_dir / "results.h5", "r") as f:  # readable after the kill, without the unfinished stage
        assert stage not in f.attrs["stages_done"]
    done = subprocess.run([sys.executable, "run.py", *command], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    # the committed chunks were reused: the resumed run started after them, not from zero
    resumed = re.search(rf"{stage}: resuming, (\d+) of (\d+) ", done.stdout)
    assert resumed and 0 < int(resumed[1]) <= int(resumed[2]), done.stdout[-3000:]
    got = _arrays(run_dir / "results.h5")
    mine = sorted(name for name in got if any(part in name or name.startswith(part) for part in written))
    assert mine and mine == sorted(n for n in reference if any(p in n or n.startswith(p) for p in written))
    for name in mine:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    assert not list(run_dir.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_is_refused_and_changes_nothing(setup):
    tmp, base = setup
    run_dir = tmp / "busy"
    command = base + ["stages=[scan,cam]", "batch_size=1", "checkpoint.batches=null", f"hydra.run.dir={run_dir}"]
    first = _start(command)
    deadline = time.time() + 120
    while not (run_dir / "results.h5").exists() and time.time() < deadline:  # Hydra's own files are written by then
        time.sleep(0.05)
    hydra_before = (run_dir / ".hydra" / "config.yaml").read_bytes()
    second = subprocess.run([sys.executable, "run.py", *command[:-1], "topk=3", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert first.poll() is None, "the first run ended before the second could start"
    assert second.returncode == 2, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(run_dir) in errors[0] and f"process {first.pid}" in errors[0]
    assert first.wait(timeout=300) == 0
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == hydra_before
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert f["layers/relu1/topk/value"].shape[1] == 5  # the first run's topk


@pytest.mark.slow
def test_a_long_scan_does_not_grow_the_store(setup):
    """Hundreds of checkpoints; the run directory stays within 1.5x a fresh copy of its data."""
    tmp, base = setup
    run_dir = tmp / "space"
    run(compose_cfg(base + ["stages=[scan,crop]", "batch_size=2"]), run_dir)  # ~300 checkpoints, ~40 chunks
    stored = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file() and p.suffix == ".h5")
    pack(run_dir / "results.h5", tmp / "space_fresh.h5")
    fresh = (tmp / "space_fresh.h5").stat().st_size
    assert stored <= 1.5 * fresh, (stored, fresh)
    assert not list(run_dir.glob(f"{PARTS_DIR}/scan.*/state.h5"))  # the checkpoint goes with the scan


@pytest.mark.slow
def test_broken_files_and_foreign_directories_are_one_line(setup):
    tmp, base = setup
    run_dir = tmp / "broken"
    report = base + ["stages=[scan,report]", "report.pdf=false", f"hydra.run.dir={run_dir}"]
    assert subprocess.run([sys.executable, "run.py", *report], cwd=ROOT, env=ENV, capture_output=True).returncode == 0

    def run_py(*overrides):
        proc = subprocess.run([sys.executable, "run.py", *overrides], cwd=ROOT, env=ENV, capture_output=True,
                              text=True)
        return proc.returncode, [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc

    # a truncated results.h5 is rebuilt from the parts
    data = (run_dir / "results.h5").read_bytes()
    (run_dir / "results.h5").write_bytes(data[:len(data) // 3])
    code, _, proc = run_py(*report[:-2], "stages=[report]", "report.pdf=false", f"hydra.run.dir={run_dir}")
    assert code == 0, proc.stderr[-2000:]
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert f["layers/relu2/topk/value"].shape == (6, 5)
    # a broken part names itself and what to do
    scan_part = run_dir / PARTS_DIR / "scan.h5"
    scan_part.write_bytes(scan_part.read_bytes()[:500])
    code, errors, proc = run_py(*report[:-2], "stages=[report]", f"hydra.run.dir={run_dir}")
    assert code == 2 and len(errors) == 1 and "scan.h5" in errors[0] and "Traceback" not in proc.stderr
    # a results.h5 that is not ours, or empty, is never rendered over
    for name, content in (("garbage", b"not an hdf5 file at all" * 10), ("empty", None)):
        foreign = tmp / f"foreign_{name}"
        foreign.mkdir()
        if content is None:
            h5py.File(foreign / "results.h5", "w").close()
        else:
            (foreign / "results.h5").write_bytes(content)
        before = (foreign / "results.h5").read_bytes()
        code, errors, proc = run_py(*base, "stages=[report]", f"hydra.run.dir={foreign}")
        assert code == 2 and len(errors) == 1 and "hydra.run.dir" in errors[0], proc.stderr[-2000:]
        assert (foreign / "results.h5").read_bytes() == before and not (foreign / "index.html").exists()


def _tmpfs(path, size):
    path.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a disk-full test needs root to mount a small tmpfs")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_last_complete_state(setup):
    tmp, base = setup
    disk = tmp / "small_disk"
    _tmpfs(disk, "600k")
    try:
        run_dir = disk / "run"
        proc = subprocess.run([sys.executable, "run.py", *base, "stages=[scan,activations]",
                               "activations.images=200", "checkpoint.batches=null", "checkpoint.block_mb=1",
                               f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, capture_output=True, text=True)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert len(errors) == 1 and "disk full" in errors[0] and "Traceback" not in proc.stderr
        with h5py.File(run_dir / "results.h5", "r") as f:  # the last complete state opens: the scan
            assert f["layers/relu2/topk/value"].shape == (6, 5) and "activations" not in f
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_new_scan_drops_the_maps_of_images_chosen_from_its_top_k(setup):
    tmp, base = setup
    run_dir = tmp / "rescan"
    chosen = "activations.images={layer: relu2, channels: [0, 1], k: 2}"
    run(compose_cfg(base + ["stages=[scan,activations,occlusion]", chosen, "occlusion.images=3",
                            "checkpoint.batches=null"]), run_dir)
    done = Store(run_dir).stages_done()
    assert {"scan", "activations", "occlusion"} <= set(done)
    run(compose_cfg(base + ["stages=[scan]", "topk=3", "overwrite=true", "checkpoint.batches=null"]), run_dir)
    done = Store(run_dir).stages_done()
    assert "activations" not in done and "occlusion" in done  # occlusion's images (the first 3) did not change
    with h5py.File(run_dir / "results.h5", "r") as f:
        assert "activations" not in f and f["layers/relu2/topk/value"].shape == (6, 3)


def test_a_resume_with_another_batch_size_is_refused(setup):
    from pipeline.errors import PipelineError
    from pipeline.stages import scan
    from pipeline.store import fingerprint

    tmp, base = setup
    run_dir = tmp / "other_batch"
    cfg = compose_cfg(base + ["stages=[scan]"])
    Store(run_dir).work("scan", fingerprint(cfg, scan.STAGE.keys), False, batch_size=4)  # as a killed batch_size=4 scan
    with pytest.raises(PipelineError, match="ran with batch_size=4: resume with batch_size=4"):
        run(compose_cfg(base + ["stages=[scan]", "batch_size=8"]), run_dir)
