"""The segmentation source of network dissection: a concept list and one label PNG per image.

Layout (`dataset=segmentation`): the images under `dataset.path` (as dataset=folder lists
them), a label map for each under `dataset.masks` at the same relative path with the stem
and a `.png` suffix (each pixel a concept index, 0 unlabelled; 8-bit grey, palette or
16-bit grey), and `dataset.concepts`, a text file of `index name [category]` lines.

A label map goes through the geometry of its image (`preprocess.resize_plan`: the resize
and the centre crop of the model input), nearest-neighbour, so mask pixel (y, x) labels
model-input pixel (y, x). A mask that cannot be used (missing, not a PNG, another size than
its image, an index not in the list) is a reason recorded for its image, never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing, file_orientation, resize_plan, upright_size

DEFAULT_CATEGORY = "concept"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MASK_MODES = {"L", "P", "I;16", "I;16B", "I;16L", "I"}  # one channel of indices


@dataclass(frozen=True)
class Concepts:
    """The concept list: column j of every dissection table is concept index[j]."""

    index: np.ndarray  # (L,) int64, ascending, >= 1
    names: list[str]
    categories: list[str]

    def __len__(self) -> int:
        return len(self.index)

    def column_of(self) -> np.ndarray:
        """(max index + 1,) int32: the table column of each pixel value, -1 for a value not
        in the list; value 0 (unlabelled) maps to column len(self), a slot dropped later."""
        lookup = np.full(int(self.index.max(initial=0)) + 1, -1, np.int32)
        lookup[self.index] = np.arange(len(self.index), dtype=np.int32)
        lookup[0] = len(self.index)
        return lookup


def read_concepts(path) -> Concepts:
    """Parse `index name [category]` lines ('#' comments and blank lines skipped); a line that
    does not parse is a one-line PipelineError naming it."""
    if path is None or str(path) in ("", "???"):
        raise PipelineError("dataset.concepts is not set: add dataset.concepts=<file of 'index name [category]' "
                            "lines> to the command line")
    p = Path(str(path)).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"dataset.concepts={path} cannot be read ({err}): give a UTF-8 text file of "
                            f"'index name [category]' lines") from None
    found: dict[int, tuple[str, str]] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split()
        if len(parts) not in (2, 3) or not parts[0].isdigit() or int(parts[0]) < 1 or int(parts[0]) in found:
            why = "a repeated index" if parts[0].isdigit() and int(parts[0]) in found else \
                "not 'index name [category]' with a whole index >= 1 and names without spaces"
            raise PipelineError(f"dataset.concepts={path} line {number} ({text[:60]!r}): {why}: fix that line")
        found[int(parts[0])] = (parts[1], parts[2] if len(parts) == 3 else DEFAULT_CATEGORY)
    if not found:
        raise PipelineError(f"dataset.concepts={path} lists no concept: add 'index name [category]' lines")
    order = sorted(found)
    return Concepts(np.asarray(order, np.int64), [found[i][0] for i in order], [found[i][1] for i in order])


def check_segmentation(cfg) -> Concepts:
    """Config validation of dataset=segmentation: the mask folder exists, the list parses
    (dataset.format=broden: label.csv parses)."""
    from omegaconf import OmegaConf

    layout = str(OmegaConf.select(cfg, "format") or "masks")
    if layout == "broden":
        from pipeline.broden import read_labels

        if OmegaConf.select(cfg, "image_labels"):
            raise PipelineError("dataset.image_labels is for dataset.format=masks: Broden's index.csv holds its own "
                                "scene and texture columns; leave dataset.image_labels out")
        return read_labels(OmegaConf.select(cfg, "path"))
    if layout != "masks":
        raise PipelineError(f"dataset.format={layout} is not a segmentation layout: use dataset.format=masks "
                            f"(label PNGs under dataset.masks) or dataset.format=broden (Broden's index.csv)")
    masks = OmegaConf.select(cfg, "masks")  # None while still '???'
    if masks is None or str(masks) in ("", "???") or not Path(str(masks)).expanduser().is_dir():
        raise PipelineError(f"dataset.masks={masks} is not a folder: point it at the folder of label PNGs "
                            f"(same relative paths as the images under dataset.path)")
    concepts = read_concepts(OmegaConf.select(cfg, "concepts"))
    if OmegaConf.select(cfg, "image_labels"):
        read_image_labels(OmegaConf.select(cfg, "image_labels"))
    return concepts


def read_image_labels(path) -> dict[str, list[tuple[int, str]]]:
    """{image path relative to dataset.path ('/'-separated): [(line number, concept name)]}
    from a CSV (tab-separated when the file ends in .tsv) of rows `path, name[;name...][, ...]`
    ('#' comments, blank lines and a header row `image,...` skipped; a path on several rows
    gathers their names). A file that cannot be read or a row without a name is a one-line
    PipelineError naming it."""
    import csv

    p = Path(str(path)).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"dataset.image_labels={path} cannot be read ({err}): give a UTF-8 CSV of "
                            f"'image path, concept name[;name...]' rows") from None
    found: dict[str, list[tuple[int, str]]] = {}
    rows = csv.reader(text.splitlines(), delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
    for number, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#") or (number == 1 and cells[0].lower() in ("image", "path")):
            continue
        names = [n.strip() for c in cells[1:] for n in c.split(";") if n.strip()]
        if not cells[0] or not names:
            raise PipelineError(f"dataset.image_labels={path} line {number} ({','.join(row)[:60]!r}): not 'image "
                                f"path, concept name[;name...]': fix that line")
        key = Path(cells[0].replace("\\", "/")).as_posix()
        found.setdefault(key, []).extend((number, n) for n in names)
    if not found:
        raise PipelineError(f"dataset.image_labels={path} labels no image: add 'image path, concept name' rows")
    return found


def image_label_columns(found: dict, paths, root: str, concepts: Concepts, source) -> dict[int, tuple]:
    """{image id: (columns (n,) int32 of its labels, '') or (None, reason)} for the images of
    `paths` (absolute, under `root`) that `found` (read_image_labels) labels; a name not in
    the concept list is a reason recorded for its image. Rows naming no image of the run are
    logged once."""
    import logging
    import os

    column = {name: j for j, name in enumerate(concepts.names)}
    ids = {Path(os.path.relpath(p, root)).as_posix(): i for i, p in enumerate(paths)}
    out = {}
    for key, labels in found.items():
        if key not in ids:
            continue
        unknown = [(line, name) for line, name in labels if name not in column]
        out[ids[key]] = ((None, f"dataset.image_labels line {unknown[0][0]}: concept {unknown[0][1]!r} is not in "
                                f"dataset.concepts") if unknown
                         else (np.unique([column[name] for _, name in labels]).astype(np.int32), ""))
    missing = [key for key in found if key not in ids]
    if missing:
        logging.getLogger(__name__).warning("dataset.image_labels=%s: %d row(s) name no image of this run under "
                                            "dataset.path (first: %s), not used", source, len(missing), missing[0])
    return out


def mask_path(image_path: str, image_root, mask_root) -> Path:
    """The label PNG of an image: same relative path and stem under the mask folder."""
    rel = Path(image_path).relative_to(Path(str(image_root)))
    return Path(str(mask_root)) / rel.with_suffix(".png")


def mask_geometry(labels: np.ndarray, spec: Preprocessing, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """A label map (sh, sw) spanning an image of `image_size` (h, w; default the map's own
    size) -> (height, width) of the model input: `resize_plan`'s resize and crop of the
    image, nearest-neighbour (output pixel centre (o + 0.5) maps back to image position
    (top + o + 0.5) * h / new_h, the sample the bilinear resize centres on, which is map
    row floor of that times sh / h)."""
    sh, sw = labels.shape
    h, w = image_size or (sh, sw)
    new_h, new_w, top, left = resize_plan(h, w, spec)
    rows = np.minimum(((top + np.arange(spec.height) + 0.5) * sh / new_h).astype(np.int64), sh - 1)
    cols = np.minimum(((left + np.arange(spec.width) + 0.5) * sw / new_w).astype(np.int64), sw - 1)
    return labels[rows[:, None], cols[None, :]]


def png_values(path: Path, rgb: bool = False, where: str = "") -> tuple[np.ndarray | None, str]:
    """(pixel values (h, w) int64, '') of a label PNG, or (None, reason). One channel of
    indices; with `rgb` also RGB(A) PNGs, whose value is R + 256 * G (Broden's encoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_MAGIC:
                return None, f"mask {path.name} is not a PNG file: save label maps as PNG"
    except FileNotFoundError:
        return None, f"mask not found ({path.name}{where})"
    except OSError as err:
        return None, f"mask {path.name} cannot be read: {err.strerror or err}"
    try:
        with Image.open(path) as im:
            if rgb and im.mode in ("RGB", "RGBA"):
                channels = np.asarray(im, np.int64)
                return channels[..., 0] + 256 * channels[..., 1], ""
            if im.mode not in MASK_MODES:
                return None, (f"mask {path.name} is {im.mode}: save one channel of concept indices "
                              f"(8-bit grey, palette or 16-bit grey PNG)")
            return np.asarray(im, np.int64), ""
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as err:
        return None, f"mask {path.name} cannot be decoded: {err}"


def image_size(image_path: str, exif: bool = True) -> tuple[int, int]:
    """(height, width) of an image as displayed (upright after its EXIF orientation)."""
    from PIL import Image

    with Image.open(image_path) as photo:
        h, w = photo.height, photo.width
    return upright_size(h, w, file_orientation(image_path)) if exif else (h, w)


def present_values(values: np.ndarray) -> np.ndarray:
    """The distinct values of a label map, ascending (a count of each value when they are
    small, 20x faster than np.unique's sort)."""
    low, high = int(values.min(initial=0)), int(values.max(initial=0))
    if low < 0 or high >= 2**20:
        return np.unique(values)
    return np.flatnonzero(np.bincount(values.ravel(), minlength=1))


def unknown_value(values: np.ndarray, lookup: np.ndarray) -> int | None:
    """The first pixel value that is no concept of the list (None: all are)."""
    present = present_values(values)
    outside = present[(present < 0) | (present >= len(lookup))]
    if not len(outside):
        outside = present[lookup[present] < 0]
    return int(outside[0]) if len(outside) else None


def read_mask(path: Path, image_path: str, spec: Preprocessing, lookup: np.ndarray,
              exif: bool = True) -> tuple[np.ndarray | None, str]:
    """(columns (height, width) int32 in model-input geometry, '') or (None, reason). Columns
    are `Concepts.column_of` of the pixel values: len(concepts) for unlabelled."""
    values, why = png_values(path, where=" under dataset.masks")
    if values is None:
        return None, why
    try:
        h, w = image_size(image_path, exif)
    except (OSError, ValueError, SyntaxError) as err:
        return None, f"image cannot be opened to check its mask: {err}"
    if values.shape != (h, w):
        return None, f"mask {path.name} is {values.shape[1]}x{values.shape[0]}, its image {w}x{h}: masks match their image"
    bad = unknown_value(values, lookup)
    if bad is not None:
        return None, f"mask {path.name} holds index {bad}, not in dataset.concepts"
    return lookup[mask_geometry(values, spec)], ""


def distinct_planes(planes: np.ndarray, unlabelled: int) -> np.ndarray:
    """Label planes (K, H, W) with each concept at most once per pixel: a pixel labelled
    twice with one concept (two overlapping files of one category) counts once; the
    repeats become `unlabelled`."""
    if len(planes) < 2:
        return planes
    ordered = np.sort(planes, axis=0)
    ordered[1:][ordered[1:] == ordered[:-1]] = unlabelled
    return ordered


def lift_image_level(plane: np.ndarray, image_level: np.ndarray) -> np.ndarray:
    """One label plane (H, W) -> planes (K, H, W): a concept of an image-level category
    anywhere in the plane labels the whole image (a constant plane of its own), its pixels
    left unlabelled in the pixel plane. `image_level` (L + 1,) bool per column."""
    present = present_values(plane)
    lifted = present[image_level[present]]
    if not len(lifted):
        return plane[None]
    unlabelled = len(image_level) - 1
    pixel = np.where(image_level[plane], unlabelled, plane)
    return np.concatenate([pixel[None], np.broadcast_to(lifted[:, None, None], (len(lifted), *plane.shape))])


class MaskReader:
    """The label planes (model-input geometry, concept columns) of a batch of image ids,
    read on a few threads; dataset.format=masks (one PNG per image) or broden."""

    def __init__(self, table, dataset_cfg, spec, concepts: Concepts, downsample: int = 1):
        import os
        from concurrent.futures import ThreadPoolExecutor

        self.step, self.table, self.spec = downsample, table, spec
        self.lookup = concepts.column_of()
        self.unlabelled = len(concepts)
        self.exif = bool(dataset_cfg.get("exif", True))
        self.broden = None
        if str(dataset_cfg.get("format", "masks")) == "broden":
            from pipeline.broden import read_index

            self.broden = read_index(dataset_cfg.path, dataset_cfg.get("split"))
        else:
            self.root = os.path.abspath(os.path.expanduser(str(dataset_cfg.path)))
            self.mask_root = os.path.abspath(os.path.expanduser(str(dataset_cfg.masks)))
            source = dataset_cfg.get("image_labels")
            self.image_labels = {} if not source else image_label_columns(
                read_image_labels(source), [os.path.abspath(p) for p in table.paths], self.root, concepts, source)
        levels = {str(c) for c in (dataset_cfg.get("image_level") or ())}
        self.image_level = np.asarray([c in levels for c in concepts.categories] + [False])
        self.pool = ThreadPoolExecutor(4)  # PNG decoding releases the GIL

    def planes(self, i: int) -> tuple[np.ndarray | None, str]:
        """(label planes (K, h, w) int32 at the mask resolution, '') of image i, or (None, reason)."""
        if self.broden is not None:
            from pipeline.broden import broden_planes

            planes, why = broden_planes(self.broden, i, self.spec, self.lookup, self.exif)
        else:
            path = self.table.paths[i]
            plane, why = read_mask(mask_path(path, self.root, self.mask_root), path, self.spec, self.lookup, self.exif)
            planes = None if plane is None else (lift_image_level(plane, self.image_level) if self.image_level.any()
                                                 else plane[None])
            columns, label_why = self.image_labels.get(i, (np.zeros(0, np.int32), ""))
            if planes is not None and columns is None:
                planes, why = None, label_why
            elif planes is not None and len(columns):  # whole-image planes of the label file's concepts
                planes = np.concatenate([planes, np.broadcast_to(columns[:, None, None],
                                                                 (len(columns), *planes.shape[1:]))])
        if planes is None:
            return None, why
        s = self.step  # the centre pixel of each s x s block
        return distinct_planes(planes[:, s // 2::s, s // 2::s] if s > 1 else planes, self.unlabelled), ""

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """(labels (n, K, h, w) int32 of the usable ones, K the most planes of one image, the
        others padded with unlabelled planes; their positions in ids; {id: reason})."""
        found = list(self.pool.map(self.planes, [int(i) for i in ids]))
        keep = np.asarray([k for k, (m, _) in enumerate(found) if m is not None], np.int64)
        bad = {int(ids[k]): why for k, (m, why) in enumerate(found) if m is None}
        size = (self.spec.height // self.step, self.spec.width // self.step)
        depth = max([len(found[k][0]) for k in keep], default=1)
        labels = np.full((len(keep), depth, *size), self.unlabelled, np.int32)
        for n, k in enumerate(keep):
            labels[n, :len(found[k][0])] = found[k][0]
        return labels, keep, bad

    def close(self) -> None:
        self.pool.shutdown()
