"""Speed of the unit cards and of their text: the cards' own glyph renderer against
Pillow's text layout (ImageFont, the same DejaVu Sans file), on the strings a card draws.

    python benchmarks/card_text.py [--repeats 20]

Prints cards per second of `render_layer_cards` on a synthetic layer (the test suite's
results file), then the time to draw a set of card strings (Latin and CJK) from a cold
cache with each text renderer, and their ratio (Pillow / cards).
Target: the cards keep their speed; the text of a card costs well under a millisecond.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

STRINGS = [f"{k + 1}  {0.5 + k / 7:.3f}  #{k * 37}  {label}  {name}"
           for k in range(9) for label, name in (("cat", f"img_{k:04d}.png"), ("dog", f"IMG_20240{k}.jpg"),
                                                 ("猫", "写真.png"))]


def cards_per_second(repeats: int) -> tuple[float, int]:
    import test_cards
    from pipeline.render.cards import render_layer_cards
    from pipeline.render.results import read_layers

    units = test_cards.C
    best = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        results = test_cards.write_results(Path(tmp) / "results.h5")
        for r in range(repeats):
            with h5py.File(results, "r") as f:
                info = read_layers(f)[0]
                started = time.perf_counter()
                render_layer_cards(f, info, Path(tmp) / f"cards{r}", Path(tmp) / f"thumbs{r}")
                best = max(best, units / (time.perf_counter() - started))
    return best, units


def glyph_text(size: int) -> float:
    from pipeline.render import text

    text.font.cache_clear()
    text._mask.cache_clear()
    text._fitted.cache_clear()
    canvas = np.full((40, 600, 3), 255, np.uint8)
    started = time.perf_counter()
    for s in STRINGS:
        text.draw_text(canvas, s, 2, 2, size)
    return time.perf_counter() - started


def pillow_text(size: int) -> float:
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    from pipeline.render.fonts import fallback_files

    started = time.perf_counter()
    # Pillow has no per-character fallback: each run of CJK needs its own font object
    latin = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    cjk = ImageFont.truetype(fallback_files()[0], size) if fallback_files() else latin
    img = Image.new("RGB", (600, 40), "white")
    draw = ImageDraw.Draw(img)
    for s in STRINGS:
        x = 2
        for ch in s:
            f = cjk if ord(ch) > 0x2E80 else latin
            draw.text((x, 2), ch, font=f, fill=(0, 0, 0))
            x += f.getlength(ch)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    rate, units = cards_per_second(args.repeats)
    print(f"cards: {rate:.0f} cards/s ({units} units, best of {args.repeats} renderings)")
    try:
        glyph = min(glyph_text(11) for _ in range(args.repeats))
    except RuntimeError as e:  # a renderer without fallback fonts
        print(f"text: the cards' glyph renderer cannot draw these strings ({e})")
        return
    pillow = min(pillow_text(11) for _ in range(args.repeats))
    print(f"text, {len(STRINGS)} card strings from a cold cache: cards' glyph renderer {glyph * 1e3:.1f} ms, "
          f"Pillow {pillow * 1e3:.1f} ms, ratio {pillow / glyph:.2f}")


if __name__ == "__main__":
    main()
