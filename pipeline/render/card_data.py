"""What the unit cards of a layer are drawn from, read from results.h5 only: the image
index (file names and labels), the convolution weights that feed each unit, the per-class
statistics, exemplars and ablation results, and every per-unit array of the layer.

Whole-layer arrays are read at once; datasets with pixels (patches, panels, patterns) stay
open and are read a block of units at a time by the composer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.names import shown
from pipeline.render.results import LayerInfo, as_str
from pipeline.render.text import fmt_value
from pipeline.spectrum import GAMMA, MIN_ABS
from pipeline.store import read_paths, stored_name


@dataclass
class ImageIndex:
    """What the cards say about an image id: its file name and label."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    @classmethod
    def read(cls, f: h5py.File) -> "ImageIndex":
        if "images" not in f:
            return cls([], np.zeros(0, np.int64), [])
        g = f["images"]
        paths = read_paths(g)
        labels = g["label"][()].astype(np.int64) if "label" in g else np.full(len(paths), -1, np.int64)
        names = json.loads(as_str(g.attrs.get("class_names", "[]")) or "[]")
        return cls(paths, labels, [shown(n) for n in names])

    def label(self, image_id: int) -> str:
        if not 0 <= image_id < len(self.labels):
            return "\u2013"
        return self.class_name(int(self.labels[image_id]))

    def class_name(self, label: int) -> str:
        if label < 0:
            return "\u2013"
        return self.class_names[label] if label < len(self.class_names) else str(label)

    def file(self, image_id: int) -> str:
        if not 0 <= image_id < len(self.paths):
            return "?"
        return shown(Path(self.paths[image_id]).name or self.paths[image_id])


@dataclass
class Weights:
    """The convolution kernel whose output unit u feeds unit u of a layer."""

    conv: str  # qualified name
    kind: str
    kernel: np.ndarray  # (kh, kw, n, units) float32: one (kh, kw, n) slice per unit
    bias: np.ndarray | None
    inferred: str  # '' when recorded, else how it was matched ('output count', 'name and output count')
    rgb: bool  # first layer on RGB input: drawn as colour images
    scale: float  # largest |weight| of the layer (colour scale)


def _units_kernel(g: h5py.Group) -> tuple[np.ndarray, str] | None:
    """(kh, kw, n, units) kernel of a filters/<conv> group, one slice per output unit."""
    kind = as_str(g.attrs.get("kind", "Conv2D"))
    w = np.asarray(g["weights"][()], np.float32)
    if w.ndim != 4:
        return None
    if kind == "SeparableConv2D" and "pointwise" in g:
        return np.asarray(g["pointwise"][()], np.float32), kind
    if kind == "DepthwiseConv2D":
        kh, kw, c, m = w.shape
        return w.reshape(kh, kw, 1, c * m), kind  # unit u = channel u // m, multiplier u % m
    return w, kind


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def find_weights(f: h5py.File, info: LayerInfo, channels: int) -> Weights | None:
    """The stored kernel of `info`'s units: its own (filters/<layer>/weights), the conv named
    by a `conv` attribute on filters/<layer> or layers/<layer>, or else the stored
    conv with as many outputs as the layer has channels whose name shares the longest
    prefix with the layer's (None when that is not unique)."""
    if "filters" not in f:
        return None
    root = f["filters"]
    groups = {k: g for k, g in root.items() if isinstance(g, h5py.Group) and "weights" in g}
    if not groups:
        return None
    own = root.get(info.stored)
    named = None
    for holder in (own, f["layers"].get(info.stored) if "layers" in f else None):
        if holder is not None and "conv" in holder.attrs:
            named = stored_name(as_str(holder.attrs["conv"]))
    inferred = ""
    if info.stored in groups:
        key = info.stored
    elif named in groups:
        key = named
    else:
        matches = []
        for k, g in groups.items():
            got = _units_kernel(g)
            if got is not None and got[0].shape[-1] == channels:
                matches.append((_common_prefix(k, info.stored), k))
        if not matches:
            return None
        best = max(m[0] for m in matches)
        keys = [k for p, k in matches if p == best]
        if len(keys) != 1 or (best == 0 and len(matches) > 1):
            return None
        key = keys[0]
        inferred = "name and output count" if best > 0 else "output count"
    g = groups[key]
    got = _units_kernel(g)
    if got is None or got[0].shape[-1] != channels:
        return None
    kernel, kind = got
    bias = np.asarray(g["bias"][()], np.float32) if "bias" in g and g["bias"].shape == (channels,) else None
    kernel_table = root.get("kernel_table")
    first = None
    if kernel_table is not None and "layer" in kernel_table and len(kernel_table["layer"]):
        first = as_str(kernel_table["layer"].asstr()[0]).replace("/", ".")
    rgb = kind == "Conv2D" and kernel.shape[2] == 3 and (first is None or first == key)
    if rgb:  # min-max over the layer, like the filters stage's colour sheet
        lo, hi = float(kernel.min()), float(kernel.max())
        kernel = (kernel - lo) / (hi - lo) if hi > lo else np.zeros_like(kernel)
    return Weights(conv=as_str(g.attrs.get("name", key)), kind=kind, kernel=kernel, bias=bias,
                   inferred=inferred, rgb=rgb, scale=float(np.abs(np.asarray(g["weights"][()])).max() or 1.0))


def spectrum_values(buckets: int, gamma: float, min_abs: float) -> np.ndarray:
    """The value each spectrum bucket stands for (as pipeline.spectrum.bucket_values, from the
    attrs stored with the counts): negatives (most negative first), zero, positives."""
    per_sign = (buckets - 1) // 2
    mid = min_abs * gamma ** (np.arange(per_sign) + 0.5)
    return np.concatenate([-mid[::-1], [0.0], mid]).astype(np.float32)


@dataclass
class UnitClasses:
    """Each unit's class selectivity (per-image max), preferred class and the two means."""

    index: np.ndarray  # (C,)
    preferred: np.ndarray  # (C,)
    best: np.ndarray  # (C,) mean on the preferred class
    rest: np.ndarray  # (C,) mean of the other classes' means

    @classmethod
    def read(cls, g: h5py.Group) -> "UnitClasses | None":
        from pipeline.selectivity import class_selectivity

        if "classes/sum_max" not in g:
            return None
        found = class_selectivity(g["classes/sum_max"][()], g["classes/count"][()])
        seen = found.means[:, np.isfinite(found.means).all(axis=0)]
        best = np.nanmax(seen, axis=1) if seen.shape[1] else np.full(len(found.index), np.nan)
        rest = (seen.sum(axis=1) - best) / max(seen.shape[1] - 1, 1)
        return cls(found.index, found.preferred, best, rest)

    def line(self, c: int, images: "ImageIndex") -> str:
        if not np.isfinite(self.index[c]):
            return "class selectivity: fewer than two classes with images"
        name = images.class_name(int(self.preferred[c]))
        return (f"class selectivity {self.index[c]:.2f} \u00b7 prefers {name} (mean per-image max "
                f"{fmt_value(float(self.best[c]))} vs {fmt_value(float(self.rest[c]))} on the other classes)")


@dataclass
class Exemplars:
    """The scan's per-class top-k (scan.exemplars): classes (S,), k, images (C, S * K)."""

    classes: np.ndarray
    k: int
    image: np.ndarray

    @classmethod
    def read(cls, g: h5py.Group, channels: int) -> "Exemplars | None":
        t = g.get("class_topk")
        if t is None or "class_patches" not in g or g["class_patches"].shape[0] != channels:
            return None
        return cls(t.attrs["classes"][()], int(t.attrs["k"]), t["image"][()])

    def block_of(self, preferred: np.ndarray | None, n: int) -> np.ndarray:
        """(n,) which class block each unit shows: its preferred class where listed, else 0."""
        if preferred is None:
            return np.zeros(n, np.int64)
        at = np.clip(np.searchsorted(self.classes, preferred), 0, len(self.classes) - 1)  # classes are sorted
        return np.where(self.classes[at] == preferred, at, 0).astype(np.int64)


@dataclass
class UnitAblation:
    """What zeroing a unit did (the ablation stage): accuracy change overall and per class."""

    units: dict[int, int]  # unit -> row
    classes: np.ndarray
    accuracy_delta: np.ndarray  # (U, L')
    overall_delta: np.ndarray  # (U,)

    @classmethod
    def read(cls, f: h5py.File, stored: str) -> "UnitAblation | None":
        g = f.get(f"ablation/{stored}")
        if g is None:
            return None
        return cls({int(u): i for i, u in enumerate(g["units"][()])}, g["classes"][()], g["accuracy_delta"][()],
                   g["overall_delta"][()])

    def line(self, c: int, images: "ImageIndex") -> str | None:
        row = self.units.get(c)
        if row is None:
            return None
        delta = self.accuracy_delta[row]
        worst = [i for i in np.argsort(delta, kind="stable")[:2] if delta[i] < 0]
        hurt = ", ".join(f"{images.class_name(int(self.classes[i]))} {100 * delta[i]:+.0f}" for i in worst)
        return (f"zeroed: accuracy {100 * self.overall_delta[row]:+.1f} points overall"
                + (f"; most hurt: {hurt}" if hurt else "; no class loses accuracy"))


@dataclass
class LayerData:
    """Everything the cards of one layer show: arrays for all units, and the datasets with
    pixels (patches, panels, patterns) opened once and read a block of units at a time."""

    info: LayerInfo
    group: h5py.Group
    images: ImageIndex
    channels: int
    k: int
    value: np.ndarray | None
    image: np.ndarray | None
    bottom_value: np.ndarray | None
    bottom_image: np.ndarray | None
    stats: dict[str, np.ndarray]
    quantile_levels: np.ndarray | None
    spectrum: np.ndarray | None
    spectrum_x: np.ndarray | None
    panel_methods: list[str]
    pattern_rows: np.ndarray | None  # (C,) row in filters/<layer>/patterns, -1 where none
    pattern_ds: h5py.Dataset | None
    pattern_value: np.ndarray | None
    pattern_objective: str
    weights: Weights | None
    classes: UnitClasses | None = None
    ablation: UnitAblation | None = None
    exemplars: Exemplars | None = None
    scanned: int = 1  # how many layers the run scanned (info.depth counts these, in network order)
    opened: dict = field(default_factory=dict)  # datasets read a block at a time, opened once

    @classmethod
    def read(cls, f: h5py.File, info: LayerInfo, images: ImageIndex) -> "LayerData":
        g = f["layers"][info.stored]
        shape = info.shape
        channels = int(shape[-1]) if shape else 0
        t = g.get("topk")
        value = t["value"][()] if t is not None and "value" in t else None
        image = t["image"][()] if t is not None and "image" in t else None
        if value is not None:
            channels = value.shape[0]
        k = value.shape[1] if value is not None else 0
        b = g.get("bottomk")
        bottom_value = b["value"][()] if b is not None and "value" in b else None
        bottom_image = b["image"][()] if b is not None and "image" in b else None
        s = g.get("stats")
        stats = {key: s[key][()] for key in ("mean", "max", "zero_fraction", "quantiles") if s is not None and key in s}
        levels = np.asarray(s.attrs["quantiles"], np.float64) if s is not None and "quantiles" in s.attrs else None
        spectrum = spectrum_x = None
        if s is not None and "spectrum" in s:
            spectrum = s["spectrum"][()]
            spectrum_x = spectrum_values(spectrum.shape[1], float(s.attrs.get("spectrum_gamma", GAMMA)),
                                         float(s.attrs.get("spectrum_min_abs", MIN_ABS)))
        panels = g.get("panels")
        methods = []
        if panels is not None:
            listed = json.loads(as_str(panels.attrs.get("methods", "[]")) or "[]")
            found = [k_ for k_ in panels if not k_.endswith(("_norm", "_scale"))]  # no methods attr: by name
            methods = [m for m in (listed or found) if m in panels]
        pattern_rows = pattern_ds = pattern_value = None
        objective = "channel"
        fg = f.get(f"filters/{info.stored}")
        if fg is not None and "patterns" in fg and "channels" in fg:
            objective = as_str(fg.attrs.get("objective", "channel"))
            if objective in ("channel", "neg"):
                rows = np.full(channels, -1, np.int64)
                chans = fg["channels"][()]
                computed = fg["computed"][()] if "computed" in fg else np.ones(len(chans), bool)
                ok = computed & (chans >= 0) & (chans < channels)
                rows[chans[ok]] = np.flatnonzero(ok)
                if (rows >= 0).any():
                    pattern_rows, pattern_ds = rows, fg["patterns"]
                    if "value" in fg:
                        vals = fg["value"][()]
                        pattern_value = np.full(channels, np.nan, np.float32)
                        pattern_value[rows >= 0] = vals[rows[rows >= 0]]
        weights = find_weights(f, info, channels)
        return cls(info=info, group=g, images=images, channels=channels, k=k, value=value, image=image,
                   bottom_value=bottom_value, bottom_image=bottom_image, stats=stats, quantile_levels=levels,
                   spectrum=spectrum, spectrum_x=spectrum_x, panel_methods=methods, pattern_rows=pattern_rows,
                   pattern_ds=pattern_ds, pattern_value=pattern_value, pattern_objective=objective,
                   weights=weights, classes=UnitClasses.read(g), ablation=UnitAblation.read(f, info.stored),
                   exemplars=Exemplars.read(g, channels), scanned=len(f["layers"]))

    @property
    def patch_hw(self) -> tuple[int, int] | None:
        """(height, width) of the stored top-k patches, None where the layer has none."""
        p = self.group.get("patches")
        if p is None or p.shape[0] != self.channels or 0 in p.shape[:2]:
            return None
        return tuple(int(v) for v in p.shape[2:4])

    def dataset(self, name: str) -> h5py.Dataset:
        """layers/<layer>/<name>, opened once for all blocks."""
        if name not in self.opened:
            self.opened[name] = self.group[name]
        return self.opened[name]
