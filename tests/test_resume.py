"""A killed scan resumes to results identical bit for bit; a finished one is not redone."""

import os
import re
import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest

from conftest import ROOT, save_image
from test_pipeline import compose_cfg
from pipeline.runner import run
from pipeline.store import walk


def _dataset(root, n=1500):
    rng = np.random.default_rng(7)
    for i in range(n):
        save_image(root / f"c{i % 3}" / f"{i:05d}.png", rng.integers(0, 256, (18, 20, 3), dtype=np.uint8))
    (root / "c0" / "99998_broken.png").write_bytes(b"\x89PNG broken")
    save_image(root / "c1" / "99999_tiff.tif", rng.integers(0, 256, (18, 20, 3), dtype=np.uint8))
    return root


def _model(path):
    rng = np.random.default_rng(1)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(x)
    model = keras.Model(inp, x)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    _model(tmp / "m.keras")
    data = _dataset(tmp / "data")
    overrides = ["model=file", f"model.path={tmp / 'm.keras'}", "dataset=folder", f"dataset.path={data}",
                 "layers=[c1,c2]", "topk=5", "scan.bottomk=3", "batch_size=4", "checkpoint.batches=3",
                 "stages=[scan]"]
    run(compose_cfg(overrides), tmp / "reference")
    return tmp, overrides


def _arrays(path):
    with h5py.File(path, "r") as f:
        return {name: d[()] for name, d in walk(f)}


def _wait_for_checkpoint(run_dir, proc, seen_positions, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for state in run_dir.glob("parts/scan.*/state.h5"):
            try:
                with h5py.File(state, "r") as f:
                    if f.attrs["position"] not in seen_positions:
                        return int(f.attrs["position"])
            except (OSError, KeyError):
                pass  # replaced while we read it
        time.sleep(0.02)
    return None


@pytest.mark.slow
def test_killed_scan_resumes_to_identical_results(setup):
    tmp, overrides = setup
    run_dir = tmp / "killed"
    command = [sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    positions = []
    for _ in range(2):  # kill twice, at two different checkpoints
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        position = _wait_for_checkpoint(run_dir, proc, positions)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert position is not None, "the scan finished before a checkpoint could be caught"
        positions.append(position)
        with h5py.File(run_dir / "results.h5", "r") as f:  # readable after SIGKILL: the run record, no scan yet
            assert len(f["images/path"]) == 1502 and "layers" not in f
    assert positions[1] > positions[0]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming the scan at image" in done.stdout  # Hydra logs to stdout
    # the rate counts the images this process scanned, not those the checkpoint brought
    already = int(re.search(r"resuming the scan at image \d+ of \d+ \((\d+) images already", done.stdout)[1])
    finished = re.search(r"scan finished: (\d+) images scanned \((\d+) by this process", done.stdout)
    total, now = int(finished[1]), int(finished[2])
    assert already > 0 and now == total - already

    reference, resumed = _arrays(tmp / "reference" / "results.h5"), _arrays(run_dir / "results.h5")
    assert set(reference) == set(resumed)
    for name, value in reference.items():
        assert np.array_equal(value, resumed[name]), name
    assert not list(run_dir.rglob(".*.tmp-*")) and not list(run_dir.glob("parts/scan.*/state.h5"))

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already in" in again.stdout
    assert _arrays(run_dir / "results.h5").keys() == resumed.keys()


def test_reference_scan_handles_bad_files_and_bottom_k(setup):
    tmp, _ = setup
    with h5py.File(tmp / "reference" / "results.h5", "r") as f:
        paths = [p.decode() for p in f["images/path"][()]]
        ok = f["images/ok"][()]
        assert not ok[[i for i, p in enumerate(paths) if p.endswith("broken.png")]].any()
        assert ok[[i for i, p in enumerate(paths) if p.endswith(".tif")]].all()
        bottom = f["layers/c2/bottomk/value"][()]
        top = f["layers/c2/topk/value"][()]
        assert (np.diff(bottom, axis=1) >= 0).all() and (bottom[:, 0] <= top[:, -1]).all()
        assert "scan_state" not in f and not list((tmp / "reference").glob("parts/scan.*/state.h5"))
