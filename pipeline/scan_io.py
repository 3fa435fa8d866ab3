"""The scan's results in HDF5, shared by the stages that scan (scan, evolution) and the
one that merges shard scans (merge): streaming a dataset through a `Scanner` with
checkpoints, and the writers of the layer groups (top-k tables with boxes, statistics,
spectra, geometry) and of the sparse error list.

Every `checkpoint.seconds` (and `checkpoint.batches`, when set) the device state and
the stream position go into a small state file of their own (replaced atomically: its
size is the state's, not the run's). Started again on the same state file, the scan
continues from the next image; batches are then formed from the same images as in an
uninterrupted run, so the final tables and sums are identical bit for bit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import BatchStream
from pipeline.errors import PipelineError
from pipeline.names import shown
from pipeline.spectrum import GAMMA, MIN_ABS, QUANTILES, sketch_quantiles
from pipeline.store import Pacer, atomic_h5, damage, open_h5, remove_checked, write_strings

logger = logging.getLogger(__name__)

# the config keys whose values decide the scan's results
SCAN_KEYS = ("model", "dataset", "layers", "geometry", "topk", "scan", "shard")
# what the shards of one scan share: merge checks it
SHARED_KEYS = ("model", "dataset", "layers", "geometry", "topk", "scan")
CLASS_STATE_BYTES = 2**30  # the most device memory the class-conditional sums may take
SCAN_PART = "scan.h5"
STATE = "state.h5"  # the checkpoint, inside the stage's work directory


def shard_ids(n_images: int, count: int, index: int) -> np.ndarray:
    """Global image ids of shard `index` of `count`: contiguous, deterministic slices."""
    if count < 1 or not 0 <= index < count:
        raise PipelineError(f"shard.index={index} is not in 0..{count - 1}: use 0 <= shard.index < shard.count")
    return np.array_split(np.arange(n_images, dtype=np.int64), count)[index]


def scan_images(scanner, table, spec, batch_size: int, ids: np.ndarray, state_path: Path, checkpoint,
                desc: str) -> dict[int, str]:
    """Stream `ids` through `scanner`, checkpointing its state into `state_path` (and
    resuming from it when it exists); returns the unreadable images (id -> reason)."""
    position, dropped = 0, []
    why = damage(state_path) if state_path.exists() else "missing"
    if why != "missing" and why is not None:  # never resumed from: its sums would be wrong without a sign
        logger.warning("the %s checkpoint %s is damaged (%s): the %s starts again from the first image", desc,
                       state_path, why, desc)
        remove_checked(state_path)
    elif why is None:
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
    with atomic_h5(path, checked=True) as f:
        f.attrs.update(position=position, images_seen=scanner.images_seen)
        f["dropped"] = np.asarray(sorted(dropped), np.int64)
        for i, state in enumerate(scanner.state()):  # by position: a layer may be scanned twice (evolution)
            g = f.create_group(f"layer_{i:04d}")
            for key, array in state.items():  # the sketch is mostly empty buckets: compressed
                g.create_dataset(key, data=array, compression="gzip" if key == "sketch" else None)
    logger.info("checkpoint: %d images scanned, stream position %d, %.1f MiB (%.3f s)", scanner.images_seen, position,
                path.stat().st_size / 2**20, time.perf_counter() - started)



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



def wants_sketch(cfg) -> bool:
    """scan.sketch: whether the scan sketches every activation for the dissect stage; null
    decides by the dataset (segmentation: the one the dissect stage reads), a key the scan's
    fingerprint holds, so one config always writes the sketch or never."""
    setting = cfg.scan.sketch
    return cfg.dataset.kind == "segmentation" if setting is None else bool(setting)


def class_count(table, channels: int, wanted: bool) -> int:
    """Classes whose conditional sums the scan keeps: 0 when unwanted, unlabelled, with one
    class only, or too large for the device (logged)."""
    labelled = table.labels[table.labels >= 0]
    n = max(len(table.class_names), int(labelled.max()) + 1 if labelled.size else 0)
    if not wanted or len(np.unique(labelled)) < 2:
        return 0
    if channels * n * 16 > CLASS_STATE_BYTES:
        logger.warning("class selectivity skipped: %d channels x %d classes would hold %.1f GiB of sums "
                       "(choose fewer layers, or scan.classes=false to silence this)", channels, n,
                       channels * n * 16 / 2**30)
        return 0
    return n


def labelled_counts(labels: np.ndarray, ok: np.ndarray, classes: int) -> np.ndarray:
    """(L,) images per class among the scanned, readable, labelled ones (ok: bool mask)."""
    return np.bincount(labels[ok & (labels >= 0)], minlength=classes)[:classes].astype(np.int64)


def write_classes(g, sums: dict[str, np.ndarray], counts: np.ndarray) -> None:
    """classes/: per-class sums and counts of each unit's per-image max and mean, the units'
    selectivity and preferred class for both (pipeline.selectivity)."""
    from pipeline.selectivity import STATISTICS, class_selectivity

    c = g.create_group("classes")
    c["count"] = counts
    for s in STATISTICS:
        c.create_dataset(f"sum_{s}", data=sums[s], compression="gzip", chunks=True)
        found = class_selectivity(sums[s], counts)
        c[f"selectivity_{s}"] = found.index
        c[f"preferred_{s}"] = found.preferred
    c.attrs["definition"] = ("(mu_max - mu_rest) / (mu_max + mu_rest) over class-conditional means of the "
                             "per-image spatial max (selectivity_max) or mean (selectivity_mean); Morcos et al. 2018")


def exemplar_classes(table, wanted) -> np.ndarray | None:
    """scan.exemplars (class indices or names) -> class indices, or None when empty."""
    from pipeline.errors import PipelineError

    if not len(wanted):
        return None
    if not (table.labels >= 0).any():
        raise PipelineError("scan.exemplars needs labelled images (class folders, a 'path label' list or IDX labels)")
    out = []
    for value in wanted:
        if isinstance(value, int) or str(value).isdigit():
            out.append(int(value))
        elif str(value) in table.class_names:
            out.append(table.class_names.index(str(value)))
        else:
            more = ", ..." if len(table.class_names) > 8 else ""
            raise PipelineError(f"scan.exemplars has {value!r}, not a class of the dataset (classes: "
                                f"{', '.join(map(shown, table.class_names[:8]))}{more})")
    return np.asarray(sorted(set(out)), np.int64)


def write_layers(f, layers, results, bottoms, states, counts: np.ndarray | None = None,
                 exemplars=None, classes: np.ndarray | None = None) -> None:
    """layers/<key>/: attrs, top-k (and bottom-k) tables with boxes, statistics, spectra,
    geometry and, with `counts`, class selectivity; `layers` is [(stored key, qualified
    name, geometry, map shape)]."""
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
        write_stats(g, stats, state["spectrum"], state.get("sketch"))
        if counts is not None and "class_max" in state:
            write_classes(g, {s: state[f"class_{s}"] for s in ("max", "mean")}, counts)
        if exemplars is not None:
            write_exemplars(g, exemplars[depth], classes, geo.rows, geo.cols)
        geo_group = g.create_group("geometry")
        for key, value in (("rows", geo.rows), ("cols", geo.cols),
                           ("row_offset", geo.row_offset), ("col_offset", geo.col_offset)):
            geo_group[key] = value
        geo_group.attrs["frame"] = np.asarray(geo.frame, np.int64)



def write_stats(g, stats, spectrum: np.ndarray, sketch: np.ndarray | None = None) -> None:
    """stats/: per-channel mean, max, zero fraction, the sums behind them, spectrum, quantiles
    and, with scan.sketch, every activation's histogram (pipeline.dissect's buckets)."""
    s = g.create_group("stats")
    if sketch is not None:
        s.create_dataset("sketch", data=sketch, compression="gzip", shuffle=True)
    for key, value in (("mean", stats.mean), ("max", stats.maximum), ("zero_fraction", stats.zero_fraction),
                       ("total", stats.total), ("zeros", stats.zeros), ("quantiles", sketch_quantiles(spectrum))):
        s[key] = value
    s.create_dataset("spectrum", data=spectrum, compression="gzip")
    s.attrs.update(positions=stats.positions, quantiles=np.asarray(QUANTILES), spectrum_gamma=GAMMA,
                   spectrum_min_abs=MIN_ABS)



def write_exemplars(g, table, classes: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """class_topk/: the top-k table of each (channel, class), (C, S * K), class-major."""
    write_table(g, "class_topk", table, rows, cols)
    g["class_topk"].attrs.update(classes=np.asarray(classes, np.int64), k=table.value.shape[1] // len(classes))


def write_table(g, group: str, table, rows: np.ndarray, cols: np.ndarray) -> None:
    from pipeline.geometry import interval_boxes

    t = g.create_group(group)
    for key in ("value", "image", "y", "x"):
        t[key] = getattr(table, key)
    boxes = interval_boxes(rows, cols, np.maximum(table.y, 0), np.maximum(table.x, 0))
    t["box"] = np.where((table.image < 0)[..., None], 0, boxes).astype(np.int32)
