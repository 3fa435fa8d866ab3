"""Image geometry and pixel normalisation, shared by every stage.

TensorFlow is imported only by the functions that run on the device, so the report
(which never loads a model) can use the spec and `resize_plan`.

Two steps, kept apart on purpose: `to_model_pixels` gives the uint8 image the model
sees (after resize and crop, before normalisation), which is what patches are cut
from; `normalize` maps those pixels to the model's input range on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

NORMALIZE_MODES = ("none", "unit", "caffe", "tf", "torch")
RESIZE_MODES = ("shorter", "exact")

_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


@dataclass(frozen=True)
class Preprocessing:
    height: int  # the model input, in pixels
    width: int
    channels: int = 3  # 1 or 3: what the model wants
    resize: str = "shorter"  # 'shorter': scale to cover the input (with the crop margin), centre crop; 'exact'
    # the shorter input side before the crop (256 for a 224 input: the classic margin);
    # None: no margin, the image just covers the input
    resize_size: int | None = None
    normalize: str = "none"

    def __post_init__(self):
        from pipeline.errors import PipelineError

        if self.normalize not in NORMALIZE_MODES:
            raise PipelineError(f"model.preprocess={self.normalize} is unknown: use one of {', '.join(NORMALIZE_MODES)}")
        if self.resize not in RESIZE_MODES:
            raise PipelineError(f"model.resize={self.resize} is unknown: use one of {', '.join(RESIZE_MODES)}")
        if self.height < 1 or self.width < 1 or (self.resize_size is not None and self.resize_size < 1):
            raise PipelineError(f"model input {self.height}x{self.width} (resize_size {self.resize_size}): "
                                f"sizes must be positive")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.height, self.width

    def describe(self) -> str:
        return (f"resize={self.resize} resize_size={self.resize_size or min(self.size)} "
                f"crop={self.height}x{self.width} channels={self.channels} normalize={self.normalize}")


def resize_plan(h: int, w: int, spec: Preprocessing) -> tuple[int, int, int, int]:
    """How an (h, w) image becomes the model input: resized to (new_h, new_w), then
    cropped at (top, left) to spec.size. 'shorter' scales the image to cover the input
    enlarged by the margin resize_size / min(input), keeping its aspect ratio (for a
    square input: the shorter side becomes resize_size); 'exact' stretches it."""
    height, width = spec.size
    if spec.resize == "exact":
        return height, width, 0, 0
    margin = (spec.resize_size or min(height, width)) / min(height, width)
    scale = max(height * margin / h, width * margin / w)
    new_h, new_w = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
    return new_h, new_w, (new_h - height) // 2, (new_w - width) // 2


def input_box(h: int, w: int, spec: Preprocessing) -> tuple[float, float, float, float]:
    """Where the model input lies in an (h, w) photo: (y0, x0, y1, x1) in photo pixels,
    following `resize_plan` (resize, then centre crop)."""
    new_h, new_w, top, left = resize_plan(h, w, spec)
    return top * h / new_h, left * w / new_w, (top + spec.height) * h / new_h, (left + spec.width) * w / new_w


# ---------------------------------------------------------------- orientation and DCT scale

EXIF_HEADER_BYTES = 65536
# a JPEG is decoded at a DCT scale 1/r while it stays at least this many times the size its
# resize needs (the remaining resize then only shrinks). Measured against a full decode: a
# 12-megapixel photo for a 224 input differs by 0.8 levels on average (max 10); a 500x741
# photo for a 24 input by up to 9 on average (the decoder's 8x8 block means alias where the
# antialiased resize would not). A gap of 2 (Pillow's thumbnail keeps one) brings a 512x512
# photo for a 64 input from 3.6 to 1.5, but decodes a phone photo at 1/4, not 1/8.
DCT_GAP = 1.0


def exif_orientation(head: bytes) -> int:
    """The EXIF orientation (tag 0x0112, 1..8) in the first bytes of a JPEG or PNG file;
    1 (as stored) when there is none or it is damaged. Only the first image directory
    is read, no thumbnail, no decoding."""
    return _orientation(head) or 1


def _orientation(head: bytes) -> int | None:
    """`exif_orientation`, or None when `head` ends before the answer."""
    tiff = None
    if head[:2] == b"\xff\xd8":  # JPEG: walk the marker segments up to the image data
        pos = 2
        while pos + 4 <= len(head) and head[pos] == 0xFF:
            marker, length = head[pos + 1], int.from_bytes(head[pos + 2:pos + 4], "big")
            if marker == 0xE1 and head[pos + 4:pos + 10] == b"Exif\x00\x00":
                tiff = head[pos + 10:pos + 2 + length]
                break
            if marker in (0xDA, 0xD9) or length < 2:  # start of scan: no EXIF before the pixels
                return 1
            pos += 2 + length
        else:
            return None if pos + 4 > len(head) else 1
    elif head[:8] == b"\x89PNG\r\n\x1a\n":  # PNG: the eXIf chunk, before the image data
        pos = 8
        while pos + 8 <= len(head):
            length, kind = int.from_bytes(head[pos:pos + 4], "big"), head[pos + 4:pos + 8]
            if kind == b"eXIf":
                tiff = head[pos + 8:pos + 8 + length]
                break
            if kind == b"IDAT":
                return 1
            pos += 12 + length
        else:
            return None
    if tiff is None or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None if tiff is not None and len(tiff) < 4 else 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[:2], order) == 0x0112:
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header (SOFn), None when `head` ends first."""
    pos = 2
    while pos + 9 <= len(head) and head[pos] == 0xFF:
        marker, length = head[pos + 1], int.from_bytes(head[pos + 2:pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            return int.from_bytes(head[pos + 5:pos + 7], "big"), int.from_bytes(head[pos + 7:pos + 9], "big")
        if marker == 0xDA or length < 2:
            return None
        pos += 2 + length
    return None


def file_header(path: str) -> tuple[int, tuple[int, int] | None]:
    """(EXIF orientation, (height, width) of a JPEG or None) of a file, reading only its
    first bytes: 4 KiB, which hold both for nearly every photo, else up to 64 KiB; other
    formats than JPEG and PNG (TIFF, WebP: decoded by Pillow only) through Pillow's
    reading of their header. (1, None) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            jpeg = head[:2] == b"\xff\xd8"
            if not jpeg and head[:8] != b"\x89PNG\r\n\x1a\n":
                from PIL import Image

                with Image.open(f) as im:
                    value = int(im.getexif().get(0x0112, 1) or 1)
                    return (value if 1 <= value <= 8 else 1), None
            found, size = _orientation(head), _jpeg_size(head) if jpeg else None
            if (found is None or (jpeg and size is None)) and len(head) == 4096:
                head += f.read(EXIF_HEADER_BYTES - 4096)
                found, size = _orientation(head), _jpeg_size(head) if jpeg else None
            return found or 1, size
    except Exception:  # noqa: BLE001 - unreadable or not an image: its decoder reports it
        return 1, None


def file_orientation(path: str) -> int:
    """The EXIF orientation of a file (`file_header`)."""
    return file_header(path)[0]


def decode_plan(path: str, spec: Preprocessing, exif: bool = True, dct_scale: bool = True) -> tuple[int, int]:
    """(orientation to apply, DCT ratio) of a file, from its header: what every decoder of
    it (TensorFlow's stream, Pillow) does, so they agree."""
    if not exif and not dct_scale:
        return 1, 1
    orientation, size = file_header(path)
    orientation = orientation if exif else 1
    return orientation, dct_ratio(*size, orientation, spec) if dct_scale and size else 1


def upright_size(h: int, w: int, orientation: int) -> tuple[int, int]:
    """(height, width) once the orientation is applied: 5..8 turn the image a quarter."""
    return (w, h) if orientation >= 5 else (h, w)


def dct_ratio(h: int, w: int, orientation: int, spec: Preprocessing) -> int:
    """The largest JPEG decoding scale 1/r (r in 8, 4, 2, 1) that leaves a stored (h, w)
    image at least DCT_GAP times as large as its resize needs, so the resize still only
    shrinks it (libjpeg gives ceil(h / r) x ceil(w / r)). The need is that of the upright
    image: orientations 5..8 swap the axes."""
    uh, uw = upright_size(h, w, orientation)
    need = spec.size if spec.resize == "exact" else resize_plan(uh, uw, spec)[:2]
    need_h, need_w = upright_size(*need, orientation)
    for r in (8, 4, 2):
        if -(-h // r) >= DCT_GAP * need_h and -(-w // r) >= DCT_GAP * need_w:
            return r
    return 1


def orient(image: tf.Tensor, orientation) -> tf.Tensor:
    """An (H, W, C) image as stored -> upright, for EXIF orientation 1..8 (a tensor)."""
    import tensorflow as tf

    t = lambda x: tf.transpose(x, (1, 0, 2))  # noqa: E731
    branches = [
        lambda: image,  # 1
        lambda: image[:, ::-1],  # 2: mirrored
        lambda: image[::-1, ::-1],  # 3: upside down
        lambda: image[::-1],  # 4: mirrored upside down
        lambda: t(image),  # 5: transposed
        lambda: t(image)[:, ::-1],  # 6: turned a quarter anticlockwise: turn it clockwise
        lambda: t(image)[::-1, ::-1],  # 7: transverse
        lambda: t(image)[::-1],  # 8: turned clockwise
    ]
    index = tf.clip_by_value(tf.cast(orientation, tf.int32) - 1, 0, 7)
    return tf.switch_case(index, branches)


class TooManyPixels(ValueError):
    """An image whose header gives more pixels than dataset.max_pixels."""


_PIL_TURNS = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # EXIF orientation -> PIL.Image.Transpose value


def read_photo(path: str, exif: bool = True, spec: Preprocessing | None = None,
               max_pixels: int | None = None) -> np.ndarray:
    """An image file through Pillow -> uint8 (H, W, 1 or 3) (`photo_pixels`), upright when
    `exif`, a JPEG decoded at `dct_ratio`'s scale for `spec` (the scale TensorFlow's
    stream uses) when a spec is given. Raises TooManyPixels when the header gives more than
    `max_pixels`; Pillow's errors otherwise."""
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise TooManyPixels(f"image of {im.width}x{im.height} pixels is above dataset.max_pixels={max_pixels}: "
                                f"not decoded (raise dataset.max_pixels to read it)")
        tiff = im.format == "TIFF"
        stored = file_orientation(path) if exif or tiff else 1  # the stream's reader: both agree
        orientation = stored if exif else 1
        if spec is not None and im.format in ("JPEG", "MPO"):
            r = dct_ratio(im.height, im.width, orientation, spec)
            if r > 1:
                im.draft(im.mode, (im.width // r, im.height // r))
        im.load()
        if tiff and not exif and stored in _PIL_TURNS:  # Pillow turns a TIFF upright as it loads: undo
            im = im.transpose(Image.Transpose(_PIL_TURNS[{6: 8, 8: 6}.get(stored, stored)]))
        elif not tiff and orientation in _PIL_TURNS:
            im = im.transpose(Image.Transpose(_PIL_TURNS[orientation]))
        return photo_pixels(im)


def photo_pixels(im) -> np.ndarray:
    """A loaded PIL image -> uint8 (H, W, 1) or (H, W, 3), as TensorFlow's decoder gives
    it: 16-bit scaled from the full 16-bit range, float/int32 from the image's maximum."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        return (np.clip(a / hi, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None]
    if im.mode in ("L", "1"):
        return np.asarray(im.convert("L"), np.uint8)[..., None]
    return np.asarray(im.convert("RGB"), np.uint8)


def to_model_pixels(image: tf.Tensor, spec: Preprocessing) -> tf.Tensor:
    """uint8 (H, W, C) of any size and 1/3 channels -> uint8 (height, width, spec.channels);
    a batch (B, H, W, C) of images of one size likewise.

    The pixels are those of resizing the whole image (bilinear, antialiased) to
    `resize_plan`'s size and cropping its centre, but only the source window that
    survives the crop is resampled (with the filter's reach around it): memory follows
    the model input, never the image's aspect ratio (a 1x300000 strip would otherwise be
    scaled up to 256 x 77M pixels).
    """
    import tensorflow as tf

    image = _match_channels(image, spec.channels)
    height, width = spec.size
    batch = image if image.shape.rank == 4 else image[None]
    h, w = tf.shape(batch)[1], tf.shape(batch)[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    if spec.resize == "exact":
        out = _resample(batch, (height, width), (height / hf, width / wf), (0.0, 0.0))
    else:  # resize_plan's arithmetic, on tensors (float32, as it always was)
        margin = (spec.resize_size or min(height, width)) / min(height, width)
        scale = tf.maximum(height * margin / hf, width * margin / wf)
        new_h = tf.maximum(height, tf.cast(tf.round(hf * scale), tf.int32))
        new_w = tf.maximum(width, tf.cast(tf.round(wf * scale), tf.int32))
        # the scales tf.image.resize derives from the sizes, so the samples fall where they did
        sy, sx = tf.cast(new_h, tf.float32) / hf, tf.cast(new_w, tf.float32) / wf
        r0, r1, ty = _window((new_h - height) // 2, height, sy, h)
        c0, c1, tx = _window((new_w - width) // 2, width, sx, w)
        out = _resample(batch[:, r0:r1, c0:c1, :], (height, width), (sy, sx), (ty, tx))
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    out = out if image.shape.rank == 4 else out[0]
    return tf.ensure_shape(out, (None,) * (image.shape.rank - 3) + (height, width, spec.channels))


def _window(start, size: int, scale, n):
    """The source span [a, b) that output pixels start..start+size of an axis resized by
    `scale` read (triangle filter, widened by 1/scale when shrinking, plus two pixels of
    slack), and the translation that puts output pixel `start` at 0 within it."""
    import tensorflow as tf

    s = tf.cast(scale, tf.float64)
    reach = tf.maximum(1.0 / s, 1.0) + 0.5
    first = (tf.cast(start, tf.float64) + 0.5) / s
    last = (tf.cast(start + size, tf.float64) - 0.5) / s
    a = tf.clip_by_value(tf.cast(tf.floor(first - reach), tf.int32) - 2, 0, n)
    b = tf.clip_by_value(tf.cast(tf.math.ceil(last + reach), tf.int32) + 2, a, n)
    # in float64: a * s and start can both be ~1e7 for a thin strip, their difference is small
    return a, b, tf.cast(tf.cast(a, tf.float64) * s - tf.cast(start, tf.float64), tf.float32)


def _resample(batch, size, scale, translation):
    """Antialiased bilinear resampling of a batch (B, h, w, C) to `size`: output pixel x of
    an axis samples the input at (x + 0.5 - translation) / scale. TensorFlow's kernel
    resamples the rows first, through an (B, size[0], w, C) float buffer; when that is
    larger than the image and the columns first would need a smaller one (a wide strip
    stretched), they go first, in a call of their own."""
    import tensorflow as tf

    def call(x, out, scales, shifts):
        return tf.raw_ops.ScaleAndTranslate(images=x, size=tf.stack(out), scale=tf.stack(scales),
                                            translation=tf.stack(shifts), kernel_type="triangle", antialias=True)

    h, w = tf.shape(batch)[1], tf.shape(batch)[2]
    # rows first costs no more than the image itself unless it stretches the rows
    rows_first = (size[0] <= h) | (tf.cast(size[0], tf.int64) * tf.cast(w, tf.int64)
                                   <= tf.cast(h, tf.int64) * size[1])
    both = lambda: call(batch, size, scale, translation)  # noqa: E731
    cols = lambda: call(call(batch, (h, size[1]), (1.0, scale[1]), (0.0, translation[1])),  # noqa: E731
                        size, (scale[0], 1.0), (translation[0], 0.0))
    return tf.cond(rows_first, both, cols)


def _match_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """1, 3 or 4 channels (RGBA: alpha dropped) -> `channels` (1 or 3), for an image or a batch.

    Written with slicing, repeats and a weighted sum so that both branches of the
    cond trace whatever the static channel count is.
    """
    import tensorflow as tf

    c = tf.shape(image)[-1]
    if channels == 3:
        return tf.cond(c == 1, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])
    luma = tf.constant([0.2989, 0.5870, 0.1140], tf.float32)
    grey = lambda: tf.cast(tf.round(tf.reduce_sum(  # noqa: E731
        tf.cast(image[..., :3], tf.float32) * luma[:tf.shape(image[..., :3])[-1]], axis=-1, keepdims=True)), tf.uint8)
    return tf.cond(c == 1, lambda: image[..., :1], grey)


def normalize(pixels: tf.Tensor, mode: str) -> tf.Tensor:
    """uint8 (..., C) -> float32 in the model's input range."""
    import tensorflow as tf

    x = tf.cast(pixels, tf.float32)
    if mode == "none":
        return x
    if mode == "unit":
        return x / 255.0
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        if x.shape[-1] == 1:
            return (x / 255.0 - float(_TORCH_MEAN.mean())) / float(_TORCH_STD.mean())
        return (x / 255.0 - _TORCH_MEAN) / _TORCH_STD
    if mode == "caffe":
        if x.shape[-1] == 1:
            return x - float(_CAFFE_MEAN_BGR.mean())
        return x[..., ::-1] - _CAFFE_MEAN_BGR
    raise ValueError(f"unknown normalisation {mode!r}")
