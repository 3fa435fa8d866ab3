"""Stored top-k patches made ready to look at: resized, with the part of the frame that lies
outside the image drawn as a grey checkerboard, so that it cannot be taken for dark image
content (the crop stage stores zeros there, which look like a black sky), and an orange
line where the box is clipped."""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from pipeline.panel_codec import read_panels
from pipeline.patch_frames import read_frames
from pipeline.render.canvas import resize_patches
from pipeline.render.draw import PANEL_PERCENTILE, panel_to_uint8

CHECKER_PX = 4
CHECKER_GREYS = (150, 182)
FLAT_GREY = 128  # for JPEG files (the toolbox export), which smear a checkerboard
CLIP_EDGE = (230, 120, 20)  # the outline drawn just outside a clipped box, on the checker


def inside_masks(boxes: np.ndarray, starts: np.ndarray, frame: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(..., h, w) bool: which pixels of a patch drawn at `size` show the image.

    boxes (..., 4): y0, x0, y1, x1 of the clipped receptive field in input pixels; starts
    (..., 2): where that box begins inside the frame (the layer's row and column offsets at
    the unit). A displayed pixel is inside when its centre, mapped back to the frame, is."""
    fh, fw = frame
    h, w = size
    fy = (np.arange(h) + 0.5) * (fh / h)  # displayed pixel centres in frame pixels
    fx = (np.arange(w) + 0.5) * (fw / w)
    y0, x0 = starts[..., 0:1], starts[..., 1:2]
    y1 = y0 + (boxes[..., 2:3] - boxes[..., 0:1])
    x1 = x0 + (boxes[..., 3:4] - boxes[..., 1:2])
    rows = (fy >= y0) & (fy < y1)  # (..., h)
    cols = (fx >= x0) & (fx < x1)  # (..., w)
    return rows[..., :, None] & cols[..., None, :]


def checker(size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 grey checkerboard."""
    h, w = size
    cells = ((np.arange(h)[:, None] // CHECKER_PX) + (np.arange(w)[None, :] // CHECKER_PX)) % 2
    return np.repeat(np.asarray(CHECKER_GREYS, np.uint8)[cells][..., None], 3, axis=-1)


def clip_edge(inside: np.ndarray) -> np.ndarray:
    """(..., h, w) bool: the outside pixels next to an inside one (4-neighbours), where a
    clipped box ends at the image border."""
    near = np.zeros_like(inside)
    near[..., 1:, :] |= inside[..., :-1, :]
    near[..., :-1, :] |= inside[..., 1:, :]
    near[..., :, 1:] |= inside[..., :, :-1]
    near[..., :, :-1] |= inside[..., :, 1:]
    return near & ~inside


def show_outside(patches: np.ndarray, inside: np.ndarray, flat: bool = False) -> np.ndarray:
    """patches (..., h, w, 3) uint8, in place and returned, with the pixels outside the image
    replaced by the checker, outlined along the box's clipped edge in CLIP_EDGE (flat:
    FLAT_GREY, no outline: JPEG smears both). Only the patches that reach outside the image
    are touched (most do not), so the rest is not even copied."""
    h, w, ch = patches.shape[-3:]
    inside = np.broadcast_to(inside, patches.shape[:-1])
    out = np.ascontiguousarray(patches)  # a copy only of a strided view, which reshape could not write through
    rows = out.reshape(-1, h, w, ch)
    masks = inside.reshape(-1, h, w)
    clipped = np.flatnonzero(~masks.all(axis=(1, 2)))
    if clipped.size:
        sub, ins = rows[clipped], masks[clipped]
        if flat:
            rows[clipped] = np.where(ins[..., None], sub, np.uint8(FLAT_GREY))
        else:
            shown = np.where(ins[..., None], sub, checker((h, w))[..., :ch])
            rows[clipped] = np.where(clip_edge(ins)[..., None], np.asarray(CLIP_EDGE, np.uint8)[:ch], shown)
    return out


def panel_image(panels: np.ndarray) -> np.ndarray:
    """Raw backprop panels (..., h, w, ch) -> uint8, each panel stretched to its own
    PANEL_PERCENTILE of |value| (a robust maximum), 0 at mid grey."""
    return panel_to_uint8(panels, panel_dims=3, percentile=PANEL_PERCENTILE)


TABLES = {"patches": "topk", "bottom_patches": "bottomk", "class_patches": "class_topk"}  # panels/*: topk


@dataclass
class PatchSet:
    """Drawn patches of channels c0:c1, each distinct patch once: `drawn` (n, h, w, 3) uint8
    and `index` (c1 - c0, k) into it."""

    drawn: np.ndarray
    index: np.ndarray

    def rows(self, a: int, b: int) -> np.ndarray:
        """(b - a, k, h, w, 3): the patches of the set's channels a:b (relative to c0)."""
        return self.drawn[self.index[a:b]]


def layer_patches(g: h5py.Group, name: str, c0: int, c1: int, k: int, size: tuple[int, int],
                  flat: bool = False, start: int = 0, ds: h5py.Dataset | None = None) -> np.ndarray:
    """Channels c0:c1, slots :k of layers/<layer>/<name> (patches, bottom_patches,
    class_patches or panels/<method>, drawn by panel_image) at `size`, (b, k, h, w, 3)
    uint8, outside-image area checkered where the layer's geometry is stored. flat=True
    (the JPEG export): flat grey instead of the checker, and grey images stay one
    channel. start: the first slot (class_patches hold one block of slots per class).
    ds: g[name] opened once by a caller that reads many blocks (a virtual dataset parses
    its mapping each time it is opened)."""
    return distinct_patches(g, name, c0, c1, k, size, flat, start, ds).rows(0, c1 - c0)


def distinct_patches(g: h5py.Group, name: str, c0: int, c1: int, k: int, size: tuple[int, int],
                     flat: bool = False, start: int = 0, ds: h5py.Dataset | None = None) -> PatchSet:
    """What layer_patches draws, as a PatchSet: many units win at the same (image, location),
    so each distinct patch is resized and checkered once (a late layer's 1,280 units share a
    few hundred); a caller drawing many blocks of units reads one set for all of them."""
    slots = slice(start, start + k)
    table = g[TABLES.get(name, "topk")]
    first = inverse = None  # set when raw holds each distinct patch once: its first slot, each slot's patch
    if name.startswith("panels/"):  # int8 codes and their scales, decoded to float panels
        raw = panel_image(read_panels(g, name, slice(c0, c1), slots, ds))
    else:
        ds = g[name] if ds is None else ds
        stored = read_frames(ds, c0, c1, start, start + k)
        if stored is not None:  # as the crop stage stored them
            raw, inverse = stored
            first = np.unique(inverse, return_index=True)[1]
        else:
            raw = ds[c0:c1, slots]
            if all(n in table for n in ("image", "y", "x")):
                raw, first, inverse = _shared(raw, table, c0, c1, slots)
    shape = inverse.shape if inverse is not None else raw.shape[:2]  # (units, slots)
    if raw.shape[-1] == 1 and not flat:
        raw = np.repeat(raw, 3, axis=-1)
    small = resize_patches(raw[..., :3], size)
    if "geometry/row_offset" in g and "box" in table:
        frame = tuple(int(v) for v in g["geometry"].attrs["frame"])
        boxes = table["box"][c0:c1, slots]
        starts = np.stack([g["geometry/row_offset"][()][table["y"][c0:c1, slots]],
                           g["geometry/col_offset"][()][table["x"][c0:c1, slots]]], axis=-1)
        if first is not None:  # the same location has the same box: one mask per distinct patch
            boxes, starts = boxes.reshape(-1, 4)[first], starts.reshape(-1, 2)[first]
        # small is this call's own array (resized, or read from the file just now)
        small = show_outside(small, inside_masks(boxes, starts, frame, size), flat)
    if first is not None:
        return PatchSet(small, inverse.reshape(shape))
    return PatchSet(small.reshape((-1,) + small.shape[2:]), np.arange(shape[0] * shape[1]).reshape(shape))


def _shared(raw: np.ndarray, table: h5py.Group, c0: int, c1: int, slots: slice):
    """(distinct patches, first slot of each, each slot's patch) of patches read slot by slot
    (a file without the crop stage's slot tables), found by their (image, location, box);
    (raw, None, None) when slots with the same key disagree (then each is drawn)."""
    keys = np.stack([table[n][c0:c1, slots] for n in ("image", "y", "x")], axis=-1).reshape(-1, 3)
    if "box" in table:
        keys = np.concatenate([keys, table["box"][c0:c1, slots].reshape(-1, 4)], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    rows = raw.reshape((-1,) + raw.shape[2:])
    if not np.array_equal(rows, rows[first][inverse.ravel()]):
        return raw, None, None
    return rows[first], first, inverse.reshape(raw.shape[:2])
