"""Filter patterns on the embedded MobileNetV2 at the default recipe: speed and strength.

For each layer, optimises the patterns of the first --channels channels (one batch,
the default recipe of the filters stage: Fourier parameterisation, transforms, Adam,
256 steps at 128 px, stored at 224 px) and prints

* channels per minute (wall time of the whole call, graph tracing included);
* the ratio of the mean activation each stored pattern reaches (over the whole map, at
  224 px) to the dataset's top-1 activation of the same channel (the largest activation
  at any one position over the sample photos, what the scan keeps as topk/value[:, 0]),
  and, for a like-for-like view, to the dataset's best per-image mean activation.

    python benchmarks/filter_patterns.py [--layers features_7_conv_0_2] [--channels 16]
           [--steps 256] [--size 128] [--method fourier] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.datasets import BatchStream, list_images  # noqa: E402
from pipeline.graph import feature_model  # noqa: E402
from pipeline.models.sources import load_model  # noqa: E402
from pipeline.patterns import Recipe, filter_patterns  # noqa: E402
from pipeline.preprocess import normalize  # noqa: E402


def dataset_activations(model, spec, layers: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer: (top-1 activation, best per-image mean activation) per channel over the sample photos."""
    table = list_images(OmegaConf.create(dict(kind="samples", path=None, split=None, limit=None)))
    features = feature_model(model, layers)
    top = {n: None for n in layers}
    for _, pixels in BatchStream(table, spec, 16):
        outs = features(normalize(pixels, spec.normalize))
        outs = [outs] if len(layers) == 1 else outs
        for name, out in zip(layers, outs):
            out = out.numpy()
            peak, mean = out.max(axis=(0, 1, 2)), out.mean(axis=(1, 2)).max(axis=0)
            if top[name] is None:
                top[name] = (peak, mean)
            else:
                top[name] = (np.maximum(top[name][0], peak), np.maximum(top[name][1], mean))
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", default=["features_7_conv_0_2"])
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--method", default="fourier")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    bundle = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))
    model, spec = bundle.model, bundle.preprocessing
    reference = dataset_activations(model, spec, args.layers)
    recipe = Recipe(method=args.method, steps=args.steps, size=args.size)
    print(f"MobileNetV2, {args.method}, {args.steps} steps at {args.size} px, batch {args.batch}, "
          f"{args.channels} channels per layer, stored at {spec.height}x{spec.width} px")
    for layer in args.layers:
        start = time.perf_counter()
        result = filter_patterns(model, spec, layer, range(args.channels), recipe=recipe, batch=args.batch,
                                 progress=False)
        seconds = time.perf_counter() - start
        peak, mean = (r[:args.channels] for r in reference[layer])
        reached = result.best_values
        to_top1 = reached / np.maximum(peak, 1e-6)
        to_mean = reached / np.maximum(mean, 1e-6)
        print(f"{layer}: {args.channels / seconds * 60:.1f} channels/min ({seconds:.1f} s); "
              f"pattern mean / dataset top-1: median {np.median(to_top1):.2f} "
              f"(min {to_top1.min():.2f}, max {to_top1.max():.2f}); "
              f"pattern mean / dataset best image mean: median {np.median(to_mean):.2f}")


if __name__ == "__main__":
    main()
