"""What the report shows of a network dissection (layers/<layer>/dissection, the dissect stage).

    unit cards                 the title line: 'relu5 · unit 31 · red (IoU 0.31)'  (unit_title)
    report/<layer>.html        a 'unique detectors per category' figure
                               (report/dissection/<layer>.png, category_figure) and the
                               table of the layer's detector units, best IoU first
    index.html, report.pdf     'detectors by depth': unique detectors per category of every
                               dissected layer in network order (depth_figure, a run figure:
                               sheets/run/detectors.png and .pdf)
    dissection/detectors.png   the same figure, and detectors.csv, written by the dissect stage

A unit is a detector when its best IoU passes dissect.min_iou; a layer's unique detectors
in a category are the distinct concepts of that category its detectors are labelled with
(the count of the paper's figures: ten units all labelled 'sky' are one unique detector).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.render.fonts import figure_fonts
from pipeline.render.results import as_str

FIGURE_DPI = 200  # the layer pages' figures (PNG)


def unit_words(group, unit: int) -> str:
    """'red (IoU 0.31)' for a detector, 'no concept (best IoU 0.02)' for another unit,
    '' for a layer not dissected (or one with thresholds only)."""
    d = group.get("dissection")
    if d is None or "label_iou" not in d:
        return ""
    iou = float(d["label_iou"][unit])
    if bool(d["detector"][unit]):
        return f"{d['label_name'].asstr()[unit]} (IoU {iou:.2f})"
    return f"no concept (best IoU {iou:.2f})"


def unit_title(group, unit: int) -> str:
    """The title-line words of a unit card: '  ·  red (IoU 0.31)' for a detector, the best
    IoU for another unit, '' for a layer not dissected."""
    words = unit_words(group, unit)
    return f"  \u00b7  {words}" if words else ""


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


@dataclass
class LayerDissection:
    """One dissected layer, as the report shows it."""

    stored: str
    name: str
    units: int  # channels of the layer
    categories: list[str]  # every category of the run's concept list (the figures' axis)
    unique: dict[str, int]  # category -> unique concepts detected
    # the detector units (unit, concept, category, IoU), best IoU first (ties: lower unit first)
    detectors: list[tuple[int, str, str, float]] = field(default_factory=list)
    min_iou: float = 0.0
    quantile: float = 0.0
    images: int = 0  # images dissected

    @property
    def concepts(self) -> int:
        return sum(self.unique.values())


def read_layer(f, stored: str) -> LayerDissection | None:
    """The dissection of layers/<stored> in an open results file (or the dissect stage's
    part file), None where the layer was not dissected or holds thresholds only."""
    g = f[f"layers/{stored}"]
    d = g.get("dissection")
    if d is None or "detector" not in d:
        return None
    detector = d["detector"][()]
    iou = d["label_iou"][()]
    units = np.flatnonzero(detector)
    units = units[np.lexsort((units, -iou[units]))]
    names, categories = d["label_name"].asstr()[()], d["category"].asstr()[()]
    a = f["dissection"].attrs if "dissection" in f else {}
    return LayerDissection(
        stored=stored, name=as_str(g.attrs.get("name", stored)),
        units=len(detector), categories=run_categories(f), unique=detectors_per_category(g),
        detectors=[(int(u), str(names[u]), str(categories[u]), float(iou[u])) for u in units],
        min_iou=float(d.attrs.get("min_iou", 0.0)), quantile=float(d.attrs.get("quantile", 0.0)),
        images=int(a.get("images", 0)))


def run_categories(f) -> list[str]:
    """The concept list's categories, sorted (one order and one colour each in every figure)."""
    if "dissection/concept_category" not in f:
        return []
    return sorted(set(f["dissection/concept_category"].asstr()[()]))


def read_run(f) -> list[LayerDissection]:
    """Every dissected layer of an open results file, in network order."""
    if "layers" not in f:
        return []

    def depth(key):
        g = f[f"layers/{key}"]
        return int(g.attrs.get("depth", g["dissection"].attrs.get("depth", 0)))

    keys = sorted((k for k in f["layers"] if "dissection" in f[f"layers/{k}"]), key=depth)
    return [layer for layer in (read_layer(f, k) for k in keys) if layer is not None]


# ----------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------

def _colours(categories: list[str]) -> dict[str, tuple]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {c: cmap(i % 10) for i, c in enumerate(categories)}


def _style(ax) -> None:
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    import matplotlib.ticker

    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def category_figure(layer: LayerDissection):
    """A layer's unique detectors per category: one bar per category of the concept list,
    its count above it (the paper's figure 4, for one layer)."""
    from matplotlib.figure import Figure

    with figure_fonts():
        cats = layer.categories or sorted(layer.unique)
        colours = _colours(cats)
        fig = Figure(figsize=(max(4.0, 0.7 * len(cats) + 2.2), 3.2), layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(len(cats))
        counts = [layer.unique.get(c, 0) for c in cats]
        bars = ax.bar(x, counts, 0.55, color=[colours[c] for c in cats])
        ax.set_xlim(-0.7, len(cats) - 0.3)
        ax.bar_label(bars, fontsize=8, padding=2)
        ax.set_xticks(x, cats, rotation=30 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
        ax.set_ylim(0, max(counts + [1]) * 1.18)
        ax.set_xlabel("concept category", fontsize=9)
        ax.set_ylabel("unique detectors (concepts)", fontsize=9)
        _style(ax)
        fig.suptitle(f"Unique detectors per category: {layer.name}", fontsize=10)
        ax.set_title(f"{len(layer.detectors)} of {layer.units} units are detectors (IoU > {layer.min_iou:g}) "
                     f"of {layer.concepts} concepts", fontsize=8, color="0.3")
    return fig


def depth_figure(layers: list[LayerDissection], model: str = ""):
    """Unique detectors per category of each dissected layer in network order: stacked bars
    (a category's concepts are its own, so the stack is the layer's unique concepts), the
    total above each bar."""
    from matplotlib.figure import Figure

    with figure_fonts():
        cats = (layers[0].categories if layers else []) or sorted({c for layer in layers for c in layer.unique})
        colours = _colours(cats)
        n = len(layers)
        fig = Figure(figsize=(max(5.5, 0.6 * n + 3.0), 4.2), layout="constrained")
        ax = fig.add_subplot()
        x = np.arange(n)
        bottom = np.zeros(n)
        for c in cats:
            counts = np.array([layer.unique.get(c, 0) for layer in layers], float)
            ax.bar(x, counts, 0.55, bottom=bottom, color=colours[c], label=c)
            bottom += counts
        for xi, total in zip(x, bottom):
            ax.annotate(f"{int(total)}", (xi, total), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8)
        names = [layer.name for layer in layers]
        ax.set_xticks(x, names, rotation=35 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_xlim(-0.7, max(n, 1) - 0.3)
        ax.set_ylim(0, max(bottom.max(initial=0), 1) * 1.18)
        ax.set_xlabel("layer (input \u2192 output)", fontsize=9)
        ax.set_ylabel("unique detectors (concepts)", fontsize=9)
        _style(ax)
        if cats:
            ax.legend(title="category", fontsize=8, title_fontsize=8, frameon=False, loc="upper left",
                      bbox_to_anchor=(1.0, 1.0))
        min_iou = layers[0].min_iou if layers else 0.0
        ax.set_title(f"a unit detects its best concept where IoU > {min_iou:g}; each concept counted once a layer",
                     fontsize=8, color="0.3")
        fig.suptitle(f"Detectors by depth{': ' + model if model else ''}", fontsize=10)
    return fig


def run_figures(f, model: str = "") -> dict:
    """The report's run figure of a dissected run, name -> (title, function -> Figure)
    as render.report's run figures; {} where no layer was dissected."""
    layers = read_run(f)
    if not layers:
        return {}
    return {"detectors": ("Detectors by depth", partial(depth_figure, layers, model))}


def layer_pages(site, f, out_dir: Path) -> list[Path]:
    """Give each dissected layer of `site` (render.site.Site) its dissection and its
    figure, report/dissection/<layer>.png; returns the figures written."""
    from pipeline.render.canvas import save_figure

    by_key = {layer.stored: layer for layer in read_run(f)}
    written = []
    for layer in site.layers:
        d = by_key.get(layer.stored)
        if d is None:
            continue
        layer.dissection = d
        path = Path(out_dir) / "report" / "dissection" / f"{layer.stored}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        layer.dissection_figure = save_figure(category_figure(d), path, FIGURE_DPI)
        written.append(path)
    return written


def write_summary(index, out_dir) -> list:
    """dissection/detectors.png (depth_figure) and dissection/detectors.csv (layer,
    category, unique concepts, detector units), from results.h5 `index`; returns the files
    written."""
    import csv

    import h5py

    from pipeline.render.canvas import save_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(index, "r") as f:
        layers = read_run(f)
    rows = [(layer.stored, c, layer.unique.get(c, 0), sum(1 for d in layer.detectors if d[2] == c))
            for layer in layers for c in layer.categories]
    with open(out_dir / "detectors.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", "category", "unique_concepts", "detector_units"])
        writer.writerows(rows)
    save_figure(depth_figure(layers), out_dir / "detectors.png", 150)
    return [out_dir / "detectors.csv", out_dir / "detectors.png"]
