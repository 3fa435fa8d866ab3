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

import numpy as np
from omegaconf import OmegaConf

from pipeline import scan_io
from pipeline.errors import PipelineError
from pipeline.stage_spec import Stage
from pipeline.store import IDENTITY_KEYS, IMAGES_PART, RUN_PART, Store, fingerprint, open_h5, read_strings
from pipeline.topk import ChannelStats, TopK, merge_topk

logger = logging.getLogger(__name__)

# makes: a merge writes a scan besides its own record, and the stages after it read that scan;
# geometry and dissect are in its keys because the scan and dissection tables it writes depend on them
STAGE = Stage(keys=("model", "dataset", "layers", "geometry", "topk", "scan", "dissect", "merge"), makes=("scan",))


def shard_stores(patterns) -> list[Store]:
    """The run directories named (or matched by a glob) in `patterns`, each with a finished scan."""
    found = []
    for pattern in patterns:
        pattern = str(Path(str(pattern)).expanduser())
        if glob.has_magic(pattern):  # a glob picks the run directories among what it matches
            found.extend(Store(Path(d)) for d in sorted(glob.glob(pattern)) if Store(Path(d)).is_run_dir())
        else:
            found.append(Store(Path(pattern)))
    if not found:
        raise PipelineError("merge.inputs is empty: pass merge.inputs=[DIR,...] with the shard run directories")
    for shard in found:
        if "scan" not in shard.stages_done():
            raise PipelineError(f"{shard.run_dir} holds no finished scan: run or resume that shard first")
        shard.check(repair=False)  # the parts a merge reads hold the bytes their shard wrote
    return found


def run(ctx) -> None:
    cfg, run_dir, store = ctx.cfg, ctx.run_dir, ctx.store
    shards = shard_stores(cfg.merge.inputs)
    if any(s.run_dir.resolve() == store.run_dir.resolve() for s in shards):
        raise PipelineError(f"merge.inputs names the merge's own run directory {run_dir}: merge into a new one")
    reference = _check_compatible(shards, cfg)
    n_images = reference["n_images"]
    scanned = np.zeros(n_images, bool)
    errors: dict[int, str] = {}
    merged: dict[str, dict] = {}
    layer_keys: list[str] = []
    for shard in shards:
        with open_h5(shard.parts / IMAGES_PART, "part file") as f:
            mine = f["images/scanned"][()]
        if (scanned & mine).any():
            raise PipelineError(f"{shard.run_dir} scanned images another input scanned too: merge each shard once")
        scanned |= mine
        with open_h5(shard.parts / scan_io.SCAN_PART, "part file") as f:
            errors.update(zip(f["scan_errors/image"][()].tolist(), read_strings(f["scan_errors/reason"])))
            keys = sorted(f["layers"], key=lambda k: f[f"layers/{k}"].attrs["depth"])
            if not layer_keys:
                layer_keys = keys
            for key in layer_keys:
                _accumulate(merged.setdefault(key, {}), f[f"layers/{key}"])
    missing = int((~scanned).sum())
    if missing:
        logger.warning("the merged shards leave %d of %d images unscanned", missing, n_images)

    scan_print = fingerprint(cfg, scan_io.SCAN_KEYS)
    store.begin("scan", recompute=True)  # what was built on an earlier scan here goes
    store.copy_part(shards[0].parts / RUN_PART, RUN_PART, config=OmegaConf.to_yaml(cfg, resolve=True),
                    identity=fingerprint(cfg, IDENTITY_KEYS))
    store.write_images(n_images, errors, scanned)
    with store.write(scan_io.SCAN_PART) as f, open_h5(shards[0].parts / scan_io.SCAN_PART, "part file") as first:
        f.attrs.update(_stage_print=scan_print, shard_count=1, shard_index=0,
                       scan_config=fingerprint(cfg, scan_io.SHARED_KEYS),
                       merged_from=json.dumps([str(s.run_dir) for s in shards]))
        scan_io.write_errors(f, errors)
        for key in layer_keys:  # attrs and geometry of each layer from the first shard; tables merged
            g = f.create_group(f"layers/{key}")
            g.attrs.update(dict(first[f"layers/{key}"].attrs))
            first.copy(first[f"layers/{key}/geometry"], g, "geometry")
            _write_layer(g, merged[key])
    store.finish("scan", scan_print)
    if all("dissect" in s.stages_done() for s in shards):  # dissections' sums add up as well
        from pipeline.dissect_tables import merge_shards

        merge_shards(shards, store, cfg)
    logger.info("merged %d shard scans: %d images scanned, %d unreadable", len(shards), int(scanned.sum()),
                len(errors))


def _check_compatible(shards: list[Store], cfg) -> dict:
    """Every shard scanned this merge's model (same weights), dataset (same image list) and
    layers, topk and bottomk; a mismatch names the shard."""
    identity, expected = fingerprint(cfg, IDENTITY_KEYS), fingerprint(cfg, scan_io.SHARED_KEYS)
    reference = None
    for shard in shards:
        with open_h5(shard.parts / RUN_PART, "part file") as f:
            facts = dict(identity=str(f.attrs["identity"]), weights=str(f.attrs.get("weights_sha256", "")),
                         images=str(f.attrs["images_sha256"]), n_images=len(f["images/path"]))
        with open_h5(shard.parts / scan_io.SCAN_PART, "part file") as f:
            facts["scan"] = str(f.attrs["scan_config"])
            facts["shards"] = int(f.attrs["shard_count"])
        if facts["identity"] != identity:
            raise PipelineError(f"shard {shard.run_dir} scanned another model or dataset than this merge's "
                                f"config: merge with the model=... and dataset=... the shards ran with")
        if facts["scan"] != expected:
            raise PipelineError(f"shard {shard.run_dir} scanned other layers, topk, scan.bottomk or scan.border "
                                f"than this merge's config: merge with the layers, topk and scan keys of the shards")
        if reference is None:
            reference = dict(facts, run_dir=shard.run_dir)
        for key, what in (("weights", "model weights (sha256)"), ("images", "image list"),
                          ("shards", "shard.count")):
            if facts[key] != reference[key]:
                raise PipelineError(f"shard {shard.run_dir} has another {what} than {reference['run_dir']}: "
                                    f"merge shards of one scan")
    return reference


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
    stats = ChannelStats(s["total"][()], s["zeros"][()], s["max"][()], int(s.attrs["positions"]))
    acc["stats"] = acc["stats"].merged(stats) if "stats" in acc else stats
    acc["spectrum"] = acc.get("spectrum", 0) + s["spectrum"][()]
    acc["shards"] = acc.get("shards", 0) + 1
    if "sketch" in s:  # the dissect stage's activation sketch (scan.sketch): counts add
        acc["sketch"] = acc.get("sketch", 0) + s["sketch"][()]
        acc["sketches"] = acc.get("sketches", 0) + 1
    if "class_topk" in g:  # one top-k table per class block of the second axis
        t, k = _read_table(g["class_topk"]), int(g["class_topk"].attrs["k"])
        acc["exemplar_classes"] = g["class_topk"].attrs["classes"][()]
        blocks = [TopK(*(a[:, i:i + k] for a in (t.value, t.image, t.y, t.x))) for i in range(0, t.value.shape[1], k)]
        acc["class_topk"] = [merge_topk(a, b) for a, b in zip(acc["class_topk"], blocks)] \
            if "class_topk" in acc else blocks
    if "classes" in g:  # class-conditional sums and counts add up across shards
        c = g["classes"]
        for key in ("count", "sum_max", "sum_mean"):
            acc[key] = acc.get(key, 0) + c[key][()]


def _write_layer(g, acc: dict) -> None:
    rows, cols = g["geometry/rows"][()], g["geometry/cols"][()]
    scan_io.write_table(g, "topk", acc["topk"], rows, cols)
    if "bottomk" in acc:
        bottom = acc["bottomk"]
        bottom.value = -bottom.value
        scan_io.write_table(g, "bottomk", bottom, rows, cols)
    whole = acc.get("sketches") == acc["shards"]  # a sketch of some shards only would miss images
    scan_io.write_stats(g, acc["stats"], acc["spectrum"], acc["sketch"] if whole else None)
    if "count" in acc:
        scan_io.write_classes(g, {"max": acc["sum_max"], "mean": acc["sum_mean"]}, acc["count"])
    if "class_topk" in acc:
        blocks = acc["class_topk"]
        table = TopK(*(np.concatenate([getattr(b, n) for b in blocks], axis=1) for n in ("value", "image", "y", "x")))
        scan_io.write_exemplars(g, table, acc["exemplar_classes"], rows, cols)
