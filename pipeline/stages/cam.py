"""`cam` stage: Grad-CAM, Grad-CAM++, Score-CAM over every image; guided Grad-CAM for the drawn ones.

A thin wrapper over `pipeline.explain.CamExplainer`: the dataset is streamed in batches
of `batch_size`, the maps are committed in chunks as they come (memory flat in dataset
size; a killed run resumes after the last chunk, pipeline.chunks), and sheets are drawn
at the end: overlays on the original photos and the mean map per explained class.

What every image gets is small: the maps at the target layer's resolution (7x7 floats
for MobileNetV2), the explained classes and their logits, the model's top-5. Maps at the
input resolution (guided Grad-CAM, (S, S, 3): 3,072 times the values of a 7x7 map, and
a backward pass to the input each) are computed and stored only for the images
`cam.draw` chooses: the first N, a list of ids, or the top images of chosen channels.

results.h5:

    cam/                attrs: layer, logits_layer, methods (JSON), target, input_size, map_shape
      image  (n,) int64 image id of each row; rank (n,) int32 target rank within the image
      <method>/map      (n, h, w) float32 raw map at the target layer's resolution
      <method>/class    (n,) int64 explained class; <method>/score (n,) float32 its logit
      <method>/max      (n,) float32 the map's maximum (0: the map is all zero; counted in the
                        log, marked on the sheets)
      <method>/class_mean/{class, count, map}  per explained class: the mean of the maps,
                        each divided by its own maximum first
      guided_gradcam/   attrs rows='drawn': rows only for the drawn images (cam.draw)
        image, rank     (m,) the image id and target rank of each row
        map             (m, S, S, C) float16: the raw map divided by `scale`, in [-1, 1]
        scale           (m,) float32 the map's largest absolute value (raw = map * scale)
        class, score, max  (m,) as above
"""

from __future__ import annotations

import json
import logging

import numpy as np

from pipeline.errors import PipelineError
from pipeline.per_image import batch_resume, per_image_part, scan_for_topk
from pipeline.render.draw import CAM_TITLES
from pipeline.selection import drawn_images, explainer_for
from pipeline.stage_spec import Stage

logger = logging.getLogger(__name__)

# images drawn from the scan's top-k make the stored input-resolution maps depend on the scan
STAGE = Stage(keys=("model", "dataset", "cam"), part="cam.h5", needs=scan_for_topk("cam.draw"), resume=batch_resume)


def run(ctx) -> None:
    from pipeline.explain import INPUT_RESOLUTION, METHODS, CamExplainer
    from pipeline.preprocess import normalize

    cfg, store = ctx.cfg, ctx.store
    c = cfg.cam
    methods = [str(m) for m in c.methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"cam.methods has {', '.join(unknown) or 'nothing'}: choose from {', '.join(METHODS)}")
    bundle = ctx.bundle
    table = ctx.images
    drawn = drawn_images(c.draw, table, store, "cam")
    spec = bundle.preprocessing
    explainer, _, codes_for = explainer_for(
        lambda: CamExplainer(bundle.model, bundle.layer(c.layer), spec, output=cfg.model.output), "cam", c, bundle,
        table)
    small = [m for m in methods if m not in INPUT_RESOLUTION]
    large = [m for m in methods if m in INPUT_RESOLUTION]
    logger.info("cam: %s on layer %s (logits from %s) over %d images, target %s%s", ", ".join(small or large),
                explainer.layer, explainer.logits_layer, len(table), c.target,
                f"; {', '.join(large)} for the {len(drawn)} drawn image(s) (cam.draw)" if small and large else "")
    wanted = np.zeros(len(table), bool)
    wanted[drawn] = True

    def compute(ids, pixels):
        x = normalize(pixels, spec.normalize)
        # the classes and logits come with the layer-resolution maps; Grad-CAM always (guided
        # Grad-CAM of the drawn images reuses it; alone, it gives every image's class)
        out, logits = explainer.compute_with_logits(
            x, codes_for(ids), list(dict.fromkeys(["gradcam", *small])), batch_size=len(ids),
            scorecam_batch=c.scorecam_batch, scorecam_channels=c.scorecam_channels)
        rows = top_predictions(ids, logits)
        classes = out["gradcam"].classes
        k = classes.shape[1]
        rows["cam/image"] = np.repeat(ids.astype(np.int64), k)
        rows["cam/rank"] = np.tile(np.arange(k, dtype=np.int32), len(ids))
        for m in small:
            r = out[m]
            rows[f"cam/{m}/map"] = r.maps.reshape((-1,) + r.maps.shape[2:])
            rows[f"cam/{m}/class"] = r.classes.reshape(-1)
            rows[f"cam/{m}/score"] = r.scores.reshape(-1)
            rows[f"cam/{m}/max"] = r.maxima.reshape(-1).astype(np.float32)
            if c.faithfulness_steps and m in FAITHFULNESS_METHODS:
                rows.update(_faithfulness(explainer, x, r, m, int(c.faithfulness_steps)))
        chosen = np.flatnonzero(wanted[ids])
        if large and len(chosen):
            rows.update(input_resolution_rows(explainer, x, ids, chosen, out["gradcam"]))
        return rows

    with per_image_part(ctx, np.arange(len(table)), compute, fix="dataset.path", which="images",
                        draw=True) as (f, errors):
        g = f["cam"]
        g.attrs.update(layer=explainer.layer, logits_layer=explainer.logits_layer, methods=json.dumps(methods),
                       target=str(c.target), input_size=np.asarray(spec.size, np.int64),
                       map_shape=np.asarray(explainer.map_shape[:2], np.int64),
                       # what the sheets need besides the maps (render.maps draws them from here)
                       num_classes=int(explainer.num_classes), alpha=float(c.alpha),
                       drawn=np.asarray(drawn, np.int64))
        for m in methods:
            if m in large and m not in g:  # no drawn image was readable: empty tables
                _empty_input_resolution(g.create_group(m), (*spec.size, spec.channels))
            g[m].attrs.update(layer=explainer.layer, method=m)
            if m in large:
                g[m].attrs["rows"] = "drawn"
            if m == "scorecam":  # 0: every channel (exact); N: the N of highest variance per image
                g[m].attrs["channels"] = int(c.scorecam_channels or 0)
            if "deletion" in g[m]:
                g[m].attrs["faithfulness_steps"] = int(c.faithfulness_steps)
            if m in small:
                _write_class_means(g[m])
        zero = {m: (int((g[m]["max"][()] <= 0).sum()), len(g[m]["max"])) for m in methods}
    logger.info("cam: %d images explained, %d unreadable", len(table) - len(errors), len(errors))
    _log_zero_maps(zero)


def input_resolution_rows(explainer, x, ids: np.ndarray, chosen: np.ndarray, gradcam) -> dict[str, np.ndarray]:
    """cam/guided_gradcam/... rows of the images `chosen` (positions in the batch), from the
    batch's Grad-CAM result (maps (B, K, h, w), classes, scores): only the guided backward
    pass is computed here."""
    import tensorflow as tf

    k = gradcam.classes.shape[1]
    maps = explainer.guided_gradcam(tf.gather(x, chosen), gradcam.classes[chosen], gradcam.maps[chosen])
    maps = maps.reshape((-1,) + maps.shape[2:])  # (m * K, S, S, C)
    rows = {}
    rows["cam/guided_gradcam/map"], rows["cam/guided_gradcam/scale"] = scaled_float16(maps)
    rows["cam/guided_gradcam/image"] = np.repeat(ids[chosen].astype(np.int64), k)
    rows["cam/guided_gradcam/rank"] = np.tile(np.arange(k, dtype=np.int32), len(chosen))
    rows["cam/guided_gradcam/class"] = gradcam.classes[chosen].reshape(-1)
    rows["cam/guided_gradcam/score"] = gradcam.scores[chosen].reshape(-1)
    rows["cam/guided_gradcam/max"] = maps.reshape(len(maps), -1).max(axis=1).astype(np.float32)
    return rows


def scaled_float16(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps / scale as float16, scale (n,) float32), scale = each map's largest absolute
    value: float16 keeps 11 bits of every map whatever its magnitude (raw gradients of 1e-6
    would fall below float16's normal range), in half of float32's bytes."""
    maps = np.asarray(maps, np.float32)
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1, initial=0.0).astype(np.float32)
    per_map = scale.reshape((-1,) + (1,) * (maps.ndim - 1))
    unit = np.divide(maps, per_map, out=np.zeros_like(maps), where=per_map > 0)
    return unit.astype(np.float16), scale


def _empty_input_resolution(g, shape: tuple[int, ...]) -> None:
    for key, dtype in (("image", np.int64), ("rank", np.int32), ("scale", np.float32), ("class", np.int64),
                       ("score", np.float32), ("max", np.float32)):
        g[key] = np.zeros(0, dtype)
    g["map"] = np.zeros((0,) + shape, np.float16)


def _log_zero_maps(zero: dict[str, tuple[int, int]]) -> None:
    """One line per method with all-zero maps: the sheets mark each, the log gives the count."""
    for m, (count, rows) in zero.items():
        if not count:
            continue
        why = {"gradcam": "the channel weights make every position negative, e.g. every weight is negative: common "
                          "for a confident small model; Grad-CAM++ weighs only positive gradients",
               "guided_gradcam": "their Grad-CAM is zero"}.get(m, "no position has positive evidence")
        logger.warning("cam: %d of %d %s maps are all zero (%s); the sheets mark them", count, rows,
                       CAM_TITLES.get(m, m), why)


def _write_class_means(g, block: int = 4096) -> None:
    """class_mean/: per explained class, the mean of its maps, each max-normalised first."""
    from pipeline.render.draw import unit_scale

    per_class: dict[int, tuple] = {}
    maps, classes = g["map"], g["class"]
    for start in range(0, len(classes), block):
        unit = unit_scale(maps[start:start + block])
        cls_block = classes[start:start + block]
        for cls in np.unique(cls_block):
            sel = cls_block == cls
            total, count = per_class.get(int(cls), (0.0, 0))
            per_class[int(cls)] = (total + unit[sel].sum(axis=0), count + int(sel.sum()))
    order = sorted(per_class, key=lambda cls: (-per_class[cls][1], cls))
    cm = g.create_group("class_mean")
    cm["class"] = np.asarray(order, np.int64)
    cm["count"] = np.asarray([per_class[cls][1] for cls in order], np.int64)
    cm["map"] = np.asarray([per_class[cls][0] / per_class[cls][1] for cls in order], np.float32) \
        .reshape((len(order),) + maps.shape[1:])


FAITHFULNESS_METHODS = ("gradcam", "gradcam++", "scorecam")  # maps over positions


def _faithfulness(explainer, x, r, m: str, steps: int) -> dict[str, np.ndarray]:
    """Deletion and insertion curves and their areas for every (image, target) row."""
    from pipeline.faithfulness import area, curves

    k = r.classes.shape[1]
    deletion, insertion = curves(lambda batch: explainer.logits(batch, batch_size=len(batch)),
                                 np.repeat(np.asarray(x), k, axis=0), r.maps.reshape((-1,) + r.maps.shape[2:]),
                                 r.classes.reshape(-1), steps)
    return {f"cam/{m}/deletion": deletion, f"cam/{m}/insertion": insertion,
            f"cam/{m}/deletion_auc": area(deletion), f"cam/{m}/insertion_auc": area(insertion)}


# ----------------------------------------------------------------------------
# helpers shared with the occlusion stage


def top_predictions(ids: np.ndarray, logits: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """predictions/: the model's top-k classes of every image, their logits and probabilities."""
    from pipeline.explain import softmax

    k = min(k, logits.shape[1])
    classes = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    probability = softmax(logits, axis=1)
    return {"predictions/image": ids.astype(np.int64), "predictions/class": classes.astype(np.int64),
            "predictions/logit": np.take_along_axis(logits, classes, axis=1).astype(np.float32),
            "predictions/probability": np.take_along_axis(probability, classes, axis=1).astype(np.float32)}
