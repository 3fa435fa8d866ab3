"""ImageNet-1k class names, index-aligned with the classifiers' 1000 outputs."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _load() -> tuple[str, ...]:
    text = resources.files("pipeline.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt lists {len(names)} classes, expected 1000")
    return names


def class_names() -> list[str]:
    """The 1000 ImageNet class names; index i names logit i (0 'tench' ... 999 'toilet tissue')."""
    return list(_load())
