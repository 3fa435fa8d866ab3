"""What the filters stage optimises: one job per layer (its channels, or the classes of a
logits head), the optimisation recipe from the config, and how a block of patterns is
stored. pipeline.patterns holds the optimisation itself."""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.kernels import WEIGHT_MODES
from pipeline.store import stored_name

logger = logging.getLogger(__name__)

UPSCALE_MODES = ("auto", "tile", "resize")


@dataclass
class Job:
    layer: str  # qualified name of the layer whose output the objective reads
    targets: np.ndarray  # channels or classes
    total: int  # channels of the layer
    head: object = None  # logits from a Dense+softmax output
    labels: tuple[str, ...] = ()  # class names of the targets
    name: str = ""  # the layer the patterns belong to (class logits: the output layer)
    read: str = ""  # the layer the score is computed from (neg on a ReLU: its input)
    stored: str = ""  # the group name in results.h5 (default: from the layer's name)

    @property
    def key(self) -> str:
        return self.stored or stored_name(self.name or self.layer)


def recipe(fc, objective: str):
    from pipeline.patterns import METHODS, OBJECTIVES, Recipe

    if fc.method not in METHODS:
        raise PipelineError(f"filters.method={fc.method} is unknown: use {' or '.join(METHODS)}")
    if fc.objective not in OBJECTIVES:
        raise PipelineError(f"filters.objective={fc.objective} is unknown: use {' or '.join(OBJECTIVES)}")
    if fc.upscale not in UPSCALE_MODES:
        raise PipelineError(f"filters.upscale={fc.upscale} is unknown: use {' or '.join(UPSCALE_MODES)}")
    if fc.weights not in WEIGHT_MODES:
        raise PipelineError(f"filters.weights={fc.weights} is unknown: use {' or '.join(WEIGHT_MODES)}")
    if fc.restarts < 1 or fc.batch_size < 1:
        raise PipelineError("filters.restarts and filters.batch_size must be 1 or more")
    periodic = fc.method == "fourier" and objective != "class"  # tiling keeps the scale of a periodic image
    upscale = fc.upscale if fc.upscale != "auto" else ("tile" if periodic else "resize")
    recipe = Recipe(method=fc.method, steps=int(fc.steps), size=fc.size, lr=fc.lr, seed=int(fc.seed),
                    transforms=bool(fc.transforms), upscale=upscale)
    recipe.check()
    return recipe


def _channels(spec, total: int, layer: str) -> np.ndarray:
    if spec is None:
        return np.arange(total, dtype=np.int64)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if spec < 1:
            raise PipelineError(f"filters.channels={spec}: give a positive count, a list of channels or null")
        return np.arange(min(int(spec), total), dtype=np.int64)
    try:
        chosen = np.asarray([int(c) for c in spec], np.int64)
    except (TypeError, ValueError):
        raise PipelineError(f"filters.channels={spec}: give null, a count or a list of channel indices") from None
    bad = chosen[(chosen < 0) | (chosen >= total)]
    if bad.size:
        raise PipelineError(f"filters.channels: channel {int(bad[0])} does not exist in {layer} "
                            f"({total} channels): use indices 0..{total - 1}")
    return np.asarray(list(dict.fromkeys(chosen.tolist())), np.int64)


def _classes(values, n_classes: int, imagenet: bool) -> tuple[np.ndarray, tuple[str, ...]]:
    names = []
    if imagenet:
        from pipeline.models.imagenet import class_names
        names = class_names()
    lower = {n.lower(): i for i, n in enumerate(names)}
    ids = []
    for v in values:
        if isinstance(v, (int, np.integer)) or str(v).lstrip("-").isdigit():
            i = int(v)
            if not 0 <= i < n_classes:
                raise PipelineError(f"filters.classes: class {i} does not exist: use 0..{n_classes - 1}")
            ids.append(i)
        elif str(v).lower() in lower:
            ids.append(lower[str(v).lower()])
        else:
            close = difflib.get_close_matches(str(v).lower(), list(lower), n=3)
            hint = f" (nearest: {', '.join(close)})" if close else ""
            raise PipelineError(f"filters.classes: unknown class {v!r}{hint}: give class indices"
                                + (" or ImageNet class names" if imagenet else ""))
    ids = list(dict.fromkeys(ids))
    labels = tuple(names[i] if names else str(i) for i in ids)
    return np.asarray(ids, np.int64), labels


def jobs(cfg, bundle) -> list[Job]:
    from pipeline.graph import flat_layers
    from pipeline.layers import chosen_layers
    from pipeline.patterns import preactivation

    model, fc = bundle.model, cfg.filters
    shapes = {n.name: n.output_shape for n in flat_layers(model)}
    if fc.objective == "class":
        if not fc.classes:
            raise PipelineError("filters.objective=class needs classes: add filters.classes=[1,207] "
                                "(indices or ImageNet class names)")
        from pipeline.graph import choose_output, logits_head, output_names

        index = choose_output(model, cfg.model.output)
        layer, head = logits_head(model, index)
        n_classes = int(model.outputs[index].shape[-1])
        targets, labels = _classes(list(fc.classes), n_classes, bundle.imagenet_classes)
        return [Job(layer, targets, n_classes, head, labels, name=output_names(model)[index], read=layer)]
    jobs = []
    for key, name in chosen_layers(model, cfg.layers, bundle.renamed):
        total = int(shapes[name][-1])
        read = (preactivation(model, name) or name) if fc.objective == "neg" else name
        jobs.append(Job(name, _channels(fc.channels, total, name), total, read=read, stored=key))
    return jobs



def outdo_rivals(work, blocks, bundle) -> dict:
    """Per layer key: its patterns, values and started_from after `outdo_rivals` (the
    whole layer at once: a channel's rival may sit in any block). Read from the chunks,
    which keep the patterns as first optimised."""
    from pipeline.patterns import outdo_rivals as climb

    by_key: dict[str, tuple[Job, list[int]]] = {}
    for n, (job, _) in enumerate(blocks):
        by_key.setdefault(job.key, (job, []))[1].append(n)
    outdone = {}
    for key, (job, numbers) in by_key.items():
        images, values, channels = [], [], []
        for n in numbers:
            with work.open(work.chunk_name(n)) as f:
                g = f[f"filters/{key}"]
                images.append(g["patterns"][()])
                values.append(g["value"][()])
                channels.append(g["channels"][()])
        images, values, channels = np.concatenate(images), np.concatenate(values), np.concatenate(channels)
        if len(channels) < 2:
            continue
        started_from = climb(bundle.model, bundle.preprocessing, job.layer, channels, images, values)
        logger.info("filters %s: %d of %d pattern(s) climbed again from another channel's pattern", job.layer,
                    int((started_from >= 0).sum()), len(channels))
        outdone[key] = (images, values, started_from)
    return outdone



def write_block(f: h5py.File, job: Job, rows: np.ndarray, result, objective: str) -> None:
    """One block of a layer's patterns: the best seed's image, its value and final score
    per channel (and every seed's, with filters.restarts > 1)."""
    g = f.create_group(f"filters/{job.key}")
    g.attrs.update(name=job.name or job.layer, objective_layer=job.read or job.layer, channels_total=job.total,
                   objective=objective, optimised_size=int(result.optimised_size))
    if job.labels:
        g.attrs["class_names"] = json.dumps(list(job.labels))
    best, idx = result.best, np.arange(len(rows))
    size = result.images.shape[2]
    g["channels"] = job.targets[rows]
    g["computed"] = np.ones(len(rows), bool)
    g.create_dataset("patterns", data=result.images[idx, best], chunks=(1, size, size, 3), compression="gzip",
                     shuffle=True)
    g["value"] = result.values[idx, best].astype(np.float32)
    g["final_score"] = result.final_scores[idx, best].astype(np.float32)
    if result.images.shape[1] > 1:
        g.create_dataset("pattern_seeds", data=result.images, chunks=(1, 1, size, size, 3), compression="gzip",
                         shuffle=True)
        g["seed_values"] = result.values.astype(np.float32)
