"""Per-image sheets: the photo as the model saw it, the stored predictions, the CAM
maps, the occlusion maps and activation grids of one image, as a matplotlib figure.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing, input_box
from pipeline.render.draw import CAM_TITLES, open_photo
from pipeline.render.maps import occlusion_panels, stored_maps
from pipeline.names import shown
from pipeline.render.results import as_str, label_name, stored_exif
from pipeline.store import read_path

logger = logging.getLogger(__name__)


ACTIVATION_GRID = 16  # channels per activation grid on a per-image sheet (4 x 4)


def model_view(path: str, spec: dict, exif: bool = True) -> np.ndarray | None:
    """The photo as the model saw it (upright, resize, centre crop; before normalisation),
    uint8 RGB, or None when the file cannot be opened (moved, an array dataset). Only the
    window under the crop is resampled (Pillow's `box`): bounded for any aspect ratio."""
    try:
        model_spec = Preprocessing(**spec)
    except (TypeError, PipelineError):  # not stored, or by another version: the photo as it is
        return open_photo(path, exif)
    photo = open_photo(path, exif, model_spec)
    if photo is None:
        return None
    h, w = photo.shape[:2]
    if model_spec.resize == "exact":
        box = (0.0, 0.0, float(h), float(w))
    else:
        box = input_box(h, w, model_spec)
    size = (model_spec.width, model_spec.height)
    return np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR, box=(box[1], box[0], box[3], box[2]),
                                                     reducing_gap=3.0))


@dataclass
class PerImage:
    """The per-image groups of a results file, indexed by image id."""

    cam_rows: dict[int, np.ndarray]
    cam_methods: list[str]
    occlusion_row: dict[int, int]
    activation_row: dict[int, int]
    activation_layers: list[tuple[str, str]]  # (dataset key, layer name)
    # methods that keep rows for the drawn images only (input-resolution maps):
    # method -> image id -> its row of the first target
    cam_drawn: dict[str, dict[int, int]] = None

    @classmethod
    def read(cls, f: h5py.File) -> "PerImage":
        cam_rows, methods, drawn = {}, [], {}
        if "cam" in f and "image" in f["cam"]:
            g = f["cam"]
            ids = g["image"][()]
            order = np.argsort(ids, kind="stable")
            uniq, start = np.unique(ids[order], return_index=True)
            for i, s, e in zip(uniq, start, list(start[1:]) + [len(ids)]):
                cam_rows[int(i)] = order[s:e]
            listed = json.loads(as_str(g.attrs.get("methods", "[]")) or "[]")
            methods = [m for m in listed if m in g and "map" in g[m]]
            for m in methods:
                if "image" in g[m]:
                    image, rank = g[m]["image"][()], g[m]["rank"][()]
                    drawn[m] = {}
                    for row in np.lexsort((-rank, image)):  # the last write per image is its rank 0
                        drawn[m][int(image[row])] = int(row)
        occ = {}
        if "occlusion" in f and "image" in f["occlusion"]:
            occ = {int(i): r for r, i in enumerate(f["occlusion/image"][()])}
        act, layers = {}, []
        if "activations" in f and "image" in f["activations"]:
            g = f["activations"]
            act = {int(i): r for r, i in enumerate(g["image"][()])}
            found = [(key, as_str(d.attrs.get("name", key)), int(d.attrs.get("depth", 0)))
                     for key, d in g.items() if isinstance(d, h5py.Dataset) and d.ndim == 4]
            layers = [(key, name) for key, name, _ in sorted(found, key=lambda t: (t[2], t[0]))]
        return cls(cam_rows, methods, occ, act, layers, drawn)

    def ids(self) -> list[int]:
        return sorted(set(self.cam_rows) | set(self.occlusion_row) | set(self.activation_row))

    def cam_row(self, method: str, image_id: int) -> int | None:
        """The row of cam/<method> with the image's first target, or None when not stored."""
        own = (self.cam_drawn or {}).get(method)
        if own is not None:
            return own.get(image_id)
        rows = self.cam_rows.get(image_id)
        return None if rows is None else int(rows[0])

    def aligned_methods(self) -> list[str]:
        """Methods with a row for every cam/image row (maps at the target layer)."""
        return [m for m in self.cam_methods if m not in (self.cam_drawn or {})]



def _blank(maps: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (C,) bool: channels constant over the map."""
    return (maps.max(axis=(0, 1)) - maps.min(axis=(0, 1))) == 0


def image_sheet(f: h5py.File, pi: PerImage, image_id: int, names, spec: dict, dpi: int) -> tuple[Figure, list[str]]:
    """The per-image sheet of one image as a Figure, and what it lacks."""
    from pipeline.render import draw

    path = read_path(f["images"], image_id)
    size = (int(spec.get("height") or 224), int(spec.get("width") or 224))
    photo = model_view(path, spec, stored_exif(f.attrs))
    missing = []
    if photo is None:
        missing.append("the photo (file not readable; maps drawn without it)")
    grey = photo if photo is not None else np.full(size + (3,), 200, np.uint8)
    label = int(f["images/label"][image_id]) if "images/label" in f else -1

    cam_rows = pi.cam_rows.get(image_id)
    occ_row = pi.occlusion_row.get(image_id)
    act_row = pi.activation_row.get(image_id)
    act_layers = pi.activation_layers if act_row is not None else []
    rows = ["top"]
    if cam_rows is not None and pi.cam_methods:
        rows.append("cam")
    else:
        missing.append("Grad-CAM maps (stages=[cam])")
    if occ_row is not None:
        rows.append("occlusion")
    else:
        missing.append("occlusion maps (occlusion.images)")
    act_rows = math.ceil(len(act_layers) / 4)
    rows += ["activations"] * act_rows
    if act_row is None:
        missing.append("activation grids (activations.images)")
    heights = {"top": 2.5, "cam": 2.25, "occlusion": 2.35, "activations": 2.25}
    width = 8.27
    # a fixed layout in inches: matplotlib's constrained layout measured every tick label
    # and title again for each sheet, about half of its time
    fig = Figure(figsize=(width, 0.55 + sum(heights[r] for r in rows) + (0.35 if missing else 0)), dpi=dpi)
    row = _Rows(fig, 0.55)
    title = f"image #{image_id}: {shown(Path(path).name)}"
    if label >= 0:
        title += f"  (label: {label_name(f, label)})"
    fig.suptitle(title, fontsize=11, weight="bold", y=1 - 0.12 / fig.get_figheight(), va="top")

    # photo and predictions
    top = row.next(heights["top"])
    ax_photo = row.axes(top, 0.3, 0.1, [(SIDE, 2.3)])[0]
    ax_pred = row.axes(top, 0.3, 0.5, [(4.2, width - SIDE - 4.2)])[0]
    ax_photo.imshow(grey)
    ax_photo.set_title("as the model sees it" if photo is not None else "photo not readable", fontsize=8)
    ax_photo.set_axis_off()
    _predictions(ax_pred, f, image_id, cam_rows, occ_row, pi, names)

    if "cam" in rows:
        g = f["cam"]
        methods = pi.cam_methods
        band = row.next(heights["cam"], f"class activation maps at {as_str(g.attrs.get('layer', '?'))}")
        for ax, m in zip(row.axes(band, 0.62, 0.1, row.even(len(methods))), methods):
            r = pi.cam_row(m, image_id)
            ax.set_axis_off()
            if r is None:
                ax.set_title(CAM_TITLES.get(m, m), fontsize=7)
                ax.text(0.5, 0.5, "stored for the drawn\nimages only (cam.draw)", ha="center", va="center",
                        fontsize=7, color="0.35", transform=ax.transAxes)
                continue
            one = stored_maps(g[m], [r])[0]
            cls, score = int(g[m]["class"][r]), float(g[m]["score"][r])
            if m == "guided_gradcam":
                ax.imshow(draw.guided_image(one))
            else:
                ax.imshow(draw.overlay(grey, one))
            draw.mark_zero(ax, m, one)
            ax.set_title(f"{CAM_TITLES.get(m, m)}\n{names(cls)[:26]} (logit {score:.2f})", fontsize=7)
    if "occlusion" in rows:
        g = f["occlusion"]
        osize, stride = int(g.attrs.get("size", 0)), int(g.attrs.get("stride", 0))
        backdrop = grey if grey.shape[:2] == size else np.asarray(Image.fromarray(grey).resize(size[::-1]))
        band = row.next(heights["occlusion"], f"occlusion sensitivity: grey square {osize} px, stride {stride} px")
        half = (width - 2 * SIDE - 0.6) / 2  # each half: the map, its colour bar and the bar's label
        axes = row.axes(band, 0.5, 0.1, [(SIDE, half - 0.55), (SIDE + half + 0.6, half - 0.55)])
        occlusion_panels(fig, axes, backdrop, g, occ_row, names(int(g["class"][occ_row])))
    if act_layers:
        g = f["activations"]
        for i in range(act_rows):
            chunk = act_layers[i * 4:(i + 1) * 4]
            band = row.next(heights["activations"],
                            "activations (each channel standardised; grey: constant)" if i == 0 else "")
            axes = row.axes(band, 0.62 if i == 0 else 0.4, 0.1, row.even(4))
            for ax, (key, lname) in zip(axes, chunk):
                h, w, c = g[key].shape[1:]
                n = min(c, ACTIVATION_GRID)
                maps = np.asarray(g[key][act_row, :, :, :n], np.float32)  # only the channels drawn, of up to 1,280
                tiles = draw.channel_tiles(maps, _blank(maps), max(32, h))
                ax.imshow(draw.tile(tiles, math.isqrt(ACTIVATION_GRID)), interpolation="nearest")
                ax.set_title(f"{lname}\nchannels 0-{n - 1} of {c} ({h}\u00d7{w})", fontsize=7)
                ax.set_axis_off()
            for ax in axes[len(chunk):]:
                ax.set_axis_off()
    if missing:
        fig.text(0.01, 0.004, "not in results.h5 for this image: " + "; ".join(missing), fontsize=6.5,
                 color="0.4", va="bottom")
    return fig, missing



SIDE = 0.3  # inches left and right of a sheet's panels


class _Rows:
    """The bands of a per-image sheet from the top down, in inches: each band's title, then
    its axes at fixed places (the figure's height is the sum of the bands)."""

    def __init__(self, fig: Figure, top: float):
        self.fig, self.y = fig, fig.get_figheight() - top
        self.width, self.height = fig.get_figwidth(), fig.get_figheight()

    def next(self, height: float, title: str = "") -> tuple[float, float]:
        """The next band (top, bottom), its title centred at its top."""
        top, self.y = self.y, self.y - height
        if title:
            self.fig.text(0.5, (top - 0.08) / self.height, title, fontsize=9, ha="center", va="top")
        return top, self.y

    def even(self, n: int, gap: float = 0.3) -> list[tuple[float, float]]:
        """(left, width) of n equal panels across the sheet."""
        w = (self.width - 2 * SIDE - (n - 1) * gap) / max(n, 1)
        return [(SIDE + i * (w + gap), w) for i in range(n)]

    def axes(self, band: tuple[float, float], head: float, foot: float, spans) -> list:
        """An axes per (left, width) in `band`, `head` inches below its top (the band's and the
        panels' titles) and `foot` above its bottom."""
        top, bottom = band
        y0, h = bottom + foot, top - head - bottom - foot
        return [self.fig.add_axes((x / self.width, y0 / self.height, w / self.width, h / self.height))
                for x, w in spans]


def _predictions(ax, f: h5py.File, image_id: int, cam_rows, occ_row, pi: PerImage, names) -> None:
    """Bar chart of the stored predictions: the model's top-5 (predictions/, written by the
    cam stage); in older files the cam stage's top-N classes (cam.target=top), else
    its explained class, with the occlusion stage's base probability where there is one."""
    ax.set_axis_off()
    rows = np.flatnonzero(f["predictions/image"][()] == image_id) if "predictions" in f else []
    if len(rows):
        g = f["predictions"]
        row = int(rows[0])
        classes, probability = g["class"][row], g["probability"][row]
        ax.set_axis_on()
        y = np.arange(len(classes))[::-1]
        ax.barh(y, probability, color="#4a6f9e", height=0.6)
        ax.set_yticks(y, [names(int(c))[:30] for c in classes], fontsize=7)
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlabel("probability", fontsize=7)
        ax.set_title(f"top-{len(classes)} predictions", fontsize=8)
        return
    if cam_rows is not None and pi.aligned_methods():
        g = f["cam"]
        m = pi.aligned_methods()[0]
        ranks = g["rank"][()][cam_rows] if "rank" in g else np.zeros(len(cam_rows), np.int32)
        order = np.argsort(ranks, kind="stable")
        rows = cam_rows[order][:5]
        classes = g[m]["class"][()][rows]
        scores = g[m]["score"][()][rows]
        target = as_str(g.attrs.get("target", ""))
        ax.set_axis_on()
        y = np.arange(len(rows))[::-1]
        ax.barh(y, scores, color="#4a6f9e", height=0.6)
        ax.set_ylim(len(rows) - 5.5, len(rows) - 0.5)  # five slots, filled from the top
        ax.set_yticks(y, [names(c)[:30] for c in classes], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.set_xlabel("logit", fontsize=7)
        if target == "top" and len(rows) > 1:
            what = f"top-{len(rows)} predictions"
        else:
            what = {"predicted": "the predicted class", "label": "the labelled class"}.get(
                target, "explained class(es)")
            what += " (top-5 not stored: run cam with cam.target=top cam.top_n=5)"
        ax.set_title(what, fontsize=8)
        if occ_row is not None and "base_probability" in f["occlusion"]:
            p = float(f["occlusion/base_probability"][occ_row])
            ax.text(1.0, -0.25, f"p({names(int(f['occlusion/class'][occ_row]))[:24]}) = {p:.3f} (occlusion stage)",
                    transform=ax.transAxes, ha="right", fontsize=7, color="0.3")
        return
    if occ_row is not None:
        g = f["occlusion"]
        cls, p = int(g["class"][occ_row]), float(g["base_probability"][occ_row])
        ax.text(0.0, 0.6, f"occlusion target: {names(cls)}\np = {p:.3f}", fontsize=9, va="center")
        ax.text(0.0, 0.25, "no top-5 predictions stored (run cam with cam.target=top cam.top_n=5)", fontsize=7,
                color="0.4")
        return
    ax.text(0.0, 0.5, "no predictions stored for this image\n(stages=[cam] with cam.target=top cam.top_n=5)",
            fontsize=8, color="0.4", va="center")


def sheet_images(pi: PerImage, per_image, n_images: int) -> list[int]:
    """Image ids with a per-image sheet: N (the first N ids that have maps, those with the
    most kinds of maps first), or an explicit list."""
    have = pi.ids()
    if isinstance(per_image, (list, tuple)) or (hasattr(per_image, "__iter__") and not isinstance(per_image, str)):
        wanted = [int(i) for i in per_image]
        bad = [i for i in wanted if not 0 <= i < n_images]
        if bad:
            raise PipelineError(f"report.per_image has image id {bad[0]}: the run has ids 0 to {n_images - 1}")
        return wanted
    n = int(per_image or 0)
    if n <= 0:
        return []
    drawn = set().union(*(set(rows) for rows in (pi.cam_drawn or {}).values()))
    kinds = {i: (i in pi.cam_rows) + (i in drawn) + (i in pi.occlusion_row) + (i in pi.activation_row) for i in have}
    return sorted(sorted(have, key=lambda i: (-kinds[i], i))[:n])

