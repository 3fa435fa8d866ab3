"""Network dissection throughput against a scan of the same images and layers.

Generates --images photos (--size pixels, JPEG) with label PNGs of --concepts concepts, a
tiny convolutional network at a 224x224 input (ImageNet-like sizes), and runs, each in this
process and timed in wall and CPU time (every thread), over the same images and layers:

- the plain scan (`stages=[scan] scan.sketch=false`), the baseline;
- the scan with the activation sketch (`scan.sketch=true`, the default on segmentation
  datasets): its cost over the plain scan;
- the dissect stage after it, in the same run directory: thresholds from the scan's
  sketch, the IoU pass only (the single pass);
- the dissect stage alone in a fresh run directory: its own two passes (thresholds, IoU).

Prints images/s of each and the ratios to the plain scan (target: the dissect stage at
most 2x a scan).

    python benchmarks/dissect_throughput.py [--images 256] [--batch 32] [--model tiny|default] [--downsample 1]

--model default dissects the embedded MobileNetV2 (its default layers) instead; its
weights must be in the cache (a first run of run.py fetches them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def make_data(root: Path, n: int, size: tuple[int, int], concepts: int) -> None:
    """Photos of coloured rectangles on noise, with their label maps."""
    from PIL import Image

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (concepts + 1, 3))
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros(size, np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, size[0] - 32), rng.integers(0, size[1] - 32)
            h, w = rng.integers(16, size[0] // 2), rng.integers(16, size[1] // 2)
            mask[y:y + h, x:x + w] = rng.integers(1, concepts + 1)
        image = np.clip(palette[mask] + rng.normal(0, 20, size + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:05d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"{i:05d}.png")
    (root / "concepts.txt").write_text("".join(f"{c} concept{c} {'object' if c % 2 else 'part'}\n"
                                               for c in range(1, concepts + 1)))


def tiny_model(path: Path) -> None:
    import keras

    inp = keras.Input((224, 224, 3))
    x = inp
    for i, channels in enumerate((16, 32, 64)):
        x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name=f"conv{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inp, out).save(path)


def timed_run(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, every thread) of one run: on a shared
    machine the wall time swings with the load, the CPU time is the work done."""
    from hydra import compose, initialize_config_dir

    from pipeline.runner import run

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    start, cpu = time.perf_counter(), time.process_time()
    run(cfg, run_dir)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 320), help="photo height and width")
    parser.add_argument("--concepts", type=int, default=20)
    parser.add_argument("--model", choices=("tiny", "default"), default="tiny")
    parser.add_argument("--downsample", default="null",
                        help="dissect.downsample (null, the default: 2 here, masks at 112 for 224; 1: at 224)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pipeline.config  # noqa: F401  (registers the structured configs)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "data", args.images, tuple(args.size), args.concepts)
        if args.model == "tiny":
            tiny_model(tmp / "tiny.keras")
            model = ["model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=unit",
                     "layers=[relu0,relu1,relu2]"]
        else:
            model = []
        common = model + ["dataset=segmentation", f"dataset.path={tmp / 'data' / 'images'}",
                          f"dataset.masks={tmp / 'data' / 'masks'}", f"dataset.concepts={tmp / 'data' / 'concepts.txt'}",
                          f"batch_size={args.batch}", "checkpoint.seconds=3600"]
        # a warm-up of each route on a few images: TensorFlow's first traces are not the stages' cost
        few = ["dataset.limit=" + str(args.batch), f"dissect.downsample={args.downsample}"]
        timed_run(common + few + ["stages=[scan,dissect]"], tmp / "warm")
        timed_run(common + few + ["stages=[dissect]"], tmp / "warm2")
        timed_run(common + few + ["stages=[scan]", "scan.sketch=false"], tmp / "warm3")
        dissect = ["stages=[dissect]", f"dissect.downsample={args.downsample}"]
        times = {"scan": timed_run(common + ["stages=[scan]", "scan.sketch=false"], tmp / "scan"),
                 "scan+sketch": timed_run(common + ["stages=[scan]", "scan.sketch=true"], tmp / "sketched"),
                 "dissect 1 pass": timed_run(common + dissect, tmp / "sketched"),
                 "dissect 2 passes": timed_run(common + dissect, tmp / "dissect")}
        same = same_thresholds(tmp / "sketched", tmp / "dissect")
    n = args.images
    scan, scan_cpu = times["scan"]
    print(f"model {args.model}, {n} images of {args.size[0]}x{args.size[1]} at a 224x224 input, batch {args.batch}, "
          f"dissect.downsample={args.downsample}")
    for name, (wall, cpu) in times.items():
        print(f"{name:17s} {n / wall:8.1f} images/s  {wall:6.1f} s wall {cpu:6.1f} s CPU  "
              f"/ scan: {wall / scan:.2f}x wall, {cpu / scan_cpu:.2f}x CPU")
    extra = [a + b for a, b in zip(times["scan+sketch"], times["dissect 1 pass"])]
    print(f"scan+sketch then dissect 1 pass / scan: {extra[0] / scan:.2f}x wall, {extra[1] / scan_cpu:.2f}x CPU "
          f"(scan then dissect 2 passes: {(scan + times['dissect 2 passes'][0]) / scan:.2f}x wall, "
          f"{(scan_cpu + times['dissect 2 passes'][1]) / scan_cpu:.2f}x CPU)")
    print(f"target: the dissect stage <= 2x the scan; the two routes' thresholds and sketches identical: {same}")


def same_thresholds(one: Path, two: Path) -> bool:
    import h5py

    with h5py.File(one / "results.h5", "r") as a, h5py.File(two / "results.h5", "r") as b:
        return all(np.array_equal(a[f"{g}/{k}"][()], b[f"{g}/{k}"][()], equal_nan=True)
                   for g in (f"layers/{n}/dissection" for n in a["layers"] if "dissection" in a[f"layers/{n}"])
                   for k in ("threshold", "threshold_rank_error", "sketch", "intersection"))


if __name__ == "__main__":
    main()
