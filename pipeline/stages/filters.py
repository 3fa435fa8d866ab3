"""`filters` stage: convolution weights and filter patterns (activation maximisation).

Needs only the model (no scan). Writes, in results.h5:

    filters/kernel_table/    every convolution kernel of the model: layer, kind, variable, shape
    filters/<conv>/weights   kernels (kh, kw, in, out) as Keras holds them, bias, ...
    filters/<layer>/patterns (n, H, W, 3) uint8 at the model's input size, value, channels, ...

and renders, from results.h5 only, sheets/filters/*.png and the toolbox files
toolbox/regularized_opt/<layer>/ (pipeline.toolbox, the layout the export writes).
Patterns are written a block of channels at a time; a killed run resumes with the
channels that are missing.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import h5py
import keras
import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.store import Store, read_strings, stored_name, write_strings
from pipeline.toolbox import write_regularized_opt

logger = logging.getLogger(__name__)

# the config keys whose values decide this stage's results
KEYS = ("model", "layers", "filters")
PART = "filters.h5"

WEIGHT_MODES = ("selected", "all", "none")
UPSCALE_MODES = ("auto", "tile", "resize")
BLOCK_BATCHES = 8  # optimisation batches per chunk file (a killed run resumes after the last one)
KERNEL_TABLE = "kernel_table"
SHEETS_DIR = ("sheets", "filters")
TOOLBOX_DIR = "toolbox"

_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
         keras.layers.Conv2DTranspose)
# layers that pass a convolution's channels through one to one
_PASS = (keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation, keras.layers.LeakyReLU,
         keras.layers.ELU, keras.layers.PReLU, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
         keras.layers.Dropout, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
         keras.layers.SpatialDropout2D, keras.layers.LayerNormalization)


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Kernel:
    layer: str  # qualified layer name
    kind: str  # Keras class name
    variable: str  # kernel | depthwise_kernel | pointwise_kernel
    shape: tuple[int, ...]  # (kh, kw, in, out) as Keras holds it


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


def kernel_table_text(kernels: list[Kernel]) -> str:
    """One line per kernel, as the tutorials print it: 'block1_conv1 (3, 3, 3, 64)'."""
    width = max((len(k.layer) for k in kernels), default=0)
    lines = []
    for k in kernels:
        extra = "" if k.variable == "kernel" else f"  {k.variable}"
        lines.append(f"{k.layer:<{width}}  {k.shape}{extra}")
    return "\n".join(lines)


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
    from pipeline.patterns import logits_source, preactivation

    model, fc = bundle.model, cfg.filters
    shapes = {n.name: n.output_shape for n in flat_layers(model)}
    if fc.objective == "class":
        if not fc.classes:
            raise PipelineError("filters.objective=class needs classes: add filters.classes=[1,207] "
                                "(indices or ImageNet class names)")
        from pipeline.explain import choose_output, output_names

        index = choose_output(model, cfg.model.output)
        layer, head = logits_source(model, index)
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
    logger.info("filter patterns: %d image(s) over %d layer(s), %s, %d steps%s", total, len(jobs),
                recipe.method, recipe.steps,
                f" (resuming: {len(blocks) - len(todo)} of {len(blocks)} blocks done)" if len(todo) < len(blocks)
                else "")
    with tqdm(total=total // int(fc.seeds), desc="patterns", unit="ch") as bar:
        for number, job, rows in todo:
            bar.set_postfix_str(job.layer)
            result = filter_patterns(model, spec, job.layer, job.targets[rows], objective=fc.objective,
                                     recipe=recipe, repeats=int(fc.seeds), batch=int(fc.batch),
                                     head=job.head, progress=bar)
            with work.write(work.chunk_name(number)) as f:
                _write_block(f, job, rows, result, fc.objective)

    with store.write(PART) as f:
        work.assemble(f)
        root = f.require_group("filters")
        root.attrs.update(objective=fc.objective, method=recipe.method, steps=recipe.steps,
                          size=recipe.size or min(spec.size), lr=recipe.learning_rate, seed=recipe.seed,
                          seeds=int(fc.seeds), transforms=recipe.transforms and recipe.method == "fourier",
                          upscale=recipe.upscale, normalize=spec.normalize)
        _write_kernel_table(root, kernels)
        _write_weights(f, model, weight_layers)
    part = store.parts / PART
    render_filter_sheets(part, run_dir.joinpath(*SHEETS_DIR), bgr=spec.normalize == "caffe")
    if fc.toolbox:
        write_regularized_opt(part, run_dir / TOOLBOX_DIR)


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


# --------------------------------------------------------------------------- drawing (from results.h5 only)


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def min_max(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] with the min and max of the whole array (as the tutorials do)."""
    lo, hi = float(np.min(x)), float(np.max(x))
    return np.zeros_like(x, np.float32) if hi <= lo else ((x - lo) / (hi - lo)).astype(np.float32)


def colour_tiles(kernel: np.ndarray, bgr: bool = False) -> np.ndarray:
    """First-layer kernel (kh, kw, 3, out) -> (out, kh, kw, 3) RGB tiles in [0, 1]."""
    tiles = min_max(kernel).transpose(3, 0, 1, 2)
    return tiles[..., ::-1] if bgr else tiles


def channel_tiles(kernel: np.ndarray) -> np.ndarray:
    """(kh, kw, in, out) -> (out, in, kh, kw) grey tiles in [0, 1]: filters in rows, input
    channels in columns."""
    return min_max(kernel).transpose(3, 2, 0, 1)


def mean_tiles(kernel: np.ndarray, kind: str = "Conv2D") -> np.ndarray:
    """(kh, kw, in, out) -> (filters, kh, kw): each filter's mean over its input channels,
    min-max scaled over the layer. Depthwise kernels (kh, kw, C, m) give C*m filters."""
    kh, kw = kernel.shape[:2]
    if kind in ("DepthwiseConv2D", "SeparableConv2D"):
        means = kernel.reshape(kh, kw, -1)
    else:
        means = kernel.mean(axis=2)
    return min_max(means.transpose(2, 0, 1))


GAP_RGB = (0.80, 0.87, 0.95)  # between tiles: a colour no grey weight can take


def tile_grid(tiles: np.ndarray, cols: int, scale: int, gap: int = 1) -> np.ndarray:
    """(N, h, w) grey or (N, h, w, 3) colour tiles in [0, 1] -> one RGB image, row-major,
    each weight a scale x scale block, tiles separated by `gap` px of GAP_RGB."""
    if tiles.ndim == 3:
        tiles = np.repeat(tiles[..., None], 3, axis=-1)
    tiles = np.repeat(np.repeat(tiles, scale, axis=1), scale, axis=2)
    n, h, w = tiles.shape[:3]
    rows = max(1, math.ceil(n / cols))
    out = np.empty((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), np.float32)
    out[...] = GAP_RGB
    for i in range(n):  # one block copy per tile
        r, c = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tiles[i]
    for i in range(n, rows * cols):  # empty slots of the last row: page white
        r, c = divmod(i, cols)
        out[max(0, r * (h + gap) - gap):, max(0, c * (w + gap) - gap):] = 1.0
    return out


def _figure(image: np.ndarray, title: str, vrange=None, xlabel=None, ylabel=None, xticks=None, yticks=None):
    """A figure of an RGB image in [0, 1] at a whole pixel zoom, with a title, optional axis
    labels and ticks, and (vrange) a grey colour bar of the weight values."""
    import matplotlib.cm
    import matplotlib.colors
    from matplotlib.figure import Figure

    dpi = 100
    h, w = image.shape[:2]
    zoom = max(1, int(700 // max(w, h)))
    iw, ih = w * zoom / dpi, h * zoom / dpi  # inches
    left = 0.35 + (0.45 if ylabel else 0) + (0.2 if yticks else 0)
    right = 0.35 + (1.1 if vrange is not None else 0)
    bottom = 0.25 + (0.45 if xlabel else 0) + (0.1 if xticks else 0)
    fig_w = max(left + iw + right, 4.0)
    title = textwrap.fill(title, width=max(30, int(fig_w * 72 / (10.5 * 0.55))))
    top = 0.35 + 0.2 * (title.count("\n") + 1)
    fig_h = bottom + ih + top
    left = (fig_w - iw - right + left) / 2 if vrange is None else left
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi, facecolor="white")
    ax = fig.add_axes((left / fig_w, bottom / fig_h, iw / fig_w, ih / fig_h))
    ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
    ax.set_xticks(*(xticks or ([], [])))
    ax.set_yticks(*(yticks or ([], [])))
    for spine in ax.spines.values():
        spine.set_visible(False)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.text(0.5, 1 - 0.15 / fig_h, title, ha="center", va="top", fontsize=10.5, linespacing=1.4)
    if vrange is not None:
        cax = fig.add_axes(((left + iw + 0.25) / fig_w, bottom / fig_h, 0.15 / fig_w, ih / fig_h))
        mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(*vrange), cmap="gray")
        fig.colorbar(mappable, cax=cax, label="weight")
    return fig


def _channels_figure(tiles: np.ndarray, names: list[str], title: str, vrange, per_block: int = 16):
    """(out, in, kh, kw) grey tiles: filters in rows, input channels in columns, in blocks of
    `per_block` filters side by side, each block with its own filter numbers."""
    import matplotlib.cm
    import matplotlib.colors
    from matplotlib.figure import Figure

    out, cin, kh, kw = tiles.shape
    blocks = math.ceil(out / per_block)
    rows = min(out, per_block)
    scale = int(np.clip(560 // max(1, rows * (kh + 1)), 2, 24))
    ih, iw = rows * (kh * scale + 1) / 100, cin * (kw * scale + 1) / 100  # inches per block
    left, gap, right, bottom = 0.55, 0.55, 1.2, 0.65
    fig_w = max(left + blocks * iw + (blocks - 1) * gap + right, 4.0)
    title = textwrap.fill(title, width=max(30, int(fig_w * 72 / (10.5 * 0.55))))
    top = 0.35 + 0.2 * (title.count("\n") + 1)
    fig_h = bottom + ih + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=100, facecolor="white")
    for b in range(blocks):
        part = tiles[b * per_block:(b + 1) * per_block]
        image = tile_grid(part.reshape(-1, kh, kw), cin, scale)
        full = np.ones((rows * (kh * scale + 1) - 1, image.shape[1], 3), np.float32)
        full[:image.shape[0]] = image
        x0 = left + b * (iw + gap)
        ax = fig.add_axes((x0 / fig_w, bottom / fig_h, iw / fig_w, ih / fig_h))
        ax.imshow(full, interpolation="nearest")
        step = kw * scale + 1
        ax.set_xticks([step * i + kw * scale / 2 - 0.5 for i in range(cin)], names)
        marks = list(range(0, len(part), 4 if rows > 8 else 1))
        ax.set_yticks([(kh * scale + 1) * r + kh * scale / 2 - 0.5 for r in marks],
                      [str(b * per_block + r) for r in marks])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if b == 0:
            ax.set_ylabel("filter")
        ax.set_xlabel("input channel")
    fig.text(0.5, 1 - 0.15 / fig_h, title, ha="center", va="top", fontsize=10.5, linespacing=1.4)
    cax = fig.add_axes(((left + blocks * iw + (blocks - 1) * gap + 0.3) / fig_w, bottom / fig_h, 0.15 / fig_w,
                        ih / fig_h))
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(*vrange), cmap="gray"), cax=cax,
                 label="weight")
    return fig


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return path


def _scale_for(h: int, cols: int, target: int = 900) -> int:
    return int(np.clip(target // max(1, cols * (h + 1)), 1, 16))


def weight_sheets(g: h5py.Group, out_dir: Path, first: bool, bgr: bool) -> list[Path]:
    kernel = g["weights"][()]
    name, kind = _as_str(g.attrs.get("name", "")), _as_str(g.attrs.get("kind", "Conv2D"))
    stored = stored_name(name)
    kh, kw, cin, cout = kernel.shape
    lo, hi = float(kernel.min()), float(kernel.max())
    written = []
    if first and cin == 3 and kind == "Conv2D":
        tiles = colour_tiles(kernel, bgr)
        cols = math.ceil(math.sqrt(cout))
        image = tile_grid(tiles, cols, _scale_for(kh, cols))
        title = (f"{name}: {cout} filters {kh}\u00d7{kw}\u00d7{cin} as colour "
                 f"(min-max over the layer: black {lo:.3g}, white {hi:.3g})")
        written.append(_save(_figure(image, title), out_dir / f"weights_{stored}_colour.png"))
    if first and kind == "Conv2D":
        names = ["R", "G", "B"] if cin == 3 else [str(i) for i in range(cin)]
        if bgr and cin == 3:
            names = ["B", "G", "R"]
        title = f"{name}: every filter (rows) on every input channel (columns), min-max over the layer"
        written.append(_save(_channels_figure(channel_tiles(kernel), names, title, (lo, hi)),
                             out_dir / f"weights_{stored}_channels.png"))
    if kh * kw > 1:
        tiles = mean_tiles(kernel, kind)
        n = tiles.shape[0]
        cols = math.ceil(math.sqrt(n))
        image = tile_grid(tiles, cols, _scale_for(kh, cols))
        what = "each depthwise filter" if kind in ("DepthwiseConv2D", "SeparableConv2D") else \
            "mean over input channels of each filter"
        means = kernel.reshape(kh, kw, -1) if kind in ("DepthwiseConv2D", "SeparableConv2D") else kernel.mean(axis=2)
        title = f"{name} {tuple(kernel.shape)}: {what}, {n} filters, row-major (min-max over the layer)"
        written.append(_save(_figure(image, title, vrange=(float(means.min()), float(means.max()))),
                             out_dir / f"weights_{stored}.png"))
    return written


def pattern_sheet(g: h5py.Group, attrs) -> np.ndarray:
    """Every computed pattern of one layer group as a labelled grid, (H, W, 3) uint8."""
    from pipeline.montage import resize_patches
    from pipeline.stages.report import Label, draw_labels, grid

    computed = g["computed"][()]
    rows = np.flatnonzero(computed)
    channels = g["channels"][()][rows]
    values = g["value"][()][rows]
    n = len(rows)
    cols = max(1, math.ceil(math.sqrt(n)))
    size = g["patterns"].shape[1]
    tile = int(np.clip(5000 // cols - 12, 48, 224 if cols <= 4 else 160 if cols <= 8 else 112))
    tile = min(size, tile) if size >= tile else size * max(1, round(tile / size))  # small: whole-pixel zoom
    tiles = np.empty((n, tile, tile, 3), np.uint8)
    for start in range(0, n, 256):
        part = rows[start:start + 256]
        tiles[start:start + len(part)] = resize_patches(g["patterns"][part[0]:part[-1] + 1][part - part[0]],
                                                        (tile, tile))
    label_h = max(14, tile // 5)
    gap = max(6, tile // 10)
    grid_img, origins = grid(tiles, cols, gap, label_h + gap // 2)
    title_h, margin = 90, 24
    width = max(800, grid_img.shape[1] + 2 * margin)
    height = title_h + grid_img.shape[0] + label_h + 2 * margin  # the last row's labels too
    canvas = np.full((height, width, 3), 255, np.uint8)
    left = (width - grid_img.shape[1]) // 2
    top = margin + title_h
    canvas[top:top + grid_img.shape[0], left:left + grid_img.shape[1]] = grid_img
    name = _as_str(g.attrs.get("name", ""))
    objective = _as_str(g.attrs.get("objective", "channel"))
    labels = json.loads(_as_str(g.attrs["class_names"])) if "class_names" in g.attrs else None
    what = {"channel": "maximise the channel's mean activation", "neg": "minimise the channel's mean activation",
            "class": "maximise the class logit"}.get(objective, objective)
    details = (f"{_as_str(attrs.get('method', ''))}, {int(attrs.get('steps', 0))} steps at "
               f"{int(g.attrs.get('optimised_size', attrs.get('size', 0)))} px, stored at {size} px; "
               f"label: {'class' if labels else 'channel'} \u00b7 objective value reached")
    head = f"{name}: {what}"
    text = [Label(width / 2, margin + 28, head, min(26, 0.9 * width / (0.62 * len(head))), weight="bold",
                  color="black"),
            Label(width / 2, margin + 66, details, min(15, 0.9 * width / (0.55 * len(details))), color="0.25")]
    tags = [f"{labels[rows[i]] if labels else channels[i]} \u00b7 {values[i]:.3g}" for i in range(n)]
    longest = max((len(t) for t in tags), default=1)
    label_px = min(0.7 * label_h, (tile + 0.8 * gap) / (0.6 * longest))  # one size for every label
    for tag, (y, x) in zip(tags, origins):
        text.append(Label(left + x + tile / 2, top + y + tile + label_h / 2, tag, label_px))
    return draw_labels(canvas, text)


def render_filter_sheets(results_path: Path, out_dir: Path, bgr: bool | None = None) -> list[Path]:
    """Weight sheets, the kernel table and one pattern sheet per layer, from results.h5
    (or the stage's part; `bgr`: caffe-ordered first-layer kernels, default from the attrs)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(results_path, "r") as f:
        if "filters" not in f:
            return []
        root = f["filters"]
        if KERNEL_TABLE in root:
            t = root[KERNEL_TABLE]
            kernels = [Kernel(l, k, v, tuple(int(d) for d in s if d))
                       for l, k, v, s in zip(read_strings(t["layer"]), read_strings(t["kind"]),
                                             read_strings(t["variable"]), t["shape"][()])]
            path = out_dir / "kernels.txt"
            path.write_text(kernel_table_text(kernels) + "\n")
            written.append(path)
            first = kernels[0].layer if kernels else None
        else:
            first = None
        if bgr is None:
            bgr = json.loads(_as_str(f.attrs.get("preprocessing", "{}"))).get("normalize") == "caffe"
        groups = [(k, g) for k, g in root.items() if isinstance(g, h5py.Group) and k != KERNEL_TABLE]
        for key, g in tqdm(groups, desc="filter sheets", unit="layer"):
            if "weights" in g:
                written += weight_sheets(g, out_dir, _as_str(g.attrs.get("name", "")) == first, bgr)
            if "patterns" in g and g["computed"][()].any():
                path = out_dir / f"patterns_{key}.png"
                Image.fromarray(pattern_sheet(g, root.attrs)).save(path, compress_level=1)
                written.append(path)
    logger.info("filter sheets: %d file(s) in %s", len(written), out_dir)
    return written
