"""Merging many shards of an ImageNet-sized scan: seconds and peak memory, against the
unsharded scan of the same images measured in the same run.

1,281,167 synthetic 16x16 images (one IDX file) go through a tiny model: once unsharded
(the baseline), and as S shards for each --shards S (the shard scans are inputs only:
they run in one process, untimed). Each merge then runs in its own process, as
`python run.py stages=[merge] merge.inputs=[...]` would, and is timed, with its peak
RSS; a second run of the same merge must skip (idempotent). Printed per S: merge
seconds and their ratio to the unsharded scan's, peak RSS and its ratio to the
unsharded scan's, and whether the merged tables equal the unsharded ones.

    python benchmarks/merge_shards.py [--images 1281167] [--shards 8 64] [--batch 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale_store import LAYERS, run_child as _run_child, write_idx, write_model  # noqa: E402


def config(tmp: Path, batch: int, *extra: str):
    from hydra import compose, initialize_config_dir

    import pipeline.config  # noqa: F401

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=unit", "dataset=idx",
            f"dataset.path={tmp / 'train-images-idx3-ubyte'}", f"layers=[{','.join(LAYERS)}]",
            f"batch_size={batch}", "topk=9", *extra])


def child(kind: str, tmp: str, batch: str, *args: str) -> None:
    import logging

    from pipeline.runner import run

    logging.getLogger("pipeline").setLevel(logging.WARNING)
    tmp_path, batch = Path(tmp), int(batch)
    started = time.perf_counter()
    result = {}
    if kind == "scans":  # the unsharded scan (timed: the baseline), then the merges' inputs
        run(config(tmp_path, batch, "stages=[scan]"), tmp_path / "single")
        result["seconds"] = time.perf_counter() - started
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for count in map(int, args):
            for i in range(count):
                run(config(tmp_path, batch, "stages=[scan]", f"shard.count={count}", f"shard.index={i}"),
                    tmp_path / f"shards{count}" / str(i))
    else:  # merge
        count = int(args[0])
        run_dir = tmp_path / f"merged{count}"
        cfg = config(tmp_path, batch, "stages=[merge]", f"merge.inputs=[{tmp_path / f'shards{count}'}/*]")
        run(cfg, run_dir)
        result["seconds"] = time.perf_counter() - started
        again = time.perf_counter()
        run(cfg, run_dir)  # the same merge again: skipped
        result["rerun_seconds"] = time.perf_counter() - again
    result.setdefault("seconds", time.perf_counter() - started)
    result.setdefault("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(result))


def run_child(*args) -> dict:
    return _run_child(*args, script=__file__)


def same_tables(a: Path, b: Path) -> bool:
    import h5py
    import numpy as np

    with h5py.File(a / "results.h5", "r") as fa, h5py.File(b / "results.h5", "r") as fb:
        if not np.array_equal(fa["images/ok"][()], fb["images/ok"][()]):
            return False
        for layer in LAYERS:
            for key in ("value", "image", "y", "x"):
                if not np.array_equal(fa[f"layers/{layer}/topk/{key}"][()], fb[f"layers/{layer}/topk/{key}"][()]):
                    return False
            for key in ("zeros", "spectrum"):  # counts: exact
                if not np.array_equal(fa[f"layers/{layer}/stats/{key}"][()], fb[f"layers/{layer}/stats/{key}"][()]):
                    return False
            # sums of float32 batch sums: other batch boundaries round differently in the last bits
            if not np.allclose(fa[f"layers/{layer}/stats/total"][()], fb[f"layers/{layer}/stats/total"][()],
                               rtol=1e-5):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_281_167)
    parser.add_argument("--shards", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None, help="where the IDX file and runs go (a temp dir)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    tmp = Path(tempfile.mkdtemp(dir=args.workdir, prefix="merge_shards_"))
    try:
        write_idx(tmp / "train-images-idx3-ubyte", args.images)
        write_model(tmp / "tiny.keras")
        single = run_child("scans", tmp, args.batch, *args.shards)
        print(f"unsharded scan of {args.images:,} images: {single['seconds']:.1f} s, "
              f"peak RSS {single['peak_rss_mib']:.0f} MiB (the baseline)")
        for count in args.shards:
            merged = run_child("merge", tmp, args.batch, count)
            equal = same_tables(tmp / "single", tmp / f"merged{count}")
            print(f"{count:3d} shards: merge {merged['seconds']:.1f} s ({merged['seconds'] / single['seconds']:.2f}x "
                  f"the unsharded scan), rerun {merged['rerun_seconds']:.2f} s (skipped), peak RSS "
                  f"{merged['peak_rss_mib']:.0f} MiB ({merged['peak_rss_mib'] / single['peak_rss_mib']:.2f}x), "
                  f"merged == unsharded: {'yes' if equal else 'NO'}")
            shutil.rmtree(tmp / f"shards{count}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
