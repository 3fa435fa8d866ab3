"""`filters` stage: convolution weights and filter patterns (activation maximisation).

Needs only the model (no scan). Writes, in results.h5:

    filters/kernel_table/    every convolution kernel of the model: layer, kind, variable, shape
    filters/<conv>/weights   kernels (kh, kw, in, out) as Keras holds them, bias, ...
    filters/<layer>/patterns (n, H, W, 3) uint8 at the model's input size, value, channels, ...

and renders, from results.h5 only, sheets/filters/*.png and the toolbox files
toolbox/regularized_opt/<layer>/ (pipeline.render.toolbox, the layout the export writes).
Patterns are written a block of channels at a time; a killed run resumes with the
channels that are missing.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.render.filters import (
    KERNEL_TABLE,
    SHEETS_DIR,
    Kernel,
    kernel_table_text,
    render_filter_sheets,
)
from pipeline.render.toolbox import write_regularized_opt
from pipeline.store import Store, stored_name, write_strings

logger = logging.getLogger(__name__)

# the config keys whose values decide this stage's results
KEYS = ("model", "layers", "filters")
PART = "filters.h5"

WEIGHT_MODES = ("selected", "all", "none")
UPSCALE_MODES = ("auto", "tile", "resize")
BLOCK_BATCHES = 8  # optimisation batches per chunk file (a killed run resumes after the last one)
TOOLBOX_DIR = "toolbox"

_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
         keras.layers.Conv2DTranspose)
# layers that pass a convolution's channels through one to one
_PASS = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation, keras.layers.LeakyReLU,
         keras.layers.ELU, keras.layers.PReLU, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
         keras.layers.Dropout, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
         keras.layers.SpatialDropout2D, keras.layers.LayerNormalization)


# --------------------------------------------------------------------------- kernels


def conv_kernels(model: keras.Model) -> list[Kernel]:
    """Every convolution kernel of `model` (nested models included), in graph order."""
    from pipeline.graph import flat_layers

    rows, seen = [], set()
    for node in flat_layers(model):
        layer = node.layer
        if not isinstance(layer, _CONV) or id(layer) in seen:
            continue
        seen.add(id(layer))
        for var in _kernel_variables(layer):
            rows.append(Kernel(node.name, type(layer).__name__, var, tuple(int(d) for d in getattr(layer, var).shape)))
    return rows


def _kernel_variables(layer) -> list[str]:
    if isinstance(layer, keras.layers.SeparableConv2D):
        return ["depthwise_kernel", "pointwise_kernel"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return ["kernel"] if hasattr(layer, "kernel") else ["depthwise_kernel"]
    return ["kernel"]


def feeding_conv(model: keras.Model, name: str) -> str | None:
    """The convolution whose channels `name` passes on one to one (through batch norm,
    activations, padding, pooling), or None."""
    from pipeline.graph import flat_layers

    by_name = {n.name: n for n in flat_layers(model)}
    node = by_name.get(name)
    while node is not None:
        if isinstance(node.layer, _CONV):
            return node.name
        if not isinstance(node.layer, _PASS) or len(node.inputs) != 1:
            return None
        node = by_name.get(node.inputs[0])
    return None


def _weight_layers(mode: str, model, kernels: list[Kernel], pattern_layers: list[str]) -> list[str]:
    convs = list(dict.fromkeys(k.layer for k in kernels))
    if mode == "none" or not convs:
        return []
    if mode == "all":
        return convs
    chosen = {convs[0]}
    for name in pattern_layers:
        conv = feeding_conv(model, name)
        if conv is not None:
            chosen.add(conv)
    return [c for c in convs if c in chosen]


def _write_weights(f: h5py.File, model, names: list[str]) -> None:
    from pipeline.graph import flat_layers

    layers = {n.name: n.layer for n in flat_layers(model)}
    for name in names:
        layer = layers[name]
        g = f.require_group(f"filters/{stored_name(name)}")
        variables = _kernel_variables(layer)
        main = np.asarray(getattr(layer, variables[0]).numpy(), np.float32)
        if isinstance(layer, keras.layers.Conv2DTranspose):  # Keras holds (kh, kw, out, in)
            main = main.transpose(0, 1, 3, 2)
        g.create_dataset("weights", data=main, compression="gzip", shuffle=True)
        if len(variables) > 1:
            g.create_dataset("pointwise", data=np.asarray(getattr(layer, variables[1]).numpy(), np.float32),
                             compression="gzip", shuffle=True)
        bias = getattr(layer, "bias", None)
        if bias is not None:
            g["bias"] = np.asarray(bias.numpy(), np.float32)
        g.attrs.update(name=name, kind=type(layer).__name__,
                       kernel_shape=np.asarray(main.shape, np.int64))


def _write_conv_links(f: h5py.File, model, jobs: list, weight_layers: list[str]) -> None:
    """filters/<layer>.attrs['conv']: the convolution whose stored weights make the units
    of a pattern layer (unit cards read it instead of guessing from names)."""
    for job in jobs:
        conv = feeding_conv(model, job.layer)
        if conv is not None and conv in weight_layers and stored_name(conv) != job.key:
            f.require_group(f"filters/{job.key}").attrs["conv"] = conv


# --------------------------------------------------------------------------- jobs


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


def _recipe(fc, objective: str):
    from pipeline.patterns import METHODS, OBJECTIVES, Recipe

    if fc.method not in METHODS:
        raise PipelineError(f"filters.method={fc.method} is unknown: use {' or '.join(METHODS)}")
    if fc.objective not in OBJECTIVES:
        raise PipelineError(f"filters.objective={fc.objective} is unknown: use {' or '.join(OBJECTIVES)}")
    if fc.upscale not in UPSCALE_MODES:
        raise PipelineError(f"filters.upscale={fc.upscale} is unknown: use {' or '.join(UPSCALE_MODES)}")
    if fc.weights not in WEIGHT_MODES:
        raise PipelineError(f"filters.weights={fc.weights} is unknown: use {' or '.join(WEIGHT_MODES)}")
    if fc.seeds < 1 or fc.batch < 1:
        raise PipelineError("filters.seeds and filters.batch must be 1 or more")
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


def _jobs(cfg, bundle) -> list[Job]:
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
    for key, name in chosen_layers(model, cfg.layers):
        total = int(shapes[name][-1])
        read = (preactivation(model, name) or name) if fc.objective == "neg" else name
        jobs.append(Job(name, _channels(fc.channels, total, name), total, read=read, stored=key))
    return jobs


# --------------------------------------------------------------------------- stage


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.models.sources import load_model
    from pipeline.patterns import filter_patterns

    fc = cfg.filters
    recipe = _recipe(fc, fc.objective)
    bundle = load_model(cfg.model, cfg.cache_dir)
    model, spec = bundle.model, bundle.preprocessing
    jobs = _jobs(cfg, bundle)
    kernels = conv_kernels(model)
    logger.info("convolution kernels of %s:\n%s", bundle.name, kernel_table_text(kernels))
    weight_layers = _weight_layers(fc.weights, model, kernels, [j.layer for j in jobs])

    store = Store(run_dir)
    store.ensure_run(cfg, bundle)
    work = store.work("filters", stage_print, cfg.overwrite)
    block = BLOCK_BATCHES * int(fc.batch)  # a pattern depends on its (seed, channel) only, not on its block
    blocks = [(job, np.arange(start, min(start + block, len(job.targets))))
              for job in jobs for start in range(0, len(job.targets), block)]
    done = set(work.chunks())
    todo = [(n, job, rows) for n, (job, rows) in enumerate(blocks) if work.chunk_name(n) not in done]
    total = sum(len(rows) for _, _, rows in todo) * int(fc.seeds)
    work.resuming(len(blocks) - len(todo), len(blocks), "blocks of channels")
    logger.info("filter patterns: %d image(s) over %d layer(s), %s, %d steps", total, len(jobs),
                recipe.method, recipe.steps)
    with tqdm(total=total // int(fc.seeds), desc="patterns", unit="ch") as bar:
        for number, job, rows in todo:
            bar.set_postfix_str(job.layer)
            result = filter_patterns(model, spec, job.layer, job.targets[rows], objective=fc.objective,
                                     recipe=recipe, repeats=int(fc.seeds), batch=int(fc.batch),
                                     head=job.head, progress=bar)
            with work.write(work.chunk_name(number)) as f:
                _write_block(f, job, rows, result, fc.objective)

    outdone = _outdo_rivals(work, blocks, bundle) if fc.rivals and fc.objective == "channel" else {}

    with store.write(PART) as f:
        work.assemble(f)
        for key, (images, values, started_from) in outdone.items():
            g = f[f"filters/{key}"]
            for name, data in (("patterns", images), ("value", values)):
                del g[name]  # a virtual dataset over the chunks, which stay as they were
            g.create_dataset("patterns", data=images, chunks=(1,) + images.shape[1:], compression="gzip",
                             shuffle=True)
            g["value"] = values
            g["started_from"] = started_from
        root = f.require_group("filters")
        root.attrs.update(objective=fc.objective, method=recipe.method, steps=recipe.steps,
                          size=recipe.size or min(spec.size), lr=recipe.learning_rate, seed=recipe.seed,
                          seeds=int(fc.seeds), transforms=recipe.transforms and recipe.method == "fourier",
                          upscale=recipe.upscale, normalize=spec.normalize)
        _write_kernel_table(root, kernels)
        _write_weights(f, model, weight_layers)
        _write_conv_links(f, model, jobs, weight_layers)
    part = store.parts / PART
    render_filter_sheets(part, run_dir.joinpath(*SHEETS_DIR), bgr=spec.normalize == "caffe")
    if fc.toolbox:
        write_regularized_opt(part, run_dir / TOOLBOX_DIR)


def _outdo_rivals(work, blocks, bundle) -> dict:
    """Per layer key: its patterns, values and started_from after `outdo_rivals` (the
    whole layer at once: a channel's rival may sit in any block). Read from the chunks,
    which keep the patterns as first optimised."""
    from pipeline.patterns import outdo_rivals

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
        started_from = outdo_rivals(bundle.model, bundle.preprocessing, job.layer, channels, images, values)
        logger.info("filters %s: %d of %d pattern(s) climbed again from another channel's pattern", job.layer,
                    int((started_from >= 0).sum()), len(channels))
        outdone[key] = (images, values, started_from)
    return outdone


def _write_kernel_table(root: h5py.Group, kernels: list[Kernel]) -> None:
    t = root.create_group(KERNEL_TABLE)
    write_strings(t, "layer", [k.layer for k in kernels])
    write_strings(t, "kind", [k.kind for k in kernels])
    write_strings(t, "variable", [k.variable for k in kernels])
    shapes = np.zeros((len(kernels), 4), np.int64)
    for i, k in enumerate(kernels):
        shapes[i, :len(k.shape)] = k.shape[:4]
    t["shape"] = shapes


def _write_block(f: h5py.File, job: Job, rows: np.ndarray, result, objective: str) -> None:
    """One block of a layer's patterns: the best seed's image, its value and final score
    per channel (and every seed's, with filters.seeds > 1)."""
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
