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
    """Config validation of dataset=segmentation: the mask folder exists, the list parses."""
    from omegaconf import OmegaConf

    masks = OmegaConf.select(cfg, "masks")  # None while still '???'
    if masks is None or str(masks) in ("", "???") or not Path(str(masks)).expanduser().is_dir():
        raise PipelineError(f"dataset.masks={masks} is not a folder: point it at the folder of label PNGs "
                            f"(same relative paths as the images under dataset.path)")
    return read_concepts(OmegaConf.select(cfg, "concepts"))


def mask_path(image_path: str, image_root, mask_root) -> Path:
    """The label PNG of an image: same relative path and stem under the mask folder."""
    rel = Path(image_path).relative_to(Path(str(image_root)))
    return Path(str(mask_root)) / rel.with_suffix(".png")


def mask_geometry(labels: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """A label map (h, w) -> (height, width) of the model input: `resize_plan`'s resize and
    crop, nearest-neighbour (output pixel centre (o + 0.5) maps back to source pixel
    floor((o + 0.5) * h / new_h), the sample the bilinear resize centres on)."""
    h, w = labels.shape
    new_h, new_w, top, left = resize_plan(h, w, spec)
    rows = np.minimum(((top + np.arange(spec.height) + 0.5) * h / new_h).astype(np.int64), h - 1)
    cols = np.minimum(((left + np.arange(spec.width) + 0.5) * w / new_w).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def read_mask(path: Path, image_path: str, spec: Preprocessing, lookup: np.ndarray,
              exif: bool = True) -> tuple[np.ndarray | None, str]:
    """(columns (height, width) int32 in model-input geometry, '') or (None, reason). Columns
    are `Concepts.column_of` of the pixel values: len(concepts) for unlabelled."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_MAGIC:
                return None, f"mask {path.name} is not a PNG file: save label maps as PNG"
    except FileNotFoundError:
        return None, f"mask not found ({path.name} under dataset.masks)"
    except OSError as err:
        return None, f"mask {path.name} cannot be read: {err.strerror or err}"
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                return None, (f"mask {path.name} is {im.mode}: save one channel of concept indices "
                              f"(8-bit grey, palette or 16-bit grey PNG)")
            with Image.open(image_path) as photo:
                h, w = photo.height, photo.width
            if exif:  # the image is turned upright: the mask is drawn on the upright image
                h, w = upright_size(h, w, file_orientation(image_path))
            if (im.height, im.width) != (h, w):
                return None, f"mask {path.name} is {im.width}x{im.height}, its image {w}x{h}: masks match their image"
            values = np.asarray(im, np.int64)
    except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as err:
        return None, f"mask {path.name} cannot be decoded: {err}"
    present = np.unique(values)
    outside = present[(present < 0) | (present >= len(lookup))]
    if not len(outside):
        outside = present[lookup[present] < 0]
    if len(outside):
        return None, f"mask {path.name} holds index {int(outside[0])}, not in dataset.concepts"
    return lookup[mask_geometry(values, spec)], ""
