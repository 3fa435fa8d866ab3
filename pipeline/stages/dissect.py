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

import json
import logging
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.per_image import batch_resume
from pipeline.render.dissection import write_summary
from pipeline.stage_spec import Stage
from pipeline.store import Store, open_h5, read_strings, remove_checked, write_strings

logger = logging.getLogger(__name__)



def _reads(cfg) -> tuple[str, ...]:
    """The scan's activation sketch (scan.sketch), when it covers this dissection's images."""
    return () if cfg.dissect.thresholds else ("scan",)


STAGE = Stage(keys=("model", "dataset", "layers", "dissect", "shard"), part="dissect.h5", reads=_reads,
              resume=batch_resume)


def run(ctx) -> None:
    from pipeline.dissect_pass import Streaming, dissect
    from pipeline.graph import feature_model
    from pipeline.layers import chosen_layers
    from pipeline.segmentation import MaskReader, check_segmentation
    from pipeline.stages.scan import shard_ids

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
    detectors = _count_detectors(store.parts / STAGE.part, keys)
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


def mask_step(setting, height: int, width: int) -> int:
    """The mask resolution's step: dissect.downsample, or where it is null 2 when 2 divides
    both sides of the model input (NetDissect-Lite's 112x112 masks for 224 inputs), else 1."""
    if setting is None:
        return 1 if height % 2 or width % 2 else 2
    step = int(setting)
    if height % step or width % step:
        raise PipelineError(f"dissect.downsample={step} does not divide the {height}x{width} model input: "
                            f"use a divisor of both sides (1 keeps the input's resolution)")
    return step


def read_thresholds(run_dir: Path, keys) -> list[np.ndarray]:
    """Per layer key, the thresholds a finished dissection in `run_dir` found."""
    with Store(run_dir).open() as f:
        missing = [k for k in keys if f"layers/{k}/dissection/threshold" not in f]
        if missing:
            raise PipelineError(f"dissect.thresholds={run_dir} holds no dissection of layer(s) {', '.join(missing)}: "
                                f"name a run directory that dissected the same layers")
        return [f[f"layers/{k}/dissection/threshold"][()] for k in keys]


def write_concepts(f, concepts, label_area: np.ndarray, skipped: dict, images: int, cfg, downsample: int) -> None:
    g = f.create_group("dissection")
    g["concept_index"] = concepts.index
    write_strings(g, "concept_name", concepts.names)
    write_strings(g, "concept_category", concepts.categories)
    g["label_area"] = np.asarray(label_area, np.int64)
    s = g.create_group("skipped")
    s["image"] = np.asarray(sorted(skipped), np.int64)
    write_strings(s, "reason", [skipped[i] for i in sorted(skipped)])
    g.attrs.update(quantile=float(cfg.dissect.quantile), min_iou=float(cfg.dissect.min_iou), images=int(images),
                   downsample=int(downsample), thresholds_from=str(cfg.dissect.thresholds or ""))


def write_layer(f, key: str, limit, rank_error, sketch, inter, unit_area, label_area, concepts, cfg,
                depth: int = 0) -> None:
    """layers/<key>/dissection/: the sums (they merge) and the table and labels read from them."""
    from pipeline.dissect import best_labels, iou_table

    g = f.create_group(f"layers/{key}/dissection")
    g["threshold"] = np.asarray(limit, np.float32)
    g["threshold_rank_error"] = np.asarray(rank_error, np.float32)
    if sketch is not None:
        g.create_dataset("sketch", data=sketch, compression="gzip", shuffle=True)
    g["intersection"] = np.asarray(inter, np.int64)
    g["unit_area"] = np.asarray(unit_area, np.int64)
    iou = iou_table(inter, unit_area, label_area)
    column, best = best_labels(iou)
    detector = best > float(cfg.dissect.min_iou)
    g.create_dataset("iou", data=iou, compression="gzip")
    g["label"] = np.where(column >= 0, concepts.index[np.maximum(column, 0)], -1).astype(np.int64)
    g["label_iou"] = best
    g["detector"] = detector
    write_strings(g, "category", [concepts.categories[c] if d else "" for c, d in zip(column, detector)])
    write_strings(g, "label_name", [concepts.names[c] if c >= 0 else "" for c in column])
    g.attrs.update(depth=depth, concepts=json.dumps(concepts.names), quantile=float(cfg.dissect.quantile),
                   min_iou=float(cfg.dissect.min_iou), detectors=int(detector.sum()))


SHARED_SETTINGS = ("quantile", "downsample")  # change the sums; min_iou is read from them at the merge


def _check_settings(shards, parts, cfg) -> int:
    """Every shard and this merge dissected with one dissect.quantile and dissect.downsample
    (null in the merge: the shards' own, one for all); a mismatch is one line naming the key
    and the shard. Returns the shards' downsample."""
    first = int(parts[0]["dissection"].attrs.get("downsample", 1))
    setting = cfg.dissect.downsample
    expected = {"quantile": float(cfg.dissect.quantile), "downsample": first if setting is None else int(setting)}
    for shard, part in zip(shards, parts):
        attrs = part["dissection"].attrs
        ran = {"quantile": float(attrs["quantile"]), "downsample": int(attrs.get("downsample", 1))}
        for key in SHARED_SETTINGS:
            if ran[key] != expected[key]:
                raise PipelineError(f"shard {shard.run_dir} dissected with dissect.{key}={ran[key]}, this merge has "
                                    f"dissect.{key}={expected[key]}: merge shards run with one dissect.{key}, "
                                    f"and pass it to the merge")
    return expected["downsample"]


def _count_detectors(part: Path, keys) -> list[int]:
    with open_h5(part, "part file") as f:
        return [int(f[f"layers/{k}/dissection"].attrs["detectors"]) for k in keys]


def merge_shards(shards, store: Store, cfg) -> None:
    """The merge stage's part for dissections: the shards' sums added. Shards that used one
    set of thresholds (dissect.thresholds) merge to the unsharded tables; shards that found
    their own merge their sketches only, into thresholds for a second sharded pass."""
    from pipeline.dissect import thresholds
    from pipeline.segmentation import check_segmentation
    from pipeline.store import fingerprint

    concepts = check_segmentation(cfg.dataset)
    parts = [open_h5(s.parts / STAGE.part, "part file") for s in shards]
    try:
        step = _check_settings(shards, parts, cfg)
        keys = [k for k in parts[0]["layers"] if "dissection" in parts[0][f"layers/{k}"]]
        limits = [[p[f"layers/{k}/dissection/threshold"][()] for p in parts] for k in keys]
        shared = all(np.array_equal(t[0], other, equal_nan=True) for t in limits for other in t[1:])
        if not shared and not all("sketch" in p[f"layers/{k}/dissection"] for p in parts for k in keys):
            raise PipelineError("the dissect shards used different thresholds (dissect.thresholds) and keep no sketch "
                                "to merge: run them again with one dissect.thresholds=DIR")
        skipped, images = {}, 0
        for p in parts:
            g = p["dissection"]
            skipped.update(zip(g["skipped/image"][()].tolist(), read_strings(g["skipped/reason"])))
            images += int(g.attrs["images"])
        total = lambda path: sum(p[path][()] for p in parts)  # noqa: E731 - the sums of every shard
        label_area = total("dissection/label_area")
        with store.write(STAGE.part) as f:
            f.attrs["_stage_print"] = fingerprint(cfg, STAGE.keys)
            write_concepts(f, concepts, label_area, skipped, images, cfg, step)
            f["dissection"].attrs["merged_from"] = json.dumps([str(s.run_dir) for s in shards])
            for i, key in enumerate(keys):
                base = f"layers/{key}/dissection"
                sketch = total(f"{base}/sketch") if f"{base}/sketch" in parts[0] else None
                if shared:
                    errors = parts[0][f"{base}/threshold_rank_error"][()]
                    if sketch is not None:
                        errors = thresholds(sketch, float(cfg.dissect.quantile))[1]
                    write_layer(f, key, limits[i][0], errors, sketch, total(f"{base}/intersection"),
                                total(f"{base}/unit_area"), label_area, concepts, cfg, i)
                else:  # thresholds only: the IoU needs a pass with them
                    g = f.create_group(base)
                    g["threshold"], g["threshold_rank_error"] = thresholds(sketch, float(cfg.dissect.quantile))
                    g.create_dataset("sketch", data=sketch, compression="gzip", shuffle=True)
    finally:
        for p in parts:
            p.close()
    if not shared:
        logger.warning("merge: the dissect shards each found their own thresholds: their sketches are merged into "
                       "thresholds here, without IoU; run the shards again with dissect.thresholds=%s", store.run_dir)
    store.finish("dissect", fingerprint(cfg, STAGE.keys))
