"""`panels` stage: deconvnet / guided-backprop / gradient image of every top-k patch.

For each scanned layer and each filled top-k slot (channel c, rank k) the unit
(y, x, c) of that layer is seeded with 1 on its image, the input-space map is
computed with pipeline.backprop for every method in `panels.methods`, and the
map is cut into the layer's frame where the crop stage puts the patch's pixels
and shrunk the same way, so `panels/<method>[c, k]` lies pixel for pixel on
`patches[c, k]`. These are the Deep Visualization Toolbox's precomputed
"deconv" and "backprop" views of the top-9 patches. Each panel is stored as int8
codes with its float32 scale beside it (`panels/<method>_scale`,
pipeline.panel_codec); readers decode them with panel_codec.read_panels.

A unit depends on nothing outside its receptive field, so where the layer's
geometry allows (pipeline.field_crop) the passes run on receptive-field crops,
batched across units, through the layers up to the scanned one: the maps are
the whole image's, at the cost of the crop. Every pass also gives the unit's
value, which is checked against the scan's; a layer where the crop does not
reproduce it (a gate or normalisation over the whole map) is computed on whole
images instead, and the log says so. panels.layers=cropped leaves out the layers
no crop serves (or whose crops are over half the image), each with one line that
says why and what panels.layers=all would cost, timed on this machine.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from tqdm import tqdm

from pipeline import panels as engine
from pipeline.crop import channel_blocks
from pipeline.errors import PipelineError
from pipeline.panel_codec import SCALE
from pipeline.preprocess import Preprocessing
from pipeline.stage_spec import Stage
from pipeline.store import block_bytes, table_digest

logger = logging.getLogger(__name__)

# crop: the panels are shrunk to crop.max_size exactly like the patches; a resume must cut the
# same blocks of channels and pass the same batches
STAGE = Stage(keys=("model", "dataset", "layers", "geometry", "topk", "crop", "panels"), part="panels.h5",
              needs=("scan",), resume=lambda cfg: dict(batch_size=int(cfg.batch_size),
                                                       panels_batch_size=int(cfg.panels.batch_size),
                                                       block_bytes=block_bytes(cfg.checkpoint)))


def run(ctx) -> None:
    from pipeline.backprop import METHODS
    from pipeline.patterns import has_capped_relu

    cfg, store = ctx.cfg, ctx.store
    methods = [str(m) for m in cfg.panels.methods]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods or len(set(methods)) != len(methods):
        raise PipelineError(f"panels.methods={methods} is not valid: pick distinct names among "
                            f"{', '.join(METHODS)}, e.g. panels.methods=[deconv,guided]")
    if int(cfg.panels.batch_size) < 1:
        raise PipelineError(f"panels.batch_size={cfg.panels.batch_size}: use a positive number of seeds per pass")
    with store.open() as f:
        spec = Preprocessing(**json.loads(f.attrs["preprocessing"]))
        digest = str(f.attrs["images_sha256"])
        layers = [engine.read_layer(key, g, cfg.crop.max_size)
                  for key, g in sorted(f["layers"].items(), key=lambda item: int(item[1].attrs["depth"]))]
    table = ctx.images
    if table_digest(table) != digest:
        raise PipelineError(f"the dataset changed since the scan of {ctx.run_dir}: compute panels with "
                            f"the same dataset, or scan again in a new hydra.run.dir")
    bundle = ctx.bundle
    plans = {layer.key: engine.crop_plan_of(bundle.model, layer.name, cfg.geometry.pointwise) for layer in layers}
    layers = engine.chosen(cfg.panels.layers, layers, plans, bundle.model, methods, int(cfg.panels.batch_size))
    budget = block_bytes(cfg.checkpoint)  # in-memory panels of one block of channels, all methods
    work = ctx.work()
    done = set(work.chunks())
    blocks = []  # (chunk number, layer, c0, c1): a block never spans layers
    for layer in layers:
        k, (h, w) = layer.image.shape[1], layer.size
        per_channel = k * (h * w * (spec.channels + 1) + 8) * len(methods)  # int8 codes, float32 scales
        for [(_, c0, c1)] in channel_blocks([(layer.key, layer.image.shape[0], per_channel)], budget):
            blocks.append((len(blocks), layer, c0, c1))
    todo = [b for b in blocks if work.chunk_name(b[0]) not in done]
    work.resuming(len(blocks) - len(todo), len(blocks), "blocks of channels")
    total = sum(int((layer.image[c0:c1] >= 0).sum()) for _, layer, c0, c1 in todo)
    logger.info("panels: %d top-k entries in %d layers, methods %s", total, len(layers), ", ".join(methods))
    projector, stats = None, {}
    with tqdm(total=total, desc="panels", unit="patch") as bar:
        for number, layer, c0, c1 in todo:
            if projector is None or projector.layer is not layer:
                projector = engine.Projector(bundle.model, layer, methods, int(cfg.panels.batch_size),
                                             *plans[layer.key])
                bar.set_postfix_str(layer.name)
            out, counts = engine.block_panels(layer, c0, c1, projector, table, spec, int(cfg.batch_size), bar)
            with work.write(work.chunk_name(number)) as f:
                group = f.create_group(f"layers/{layer.key}/panels")
                group.attrs.update(methods=json.dumps(methods), frame=np.asarray(layer.frame, np.int64),
                                   scale=layer.size[0] / layer.frame[0], layer=layer.name,
                                   input="gradient w.r.t. the normalised model input")
                for name, array in out.items():
                    if name.endswith(SCALE):  # (channels, k) float32: a few bytes a panel, stored as is
                        group.create_dataset(name, data=array)
                    else:
                        group.create_dataset(name, data=array, chunks=(1,) + array.shape[1:], compression="gzip",
                                             compression_opts=4, shuffle=True)
            for key, value in counts.items():
                stats.setdefault(layer.name, {}).setdefault(key, 0)
                stats[layer.name][key] += value
    engine.log_counts(stats, has_capped_relu(bundle.model))
    with store.write(ctx.spec.part) as f:
        work.assemble(f)
