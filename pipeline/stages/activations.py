"""`activations` stage: the feature maps of chosen layers for a few chosen images.

A thin wrapper over `pipeline.explain.ActivationExtractor`. Which images
(`activations.images`): the first N, a list of image ids, or the top images of chosen
channels in the scan's results ({layer: NAME, channels: [...], k: 1}).

results.h5:

    activations/image            (n,) int64 image ids, in the order chosen (unreadable ones left out)
    activations/<layer>          (n, H, W, C) float16, one chunk per image, gzip
                                 attrs: name, depth, shape (H, W, C)
    activations/blank_fraction   (n, L) float32 share of channels that are constant over
                                 the map (all zero after a ReLU); attrs: layers (JSON)

Sheets in run_dir/activations/:

    <layer>_grid_<id>.png    the first `activations.grid` channels as a square grid
    <layer>_<id>.png         every channel, `activations.per_row` tiles a row, each channel
                             standardised for display; blank channels flat light grey
    blank_fraction.png       the share of blank channels against depth
"""

from __future__ import annotations

import json
import logging

import numpy as np
from pipeline.errors import PipelineError
from pipeline.per_image import batch_resume, per_image_part, scan_for_topk
from pipeline.selection import choose_images
from pipeline.stage_spec import Stage

logger = logging.getLogger(__name__)

# images chosen from the scan's top-k make the maps depend on the scan
STAGE = Stage(keys=("model", "dataset", "layers", "activations"), part="activations.h5",
              needs=scan_for_topk("activations.images"), resume=batch_resume)
FLOAT16_MAX = float(np.finfo(np.float16).max)


def run(ctx) -> None:
    from pipeline.explain import ActivationExtractor, blank_channels
    from pipeline.graph import flat_layers
    from pipeline.layers import chosen_layers
    from pipeline.preprocess import normalize

    cfg = ctx.cfg
    a = cfg.activations
    bundle = ctx.bundle
    table = ctx.images
    ids = choose_images(a.images, table, ctx.store, "activations")
    key_of = {name: key for key, name in chosen_layers(bundle.model, a.layers if a.layers is not None else cfg.layers,
                                                                   bundle.renamed)}
    names = list(key_of)
    shapes = {n.name: n.output_shape for n in flat_layers(bundle.model)}
    flat = [n for n in names if len(shapes[n]) != 3]
    if flat:
        logger.warning("activations: %s have no spatial map (shape %s); left out", ", ".join(flat),
                       ", ".join(str(shapes[n]) for n in flat))
    names = [n for n in names if len(shapes[n]) == 3]
    if not names:
        raise PipelineError("activations: no chosen layer has an (H, W, C) output: set activations.layers=[...]")
    if int(a.grid) < 1 or int(a.per_row) < 1:
        raise PipelineError("activations.grid and activations.per_row must be at least 1")
    spec = bundle.preprocessing
    extractor = ActivationExtractor(bundle.model, names, spec)
    logger.info("activations of %d layer(s) for %d image(s)", len(names), len(ids))
    clipped = set()

    def compute(batch_ids, pixels):
        maps = extractor(normalize(pixels, spec.normalize), batch_size=len(batch_ids))
        rows = {"activations/image": batch_ids.astype(np.int64),
                "activations/blank_fraction": np.stack([blank_channels(maps[n]).mean(axis=1) for n in names],
                                                       axis=1).astype(np.float32)}
        for n in names:
            if np.abs(maps[n]).max(initial=0.0) > FLOAT16_MAX:
                clipped.add(n)
            rows[f"activations/{key_of[n]}"] = np.clip(maps[n], -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
        return rows

    with per_image_part(ctx, ids, compute, draw=True) as (f, errors):  # none readable: empty tables
        g = f.require_group("activations")
        if "image" not in g:  # every chosen image unreadable: empty tables, the sheets say so
            g["image"] = np.zeros(0, np.int64)
            g["blank_fraction"] = np.zeros((0, len(names)), np.float32)
        g.attrs.update(grid=int(a.grid), per_row=int(a.per_row))  # the sheets' layout (render.maps)
        g["blank_fraction"].attrs.update(layers=json.dumps(names), keys=json.dumps([key_of[n] for n in names]))
        for depth, n in enumerate(names):
            if key_of[n] in g:
                g[key_of[n]].attrs.update(name=n, depth=depth, shape=np.asarray(shapes[n], np.int64))
    for n in sorted(clipped):
        logger.warning("activations of %s exceed float16's range; stored clipped", n)
    if errors:
        logger.warning("activations: %d chosen image(s) unreadable, left out", len(errors))
