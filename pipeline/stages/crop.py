"""`crop` stage: the receptive-field patch of every top-k (and bottom-k) entry,
from results.h5 and the data: layers/<layer>/patches, bottom_patches and class_patches.

Channels are cut in blocks of at most `checkpoint.block_mb` of patches (peak memory does not
grow with the channel count); each block is one chunk file, committed as soon as it
is cut, so a killed crop resumes at the next block.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.crop import channel_blocks, cut_patches, patch_size, shrink
from pipeline.datasets import BatchStream
from pipeline.errors import PipelineError
from pipeline.patch_frames import FRAMES, write_patches
from pipeline.preprocess import Preprocessing
from pipeline.stage_spec import Stage
from pipeline.store import block_bytes, table_digest

logger = logging.getLogger(__name__)

# the blocks are numbered: a resume cuts them with the same memory budget
STAGE = Stage(keys=("model", "dataset", "layers", "topk", "crop"), part="crop.h5", needs=("scan",),
              resume=lambda cfg: {"block_bytes": block_bytes(cfg.checkpoint)})


@dataclass
class _Table:
    """One top-k or bottom-k table of a layer and how its patches are cut."""

    key: str  # stored layer name
    name: str  # patches | bottom_patches
    image: np.ndarray  # (C, K)
    box: np.ndarray
    y: np.ndarray
    x: np.ndarray
    row_offset: np.ndarray
    col_offset: np.ndarray
    frame: tuple[int, int]
    size: tuple[int, int]


def run(ctx) -> None:
    cfg, store = ctx.cfg, ctx.store
    tables: dict[tuple[str, str], _Table] = {}
    with store.open() as f:
        spec = Preprocessing(**json.loads(f.attrs["preprocessing"]))
        digest = str(f.attrs["images_sha256"])
        for key, g in sorted(f["layers"].items(), key=lambda item: int(item[1].attrs["depth"])):
            frame = tuple(int(v) for v in g["geometry"].attrs["frame"])
            for group, name in (("topk", "patches"), ("bottomk", "bottom_patches"), ("class_topk", "class_patches")):
                if group in g:
                    tables[key, name] = _Table(
                        key, name, g[f"{group}/image"][()], g[f"{group}/box"][()], g[f"{group}/y"][()],
                        g[f"{group}/x"][()], g["geometry/row_offset"][()], g["geometry/col_offset"][()],
                        frame, patch_size(frame, cfg.crop.max_size))
    table = ctx.images
    if table_digest(table) != digest:
        raise PipelineError(f"the dataset changed since the scan of {ctx.run_dir}: "
                            f"crop with the same dataset, or scan again in a new hydra.run.dir")
    budget = block_bytes(cfg.checkpoint)
    work = ctx.work()
    order = list(tables)
    per_channel = [int(np.prod(t.image.shape[1:])) * t.size[0] * t.size[1] * spec.channels
                   for t in tables.values()]
    blocks = channel_blocks([(i, t.image.shape[0], b) for i, (t, b) in enumerate(zip(tables.values(), per_channel))],
                            budget)
    done = set(work.chunks())
    todo = [(n, pieces) for n, pieces in enumerate(blocks) if work.chunk_name(n) not in done]
    work.resuming(len(blocks) - len(todo), len(blocks), "blocks of channels")
    needed = {n: _needed([tables[order[i]].image[c0:c1] for i, c0, c1 in pieces]) for n, pieces in todo}
    with tqdm(total=sum(len(v) for v in needed.values()), desc="crop", unit="img") as bar:
        for n, pieces in todo:
            cut = [(tables[order[i]], c0, c1) for i, c0, c1 in pieces]
            patches = [np.zeros((c1 - c0, t.image.shape[1]) + t.size + (spec.channels,), np.uint8)
                       for t, c0, c1 in cut]
            for ids, pixels in BatchStream(table, spec, cfg.batch_size, ids=needed[n]):
                images = pixels.numpy()
                for (t, c0, c1), out in zip(cut, patches):
                    _cut_block(t, c0, c1, out, ids, images)
                bar.update(len(ids))
            with work.write(work.chunk_name(n)) as f:
                for (t, c0, c1), out in zip(cut, patches):
                    d = write_patches(f, t.key, t.name, out, _slot_keys(t, c0, c1))
                    d.attrs.update(frame=np.asarray(t.frame, np.int64), scale=out.shape[2] / t.frame[0])
    with store.write(ctx.spec.part) as f:
        work.assemble(f, skip=(FRAMES,))


def _slot_keys(t: _Table, c0: int, c1: int) -> np.ndarray:
    """(c1 - c0, K, 7) what decides a slot's patch: image, location and box."""
    return np.concatenate([t.image[c0:c1, :, None], t.y[c0:c1, :, None], t.x[c0:c1, :, None], t.box[c0:c1]],
                          axis=-1)


def _needed(images: list[np.ndarray]) -> np.ndarray:
    ids = np.unique(np.concatenate([a.ravel() for a in images]))
    return ids[ids >= 0]


def _cut_block(t: _Table, c0: int, c1: int, out: np.ndarray, batch_ids: np.ndarray, images: np.ndarray) -> None:
    """Fill the patches of channels c0:c1 whose image is in this batch."""
    hit = np.isin(t.image[c0:c1], batch_ids)
    if not hit.any():
        return
    ch, slot = np.nonzero(hit)
    ch += c0
    order = np.argsort(batch_ids)
    which = order[np.searchsorted(batch_ids[order], t.image[ch, slot])]
    boxes = t.box[ch, slot]
    offsets = np.stack([t.row_offset[t.y[ch, slot]], t.col_offset[t.x[ch, slot]]], axis=1)
    # many channels win at the same (image, location): cut and shrink each once
    keys = np.concatenate([which[:, None], boxes, offsets], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    patches = cut_patches(images, unique[:, 0], unique[:, 1:5], unique[:, 5:7], t.frame)
    out[ch - c0, slot] = shrink(patches, t.size)[inverse.ravel()]
