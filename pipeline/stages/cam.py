"""`cam` stage: Grad-CAM, Grad-CAM++, Score-CAM and guided Grad-CAM over every image.

A thin wrapper over `pipeline.explain.CamExplainer`: the dataset is streamed in batches
of `batch_size`, the maps are committed in chunks as they come (memory flat in dataset
size; a killed run resumes after the last chunk, pipeline.chunks), and sheets are drawn
at the end: overlays on the original photos and the mean map per explained class.

results.h5:

    cam/                attrs: layer, logits_layer, methods (JSON), target, input_size, map_shape
      image  (n,) int64 image id of each row; rank (n,) int32 target rank within the image
      <method>/map      (n, h, w) float32 raw map at the target layer's resolution
                        (guided_gradcam: (n, S, S, C) at the input resolution)
      <method>/class    (n,) int64 explained class; <method>/score (n,) float32 its logit
      <method>/max      (n,) float32 the map's maximum (0: the map is all zero)
      <method>/class_mean/{class, count, map}  per explained class: the mean of the maps,
                        each divided by its own maximum first (not for guided_gradcam)
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.datasets import BatchStream, ImageTable, list_images
from pipeline.errors import PipelineError, StageSkipped
from pipeline.store import Store

logger = logging.getLogger(__name__)

KEYS = ("model", "dataset", "cam")
PART = "cam.h5"
ROWS_PER_PAGE = 6
CLASS_MEANS_DRAWN = 24
DISPLAY_SIDE = 448  # longest side of a photo on the sheets
TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM",
          "guided_gradcam": "guided Grad-CAM"}


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.chunks import BOOKKEEPING, ChunkedStream
    from pipeline.explain import METHODS, CamExplainer, NoClassScores
    from pipeline.models.sources import load_model
    from pipeline.preprocess import normalize

    c = cfg.cam
    methods = [str(m) for m in c.methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise PipelineError(f"cam.methods has {', '.join(unknown) or 'nothing'}: choose from {', '.join(METHODS)}")
    bundle = load_model(cfg.model, cfg.cache_dir)
    table = list_images(cfg.dataset)
    spec = bundle.preprocessing
    try:
        explainer = CamExplainer(bundle.model, c.layer, spec, output=cfg.model.output)
    except NoClassScores as err:
        raise StageSkipped(str(err)) from None
    names = class_names(bundle, table, explainer.num_classes)
    codes_for = target_codes(c, table, names, explainer.num_classes)
    draw_limit = len(table) if c.draw is None else int(c.draw)
    logger.info("cam: %s on layer %s (logits from %s) over %d images, target %s", ", ".join(methods),
                explainer.layer, explainer.logits_layer, len(table), c.target)

    store = Store(run_dir)
    store.ensure_run(cfg, bundle, table)
    work = store.work("cam", stage_print, cfg.overwrite, batch_size=int(cfg.batch_size))
    stream = ChunkedStream(work, table, spec, cfg.batch_size, np.arange(len(table), dtype=np.int64), cfg.checkpoint)
    with tqdm(total=len(table), initial=len(table) - stream.remaining, desc="cam", unit="img") as bar:
        for ids, pixels in stream:
            x = normalize(pixels, spec.normalize)
            rows = top_predictions(ids, explainer.logits(x, batch_size=len(ids)))
            out = explainer.compute(x, codes_for(ids), methods, batch_size=len(ids), scorecam_batch=c.scorecam_batch)
            k = out[methods[0]].classes.shape[1]
            rows["cam/image"] = np.repeat(ids.astype(np.int64), k)
            rows["cam/rank"] = np.tile(np.arange(k, dtype=np.int32), len(ids))
            for m, r in out.items():
                rows[f"cam/{m}/map"] = r.maps.reshape((-1,) + r.maps.shape[2:])
                rows[f"cam/{m}/class"] = r.classes.reshape(-1)
                rows[f"cam/{m}/score"] = r.scores.reshape(-1)
                rows[f"cam/{m}/max"] = r.maxima.reshape(-1).astype(np.float32)
            stream.add(rows)
            bar.update(len(ids))
        bar.update(len(table) - bar.n)
    store.write_images(len(table), stream.errors, replace=False)
    with store.write(PART) as f:
        work.assemble(f, skip=BOOKKEEPING)
        if "cam" not in f:
            raise PipelineError("cam: none of the images could be read: check dataset.path (images/error says why)")
        g = f["cam"]
        g.attrs.update(layer=explainer.layer, logits_layer=explainer.logits_layer, methods=json.dumps(methods),
                       target=str(c.target), input_size=np.asarray(spec.size, np.int64),
                       map_shape=np.asarray(explainer.map_shape[:2], np.int64))
        for m in methods:
            g[m].attrs.update(layer=explainer.layer, method=m)
            if m != "guided_gradcam":
                _write_class_means(g[m])
    logger.info("cam: %d images explained, %d unreadable", len(table) - len(stream.errors), len(stream.errors))
    draw_sheets(store.parts / PART, run_dir / "cam", table, spec, names, methods, float(c.alpha), draw_limit,
                cfg.batch_size)


def _write_class_means(g, block: int = 4096) -> None:
    """class_mean/: per explained class, the mean of its maps, each max-normalised first."""
    from pipeline.draw import unit_scale

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


# ----------------------------------------------------------------------------
# helpers shared with the occlusion stage


def class_names(bundle, table: ImageTable, num_classes: int) -> list[str]:
    """Names of the model's classes: ImageNet's, the dataset's folders, or numbers."""
    if bundle.imagenet_classes and num_classes == 1000:
        from pipeline.models.imagenet import class_names as imagenet

        return imagenet()
    if len(table.class_names) == num_classes:
        return list(table.class_names)
    return [f"class {i}" for i in range(num_classes)]


def target_codes(c, table: ImageTable, names: list[str], num_classes: int):
    """cam/occlusion target setting -> a function ids -> codes for pipeline.explain."""
    target = str(c.target)
    if target == "predicted":
        return lambda ids: np.full((len(ids), 1), -1, np.int64)
    if target == "label":
        if (table.labels < 0).all():
            raise PipelineError(f"{_section(c)}.target=label but the dataset has no labels: use class folders "
                                f"(dataset=folder) or a 'path label' list, or {_section(c)}.target=predicted")
        if table.labels.max() >= num_classes:
            raise PipelineError(f"dataset label {int(table.labels.max())} is beyond the model's {num_classes} "
                                f"classes: use {_section(c)}.target=predicted")
        unlabelled = int((table.labels < 0).sum())
        if unlabelled:
            logger.warning("%d unlabelled image(s) are explained for their predicted class", unlabelled)
        return lambda ids: table.labels[ids].reshape(-1, 1)
    if target == "classes" and "classes" in c:
        wanted = [_class_index(v, names, num_classes) for v in c.classes]
        if not wanted:
            raise PipelineError("cam.target=classes with cam.classes=[]: list class indices or names")
        return lambda ids: np.tile(np.asarray(wanted, np.int64), (len(ids), 1))
    if target == "top" and "top_n" in c:
        n = int(c.top_n)
        if not 1 <= n <= num_classes:
            raise PipelineError(f"cam.top_n={n}: use 1 to {num_classes}")
        return lambda ids: np.tile(-np.arange(1, n + 1, dtype=np.int64), (len(ids), 1))
    choices = "predicted|label|classes|top" if "top_n" in c else "predicted|label"
    raise PipelineError(f"{_section(c)}.target={target}: use {choices}")


def _section(c) -> str:
    return "cam" if "top_n" in c else "occlusion"


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


def top_predictions(ids: np.ndarray, logits: np.ndarray, k: int = 5) -> dict[str, np.ndarray]:
    """predictions/: the model's top-k classes of every image, their logits and probabilities."""
    k = min(k, logits.shape[1])
    classes = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probability = shifted / shifted.sum(axis=1, keepdims=True)
    return {"predictions/image": ids.astype(np.int64), "predictions/class": classes.astype(np.int64),
            "predictions/logit": np.take_along_axis(logits, classes, axis=1).astype(np.float32),
            "predictions/probability": np.take_along_axis(probability, classes, axis=1).astype(np.float32)}


def original_photo(table: ImageTable, image_id: int) -> np.ndarray | None:
    """The image as stored (full size), uint8 RGB, or None when it cannot be read."""
    from PIL import Image

    from pipeline.draw import to_rgb

    if table.arrays is not None:
        return to_rgb(table.arrays[image_id])
    try:
        with Image.open(table.paths[image_id]) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, np.float64)
                return to_rgb((np.clip(a / max(a.max(), 1.0), 0, 1) * 255 + 0.5).astype(np.uint8))
            return np.asarray(im.convert("RGB"), np.uint8)
    except Exception as err:  # the stream decoded it; Pillow may not (then the model view is drawn)
        logger.debug("cannot reopen %s for drawing: %s", table.paths[image_id], err)
        return None


def display_photo(table: ImageTable, image_id: int, spec, pixels: np.ndarray):
    """(photo, box): the original photo shrunk to DISPLAY_SIDE and where the model's input
    lies in it (y0, x0, y1, x1); the model-input pixels when the file cannot be reopened."""
    from PIL import Image

    from pipeline.draw import to_rgb

    photo = original_photo(table, image_id)
    if photo is None:
        return to_rgb(pixels), (0.0, 0.0, float(pixels.shape[0]), float(pixels.shape[1]))
    h, w = photo.shape[:2]
    box = crop_box(h, w, spec)
    scale = min(1.0, DISPLAY_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR, reducing_gap=2.0))
        sy, sx = photo.shape[0] / h, photo.shape[1] / w
        box = (box[0] * sy, box[1] * sx, box[2] * sy, box[3] * sx)
    return photo, box


def crop_box(h: int, w: int, spec) -> tuple[float, float, float, float]:
    """Where the model input lies in an (h, w) photo: (y0, x0, y1, x1) in photo pixels,
    following pipeline.preprocess.to_model_pixels (resize, then centre crop)."""
    from pipeline.preprocess import resize_plan

    new_h, new_w, top, left = resize_plan(h, w, spec)
    return top * h / new_h, left * w / new_w, (top + spec.height) * h / new_h, (left + spec.width) * w / new_w


# ----------------------------------------------------------------------------
# sheets


def file_slug(method: str) -> str:
    return method.replace("++", "_pp")


def drawn_maps(part: Path, table: ImageTable, spec, methods: list[str], limit: int, batch_size: int) -> dict:
    """image id -> its pixels and, per method, (maps, classes, scores) of its targets, for
    the images below `limit`, read back from the stage's part (a resumed run has them too)."""
    import h5py

    with h5py.File(part, "r") as f:
        image = f["cam/image"][()]
        rows = np.flatnonzero(image < limit)
        drawn = {int(i): {"maps": {}} for i in np.unique(image[rows])}
        for m in methods:
            g = f[f"cam/{m}"]
            maps = g["map"][rows] if len(rows) else np.zeros((0,) + g["map"].shape[1:], np.float32)
            classes, scores = g["class"][()][rows], g["score"][()][rows]
            for image_id in drawn:
                sel = image[rows] == image_id
                drawn[image_id]["maps"][m] = (maps[sel], classes[sel], scores[sel])
    for ids, pixels in BatchStream(table, spec, batch_size, ids=np.asarray(sorted(drawn), np.int64)):
        for image_id, p in zip(ids, pixels.numpy()):
            drawn[int(image_id)]["pixels"] = p
    return {i: item for i, item in drawn.items() if "pixels" in item}


def draw_sheets(part: Path, out_dir: Path, table: ImageTable, spec, names: list[str], methods: list[str],
                alpha: float, limit: int, batch_size: int) -> list[Path]:
    """Overlay pages (photo, then one panel per method; a row per image and target) and
    the per-class mean maps, as PNG files in out_dir."""
    import h5py
    from matplotlib.figure import Figure

    from pipeline import draw

    drawn = drawn_maps(part, table, spec, methods, limit, batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = []
    for image_id in sorted(drawn):
        item = drawn[image_id]
        photo, box = display_photo(table, image_id, spec, item["pixels"])
        for k in range(len(item["maps"][methods[0]][1])):  # one row per target
            rows.append((image_id, k, photo, box, item))
    pages = math.ceil(len(rows) / ROWS_PER_PAGE)
    for page in tqdm(range(pages), desc="cam sheets", unit="page"):
        chunk = rows[page * ROWS_PER_PAGE:(page + 1) * ROWS_PER_PAGE]
        aspect = max(photo.shape[0] / photo.shape[1] for _, _, photo, _, _ in chunk)
        fig = Figure(figsize=(2.3 * (len(methods) + 1), (2.3 * aspect + 0.45) * len(chunk) + 0.3), dpi=draw.DPI,
                     layout="constrained")
        axes = fig.subplots(len(chunk), len(methods) + 1, squeeze=False)
        for r, (image_id, k, photo, box, item) in enumerate(chunk):
            cls = int(item["maps"][methods[0]][1][k])
            score = float(item["maps"][methods[0]][2][k])
            axes[r, 0].imshow(draw.to_rgb(photo))
            axes[r, 0].set_title(f"#{image_id} {Path(table.paths[image_id]).name}", fontsize=6)
            axes[r, 0].set_ylabel(f"{names[cls][:28]}\nlogit {score:.2f}", fontsize=7)
            for col, m in enumerate(methods, 1):
                one = item["maps"][m][0][k]
                if m == "guided_gradcam":
                    axes[r, col].imshow(draw.paste_in_box(photo, draw.guided_image(one), box))
                else:
                    axes[r, col].imshow(draw.overlay(photo, one, alpha=alpha, box=box))
                if r == 0:
                    axes[r, col].set_title(TITLES[m], fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"class activation maps, page {page + 1} of {pages}", fontsize=9)
        written.append(draw.save(fig, out_dir / f"overlays_{page:03d}.png"))
    with h5py.File(part, "r") as f:
        size = tuple(int(v) for v in f["cam"].attrs["input_size"])  # (H, W)
        for m in methods:
            if "class_mean" not in f[f"cam/{m}"]:
                continue
            cm = f[f"cam/{m}/class_mean"]
            classes, counts, maps = cm["class"][()], cm["count"][()], cm["map"][:CLASS_MEANS_DRAWN]
            if not len(classes):
                continue
            n = len(maps)
            cols = min(6, n)
            grid_rows = math.ceil(n / cols)
            fig = Figure(figsize=(1.9 * cols, 2.0 * grid_rows + 0.4), dpi=draw.DPI, layout="constrained")
            axes = fig.subplots(grid_rows, cols, squeeze=False)
            up, _ = draw.resample(maps, size)
            image = None
            for i, ax in enumerate(axes.flat):
                ax.set_axis_off()
                if i < n:
                    image = ax.imshow(up[i], cmap=draw.CMAP, vmin=0.0, vmax=1.0)
                    ax.set_title(f"{names[int(classes[i])][:24]} (n={int(counts[i])})", fontsize=7)
            bar = fig.colorbar(image, ax=axes, shrink=0.6)
            bar.set_label("mean of max-normalised maps", fontsize=7)
            bar.ax.tick_params(labelsize=6)
            fig.suptitle(f"{TITLES[m]}: mean map per class ({f['cam'].attrs['layer']})", fontsize=9)
            written.append(draw.save(fig, out_dir / f"class_mean_{file_slug(m)}.png"))
    logger.info("cam: %d sheet(s) in %s", len(written), out_dir)
    return written
