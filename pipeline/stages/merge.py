"""`merge` stage: combine shard scans (`merge.inputs`, run directories or globs)
into this run directory, as if one unsharded scan had run.

Top-k and bottom-k tables merge exactly (the top-k of a union is the top-k of
the shards' top-k); sums, counts and spectra add up.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

import h5py
import numpy as np
from omegaconf import OmegaConf

from pipeline.errors import PipelineError
from pipeline.geometry import interval_boxes
from pipeline.spectrum import sketch_quantiles
from pipeline.stages import scan
from pipeline.store import (IDENTITY_KEYS, RESULTS_FILE, fingerprint, mark_done, read_strings, replace_dataset,
                            stages_done, transaction, write_strings)
from pipeline.topk import TopK, merge_topk

logger = logging.getLogger(__name__)

KEYS = ("model", "dataset", "layers", "topk", "scan.bottomk", "merge")


def shard_results(patterns) -> list[Path]:
    """results.h5 of every run directory named (or matched by a glob) in `patterns`."""
    found = []
    for pattern in patterns:
        pattern = str(Path(str(pattern)).expanduser())
        if glob.has_magic(pattern):  # a glob picks the run directories among what it matches
            found.extend(Path(d) / RESULTS_FILE for d in sorted(glob.glob(pattern))
                         if (Path(d) / RESULTS_FILE).exists())
        else:
            found.append(Path(pattern) / RESULTS_FILE)
    if not found:
        raise PipelineError("merge.inputs is empty: pass merge.inputs=[DIR,...] with the shard run directories")
    for path in found:
        if "scan" not in stages_done(path):
            raise PipelineError(f"{path.parent} holds no finished scan: run or resume that shard first")
    return found


def run(cfg, run_dir: Path, stage_print: str) -> None:
    inputs = shard_results(cfg.merge.inputs)
    with h5py.File(inputs[0], "r") as first:
        paths = read_strings(first["images/path"])
        layer_keys = sorted(first["layers"], key=lambda k: first[f"layers/{k}"].attrs["depth"])
    scanned = np.zeros(len(paths), bool)
    ok = np.zeros(len(paths), bool)
    errors = np.full(len(paths), "", dtype=object)
    merged: dict[str, dict] = {}
    for path in inputs:
        with h5py.File(path, "r") as f:
            _check_compatible(f, path, paths, layer_keys, inputs[0])
            mine = f["images/scanned"][()]
            if (scanned & mine).any():
                raise PipelineError(f"{path.parent} scanned images another input scanned too: "
                                    f"merge each shard once")
            scanned |= mine
            ok[mine] = f["images/ok"][()][mine]
            errors[mine] = np.asarray(read_strings(f["images/error"]), dtype=object)[mine]
            for key in layer_keys:
                _accumulate(merged.setdefault(key, {}), f[f"layers/{key}"])
    missing = int((~scanned).sum())
    if missing:
        logger.warning("the merged shards leave %d of %d images unscanned", missing, len(paths))

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with transaction(Path(run_dir) / RESULTS_FILE) as f:
        with h5py.File(inputs[0], "r") as src:
            for key, value in src.attrs.items():
                if key not in ("stages_done", "scan_progress"):
                    f.attrs[key] = value
            for name in ("images", "layers"):
                if name in f:
                    del f[name]
            src.copy(src["images"], f, "images")
            for key in layer_keys:  # attrs and geometry of each layer; tables below
                g = f.create_group(f"layers/{key}")
                g.attrs.update(dict(src[f"layers/{key}"].attrs))
                src.copy(src[f"layers/{key}/geometry"], g, "geometry")
        f.attrs.update(config=OmegaConf.to_yaml(cfg, resolve=True), identity=fingerprint(cfg, IDENTITY_KEYS),
                       shard_count=1, shard_index=0, merged_from=json.dumps([str(p.parent) for p in inputs]))
        replace_dataset(f["images"], "scanned", scanned)
        replace_dataset(f["images"], "ok", ok)
        write_strings(f["images"], "error", errors)
        for key in layer_keys:
            _write_layer(f[f"layers/{key}"], merged[key])
        mark_done(f, "scan", fingerprint(cfg, scan.KEYS), invalidates=("crop", "panels"))
        mark_done(f, "merge", stage_print)
    logger.info("merged %d shard scans: %d images scanned, %d unreadable", len(inputs), int(scanned.sum()),
                int((scanned & ~ok).sum()))


def _check_compatible(f, path: Path, paths: list[str], layer_keys: list[str], first: Path) -> None:
    if read_strings(f["images/path"]) != paths:
        raise PipelineError(f"{path.parent} scanned another dataset than {first.parent}: merge shards of one dataset")
    keys = sorted(f["layers"], key=lambda k: f[f"layers/{k}"].attrs["depth"])
    if keys != layer_keys:
        raise PipelineError(f"{path.parent} scanned other layers than {first.parent}: merge shards of one config")


def _read_table(g) -> TopK:
    return TopK(*(g[k][()] for k in ("value", "image", "y", "x")))


def _accumulate(acc: dict, g) -> None:
    top = _read_table(g["topk"])
    acc["topk"] = merge_topk(acc["topk"], top) if "topk" in acc else top
    if "bottomk" in g:  # ascending: merge on negated values
        b = _read_table(g["bottomk"])
        b.value = -b.value
        acc["bottomk"] = merge_topk(acc["bottomk"], b) if "bottomk" in acc else b
    s = g["stats"]
    for key in ("total", "zeros", "spectrum"):
        acc[key] = acc.get(key, 0) + s[key][()]
    acc["max"] = np.maximum(acc.get("max", -np.inf), s["max"][()])
    acc["positions"] = acc.get("positions", 0) + int(s.attrs["positions"])
    acc["stats_attrs"] = dict(s.attrs)


def _write_layer(g, acc: dict) -> None:
    rows, cols = g["geometry/rows"][()], g["geometry/cols"][()]
    tables = [("topk", acc["topk"])]
    if "bottomk" in acc:
        bottom = acc["bottomk"]
        bottom.value = -bottom.value
        tables.append(("bottomk", bottom))
    for name, table in tables:
        t = g.create_group(name)
        for key in ("value", "image", "y", "x"):
            t[key] = getattr(table, key)
        box = interval_boxes(rows, cols, np.maximum(table.y, 0), np.maximum(table.x, 0))
        t["box"] = np.where((table.image < 0)[..., None], 0, box)
    s = g.create_group("stats")
    positions = max(acc["positions"], 1)
    s["mean"] = (acc["total"] / positions).astype(np.float32)
    s["max"] = acc["max"].astype(np.float32)
    s["zero_fraction"] = (acc["zeros"] / positions).astype(np.float32)
    s["total"], s["zeros"] = acc["total"], acc["zeros"]
    s["quantiles"] = sketch_quantiles(acc["spectrum"])
    s.create_dataset("spectrum", data=acc["spectrum"], compression="gzip")
    s.attrs.update(acc["stats_attrs"])
    s.attrs["positions"] = acc["positions"]
