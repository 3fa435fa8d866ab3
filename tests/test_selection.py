"""Which images a stage looks at (pipeline.selection.choose_images): counts, lists and one
image per class among candidates, with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.datasets import ImageTable
from pipeline.errors import PipelineError
from pipeline.selection import choose_images


def table(labels) -> ImageTable:
    return ImageTable([f"{i}.png" for i in range(len(labels))], np.asarray(labels, np.int64))


def test_counts_lists_and_one_image_per_class_among_candidates():
    t = table([2, 2, 0, 1, 0, -1, 3])

    def pick(value, candidates=None, per_class=True):
        return choose_images(value, t, None, "invariance", candidates=candidates, per_class=per_class).tolist()

    assert pick(3) == [2, 3, 0]  # classes 0, 1, 2: their first images
    assert pick(2, np.array([1, 4, 6])) == [4, 1]
    assert pick(5, np.array([0, 1, 5])) == [0, 1]  # one class only: the other labelled image, not the unlabelled
    assert pick(3, np.array([5])) == [5]  # no labels among the candidates: the first candidates
    assert pick(2, per_class=False) == [0, 1] and pick(2, np.array([4, 6]), per_class=False) == [4, 6]
    assert pick([6, 1]) == [6, 1]
    with pytest.raises(PipelineError, match="invariance.images has id 9: the dataset has image ids 0 to 6"):
        pick([9])
    with pytest.raises(PipelineError, match="invariance.images=0"):
        pick(0)
