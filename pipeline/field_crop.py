"""Receptive-field crops: the smallest input window that computes a unit exactly.

A unit of a layer depends only on the input pixels of its receptive field, so
its value and its backward maps can be computed on a crop of the image around
that field, through the same layers, at a fraction of the cost. The crop must
keep the network's sampling grid: every strided layer has to read the same
pixels as on the whole image. Along one axis, with S the layer's total stride
and L the image length, a crop [start, start + n) does so when

* start is a multiple of S, so every intermediate map is the whole image's map
  shifted by a whole number of positions (start / S_l at a layer of stride S_l);
* n = L (mod S), so 'same' padding, whose leading part depends on the map
  length modulo the stride, pads the crop as it pads the image; a crop that
  ends at the image border then pads there exactly like the image does.

Within those rules the crop covers the unit's clipped field [lo, hi): it starts
at lo rounded down to a multiple of S (or at L - n, a multiple of S too, near
the far border) and n is the smallest length that covers every unit of the
layer. Output position o of the whole image is position o - start / S of the crop.

What the rules cannot see (a squeeze-and-excitation gate or a normalisation
over the whole map, which geometry reports in its message; a layer that only
runs at the model's input size) is caught by the caller comparing the unit's
value on the crop with its value on the whole image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class AxisCrop(NamedTuple):
    size: int  # crop length n
    start: np.ndarray  # (O,) int64: first input pixel of the crop of output position o
    stride: int  # S: output position o of the image is o - start[o] // S in the crop


class CropPlan(NamedTuple):
    rows: AxisCrop
    cols: AxisCrop

    @property
    def size(self) -> tuple[int, int]:
        return self.rows.size, self.cols.size

    def area_fraction(self, input_size: tuple[int, int]) -> float:
        return self.rows.size * self.cols.size / (input_size[0] * input_size[1])


def axis_crop(ranges: np.ndarray, stride: int, length: int) -> AxisCrop:
    """The crop of every output position along one axis.

    ranges: (O, 2) clipped half-open input ranges of the output positions (an
    empty range, a unit that reads only padding, is covered from 0); stride: the
    layer's total stride S; length: the image length L. The crop is the whole
    axis (start 0, n = L) where a smaller one would not be smaller.
    """
    ranges = np.asarray(ranges, np.int64).reshape(-1, 2)
    lo = np.where(ranges[:, 1] > ranges[:, 0], ranges[:, 0], 0)
    hi = np.where(ranges[:, 1] > ranges[:, 0], ranges[:, 1], 0)
    aligned = lo // stride * stride
    need = int((hi - aligned).max(initial=1))
    size = need + (length - need) % stride  # the smallest n >= need with n = L (mod S)
    if size >= length:
        return AxisCrop(length, np.zeros(len(ranges), np.int64), stride)
    return AxisCrop(size, np.minimum(aligned, length - size), stride)


def crop_plan(rows: np.ndarray, cols: np.ndarray, stride, input_size: tuple[int, int]
              ) -> tuple[CropPlan | None, str]:
    """A plan for a layer from its geometry (rows, cols, rf_stride, input size), or
    (None, why not) where crops cannot be exact or would be the whole image."""
    strides = tuple(float(s) for s in np.broadcast_to(np.asarray(stride, np.float64), (2,)))
    if any(s < 1 or s != int(s) for s in strides):
        return None, f"its total stride {strides} is not a whole number (upsampling on the way)"
    plan = CropPlan(axis_crop(rows, int(strides[0]), input_size[0]),
                    axis_crop(cols, int(strides[1]), input_size[1]))
    if plan.size == tuple(input_size):
        return None, "its receptive field spans the image"
    return plan, ""


def crop_positions(plan: CropPlan, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E, 2) crop starts (row, col) in the image and (E, 2) positions of the units
    (y, x) inside the crop's output."""
    y, x = np.asarray(y, np.int64), np.asarray(x, np.int64)
    starts = np.stack([plan.rows.start[y], plan.cols.start[x]], axis=1)
    inside = np.stack([y - starts[:, 0] // plan.rows.stride, x - starts[:, 1] // plan.cols.stride], axis=1)
    return starts, inside


def crop_index(which: np.ndarray, starts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(E, n_h, n_w, 3) int32 gather_nd index of the crops: (image row `which`,
    row, col) of every crop pixel."""
    rows = starts[:, 0, None] + np.arange(size[0])[None]
    cols = starts[:, 1, None] + np.arange(size[1])[None]
    e, n_h, n_w = len(which), size[0], size[1]
    index = np.empty((e, n_h, n_w, 3), np.int32)
    index[..., 0] = np.asarray(which)[:, None, None]
    index[..., 1] = rows[:, :, None]
    index[..., 2] = cols[:, None, :]
    return index
