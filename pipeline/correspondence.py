"""Does the network tie parts of an object together across images? (Zeiler & Fergus
2013, section 4.3, Table 1): the consistency of the feature changes that occluding the
same part causes in several images. The correspondence stage
(pipeline.stages.correspondence) chooses the images and parts and stores the scores."""

from __future__ import annotations

import math

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError


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
        raise PipelineError("correspondence needs at least two images: raise correspondence.images")
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
