"""`evolution` stage: how features form during training (Zeiler & Fergus 2013, Fig. 4).

Every snapshot of a train run is scanned with the same images and layers, in one
pass over the data (each batch goes through every snapshot). Per layer and snapshot
it keeps the top-k table, the channel statistics and the receptive-field patches,
and measures how much of each channel's top-k image set is replaced from one
snapshot to the next. It draws, per layer, a sheet with chosen channels in rows and
snapshot epochs in columns (each cell the channel's top-1 patch, or a montage of its
top patches), and one figure of the top-k change of every layer.

Snapshots come from `model.run_dir` with `model=snapshot`, else from this run's own
train stage.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from tqdm import tqdm

from pipeline.config import is_sequence
from pipeline.errors import PipelineError
from pipeline.evolution import SnapshotLayer, all_snapshots, choose_channels, topk_change, write_layer
from pipeline.models.sources import (
    SNAPSHOT_DIR,
    list_snapshots,
    load_snapshot,
    own_snapshots,
    snapshot_run_dir,
)
from pipeline.render.maps import draw_stage_figures
from pipeline.render.training import EVOLUTION_DIR
from pipeline.per_image import batch_resume
from pipeline.stage_spec import Stage
from pipeline.store import remove_checked

logger = logging.getLogger(__name__)

# needs this run's snapshots, unless model.run_dir names another run
STAGE = Stage(keys=("model", "dataset", "layers", "geometry", "topk", "crop", "train", "evolution"),
              part="evolution.h5", needs=own_snapshots, resume=batch_resume)


def run(ctx) -> None:
    from pipeline.datasets import BatchStream
    from pipeline.geometry import layer_geometry
    from pipeline.layers import chosen_layers
    from pipeline.scan import Scanner
    from pipeline.scan_io import STATE, scan_images

    cfg, run_dir = ctx.cfg, ctx.run_dir
    ec = cfg.evolution
    source = snapshot_run_dir(cfg, run_dir)
    snaps = list_snapshots(source)
    if not snaps:
        raise PipelineError(f"no snapshots in {source / SNAPSHOT_DIR}: list train before evolution in stages, "
                            f"or pass model=snapshot model.run_dir=<a train run directory>")
    epochs = list(snaps)
    bundles = [load_snapshot(source, e) for e in epochs]
    first = bundles[0]
    spec = first.preprocessing
    keys, names = (list(t) for t in zip(*chosen_layers(first.model, ec.layers if ec.layers is not None
                                                         else cfg.layers, first.renamed)))
    key_of = dict(zip(names, keys))
    geometries = [layer_geometry(first.model, n, cfg.geometry.pointwise) for n in names]
    table = ctx.images
    count = len(table) if ec.limit is None else min(int(ec.limit), len(table))
    if count < 1:
        raise PipelineError(f"evolution.limit={ec.limit} selects no image: give a positive count or null")
    ids = np.arange(count, dtype=np.int64)
    scanner = Scanner(all_snapshots(bundles, names), names * len(bundles), spec, cfg.topk)
    shapes = scanner.map_shapes[:len(names)]
    wanted = list(ec.channels) if is_sequence(ec.channels) else ec.channels
    chosen = {name: choose_channels(wanted, shape[-1]) for name, shape in zip(names, shapes)}
    logger.info("evolution: scanning %d images through %d layers of %d snapshots (epochs %s) of %s",
                count, len(names), len(epochs), epochs, source)
    store = ctx.store
    store.ensure_run(cfg, first, table)
    work = ctx.work()
    state = work.path / STATE  # kept until the sheets are drawn: a rerun after a kill skips the scan
    errors = scan_images(scanner, table, spec, cfg.batch_size, ids, state, cfg.checkpoint,
                         f"evolution scan x{len(epochs)} snapshots")
    tables = scanner.results()  # snapshot-major: [e * L + l] -> (TopK, ChannelStats)
    n = len(names)
    layers = [SnapshotLayer(name, geo, shape, tables[i::n], cfg.topk, cfg.crop.max_size)
              for i, (name, geo, shape) in enumerate(zip(names, geometries, shapes))]

    needed = np.unique(np.concatenate([layer.image.ravel() for layer in layers]))
    needed = needed[needed >= 0]
    crop_stream = BatchStream(table, spec, cfg.batch_size, ids=needed)
    with tqdm(total=len(needed), desc="evolution patches", unit="img") as bar:
        for batch_ids, pixels in crop_stream:
            images = pixels.numpy()
            if images.shape[-1] == 1:
                images = np.repeat(images, 3, axis=-1)
            for layer in layers:
                layer.cut(batch_ids, images)
            bar.update(len(batch_ids))

    changes = {layer.name: topk_change(layer.image) for layer in layers}

    store.write_images(len(table), errors, replace=False)
    with store.write(ctx.spec.part) as f:
        g = f.create_group("evolution")
        g["epochs"] = np.asarray(epochs, np.int64)
        g.attrs.update(source=str(source), images=count, k=int(cfg.topk),
                       drawn_patches=max(1, min(int(ec.patches), int(cfg.topk))),
                       layers=json.dumps(names), snapshot_sha256=json.dumps([b.weights_sha256 for b in bundles]))
        for depth, layer in enumerate(layers):
            write_layer(g.create_group(key_of[layer.name]), layer, depth, changes[layer.name],
                         chosen[layer.name])

    draw_stage_figures(ctx.part, run_dir, "evolution")  # from the part: the report redraws the same
    remove_checked(state)
    logger.info("evolution sheets in %s", run_dir / EVOLUTION_DIR)
