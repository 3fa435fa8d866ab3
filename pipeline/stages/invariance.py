"""`invariance` stage: what the features ignore (Zeiler & Fergus 2013, Fig. 5).

Chosen images are shifted vertically, rotated and scaled over a range of values.
For every layer it measures the Euclidean distance between the feature vector of
the original image and that of each transformed one, and for the model output the
probability of the true class. All transformed images of one kind are computed on
the device in batches with one projective warp (bilinear; the area pulled in from
outside the image is filled as `invariance.fill_mode` says).

The model: `model=snapshot` loads that snapshot; otherwise the last snapshot of this
run's own train stage if there is one; otherwise the run's model (any model works,
e.g. the embedded MobileNetV2).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from pipeline.errors import PipelineError
from pipeline.invariance import FILL_MODES, IDENTITY, KINDS, invariance_curves, parameter_grid
from pipeline.selection import choose_images
from pipeline.layers import default_layers
from pipeline.models.sources import analysed_model
from pipeline.per_image import none_read
from pipeline.render.maps import draw_stage_figures
from pipeline.render.training import INVARIANCE
from pipeline.stage_spec import Stage
from pipeline.store import stored_name, write_strings

logger = logging.getLogger(__name__)

# reads: this run's train results when there: its snapshots (unless model=snapshot names another
# run) and, whatever the model, its held-out images, from which the images are chosen
STAGE = Stage(keys=("model", "dataset", "layers", "train", "invariance.images", "invariance.layers",
                    "invariance.translation", "invariance.rotation", "invariance.scale", "invariance.steps",
                    "invariance.fill_mode", "invariance.target"),
              part="invariance.h5", reads=("train",))


def run(ctx) -> None:
    from pipeline import train as T
    from pipeline.layers import select_layers

    cfg, run_dir = ctx.cfg, ctx.run_dir
    ic = cfg.invariance
    if ic.fill_mode not in FILL_MODES:
        raise PipelineError(f"invariance.fill_mode={ic.fill_mode}: use one of {', '.join(FILL_MODES)}")
    grids = {kind: parameter_grid(*_pair(ic[kind], kind), int(ic.steps), IDENTITY[kind]) for kind in KINDS}
    bundle, class_names, bundle_is_snapshot = analysed_model(cfg, run_dir, lambda: ctx.bundle)
    model, spec = bundle.model, bundle.preprocessing
    if ic.layers is not None:
        names = select_layers(model, ic.layers, bundle.renamed)
    else:
        names = default_layers(model, select_layers(model, cfg.layers, bundle.renamed))
    table = ctx.images
    store = ctx.store
    candidates = np.arange(len(table), dtype=np.int64)
    if ctx.holds("train"):
        with store.open() as f:
            if len(f["train/val_ids"]):
                candidates = f["train/val_ids"][()]  # held-out images, never trained on
    wanted = choose_images(ic.images, table, store, "invariance", candidates=candidates, per_class=True)
    ids, pixels, errors = T.load_pixels(table, spec, np.sort(wanted), batch_size=cfg.batch_size,
                                        desc="invariance images")
    if len(ids) == 0:
        raise none_read("invariance", "invariance.images", errors, table.paths)
    order = {int(i): k for k, i in enumerate(ids)}
    keep = [int(i) for i in wanted if int(i) in order]
    pixels = pixels[[order[i] for i in keep]]
    ids = np.asarray(keep, np.int64)

    import tensorflow as tf

    from pipeline.preprocess import normalize

    out = model(normalize(tf.constant(pixels), spec.normalize), training=False)
    out = out[0] if isinstance(out, (list, tuple)) else out
    probs0 = out.numpy() if T.outputs_probabilities(model) else tf.nn.softmax(out).numpy()
    labels = table.labels[ids]
    if ic.target not in ("auto", "label", "predicted"):
        raise PipelineError(f"invariance.target={ic.target}: use auto, label or predicted")
    # auto: dataset labels name the model's classes only for a network trained on them here
    use_labels = ic.target == "label" or (ic.target == "auto" and bundle_is_snapshot)
    target_is_label = use_labels & (labels >= 0) & (labels < probs0.shape[-1])
    targets = np.where(target_is_label, labels, probs0.argmax(axis=1)).astype(np.int64)
    logger.info("invariance of %s: images %s, layers %s", bundle.name, ids.tolist(), names)

    curves = invariance_curves(model, names, spec, pixels, targets, {k: grids[k][0] for k in KINDS}, ic.fill_mode,
                               cfg.batch_size)

    store.ensure_run(cfg, bundle, table)
    store.write_images(len(table), errors, replace=False)
    with store.write(ctx.spec.part) as f:
        g = f.create_group("invariance")
        g.attrs.update(model=bundle.name, layers=json.dumps(names), fill=ic.fill_mode,
                       units=json.dumps(dict(translation="fraction of the input side (down is positive)",
                                             rotation="degrees, counter-clockwise", scale="zoom factor")))
        g["images"], g["target"], g["target_is_label"] = ids, targets, target_is_label
        write_strings(g, "target_name", [class_names[t] if t < len(class_names) else f"class {t}"
                                         for t in targets])
        g["reference_probability"] = probs0[np.arange(len(ids)), targets].astype(np.float32)
        norms = g.create_group("norm")
        for kind in KINDS:
            distance, norm, probability, predicted, shown = curves[kind]
            k = g.create_group(kind)
            k["values"] = grids[kind][0]
            k.attrs["identity"] = grids[kind][1]
            dist = k.create_group("distance")
            for name in names:
                dist[stored_name(name)] = distance[name]
                if stored_name(name) not in norms:
                    norms[stored_name(name)] = norm[name]
            k["probability"], k["predicted"] = probability, predicted
            k.create_dataset("pixels", data=shown, compression="gzip", compression_opts=4,
                             chunks=(1, 1) + shown.shape[2:])
    draw_stage_figures(ctx.part, run_dir, "invariance")  # from the part: the report redraws the same
    logger.info("invariance curves in %s", run_dir / INVARIANCE)


def _pair(value, kind: str) -> tuple[float, float]:
    values = list(value)
    if len(values) != 2:
        raise PipelineError(f"invariance.{kind}={values}: give a range [low, high]")
    return float(values[0]), float(values[1])
