"""`crop` stage: the receptive-field patch of every top-k (and bottom-k) entry,
from results.h5 and the data: layers/<layer>/patches and bottom_patches."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.crop import cut_patches, patch_size, shrink
from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing
from pipeline.store import RESULTS_FILE, mark_done, read_strings, replace_dataset, stages_done, transaction

KEYS = ("model", "dataset", "layers", "topk", "crop")


def run(cfg, run_dir: Path, stage_print: str) -> None:
    results = run_dir / RESULTS_FILE
    if "scan" not in stages_done(results):
        raise PipelineError(f"no scan results in {run_dir}: run stages=[scan,crop] first")
    with h5py.File(results, "r") as f:
        spec = Preprocessing(**json.loads(f.attrs["preprocessing"]))
        stored_paths = read_strings(f["images/path"])
        layers = {}  # (layer, dataset name) -> what cutting its patches needs
        for key, g in f["layers"].items():
            frame = tuple(int(v) for v in g["geometry"].attrs["frame"])
            for table, name in (("topk", "patches"), ("bottomk", "bottom_patches")):
                if table in g:
                    layers[key, name] = dict(
                        image=g[f"{table}/image"][()], box=g[f"{table}/box"][()],
                        y=g[f"{table}/y"][()], x=g[f"{table}/x"][()],
                        row_offset=g["geometry/row_offset"][()], col_offset=g["geometry/col_offset"][()],
                        frame=frame, size=patch_size(frame, cfg.crop.max_size))
    table = list_images(cfg.dataset)
    if table.paths != stored_paths:
        raise PipelineError(f"the dataset changed since the scan of {run_dir}: "
                            f"crop with the same dataset, or scan again in a new hydra.run.dir")
    for info in layers.values():
        c, k = info["image"].shape
        info["patches"] = np.zeros((c, k) + info["size"] + (spec.channels,), np.uint8)
    needed = np.unique(np.concatenate([v["image"].ravel() for v in layers.values()]))
    needed = needed[needed >= 0]
    stream = BatchStream(table, spec, cfg.batch_size, ids=needed)
    with tqdm(total=len(needed), desc="crop", unit="img") as bar:
        for ids, pixels in stream:
            images = pixels.numpy()
            for info in layers.values():
                _cut_layer(info, ids, images)
            bar.update(len(ids))
    with transaction(results) as f:
        for (key, name), info in layers.items():
            g = f[f"layers/{key}"]
            c, k, h, w, ch = info["patches"].shape
            replace_dataset(g, name, info["patches"], chunks=(1, k, h, w, ch), compression="gzip", compression_opts=4)
            g[name].attrs.update(frame=np.asarray(info["frame"], np.int64), scale=h / info["frame"][0])
        mark_done(f, "crop", stage_print)


def _cut_layer(info: dict, batch_ids: np.ndarray, images: np.ndarray) -> None:
    """Fill the patches of every top-k entry whose image is in this batch."""
    hit = np.isin(info["image"], batch_ids)
    if not hit.any():
        return
    ch, slot = np.nonzero(hit)
    order = np.argsort(batch_ids)
    which = order[np.searchsorted(batch_ids[order], info["image"][ch, slot])]
    boxes = info["box"][ch, slot]
    offsets = np.stack([info["row_offset"][info["y"][ch, slot]],
                        info["col_offset"][info["x"][ch, slot]]], axis=1)
    # many channels win at the same (image, location): cut and shrink each once
    keys = np.concatenate([which[:, None], boxes, offsets], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    patches = cut_patches(images, unique[:, 0], unique[:, 1:5], unique[:, 5:7], info["frame"])
    info["patches"][ch, slot] = shrink(patches, info["size"])[inverse.ravel()]
