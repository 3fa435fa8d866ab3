"""`scan` stage: stream every image once, keep per-channel top-k tables and statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

import pipeline
from pipeline.datasets import BatchStream, ImageTable, list_images
from pipeline.store import (IDENTITY_KEYS, RESULTS_FILE, fingerprint, mark_done, replace_dataset, stored_name,
                            transaction, write_strings)

logger = logging.getLogger(__name__)

# the config keys whose values decide this stage's results
KEYS = ("model", "dataset", "layers", "topk")


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.geometry import layer_geometry
    from pipeline.graph import feature_model
    from pipeline.layers import select_layers
    from pipeline.models.sources import load_model
    from pipeline.scan import Scanner

    bundle = load_model(cfg.model, cfg.cache_dir)
    table = list_images(cfg.dataset)
    names = select_layers(bundle.model, cfg.layers)
    geometries = [layer_geometry(bundle.model, n) for n in names]
    for name, geo in zip(names, geometries):
        if not geo.mappable:
            logger.warning("layer %s: %s", name, geo.message)
    scanner = Scanner(feature_model(bundle.model, names), names, bundle.preprocessing, cfg.topk)
    logger.info("scanning %d images through %d layers of %s (%d channels)", len(table), len(names),
                bundle.name, sum(shape[-1] for shape in scanner.map_shapes))
    stream = BatchStream(table, bundle.preprocessing, cfg.batch_size)
    with tqdm(total=len(table), desc="scan", unit="img") as bar:
        for ids, pixels in stream:
            scanner.update(pixels, ids)
            bar.update(len(ids))
        bar.update(len(stream.errors))
    logger.info("scanned %d images, skipped %d unreadable", scanner.images_seen, len(stream.errors))

    results = run_dir / RESULTS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    with transaction(results) as f:
        _write_run_attrs(f, cfg, bundle)
        _write_images(f, table, stream.errors)
        if "layers" in f:
            del f["layers"]
        for depth, (name, geo, (top, stats), shape) in enumerate(
                zip(names, geometries, scanner.results(), scanner.map_shapes)):
            g = f.create_group(f"layers/{stored_name(name)}")
            g.attrs.update(name=name, shape=np.asarray(shape, np.int64), depth=depth,
                           rf_size=np.asarray(geo.rf_size, np.int64),
                           rf_stride=np.asarray(geo.rf_stride, np.int64),
                           mappable=geo.mappable, geometry_message=geo.message)
            t = g.create_group("topk")
            t["value"], t["image"], t["y"], t["x"] = top.value, top.image, top.y, top.x
            empty = top.image < 0
            boxes = geo.boxes(np.maximum(top.y, 0), np.maximum(top.x, 0))
            t["box"] = np.where(empty[..., None], 0, boxes).astype(np.int32)
            s = g.create_group("stats")
            s["mean"], s["max"], s["zero_fraction"] = stats.mean, stats.maximum, stats.zero_fraction
            s.attrs["positions"] = stats.positions
            geo_group = g.create_group("geometry")
            geo_group["rows"], geo_group["cols"] = geo.rows, geo.cols
            geo_group["row_offset"], geo_group["col_offset"] = geo.row_offset, geo.col_offset
            geo_group.attrs["frame"] = np.asarray(geo.frame, np.int64)
        mark_done(f, "scan", stage_print, invalidates=("crop",))


def _write_run_attrs(f, cfg, bundle) -> None:
    spec = bundle.preprocessing
    f.attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True), identity=fingerprint(cfg, IDENTITY_KEYS), model=bundle.name,
        input_size=np.asarray([spec.input_size, spec.input_size], np.int64),
        preprocessing=json.dumps(spec.__dict__, sort_keys=True), version=pipeline.__version__,
        weights_sha256=bundle.weights_sha256, imagenet_classes=bundle.imagenet_classes)


def _write_images(f, table: ImageTable, errors: dict[int, str]) -> None:
    g = f.require_group("images")
    write_strings(g, "path", table.paths)
    replace_dataset(g, "label", table.labels.astype(np.int64))
    ok = np.ones(len(table), bool)
    ok[list(errors)] = False
    replace_dataset(g, "ok", ok)
    write_strings(g, "error", [errors.get(i, "") for i in range(len(table))])
    g.attrs["class_names"] = json.dumps(table.class_names)
