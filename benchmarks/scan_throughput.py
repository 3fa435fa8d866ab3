"""Scan throughput against a bare forward pass, measured in the same run.

Both sides read the same JPEG files through the same tf.data stream and compute
the same layer outputs of the embedded MobileNetV2; the scan also keeps the
per-channel top-k tables and statistics. Prints images/s of each and the ratio
(target: >= 0.85 on CPU, >= 0.95 on a GPU). A third side adds the class-conditional
sums of class selectivity over `--classes` classes (random labels): its cost against
the plain scan (target: <= 1.1x the scan's time).

    python benchmarks/scan_throughput.py [--images 256] [--batch 32] [--layers activations] [--classes 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.datasets import ImageTable, image_stream, list_images  # noqa: E402
from pipeline.graph import feature_model  # noqa: E402
from pipeline.layers import select_layers  # noqa: E402
from pipeline.models.sources import load_model  # noqa: E402
from pipeline.preprocess import normalize  # noqa: E402
from pipeline.scan import Scanner  # noqa: E402


def write_jpegs(folder: Path, count: int) -> ImageTable:
    """`count` JPEG files cut from the sample photos (real pixels, real decoding)."""
    samples = list_images(OmegaConf.create(dict(kind="samples", path=None, split=None, limit=None)))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        with Image.open(samples.paths[i % len(samples)]) as im:
            photo = np.asarray(im.convert("RGB"))
        h, w = photo.shape[:2]
        y, x = rng.integers(0, max(1, h - 300)), rng.integers(0, max(1, w - 300))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(photo[y:y + 360, x:x + 480]).save(path, quality=90)
        paths.append(str(path))
    return ImageTable(paths, np.full(count, -1, np.int64))


def time_pass(step, table, spec, batch, first_id=0) -> float:
    """Images/s of one pass; ids continue from `first_id`, as in a longer scan."""
    start = time.perf_counter()
    for ids, pixels in image_stream(table, spec, batch):
        step(pixels, ids.numpy() + first_id)
    return len(table) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", default="activations", help="a layer preset (default, activations, ...)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=1000, help="classes of the selectivity side (ImageNet: 1000)")
    args = parser.parse_args()

    bundle = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))
    names = select_layers(bundle.model, args.layers)
    features = feature_model(bundle.model, names)
    spec = bundle.preprocessing

    @tf.function(reduce_retracing=True)
    def bare(pixels):
        outputs = features(normalize(pixels, spec.normalize), training=False)
        # reduce each output to a scalar so both sides return as little to the host
        return [tf.reduce_sum(o[:1, :1, :1, :1]) for o in outputs]

    with tempfile.TemporaryDirectory() as tmp:
        table = write_jpegs(Path(tmp), args.images)
        scanner = Scanner(features, names, spec, k=9)
        labels = np.random.default_rng(0).integers(0, args.classes, (args.repeats + 1) * len(table))
        classed = Scanner(features, names, spec, k=9, labels=labels, classes=args.classes)
        # warm-up: trace the functions and fill the file cache
        time_pass(lambda p, i: bare(p), table, spec, args.batch)
        time_pass(scanner.update, table, spec, args.batch)
        time_pass(classed.update, table, spec, args.batch)
        bare_rates, scan_rates, class_rates = [], [], []
        for rep in range(args.repeats):  # interleaved, so drift hits every side alike
            bare_rates.append(time_pass(lambda p, i: [t.numpy() for t in bare(p)], table, spec, args.batch))
            scan_rates.append(time_pass(scanner.update, table, spec, args.batch, (rep + 1) * len(table)))
            class_rates.append(time_pass(classed.update, table, spec, args.batch, (rep + 1) * len(table)))
    channels = sum(s[-1] for s in scanner.map_shapes)
    # each repeat times both sides back to back; the median of those ratios resists
    # the drift of a shared machine better than a ratio of best times
    ratios = sorted(s / b for s, b in zip(scan_rates, bare_rates))
    print(f"model: {bundle.name}, layers: {args.layers} ({len(names)} layers, {channels} channels), "
          f"batch {args.batch}, {args.images} JPEG images, {args.repeats} interleaved repeats")
    print(f"bare forward pass : {np.median(bare_rates):8.1f} images/s (median)")
    print(f"scan (top-9+stats): {np.median(scan_rates):8.1f} images/s (median)")
    print(f"ratio scan/bare   : {np.median(ratios):8.3f} median, {ratios[0]:.3f}..{ratios[-1]:.3f} range "
          f"(target >= 0.85 on CPU)")
    costs = sorted(s / c for s, c in zip(scan_rates, class_rates))  # time with classes / time without
    print(f"scan + class sums ({args.classes} classes): {np.median(class_rates):8.1f} images/s (median)")
    print(f"cost classes/scan : {np.median(costs):8.3f}x median, {costs[0]:.3f}..{costs[-1]:.3f} range "
          f"(target <= 1.1x)")


if __name__ == "__main__":
    main()
