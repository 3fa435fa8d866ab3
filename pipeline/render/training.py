"""Figures of a network trained in the run: the training curve, feature evolution
sheets and the top-k change between snapshots, invariance curves and the
correspondence scores (Zeiler & Fergus 2013, figures 4, 5 and 8 and table 1's curve).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from pipeline.names import shown
from pipeline.render.canvas import (
    BACKGROUND,
    Label,
    draw_labels,
    montage,
    resize_patches,
)
from pipeline.render.results import as_str
from pipeline.store import replacing

logger = logging.getLogger(__name__)

AXIS_LABEL = {"translation": "vertical shift (fraction of image height)", "rotation": "rotation (degrees)",
              "scale": "scale factor"}


def draw_training_curve(history: dict, snapshots: list[int], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, training and validation; snapshot epochs marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = np.asarray(history["epoch"])
    fig = Figure(figsize=(7.2, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, history[key], "o-", color="#1f5fa8", ms=3.5, lw=1.4, label="training")
        val = np.asarray(history[f"val_{key}"], float)
        if np.isfinite(val).any():
            ax.plot(epochs, val, "s--", color="#d0621b", ms=3.5, lw=1.4, label="validation")
        for e in snapshots:
            if e >= 1:
                ax.axvline(e, color="0.75", lw=0.8, ls=":", zorder=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_xlim(0.5, max(epochs.max(), 1) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.25, lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].legend(frameon=False, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_pdf(fig, path)


def display_size(hw: tuple[int, int], target: int) -> tuple[int, int]:
    h, w = hw
    longest = max(h, w)
    if longest <= target:
        f = max(1, target // longest)
        return h * f, w * f
    return max(1, round(h * target / longest)), max(1, round(w * target / longest))



def compose_evolution_sheet(patches: np.ndarray, valid: np.ndarray, epochs, channels, title: str,
                            subtitle: str = "") -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A sheet with channels in rows and snapshots in columns.

    patches (E, n, P, h, w, 3) uint8: the top-P patches of n channels at E snapshots;
    valid (E, n, P) bool. Each cell is the top-1 patch (P = 1) or a square montage
    of the top P, enlarged by a whole factor (or shrunk) to a readable size.
    Returns (sheet (H, W, 3) uint8, origins (n, E, 2) top-left of every cell, cell (h, w)).
    """

    e, n, p, h, w = patches.shape[:5]
    side = max(1, math.ceil(math.sqrt(p)))
    size = display_size((h, w), 64 if side == 1 else 26)
    small = resize_patches(patches.reshape((e * n, p, h, w, 3)), size)
    thin = 1 if side > 1 else 0
    cells = montage(small, valid.reshape(e * n, p), side, thin)
    cells = cells.reshape((e, n) + cells.shape[1:])
    ch, cw = cells.shape[2:4]
    gap, margin, label_w, header_h = max(4, cw // 10), 20, 64, 26
    title_h = 64 if subtitle else 40
    grid_w = e * cw + (e - 1) * gap
    width = max(2 * margin + label_w + grid_w, 420)
    height = 2 * margin + title_h + header_h + n * ch + (n - 1) * gap
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    left = margin + label_w + (width - 2 * margin - label_w - grid_w) // 2
    top = margin + title_h + header_h
    origins = np.zeros((n, e, 2), np.int64)
    for r in range(n):
        for c in range(e):
            y, x = top + r * (ch + gap), left + c * (cw + gap)
            canvas[y:y + ch, x:x + cw] = cells[c, r]
            origins[r, c] = (y, x)
    labels = [Label(width / 2, margin + 16, title, 20, weight="bold", color="black")]
    if subtitle:
        labels.append(Label(width / 2, margin + 44, subtitle, min(13, 0.9 * width / (0.6 * len(subtitle))),
                            color="0.3"))
    labels += [Label(left + c * (cw + gap) + cw / 2, top - header_h / 2, f"epoch {int(ep)}", 13, color="0.15")
               for c, ep in enumerate(epochs)]
    labels += [Label(margin + label_w / 2, top + r * (ch + gap) + ch / 2, f"ch {int(k)}", 13, color="0.15")
               for r, k in enumerate(channels)]
    return draw_labels(canvas, labels), origins, (ch, cw)



def draw_change(epochs, changes: dict[str, np.ndarray], path: Path, images: int, k: int) -> None:
    """Mean (line) and interquartile range (band) over channels of the top-k change, per layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [int(e) for e in epochs]
    fig = Figure(figsize=(5.6, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(1, len(epochs))
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    colors = [cmap(v) for v in np.linspace(0.0, 0.85, max(len(changes), 1))]
    for color, (name, change) in zip(colors, changes.items()):
        ax.plot(x, change.mean(axis=1), "o-", color=color, lw=1.6, ms=4, label=name)
        q1, q3 = np.percentile(change, [25, 75], axis=1)
        ax.fill_between(x, q1, q3, color=color, alpha=0.15, lw=0)
    ax.set_xticks(x, [f"{a}\u2192{b}" for a, b in zip(epochs[:-1], epochs[1:])])
    ax.set_xlim(0.6, max(len(epochs) - 1, 1) + 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("snapshot epochs")
    ax.set_ylabel(f"share of top-{k} images replaced")
    ax.set_title(f"Top-{k} turnover between snapshots ({images} images)", fontsize=10)
    ax.grid(alpha=0.25, lw=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize=8, loc="upper right", title="layer (mean, IQR)", title_fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_pdf(fig, path)


def draw_invariance(curves, grids, names, ids, target_names, target_is_label, path: Path,
                    model_name: str = "") -> None:
    """Rows: the kinds of `grids` (vertical shift, rotation, scale). Columns: examples of the first image, the
    distance of each layer's feature vector to the original's, the probability of the
    true class. One curve per image."""
    kinds = list(grids)
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = len(names) + 2
    fig = Figure(figsize=(2.35 * cols, 2.2 * len(kinds) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(kinds), cols, squeeze=False)
    colors = matplotlib.colormaps["tab10"](np.arange(len(ids)) % 10)
    handles = []
    for r, kind in enumerate(kinds):
        distance, _, probability, _, frames = curves[kind]
        values, identity = grids[kind]
        ax = axes[r, 0]
        picks = np.unique(np.round(np.linspace(0, len(values) - 1, 5)).astype(int))
        strip = np.concatenate([np.pad(frames[0, p], ((1, 1), (1, 1), (0, 0)), constant_values=255)
                                for p in picks], axis=1)
        ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        width = frames.shape[3] + 2
        ax.set_xticks((np.arange(len(picks)) + 0.5) * width - 0.5, [f"{values[p]:.3g}" for p in picks],
                      fontsize=7)
        ax.set_yticks([])
        ax.set_xlabel(AXIS_LABEL[kind], fontsize=7)
        for spine in ax.spines.values():
            spine.set_visible(False)
        for c, name in enumerate(names, 1):
            ax = axes[r, c]
            for i in range(len(ids)):
                ax.plot(values, distance[name][i], "-", color=colors[i], lw=1.2)
            if r == 0:
                ax.set_title(name, fontsize=9)
            if c == 1:
                ax.set_ylabel("Euclidean distance", fontsize=8)
        ax = axes[r, -1]
        for i in range(len(ids)):
            line, = ax.plot(values, probability[i], "-", color=colors[i], lw=1.2)
            if r == 0:
                handles.append((line, f"image {ids[i]}: {shown(target_names[i])}"
                                      f"{'' if target_is_label[i] else ' (predicted)'}"))
        ax.set_ylim(-0.03, 1.03)
        if r == 0:
            ax.set_title("P(true class)", fontsize=9)
        for ax in axes[r, 1:]:
            ax.axvline(values[identity], color="0.7", lw=0.8, ls=":", zorder=0)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.25, lw=0.5)
            ax.spines[["top", "right"]].set_visible(False)
            ax.set_xlabel(AXIS_LABEL[kind], fontsize=7)
    fig.legend([h for h, _ in handles], [t for _, t in handles], loc="outside lower center",
               ncol=min(len(handles), 4), frameon=False, fontsize=8)
    if model_name:
        fig.suptitle(f"Invariance of {model_name}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_pdf(fig, path)


def draw_correspondence(parts, layers, scores, random_scores, path: Path, images: int) -> None:
    """Grouped bars per layer: each part, and the random boxes of its size (mean, sd)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.5, 1.1 * len(layers) + 1.5), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(layers))
    width = 0.8 / (2 * len(parts))
    cmap = matplotlib.colormaps["tab10"]
    for p, name in enumerate(parts):
        offset = (2 * p - len(parts) + 0.5) * width
        ax.bar(x + offset, scores[p], width, color=cmap(p), label=name)
        if random_scores.shape[1]:
            ax.bar(x + offset + width, random_scores[p].mean(axis=0), width, color=cmap(p), alpha=0.35,
                   yerr=random_scores[p].std(axis=0), capsize=2, error_kw=dict(lw=0.8),
                   label=f"{name}: random place")
    ax.set_xticks(x, layers)
    ax.set_ylabel("sign disagreement (lower: consistent)")
    ax.set_title(f"Correspondence of occluded parts over {images} images", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.25, lw=0.6)
    ax.legend(frameon=False, fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png_pdf(fig, path)


def save_png_pdf(fig, path: Path) -> None:
    """The figure as `path` (PNG) and beside it as PDF, each renamed into place when complete."""
    for target, options in ((path, dict(dpi=200)), (path.with_suffix(".pdf"), {})):
        with replacing(target) as tmp:
            fig.savefig(tmp, **options)


# ----------------------------------------------------------------------------
# drawn from the stage's group alone (its part, or results.h5): the stage draws them after
# writing its part, and the report stage draws them again when missing or stale

TRAINING_CURVE = Path("sheets") / "training_curve.png"
INVARIANCE = Path("sheets") / "invariance.png"
CORRESPONDENCE = Path("sheets") / "correspondence.png"
EVOLUTION_DIR = Path("sheets") / "evolution"
CHANGE_FIGURE = "topk_change.png"


def training_curve_sheet(f, run_dir: Path) -> list[Path]:
    """sheets/training_curve.png and .pdf from train/."""
    g = f["train"]
    history = {key: g[key][()] for key in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy")}
    path = Path(run_dir) / TRAINING_CURVE
    draw_training_curve(history, g["snapshot_epoch"][()].tolist(), path,
                        title=f"{as_str(g.attrs['model'])}: {len(g['train_ids'])} training, "
                              f"{len(g['val_ids'])} validation images")
    return [path, path.with_suffix(".pdf")]


def invariance_sheet(f, run_dir: Path) -> list[Path]:
    """sheets/invariance.png and .pdf from invariance/: the curves of every stored kind and the
    transformed first image."""
    import json

    from pipeline.store import read_strings, stored_name

    g = f["invariance"]
    names = json.loads(as_str(g.attrs["layers"]))
    curves, grids = {}, {}
    for kind in (k for k in AXIS_LABEL if k in g):  # the stage's order of kinds
        k = g[kind]
        distance = {name: k["distance"][stored_name(name)][()] for name in names}
        curves[kind] = (distance, None, k["probability"][()], None, k["pixels"][:1])  # the first image's frames
        grids[kind] = (k["values"][()], int(k.attrs["identity"]))
    path = Path(run_dir) / INVARIANCE
    draw_invariance(curves, grids, names, g["images"][()], read_strings(g["target_name"]),
                    g["target_is_label"][()], path, as_str(g.attrs["model"]))
    return [path, path.with_suffix(".pdf")]


def correspondence_sheet(f, run_dir: Path) -> list[Path]:
    """sheets/correspondence.png and .pdf from correspondence/."""
    import json

    g = f["correspondence"]
    path = Path(run_dir) / CORRESPONDENCE
    draw_correspondence(json.loads(as_str(g.attrs["parts"])), json.loads(as_str(g.attrs["layers"])),
                        g["score"][()], g["random_score"][()], path, len(g["images"]))
    return [path, path.with_suffix(".pdf")]


def evolution_sheets(f, run_dir: Path) -> list[Path]:
    """sheets/evolution/<layer>.png (the drawn channels' stored patches, snapshots in columns)
    and, with two snapshots or more, topk_change.png and .pdf, from evolution/."""
    import h5py
    from PIL import Image

    g = f["evolution"]
    epochs = g["epochs"][()]
    count, k, p = int(g.attrs["images"]), int(g.attrs["k"]), int(g.attrs["drawn_patches"])
    layers = sorted((sub for sub in g.values() if isinstance(sub, h5py.Group)),
                    key=lambda sub: int(sub.attrs["depth"]))
    written, changes = [], {}
    for sub in layers:
        name, rows = as_str(sub.attrs["name"]), sub["channels"][()]
        # one channel at a time: the stored patches of every channel may not fit in memory
        patches = np.stack([sub["patches"][:, int(r), :p] for r in rows], axis=1) if len(rows) else \
            np.zeros(sub["patches"].shape[:1] + (0, p) + sub["patches"].shape[3:], np.uint8)
        valid = sub["topk/image"][()][:, rows, :p] >= 0
        sheet, _, _ = compose_evolution_sheet(
            patches, valid, epochs, rows, name,
            f"top-{p} patch{'es' if p > 1 else ''} of {len(rows)} channels over {count} images, per snapshot")
        path = Path(run_dir) / EVOLUTION_DIR / f"{sub.name.rsplit('/', 1)[-1]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            Image.fromarray(sheet).save(tmp, format="PNG", compress_level=1, dpi=(150, 150))
        written.append(path)
        changes[name] = sub["change"][()]
    if len(epochs) > 1:
        path = Path(run_dir) / EVOLUTION_DIR / CHANGE_FIGURE
        draw_change(epochs, changes, path, count, k)
        written += [path, path.with_suffix(".pdf")]
    return written


# stage -> (what its group must hold for the drawing: older versions' parts lack it, the
# function that draws its figures into the run directory and returns their paths)
FIGURES = {"train": ("model", training_curve_sheet), "invariance": ("target_name", invariance_sheet),
           "correspondence": ("score", correspondence_sheet), "evolution": ("drawn_patches", evolution_sheets)}
