"""The dissect stage's tables in results.h5 (the layout is in pipeline.stages.dissect):
writing a pass's sums with the labels read from them, reading a finished dissection's
thresholds, and adding the parts of dissect shards in the merge stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.store import Store, fingerprint, open_h5, read_strings, write_strings

logger = logging.getLogger(__name__)

# the config keys whose values decide the dissection, and its part file
DISSECT_KEYS = ("model", "dataset", "layers", "dissect", "shard")
DISSECT_PART = "dissect.h5"


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


def count_detectors(part: Path, keys) -> list[int]:
    with open_h5(part, "part file") as f:
        return [int(f[f"layers/{k}/dissection"].attrs["detectors"]) for k in keys]


def merge_shards(shards, store: Store, cfg) -> None:
    """The merge stage's part for dissections: the shards' sums added. Shards that used one
    set of thresholds (dissect.thresholds) merge to the unsharded tables; shards that found
    their own merge their sketches only, into thresholds for a second sharded pass."""
    from pipeline.dissect import thresholds
    from pipeline.segmentation import check_segmentation

    concepts = check_segmentation(cfg.dataset)
    parts = [open_h5(s.parts / DISSECT_PART, "part file") for s in shards]
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
        with store.write(DISSECT_PART) as f:
            f.attrs["_stage_print"] = fingerprint(cfg, DISSECT_KEYS)
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
    store.finish("dissect", fingerprint(cfg, DISSECT_KEYS))
