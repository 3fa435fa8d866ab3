"""What the report shows of a network dissection (layers/<layer>/dissection, the dissect stage)."""

from __future__ import annotations

import numpy as np


def unit_title(group, unit: int) -> str:
    """The title-line words of a unit card: '  ·  red (IoU 0.31)' for a detector, the best
    IoU for another unit, '' for a layer not dissected."""
    d = group.get("dissection")
    if d is None or "label_iou" not in d:
        return ""
    iou = float(d["label_iou"][unit])
    if bool(d["detector"][unit]):
        return f"  \u00b7  {d['label_name'].asstr()[unit]} (IoU {iou:.2f})"
    return f"  \u00b7  no concept (best IoU {iou:.2f})"


def detectors_per_category(group) -> dict[str, int]:
    """Category -> number of unique concepts detected by the layer's units (the paper's count)."""
    d = group.get("dissection")
    if d is None or "detector" not in d:
        return {}
    detector = d["detector"][()]
    labels = d["label"][()][detector]
    categories = np.asarray(d["category"].asstr()[()], object)[detector]
    found: dict[str, set] = {}
    for label, category in zip(labels.tolist(), categories.tolist()):
        found.setdefault(category, set()).add(label)
    return {c: len(v) for c, v in sorted(found.items())}


def write_summary(index, out_dir) -> list:
    """dissection/detectors.png (unique detectors per category, one group of bars per layer,
    as the paper's figure 4) and dissection/detectors.csv (layer, category, unique concepts,
    detector units), from results.h5 `index`; returns the files written."""
    import csv
    from pathlib import Path

    import h5py
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with h5py.File(index, "r") as f:
        layers = sorted((k for k in f["layers"] if "dissection" in f[f"layers/{k}"]),
                        key=lambda k: int(f[f"layers/{k}/dissection"].attrs.get("depth", 0)))
        categories = sorted(set(f["dissection/concept_category"].asstr()[()]))
        for key in layers:
            g = f[f"layers/{key}"]
            if "detector" not in g["dissection"]:
                continue
            units = np.asarray(g["dissection/category"].asstr()[()], object)
            unique = detectors_per_category(g)
            rows += [(key, c, unique.get(c, 0), int((units == c).sum())) for c in categories]
    with open(out_dir / "detectors.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "category", "unique_concepts", "detector_units"])
        writer.writerows(rows)
    names = list(dict.fromkeys(r[0] for r in rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.2), dpi=100)
    width = 0.8 / max(1, len(categories))
    for j, c in enumerate(categories):
        ax.bar(np.arange(len(names)) + j * width, [r[2] for r in rows if r[1] == c], width, label=c)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("unique detectors")
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title("unique detectors per category (IoU above dissect.min_iou)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(out_dir / "detectors.png")
    plt.close(fig)
    return [out_dir / "detectors.csv", out_dir / "detectors.png"]
