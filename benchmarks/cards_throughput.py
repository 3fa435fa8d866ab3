"""Unit cards per second and bytes per card: the cards as the report writes them (JPEG)
against a baseline measured in the same run, the same composed cards written as PNG
(zlib level 1 on 'up'-filtered rows, the format cards had before).

    python benchmarks/cards_throughput.py [--run RUN_DIR] [--layer NAME] [--units 256]

--run: a run directory (its results.h5; default: a synthetic layer of 256 units whose
top-9 share 300 distinct photo-like 64 px patches, as a late layer's winners do). Prints cards/s
and KiB per card for both, and their ratios (JPEG / PNG).
Target: the default job's report stage at most a quarter of the job; a card well under
150 KiB.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def png_bytes(image: np.ndarray) -> bytes:
    """The former card encoder: each row minus the row above, deflated at level 1."""
    h, w, c = image.shape
    rows = image.reshape(h, w * c)
    data = np.empty((h, w * c + 1), np.uint8)
    data[:, 0], data[0, 0], data[0, 1:] = 2, 0, rows[0]
    np.subtract(rows[1:], rows[:-1], out=data[1:, 1:])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"".join([b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
                     chunk(b"IDAT", zlib.compress(data.tobytes(), 1)), chunk(b"IEND", b"")])


def synthetic(path: Path, units: int) -> Path:
    rng = np.random.default_rng(0)
    k, side, distinct = 9, 64, 300
    from PIL import Image

    coarse = rng.integers(0, 256, (distinct, 8, 8, 3), dtype=np.uint8)  # photo-like: smooth shapes, some grain
    smooth = np.stack([np.asarray(Image.fromarray(c).resize((side, side), Image.BICUBIC)) for c in coarse])
    frames = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    which = rng.integers(0, distinct, (units, k))
    with h5py.File(path, "w") as f:
        f.attrs.update(model="synthetic", input_size=np.array([224, 224]), version="0")
        g = f.create_group("layers/late")
        g.attrs.update(name="late", shape=np.array([7, 7, units]), depth=0, rf_size=np.array([224, 224]),
                       rf_stride=np.array([32, 32]), mappable=True, geometry_message="")
        g["topk/value"] = np.sort(rng.random((units, k)).astype(np.float32), axis=1)[:, ::-1]
        g["topk/image"] = which
        g["topk/y"], g["topk/x"] = which // 7 % 7, which % 7
        g["topk/box"] = np.zeros((units, k, 4), np.int32) + np.array([0, 0, side, side], np.int32)
        g.create_dataset("patches", data=frames[which], chunks=(1, k, side, side, 3), compression="gzip")
        s = g.create_group("stats")
        s["mean"], s["max"] = rng.random(units).astype(np.float32), rng.random(units).astype(np.float32) + 1
        s["zero_fraction"] = rng.random(units).astype(np.float32)
    return path


def measure(results: Path, layer: str | None, units: int, out: Path, encode) -> tuple[float, float, int]:
    from pipeline.render import cards
    from pipeline.render.results import read_layers

    saved = cards.card_bytes
    cards.card_bytes = encode
    try:
        with h5py.File(results, "r") as f:
            infos = read_layers(f)
            info = next((i for i in infos if layer in (None, i.name, i.stored)), infos[0])
            todo = list(range(min(units, int(info.shape[-1]))))
            started = time.perf_counter()
            files = cards.render_layer_cards(f, info, out, None, units=todo)
            seconds = time.perf_counter() - started
    finally:
        cards.card_bytes = saved
    size = sum(p.stat().st_size for p in files.cards.values())
    return len(todo) / seconds, size / len(todo) / 1024, len(todo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--layer", default=None)
    parser.add_argument("--units", type=int, default=256)
    args = parser.parse_args()
    from pipeline.render import cards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = args.run / "results.h5" if args.run else synthetic(tmp / "results.h5", args.units)
        measure(results, args.layer, 8, tmp / "warm", cards.card_bytes)  # fonts and caches
        base = measure(results, args.layer, args.units, tmp / "png", png_bytes)
        now = measure(results, args.layer, args.units, tmp / "jpg", cards.card_bytes)
    print(f"baseline (PNG cards): {base[0]:.1f} cards/s, {base[1]:.1f} KiB a card ({base[2]} cards)")
    print(f"cards (JPEG):         {now[0]:.1f} cards/s, {now[1]:.1f} KiB a card")
    print(f"ratio: {now[0] / base[0]:.2f}x cards/s, {now[1] / base[1]:.2f}x bytes")


if __name__ == "__main__":
    main()
