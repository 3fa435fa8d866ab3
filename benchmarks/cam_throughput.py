"""Grad-CAM throughput on the embedded MobileNetV2: pipeline.explain against other ways.

Measured in one run, on the same normalised input batch, for the predicted class of each
image at the default target layer (features_18_2, 7x7x1280):

* cnn-lens   pipeline.explain.CamExplainer, batches of --batch (raw 7x7 maps, as the
             cam stage stores them), and the same plus a bilinear upsample to 224x224;
* tutorial   the textbook tf.GradientTape recipe (the Keras Grad-CAM example), eager,
             batched, and one image at a time as the example does it;
* xplique    xplique.attributions.GradCAM (an optional dependency; it upsamples every map
             to the input size with bicubic interpolation). It is told the predicted
             classes, computed beforehand and not timed.

Every method is warmed up on one batch first (tracing), then timed over --images images;
the methods take turns for --repeats rounds and each one's best run counts. Prints images/s and each rate as a ratio of cnn-lens'.

xplique declares tensorflow<=2.20 as a dependency, so installing it the ordinary way would
replace TensorFlow. To measure it beside TensorFlow 2.21 install it and its imports into a
separate folder without dependencies and put that folder on PYTHONPATH:

    pip install --no-deps --target xplique-libs xplique deprecated einops \\
        opencv-python-headless "scikit-learn<=1.7.2" joblib threadpoolctl \\
        "tensorflow-probability==0.25.0" tf-keras dm-tree
    PYTHONPATH=xplique-libs python benchmarks/cam_throughput.py

Without it the benchmark still runs and says why xplique was not measured.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def sample_inputs(n: int, spec) -> tf.Tensor:
    """The embedded sample photos as model inputs, repeated to n images."""
    from omegaconf import OmegaConf

    from pipeline.datasets import BatchStream, list_images
    from pipeline.preprocess import normalize

    table = list_images(OmegaConf.create(dict(kind="samples", path=None, split=None, limit=None)))
    pixels = np.concatenate([p.numpy() for _, p in BatchStream(table, spec, 32)])
    reps = -(-n // len(pixels))
    return normalize(tf.constant(np.concatenate([pixels] * reps)[:n]), spec.normalize)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def tutorial_batched(grad_model, x, batch: int):
    maps_out = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        with tf.GradientTape() as tape:
            maps, preds = grad_model(xb)
            top = tf.argmax(preds, axis=1)
            score = tf.gather(preds, top, batch_dims=1)
        grads = tape.gradient(score, maps)
        pooled = tf.reduce_mean(grads, axis=(1, 2))
        maps_out.append(tf.nn.relu(tf.einsum("bhwc,bc->bhw", maps, pooled)).numpy())
    return np.concatenate(maps_out)


def tutorial_one_by_one(grad_model, x):
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            maps, preds = grad_model(x[i:i + 1])
            score = preds[:, int(tf.argmax(preds[0]))]
        grads = tape.gradient(score, maps)
        pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
        heat = maps[0] @ pooled[..., None]
        out.append(tf.nn.relu(tf.squeeze(heat)).numpy())
    return np.stack(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images per timed run (64)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of timed runs, methods interleaved; each method's best counts (3)")
    parser.add_argument("--one-by-one", type=int, default=8,
                        help="images for the one-at-a-time tutorial loop (8; 0 skips it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from omegaconf import OmegaConf

    import keras
    from pipeline.explain import CamExplainer
    from pipeline.models.sources import load_model

    bundle = load_model(OmegaConf.create(dict(kind="mobilenet_v2", weights_path=None)))
    model = bundle.model
    x = sample_inputs(args.images, bundle.preprocessing)
    explainer = CamExplainer(model)
    layer = explainer.layer
    print(f"MobileNetV2, Grad-CAM of the predicted class at {layer} {explainer.map_shape}, "
          f"{args.images} images, batch {args.batch}, {os.cpu_count()} CPU cores visible, "
          f"devices: {', '.join(d.device_type for d in tf.config.list_logical_devices())}")
    results: dict[str, np.ndarray] = {}

    def ours():
        results["cnn-lens"] = explainer.compute(x, None, ("gradcam",), batch_size=args.batch)["gradcam"].maps

    def ours_upsampled():
        maps = explainer.compute(x, None, ("gradcam",), batch_size=args.batch)["gradcam"].maps
        tf.image.resize(maps[..., None], x.shape[1:3], method="bilinear").numpy()

    grad_model = keras.Model(model.input, [model.get_layer(layer).output, model.output])

    def tutorial():
        results["tutorial"] = tutorial_batched(grad_model, x, args.batch)

    # (name, function, images it explains); each is warmed up (traced) first
    runs = [("cnn-lens", ours, args.images), ("cnn-lens + upsample to input", ours_upsampled, args.images),
            ("tutorial GradientTape, batched", tutorial, args.images)]
    explainer.compute(x[:args.batch], None, ("gradcam",), batch_size=args.batch)
    if args.images % args.batch:
        explainer.compute(x[:args.images % args.batch], None, ("gradcam",), batch_size=args.batch)
    tutorial_batched(grad_model, x[:args.batch], args.batch)

    why_not = None
    try:
        import xplique
        from xplique.attributions import GradCAM
    except Exception as err:  # not installed, or its own imports fail
        why_not = (f"xplique not measured: it does not import here ({type(err).__name__}: "
                   f"{str(err).splitlines()[0] if str(err) else ''}); see this file's docstring to install it")
    if why_not is None:
        try:
            classes = np.concatenate([model(x[s:s + args.batch]).numpy().argmax(axis=1)
                                      for s in range(0, args.images, args.batch)])
            targets = tf.one_hot(classes, int(model.output.shape[-1]))
            xp = GradCAM(model, conv_layer=layer, batch_size=args.batch)
            xp.explain(x[:args.batch], targets[:args.batch])  # trace
            runs.append((f"xplique {xplique.__version__} GradCAM (upsamples, bicubic)",
                         lambda: xp.explain(x, targets), args.images))
        except Exception as err:
            why_not = f"xplique not measured: it failed on this model ({type(err).__name__}: {str(err).splitlines()[0]})"

    # rounds interleave the methods, so a burst of load on a shared machine hits them alike
    best = {name: float("inf") for name, _, _ in runs}
    for _ in range(args.repeats):
        for name, fn, _ in runs:
            best[name] = min(best[name], timed(fn, 1))
    rates = {name: n / best[name] for name, _, n in runs}
    if args.one_by_one:
        n = min(args.one_by_one, args.images)
        tutorial_one_by_one(grad_model, x[:1])
        rates["tutorial GradientTape, one image at a time"] = n / timed(
            lambda: tutorial_one_by_one(grad_model, x[:n]), 1)

    agree = np.abs(results["cnn-lens"] - results["tutorial"]).max() / max(results["tutorial"].max(), 1e-12)
    print(f"maps agree with the tutorial recipe to {agree:.1e} (max difference / max value)")
    base = rates["cnn-lens"]
    width = max(len(k) for k in rates)
    for name, rate in rates.items():
        print(f"  {name:<{width}}  {rate:8.1f} images/s   cnn-lens / this = {base / rate:5.2f}x")
    if why_not:
        print(why_not)
    others = {k: v for k, v in rates.items() if not k.startswith("cnn-lens")}
    fastest = max(others, key=others.get)
    verdict = "at least as fast as" if base >= others[fastest] else "SLOWER than"
    print(f"cnn-lens Grad-CAM is {verdict} the fastest other measured ({fastest}): "
          f"{base / others[fastest]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
