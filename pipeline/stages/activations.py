"""`activations` stage: the feature maps of chosen layers for a few chosen images.

A thin wrapper over `pipeline.explain.ActivationExtractor`. Which images
(`activations.images`): the first N, a list of image ids, or the top images of chosen
channels in the scan's results ({layer: NAME, channels: [...], k: 1}).

results.h5:

    activations/image            (n,) int64 image ids, in the order chosen (unreadable ones left out)
    activations/<layer>          (n, H, W, C) float16, one chunk per image, gzip
                                 attrs: name, depth, shape (H, W, C)
    activations/blank_fraction   (n, L) float32 share of channels that are constant over
                                 the map (all zero after a ReLU); attrs: layers (JSON)

Sheets in run_dir/activations/:

    <layer>_grid_<id>.png    the first `activations.grid` channels as a square grid
    <layer>_<id>.png         every channel, `activations.per_row` tiles a row, each channel
                             standardised for display; blank channels flat light grey
    blank_fraction.png       the share of blank channels against depth
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import ImageTable, list_images
from pipeline.errors import PipelineError
from pipeline.store import Store, stored_name

logger = logging.getLogger(__name__)

KEYS = ("model", "dataset", "layers", "activations")
PART = "activations.h5"
FLOAT16_MAX = float(np.finfo(np.float16).max)
TILE_PX = 32  # small maps are enlarged by whole factors to about this size


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.explain import ActivationExtractor, blank_channels
    from pipeline.graph import flat_layers
    from pipeline.chunks import BOOKKEEPING, ChunkedStream
    from pipeline.layers import chosen_layers
    from pipeline.models.sources import load_model
    from pipeline.preprocess import normalize

    a = cfg.activations
    bundle = load_model(cfg.model, cfg.cache_dir)
    table = list_images(cfg.dataset)
    ids = choose_images(a.images, table, Store(run_dir), "activations")
    key_of = {name: key for key, name in chosen_layers(bundle.model, a.layers if a.layers is not None else cfg.layers)}
    names = list(key_of)
    shapes = {n.name: n.output_shape for n in flat_layers(bundle.model)}
    flat = [n for n in names if len(shapes[n]) != 3]
    if flat:
        logger.warning("activations: %s have no spatial map (shape %s); left out", ", ".join(flat),
                       ", ".join(str(shapes[n]) for n in flat))
    names = [n for n in names if len(shapes[n]) == 3]
    if not names:
        raise PipelineError("activations: no chosen layer has an (H, W, C) output: set activations.layers=[...]")
    if int(a.grid) < 1 or int(a.per_row) < 1:
        raise PipelineError("activations.grid and activations.per_row must be at least 1")
    spec = bundle.preprocessing
    extractor = ActivationExtractor(bundle.model, names, spec)
    store = Store(run_dir)
    store.ensure_run(cfg, bundle, table)
    work = store.work("activations", stage_print, cfg.overwrite, batch_size=int(cfg.batch_size))
    stream = ChunkedStream(work, table, spec, cfg.batch_size, ids, cfg.checkpoint)
    logger.info("activations of %d layer(s) for %d image(s)", len(names), len(ids))
    clipped = set()
    with tqdm(total=len(ids), initial=len(ids) - stream.remaining, desc="activations", unit="img") as bar:
        for batch_ids, pixels in stream:
            maps = extractor(normalize(pixels, spec.normalize), batch_size=len(batch_ids))
            rows = {"activations/image": batch_ids.astype(np.int64),
                    "activations/blank_fraction": np.stack([blank_channels(maps[n]).mean(axis=1) for n in names],
                                                           axis=1).astype(np.float32)}
            for n in names:
                if np.abs(maps[n]).max(initial=0.0) > FLOAT16_MAX:
                    clipped.add(n)
                rows[f"activations/{key_of[n]}"] = np.clip(maps[n], -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
            stream.add(rows)
            bar.update(len(batch_ids))
        bar.update(len(ids) - bar.n)
    for n in sorted(clipped):
        logger.warning("activations of %s exceed float16's range; stored clipped", n)
    store.write_images(len(table), stream.errors, replace=False)
    with store.write(PART) as f:
        work.assemble(f, skip=BOOKKEEPING)
        g = f.require_group("activations")
        if "image" not in g:  # every chosen image unreadable: empty tables, the sheets say so
            g["image"] = np.zeros(0, np.int64)
            g["blank_fraction"] = np.zeros((0, len(names)), np.float32)
        g["blank_fraction"].attrs.update(layers=json.dumps(names), keys=json.dumps([key_of[n] for n in names]))
        for depth, n in enumerate(names):
            if key_of[n] in g:
                g[key_of[n]].attrs.update(name=n, depth=depth, shape=np.asarray(shapes[n], np.int64))
    if stream.errors:
        logger.warning("activations: %d chosen image(s) unreadable, left out", len(stream.errors))
    draw_sheets(store.parts / PART, run_dir / "activations", int(a.grid), int(a.per_row))


def DEPENDS(cfg) -> tuple[str, ...]:  # noqa: N802 - the runner reads it like the constant it usually is
    """Images chosen from the scan's top-k make the maps depend on the scan."""
    return ("scan",) if images_from_topk(cfg.activations.images) else ()


def images_from_topk(value) -> bool:
    """Whether an `images` setting names the top images of channels in the scan."""
    from omegaconf import DictConfig

    return isinstance(value, (dict, DictConfig))


def choose_images(value, table: ImageTable, store, section: str) -> np.ndarray:
    """Image ids from a stage's `images` setting: N (the first N), a list of ids, or
    {layer, channels, k} (the k top images of each channel in the scan's results)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    n = len(table)
    if images_from_topk(value):
        spec = OmegaConf.to_container(value) if isinstance(value, DictConfig) else dict(value)
        unknown = set(spec) - {"layer", "channels", "k"}
        if unknown or "layer" not in spec:
            raise PipelineError(f"{section}.images={spec}: use {{layer: NAME, channels: [..], k: 1}}")
        return _top_images(store, str(spec["layer"]), spec.get("channels"), int(spec.get("k", 1)), section)
    if isinstance(value, (ListConfig, list, tuple)):
        ids = np.asarray(list(value), dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n)]
        if len(bad):
            raise PipelineError(f"{section}.images has id {int(bad[0])}: the dataset has ids 0 to {n - 1}")
        return ids
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return np.arange(min(value, n), dtype=np.int64)
    raise PipelineError(f"{section}.images={value}: use N (the first N images), a list of ids, "
                        "or {layer: NAME, channels: [..], k: 1}")


def _top_images(store, layer: str, channels, k: int, section: str) -> np.ndarray:
    if "scan" not in store.stages_done():
        raise PipelineError(f"{section}.images names top images of {layer} but no scan results exist: "
                            f"run the scan first (stages=[scan,{section}])")
    with store.open() as f:
        group = f.get(f"layers/{stored_name(layer)}")
        if group is None or "topk" not in group:
            have = ", ".join(str(f[f"layers/{key}"].attrs.get("name", key)) for key in f.get("layers", {}))
            raise PipelineError(f"{section}.images: layer {layer} was not scanned (scanned: {have or 'none'}); "
                                f"add it to layers=[...] and run the scan")
        image = group["topk/image"][()]
    c = image.shape[0]
    chosen = list(range(c)) if channels is None else [int(i) for i in channels]
    if any(not 0 <= i < c for i in chosen):
        raise PipelineError(f"{section}.images: layer {layer} has channels 0 to {c - 1}")
    ids = image[chosen, :max(1, k)].reshape(-1)
    ids = ids[ids >= 0]
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)].astype(np.int64)


# ----------------------------------------------------------------------------
# sheets


def draw_sheets(part: Path, out_dir: Path, grid: int, per_row: int) -> list[Path]:
    import h5py

    from pipeline import draw
    from pipeline.explain import blank_channels

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(part, "r") as f:
        g = f["activations"]
        ids = g["image"][()]
        names = json.loads(g["blank_fraction"].attrs["layers"])
        keys = json.loads(g["blank_fraction"].attrs["keys"])
        side = max(1, int(math.isqrt(grid)))
        jobs = [(i, n, key) for i in range(len(ids)) for n, key in zip(names, keys)]
        for row, name, key in tqdm(jobs, desc="activation sheets", unit="sheet"):
            maps = g[key][row].astype(np.float32)  # (H, W, C)
            h, w, c = maps.shape
            blank = blank_channels(maps[None])[0]
            tiles = draw.channel_tiles(maps, blank, max(TILE_PX, h))
            first = min(c, side * side)
            image = draw.tile(tiles[:first], side)
            title = f"{name}: channels 0-{first - 1} of {c}, image #{ids[row]}"
            written.append(draw.save(draw.image_figure(image, title, _legend(blank[:first])),
                                     out_dir / f"{key}_grid_{ids[row]}.png"))
            image = draw.tile(tiles, per_row)
            title = f"{name}: all {c} channels ({h}x{w}), image #{ids[row]}"
            written.append(draw.save(draw.image_figure(image, title, _legend(blank)),
                                     out_dir / f"{key}_{ids[row]}.png"))
        fractions = g["blank_fraction"][()]
    written.append(draw.save(blank_fraction_figure(names, fractions, ids), out_dir / "blank_fraction.png"))
    logger.info("activations: %d sheet(s) in %s", len(written), out_dir)
    return written


def _legend(blank: np.ndarray) -> str:
    return (f"row-major; each channel standardised (mean/std, clipped), viridis; "
            f"flat grey: blank channel ({int(blank.sum())} of {len(blank)})")


def blank_fraction_figure(names: list[str], fractions: np.ndarray, ids: np.ndarray):
    """Share of blank channels per layer, layers in network order; one faint line per
    image and their mean."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.5, 0.3 * len(names) + 2), 3.8), dpi=150, layout="constrained")
    ax = fig.subplots()
    depth = np.arange(len(names))
    for i in range(len(fractions)):
        ax.plot(depth, fractions[i], color="0.7", lw=0.8)
    if len(fractions):
        ax.plot(depth, fractions.mean(axis=0), color="C0", lw=2, marker="o", ms=4,
                label=f"mean over {len(fractions)} image(s)")
        ax.legend(fontsize=7, frameon=False)
    ax.set_xticks(depth)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("blank channels (share)", fontsize=8)
    ax.set_xlabel("layer (input to output)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_title("sparsity of activations by depth", fontsize=9)
    return fig
