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

import numpy as np
from pipeline.errors import PipelineError
from pipeline.per_image import batch_resume, per_image_part, scan_for_topk
from pipeline.selection import choose_images, explainer_for
from pipeline.stage_spec import Stage

logger = logging.getLogger(__name__)

# images chosen from the scan's top-k make the maps depend on the scan
STAGE = Stage(keys=("model", "dataset", "occlusion"), part="occlusion.h5", needs=scan_for_topk("occlusion.images"),
              resume=batch_resume)


def run(ctx) -> None:
    from pipeline.explain import Occluder, occlusion_grid
    from pipeline.preprocess import normalize

    cfg = ctx.cfg
    o = cfg.occlusion
    bundle = ctx.bundle
    size, stride = square_and_step(o, bundle.preprocessing.size)
    table = ctx.images
    ids = choose_images(o.images, table, ctx.store, "occlusion")
    spec = bundle.preprocessing
    occluder, _, codes_for = explainer_for(
        lambda: Occluder(bundle.model, bundle.layer(o.layer), spec, output=cfg.model.output), "occlusion", o, bundle,
        table)
    logger.info("occlusion: %d image(s), square %d px every %d px, feature maps of %s",
                len(ids), size, stride, occluder.layer)

    def compute(batch_ids, pixels):
        r = occluder.compute(normalize(pixels, spec.normalize), codes_for(batch_ids)[:, 0], size, stride,
                             int(o.fill), int(o.batch_size))
        return {"occlusion/image": batch_ids.astype(np.int64), "occlusion/class": r.classes.astype(np.int64),
                "occlusion/channel": r.channel.astype(np.int64), "occlusion/top_class": r.top_class.astype(np.int64),
                **{f"occlusion/{key}": getattr(r, key).astype(np.float32) for key in
                   ("probability", "activation", "base_probability", "base_activation")}}

    with per_image_part(ctx, ids, compute, fix="occlusion.images", draw=True) as (f, _):
        g = f["occlusion"]
        g["rows"] = occlusion_grid(spec.height, size, stride)
        g["cols"] = occlusion_grid(spec.width, size, stride)
        g.attrs.update(size=size, stride=stride, fill=int(o.fill), layer=occluder.layer,
                       target=str(o.target), num_classes=int(occluder.num_classes))


def square_and_step(o, input_size: tuple[int, int]) -> tuple[int, int]:
    """occlusion.size and .stride, defaults scaled to the input; a square that covers the
    whole input at every position (flat maps) is refused. The default step is the square
    itself: a 7x7 grid for any input (the Grad-CAM maps' resolution on MobileNetV2), 49
    forward passes an image; half the square gives 13x13 at 3.4 times the cost."""
    shorter = min(input_size)
    size = int(o.size) if o.size is not None else max(1, round(shorter / 7))
    if size >= shorter:
        raise PipelineError(f"occlusion.size={size} covers the whole {input_size[0]}x{input_size[1]} input at "
                            f"every position: use a size below {shorter} (default: a seventh of the shorter side)")
    stride = int(o.stride) if o.stride is not None else size
    return size, stride


