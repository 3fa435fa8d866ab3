"""What the per-image stages (activations, cam, occlusion) look at: which images (a
count, a list of ids, or the top images of channels in the scan) and which classes
(predicted, labelled, listed, the top N), with the names of the model's classes.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.datasets import ImageTable
from pipeline.errors import PipelineError
from pipeline.store import stored_name

logger = logging.getLogger(__name__)


def images_from_topk(value) -> bool:
    """Whether an `images` setting names the top images of channels in the scan."""
    from omegaconf import DictConfig

    return isinstance(value, (dict, DictConfig))



def choose_images(value, table: ImageTable, store, section: str, key: str = "images", *,
                  candidates: np.ndarray | None = None, per_class: bool = False) -> np.ndarray:
    """Image ids from a stage's `images` setting (`key`): N (the first N), a list of ids, or
    {layer, channels, k} (the k top images of each channel in the scan's results).

    candidates: the ids a count picks from (default every image; e.g. the held-out images
    of a trained model). per_class: a count N means one image of each of the first N
    classes among the candidates (`one_per_class`) instead of the first N."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    n = len(table)
    name = f"{section}.{key}"
    if images_from_topk(value):
        spec = OmegaConf.to_container(value) if isinstance(value, DictConfig) else dict(value)
        unknown = set(spec) - {"layer", "channels", "k"}
        if unknown or "layer" not in spec:
            raise PipelineError(f"{name}={spec}: use {{layer: NAME, channels: [..], k: 1}}")
        return _top_images(store, str(spec["layer"]), spec.get("channels"), int(spec.get("k", 1)), section, name)
    if isinstance(value, (ListConfig, list, tuple)):
        ids = np.asarray(list(value), dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n)]
        if len(bad):
            raise PipelineError(f"{name} has id {int(bad[0])}: the dataset has image ids 0 to {n - 1}")
        return ids
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        pool = np.arange(n, dtype=np.int64) if candidates is None else np.asarray(candidates, np.int64)
        return one_per_class(table.labels, pool, int(value)) if per_class else pool[:int(value)]
    raise PipelineError(f"{name}={value}: use N (the first N images), a list of ids, "
                        "or {layer: NAME, channels: [..], k: 1}")


def one_per_class(labels: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """n image ids among `candidates`: one of each class in class order (the first of each),
    then further labelled images where there are fewer than n classes; the first n
    candidates where no candidate is labelled."""
    candidates = np.asarray(candidates, np.int64)
    known = candidates[np.asarray(labels)[candidates] >= 0]
    if len(known) == 0:
        return candidates[:n]
    _, first = np.unique(labels[known], return_index=True)
    picked = known[first][:n]
    if len(picked) < n:
        rest = np.setdiff1d(known, picked, assume_unique=True)
        picked = np.concatenate([picked, rest[:n - len(picked)]])
    return picked


def drawn_images(value, table: ImageTable, store, section: str, key: str = "draw") -> np.ndarray:
    """Ids of the images a stage draws and keeps input-resolution maps for: like
    `choose_images`, plus 0 (none) and null (every image)."""
    if value is None:
        return np.arange(len(table), dtype=np.int64)
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return np.zeros(0, np.int64)
    return choose_images(value, table, store, section, key)


def _top_images(store, layer: str, channels, k: int, section: str, name: str) -> np.ndarray:
    with store.open() as f:
        group = f.get(f"layers/{stored_name(layer)}")
        if group is None or "topk" not in group:
            have = ", ".join(str(f[f"layers/{key}"].attrs.get("name", key)) for key in f.get("layers", {}))
            raise PipelineError(f"{name}: layer {layer} was not scanned (scanned: {have or 'none'}); "
                                f"add it to layers=[...] and run the scan")
        image = group["topk/image"][()]
    c = image.shape[0]
    chosen = list(range(c)) if channels is None else [int(i) for i in channels]
    if any(not 0 <= i < c for i in chosen):
        raise PipelineError(f"{name}: layer {layer} has channels 0 to {c - 1}")
    ids = image[chosen, :max(1, k)].reshape(-1)
    ids = ids[ids >= 0]
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)].astype(np.int64)


def class_names(bundle, table: ImageTable, num_classes: int) -> list[str]:
    """Names of the model's classes: ImageNet's, the dataset's folders, or numbers."""
    if bundle.imagenet_classes and num_classes == 1000:
        from pipeline.models.imagenet import class_names as imagenet

        return imagenet()
    if len(table.class_names) == num_classes:
        return list(table.class_names)
    return [f"class {i}" for i in range(num_classes)]



def target_codes(c, section: str, table: ImageTable, names: list[str], num_classes: int):
    """The target setting of `c`, the config section `section` (cam: predicted, label,
    classes or top; occlusion: predicted or label) -> a function ids -> codes for
    pipeline.explain."""
    target = str(c.target)
    if target == "predicted":
        return lambda ids: np.full((len(ids), 1), -1, np.int64)
    if target == "label":
        if (table.labels < 0).all():
            raise PipelineError(f"{section}.target=label but the dataset has no labels: use class folders "
                                f"(dataset=folder) or a 'path label' list, or {section}.target=predicted")
        if table.labels.max() >= num_classes:
            raise PipelineError(f"dataset label {int(table.labels.max())} is beyond the model's {num_classes} "
                                f"classes: use {section}.target=predicted")
        unlabelled = int((table.labels < 0).sum())
        if unlabelled:
            logger.warning("%d unlabelled image(s) are explained for their predicted class", unlabelled)
        return lambda ids: table.labels[ids].reshape(-1, 1)
    if target == "classes" and section == "cam":
        wanted = [_class_index(v, names, num_classes) for v in c.classes]
        if not wanted:
            raise PipelineError("cam.target=classes with cam.classes=[]: list class indices or names")
        return lambda ids: np.tile(np.asarray(wanted, np.int64), (len(ids), 1))
    if target == "top" and section == "cam":
        n = int(c.top_n)
        if not 1 <= n <= num_classes:
            raise PipelineError(f"cam.top_n={n}: use 1 to {num_classes}")
        return lambda ids: np.tile(-np.arange(1, n + 1, dtype=np.int64), (len(ids), 1))
    choices = "predicted|label|classes|top" if section == "cam" else "predicted|label"
    raise PipelineError(f"{section}.target={target}: use {choices}")



def _class_index(value, names: list[str], num_classes: int) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
        index = int(value)
        if not 0 <= index < num_classes:
            raise PipelineError(f"cam.classes has {index}: the model has classes 0 to {num_classes - 1}")
        return index
    if value in names:
        return names.index(value)
    import difflib

    close = difflib.get_close_matches(str(value), names, n=3)
    raise PipelineError(f"cam.classes has unknown class {value!r}"
                        f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}: use an index or a class name")


def explainer_for(make, section: str, c, bundle, table: ImageTable):
    """(explainer, class names, ids -> target codes) for a stage that explains classes
    (`section`: its config section's name, `c`: that section); a model without class
    scores skips the stage (StageSkipped says why)."""
    from pipeline.errors import StageSkipped
    from pipeline.graph import NoClassScores

    try:
        explainer = make()
    except NoClassScores as err:
        raise StageSkipped(str(err)) from None
    names = class_names(bundle, table, explainer.num_classes)
    return explainer, names, target_codes(c, section, table, names, explainer.num_classes)
