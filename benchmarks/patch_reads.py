"""Reading a layer's stored top-k patches: as distinct frames and a slot table
(patch_frames.read_frames, what the report reads) against the baseline measured in the
same run, the documented (C, K, h, w, 3) virtual dataset read slot by slot through HDF5.

    python benchmarks/patch_reads.py [--run RUN_DIR] [--layer NAME] [--repeat 3]

--run: a run directory whose crop stage wrote slot tables (default: a synthetic late layer
of 1,280 units x 9 slots showing 676 distinct 64 px patches, written by the crop stage's
own writer as one chunk file and assembled into a part, as the default job's features_18_2).
Prints seconds for the whole layer and for blocks of 320 units (the report's card spans),
median of --repeat, and the ratios; checks that both reads give the same array.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def synthetic(folder: Path, units: int = 1280, k: int = 9, distinct: int = 676, side: int = 64) -> Path:
    from pipeline.patch_frames import FRAMES, write_patches
    from pipeline.store import WorkDir

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (distinct, side, side, 3), dtype=np.uint8)
    which = rng.integers(0, distinct, (units, k))
    keys = np.concatenate([which[..., None], np.zeros((units, k, 6), np.int64)], axis=-1)
    work = WorkDir(folder / "crop.work", "crop", {})
    with work.write(work.chunk_name(0)) as f:
        write_patches(f, "late", "patches", frames[which], keys)
    with h5py.File(folder / "crop.h5", "w") as f:
        work.assemble(f, skip=(FRAMES,))
    return folder / "crop.h5"


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--layer", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from pipeline.patch_frames import read_frames

    with tempfile.TemporaryDirectory() as tmp:
        path = args.run / "results.h5" if args.run else synthetic(Path(tmp))
        with h5py.File(path, "r") as f:
            layers = f["layers"]
            name = args.layer or max(layers, key=lambda n: layers[n]["patches"].shape[0] if "patches" in layers[n]
                                     else 0)

            def ds():  # opened each time, as each reader of the report opens it
                return f["layers"][name]["patches"]

            c, k = ds().shape[:2]
            stored = read_frames(ds(), 0, c, 0, k)
            if stored is None:
                sys.exit(f"{name}: no slot tables (a crop stage run before they were written): nothing to compare")
            same = np.array_equal(stored[0][stored[1]], ds()[()])
            spans = [(c0, min(c, c0 + 320)) for c0 in range(0, c, 320)]
            rows = {
                "whole layer": (timed(lambda: ds()[()], args.repeat), timed(lambda: read_frames(ds(), 0, c, 0, k),
                                                                             args.repeat)),
                "320-unit spans": (timed(lambda: [ds()[a:b] for a, b in spans], args.repeat),
                                   timed(lambda: [read_frames(ds(), a, b, 0, k) for a, b in spans], args.repeat)),
            }
    print(f"layer {name}: {c} units x {k} slots, {len(stored[0])} distinct patches; same array: {same}")
    for what, (base, now) in rows.items():
        print(f"{what:15s} virtual dataset (baseline) {base:.3f} s, frames and slot table {now:.3f} s: "
              f"{base / now:.1f}x faster")


if __name__ == "__main__":
    main()
