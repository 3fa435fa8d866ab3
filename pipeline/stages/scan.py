"""`scan` stage: stream every image once, keep per-channel top-k tables, statistics
and spectra; checkpointed, resumable, shardable.

Every `checkpoint.seconds` (and `checkpoint.batches`, when set) the device state and
the stream position go into a small state file of their own
(parts/scan.<print>/state.h5, replaced atomically: its size is the state's, not the
run's). Started again with the same config in the same run directory, the scan loads
that state and continues from the next image; batches are then formed from the same
images as in an uninterrupted run, so the final tables and sums are identical bit for
bit. The tables, the image flags and the sparse error list are written once, at the end.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.spectrum import GAMMA, MIN_ABS, QUANTILES, sketch_quantiles
from pipeline.store import Pacer, Store, atomic_h5, fingerprint, open_h5, write_strings

logger = logging.getLogger(__name__)

# the config keys whose values decide this stage's results
KEYS = ("model", "dataset", "layers", "geometry", "topk", "scan.bottomk", "shard")
# what the shards of one scan share: merge checks it
SHARED_KEYS = ("model", "dataset", "layers", "geometry", "topk", "scan.bottomk")
PART = "scan.h5"
STATE = "state.h5"


def shard_ids(n_images: int, count: int, index: int) -> np.ndarray:
    """Global image ids of shard `index` of `count`: contiguous, deterministic slices."""
    if count < 1 or not 0 <= index < count:
        raise PipelineError(f"shard.index={index} is not in 0..{count - 1}: use 0 <= shard.index < shard.count")
    return np.array_split(np.arange(n_images, dtype=np.int64), count)[index]


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.geometry import layer_geometry
    from pipeline.graph import feature_model
    from pipeline.layers import chosen_layers
    from pipeline.models.sources import load_model
    from pipeline.scan import Scanner

    store = Store(run_dir)
    bundle = load_model(cfg.model, cfg.cache_dir)
    table = list_images(cfg.dataset)
    keys, names = zip(*chosen_layers(bundle.model, cfg.layers))
    ids = shard_ids(len(table), cfg.shard.count, cfg.shard.index)
    geometries = [layer_geometry(bundle.model, n) for n in names]
    for name, geo in zip(names, geometries):
        if not geo.mappable:
            logger.warning("layer %s: %s", name, geo.message)
    scanner = Scanner(feature_model(bundle.model, list(names)), list(names), bundle.preprocessing, cfg.topk,
                      bottomk=cfg.scan.bottomk)
    layers = list(zip(keys, names, geometries, scanner.map_shapes))
    store.ensure_run(cfg, bundle, table)
    if store.part_print(PART) == stage_print:
        logger.info("scan: its tables are already written (the run stopped before recording it), kept")
        return
    work = store.work("scan", stage_print, cfg.overwrite, batch_size=int(cfg.batch_size))
    logger.info("scanning %d images through %d layers of %s (%d channels)", len(ids), len(names),
                bundle.name, sum(shape[-1] for shape in scanner.map_shapes))
    started, seen_before = time.perf_counter(), scanner.images_seen
    errors = scan_images(scanner, table, bundle.preprocessing, cfg.batch_size, ids, work.path / STATE,
                         cfg.checkpoint, "scan")
    scanned = np.zeros(len(table), bool)
    scanned[ids] = True
    store.write_images(len(table), errors, scanned)
    if len(ids) and len(errors) == len(ids):  # nothing to show: say so, and keep the reasons
        store.rebuild()
        first = min(errors)
        raise PipelineError(f"none of the {len(ids)} images could be read (e.g. {table.paths[first]}: "
                            f"{errors[first]}): check dataset.path; images/error in {store.index} lists each reason")
    with store.write(PART) as f:
        f.attrs.update(_stage_print=stage_print, shard_count=cfg.shard.count, shard_index=cfg.shard.index,
                       scan_config=fingerprint(cfg, SHARED_KEYS),
                       cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", "(not set)"))
        write_errors(f, errors)
        states = scanner.state()  # one read of the device state serves every table
        write_layers(f, layers, scanner.results(states), scanner.bottom_results(states) if scanner.bottomk else None,
                     states)
        original = {new: old for old, new in getattr(bundle.model, "renamed_layers", {}).items()}
        for key, name, _, _ in layers:
            if name in original:  # renamed for TensorFlow: the model's own name, for the record
                f[f"layers/{key}"].attrs["keras_name"] = original[name]
    (work.path / STATE).unlink(missing_ok=True)
    elapsed = time.perf_counter() - started
    scanned_now = scanner.images_seen - seen_before
    logger.info("scan finished: %d images scanned, %d skipped as unreadable, %.1f s (%.1f images/s)",
                scanner.images_seen, len(errors), elapsed, scanned_now / max(elapsed, 1e-9))


def scan_images(scanner, table, spec, batch_size: int, ids: np.ndarray, state_path: Path, checkpoint,
                desc: str) -> dict[int, str]:
    """Stream `ids` through `scanner`, checkpointing its state into `state_path` (and
    resuming from it when it exists); returns the unreadable images (id -> reason)."""
    position, dropped = 0, []
    if state_path.exists():
        position, dropped = _load_checkpoint(state_path, scanner)
        logger.info("resuming the %s at image %d of %d (%d images already scanned)", desc, position, len(ids),
                    scanner.images_seen)
    stream = BatchStream(table, spec, batch_size, ids=ids[position:], dropped=dropped)
    pacer = Pacer(checkpoint)
    with tqdm(total=len(ids), initial=position, desc=desc, unit="img") as bar:
        for batch_ids, pixels in stream.main():
            scanner.update(pixels, batch_ids)
            bar.update(stream.position + position - bar.n)
            if pacer.due():
                _checkpoint(state_path, scanner, position + stream.position, stream.dropped)
        bar.update(len(ids) - bar.n)
    if stream.dropped:  # the Pillow pass below is slow: do not lose the main pass to a kill in it
        _checkpoint(state_path, scanner, len(ids), stream.dropped)
    for batch_ids, pixels in stream.fallback():
        scanner.update(pixels, batch_ids)
    return stream.errors


# ------------------------------------------------------------------ checkpoints

def _checkpoint(path: Path, scanner, position: int, dropped: list[int]) -> None:
    """The device state and the stream position, into their own small file."""
    started = time.perf_counter()
    with atomic_h5(path) as f:
        f.attrs.update(position=position, images_seen=scanner.images_seen)
        f["dropped"] = np.asarray(sorted(dropped), np.int64)
        for i, state in enumerate(scanner.state()):  # by position: a layer may be scanned twice (evolution)
            g = f.create_group(f"layer_{i:04d}")
            for key, array in state.items():
                g[key] = array
    logger.info("checkpoint: %d images scanned, stream position %d (%.2f s)", scanner.images_seen, position,
                time.perf_counter() - started)


def _load_checkpoint(path: Path, scanner) -> tuple[int, list[int]]:
    with open_h5(path, "scan checkpoint") as f:
        state = [{key: ds[()] for key, ds in f[f"layer_{i:04d}"].items()} for i in range(len(scanner.names))]
        scanner.load_state(state, int(f.attrs["images_seen"]))
        return int(f.attrs["position"]), [int(i) for i in f["dropped"][()]]


# ------------------------------------------------------------------ writing

def write_errors(f, errors: dict[int, str]) -> None:
    """The unreadable images as a sparse list (merge reads it, not the (N,) table)."""
    ids = sorted(errors)
    g = f.create_group("scan_errors")
    g["image"] = np.asarray(ids, np.int64)
    write_strings(g, "reason", [errors[i] for i in ids])


def write_layers(f, layers, results, bottoms, states) -> None:
    """layers/<key>/: attrs, top-k (and bottom-k) tables with boxes, statistics, spectra
    and geometry; `layers` is [(stored key, qualified name, geometry, map shape)]."""
    bottoms = bottoms or [None] * len(layers)
    for depth, ((key, name, geo, shape), (top, stats), bottom, state) in enumerate(
            zip(layers, results, bottoms, states)):
        g = f.create_group(f"layers/{key}")
        g.attrs.update(name=name, shape=np.asarray(shape, np.int64), depth=depth,
                       rf_size=np.asarray(geo.rf_size, np.int64), rf_stride=np.asarray(geo.rf_stride),
                       mappable=geo.mappable, geometry_message=geo.message)
        write_table(g, "topk", top, geo.rows, geo.cols)
        if bottom is not None:
            write_table(g, "bottomk", bottom, geo.rows, geo.cols)
        write_stats(g, stats, state["spectrum"])
        geo_group = g.create_group("geometry")
        for key, value in (("rows", geo.rows), ("cols", geo.cols),
                           ("row_offset", geo.row_offset), ("col_offset", geo.col_offset)):
            geo_group[key] = value
        geo_group.attrs["frame"] = np.asarray(geo.frame, np.int64)


def write_stats(g, stats, spectrum: np.ndarray) -> None:
    """stats/: per-channel mean, max, zero fraction, the sums behind them, spectrum, quantiles."""
    s = g.create_group("stats")
    for key, value in (("mean", stats.mean), ("max", stats.maximum), ("zero_fraction", stats.zero_fraction),
                       ("total", stats.total), ("zeros", stats.zeros), ("quantiles", sketch_quantiles(spectrum))):
        s[key] = value
    s.create_dataset("spectrum", data=spectrum, compression="gzip")
    s.attrs.update(positions=stats.positions, quantiles=np.asarray(QUANTILES), spectrum_gamma=GAMMA,
                   spectrum_min_abs=MIN_ABS)


def write_table(g, group: str, table, rows: np.ndarray, cols: np.ndarray) -> None:
    from pipeline.geometry import interval_boxes

    t = g.create_group(group)
    for key in ("value", "image", "y", "x"):
        t[key] = getattr(table, key)
    boxes = interval_boxes(rows, cols, np.maximum(table.y, 0), np.maximum(table.x, 0))
    t["box"] = np.where((table.image < 0)[..., None], 0, boxes).astype(np.int32)
