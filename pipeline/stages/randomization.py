"""`randomization` stage: the model-randomization sanity check (Adebayo et al. 2018).

For `randomization.images`, the Grad-CAM map (at `cam.layer`) and the guided-backprop map of
each image's predicted class are computed, then recomputed after re-initialising the
weighted layers from the top down, cumulatively, in `randomization.steps` steps
(pipeline.randomization). The Spearman rank correlation of each new map with the original
one says whether the method depends on the weights: Grad-CAM's should fall towards 0,
guided backpropagation is the known negative control. The model's weights are restored
afterwards.

results.h5:

    randomization/   attrs: layer (the CAM layer), seed
      image (n,) int64; class (n,) int64     the images and their predicted classes
      layers (steps,) utf-8                  the lowest layer re-initialised at each step
      gradcam, guided_backprop (steps, n) float32   Spearman correlation with the original maps
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.datasets import BatchStream
from pipeline.errors import StageSkipped
from pipeline.per_image import none_read, scan_for_topk
from pipeline.selection import choose_images
from pipeline.stage_spec import Stage
from pipeline.store import write_strings

logger = logging.getLogger(__name__)

STAGE = Stage(keys=("model", "dataset", "cam.layer", "randomization"), part="randomization.h5",
              needs=scan_for_topk("randomization.images"))


def run(ctx) -> None:
    from pipeline.explain import CamExplainer
    from pipeline.graph import NoClassScores
    from pipeline.preprocess import normalize
    from pipeline.randomization import cascade

    cfg, store = ctx.cfg, ctx.store
    r = cfg.randomization
    bundle = ctx.bundle
    table = ctx.images
    ids = choose_images(r.images, table, store, "randomization")
    spec = bundle.preprocessing
    try:  # only the map layer and the class scores matter here, not cam's target settings
        explainer = CamExplainer(bundle.model, bundle.layer(cfg.cam.layer), spec, output=cfg.model.output)
    except NoClassScores as err:
        raise StageSkipped(str(err)) from None
    store.ensure_run(cfg, bundle, table)
    stream = BatchStream(table, spec, max(len(ids), 1), ids=ids)
    read = [(i, p) for i, p in stream]
    store.write_images(len(table), stream.errors, replace=False)
    if not read:
        raise none_read("randomization", "randomization.images", stream.errors, table.paths)
    image_ids = np.concatenate([i for i, _ in read]).astype(np.int64)
    x = normalize(np.concatenate([p for _, p in read]), spec.normalize)
    logger.info("randomization: %d image(s), Grad-CAM at %s and guided backprop, %d steps from the top",
                len(image_ids), explainer.layer, int(r.steps))
    layers, cam_rho, guided_rho, classes = cascade(explainer, x, int(r.steps), int(r.seed))
    with store.write(ctx.spec.part) as f:
        g = f.create_group("randomization")
        g.attrs.update(layer=explainer.layer, seed=int(r.seed))
        g["image"] = image_ids
        g["class"] = classes.astype(np.int64)
        write_strings(g, "layers", layers)
        g["gradcam"] = cam_rho
        g["guided_backprop"] = guided_rho
    for name, a, b in zip(layers, cam_rho, guided_rho):
        logger.info("randomized down to %s: Spearman with the original maps, Grad-CAM %.3f, guided backprop %.3f",
                    name, float(a.mean()), float(b.mean()))
