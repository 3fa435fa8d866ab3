"""Image sources and the tf.data stream that feeds every stage.

A source lists its images once, in a stable order; the row of an image in that
list is its global image id for the whole run. Files that TensorFlow cannot
decode are dropped from the fast stream and retried with Pillow (TIFF, odd
modes); what neither can read is reported, never raised.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow as tf

from pipeline.errors import PipelineError
from pipeline.names import shown
from pipeline.preprocess import Preprocessing, TooManyPixels, decode_plan, orient, read_photo, to_model_pixels

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}

# Natural photos that ship with scikit-image and matplotlib: the embedded default data.
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)


@dataclass
class ImageTable:
    """Every image of a dataset, row = global image id."""

    paths: list[str]
    labels: np.ndarray  # int64, -1 unknown
    class_names: list[str] = field(default_factory=list)
    # For in-memory sources (IDX): (N, H, W) or (N, H, W, C) uint8; paths are then names.
    arrays: np.ndarray | None = None
    # reads are bounded before decoding (dataset.max_mb, dataset.max_pixels)
    max_bytes: int = 512 * 2**20
    max_pixels: int = 50_000_000
    exif: bool = True  # dataset.exif: turn photos upright by their EXIF orientation
    dct_scale: bool = True  # decode JPEGs at 1/2, 1/4, 1/8 when the resize needs no more (benchmarks turn it off)

    def __len__(self) -> int:
        return len(self.paths)


def list_images(cfg) -> ImageTable:
    """Build the image table for a dataset config (kind, path, split, limit)."""
    kind = cfg.kind
    if kind == "samples":
        table = _samples()
    elif kind == "segmentation" and cfg.get("format") == "broden":  # Broden's index.csv lists the images
        from pipeline.broden import read_index

        index = read_index(cfg.path, cfg.get("split"))
        table = ImageTable(index.paths, np.full(len(index.paths), -1, np.int64))
    elif kind in ("folder", "segmentation"):  # segmentation: its masks are read by the dissect stage
        table = _folder(_existing(cfg.path, "dataset.path"))
    elif kind == "filelist":
        table = _filelist(_existing(cfg.path, "dataset.path"))
    elif kind == "idx":
        table = _idx(_existing(cfg.path, "dataset.path"), cfg.split or "train", _max_bytes(cfg))
    else:
        raise PipelineError(f"unknown dataset kind {kind!r}: use dataset=samples|folder|filelist|idx|segmentation")
    if cfg.limit is not None:
        n = int(cfg.limit)
        table = ImageTable(table.paths[:n], table.labels[:n], table.class_names,
                           None if table.arrays is None else table.arrays[:n])
    table.max_bytes = _max_bytes(cfg)
    table.max_pixels = int(cfg.get("max_pixels", 50_000_000))
    table.exif = bool(cfg.get("exif", True))
    if len(table) == 0:
        raise PipelineError(f"dataset {kind!r} at {cfg.path} holds no images: "
                            f"point dataset.path at a folder of {'/'.join(sorted(IMAGE_SUFFIXES))} files")
    return table


def _max_bytes(cfg) -> int:
    return int(float(cfg.get("max_mb", 512)) * 2**20)  # MiB


def _existing(path, key: str) -> Path:
    if path is None or str(path) in ("", "???"):
        raise PipelineError(f"{key} is not set: add {key}=<path> to the command line")
    p = Path(str(path)).expanduser()
    if not p.exists():
        raise PipelineError(f"{key}={path} does not exist: pass an existing path")
    return p


def _samples() -> ImageTable:
    import matplotlib
    import skimage

    root = Path(skimage.__file__).parent / "data"
    paths = [str(root / name) for name in SKIMAGE_PHOTOS if (root / name).exists()]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.exists():
        paths.append(str(hopper))
    return ImageTable(paths, np.full(len(paths), -1, np.int64))


SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr", "/var")


def _folder(root: Path) -> ImageTable:
    """Every image file under `root`, symlinked folders followed (each real folder once,
    so a link back up does not loop); a first-level folder names the class."""
    if root.is_file():
        raise PipelineError(f"dataset.path={root} is a file: dataset=folder wants a folder "
                            f"(use dataset=filelist for a list file)")
    real = Path(os.path.realpath(root))
    if str(real) in SYSTEM_DIRS:
        raise PipelineError(f"dataset.path={root} is the system folder {real}: point dataset.path at a folder "
                            f"of images")
    found, seen = [], set()
    for folder, subdirs, files in os.walk(root, followlinks=True):
        info = os.stat(folder)
        if (info.st_dev, info.st_ino) in seen:
            subdirs[:] = []  # reached again through a link: walked already
            continue
        seen.add((info.st_dev, info.st_ino))
        subdirs.sort()
        for name in files:
            path = Path(folder) / name
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
    files = sorted(found, key=lambda p: p.relative_to(root).as_posix())
    class_names = sorted({p.relative_to(root).parts[0] for p in files
                          if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index.get(p.relative_to(root).parts[0], -1) if len(p.relative_to(root).parts) > 1
              else -1 for p in files]
    return ImageTable([str(p) for p in files], np.asarray(labels, np.int64), class_names)


def _filelist(list_file: Path) -> ImageTable:
    """'path label' lines (label optional; '#' starts a comment line). A path with spaces
    works when the whole line names an existing file, or when a label follows it. Labels
    are integers, or words that become class names (sorted); relative paths are relative
    to the list file. Bytes that are not UTF-8 stay the bytes they are (surrogateescape),
    so such a line names its file as the file system does."""
    try:
        lines = list_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as err:
        raise PipelineError(f"dataset.path={list_file} is not a readable text list ({err}): give a file of "
                            f"'path label' lines") from None
    paths, raw = [], []
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, label = line, None
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and not _resolve(parts[0] + " " + parts[1], list_file).exists():
            path, label = parts
        if "\0" in path:
            raise PipelineError(f"{list_file} line {lineno} holds a NUL byte: one 'path label' per line")
        paths.append(str(_resolve(path, list_file)))
        raw.append(label)
    words = sorted({lab for lab in raw if lab is not None and not _is_int(lab)})
    if words:  # word labels name classes; a list mixing in numbers treats them as words too
        names = sorted({lab for lab in raw if lab is not None})
        index = {name: i for i, name in enumerate(names)}
        return ImageTable(paths, np.asarray([index[lab] if lab is not None else -1 for lab in raw], np.int64), names)
    return ImageTable(paths, np.asarray([int(lab) if lab is not None else -1 for lab in raw], np.int64))


def _resolve(path: str, list_file: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else list_file.parent / p


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_INFLATE_BLOCK = 4 * 2**20
_DEFLATE_RATIO = 1032  # deflate's largest expansion: more promised than that is a truncated file


def read_idx(path: Path, max_bytes: int = 512 * 2**20) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not, as a numpy array.

    A plain file is mapped, not read. A gzipped one is inflated in blocks into an array
    of the size its header promises, and only when that size is within `max_bytes`
    (dataset.max_mb): a small .gz can promise gigabytes."""
    gz = path.suffix == ".gz"
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            dtype, shape, offset = _idx_header(path, f)
            count = math.prod(shape)
            size = count * dtype.itemsize
            if not gz:
                available = path.stat().st_size - offset
                if available != size:
                    raise PipelineError(f"{path} is truncated or has trailing bytes: its header promises {count} "
                                        f"values, the file holds {max(available, 0) // dtype.itemsize}: "
                                        f"replace it with an intact copy")
                # mapped, not read: a 1.28M-image file costs no memory until its images are used
                array = np.memmap(path, dtype, mode="r", offset=offset, shape=(count,))
            else:
                if size > max_bytes:
                    raise PipelineError(f"{path} inflates to {size / 2**20:.0f} MiB (its header promises shape "
                                        f"{shape}), above dataset.max_mb={max_bytes / 2**20:g}: not inflated "
                                        f"(gunzip it once: a plain IDX file is mapped, not read)")
                if size > _DEFLATE_RATIO * path.stat().st_size + 2**16:
                    raise PipelineError(f"{path} is truncated: its header promises {size / 2**20:.0f} MiB, more "
                                        f"than {path.stat().st_size} gzip bytes can hold: "
                                        f"replace it with a complete copy")
                array = np.empty(count, dtype)
                _inflate_into(path, f, array.view(np.uint8), dtype.itemsize)
    except (OSError, EOFError, zlib.error) as err:  # a damaged gzip stream, an unreadable file
        raise PipelineError(f"{path} cannot be read as an IDX file ({err}): replace it with an intact copy") from err
    array = array.reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def _idx_header(path: Path, f) -> tuple[np.dtype, tuple[int, ...], int]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise PipelineError(f"{path} is not an IDX file (bad magic number)")
    if head[2] not in IDX_TYPES:
        raise PipelineError(f"{path}: unknown IDX data type 0x{head[2]:02x}")
    ndim = head[3]
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise PipelineError(f"{path} is truncated: its header names {ndim} dimensions but ends after "
                            f"{4 + len(dims)} bytes: replace it with a complete copy")
    return np.dtype(IDX_TYPES[head[2]]), struct.unpack(f">{ndim}I", dims), 4 + 4 * ndim


def _inflate_into(path: Path, f, out: np.ndarray, itemsize: int) -> None:
    """Fill the bytes `out` from the gzip stream block by block; exactly len(out) must come."""
    done = 0
    while done < len(out):
        got = f.readinto(memoryview(out[done:done + _INFLATE_BLOCK]))
        if not got:
            raise PipelineError(f"{path} is truncated: its header promises {len(out) // itemsize} values, "
                                f"the file holds {done // itemsize}: replace it with a complete copy")
        done += got
    if f.read(1):
        raise PipelineError(f"{path} has trailing bytes after the {len(out) // itemsize} values its header "
                            f"promises: replace it with an intact copy")


def _idx(path: Path, split: str, max_bytes: int) -> ImageTable:
    if path.is_file():
        images_file = path
    elif not path.is_dir():
        raise PipelineError(f"dataset.path={path} is neither an IDX file nor a folder of them (a device or "
                            f"pipe is never read): point it at a *-images-idx3-ubyte[.gz] file or its folder")
    else:
        found = sorted(p for p in path.iterdir()
                       if p.name.startswith(split) and "images" in p.name and "idx" in p.name)
        if not found:
            raise PipelineError(f"no '{split}-images-idx*' file in {path}: set dataset.split "
                                f"to the prefix of the IDX files there")
        images_file = found[0]
    images = read_idx(images_file, max_bytes)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise PipelineError(f"{images_file} holds {images.dtype} of shape {images.shape}: "
                            f"expected uint8 images (N, H, W[, C])")
    labels_file = images_file.with_name(images_file.name.replace("images-idx3", "labels-idx1"))
    labels = np.full(len(images), -1, np.int64)
    if labels_file != images_file and labels_file.exists():
        labels = read_idx(labels_file, max_bytes).astype(np.int64)
    names = [f"{images_file.name}#{i}" for i in range(len(images))]
    return ImageTable(names, labels, arrays=images)


# ---------------------------------------------------------------- the stream

def file_problem(path: str, table: ImageTable) -> str:
    """Why a file may not be read ('' when it may), from its metadata alone: only regular
    files (never a device like /dev/zero, a pipe or a folder), not empty, not above
    dataset.max_mb. Nothing is read, so an endless or sparse huge file costs nothing."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "file not found"
    except OSError as err:
        return f"cannot open: {err.strerror or err}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or folder): not read"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    if info.st_size > table.max_bytes:
        return (f"file of {info.st_size / 2**20:.0f} MiB is above dataset.max_mb={table.max_bytes / 2**20:g}: "
                f"not read (raise dataset.max_mb to read it)")
    return ""


def _header_pixels(data: tf.Tensor) -> tf.Tensor:
    """Width times height from the header of a JPEG, PNG, GIF or BMP file (0 for other
    formats, which TensorFlow does not decode), read before anything is decoded."""
    def be32(offset):
        return tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, 4), tf.int32, little_endian=False)[0],
                       tf.int64)

    def le(offset, dtype, size):
        return tf.abs(tf.cast(tf.io.decode_raw(tf.strings.substr(data, offset, size), dtype)[0], tf.int64))

    magic = tf.strings.substr(data, 0, 4)
    shape = lambda: tf.cast(tf.reduce_prod(tf.image.extract_jpeg_shape(data)[:2]), tf.int64)  # noqa: E731
    return tf.case([
        (tf.strings.substr(data, 0, 2) == b"\xff\xd8", shape),
        (magic == b"\x89PNG", lambda: be32(16) * be32(20)),
        (magic == b"GIF8", lambda: le(6, tf.uint16, 2) * le(8, tf.uint16, 2)),
        (tf.strings.substr(data, 0, 2) == b"BM", lambda: le(18, tf.int32, 4) * le(22, tf.int32, 4)),
    ], default=lambda: tf.constant(0, tf.int64))


def decode_file(data: tf.Tensor, orientation, ratio) -> tf.Tensor:
    """A file's bytes -> uint8 (H, W, C): a JPEG decoded at DCT scale 1/ratio (1, 2, 4 or
    8), then turned upright by its EXIF orientation (1..8). Both come from the file's
    header (`preprocess.decode_plan`), read by the stream's Python generator, so the
    parallel decoders run no Python."""
    def any_image():
        return tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)

    step = tf.add_n([tf.cast(ratio >= r, tf.int32) for r in (2, 4, 8)])  # 1, 2, 4, 8 -> 0..3
    jpeg = lambda: tf.switch_case(step, [  # noqa: E731 - ratio is a static attribute: one branch each
        lambda r=r: tf.io.decode_jpeg(data, channels=0, ratio=r) for r in (1, 2, 4, 8)])
    image = tf.cond((step > 0) & (tf.strings.substr(data, 0, 2) == b"\xff\xd8"), jpeg, any_image)
    return tf.cond(orientation > 1, lambda: orient(image, orientation), lambda: image)


def image_stream(table: ImageTable, spec: Preprocessing, batch_size: int,
                 ids: np.ndarray | None = None) -> tf.data.Dataset:
    """tf.data stream of (ids int64 (B,), pixels uint8 (B, S, S, C)) over the image files
    of `ids`, in order.

    Files that may not be read (file_problem), whose header gives more than
    dataset.max_pixels, or that fail to decode are left out here; `BatchStream`
    notices the gap and deals with them.
    """
    ids = np.arange(len(table), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)

    def readable():
        for i in ids:
            path = table.paths[i]
            if not file_problem(path, table):
                # bytes: a name that is not UTF-8 reaches TensorFlow as it is
                yield (i, os.fsencode(path), *decode_plan(path, spec, table.exif, table.dct_scale))

    def load(i, path, orientation, ratio):
        data = tf.io.read_file(path)
        tf.debugging.assert_less_equal(_header_pixels(data), tf.constant(table.max_pixels, tf.int64))
        return i, to_model_pixels(decode_file(data, orientation, ratio), spec)

    ds = tf.data.Dataset.from_generator(readable, output_signature=(
        tf.TensorSpec((), tf.int64), tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.int32),
        tf.TensorSpec((), tf.int32)))
    # plain graph code (tf.cond where it branches): autograph would only re-parse it, seconds a stream
    ds = ds.map(tf.autograph.experimental.do_not_convert(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()
    return ds.batch(batch_size).prefetch(2)


def ready_arrays(table: ImageTable, spec: Preprocessing) -> np.ndarray | None:
    """The table's in-memory images as (N, S, S, C) when they already are model-input pixels."""
    arrays = table.arrays
    if arrays is None or tuple(arrays.shape[1:3]) != spec.size:
        return None
    arrays = arrays[..., None] if arrays.ndim == 3 else arrays
    return arrays if arrays.shape[-1] == spec.channels else None


class BatchStream:
    """Batches of the fast TensorFlow stream, then of the images it dropped.

    The fast stream (`main`) drops files TensorFlow cannot decode; `fallback`
    retries those with Pillow (TIFF, odd modes) and records in `errors` (image
    id -> reason) what neither can read. `position` counts the ids of `ids`
    the main stream has passed (decoded or dropped) and `dropped` lists the
    dropped ones so far: together they are what a resumed scan needs.
    """

    def __init__(self, table: ImageTable, spec: Preprocessing, batch_size: int,
                 ids: np.ndarray | None = None, dropped: list[int] | None = None):
        self.table, self.spec, self.batch_size = table, spec, batch_size
        self.ids = np.arange(len(table), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        self.dropped: list[int] = list(dropped or [])
        self.position = 0
        self.errors: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[np.ndarray, tf.Tensor]]:
        yield from self.main()
        yield from self.fallback()

    def main(self) -> Iterator[tuple[np.ndarray, tf.Tensor]]:
        if self.table.arrays is not None:
            yield from self._arrays()
            return
        sorter = np.argsort(self.ids, kind="stable")  # position of an id: 8 bytes an image, no dict
        for ids, pixels in image_stream(self.table, self.spec, self.batch_size, self.ids):
            ids_np = ids.numpy()
            end = int(sorter[np.searchsorted(self.ids, ids_np[-1], sorter=sorter)]) + 1
            passed = self.ids[self.position:end]
            self.dropped.extend(int(i) for i in np.setdiff1d(passed, ids_np))
            self.position = end
            yield ids_np, pixels
        self.dropped.extend(int(i) for i in self.ids[self.position:])
        self.position = len(self.ids)

    def _arrays(self) -> Iterator[tuple[np.ndarray, tf.Tensor]]:
        """In-memory images (IDX): sliced in batches, converted a whole batch at once
        (they share one size), never dropped."""
        ready = ready_arrays(self.table, self.spec)
        arrays = self.table.arrays
        for start in range(self.position, len(self.ids), self.batch_size):
            ids = self.ids[start:start + self.batch_size]
            if ready is not None:
                pixels = tf.constant(ready[ids])
            else:
                batch = arrays[ids]
                pixels = to_model_pixels(tf.constant(batch[..., None] if batch.ndim == 3 else batch), self.spec)
            self.position = start + len(ids)
            yield ids, pixels

    def fallback(self) -> Iterator[tuple[np.ndarray, tf.Tensor]]:
        done_ids, done_pixels = [], []
        for image_id in sorted(self.dropped):
            pixels, error = decode_with_pillow(self.table.paths[image_id], self.spec, self.table)
            if pixels is None:
                self.errors[int(image_id)] = error
                logger.warning("skipped image %d (%s): %s", image_id, shown(self.table.paths[image_id]), error)
                continue
            done_ids.append(image_id)
            done_pixels.append(pixels)
            if len(done_ids) == self.batch_size:
                yield np.asarray(done_ids, np.int64), tf.stack(done_pixels)
                done_ids, done_pixels = [], []
        if done_ids:
            yield np.asarray(done_ids, np.int64), tf.stack(done_pixels)


def decode_with_pillow(path: str, spec: Preprocessing, table: ImageTable) -> tuple[tf.Tensor | None, str]:
    """Second chance for files TensorFlow cannot decode; returns (pixels, '') or (None, reason).
    The same bounds hold: the file's metadata first, then the pixel count of its header;
    the same pixels: upright, and a JPEG at the stream's DCT scale."""
    from PIL import Image, UnidentifiedImageError

    problem = file_problem(path, table)
    if problem:
        return None, problem
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # ours is the limit, with its message
    try:
        array = read_photo(path, table.exif, spec if table.dct_scale else None, table.max_pixels)
    except UnidentifiedImageError:
        return None, "not an image file (format not recognised)"
    except TooManyPixels as err:
        return None, str(err)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, f"cannot decode: {err}"
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    return to_model_pixels(tf.constant(array), spec), ""
