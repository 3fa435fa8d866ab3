"""The store: parts written once and atomically, one index, chunked stages, one writer."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT
from pipeline import lock
from pipeline.crop import channel_blocks
from pipeline.errors import PipelineError
from pipeline.store import Store, StorageError, WorkDir, atomic_h5, pack, walk


def _part(store, name, build):
    with store.write(name) as f:
        build(f)


def _run_store(tmp_path):
    store = Store(tmp_path / "run")
    with store.write("run.h5") as f:
        f.attrs["model"] = "m"
        f["images/path"] = np.array([b"a", b"b"])
    return store


# ------------------------------------------------------------------ atomic files, the index


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "p.h5"
    with atomic_h5(path) as f:
        f["x"] = np.arange(3)
    with pytest.raises(RuntimeError):
        with atomic_h5(path) as f:
            f["x"] = np.arange(5)
            raise RuntimeError("killed half way")
    with h5py.File(path, "r") as f:
        assert f["x"].shape == (3,)
    assert [p.name for p in tmp_path.iterdir()] == ["p.h5"]  # no temporary left


def test_index_links_parts_and_mirrors_shared_groups(tmp_path):
    store = _run_store(tmp_path)

    def scan(f):
        f.attrs.update(_stage_print="private", shard_count=1)
        g = f.create_group("layers/conv")
        g.attrs["depth"] = 3
        g["topk/value"] = np.ones((4, 2), np.float32)

    def crop(f):
        f["layers/conv/patches"] = np.zeros((4, 2, 3, 3, 3), np.uint8)
    _part(store, "scan.h5", scan)
    _part(store, "crop.h5", crop)
    store.finish("scan", "p1")
    store.finish("crop", "p2", depends_on=["scan"])
    with h5py.File(store.index, "r") as f:
        assert f.attrs["model"] == "m" and f.attrs["shard_count"] == 1
        assert "_stage_print" not in f.attrs  # a part's own bookkeeping stays in the part
        assert json.loads(f.attrs["stages_done"]) == {"crop": "p2", "scan": "p1"}
        assert f["layers/conv"].attrs["depth"] == 3
        assert f["layers/conv/topk/value"][()].sum() == 8 and f["layers/conv/patches"].shape == (4, 2, 3, 3, 3)
        assert isinstance(f.get("layers/conv/topk", getlink=True), h5py.ExternalLink)
        assert sorted(name for name, _ in walk(f)) == ["images/path", "layers/conv/patches", "layers/conv/topk/value"]
    assert store.index.stat().st_size < 20_000  # links and attrs, no data

    # the run directory moves as a whole
    moved = tmp_path / "moved"
    os.rename(store.run_dir, moved)
    with h5py.File(moved / "results.h5", "r") as f:
        assert f["layers/conv/topk/value"].shape == (4, 2)


def test_two_parts_writing_one_dataset_is_an_error(tmp_path):
    store = _run_store(tmp_path)
    _part(store, "scan.h5", lambda f: f.create_dataset("layers/x", data=[1]))
    _part(store, "crop.h5", lambda f: f.create_dataset("layers/x", data=[2]))
    store.finish("scan", "a")
    with pytest.raises(StorageError, match="layers/x is written by several parts"):
        store.finish("crop", "b")


def test_recomputing_a_stage_drops_what_was_built_on_it(tmp_path):
    store = _run_store(tmp_path)
    for stage, depends in (("scan", []), ("crop", ["scan"]), ("panels", ["crop"]), ("cam", [])):
        _part(store, f"{stage}.h5", lambda f, s=stage: f.create_dataset(s, data=[1]))
        store.finish(stage, "x", depends_on=depends)
    store.begin("scan", recompute=True)
    assert store.stages_done() == {"cam": "x"}  # crop read the scan, panels read crop
    assert not store.has("crop.h5") and not store.has("panels.h5") and not store.has("scan.h5")
    with h5py.File(store.index, "r") as f:
        assert sorted(f) == ["cam", "images"]


def test_mend_rebuilds_a_broken_or_stale_index(tmp_path):
    store = _run_store(tmp_path)
    _part(store, "scan.h5", lambda f: f.create_dataset("layers/t", data=[7]))
    store.finish("scan", "a")
    before = store.index.read_bytes()
    store.mend()
    assert store.index.read_bytes() == before  # fresh: untouched
    store.index.write_bytes(before[:100])  # truncated, as by a full disk or a bad copy
    store.mend()
    with h5py.File(store.index, "r") as f:
        assert f["layers/t"][0] == 7
    (store.parts / "scan.done").unlink()  # a kill between forgetting a stage and the index
    store.mend()
    with h5py.File(store.index, "r") as f:
        assert "layers" not in f


def test_chunks_assemble_into_virtual_datasets(tmp_path):
    work = WorkDir(tmp_path / "parts" / "cam.abc", "cam", {})
    for n, rows in enumerate((3, 0, 2)):
        with work.write(work.chunk_name(n)) as f:
            d = f.create_dataset("cam/map", data=np.full((rows, 2, 2), n, np.float32))
            d.attrs["unit"] = "logit"
            f["cam"].attrs["layer"] = "relu2"
            f["_private"] = np.arange(2)
    with h5py.File(tmp_path / "parts" / "cam.h5", "w") as f:
        work.assemble(f, skip=("_private",))
    with h5py.File(tmp_path / "parts" / "cam.h5", "r") as f:
        d = f["cam/map"]
        assert d.is_virtual and d.shape == (5, 2, 2) and d.attrs["unit"] == "logit"
        assert d[:, 0, 0].tolist() == [0, 0, 0, 2, 2]
        assert f["cam"].attrs["layer"] == "relu2" and "_private" not in f
    with work.write(work.chunk_name(3)) as f:
        f["cam/map"] = np.zeros((1, 3, 3), np.float32)
    with h5py.File(tmp_path / "parts" / "bad.h5", "w") as f, pytest.raises(StorageError, match="disagree"):
        work.assemble(f)


def test_work_refuses_a_resume_with_other_settings(tmp_path):
    store = _run_store(tmp_path)
    store.work("cam", "p", overwrite=False, batch_size=32)
    with pytest.raises(PipelineError, match="batch_size=32"):
        store.work("cam", "p", overwrite=False, batch_size=64)
    with pytest.raises(PipelineError, match="unfinished cam of a different config"):
        store.work("cam", "q", overwrite=False, batch_size=32)
    store.work("cam", "q", overwrite=True, batch_size=64)  # overwrite=true starts again
    assert [p.name for p in store.parts.glob("cam.*")] == ["cam.q"]


def test_channel_blocks_cover_every_channel_once_within_budget():
    layers = [("a", 10, 10), ("b", 5, 30), ("c", 2, 500)]
    blocks = channel_blocks(layers, 100)
    pieces = [p for block in blocks for p in block]
    for key, channels, _ in layers:  # in order, contiguous, complete
        spans = [(c0, c1) for k, c0, c1 in pieces if k == key]
        assert spans[0][0] == 0 and spans[-1][1] == channels
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    size = {key: per for key, _, per in layers}
    for block in blocks:  # within budget unless a single channel is larger
        total = sum((c1 - c0) * size[k] for k, c0, c1 in block)
        assert total <= 100 or (len(block) == 1 and block[0][2] - block[0][1] == 1)


def test_pack_resolves_links_into_one_file(tmp_path):
    store = _run_store(tmp_path)
    work = store.work("crop", "p", overwrite=False)
    for n in range(2):
        with work.write(work.chunk_name(n)) as f:
            f.create_dataset("layers/c/patches", data=np.full((2, 3, 4, 4, 3), n, np.uint8), compression="gzip")
    with store.write("crop.h5") as f:
        work.assemble(f)
    store.finish("crop", "p")
    pack(store.index, tmp_path / "one.h5")
    with h5py.File(tmp_path / "one.h5", "r") as f:
        d = f["layers/c/patches"]
        assert not d.is_virtual and d.compression == "gzip" and d[:, 0, 0, 0, 0].tolist() == [0, 0, 1, 1]
        assert f.attrs["model"] == "m"


# ------------------------------------------------------------------ the lock


def test_second_writer_is_refused_until_the_first_process_dies(tmp_path):
    run_dir = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline import lock; "
        "lock.acquire(sys.argv[2]); print('held', flush=True); time.sleep(60)"), ROOT, str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.RunDirBusy, match=f"in use by process {holder.pid}"):
            lock.acquire(run_dir)
    finally:
        holder.kill()
        holder.wait()
    lock.acquire(run_dir)  # the kernel dropped the dead process's lock
    lock.release(run_dir)


def test_the_hydra_callback_refuses_a_busy_run_directory_before_hydra_writes(tmp_path, capsys):
    """The callbacks the config registers, as Hydra calls them before it writes .hydra/ and
    the log: a run directory locked by another writer ends the run with exit 2 and one line."""
    import fcntl

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    run_dir = tmp_path / "busy"
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    callbacks = [instantiate(c) for c in cfg.hydra.callbacks.values()]
    run_dir.mkdir()
    other = os.open(run_dir / lock.LOCK_FILE, os.O_RDWR | os.O_CREAT)  # another writer's lock
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        os.pwrite(other, b"4242\n", 0)
        with pytest.raises(SystemExit) as stop:
            for callback in callbacks:
                callback.on_run_start(config=cfg)
        assert stop.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "in use by process 4242" in lines[0]
    finally:
        os.close(other)
    assert sorted(p.name for p in run_dir.iterdir()) == [lock.LOCK_FILE]
    for callback in callbacks:  # free now: the callback takes the lock and holds it for the run
        callback.on_run_start(config=cfg)
    probe = os.open(run_dir / lock.LOCK_FILE, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
        lock.release(run_dir)
