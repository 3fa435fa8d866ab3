"""`cam` stage: Grad-CAM, Grad-CAM++, Score-CAM and guided Grad-CAM over every image.

A thin wrapper over `pipeline.explain.CamExplainer`: the dataset is streamed in batches
of `batch_size`, each batch's maps are appended to results.h5 as they come (memory flat
in dataset size), and sheets are drawn at the end: overlays on the original photos and
the mean map per explained class.

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
from pipeline.errors import PipelineError
from pipeline.store import RESULTS_FILE, mark_done, transaction

logger = logging.getLogger(__name__)

KEYS = ("model", "dataset", "cam")
ROWS_PER_PAGE = 6
CLASS_MEANS_DRAWN = 24
DISPLAY_SIDE = 448  # longest side of a photo on the sheets
TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM",
          "guided_gradcam": "guided Grad-CAM"}


def run(cfg, run_dir: Path, stage_print: str) -> None:
    from pipeline.explain import METHODS, CamExplainer
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
    explainer = CamExplainer(bundle.model, c.layer, spec)
    names = class_names(bundle, table, explainer.num_classes)
    codes_for = target_codes(c, table, names, explainer.num_classes)
    draw_limit = len(table) if c.draw is None else int(c.draw)
    logger.info("cam: %s on layer %s (logits from %s) over %d images, target %s", ", ".join(methods),
                explainer.layer, explainer.logits_layer, len(table), c.target)

    results = run_dir / RESULTS_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    stream = BatchStream(table, spec, cfg.batch_size)
    drawn: dict[int, dict] = {}
    means: dict[str, dict[int, list]] = {m: {} for m in methods if m != "guided_gradcam"}
    with transaction(results) as f:
        if "cam" in f:
            del f["cam"]
        g = f.create_group("cam")
        writer = _Appender(g)
        top5: dict[str, list] = {"image": [], "class": [], "logit": [], "probability": []}
        with tqdm(total=len(table), desc="cam", unit="img") as bar:
            for ids, pixels in stream:
                x = normalize(pixels, spec.normalize)
                _add_top_predictions(top5, ids, explainer.logits(x, batch_size=len(ids)))
                out = explainer.compute(x, codes_for(ids), methods, batch_size=len(ids),
                                        scorecam_batch=c.scorecam_batch)
                first = out[methods[0]]
                k = first.classes.shape[1]
                writer.add("image", np.repeat(ids.astype(np.int64), k))
                writer.add("rank", np.tile(np.arange(k, dtype=np.int32), len(ids)))
                for m, r in out.items():
                    rows = r.maps.reshape((-1,) + r.maps.shape[2:])
                    writer.add(f"{m}/map", rows, chunk_rows=1 if m == "guided_gradcam" else None)
                    writer.add(f"{m}/class", r.classes.reshape(-1))
                    writer.add(f"{m}/score", r.scores.reshape(-1))
                    writer.add(f"{m}/max", r.maxima.reshape(-1).astype(np.float32))
                    if m in means:
                        _accumulate(means[m], rows, r.classes.reshape(-1))
                for i, image_id in enumerate(ids):
                    if image_id < draw_limit:
                        drawn[int(image_id)] = {"pixels": pixels[i].numpy(), "maps": {
                            m: (r.maps[i], r.classes[i], r.scores[i]) for m, r in out.items()}}
                bar.update(len(ids))
            bar.update(len(stream.errors))
        _ensure_run_record(f, cfg, bundle, table, stream.errors)
        if "predictions" in f:
            del f["predictions"]
        for key, parts in top5.items():  # the model's top-5 classes of every image
            f[f"predictions/{key}"] = np.concatenate(parts)
        g.attrs.update(layer=explainer.layer, logits_layer=explainer.logits_layer, methods=json.dumps(methods),
                       target=str(c.target), input_size=spec.input_size,
                       map_shape=np.asarray(explainer.map_shape[:2], np.int64))
        for m, per_class in means.items():
            cm = g.require_group(m).create_group("class_mean")
            order = sorted(per_class, key=lambda cls: (-per_class[cls][1], cls))
            cm["class"] = np.asarray(order, np.int64)
            cm["count"] = np.asarray([per_class[cls][1] for cls in order], np.int64)
            cm["map"] = np.asarray([per_class[cls][0] / per_class[cls][1] for cls in order], np.float32) \
                .reshape((len(order),) + tuple(g.attrs["map_shape"]))
        for m in methods:
            g[m].attrs.update(layer=explainer.layer, method=m)
        mark_done(f, "cam", stage_print)
    logger.info("cam: %d images explained, %d unreadable", len(table) - len(stream.errors), len(stream.errors))
    draw_sheets(results, run_dir / "cam", table, spec, names, drawn, methods, float(c.alpha))


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


def _add_top_predictions(top5: dict[str, list], ids: np.ndarray, logits: np.ndarray, k: int = 5) -> None:
    k = min(k, logits.shape[1])
    classes = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probability = shifted / shifted.sum(axis=1, keepdims=True)
    top5["image"].append(ids.astype(np.int64))
    top5["class"].append(classes.astype(np.int64))
    top5["logit"].append(np.take_along_axis(logits, classes, axis=1).astype(np.float32))
    top5["probability"].append(np.take_along_axis(probability, classes, axis=1).astype(np.float32))


def _ensure_run_record(f, cfg, bundle, table: ImageTable, errors: dict[int, str]) -> None:
    """Write the run attrs and images/ when no earlier stage (scan) did; images this
    stage did not read are recorded as readable."""
    from pipeline.store import write_image_table, write_run_attrs

    if "identity" not in f.attrs:
        write_run_attrs(f, cfg, bundle.name, bundle.preprocessing, bundle.weights_sha256, bundle.imagenet_classes)
    if "images" not in f:
        write_image_table(f, table, errors)


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
        s = pixels.shape[0]
        return to_rgb(pixels), (0.0, 0.0, float(s), float(s))
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
    size = spec.input_size
    if spec.resize == "exact":
        return 0.0, 0.0, float(h), float(w)
    scale = (spec.resize_size or size) / min(h, w)
    new_h = max(size, int(round(h * scale)))
    new_w = max(size, int(round(w * scale)))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return top * h / new_h, left * w / new_w, (top + size) * h / new_h, (left + size) * w / new_w


class _Appender:
    """Datasets that grow by rows as batches arrive (rows chunked for per-image reads)."""

    def __init__(self, group):
        self.group = group

    def add(self, name: str, rows: np.ndarray, chunk_rows: int | None = None) -> None:
        rows = np.asarray(rows)
        if name not in self.group:
            shape = (0,) + rows.shape[1:]
            if chunk_rows is None:
                chunk_rows = max(1, min(1024, (1 << 20) // max(1, rows[0].nbytes if len(rows) else 1)))
            kwargs = {"compression": "gzip", "shuffle": True} if rows.ndim > 2 else {}
            self.group.create_dataset(name, shape=shape, maxshape=(None,) + rows.shape[1:], dtype=rows.dtype,
                                      chunks=(chunk_rows,) + rows.shape[1:], **kwargs)
        d = self.group[name]
        n = d.shape[0]
        d.resize(n + len(rows), axis=0)
        d[n:] = rows


def _accumulate(per_class: dict, maps: np.ndarray, classes: np.ndarray) -> None:
    """Sum of per-map max-normalised maps and counts, per class (one add per class present)."""
    from pipeline.draw import unit_scale

    unit = unit_scale(maps)
    for cls in np.unique(classes):
        sel = classes == cls
        total, count = per_class.get(int(cls), (0.0, 0))
        per_class[int(cls)] = (total + unit[sel].sum(axis=0), count + int(sel.sum()))


# ----------------------------------------------------------------------------
# sheets


def file_slug(method: str) -> str:
    return method.replace("++", "_pp")


def draw_sheets(results: Path, out_dir: Path, table: ImageTable, spec, names: list[str], drawn: dict,
                methods: list[str], alpha: float) -> list[Path]:
    """Overlay pages (photo, then one panel per method; a row per image and target) and
    the per-class mean maps, as PNG files in out_dir."""
    import h5py
    from matplotlib.figure import Figure

    from pipeline import draw

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
    with h5py.File(results, "r") as f:
        size = int(f["cam"].attrs["input_size"])
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
            up, _ = draw.resample(maps, (size, size))
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
