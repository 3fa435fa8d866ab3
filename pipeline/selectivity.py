"""Class selectivity of units (Morcos et al. 2018), from class-conditional sums.

The scan adds, per channel and class, the per-image activation (its spatial maximum and
its spatial mean) of every labelled image; sums and image counts per class are additive,
so shards merge and killed scans resume exactly. From them:

    mu_c      = sum_c / count_c                     the class-conditional mean
    mu_max    = max_c mu_c                          the preferred class's mean
    mu_rest   = mean of mu_c over the other classes (those with images)
    selectivity = (mu_max - mu_rest) / (mu_max + mu_rest)

0 when every class excites the unit equally, 1 when only one class does (for
non-negative activations, e.g. after a ReLU; other activations can leave [0, 1]). A
unit that is zero on every class has selectivity 0; with fewer than two classes seen it
is undefined (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATISTICS = ("max", "mean")  # the per-image activation: spatial maximum, spatial mean


@dataclass
class Selectivity:
    index: np.ndarray  # (C,) float32, NaN where fewer than two classes have images
    preferred: np.ndarray  # (C,) int64 class with the largest mean (lowest class on ties), -1 if none
    means: np.ndarray  # (C, L) float32 class-conditional means, NaN for classes without images


def class_selectivity(sums: np.ndarray, counts: np.ndarray) -> Selectivity:
    """Selectivity from per-class sums (C, L) and image counts (L,)."""
    sums = np.asarray(sums, np.float64)
    counts = np.asarray(counts, np.int64)
    present = counts > 0
    means = np.full(sums.shape, np.nan)
    means[:, present] = sums[:, present] / counts[present]
    c = sums.shape[0]
    if present.sum() < 2:
        preferred = np.full(c, int(np.flatnonzero(present)[0]) if present.any() else -1, np.int64)
        return Selectivity(np.full(c, np.nan, np.float32), preferred, means.astype(np.float32))
    seen = means[:, present]
    best = np.argmax(seen, axis=1)  # first maximum: the lowest class on ties
    mu_max = seen[np.arange(c), best]
    mu_rest = (seen.sum(axis=1) - mu_max) / (seen.shape[1] - 1)
    denominator = mu_max + mu_rest
    index = np.divide(mu_max - mu_rest, denominator, out=np.zeros(c), where=denominator != 0)
    return Selectivity(index.astype(np.float32), np.flatnonzero(present)[best].astype(np.int64),
                       means.astype(np.float32))
