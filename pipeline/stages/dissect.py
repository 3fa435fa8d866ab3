"""`dissect` stage: network dissection (Bau et al. 2017) of the chosen layers on a
segmentation dataset (dataset=segmentation): every unit's concept label and its IoU.

Two streamed passes (pipeline.dissect_pass over pipeline.dissect): the first sketches
each unit's activations over every readable image to find T_k (skipped when
`dissect.thresholds` names a run directory whose thresholds to use, or taken from the
scan's sketch of the same images, scan.sketch), the second sums
intersections and unions of the thresholded, upsampled maps with every concept over the
images whose labels are usable (pipeline.segmentation, pipeline.broden). Each pass
checkpoints its sums and the stream position into parts/dissect.<print>/<pass>.h5 every
`checkpoint.seconds`; a killed run resumes there (the sums are integer counts: identical
to an uninterrupted run).
Shards (shard.count) add up in the merge stage when they share their thresholds.
Also written: run_dir/dissection/detectors.png and detectors.csv, the unique detectors per
category of each layer.

results.h5:

    dissection/                    attrs: quantile, min_iou, downsample, images (dissected), thresholds_from
      concept_index (L,) int64, concept_name (L,) utf-8, concept_category (L,) utf-8
      label_area (L,) int64        pixels of each concept over the dissected images
      skipped/image (n,) int64, skipped/reason (n,) utf-8: images left out (mask or image unusable)
    layers/<layer>/dissection/     attrs: concepts (JSON names), quantile, min_iou, detectors
      threshold (C,) float32, threshold_rank_error (C,) float32, sketch (C, B) int64
      intersection (C, L) int64, unit_area (C,) int64
      iou (C, L) float32, label (C,) int64 concept index (-1: none), label_iou (C,) float32,
      label_name (C,) utf-8 the best concept's name ('' where every IoU is 0),
      category (C,) utf-8 ('' where the unit is no detector), detector (C,) bool
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pipeline.dissect_tables import (DISSECT_KEYS, DISSECT_PART, count_detectors, read_thresholds, write_concepts,
                                     write_layer)
from pipeline.errors import PipelineError
from pipeline.per_image import batch_resume
from pipeline.render.dissection import write_summary
from pipeline.stage_spec import Stage
from pipeline.store import remove_checked

logger = logging.getLogger(__name__)


def _reads(cfg) -> tuple[str, ...]:
    """The scan's activation sketch (scan.sketch), when it covers this dissection's images."""
    return () if cfg.dissect.thresholds else ("scan",)


STAGE = Stage(keys=DISSECT_KEYS, part=DISSECT_PART, reads=_reads, resume=batch_resume)


def run(ctx) -> None:
    from pipeline.dissect import mask_step
    from pipeline.dissect_pass import Streaming, dissect
    from pipeline.graph import feature_model
    from pipeline.layers import chosen_layers
    from pipeline.scan_io import shard_ids
    from pipeline.segmentation import MaskReader, check_segmentation

    cfg, run_dir, stage_print = ctx.cfg, ctx.run_dir, ctx.stage_print
    if cfg.dataset.kind != "segmentation":
        raise PipelineError(f"stage dissect needs label masks: use dataset=segmentation dataset.path=IMAGES "
                            f"dataset.masks=MASKS dataset.concepts=FILE, or dataset.format=broden dataset.path=BRODEN "
                            f"(dataset={cfg.dataset.kind} has none)")
    concepts = check_segmentation(cfg.dataset)
    store = ctx.store
    bundle = ctx.bundle
    table = ctx.images
    keys, names = zip(*chosen_layers(bundle.model, cfg.layers, bundle.renamed))
    ids = shard_ids(len(table), cfg.shard.count, cfg.shard.index)
    spec = bundle.preprocessing
    model = feature_model(bundle.model, list(names))
    step = mask_step(cfg.dissect.downsample, spec.height, spec.width)
    store.ensure_run(cfg, bundle, table)
    if store.part_print(STAGE.part) == stage_print:  # killed between writing the part and recording it
        logger.info("dissect: its tables are already written, kept")
        return
    masks = MaskReader(table, cfg.dataset, spec, concepts, step)
    stream = Streaming(table, spec, int(cfg.batch_size), cfg.checkpoint)
    work = ctx.work()
    started = time.perf_counter()
    q = float(cfg.dissect.quantile)
    if cfg.dissect.thresholds:
        limits = read_thresholds(Path(str(cfg.dissect.thresholds)), keys)
        channels = [int(t.shape[-1]) for t in model.outputs] if isinstance(model.outputs, (list, tuple)) else []
        if channels and [len(t) for t in limits] != channels:
            raise PipelineError(f"dissect.thresholds={cfg.dissect.thresholds} holds thresholds of "
                                f"{[len(t) for t in limits]} units, the layers here have {channels}: name a run "
                                f"directory that dissected these layers of this model")
        logger.info("dissect: thresholds of %s", cfg.dissect.thresholds)
    else:
        limits = None
    sketches = None if limits is not None else scan_sketches(ctx, keys, ids, len(table), model)
    result = dissect(model, list(names), spec, masks, stream, ids, len(concepts), q, step, work, limits, sketches)
    masks.close()
    store.write_images(len(table), result.errors, replace=False)
    skipped = {**result.skipped, **{i: f"image unreadable: {why}" for i, why in result.errors.items()}}
    with store.write(STAGE.part) as f:
        f.attrs["_stage_print"] = stage_print
        write_concepts(f, concepts, result.label_area, skipped, result.images, cfg, step)
        for i, key in enumerate(keys):
            write_layer(f, key, result.limits[i], result.rank_errors[i],
                        None if result.sketches is None else result.sketches[i], result.inter[i], result.area[i],
                        result.label_area, concepts, cfg, i)
    for name in ("sketch.h5", "tally.h5"):
        remove_checked(work.path / name)
    write_summary(store.parts / STAGE.part, run_dir / "dissection")
    detectors = count_detectors(store.parts / STAGE.part, keys)
    logger.info("dissect: %d images (%d skipped), %s, %.1f s", result.images, len(skipped),
                ", ".join(f"{k}: {n} detectors" for k, n in zip(keys, detectors)), time.perf_counter() - started)


def scan_sketches(ctx, keys, ids: np.ndarray, n_images: int, model) -> list[np.ndarray] | None:
    """The scan's activation sketch of every layer (layers/<key>/stats/sketch, scan.sketch)
    when it counts exactly the positions the thresholds pass would: the same images (ids
    scanned, the same unreadable ones left out) and layers; else None, said in one line."""
    if not ctx.holds("scan"):
        logger.info("dissect: no scan in this run directory: the thresholds come from a pass of their own")
        return None
    outputs = model.outputs if isinstance(model.outputs, (list, tuple)) else [model.outputs]
    shapes = [(1, 1, int(t.shape[-1])) if len(t.shape) == 2 else tuple(int(d) for d in t.shape[1:]) for t in outputs]
    wanted = np.zeros(n_images, bool)
    wanted[ids] = True
    with ctx.store.open() as f:
        missing = [k for k in keys if f"layers/{k}/stats/sketch" not in f]
        scanned = f["images/scanned"][()] if "images/scanned" in f else np.zeros(0, bool)
        readable = int(f["images/ok"][()].sum()) if "images/ok" in f else 0
        sketches = [] if missing else [f[f"layers/{k}/stats/sketch"][()] for k in keys]
    if missing:
        why = f"it kept no activation sketch of {', '.join(missing)} (scan.sketch=true keeps one)"
    elif len(scanned) != n_images or not np.array_equal(scanned, wanted):
        why = f"it scanned {int(scanned.sum())} of the images, this dissection reads {len(ids)}"
    elif any(s.shape[0] != shape[-1] or (s.sum(axis=1) != readable * shape[0] * shape[1]).any()
             for s, shape in zip(sketches, shapes)):
        why = "its sketch counts other positions than these layers' maps over the readable images"
    else:
        logger.info("dissect: thresholds from the scan's activation sketch (%d images): the IoU pass only", readable)
        return sketches
    logger.info("dissect: the scan's sketch is not used (%s): the thresholds come from a pass of their own", why)
    return None
