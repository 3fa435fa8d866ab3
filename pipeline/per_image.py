"""The loop every per-image stage shares (activations, cam, occlusion, ablation): record the
run, stream the chosen images in batches, commit the rows computed for each batch in chunks
(a killed run resumes after the last one, pipeline.chunks), record the unreadable images,
assemble the chunks into the stage's part, and (draw=True) draw the stage's sheets from it
(pipeline.render.maps).

    with per_image_part(ctx, ids, compute, fix="occlusion.images") as (f, errors):
        ...   # f: the stage's part, open for writing, its rows assembled

`ids` index the dataset's images (ctx.images); `compute(batch_ids, pixels)` returns the
batch's rows ({dataset path: array, one row per result}). The batch size is the one the
stage's declaration makes a resume match (`batch_resume`, or the stage's own). When the
group named after the stage got no row at all, `none_read` is the error, naming the config
key `fix` to change (fix=None: the stage writes empty tables itself).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.selection import images_from_topk


def batch_resume(cfg) -> dict:
    """What a resumed per-image stage must match: the batches its chunks end on."""
    return {"batch_size": int(cfg.batch_size)}


def scan_for_topk(key: str):
    """`needs` of a stage whose images (config key `key`) may be the top images of channels
    in the scan's results ({layer, channels, k}): the scan, then, else nothing."""
    return lambda cfg: ("scan",) if images_from_topk(OmegaConf.select(cfg, key)) else ()


def none_read(stage: str, fix: str, errors: dict[int, str] | None = None, paths=None, which: str = "chosen images",
              listed_in=None) -> PipelineError:
    """The one-line error of a stage none of whose images could be read: the first reason,
    and the config key `fix` the user changes (dataset.path: check it; a stage's images
    key: choose others with it). `listed_in`: the results file whose images/error lists
    every reason."""
    example = ""
    if errors:
        from pipeline.names import shown

        first = min(errors)
        example = f" (e.g. {shown(paths[first])}: {errors[first]})"
    action = f"check {fix}" if fix == "dataset.path" else f"choose others with {fix}"
    where = f"; images/error in {listed_in} lists each reason" if listed_in is not None else ""
    return PipelineError(f"{stage}: none of the {which} could be read{example}: {action}{where}")


@contextmanager
def per_image_part(ctx, ids: np.ndarray, compute: Callable[[np.ndarray, object], dict],
                   fix: str | None = None, which: str = "chosen images", draw: bool = False):
    from pipeline.chunks import BOOKKEEPING, ChunkedStream

    name, store, bundle, table = ctx.stage, ctx.store, ctx.bundle, ctx.images
    ids = np.asarray(ids, np.int64)
    store.ensure_run(ctx.cfg, bundle, table)
    work = ctx.work()
    batch_size = int(ctx.spec.resume_settings(ctx.cfg)["batch_size"])
    stream = ChunkedStream(work, table, bundle.preprocessing, batch_size, ids, ctx.cfg.checkpoint)
    with tqdm(total=len(ids), initial=len(ids) - stream.remaining, desc=name, unit="img") as bar:
        for batch_ids, pixels in stream:
            stream.add(compute(batch_ids, pixels))
            bar.update(len(batch_ids))
        bar.update(len(ids) - bar.n)
    store.write_images(len(table), stream.errors, replace=False)
    with store.write(ctx.spec.part) as f:
        work.assemble(f, skip=BOOKKEEPING)
        if fix is not None and name not in f:
            raise none_read(name, fix, stream.errors, table.paths, which)
        yield f, stream.errors
    if draw:
        from pipeline.render.maps import Photos, draw_stage_sheets

        draw_stage_sheets(ctx.part, ctx.run_dir, name, Photos.of_table(table, bundle.preprocessing))
