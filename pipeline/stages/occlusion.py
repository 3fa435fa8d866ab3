"""`occlusion` stage: Zeiler & Fergus occlusion sensitivity for a few chosen images.

A thin wrapper over `pipeline.explain.Occluder`: a grey square (`occlusion.fill`, a grey
level before normalisation) of `occlusion.size` pixels slides over the model input with
`occlusion.stride`; for every position the stage records the probability of the target
class, the most probable class, and the total activation of the feature map of
`occlusion.layer` that responds most strongly to the unoccluded image.

results.h5:

    occlusion/          attrs: size, stride, fill, layer, target
      image (n,) int64; class (n,) int64 target; channel (n,) int64 followed feature map
      probability (n, gh, gw) float32; top_class (n, gh, gw) int64; activation (n, gh, gw) float32
      base_probability (n,), base_activation (n,) float32: without the square
      rows (gh,), cols (gw,) int64: the square's top-left corner of each grid cell

Sheets: run_dir/occlusion/image_<id>.png, the photo beside the maps.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import BatchStream, list_images
from pipeline.errors import PipelineError, StageSkipped
from pipeline.store import Store

logger = logging.getLogger(__name__)

KEYS = ("model", "dataset", "layers", "occlusion")
PART = "occlusion.h5"


def DEPENDS(cfg) -> tuple[str, ...]:  # noqa: N802 - the runner reads it like the constant it usually is
    """Images chosen from the scan's top-k make the maps depend on the scan."""
    from pipeline.stages.activations import images_from_topk

    return ("scan",) if images_from_topk(cfg.occlusion.images) else ()


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.chunks import BOOKKEEPING, ChunkedStream
    from pipeline.explain import NoClassScores, Occluder, occlusion_grid
    from pipeline.models.sources import load_model
    from pipeline.preprocess import normalize
    from pipeline.stages.activations import choose_images
    from pipeline.stages.cam import class_names, target_codes

    o = cfg.occlusion
    bundle = load_model(cfg.model, cfg.cache_dir)
    size, stride = square_and_step(o, bundle.preprocessing.size)
    table = list_images(cfg.dataset)
    store = Store(run_dir)
    ids = choose_images(o.images, table, store, "occlusion")
    spec = bundle.preprocessing
    try:
        occluder = Occluder(bundle.model, o.layer, spec, output=cfg.model.output)
    except NoClassScores as err:
        raise StageSkipped(str(err)) from None
    names = class_names(bundle, table, occluder.num_classes)
    codes_for = target_codes(o, table, names, len(names))
    store.ensure_run(cfg, bundle, table)
    work = store.work("occlusion", stage_print, cfg.overwrite, batch_size=int(cfg.batch_size))
    stream = ChunkedStream(work, table, spec, cfg.batch_size, ids, cfg.checkpoint)
    logger.info("occlusion: %d image(s), square %d px every %d px, feature maps of %s",
                len(ids), size, stride, occluder.layer)
    with tqdm(total=len(ids), initial=len(ids) - stream.remaining, desc="occlusion", unit="img") as bar:
        for batch_ids, pixels in stream:
            r = occluder.compute(normalize(pixels, spec.normalize), codes_for(batch_ids)[:, 0], size, stride,
                                 int(o.fill), int(o.batch_size))
            stream.add({"occlusion/image": batch_ids.astype(np.int64), "occlusion/class": r.classes.astype(np.int64),
                        "occlusion/channel": r.channel.astype(np.int64),
                        "occlusion/top_class": r.top_class.astype(np.int64),
                        **{f"occlusion/{key}": getattr(r, key).astype(np.float32) for key in
                           ("probability", "activation", "base_probability", "base_activation")}})
            bar.update(len(batch_ids))
        bar.update(len(ids) - bar.n)
    store.write_images(len(table), stream.errors, replace=False)
    with store.write(PART) as f:
        work.assemble(f, skip=BOOKKEEPING)
        if "occlusion" not in f:
            raise PipelineError("occlusion: none of the chosen images could be read: choose others with "
                                "occlusion.images")
        g = f["occlusion"]
        g["rows"] = occlusion_grid(spec.height, size, stride)
        g["cols"] = occlusion_grid(spec.width, size, stride)
        g.attrs.update(size=size, stride=stride, fill=int(o.fill), layer=occluder.layer,
                       target=str(o.target))
    draw_sheets(store.parts / PART, run_dir / "occlusion", table, spec, names, cfg.batch_size)


def square_and_step(o, input_size: tuple[int, int]) -> tuple[int, int]:
    """occlusion.size and .stride, defaults scaled to the input; a square that covers the
    whole input at every position (flat maps) is refused."""
    shorter = min(input_size)
    size = int(o.size) if o.size is not None else max(1, round(shorter / 7))
    if size >= shorter:
        raise PipelineError(f"occlusion.size={size} covers the whole {input_size[0]}x{input_size[1]} input at "
                            f"every position: use a size below {shorter} (default: a seventh of the shorter side)")
    stride = int(o.stride) if o.stride is not None else max(1, size // 2)
    return size, stride


def draw_sheets(part: Path, out_dir: Path, table, spec, names: list[str], batch_size: int) -> list[Path]:
    """Per image: the photo (as the model saw it) with the square's size marked, the target
    probability map and the followed feature map's activation map, on the photo's axes."""
    import h5py
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from pipeline import draw

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(part, "r") as f:
        g = f["occlusion"]
        pixels_of = {int(i): p for ids, batch in BatchStream(table, spec, batch_size, ids=g["image"][()])
                     for i, p in zip(ids, batch.numpy())}
        size, stride, layer = int(g.attrs["size"]), int(g.attrs["stride"]), str(g.attrs["layer"])
        rows, cols = g["rows"][()], g["cols"][()]
        for i, image_id in enumerate(tqdm(g["image"][()], desc="occlusion sheets", unit="sheet")):
            if int(image_id) not in pixels_of:
                continue  # unreadable now, though it was read for the maps
            photo = draw.to_rgb(pixels_of[int(image_id)])
            side_y, side_x = photo.shape[:2]
            cls, channel = int(g["class"][i]), int(g["channel"][i])
            # each cell drawn around the square's centre, halfway to its neighbours
            y_edges, x_edges = _edges(rows + size / 2, side_y), _edges(cols + size / 2, side_x)
            fig = Figure(figsize=(9.0, 3.3), dpi=draw.DPI, layout="constrained")
            axes = fig.subplots(1, 3)
            axes[0].imshow(photo)
            axes[0].add_patch(Rectangle((2, 2), size, size, facecolor=(0.5, 0.5, 0.5), edgecolor="white", lw=0.8))
            axes[0].set_title(f"#{image_id}: {names[cls][:30]} (p={g['base_probability'][i]:.2f})", fontsize=8)
            panels = (
                (g["probability"][i], f"p({names[cls][:24]}) with the square there", "magma", (0, 1)),
                (g["activation"][i], f"{layer} channel {channel}: total activation", "viridis", None),
            )
            for ax, (values, title, cmap, lim) in zip(axes[1:], panels):
                ax.imshow(photo, alpha=0.25)
                im = ax.pcolormesh(x_edges, y_edges, values, cmap=cmap, alpha=0.9,
                                   vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
                ax.set_xlim(0, side_x)
                ax.set_ylim(side_y, 0)
                ax.set_title(title, fontsize=8)
                fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
            for ax in axes:
                ax.set_xticks([])
                ax.set_yticks([])
            fig.suptitle(f"occlusion sensitivity: grey square {size} px, stride {stride} px", fontsize=9)
            written.append(draw.save(fig, out_dir / f"image_{int(image_id)}.png"))
    logger.info("occlusion: %d sheet(s) in %s", len(written), out_dir)
    return written


def _edges(centres: np.ndarray, side: int) -> np.ndarray:
    """Cell edges around grid centres: halfway between neighbours, as far out at the ends."""
    centres = np.asarray(centres, np.float64)
    if len(centres) == 1:
        return np.array([0.0, float(side)])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])
