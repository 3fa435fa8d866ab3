"""Our scan against the classic approach, same model, images and layers, same run.

The classic approach is what the Deep Visualization Toolbox's max-tracking did:
one image per forward pass, then for every channel a Python insertion into that
channel's sorted list of the best values. Ours streams batches through tf.data
and keeps the tables on the device. Prints both rates, the speed-up, and the
projected time of a scan of ImageNet's training set (1,281,167 images) on this
machine.

    python benchmarks/classic_baseline.py [--images 96] [--layers default]
"""

from __future__ import annotations

import argparse
import bisect
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from scan_throughput import write_jpegs  # noqa: E402
from pipeline.datasets import BatchStream  # noqa: E402
from pipeline.graph import feature_model  # noqa: E402
from pipeline.layers import select_layers  # noqa: E402
from pipeline.models.sources import load_model  # noqa: E402
from pipeline.preprocess import normalize, to_model_pixels  # noqa: E402
from pipeline.scan import Scanner  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def classic(features, spec, paths, k):
    """One image at a time; per channel a sorted Python list of (value, image, y, x)."""
    import tensorflow as tf

    tables = None
    for image_id, path in enumerate(paths):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        pixels = to_model_pixels(image, spec)
        outputs = features(normalize(pixels[None], spec.normalize), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        if tables is None:
            tables = [[[] for _ in range(o.shape[-1])] for o in outputs]
        for out, table in zip(outputs, tables):
            maps = out.numpy()[0]
            for c, best in enumerate(table):
                channel = maps[..., c]
                y, x = np.unravel_index(np.argmax(channel), channel.shape)
                bisect.insort(best, (-float(channel[y, x]), image_id, int(y), int(x)))
                del best[k:]
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--layers", default="default")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    bundle = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))
    names = select_layers(bundle.model, args.layers)
    features = feature_model(bundle.model, names)
    spec = bundle.preprocessing
    with tempfile.TemporaryDirectory() as tmp:
        table = write_jpegs(Path(tmp), args.images)
        classic(features, spec, table.paths[:4], 9)  # warm-up
        start = time.perf_counter()
        tables = classic(features, spec, table.paths, 9)
        classic_rate = args.images / (time.perf_counter() - start)

        scanner = Scanner(features, names, spec, k=9)
        for ids, pixels in BatchStream(table, spec, args.batch, ids=np.arange(args.batch)):  # warm-up
            scanner.update(pixels, ids)
        scanner.reset()
        start = time.perf_counter()
        for ids, pixels in BatchStream(table, spec, args.batch):
            scanner.update(pixels, ids)
        ours_rate = args.images / (time.perf_counter() - start)

    # both sides found the same winners (up to float noise between batch sizes 1 and 32)
    top, _ = scanner.results()[-1]
    classic_best = np.array([[-v for v, *_ in best[:1]] for best in tables[-1]])[:, 0]
    np.testing.assert_allclose(top.value[:, 0], classic_best, rtol=1e-3, atol=1e-4)
    same = np.mean([top.image[c, 0] == best[0][1] for c, best in enumerate(tables[-1])])
    channels = sum(s[-1] for s in scanner.map_shapes)
    print(f"model: {bundle.name}, layers: {args.layers} ({len(names)} layers, {channels} channels), "
          f"{args.images} JPEG images")
    print(f"classic (1 image/pass, Python insertion): {classic_rate:7.2f} images/s")
    print(f"ours (batch {args.batch}, tables on device):       {ours_rate:7.2f} images/s")
    print(f"same top-1 image in the last layer: {same:.1%} of channels (the rest: near-ties)")
    print(f"speed-up: {ours_rate / classic_rate:.1f}x")
    print(f"projected ImageNet-train scan ({IMAGENET_TRAIN:,} images) on this machine: "
          f"ours {IMAGENET_TRAIN / ours_rate / 3600:.1f} h, classic {IMAGENET_TRAIN / classic_rate / 3600:.1f} h")


if __name__ == "__main__":
    main()
