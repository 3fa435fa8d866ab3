"""`scan` stage: stream every image once, keep per-channel top-k tables, statistics
and spectra; checkpointed, resumable, shardable.

The checkpoint is parts/scan.<print>/state.h5 (pipeline.scan_io): started again with the
same config in the same run directory, the scan continues from the next image. The
tables, the image flags and the sparse error list are written once, at the end.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from pipeline.per_image import batch_resume, none_read
from pipeline.scan_io import (SCAN_KEYS, SCAN_PART, SHARED_KEYS, STATE, class_count, exemplar_classes, wants_sketch,
                              labelled_counts, scan_images, shard_ids, write_errors, write_layers)
from pipeline.stage_spec import Stage
from pipeline.store import fingerprint, remove_checked

logger = logging.getLogger(__name__)

STAGE = Stage(keys=SCAN_KEYS, part=SCAN_PART, resume=batch_resume)


def run(ctx) -> None:
    from pipeline.geometry import layer_geometry
    from pipeline.graph import feature_model
    from pipeline.layers import chosen_layers
    from pipeline.scan import Scanner

    cfg, store, stage_print = ctx.cfg, ctx.store, ctx.stage_print
    bundle = ctx.bundle
    table = ctx.images
    keys, names = zip(*chosen_layers(bundle.model, cfg.layers, bundle.renamed))
    ids = shard_ids(len(table), cfg.shard.count, cfg.shard.index)
    geometries = [layer_geometry(bundle.model, n, cfg.geometry.pointwise) for n in names]
    for name, geo in zip(names, geometries):
        if not geo.mappable:
            logger.warning("layer %s: %s", name, geo.message)
    model = feature_model(bundle.model, list(names))
    channels = sum(int(t.shape[-1]) for t in (model.outputs if isinstance(model.outputs, list) else [model.outputs]))
    classes = class_count(table, channels, cfg.scan.classes)
    exemplars = exemplar_classes(table, cfg.scan.exemplars)
    scanner = Scanner(model, list(names), bundle.preprocessing, cfg.topk, bottomk=cfg.scan.bottomk,
                      border=cfg.scan.border, labels=table.labels if classes or exemplars is not None else None,
                      classes=classes, exemplar_classes=exemplars, exemplar_k=cfg.scan.exemplars_k,
                      sketch=wants_sketch(cfg))
    for name, (h, w, _), inside in zip(names, scanner.map_shapes, scanner.interiors):
        if cfg.scan.border and inside is None and h * w > 1:
            logger.warning("layer %s: its %dx%d map has no inside %d positions from the border; scan.border "
                           "leaves none of its positions out", name, h, w, cfg.scan.border)
    layers = list(zip(keys, names, geometries, scanner.map_shapes))
    store.ensure_run(cfg, bundle, table)
    if store.part_print(SCAN_PART) == stage_print:
        logger.info("scan: its tables are already written (the run stopped before recording it), kept")
        return
    work = ctx.work()
    logger.info("scanning %d images through %d layers of %s (%d channels)", len(ids), len(names),
                bundle.name, sum(shape[-1] for shape in scanner.map_shapes))
    started = time.perf_counter()
    errors = scan_images(scanner, table, bundle.preprocessing, cfg.batch_size, ids, work.path / STATE,
                         cfg.checkpoint, "scan")
    scanned = np.zeros(len(table), bool)
    scanned[ids] = True
    store.write_images(len(table), errors, scanned)
    if len(ids) and len(errors) == len(ids):  # nothing to show: say so, and keep the reasons
        store.rebuild()
        raise none_read("scan", "dataset.path", errors, table.paths, f"{len(ids)} images", store.index)
    with store.write(SCAN_PART) as f:
        f.attrs.update(_stage_print=stage_print, shard_count=cfg.shard.count, shard_index=cfg.shard.index,
                       scan_config=fingerprint(cfg, SHARED_KEYS),
                       cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", "(not set)"))
        write_errors(f, errors)
        states = scanner.state()  # one read of the device state serves every table
        ok = np.zeros(len(table), bool)
        ok[ids] = True
        ok[list(errors)] = False
        write_layers(f, layers, scanner.results(states), scanner.bottom_results(states) if scanner.bottomk else None,
                     states, labelled_counts(table.labels, ok, classes) if classes else None,
                     scanner.exemplar_results(states) if exemplars is not None else None, exemplars)
        original = {new: old for old, new in bundle.renamed.items()}
        for key, name, _, _ in layers:
            if name in original:  # renamed for TensorFlow: the model's own name, for the record
                f[f"layers/{key}"].attrs["keras_name"] = original[name]
    remove_checked(work.path / STATE)
    elapsed = time.perf_counter() - started
    scanned_now = scanner.images_seen - scanner.images_resumed  # a resumed scan's rate: this process's images
    logger.info("scan finished: %d images scanned (%d by this process, %.1f s, %.1f images/s), %d skipped as "
                "unreadable", scanner.images_seen, scanned_now, elapsed, scanned_now / max(elapsed, 1e-9), len(errors))


