"""`scan` stage: stream every image once, keep per-channel top-k tables, statistics
and spectra; checkpointed, resumable, shardable.

Every `scan.checkpoint_every` batches the whole device state and the stream
position go into results.h5 (`scan_state/`, with the partial tables in
`layers/`), through an atomic replace. Started again with the same config in the
same run directory, the scan loads that state and continues from the next
image; batches are then formed from the same images as in an uninterrupted run,
so the final tables and sums are identical bit for bit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.spectrum import GAMMA, MIN_ABS, QUANTILES, sketch_quantiles
from pipeline.store import (RESULTS_FILE, mark_done, replace_dataset, stored_name, transaction, write_image_table,
                            write_run_attrs)

logger = logging.getLogger(__name__)

# the config keys whose values decide this stage's results
KEYS = ("model", "dataset", "layers", "topk", "scan.bottomk", "shard")
STATE = "scan_state"


def shard_ids(n_images: int, count: int, index: int) -> np.ndarray:
    """Global image ids of shard `index` of `count`: contiguous, deterministic slices."""
    if count < 1 or not 0 <= index < count:
        raise PipelineError(f"shard.index={index} is not in 0..{count - 1}: use 0 <= shard.index < shard.count")
    return np.array_split(np.arange(n_images, dtype=np.int64), count)[index]


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.geometry import layer_geometry
    from pipeline.graph import feature_model
    from pipeline.layers import select_layers
    from pipeline.models.sources import load_model
    from pipeline.scan import Scanner

    bundle = load_model(cfg.model, cfg.cache_dir)
    table = list_images(cfg.dataset)
    names = select_layers(bundle.model, cfg.layers)
    ids = shard_ids(len(table), cfg.shard.count, cfg.shard.index)
    geometries = [layer_geometry(bundle.model, n) for n in names]
    for name, geo in zip(names, geometries):
        if not geo.mappable:
            logger.warning("layer %s: %s", name, geo.message)
    scanner = Scanner(feature_model(bundle.model, names), names, bundle.preprocessing, cfg.topk,
                      bottomk=cfg.scan.bottomk)
    results = Path(run_dir) / RESULTS_FILE
    layers = list(zip(names, geometries, scanner.map_shapes))

    saved = _load_checkpoint(results, stage_print, scanner, cfg.overwrite)
    if saved is None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with transaction(results) as f:
            for stale in ("images", "layers", STATE):  # from an earlier scan of another config
                if stale in f:
                    del f[stale]
            write_run_attrs(f, cfg, bundle.name, bundle.preprocessing, bundle.weights_sha256,
                            bundle.imagenet_classes, shard_count=cfg.shard.count, shard_index=cfg.shard.index)
            write_image_table(f, table, {}, _scanned(len(table), ids))
            _write_layers(f, scanner, layers)
        position, dropped = 0, []
    else:
        position, dropped = saved
        logger.info("resuming the scan at image %d of %d (%d images already scanned)",
                    position, len(ids), scanner.images_seen)
    logger.info("scanning %d images through %d layers of %s (%d channels)", len(ids) - position, len(names),
                bundle.name, sum(shape[-1] for shape in scanner.map_shapes))

    stream = BatchStream(table, bundle.preprocessing, cfg.batch_size, ids=ids[position:], dropped=dropped)
    started, seen_before = time.perf_counter(), scanner.images_seen
    batches = 0
    with tqdm(total=len(ids), initial=position, desc="scan", unit="img") as bar:
        for batch_ids, pixels in stream.main():
            scanner.update(pixels, batch_ids)
            bar.update(stream.position + position - bar.n)
            batches += 1
            if batches % cfg.scan.checkpoint_every == 0:
                _checkpoint(results, scanner, layers, position + stream.position, stream.dropped, stage_print)
        bar.update(len(ids) - bar.n)
    _checkpoint(results, scanner, layers, len(ids), stream.dropped, stage_print)
    for batch_ids, pixels in stream.fallback():
        scanner.update(pixels, batch_ids)

    with transaction(results) as f:
        write_image_table(f, table, stream.errors, _scanned(len(table), ids))
        _write_layers(f, scanner, layers)
        if STATE in f:
            del f[STATE]
        f.attrs["scan_progress"] = f"{len(ids)}/{len(ids)}"
        mark_done(f, "scan", stage_print, invalidates=("crop", "panels"))
    elapsed = time.perf_counter() - started
    scanned = scanner.images_seen - seen_before
    logger.info("scan finished: %d images scanned, %d skipped as unreadable, %.1f s (%.1f images/s)",
                scanner.images_seen, len(stream.errors), elapsed, scanned / max(elapsed, 1e-9))


# ------------------------------------------------------------------ checkpoints

def _checkpoint(results: Path, scanner, layers, position: int, dropped: list[int], stage_print: str) -> None:
    with transaction(results) as f:
        if STATE in f:
            del f[STATE]
        g = f.create_group(STATE)
        g.attrs.update(stage_print=stage_print, position=position, images_seen=scanner.images_seen)
        g["dropped"] = np.asarray(sorted(dropped), np.int64)
        states = scanner.state()
        for (name, _, _), state in zip(layers, states):
            sg = g.create_group(stored_name(name))
            for key, array in state.items():
                sg.create_dataset(key, data=array, compression="gzip" if array.size > 4096 else None)
        _write_layers(f, scanner, layers, states)
        f.attrs["scan_progress"] = f"{position}/{len(f['images/path'])}"
    logger.info("checkpoint: %d images scanned, stream position %d", scanner.images_seen, position)


def _load_checkpoint(results: Path, stage_print: str, scanner, overwrite: bool) -> tuple[int, list[int]] | None:
    if not results.exists():
        return None
    with h5py.File(results, "r") as f:
        if STATE not in f:
            return None
        g = f[STATE]
        if g.attrs["stage_print"] != stage_print:
            if overwrite:
                return None
            raise PipelineError(f"{results} holds an unfinished scan of a different config: pass "
                                f"overwrite=true to start it again, or choose a new hydra.run.dir")
        state = [{key: ds[()] for key, ds in g[stored_name(name)].items()} for name in scanner.names]
        scanner.load_state(state, int(g.attrs["images_seen"]))
        return int(g.attrs["position"]), [int(i) for i in g["dropped"][()]]


# ------------------------------------------------------------------ writing

def _scanned(n_images: int, ids: np.ndarray) -> np.ndarray:
    scanned = np.zeros(n_images, bool)
    scanned[ids] = True
    return scanned


def _write_layers(f, scanner, layers, states=None) -> None:
    states = states or scanner.state()  # one read of the device state serves every table
    bottoms = scanner.bottom_results(states) if scanner.bottomk else [None] * len(layers)
    for depth, ((name, geo, shape), (top, stats), bottom, state) in enumerate(
            zip(layers, scanner.results(states), bottoms, states)):
        g = f.require_group(f"layers/{stored_name(name)}")
        g.attrs.update(name=name, shape=np.asarray(shape, np.int64), depth=depth,
                       rf_size=np.asarray(geo.rf_size, np.int64), rf_stride=np.asarray(geo.rf_stride, np.int64),
                       mappable=geo.mappable, geometry_message=geo.message)
        _write_table(g, "topk", top, geo)
        if bottom is not None:
            _write_table(g, "bottomk", bottom, geo)
        s = g.require_group("stats")
        for key, value in (("mean", stats.mean), ("max", stats.maximum), ("zero_fraction", stats.zero_fraction),
                           ("total", stats.total), ("zeros", stats.zeros),
                           ("quantiles", sketch_quantiles(state["spectrum"]))):
            replace_dataset(s, key, value)
        replace_dataset(s, "spectrum", state["spectrum"], compression="gzip")
        s.attrs.update(positions=stats.positions, quantiles=np.asarray(QUANTILES),
                       spectrum_gamma=GAMMA, spectrum_min_abs=MIN_ABS)
        geo_group = g.require_group("geometry")
        for key, value in (("rows", geo.rows), ("cols", geo.cols),
                           ("row_offset", geo.row_offset), ("col_offset", geo.col_offset)):
            replace_dataset(geo_group, key, value)
        geo_group.attrs["frame"] = np.asarray(geo.frame, np.int64)


def _write_table(g, group: str, table, geo) -> None:
    t = g.require_group(group)
    for key in ("value", "image", "y", "x"):
        replace_dataset(t, key, getattr(table, key))
    empty = table.image < 0
    boxes = geo.boxes(np.maximum(table.y, 0), np.maximum(table.x, 0))
    replace_dataset(t, "box", np.where(empty[..., None], 0, boxes).astype(np.int32))
