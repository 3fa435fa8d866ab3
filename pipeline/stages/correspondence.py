"""`correspondence` stage: does the network tie parts of an object together across
images? (Zeiler & Fergus 2013, section 4.3, Table 1.)

The same part (a box at the same place) is occluded in several images of one class.
For image i and layer l the change of the feature vector is eps_i = f_l(x_i) -
f_l(occluded x_i); the consistency score of the part is the mean, over pairs of
images, of the fraction of feature positions where sign(eps_i) and sign(eps_j)
differ (Hamming distance of the sign vectors, divided by their length). Lower means
the occlusion changes the representation in the same way in every image. Random
boxes of the same size (one position per trial, the same in every image) give the
baseline. Options live in the `correspondence` section.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from pipeline.config import is_sequence
from pipeline.correspondence import occlusion_scores, pixel_box, random_boxes
from pipeline.errors import PipelineError
from pipeline.layers import default_layers
from pipeline.models.sources import analysed_model, own_snapshots
from pipeline.render.maps import draw_stage_figures
from pipeline.render.training import CORRESPONDENCE
from pipeline.stage_spec import Stage
from pipeline.store import stored_name

logger = logging.getLogger(__name__)

# reads: this run's snapshots when it trained some (else the configured model)
STAGE = Stage(keys=("model", "dataset", "layers", "train", "correspondence"), part="correspondence.h5",
              reads=own_snapshots)


def run(ctx) -> None:
    from pipeline import train as T
    from pipeline.layers import select_layers

    cfg, run_dir = ctx.cfg, ctx.run_dir
    cc = cfg.correspondence
    bundle, class_names, _ = analysed_model(cfg, run_dir, lambda: ctx.bundle)
    model, spec = bundle.model, bundle.preprocessing
    names = select_layers(model, cc.layers, bundle.renamed) if cc.layers is not None else \
        default_layers(model, select_layers(model, cfg.layers, bundle.renamed))
    table = ctx.images
    if is_sequence(cc.images):
        ids = np.asarray([int(i) for i in cc.images], np.int64)
        if (ids < 0).any() or (ids >= len(table)).any():
            raise PipelineError(f"correspondence.images={ids.tolist()} is outside 0..{len(table) - 1}")
    else:
        ids = np.flatnonzero(table.labels == int(cc.label))[:int(cc.images)]
        if len(ids) < 2:
            raise PipelineError(f"fewer than two images of class {cc.label}: set correspondence.label "
                                f"to a class of the dataset")
    part_names = [str(n) for n in cc.part_names]
    parts = [list(p) for p in cc.parts]
    if not parts:
        raise PipelineError("correspondence.parts=[] occludes nothing: give [y0, x0, y1, x1] boxes")
    part_names = (part_names + [f"part{k}" for k in range(len(parts))])[:len(parts)]
    ids, pixels, errors = T.load_pixels(table, spec, np.sort(ids), batch_size=cfg.batch_size,
                                        desc="correspondence images")
    size = spec.size
    boxes = np.stack([pixel_box(p, size) for p in parts])
    trials = max(0, int(cc.random))
    random = np.concatenate([random_boxes(b, trials, size, seed=k) for k, b in enumerate(boxes)]) \
        if trials else np.zeros((0, 4), np.int64)
    logger.info("correspondence of %s: %d images, parts %s, %d random boxes per part, layers %s",
                bundle.name, len(ids), part_names, trials, names)
    scores = occlusion_scores(model, names, spec, pixels, np.concatenate([boxes, random]),
                              float(cc.fill), cfg.batch_size)
    part_scores = scores[:len(parts)]
    random_scores = scores[len(parts):].reshape(len(parts), trials, len(names))

    store = ctx.store
    store.ensure_run(cfg, bundle, table)
    store.write_images(len(table), errors, replace=False)
    with store.write(ctx.spec.part) as f:
        g = f.create_group("correspondence")
        g.attrs.update(model=bundle.name, layers=json.dumps(names), parts=json.dumps(part_names),
                       stored_layers=json.dumps([stored_name(n) for n in names]), fill=float(cc.fill))
        g["images"] = ids
        g["boxes"] = boxes.astype(np.int32)
        g["random_boxes"] = random.reshape(len(parts), trials, 4).astype(np.int32)
        g["score"] = part_scores
        g["random_score"] = random_scores
    draw_stage_figures(ctx.part, run_dir, "correspondence")  # from the part: the report redraws the same
    logger.info("correspondence scores in %s", run_dir / CORRESPONDENCE)
