"""Score-CAM, exact against Faster Score-CAM (cam.scorecam_channels=N), on the embedded
MobileNetV2 at its default target layer (features_18_2, 7x7x1280), same images, same run.

Prints seconds per image of each, the speed-up, and how close the approximate maps are to
the exact ones (Spearman rank correlation over the 7x7 positions, and whether the peak is
at the same position).

    python benchmarks/scorecam_speed.py [--images 2] [--channels 32]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline.datasets import BatchStream, list_images  # noqa: E402
from pipeline.explain import CamExplainer  # noqa: E402
from pipeline.models.sources import load_model  # noqa: E402
from pipeline.preprocess import normalize  # noqa: E402


def ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32)
    args = parser.parse_args()

    bundle = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))
    spec = bundle.preprocessing
    table = list_images(OmegaConf.create(dict(kind="samples", path=None, split=None, limit=args.images)))
    _, pixels = next(iter(BatchStream(table, spec, args.images)))
    x = normalize(pixels, spec.normalize)
    explainer = CamExplainer(bundle.model)
    explainer.compute(x[:1], None, ("scorecam",), scorecam_channels=4)  # warm-up: tracing
    timed = {}
    for name, channels in (("exact", None), (f"channels={args.channels}", args.channels)):
        start = time.perf_counter()
        timed[name] = explainer.compute(x, None, ("scorecam",), scorecam_channels=channels)["scorecam"].maps
        timed[name + " s"] = (time.perf_counter() - start) / len(x)
    exact, approx = timed["exact"], timed[f"channels={args.channels}"]
    rho = [np.corrcoef(ranks(e.ravel()), ranks(a.ravel()))[0, 1] for e, a in zip(exact, approx)]
    same_peak = [e.argmax() == a.argmax() for e, a in zip(exact, approx)]
    print(f"model: {bundle.name}, layer {explainer.layer}, {len(x)} sample photos")
    print(f"exact Score-CAM          : {timed['exact s']:8.2f} s per image")
    print(f"Faster Score-CAM (N={args.channels:<4d}): {timed[f'channels={args.channels} s']:8.2f} s per image")
    print(f"speed-up                 : {timed['exact s'] / timed[f'channels={args.channels} s']:8.1f}x")
    print(f"rank correlation with exact maps: {', '.join(f'{r:.3f}' for r in rho)}; "
          f"same peak: {sum(same_peak)} of {len(same_peak)}")


if __name__ == "__main__":
    main()
