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
    a batch (B, H, W, C) of images of one size likewise."""
    import tensorflow as tf

    image = _match_channels(image, spec.channels)
    height, width = spec.size
    h = tf.cast(tf.shape(image)[-3], tf.float32)
    w = tf.cast(tf.shape(image)[-2], tf.float32)
    if spec.resize == "exact":
        out = tf.image.resize(image, (height, width), method="bilinear", antialias=True)
    else:  # resize_plan's arithmetic, on tensors
        margin = (spec.resize_size or min(height, width)) / min(height, width)
        scale = tf.maximum(height * margin / h, width * margin / w)
        new_h = tf.maximum(height, tf.cast(tf.round(h * scale), tf.int32))
        new_w = tf.maximum(width, tf.cast(tf.round(w * scale), tf.int32))
        out = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
        top = (new_h - height) // 2
        left = (new_w - width) // 2
        out = out[..., top:top + height, left:left + width, :]
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    return tf.ensure_shape(out, (None,) * (image.shape.rank - 3) + (height, width, spec.channels))


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
