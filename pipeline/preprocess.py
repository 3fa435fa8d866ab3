"""Image geometry and pixel normalisation, shared by every stage.

Two steps, kept apart on purpose: `to_model_pixels` gives the uint8 image the model
sees (after resize and crop, before normalisation), which is what patches are cut
from; `normalize` maps those pixels to the model's input range on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

NORMALIZE_MODES = ("none", "unit", "caffe", "tf", "torch")
RESIZE_MODES = ("shorter", "exact")

_TORCH_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], np.float32)
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


@dataclass(frozen=True)
class Preprocessing:
    input_size: int  # square side of the model input
    channels: int = 3  # 1 or 3: what the model wants
    resize: str = "shorter"  # 'shorter': shorter side -> resize_size, centre crop; 'exact'
    resize_size: int | None = None  # defaults to input_size (no crop margin)
    normalize: str = "none"

    def __post_init__(self):
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"preprocess must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")

    def describe(self) -> str:
        return (f"resize={self.resize} resize_size={self.resize_size or self.input_size} "
                f"crop={self.input_size} channels={self.channels} normalize={self.normalize}")


def to_model_pixels(image: tf.Tensor, spec: Preprocessing) -> tf.Tensor:
    """uint8 (H, W, C) of any size and 1/3 channels -> uint8 (S, S, spec.channels);
    a batch (B, H, W, C) of images of one size likewise."""
    image = _match_channels(image, spec.channels)
    size = spec.input_size
    h = tf.shape(image)[-3]
    w = tf.shape(image)[-2]
    if spec.resize == "exact":
        out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    else:
        target = spec.resize_size or size
        short = tf.cast(tf.minimum(h, w), tf.float32)
        scale = tf.cast(target, tf.float32) / short
        new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
        new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
        out = tf.image.resize(image, (new_h, new_w), method="bilinear", antialias=True)
        top = (new_h - size) // 2
        left = (new_w - size) // 2
        out = out[..., top:top + size, left:left + size, :]
    out = tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)
    return tf.ensure_shape(out, (None,) * (image.shape.rank - 3) + (size, size, spec.channels))


def _match_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """1, 3 or 4 channels (RGBA: alpha dropped) -> `channels` (1 or 3), for an image or a batch.

    Written with slicing, repeats and a weighted sum so that both branches of the
    cond trace whatever the static channel count is.
    """
    c = tf.shape(image)[-1]
    if channels == 3:
        return tf.cond(c == 1, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])
    luma = tf.constant([0.2989, 0.5870, 0.1140], tf.float32)
    grey = lambda: tf.cast(tf.round(tf.reduce_sum(  # noqa: E731
        tf.cast(image[..., :3], tf.float32) * luma[:tf.shape(image[..., :3])[-1]], axis=-1, keepdims=True)), tf.uint8)
    return tf.cond(c == 1, lambda: image[..., :1], grey)


def normalize(pixels: tf.Tensor, mode: str) -> tf.Tensor:
    """uint8 (..., C) -> float32 in the model's input range."""
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
