"""What the drawing code reads back from results.h5: layer facts, stored strings,
class names and the stored preprocessing. h5py and numpy only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np

from pipeline.names import shown


def as_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return as_str(value.item())
    return str(value)


def ints(value, default=(0, 0)) -> tuple[int, ...]:
    if value is None:
        return tuple(default)
    return tuple(int(v) for v in np.atleast_1d(value))


@dataclass(frozen=True)
class LayerInfo:
    stored: str
    name: str
    shape: tuple[int, ...]
    rf_size: tuple[int, ...]
    rf_stride: tuple
    depth: int
    mappable: bool
    geometry_message: str
    sparsity: float | None  # mean zero fraction over channels
    has_patches: bool
    topk: int = 0  # images kept per channel


def layer_info(stored: str, g: h5py.Group) -> LayerInfo:
    a = g.attrs
    zf = g["stats/zero_fraction"][()] if "stats/zero_fraction" in g else None
    return LayerInfo(
        stored=stored,
        name=as_str(a.get("name", stored)),
        shape=ints(a.get("shape"), ()),
        rf_size=ints(a.get("rf_size")),
        rf_stride=tuple(int(v) if float(v).is_integer() else round(float(v), 4)  # 1/2 after an upsampling
                        for v in np.atleast_1d(a.get("rf_stride", (0, 0)))),
        depth=int(a.get("depth", 0)),
        mappable=bool(a.get("mappable", True)),
        geometry_message=as_str(a.get("geometry_message", "")),
        sparsity=float(np.mean(zf)) if zf is not None and zf.size else None,
        has_patches="patches" in g,
        topk=int(g["topk/value"].shape[1]) if "topk/value" in g else 0,
    )


def read_layers(f: h5py.File) -> list[LayerInfo]:
    if "layers" not in f:
        return []
    infos = [layer_info(name, g) for name, g in f["layers"].items() if isinstance(g, h5py.Group)]
    return sorted(infos, key=lambda i: (i.depth, i.stored))


def layer_names(results_path: Path) -> list[str]:
    """Stored layer names in network order (depth)."""
    with h5py.File(results_path, "r") as f:
        return [i.stored for i in read_layers(f)]


def str_array(ds) -> list[str]:
    return [as_str(s) for s in ds.asstr()[()]] if ds.dtype.kind in "OS" else list(map(str, ds[()]))



def fmt(t: tuple[int, ...], sep: str = "\u00d7") -> str:
    return sep.join(str(v) for v in t) if t else "?"



def class_namer(f: h5py.File):
    """class index -> name: ImageNet's for an ImageNet model, the class names a train stage
    recorded for a network trained in this run, else 'class i' (results.h5 does not say
    whether the dataset's folders name the model's outputs)."""
    names: list[str] = []
    if bool(f.attrs.get("imagenet_classes", False)):
        from pipeline.models.imagenet import class_names

        names = class_names()
    elif "train" in f and "class_names" in f["train"].attrs:
        names = [str(n) for n in json.loads(as_str(f["train"].attrs["class_names"]) or "[]")]

    def name(i: int) -> str:
        i = int(i)
        return shown(names[i]) if 0 <= i < len(names) else f"class {i}"

    return name



def label_name(f: h5py.File, label: int) -> str:
    folders = json.loads(as_str(f["images"].attrs.get("class_names", "[]")) or "[]") if "images" in f else []
    return shown(folders[label]) if 0 <= label < len(folders) else str(label)



def stored_preprocessing(attrs) -> dict:
    """The stored Preprocessing fields (JSON); {} when absent or not JSON."""
    try:
        spec = json.loads(as_str(attrs.get("preprocessing", "{}")) or "{}")
    except ValueError:
        return {}
    return spec if isinstance(spec, dict) else {}


def stored_exif(attrs) -> bool:
    """dataset.exif of the run's stored config (true when absent: the default)."""
    return _exif_setting(as_str(attrs.get("config", "")) or "{}")


@lru_cache(maxsize=8)
def _exif_setting(text: str) -> bool:  # parsing the whole config costs ~70 ms; a report asks once a sheet
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.create(text)
        return bool(OmegaConf.select(config, "dataset.exif", default=True))
    except Exception:  # noqa: BLE001 - a config by another version: the default
        return True
