"""Top-k patches stored once per distinct patch: the crop stage's chunk files keep the
distinct patches in frames/<layer>/<name>, which of them each slot shows in
frames/<layer>/<name>_slots, and present the documented (C, K, h, w, ch) array as a
virtual dataset with one mapping per slot. `read_frames` reads the distinct patches and
the slot table instead: the virtual dataset is right but slow to read, as HDF5 parses its
mappings on every open and decompresses a patch again for each slot that shows it (a late
layer of 16 images: 11,520 slots, 676 patches).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

FRAMES = "frames"  # a chunk file's distinct patches, behind its virtual patches datasets
SLOTS = "_slots"  # after a frames dataset's name: (C, K) which frame each slot shows


def write_patches(f, key: str, name: str, out: np.ndarray, keys: np.ndarray):
    """layers/<key>/<name> (C, K, h, w, ch) uint8 in the chunk file `f`, stored once per
    distinct patch: many units win at the same image and location (a late layer of 16
    images: 676 distinct patches for 11,520 slots), so the distinct patches go to
    frames/<key>/<name> and `name` is a virtual dataset that maps each slot onto its
    patch; readers see the documented (C, K, h, w, ch) array. Returns that dataset."""
    c, k, h, w, ch = out.shape
    path = f"layers/{key}/{name}"
    flat = out.reshape(-1, h, w, ch)
    if flat.shape[0]:
        _, first, inverse = np.unique(keys.reshape(flat.shape[0], -1), axis=0, return_index=True,
                                      return_inverse=True)
        inverse = inverse.ravel()
    if not flat.shape[0] or not np.array_equal(flat, flat[first][inverse]) or len(first) > 0.8 * flat.shape[0]:
        # nothing to share (or slots that disagree): one plain array, a chunk per channel
        return f.create_dataset(path, data=out, chunks=(1,) + out.shape[1:] if out.size else None,
                                compression="gzip", compression_opts=4)
    frames = f.create_dataset(f"{FRAMES}/{key}/{name}", data=flat[first], chunks=(1, h, w, ch),
                              compression="gzip", compression_opts=4)
    f.create_dataset(f"{FRAMES}/{key}/{name}{SLOTS}", data=inverse.reshape(c, k).astype(np.int32),
                     compression="gzip")
    # one mapping per slot through the low-level API: h5py's VirtualLayout costs ~10x more per mapping
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    slots, rows = h5py.h5s.create_simple(out.shape), h5py.h5s.create_simple(frames.shape)
    source = frames.name.encode()
    for slot, row in enumerate(inverse.tolist()):
        slots.select_hyperslab((slot // k, slot % k, 0, 0, 0), (1, 1, h, w, ch))
        rows.select_hyperslab((row, 0, 0, 0), (1, h, w, ch))
        dcpl.set_virtual(slots, b".", source, rows)
    h5py.h5d.create(f.require_group(f"layers/{key}").id, name.encode(), h5py.h5t.py_create(np.dtype(np.uint8)),
                    h5py.h5s.create_simple(out.shape), dcpl=dcpl)
    return f[path]


def read_frames(ds: h5py.Dataset, c0: int, c1: int, s0: int, s1: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Units c0:c1, slots s0:s1 of a patches dataset as (frames (n, h, w, ch), index
    (c1 - c0, s1 - s0) into frames), each frame read once; None when the dataset is not
    wholly stored as frames with a slot table (plain, or written before the tables): then
    read it plainly."""
    s1 = min(s1, ds.shape[1])
    if c1 <= c0 or s1 <= s0:
        return None
    pieces = _pieces(ds.file, ds.name, c0, c1)
    if pieces is None:
        return None
    frames, index, offset = [], [], 0
    for file, frames_name, lo, hi in pieces:
        with h5py.File(file, "r") as f:
            slots = f[frames_name + SLOTS][lo:hi, s0:s1]
            wanted, local = np.unique(slots, return_inverse=True)
            src = f[frames_name]
            # a frame is a chunk: reading one costs about as much as decompressing it, so
            # read a range only where it holds little else (h5py's list selection is slower)
            first, last = int(wanted[0]), int(wanted[-1]) + 1
            frames.append(src[first:last][wanted - first] if 4 * (last - first) <= 5 * len(wanted)
                          else np.stack([src[int(r)] for r in wanted]))
        index.append(offset + local.reshape(slots.shape))
        offset += len(wanted)
    return np.concatenate(frames), np.concatenate(index)


def has_frames(ds: h5py.Dataset) -> bool:
    """Whether read_frames reads `ds` (whole frames and slot tables all the way down)."""
    return ds.shape[0] > 0 and _pieces(ds.file, ds.name, 0, ds.shape[0]) is not None


def _box(space, shape) -> tuple[np.ndarray, np.ndarray] | None:
    """(start, stop) of a one-block hyperslab selection or of the whole `shape`; None otherwise."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:
        return np.zeros(len(shape), np.int64), np.asarray(shape, np.int64)
    if kind != h5py.h5s.SEL_HYPERSLABS or not space.is_regular_hyperslab():
        return None
    start, _, count, block = (np.asarray(v, np.int64) for v in space.get_regular_hyperslab())
    return (start, start + block) if (count == 1).all() else None


def _pieces(f: h5py.File, name: str, c0: int, c1: int) -> list | None:
    """[(file, frames dataset, u0, u1)] covering units c0:c1 of dataset `name` of `f`, in
    order, each piece's units in its own file's numbering; followed down through virtual
    datasets made of blocks of whole units (a stage's part over its chunk files, a merge
    over shards). None when any piece has no slot table."""
    name = "/" + name.lstrip("/")
    if name.startswith("/layers/"):
        frames_name = f"/{FRAMES}/{name[len('/layers/'):]}"
        if frames_name in f and frames_name + SLOTS in f:
            return [(f.filename, frames_name, c0, c1)]
    ds = f[name]
    dcpl = ds.id.get_create_plist() if ds.is_virtual else None
    if dcpl is None or dcpl.get_virtual_count() > ds.shape[0]:  # plain, or a mapping per slot
        return None
    blocks = []
    for i in range(dcpl.get_virtual_count()):
        vbox = _box(dcpl.get_virtual_vspace(i), ds.shape)
        sbox = _box(dcpl.get_virtual_srcspace(i), ())
        if vbox is None or sbox is None or vbox[0][1:].any() or (vbox[1][1:] != ds.shape[1:]).any():
            return None  # only blocks of whole units
        lo, hi = max(c0, int(vbox[0][0])), min(c1, int(vbox[1][0]))
        if lo < hi:
            shift = (int(sbox[0][0]) if len(sbox[0]) else 0) - int(vbox[0][0])  # 'all' of the source: from 0
            blocks.append((lo, hi, shift, dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i)))
    pieces, folder = [], Path(f.filename).parent
    for lo, hi, shift, path, source in sorted(blocks):
        with h5py.File(f.filename if path == "." else folder / path, "r") as inner:
            found = _pieces(inner, source, lo + shift, hi + shift)
        if found is None:
            return None
        pieces += found
    return pieces if sum(u1 - u0 for *_, u0, u1 in pieces) == c1 - c0 else None
