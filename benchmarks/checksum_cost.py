"""What the checksums of parts, chunks and checkpoints cost.

A file of each size is written as every part, chunk and scan checkpoint is (built in
memory by h5py, then a temporary name, fsync, rename: `pipeline.store.atomic_h5`), once
without and once with its checksum (CRC-32 of the in-memory image, and the sidecar).
Printed per size: the best of --rounds for either (alternating), their ratio, the CRC-32
alone as a share of the write, and what a resume pays to verify the file (one read, from
the page cache here).

40 MiB is about a scan checkpoint of the default layers of MobileNetV2 (2,288 channels)
on ImageNet: the class-conditional sums, 2,288 x 1,000 classes x 16 bytes, dominate it.

    python benchmarks/checksum_cost.py [--mib 1 40 256] [--rounds 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best_writes(folder: Path, array, rounds: int) -> tuple[float, float]:
    """Best seconds of a write without and with the checksum, alternating (the load of a
    shared machine drifts; alternating spreads it over both)."""
    from pipeline.store import atomic_h5

    times = {False: [], True: []}
    for _ in range(rounds):
        for checked in (False, True):
            started = time.perf_counter()
            with atomic_h5(folder / f"{checked}.h5", checked=checked) as f:
                f["state"] = array
            times[checked].append(time.perf_counter() - started)
    return min(times[False]), min(times[True])


def best_crc(path: Path, rounds: int) -> float:
    """Best seconds of the CRC-32 alone, over the bytes written (in memory)."""
    import zlib

    data = path.read_bytes()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        zlib.crc32(data)
        times.append(time.perf_counter() - started)
    return min(times)


def best_verify(path: Path, rounds: int) -> float:
    from pipeline import store

    times = []
    for _ in range(rounds):
        store._trusted.clear()  # as a resumed process: nothing it wrote itself
        started = time.perf_counter()
        assert store.damage(path) is None
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=float, nargs="+", default=[1, 40, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for mib in args.mib:
            array = rng.random(int(mib * 2**20) // 8)
            without, with_sum = best_writes(Path(tmp), array, args.rounds)
            checked = Path(tmp, "True.h5")
            crc, verify = best_crc(checked, args.rounds), best_verify(checked, args.rounds)
            print(f"{mib:7.1f} MiB: write {without * 1000:7.1f} ms, with checksum {with_sum * 1000:7.1f} ms "
                  f"(ratio {with_sum / without:.2f}; the CRC-32 alone {crc * 1000:.1f} ms = {crc / without:.1%} "
                  f"of the write); verify on resume {verify * 1000:.1f} ms")


if __name__ == "__main__":
    main()
