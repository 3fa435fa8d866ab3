"""An ImageNet-sized scan on this machine, and what the store costs at that size.

1,281,167 synthetic 16x16 grey images in one IDX file go through a tiny two-convolution
model (batch 512), once as a bare forward pass to the two tracked layers over the same
array, once as the real scan stage (run in its own process each, so peak memory is
each one's own). Printed:

- scan images/s divided by the bare pass's (target >= 0.8);
- the run directory's size divided by a fresh, self-contained copy of its data after
  about 50 checkpoints (target <= 1.5), and the seconds per checkpoint;
- peak RSS of either process;
- the seconds of one small write (a stage marked done, the index rebuilt) in a run
  directory that holds --big-gb of patches, divided by the same write in an empty one
  (target: about 1, i.e. independent of the patches).

    python benchmarks/scale_store.py [--images 1281167] [--batch 512] [--big-gb 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LAYERS = ["c1", "c2"]


def write_idx(path: Path, count: int, side: int = 16) -> None:
    """count side x side uint8 images: smooth random blobs, written in blocks."""
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (count, side, side)))
        block = 65536
        base = rng.integers(0, 256, (block, side, side), dtype=np.uint8)
        for start in range(0, count, block):
            n = min(block, count - start)
            f.write(np.roll(base[:n], start // block, axis=2).tobytes())


def write_model(path: Path) -> None:
    import keras

    inp = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inp, keras.layers.Dense(10)(x)).save(path)


def child_bare(model_path: str, idx_path: str, batch: int) -> dict:
    """A forward pass to the tracked layers over the same array, batch by batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.datasets import read_idx
    from pipeline.graph import feature_model

    model = keras.models.load_model(model_path, compile=False)
    features = feature_model(model, LAYERS)
    step = tf.function(lambda x: features(tf.cast(x, tf.float32) / 255.0, training=False), reduce_retracing=True)
    images = read_idx(Path(idx_path))
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        out = step(tf.constant(np.asarray(images[start:start + batch])[..., None]))
    [o.numpy() for o in out]
    elapsed = time.perf_counter() - started
    return dict(seconds=elapsed, images=len(images))


def child_scan(model_path: str, idx_path: str, batch: int, run_dir: str, every: int) -> dict:
    """The scan stage through the runner, as `python run.py` would run it."""
    import logging

    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401
    import pipeline.stages.scan  # noqa: F401  (TensorFlow's import is outside the timing, as for the bare pass)
    from pipeline.runner import run

    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logging.getLogger("pipeline").addHandler(Keep())
    logging.getLogger("pipeline").setLevel(logging.INFO)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=file", f"model.path={model_path}", "model.preprocess=unit", "dataset=idx",
            f"dataset.path={idx_path}", f"layers=[{','.join(LAYERS)}]", "stages=[scan]", f"batch_size={batch}",
            f"checkpoint.batches={every}", "checkpoint.seconds=1e9"])
    started = time.perf_counter()
    run(cfg, Path(run_dir))
    elapsed = time.perf_counter() - started
    checkpoints = [float(m.group(1)) for line in lines if (m := re.search(r"^checkpoint: .*\(([\d.]+) s\)", line))]
    return dict(seconds=elapsed, checkpoints=checkpoints)


def child(kind: str, *args) -> None:
    result = child_bare(args[0], args[1], int(args[2])) if kind == "bare" else \
        child_scan(args[0], args[1], int(args[2]), args[3], int(args[4]))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_child(*args, script: str = __file__) -> dict:
    """`script --child ARGS` in its own process; the dict it printed as 'RESULT {json}'."""
    out = subprocess.run([sys.executable, script, "--child", *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(line[0][7:])


def store_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.rglob("*.h5") if p.is_file())


def write_cost(tmp: Path, big_gb: float, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of one small commit in a run directory with and without big_gb of patches."""
    import numpy as np

    from omegaconf import OmegaConf

    from pipeline.preprocess import Preprocessing
    from pipeline.store import Store

    def commit_time(run_dir: Path) -> float:
        store = Store(run_dir)
        times = []
        for i in range(repeats):
            started = time.perf_counter()
            with store.write("report_note.h5") as f:  # a small part, as a short stage writes
                f["note/value"] = np.arange(10)
            store.finish("note", f"print{i}")
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    cfg = OmegaConf.create({"model": {"kind": "file"}, "dataset": {"kind": "idx"}})
    spec = Preprocessing(height=16, width=16, channels=1)
    seconds = []
    for name, gigabytes in (("small", 0.0), ("big", big_gb)):
        run_dir = tmp / f"write_{name}"
        store = Store(run_dir)
        store.write_run(cfg, "tiny", spec, None)
        if gigabytes:
            work = store.work("crop", "x", overwrite=False)
            rows = 4096
            per_chunk = rows * 9 * 64 * 64 * 3
            rng = np.random.default_rng(0)
            block = rng.integers(0, 256, (rows, 9, 64, 64, 3), dtype=np.uint8)
            for n in range(max(1, int(gigabytes * 2**30 // per_chunk))):
                with work.write(work.chunk_name(n)) as f:  # incompressible: the bytes land on disk
                    f.create_dataset("layers/big/patches", data=block, chunks=(1, 9, 64, 64, 3))
            with store.write("crop.h5") as f:
                work.assemble(f)
            store.finish("crop", "x")
        seconds.append(commit_time(run_dir))
        print(f"  one commit with {gigabytes:.1f} GB of patches in the run directory "
              f"({store_bytes(run_dir) / 2**30:.2f} GiB stored): {seconds[-1] * 1000:.1f} ms")
    return seconds[0], seconds[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=50, help="about this many checkpoints in the scan")
    parser.add_argument("--big-gb", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the IDX file and runs go (a temp dir)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    tmp = Path(tempfile.mkdtemp(dir=args.workdir, prefix="scale_store_"))
    try:
        idx = tmp / "train-images-idx3-ubyte"
        write_idx(idx, args.images)
        write_model(tmp / "tiny.keras")
        batches = -(-args.images // args.batch)
        every = max(1, batches // args.checkpoints)
        bare = run_child("bare", tmp / "tiny.keras", idx, args.batch)
        scan = run_child("scan", tmp / "tiny.keras", idx, args.batch, tmp / "run", every)

        from pipeline.store import pack

        run_dir = tmp / "run"
        pack(run_dir / "results.h5", tmp / "fresh.h5")
        stored, fresh = store_bytes(run_dir), (tmp / "fresh.h5").stat().st_size
        bare_rate, scan_rate = args.images / bare["seconds"], args.images / scan["seconds"]
        ckpt = scan["checkpoints"]
        print(f"{args.images:,} images {16}x{16}, batch {args.batch}, layers {LAYERS}")
        print(f"  bare forward pass: {bare_rate:9.0f} images/s ({bare['seconds']:.1f} s), peak RSS "
              f"{bare['peak_rss_mib']:.0f} MiB")
        print(f"  scan stage:        {scan_rate:9.0f} images/s ({scan['seconds']:.1f} s), peak RSS "
              f"{scan['peak_rss_mib']:.0f} MiB")
        print(f"  scan / bare: {scan_rate / bare_rate:.2f} (target >= 0.8)")
        if ckpt:
            print(f"  {len(ckpt)} checkpoints: {sorted(ckpt)[len(ckpt) // 2] * 1000:.1f} ms median, "
                  f"{max(ckpt) * 1000:.1f} ms max")
        print(f"  run directory {stored / 2**20:.1f} MiB / fresh copy {fresh / 2**20:.1f} MiB = {stored / fresh:.2f} "
              f"(target <= 1.5)")
        shutil.rmtree(run_dir)
        if args.big_gb > 0:
            small, big = write_cost(tmp, args.big_gb)
            print(f"  one write with {args.big_gb:.1f} GB stored / without: {big / small:.2f} (target: about 1)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
