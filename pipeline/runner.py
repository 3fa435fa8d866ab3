"""Runs the configured stages in order. Stages talk only through results.h5."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import h5py
import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

import pipeline
from pipeline.crop import cut_patches, patch_size, shrink
from pipeline.datasets import BatchStream, ImageTable, list_images
from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing
from pipeline.store import (RESULTS_FILE, config_fingerprint, mark_done, read_strings,
                            replace_dataset, stages_done, stored_name, transaction, write_strings)

logger = logging.getLogger(__name__)

STAGE_ORDER = ("scan", "crop", "report")


def run(cfg, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    unknown = [s for s in cfg.stages if s not in STAGE_ORDER]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(map(str, unknown))}: "
                            f"stages are {', '.join(STAGE_ORDER)}")
    results = run_dir / RESULTS_FILE
    fingerprint = _fingerprint(cfg)
    _check_same_config(results, fingerprint, cfg.overwrite)
    for stage in cfg.stages:
        done = stages_done(results)
        if stage != "report" and done.get(stage) == fingerprint and not cfg.overwrite:
            logger.info("stage %s: already in %s for this config, skipped", stage, results)
            continue
        started = time.perf_counter()
        {"scan": scan_stage, "crop": crop_stage, "report": report_stage}[stage](cfg, run_dir, fingerprint)
        logger.info("stage %s done in %.1f s", stage, time.perf_counter() - started)
    return results


def _fingerprint(cfg) -> str:
    relevant = OmegaConf.to_container(cfg, resolve=True)
    for key in ("stages", "overwrite", "cache_dir"):
        relevant.pop(key, None)
    return config_fingerprint(json.dumps(relevant, sort_keys=True))


def _check_same_config(results: Path, fingerprint: str, overwrite: bool) -> None:
    if not results.exists() or overwrite:
        return
    with h5py.File(results, "r") as f:
        stored = f.attrs.get("fingerprint", "")
    if stored != fingerprint:
        raise PipelineError(f"{results} holds results of a different config: choose a new "
                            f"hydra.run.dir, or pass overwrite=true to replace them")


# ------------------------------------------------------------------ scan

def scan_stage(cfg, run_dir: Path, fingerprint: str) -> None:
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
    if cfg.overwrite and results.exists():
        results.unlink()
    with transaction(results) as f:
        _write_run_attrs(f, cfg, bundle, fingerprint)
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
        mark_done(f, "scan", fingerprint)


def _write_run_attrs(f, cfg, bundle, fingerprint: str) -> None:
    spec = bundle.preprocessing
    f.attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True), fingerprint=fingerprint, model=bundle.name,
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


# ------------------------------------------------------------------ crop

def crop_stage(cfg, run_dir: Path, fingerprint: str) -> None:
    results = run_dir / RESULTS_FILE
    if "scan" not in stages_done(results):
        raise PipelineError(f"no scan results in {run_dir}: run stages=[scan,crop] first")
    with h5py.File(results, "r") as f:
        spec = Preprocessing(**json.loads(f.attrs["preprocessing"]))
        stored_paths = read_strings(f["images/path"])
        layers = {}
        for key, g in f["layers"].items():
            frame = tuple(int(v) for v in g["geometry"].attrs["frame"])
            layers[key] = dict(
                image=g["topk/image"][()], box=g["topk/box"][()], y=g["topk/y"][()], x=g["topk/x"][()],
                row_offset=g["geometry/row_offset"][()], col_offset=g["geometry/col_offset"][()],
                frame=frame, size=patch_size(frame, cfg.crop.max_size))
    table = list_images(cfg.dataset)
    if table.paths != stored_paths:
        raise PipelineError(f"the dataset changed since the scan of {run_dir}: "
                            f"crop with the same dataset, or scan again in a new hydra.run.dir")
    for info in layers.values():
        c, k = info["image"].shape
        info["patches"] = np.zeros((c, k) + info["size"] + (spec.channels,), np.uint8)
    needed = np.unique(np.concatenate([v["image"].ravel() for v in layers.values()]))
    needed = needed[needed >= 0]
    stream = BatchStream(table, spec, cfg.batch_size, ids=needed)
    with tqdm(total=len(needed), desc="crop", unit="img") as bar:
        for ids, pixels in stream:
            images = pixels.numpy()
            for info in layers.values():
                _cut_layer(info, ids, images)
            bar.update(len(ids))
    with transaction(results) as f:
        for key, info in layers.items():
            g = f[f"layers/{key}"]
            c, k, h, w, ch = info["patches"].shape
            replace_dataset(g, "patches", info["patches"], chunks=(1, k, h, w, ch),
                            compression="gzip", compression_opts=4)
            g["patches"].attrs.update(frame=np.asarray(info["frame"], np.int64),
                                      scale=h / info["frame"][0])
        mark_done(f, "crop", fingerprint)


def _cut_layer(info: dict, batch_ids: np.ndarray, images: np.ndarray) -> None:
    """Fill the patches of every top-k entry whose image is in this batch."""
    hit = np.isin(info["image"], batch_ids)
    if not hit.any():
        return
    ch, slot = np.nonzero(hit)
    order = np.argsort(batch_ids)
    which = order[np.searchsorted(batch_ids[order], info["image"][ch, slot])]
    boxes = info["box"][ch, slot]
    offsets = np.stack([info["row_offset"][info["y"][ch, slot]],
                        info["col_offset"][info["x"][ch, slot]]], axis=1)
    # many channels win at the same (image, location): cut and shrink each once
    keys = np.concatenate([which[:, None], boxes, offsets], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    patches = cut_patches(images, unique[:, 0], unique[:, 1:5], unique[:, 5:7], info["frame"])
    info["patches"][ch, slot] = shrink(patches, info["size"])[inverse.ravel()]


# ------------------------------------------------------------------ report

def report_stage(cfg, run_dir: Path, fingerprint: str) -> None:
    from pipeline.stages.report import render_report

    results = run_dir / RESULTS_FILE
    if not results.exists():
        raise PipelineError(f"no results.h5 in {run_dir}: run the scan stage first")
    files = render_report(results, run_dir)
    logger.info("report: %d files, open %s", len(files), run_dir / "index.html")
