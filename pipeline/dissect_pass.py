"""One streamed, checkpointed pass of the dissect stage over its images (thresholds or IoU).

A pass feeds the batches of the images whose labels are usable to a `pipeline.dissect.Tally`
and commits the tally's integer sums with the stream's position (and the ids TensorFlow
dropped so far) to one checkpoint file every `checkpoint.seconds` (or `checkpoint.batches`).
A killed pass resumes there: its batches are formed from the same images and the sums are
counts, so the result is identical to an uninterrupted pass. The images TensorFlow could not
decode are retried with Pillow at the end; the final checkpoint says the pass is finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from pipeline.datasets import BatchStream
from pipeline.store import Pacer, atomic_h5, damage, open_h5, read_strings, remove_checked, write_strings

logger = logging.getLogger(__name__)


@dataclass
class Streaming:
    """What every pass streams with: the images, the model input, the batch and checkpoint keys."""

    table: Any
    spec: Any
    batch_size: int
    checkpoint: Any  # cfg.checkpoint: seconds, batches


@dataclass
class Dissection:
    """The sums of a dissection, per layer, without the unlabelled slot."""

    limits: list  # T (C,) per layer
    rank_errors: list  # (C,) per layer; NaN where the thresholds were given
    sketches: list | None  # (C, SKETCH_BUCKETS) per layer; None: the thresholds were given
    inter: list  # (C, L) int64 per layer
    area: list  # (C,) int64 per layer
    label_area: np.ndarray  # (L,) int64
    images: int  # dissected
    skipped: dict  # {id: why its labels are unusable}
    errors: dict  # {id: why the image is unreadable}


def dissect(model, names: list[str], spec, masks, streaming: Streaming, ids: np.ndarray, n_concepts: int,
            quantile: float, downsample: int, work, limits=None, sketches=None) -> Dissection:
    """Both passes over `ids`, each checkpointed under `work` (a store WorkDir) as sketch.h5
    and tally.h5; the thresholds pass is skipped when `limits` are given, or `sketches` (per
    layer, the counts that pass would find: the scan's, scan.sketch)."""
    from pipeline.dissect import Tally, thresholds

    rank_errors = [np.full(len(t), np.nan, np.float32) for t in limits or []]
    if limits is None and sketches is None:
        sketch = Tally(model, names, spec, n_concepts, downsample=downsample)
        # T_k is a level of the unit's activations over the images: no label is read for it
        stream_pass(sketch, None, streaming, ids, work.path / "sketch.h5", "thresholds", work.resuming)
        sketches = [sketch.state()[f"sketch_{i}"] for i in range(len(names))]
    if limits is None:
        limits, rank_errors = (list(t) for t in zip(*(thresholds(s, quantile) for s in sketches)))
    tally = Tally(model, names, spec, n_concepts, limits=limits, downsample=downsample)
    skipped, errors = stream_pass(tally, masks, streaming, ids, work.path / "tally.h5", "IoU", work.resuming)
    state = tally.state()
    return Dissection(list(limits), rank_errors, sketches, [state[f"inter_{i}"][:, :-1] for i in range(len(names))],
                      [state[f"area_{i}"] for i in range(len(names))], state["label_area"][:-1], tally.images_seen,
                      skipped, errors)


def stream_pass(tally, masks, streaming: Streaming, ids: np.ndarray, state_path: Path, name: str,
                resuming: Callable[[int, int, str], None]):
    """Stream `ids` through `tally` (the images `masks` finds usable labels for; all of
    them when `masks` is None),
    checkpointing into `state_path` and resuming from it (said once through `resuming`);
    returns ({id: label reason}, {id: unreadable image})."""
    import tensorflow as tf

    position, dropped, skipped, finished = 0, [], {}, False
    why = damage(state_path) if state_path.exists() else "missing"
    if why not in ("missing", None):
        logger.warning("dissect: %s pass: checkpoint %s is damaged (%s): the pass starts again", name, state_path, why)
        remove_checked(state_path)
    elif why is None:
        with open_h5(state_path, "dissect checkpoint") as f:
            position, finished = int(f.attrs["position"]), bool(f.attrs["finished"])
            dropped = f["dropped"][()].tolist()
            skipped = dict(zip(f["skipped/image"][()].tolist(), read_strings(f["skipped/reason"])))
            tally.load_state({k: f[f"state/{k}"][()] for k in f["state"]}, int(f.attrs["images_seen"]))
        resuming(position, len(ids), f"images of the {name} pass")
    stream = BatchStream(streaming.table, streaming.spec, streaming.batch_size, ids=ids[position:], dropped=dropped)
    if finished:
        stream.dropped = []  # the pass (its Pillow retries too) is in the checkpoint
    pacer = Pacer(streaming.checkpoint)

    def feed(batch_ids, pixels):
        if masks is None:  # every readable image
            tally.update(pixels)
            return
        labels, keep, bad = masks(batch_ids)
        skipped.update(bad)
        if len(keep):
            tally.update(tf.gather(pixels, keep) if len(keep) < len(batch_ids) else pixels, labels)

    if not finished:
        with tqdm(total=len(ids), initial=position, desc=f"dissect: {name}", unit="img") as bar:
            for batch_ids, pixels in stream.main():
                feed(batch_ids, pixels)
                bar.update(stream.position + position - bar.n)
                if pacer.due():
                    _checkpoint(state_path, tally, position + stream.position, stream.dropped, skipped, False)
        for batch_ids, pixels in stream.fallback():
            feed(batch_ids, pixels)
        _checkpoint(state_path, tally, len(ids), [], skipped, True, stream.errors)
    with open_h5(state_path, "dissect checkpoint") as f:
        errors = dict(zip(f["errors/image"][()].tolist(), read_strings(f["errors/reason"])))
    return skipped, errors


def _checkpoint(path: Path, tally, position: int, dropped, skipped: dict, finished: bool, errors=None) -> None:
    with atomic_h5(path, checked=True) as f:
        f.attrs.update(position=position, finished=finished, images_seen=tally.images_seen)
        f["dropped"] = np.asarray(sorted(dropped), np.int64)
        for group, table in (("skipped", skipped), ("errors", errors or {})):
            g = f.create_group(group)
            g["image"] = np.asarray(sorted(table), np.int64)
            write_strings(g, "reason", [table[i] for i in sorted(table)])
        for key, array in tally.state().items():
            f.create_dataset(f"state/{key}", data=array, compression="gzip" if array.ndim > 1 else None)
