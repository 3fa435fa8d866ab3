"""Peak memory of a scan against dataset size: the scan's state must not grow with it.

Writes N small JPEG files, scans them with a small random-weight MobileNetV2
(alpha 0.35, 96 px, every activation layer tracked) in a fresh process for each
size, and prints the peak resident memory of each run and the ratio of the
largest to the smallest (target: <= 1.2).

    python benchmarks/scan_memory.py [--sizes 2000 20000]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent


def write_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    for i in range(count):  # a few distinct pictures, shifted, so decoding is real work
        image = np.roll(base[i % 64], i % 17, axis=1)
        Image.fromarray(image).save(folder / f"{i:06d}.jpg", quality=85)


def child(model: str, data: str, run_dir: str) -> None:
    """One scan in this process; prints peak RSS in MiB."""
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401
    from pipeline.runner import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=file", f"model.path={model}", "model.preprocess=tf", "dataset=folder", f"dataset.path={data}",
            "layers=activations", "stages=[scan]", "batch_size=64", "checkpoint.batches=100"])
    started = time.perf_counter()
    run(cfg, Path(run_dir))
    elapsed = time.perf_counter() - started
    print(f"RESULT {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} {elapsed:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "DATA", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import keras

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None)
        model.save(tmp / "model.keras")
        rows = []
        for size in sorted(args.sizes):
            data = tmp / f"data_{size}"
            data.mkdir()
            write_images(data, size)
            out = subprocess.run([sys.executable, __file__, "--child", str(tmp / "model.keras"), str(data),
                                  str(tmp / f"run_{size}")], capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
            if out.returncode or not line:
                raise SystemExit(out.stderr[-3000:])
            rss, seconds = map(float, line[0].split()[1:])
            rows.append((size, rss, seconds))
            print(f"{size:7d} images: peak RSS {rss:8.1f} MiB, {seconds:6.1f} s ({size / seconds:.0f} images/s)")
    print(f"ratio of peak RSS, {rows[-1][0]} vs {rows[0][0]} images: {rows[-1][1] / rows[0][1]:.3f} "
          f"(target <= 1.2)")


if __name__ == "__main__":
    main()
