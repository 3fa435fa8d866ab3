"""Sharded scans through a real Hydra launcher merge to the unsharded result."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import ROOT, save_image
from test_pipeline import compose_cfg, tiny_model
from pipeline.errors import PipelineError
from pipeline.runner import run
from pipeline.scan_io import shard_ids


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


def assert_merge_equals_single(single: Path, merged: Path, sweep: Path) -> None:
    with h5py.File(single / "results.h5", "r") as a, h5py.File(merged / "results.h5", "r") as b:
        for shard in ("0", "1"):
            with h5py.File(sweep / shard / "results.h5", "r") as s:
                assert 0 < s["images/scanned"][()].sum() < len(s["images/path"])
        for name in ("images/ok", "images/scanned"):
            assert np.array_equal(a[name][()], b[name][()])
        assert list(a["images/error"].asstr()[()]) == list(b["images/error"].asstr()[()])
        for layer in ("relu1", "relu2"):
            for table in ("topk", "bottomk") if "bottomk" in a[f"layers/{layer}"] else ("topk",):
                for key in ("value", "image", "y", "x", "box"):
                    assert np.array_equal(a[f"layers/{layer}/{table}/{key}"][()],
                                          b[f"layers/{layer}/{table}/{key}"][()]), (layer, table, key)
            for key in ("mean", "zero_fraction", "max"):
                np.testing.assert_allclose(a[f"layers/{layer}/stats/{key}"][()],
                                           b[f"layers/{layer}/stats/{key}"][()], rtol=1e-6)
            assert np.array_equal(a[f"layers/{layer}/stats/spectrum"][()], b[f"layers/{layer}/stats/spectrum"][()])


def merge(common, sweep: Path, merged: Path, *stages: str) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "run.py", *common, f"stages=[merge{''.join(',' + s for s in stages)}]",
                           f"merge.inputs=[{sweep}/*]", f"hydra.run.dir={merged}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_joblib_shards_merge_to_the_unsharded_tables(sharded):
    tmp, sweep, _ = sharded
    assert_merge_equals_single(tmp / "single", tmp / "merged", sweep)
    with h5py.File(tmp / "merged" / "results.h5", "r") as b:
        assert b["layers/relu1/patches"].shape[:2] == (4, 5)  # crop ran on the merged tables


@pytest.mark.slow
def test_submitit_shards_get_one_gpu_each_and_merge_to_the_unsharded_tables(sharded):
    """hydra/launcher=shards_gpus: submitit's local executor (the SLURM launcher's local twin),
    one fresh process per job, shard i on gpus[i]."""
    tmp, _, common = sharded
    sweep = tmp / "sweep_submitit"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=shards_gpus", *common, "shard.count=2",
                           "shard.index=0,1", "gpus=[3,5]", "stages=[scan]", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shard, device in (("0", "3"), ("1", "5")):  # the environment each job's TensorFlow started in
        with h5py.File(sweep / shard / "parts" / "scan.h5", "r") as f:
            assert f.attrs["cuda_visible_devices"] == device
    merge(common, sweep, tmp / "merged_submitit")
    assert_merge_equals_single(tmp / "single", tmp / "merged_submitit", sweep)


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
def test_ray_shards_merge_to_the_unsharded_tables(sharded):
    """hydra/launcher=shards_ray on a Ray instance started on this machine."""
    pytest.importorskip("ray", reason="ray is not installed (pip install -e .[ray])")
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed")
    tmp, _, common = sharded
    sweep = tmp / "sweep_ray"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RAY_DEDUP_LOGS="0")
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=shards_ray", *common, "shard.count=2",
                           "shard.index=0,1", "stages=[scan]", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = {int(m) for m in re.findall(r"_run_job pid=(\d+)", proc.stdout + proc.stderr)}
    assert len(pids) == 2  # max_calls=1: each job in its own worker process
    merge(common, sweep, tmp / "merged_ray")
    assert_merge_equals_single(tmp / "single", tmp / "merged_ray", sweep)


@pytest.mark.slow
def test_a_preempted_submitit_shard_is_requeued_and_resumes_its_scan(tmp_path):
    """SLURM's preemption, through submitit's own machinery: SIGUSR2 to a running shard job,
    which submitit checkpoints and requeues; the requeued job resumes the scan from its last
    checkpoint and ends with the tables of an uninterrupted scan of the same shard."""
    import signal
    import time

    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    for i in range(800):
        save_image(data / f"k{i % 2}" / f"{i:04d}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    tiny_model(tmp_path / "tiny.keras")
    common = ["model=file", f"model.path={tmp_path / 'tiny.keras'}", "dataset=folder", f"dataset.path={data}",
              "layers=[relu1,relu2]", "topk=5", "batch_size=2", "checkpoint.batches=1", "shard.count=2"]
    run(compose_cfg(common + ["shard.index=1", "stages=[scan]"]), tmp_path / "uninterrupted")
    sweep = tmp_path / "sweep"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "run.py", "-m", "hydra/launcher=shards_gpus", *common, "shard.index=1",
                             "stages=[scan]", f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((sweep / "0" / "parts").glob("scan.*/state.h5")):
            time.sleep(0.05)
        # the job's pid, as the run directory's lock records its holder: read at once, so the
        # signal lands mid-scan (walking /proc for it took long enough on a loaded machine for
        # the scan to finish first, and the requeued job then had nothing to resume)
        pid = int((sweep / "0" / ".lock").read_text().split()[0])
        os.kill(pid, signal.SIGUSR2)  # what SLURM sends before preempting (submitit's signal)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    submitit_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "this job is preempted" in submitit_logs and "Requeued job" in submitit_logs
    assert "resuming the scan at image" in (sweep / "0" / "run.log").read_text()
    with h5py.File(tmp_path / "uninterrupted" / "results.h5", "r") as a, \
            h5py.File(sweep / "0" / "results.h5", "r") as b:
        assert np.array_equal(a["images/scanned"][()], b["images/scanned"][()])
        for layer in ("relu1", "relu2"):
            for key in ("value", "image", "y", "x"):
                assert np.array_equal(a[f"layers/{layer}/topk/{key}"][()], b[f"layers/{layer}/topk/{key}"][()])
            assert np.array_equal(a[f"layers/{layer}/stats/zeros"][()], b[f"layers/{layer}/stats/zeros"][()])


@pytest.mark.slow
def test_many_shard_merge_benchmark_at_a_small_size():
    proc = subprocess.run([sys.executable, "benchmarks/merge_shards.py", "--images", "400", "--shards", "3",
                           "--batch", "256"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if " shards: merge " in line]
    assert len(lines) == 1 and all("merged == unsharded: yes" in line and "(skipped)" in line for line in lines), \
        proc.stdout


def test_gpus_are_checked_and_never_changed_under_a_running_tensorflow(tmp_path):
    import tensorflow  # noqa: F401  (as in a reused launcher worker: TensorFlow already started here)

    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    with pytest.raises(PipelineError, match=r"gpus=\[0, -1\]: use a whole number >= 0"):
        run(compose_cfg(["gpus=[0,-1]", "stages=[scan]"]), tmp_path / "bad")
    with pytest.raises(PipelineError, match="TensorFlow already runs in this process.*hydra/launcher=shards_gpus"):
        run(compose_cfg(["gpus=[7]", "shard.count=2", "shard.index=1", "stages=[scan]"]), tmp_path / "late")
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def test_sweep_summary_names_the_swept_keys_once(tmp_path):
    from pipeline.sweep import write_summary

    shared = ["model=file", "model.path=/m.keras", "stages=[scan]"]
    for job, swept in enumerate(["layers=[relu1]", "layers=[relu2]"]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(
            "\n".join(f"- {item}" for item in [shared[0], swept, *shared[1:]]) + "\n")
    write_summary(tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["overrides"] for r in rows] == ["layers=[relu1]", "layers=[relu2]"]
    html = (tmp_path / "summary.html").read_text()
    assert "<h1>Sweep over layers</h1>" in html and "Sweep sweep" not in html
    assert html.count("model.path=/m.keras") == 1  # named once, above the table
