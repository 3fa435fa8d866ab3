"""Cutting receptive-field patches out of model-input images, vectorised.

A layer's patches share one frame (the clipped receptive field of its centre
unit). Each box is placed in that frame where its unclipped receptive field
would lie, so a unit at the border shows real pixels on one side and zeros
where the field runs off the image.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def patch_size(frame: tuple[int, int], max_size: int) -> tuple[int, int]:
    """Stored patch size: the frame, scaled down to fit max_size if it is larger."""
    fh, fw = frame
    if max_size <= 0 or max(fh, fw) <= max_size:
        return fh, fw
    scale = max_size / max(fh, fw)
    return max(1, round(fh * scale)), max(1, round(fw * scale))


def cut_patches(images: np.ndarray, which: np.ndarray, boxes: np.ndarray,
                offsets: np.ndarray, frame: tuple[int, int]) -> np.ndarray:
    """Patches (E, fh, fw, C) from images (B, S, S, C).

    which: (E,) index into images; boxes: (E, 4) y0, x0, y1, x1 half-open, clipped;
    offsets: (E, 2) where the box starts inside the frame. Outside the box: zero.
    """
    fh, fw = frame
    size_h, size_w = images.shape[1:3]
    rows = (boxes[:, 0] - offsets[:, 0])[:, None] + np.arange(fh)[None, :]  # (E, fh)
    cols = (boxes[:, 1] - offsets[:, 1])[:, None] + np.arange(fw)[None, :]  # (E, fw)
    row_ok = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 2:3])
    col_ok = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 3:4])
    patches = images[which[:, None, None],
                     np.clip(rows, 0, size_h - 1)[:, :, None],
                     np.clip(cols, 0, size_w - 1)[:, None, :]]
    mask = row_ok[:, :, None] & col_ok[:, None, :]
    return np.where(mask[..., None], patches, 0).astype(np.uint8)


def shrink(patches: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average patches (E, h, w, C) down to `size`."""
    if patches.shape[1:3] == tuple(size) or len(patches) == 0:
        return patches
    small = tf.image.resize(tf.cast(patches, tf.float32), size, method="area")
    return tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8).numpy()


def channel_blocks(layers: list[tuple[str, int, int]], budget: int) -> list[list[tuple[str, int, int]]]:
    """Split layers [(key, channels, bytes per channel)] into blocks of (key, c0, c1)
    pieces, in layer and channel order, each block at most `budget` bytes (a single
    channel larger than the budget makes a block of its own)."""
    blocks, current, used = [], [], 0
    for key, channels, per_channel in layers:
        per_channel = max(per_channel, 1)
        c0 = 0
        while c0 < channels:
            fit = (budget - used) // per_channel
            if fit <= 0 and current:  # this block is full
                blocks.append(current)
                current, used = [], 0
                continue
            c1 = min(channels, c0 + max(fit, 1))
            current.append((key, c0, c1))
            used += (c1 - c0) * per_channel
            c0 = c1
    if current:
        blocks.append(current)
    return blocks
