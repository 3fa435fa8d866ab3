"""`correspondence` stage: does the network tie parts of an object together across
images? (Zeiler & Fergus 2013, section 4.3, Table 1.)

The same part (a box at the same place) is occluded in several images of one class.
For image i and layer l the change of the feature vector is eps_i = f_l(x_i) -
f_l(occluded x_i); the consistency score of the part is the mean, over pairs of
images, of the fraction of feature positions where sign(eps_i) and sign(eps_j)
differ (Hamming distance of the sign vectors, divided by their length). Lower means
the occlusion changes the representation in the same way in every image. Random
boxes of the same size (one position per trial, the same in every image) give the
baseline. Options live in the `invariance` section (correspondence_*).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import is_sequence
from pipeline.errors import PipelineError
from pipeline.layers import default_layers
from pipeline.models.sources import analysed_model, own_snapshots
from pipeline.render.training import draw_correspondence
from pipeline.store import Store, stored_name

logger = logging.getLogger(__name__)

KEYS = ("model", "dataset", "layers", "train", "invariance.layers", "invariance.correspondence_images",
        "invariance.correspondence_class", "invariance.correspondence_parts", "invariance.correspondence_names",
        "invariance.correspondence_random", "invariance.correspondence_fill")
PART = "correspondence.h5"


def reads(cfg) -> tuple[str, ...]:
    """This run's snapshots when it trained some (else the configured model)."""
    return own_snapshots(cfg)


FIGURE = Path("sheets") / "correspondence.png"


def pixel_box(box, size: tuple[int, int]) -> np.ndarray:
    """[y0, x0, y1, x1] fractions -> half-open pixel box in a (height, width) image, at least one pixel."""
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise PipelineError(f"correspondence part {[y0, x0, y1, x1]}: give [y0, x0, y1, x1] fractions with "
                            f"0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1")
    a = np.array([y0, x0, y1, x1]) * np.tile(size, 2)
    lo = np.floor(a[:2]).astype(int)
    hi = np.maximum(np.ceil(a[2:]).astype(int), lo + 1)
    return np.concatenate([lo, np.minimum(hi, size)])


def random_boxes(like: np.ndarray, count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """`count` boxes of the size of `like` (pixel box) at random places inside a (height, width) image."""
    rng = np.random.default_rng(seed)
    h, w = like[2] - like[0], like[3] - like[1]
    y = rng.integers(0, size[0] - h + 1, count)
    x = rng.integers(0, size[1] - w + 1, count)
    return np.stack([y, x, y + h, x + w], axis=1)


def sign_disagreement(eps) -> np.ndarray:
    """Mean over image pairs of the fraction of positions where the signs of two
    images' feature changes differ. eps: (N, D) -> scalar; (..., N, D) -> (...)."""
    s = np.sign(np.asarray(eps))
    n = s.shape[-2]
    if n < 2:
        raise PipelineError("correspondence needs at least two images: raise invariance.correspondence_images")
    # per position, ordered pairs that differ = n^2 - sum over sign values of count^2
    counts = np.stack([(s == v).sum(axis=-2) for v in (-1, 0, 1)]).astype(np.int64)
    differ = n * n - (counts ** 2).sum(axis=0)
    return differ.mean(axis=-1) / (n * (n - 1))


def occlusion_scores(model, names: list[str], spec, pixels: np.ndarray, boxes: np.ndarray, fill: float,
                     batch_size: int = 32) -> np.ndarray:
    """(B, L) consistency score of each pixel box (B, 4) for each layer, over the images."""
    import tensorflow as tf

    from pipeline.graph import feature_model
    from pipeline.preprocess import normalize

    features = feature_model(model, names)

    @tf.function(reduce_retracing=True)
    def forward(x):
        outs = features(normalize(x, spec.normalize), training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        return [tf.reshape(o, (tf.shape(o)[0], -1)) for o in outs]

    n, size = len(pixels), pixels.shape[1]
    reference = [r.numpy() for r in forward(tf.constant(pixels.astype(np.float32)))]
    yy = np.arange(size)[None, :, None]
    xx = np.arange(size)[None, None, :]
    jobs = [(b, i) for b in range(len(boxes)) for i in range(n)]
    signs = [np.zeros((len(boxes), n, r.shape[1]), np.int8) for r in reference]  # sign of eps
    for start in tqdm(range(0, len(jobs), batch_size), desc="correspondence", unit="batch",
                      total=math.ceil(len(jobs) / batch_size)):
        chunk = np.asarray(jobs[start:start + batch_size])
        b, i = chunk[:, 0], chunk[:, 1]
        y0, x0, y1, x1 = (boxes[b, k][:, None, None] for k in range(4))
        mask = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        occluded = np.where(mask[..., None], np.float32(fill), pixels[i].astype(np.float32))
        for layer, out in enumerate(forward(tf.constant(occluded))):
            signs[layer][b, i] = np.sign(reference[layer][i] - out.numpy())
    return np.asarray([[sign_disagreement(s[b]) for s in signs] for b in range(len(boxes))], np.float32)


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline import train as T
    from pipeline.datasets import list_images
    from pipeline.layers import select_layers

    ic = cfg.invariance
    bundle, class_names, _ = analysed_model(cfg, run_dir)
    model, spec = bundle.model, bundle.preprocessing
    names = select_layers(model, ic.layers) if ic.layers is not None else \
        default_layers(model, select_layers(model, cfg.layers))
    table = list_images(cfg.dataset)
    if is_sequence(ic.correspondence_images):
        ids = np.asarray([int(i) for i in ic.correspondence_images], np.int64)
        if (ids < 0).any() or (ids >= len(table)).any():
            raise PipelineError(f"invariance.correspondence_images={ids.tolist()} is outside 0..{len(table) - 1}")
    else:
        ids = np.flatnonzero(table.labels == int(ic.correspondence_class))[:int(ic.correspondence_images)]
        if len(ids) < 2:
            raise PipelineError(f"fewer than two images of class {ic.correspondence_class}: set "
                                f"invariance.correspondence_class to a class of the dataset")
    part_names = [str(n) for n in ic.correspondence_names]
    parts = [list(p) for p in ic.correspondence_parts]
    if not parts:
        raise PipelineError("invariance.correspondence_parts=[] occludes nothing: give [y0, x0, y1, x1] boxes")
    part_names = (part_names + [f"part{k}" for k in range(len(parts))])[:len(parts)]
    ids, pixels, errors = T.load_pixels(table, spec, np.sort(ids), batch_size=cfg.batch_size,
                                        desc="correspondence images")
    size = spec.size
    boxes = np.stack([pixel_box(p, size) for p in parts])
    trials = max(0, int(ic.correspondence_random))
    random = np.concatenate([random_boxes(b, trials, size, seed=k) for k, b in enumerate(boxes)]) \
        if trials else np.zeros((0, 4), np.int64)
    logger.info("correspondence of %s: %d images, parts %s, %d random boxes per part, layers %s",
                bundle.name, len(ids), part_names, trials, names)
    scores = occlusion_scores(model, names, spec, pixels, np.concatenate([boxes, random]),
                              float(ic.correspondence_fill), cfg.batch_size)
    part_scores = scores[:len(parts)]
    random_scores = scores[len(parts):].reshape(len(parts), trials, len(names))

    store = Store(run_dir)
    store.ensure_run(cfg, bundle, table)
    store.write_images(len(table), errors, replace=False)
    with store.write(PART) as f:
        g = f.create_group("correspondence")
        g.attrs.update(model=bundle.name, layers=json.dumps(names), parts=json.dumps(part_names),
                       stored_layers=json.dumps([stored_name(n) for n in names]), fill=float(ic.correspondence_fill))
        g["images"] = ids
        g["boxes"] = boxes.astype(np.int32)
        g["random_boxes"] = random.reshape(len(parts), trials, 4).astype(np.int32)
        g["score"] = part_scores
        g["random_score"] = random_scores
    draw_correspondence(part_names, names, part_scores, random_scores, run_dir / FIGURE, len(ids))
    logger.info("correspondence scores in %s", run_dir / FIGURE)


