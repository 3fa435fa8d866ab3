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


def test_the_target_setting_is_read_for_the_section_named():
    """The section is named by the caller: an occlusion section that happens to carry a
    `top_n` key is still occlusion's (predicted|label only), and errors name it."""
    from omegaconf import OmegaConf

    from pipeline.selection import target_codes

    t = table([1, 0, -1])
    occlusion = OmegaConf.create(dict(target="top", top_n=2, classes=[1]))
    with pytest.raises(PipelineError, match=r"^occlusion.target=top: use predicted\|label$"):
        target_codes(occlusion, "occlusion", t, ["a", "b", "c"], 3)
    cam = OmegaConf.create(dict(target="top", top_n=2, classes=[]))
    assert target_codes(cam, "cam", t, ["a", "b", "c"], 3)(np.array([0, 2])).tolist() == [[-1, -2], [-1, -2]]
    unlabelled = table([-1, -1])
    with pytest.raises(PipelineError, match=r"^cam.target=label but the dataset has no labels"):
        target_codes(OmegaConf.create(dict(target="label")), "cam", unlabelled, ["a"], 1)
    assert target_codes(OmegaConf.create(dict(target="label")), "occlusion", t, ["a", "b"], 2)(
        np.array([1, 0])).tolist() == [[0], [1]]
