"""Broden's own layout (`dataset=segmentation dataset.format=broden`, dataset.path its root).

- `index.csv`: one row per image, columns image (path under `images/`), split, ih, iw (the
  image's size), sh, sw (its label images' size, which span the whole image), then one
  column per category. Pixel categories (color, object, part, material) name label PNGs
  under `images/`, several separated by ';' (overlapping objects, parts at two levels);
  image-level categories (scene, texture) hold label numbers, several separated by ';'.
- `label.csv`: columns number, name, category (`object(120);part(3)`: the category with
  the most images is the label's); `c_<category>.csv` (columns code, number, name) give
  the category of a label that label.csv leaves without one.
- A label image's pixel holds label number R + 256 * G (0: unlabelled).

A row that cannot be used (a label image missing, of another size than sh x sw, holding a
number not in label.csv, an image-level cell that is no number, an image whose size is
not ih x iw) is a reason recorded for its image, as for dataset.format=masks.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.segmentation import (DEFAULT_CATEGORY, Concepts, image_size, mask_geometry, png_values,
                                   unknown_value)

PIXEL_COLUMNS = ("color", "object", "part", "material")
IMAGE_COLUMNS = ("scene", "texture")
REQUIRED = ("image", "ih", "iw", "sh", "sw")


@dataclass
class BrodenIndex:
    """The rows of index.csv kept (dataset.split), in file order: row = image id."""

    root: Path
    paths: list[str]  # the images
    sizes: np.ndarray  # (n, 4) int64: ih, iw, sh, sw
    pixel_files: list[list[str]]  # label PNGs of each row, every pixel category together
    image_cells: list[list[str]]  # the image-level cells' numbers, as written


def _root(path) -> Path:
    if path is None or str(path) in ("", "???"):
        raise PipelineError("dataset.path is not set: point it at the Broden folder (the one holding index.csv)")
    return Path(str(path)).expanduser()


def _rows(path: Path, what: str, required: tuple[str, ...]) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise PipelineError(f"{path} has no column {', '.join(missing)}: {what} is Broden's "
                                    f"(header {','.join(required)},...)")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PipelineError(f"{path} cannot be read ({err}): dataset.format=broden needs Broden's {what}") from None


def read_index(path, split=None) -> BrodenIndex:
    """index.csv under `path`, the rows of `split` only (None: all)."""
    root = _root(path)
    rows = _rows(root / "index.csv", "index.csv", REQUIRED)
    if split is not None:
        rows = [r for r in rows if r.get("split") == str(split)]
    sizes = np.zeros((len(rows), 4), np.int64)
    for n, row in enumerate(rows):
        try:
            sizes[n] = [int(row[k]) for k in ("ih", "iw", "sh", "sw")]
        except (TypeError, ValueError):
            raise PipelineError(f"{root / 'index.csv'} row {n + 2}: ih, iw, sh, sw are not whole numbers "
                                f"({[row[k] for k in ('ih', 'iw', 'sh', 'sw')]}): fix that row") from None
    cells = lambda row, columns: [v for c in columns for v in (row.get(c) or "").split(";") if v.strip()]  # noqa: E731
    return BrodenIndex(root, [str(root / "images" / r["image"]) for r in rows], sizes,
                       [cells(r, PIXEL_COLUMNS) for r in rows], [cells(r, IMAGE_COLUMNS) for r in rows])


def _main_category(text: str) -> str:
    """'object(120);part(3)' -> 'object' (the category counted most); '' when none."""
    counted = [(int(n or 0), name) for name, n in re.findall(r"([^;()\s]+)(?:\((\d+)\))?", text or "")]
    return max(counted, key=lambda c: c[0])[1] if counted else ""


def read_labels(path) -> Concepts:
    """The concept list of a Broden folder: label.csv, categories from c_*.csv where missing."""
    root = _root(path)
    rows = _rows(root / "label.csv", "label.csv", ("number", "name"))
    by_file: dict[int, str] = {}
    for table in sorted(root.glob("c_*.csv")):
        for row in _rows(table, table.name, ("number",)):
            if row["number"].strip().isdigit():
                by_file.setdefault(int(row["number"]), table.stem[2:])
    found: dict[int, tuple[str, str]] = {}
    for n, row in enumerate(rows):
        number = row["number"].strip()
        if not number.isdigit():
            raise PipelineError(f"{root / 'label.csv'} row {n + 2}: number {number!r} is not a whole number: fix that row")
        if int(number) > 0:  # 0 is Broden's unlabelled
            category = _main_category(row.get("category", "")) or by_file.get(int(number), DEFAULT_CATEGORY)
            found[int(number)] = (row["name"], category)
    if not found:
        raise PipelineError(f"{root / 'label.csv'} lists no label: dataset.format=broden needs Broden's label.csv")
    order = sorted(found)
    return Concepts(np.asarray(order, np.int64), [found[i][0] for i in order], [found[i][1] for i in order])


def broden_planes(index: BrodenIndex, i: int, spec, lookup: np.ndarray,
                  exif: bool = True) -> tuple[np.ndarray | None, str]:
    """(label columns (K, height, width) int32 in model-input geometry, '') of image i, one
    plane per label PNG and one constant plane per image-level label, or (None, reason)."""
    ih, iw, sh, sw = (int(v) for v in index.sizes[i])
    try:
        shown = image_size(index.paths[i], exif)
    except (OSError, ValueError, SyntaxError) as err:
        return None, f"image cannot be opened to check its labels: {err}"
    if shown != (ih, iw):
        return None, f"image is {shown[1]}x{shown[0]}, index.csv says {iw}x{ih}: its labels would not line up"
    planes = []
    for name in index.pixel_files[i]:
        values, why = png_values(index.root / "images" / name.strip(), rgb=True, where=" under images/")
        if values is None:
            return None, why
        if values.shape != (sh, sw):
            return None, f"mask {Path(name).name} is {values.shape[1]}x{values.shape[0]}, index.csv says {sw}x{sh}"
        bad = unknown_value(values, lookup)
        if bad is not None:
            return None, f"mask {Path(name).name} holds label {bad}, not in label.csv"
        planes.append(lookup[mask_geometry(values, spec, (ih, iw))])
    for cell in index.image_cells[i]:
        number = cell.strip()
        if not number.isdigit() or int(number) >= len(lookup) or lookup[int(number)] < 0:
            return None, f"image-level label {number!r} in index.csv is not a number of label.csv"
        planes.append(np.full(spec.size, lookup[int(number)], np.int32))  # the whole image is its mask
    if not planes:  # no label: its units' areas still count in every union
        planes.append(np.full(spec.size, lookup[0], np.int32))
    return np.stack(planes).astype(np.int32), ""
