"""Deconv / guided-backprop / gradient panels against a bare forward pass, same run.

The panels stage runs on every top-9 entry of one layer of the embedded MobileNetV2
(default features_7_conv_0_2) over JPEG files, once per method, on receptive-field
crops (what the stage does) and on whole images (the crops switched off; top-2 entries,
to keep it short). Prints seeds/s of each, and seeds per bare-forward image time: the
seeds the stage computes in the time a bare forward pass of the whole model takes for
one image (target: >= 1 on CPU). Stage times include loading the model and tracing.

With --job it also times the default job (`python run.py`, panels included) against the
same job without the panels stage, as processes (target: <= 1.5x).

    python benchmarks/panels_throughput.py [--images 64] [--layer features_7_conv_0_2] [--job]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import tensorflow as tf  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import pipeline.config  # noqa: E402,F401  (registers the structured configs)
from pipeline import panels  # noqa: E402  (the engine: the baseline replaces its crop_plan_of)
from pipeline.datasets import image_stream, list_images  # noqa: E402
from pipeline.models.sources import load_model  # noqa: E402
from pipeline.preprocess import normalize  # noqa: E402
from pipeline.runner import run  # noqa: E402
from scan_throughput import write_jpegs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("deconv", "guided", "gradient")


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def bare_rate(bundle, folder: Path, batch: int) -> float:
    """Images/s of the whole model's forward pass over the JPEG files (the second of two passes)."""
    spec = bundle.preprocessing
    table = list_images(OmegaConf.create(dict(kind="folder", path=str(folder), split=None, limit=None)))
    forward = tf.function(lambda p: bundle.model(normalize(p, spec.normalize), training=False))
    for _ in range(2):
        start = time.perf_counter()
        for _, pixels in image_stream(table, spec, batch):
            forward(pixels).numpy()
    return len(table) / (time.perf_counter() - start)


def panels_rate(base: list[str], run_dir: Path, method: str, whole: bool) -> tuple[int, float]:
    """(seeds, seeds/s) of the panels stage for one method."""
    original = panels.crop_plan_of
    if whole:
        panels.crop_plan_of = lambda *_: (None, "crops switched off for the baseline")
    try:
        start = time.perf_counter()
        run(config(base + ["stages=[panels]", f"panels.methods=[{method}]", "panels.layers=all",
                           "overwrite=true"]), run_dir)
        seconds = time.perf_counter() - start
    finally:
        panels.crop_plan_of = original
    with h5py.File(run_dir / "results.h5", "r") as f:
        seeds = int(sum((g["topk/image"][()] >= 0).sum() for g in f["layers"].values()))
    return seeds, seeds / seconds


def job_seconds(overrides: list[str], run_dir: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}", *overrides],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--layer", default="features_7_conv_0_2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--job", action="store_true", help="also time the default job with and without panels")
    args = parser.parse_args()

    bundle = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "jpegs").mkdir()
        write_jpegs(tmp / "jpegs", args.images)
        data = ["dataset=folder", f"dataset.path={tmp / 'jpegs'}", f"layers=[{args.layer}]",
                f"batch_size={args.batch}"]
        bare = bare_rate(bundle, tmp / "jpegs", args.batch)
        rows = []
        for whole, topk in ((False, 9), (True, 2)):
            base = data + [f"topk={topk}"]
            run_dir = tmp / f"top{topk}"
            run(config(base + ["stages=[scan,crop]"]), run_dir)
            for method in METHODS:
                seeds, rate = panels_rate(base, run_dir, method, whole)
                rows.append((method, "whole images" if whole else "crops", seeds, rate))
        print(f"model: {bundle.name}, layer {args.layer}, {args.images} JPEG images, batch {args.batch}")
        print(f"bare forward pass (whole model): {bare:8.1f} images/s")
        for method, where, seeds, rate in rows:
            print(f"{method:8s} on {where:12s}: {seeds:5d} seeds, {rate:8.1f} seeds/s, "
                  f"{rate / bare:6.2f} seeds per bare-forward image (target >= 1)")
        for method in METHODS:
            crop, full = (r[3] for r in rows if r[0] == method)
            print(f"{method:8s} crops / whole images: {crop / full:6.1f}x")
        if args.job:
            without = job_seconds(["stages=[scan,crop,activations,cam,occlusion,report,export]"], tmp / "job0")
            with_panels = job_seconds([], tmp / "job1")
            print(f"default job: {with_panels:.1f} s with panels, {without:.1f} s without: "
                  f"{with_panels / without:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
