"""What the viewer knows about one run directory, read-only.

`RunView` reads results.h5 (layers, images, the precomputed pictures of a unit, a
layer's filter patterns); `Inputs` turns a dataset image or an upload into model
pixels with the same bounds and preprocessing as the scan; `LiveModel` loads the
run's model from the config recorded in results.h5 and computes what the toolbox
computed live: the scanned layers' activations, the top-5 predictions, and the
deconv / guided backprop of one channel on the current image.

Pictures are drawn by the same functions as the report and the toolbox export
(pipeline.render.draw, pipeline.render.toolbox), so a unit looks the same in all three.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.render.canvas import EMPTY_GREY
from pipeline.render.cards import card_name
from pipeline.render.dissection import unit_words
from pipeline.render.draw import PANEL_PERCENTILE, channel_tiles, heat_image, panel_to_uint8, tile, to_rgb
from pipeline.render.results import as_str
from pipeline.render.toolbox import fit_squares, sprite, top9_montages
from pipeline.names import shown
from pipeline.store import Store, read_paths

logger = logging.getLogger(__name__)


class NotFound(KeyError):
    """What a request asked for is not in this run (a layer, unit, image, upload or model): 404.
    Any other KeyError is a fault of ours, answered 500 with its trace in the log."""

TILE_PX = 32  # activation tiles are enlarged by whole factors up to about this size
GAP = 2  # pixels between activation tiles
PATTERN_TILE_PX = 48  # pattern mode: each filter pattern shrunk to this side
UPLOADS_KEPT = 16  # uploaded images held in memory, oldest dropped first
DATASET_IMAGES_KEPT = 64  # decoded dataset images held in memory
BACKPROP_METHODS = ("deconv", "guided")


def png_url(image: np.ndarray) -> str:
    """A uint8 image as a data: URL (PNG)."""
    image = np.asarray(image)
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(
        buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class LayerEntry:
    key: str  # stored name (a folder name: '/' became '.')
    name: str  # the model's (qualified) layer name
    depth: int
    shape: tuple[int, int, int]  # (H, W, C) of the layer's map
    patches: bool
    panels: tuple[str, ...]  # methods with stored panels
    pattern: bool  # filter patterns exist for this layer
    page: str | None  # the static report's page of the layer, relative to the run dir

    def as_json(self) -> dict:
        return {"key": self.key, "name": self.name, "depth": self.depth, "shape": list(self.shape),
                "units": self.shape[2], "patches": self.patches, "panels": list(self.panels),
                "pattern": self.pattern, "page": self.page}


class RunView:
    """results.h5 of a finished run, opened per request (the file is never held open, so a
    later `stages=[report]` into the same directory can rewrite its index)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.store = Store(self.run_dir)
        self.results = self.store.require("stages=[scan,crop]")
        from pipeline.render.results import (
            class_namer,  # TF-free, reads results.h5 only
        )

        with self.store.open() as f:
            if "layers" not in f:
                raise PipelineError(f"{self.run_dir} holds no scanned layer: run stages=[scan,crop] first")
            a = f.attrs
            self.config = as_str(a.get("config", ""))
            self.model_name = as_str(a.get("model", ""))
            self.weights_sha256 = as_str(a.get("weights_sha256", ""))
            self.images_sha256 = as_str(a.get("images_sha256", ""))
            self.preprocessing = json.loads(as_str(a.get("preprocessing", "{}")) or "{}")
            self.paths = read_paths(f["images"]) if "images" in f else []
            self.ok = f["images/ok"][()] if "images" in f and "ok" in f["images"] else np.ones(len(self.paths), bool)
            self.labels = f["images/label"][()] if "images" in f else np.zeros(0, np.int64)
            self.class_name = class_namer(f)
            self.layers = [self._entry(key, g, f) for key, g in f["layers"].items()]
        self.layers.sort(key=lambda e: e.depth)
        self.by_key = {e.key: e for e in self.layers}

    def _entry(self, key: str, g: h5py.Group, f: h5py.File) -> LayerEntry:
        panels = tuple(m for m in ("deconv", "guided", "gradient") if f"panels/{m}" in g)
        page = f"report/{key}.html"
        return LayerEntry(key=key, name=as_str(g.attrs.get("name", key)), depth=int(g.attrs.get("depth", 0)),
                          shape=tuple(int(s) for s in g.attrs["shape"]), patches="patches" in g, panels=panels,
                          pattern=f"filters/{key}/patterns" in f,
                          page=page if (self.run_dir / page).is_file() else None)

    def layer(self, key: str) -> LayerEntry:
        if key not in self.by_key:
            raise NotFound(f"no layer {key!r} in this run")
        return self.by_key[key]

    def summary(self) -> dict:
        images = [{"id": i, "name": shown(os.path.basename(p) or p), "ok": bool(self.ok[i])}
                  for i, p in enumerate(self.paths)]
        return {"run": self.run_dir.name, "model": self.model_name, "input": list(self._input_size()),
                "layers": [e.as_json() for e in self.layers], "images": images,
                "report": "index.html" if (self.run_dir / "index.html").is_file() else None}

    def _input_size(self) -> tuple[int, int]:
        return int(self.preprocessing.get("height", 0)), int(self.preprocessing.get("width", 0))

    def unit(self, key: str, unit: int) -> dict:
        """The precomputed pictures of one unit: its top-9 montage (as the toolbox export
        draws it), its stored panels, its filter pattern, the table of its top images,
        and links into the static report."""
        e = self.layer(key)
        if not 0 <= unit < e.shape[2]:
            raise NotFound(f"layer {key} has units 0 to {e.shape[2] - 1}")
        out: dict = {"layer": key, "unit": unit}
        with self.store.open() as f:
            g = f[f"layers/{key}"]
            t = g["topk"]
            valid = t["image"][()] >= 0
            image = t["image"][unit]
            out["top"] = [{"rank": k, "value": float(t["value"][unit, k]), "image": int(i),
                           "name": shown(os.path.basename(self.paths[i])), "label": self.class_name(int(self.labels[i]))
                           if self.labels[i] >= 0 else ""}
                          for k, i in enumerate(image) if i >= 0]
            if e.patches:
                out["max_im"] = png_url(top9_montages(g, "patches", valid, unit, unit + 1)[0])
            for method in e.panels:
                out[f"max_{method}"] = png_url(
                    top9_montages(g, f"panels/{method}", valid, unit, unit + 1)[0])
            concept = unit_words(g, unit)  # the dissect stage's label, as on the unit card
            if concept:
                out["concept"] = concept
            s = g["stats"] if "stats" in g else None
            if s is not None:
                out["stats"] = {k: float(s[k][unit]) for k in ("mean", "max", "zero_fraction") if k in s}
            if e.pattern:
                p = f[f"filters/{key}"]
                rows = np.flatnonzero((p["channels"][()] == unit) & p["computed"][()])
                if len(rows):
                    out["pattern"] = png_url(p["patterns"][int(rows[0])])
                    if "value" in p:
                        out["pattern_value"] = float(p["value"][int(rows[0])])
        card = f"report/cards/{key}/{card_name(unit)}"
        out["card"] = card if (self.run_dir / card).is_file() else None
        out["page"] = f"{e.page}#u{unit}" if e.page else None
        return out

    def patterns(self, key: str) -> dict | None:
        """The layer's filter patterns as one sprite (the toolbox's whole_layer picture)."""
        e = self.layer(key)
        if not e.pattern:
            return None
        with self.store.open() as f:
            p = f[f"filters/{key}"]
            units, computed = p["channels"][()], p["computed"][()]
            h, w, ch = p["patterns"].shape[1:]
            total = e.shape[2]
            t = min(max(h, w), PATTERN_TILE_PX)
            tiles = np.full((total, t, t, ch), EMPTY_GREY, np.uint8)
            present = np.zeros(total, bool)
            rows = np.flatnonzero(computed & (units < total))
            if len(rows):  # one read and one resize for the whole layer
                tiles[units[rows]] = fit_squares(p["patterns"][()][rows], t)
                present[units[rows]] = True
        return {"layer": key, "cols": math.ceil(math.sqrt(total)), "tile": [t, t], "gap": 0,
                "png": png_url(sprite(tiles, present))}


class Inputs:
    """Model pixels of dataset images and uploads, bounded as the scan bounds them."""

    def __init__(self, view: RunView, max_upload_bytes: int):
        from omegaconf import OmegaConf

        from pipeline.datasets import list_images
        from pipeline.preprocess import Preprocessing
        from pipeline.store import table_digest

        self.spec = Preprocessing(**view.preprocessing)
        self.max_upload_bytes = max_upload_bytes
        self.table, self.problem = None, ""
        self.exif = True  # the run's dataset.exif: uploads are turned upright like its images
        try:
            cfg = OmegaConf.create(view.config)
            self.exif = bool(OmegaConf.select(cfg, "dataset.exif", default=True))
            table = list_images(cfg.dataset)
            if view.images_sha256 and table_digest(table) != view.images_sha256:
                self.problem = "the dataset changed since the scan: its images are not shown"
            else:
                self.table = table
        except Exception as err:  # noqa: BLE001 - a moved dataset leaves uploads and stored pictures usable
            self.problem = f"the run's dataset cannot be read ({err}): upload images instead"
        self._uploads: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._count = 0
        self._lock = threading.Lock()

    def pixels(self, ref: str) -> np.ndarray:
        """uint8 (H, W, C) model pixels of 'N' (dataset image id) or 'uK' (an upload)."""
        with self._lock:
            if ref in self._uploads:
                return self._uploads[ref]
            if ref in self._cache:
                return self._cache[ref]
        if ref.startswith("u"):
            raise NotFound(f"no upload {ref!r} (uploads are kept for this session only)")
        if self.table is None:
            raise NotFound(self.problem)
        i = int(ref)
        if not 0 <= i < len(self.table):
            raise NotFound(f"no image {i}: the dataset has {len(self.table)}")
        pixels = self._dataset_pixels(i)
        with self._lock:
            self._cache[ref] = pixels
            while len(self._cache) > DATASET_IMAGES_KEPT:
                self._cache.popitem(last=False)
        return pixels

    def _dataset_pixels(self, i: int) -> np.ndarray:
        import tensorflow as tf

        from pipeline.datasets import decode_with_pillow
        from pipeline.preprocess import to_model_pixels

        if self.table.arrays is not None:
            a = self.table.arrays[i]
            return to_model_pixels(tf.constant(a[..., None] if a.ndim == 2 else a), self.spec).numpy()
        pixels, problem = decode_with_pillow(self.table.paths[i], self.spec, self.table)
        if pixels is None:
            raise ValueError(f"image {i} cannot be read: {problem}")
        return pixels.numpy()

    def upload(self, data: bytes) -> str:
        """Decode an uploaded file (through a temporary file outside the run directory, with
        the dataset's bounds) and keep its pixels; returns its reference 'uK'."""
        from pipeline.datasets import ImageTable, decode_with_pillow

        if len(data) > self.max_upload_bytes:
            raise ValueError(f"upload of {len(data)} bytes is above the limit of {self.max_upload_bytes}")
        bounds = ImageTable(paths=[], labels=np.zeros(0, np.int64), max_bytes=self.max_upload_bytes, exif=self.exif)
        if self.table is not None:
            bounds.max_pixels = self.table.max_pixels
        with tempfile.NamedTemporaryFile(suffix=".upload") as tmp:
            tmp.write(data)
            tmp.flush()
            pixels, problem = decode_with_pillow(tmp.name, self.spec, bounds)
        if pixels is None:
            raise ValueError(f"the upload is not a readable image: {problem}")
        with self._lock:
            self._count += 1
            ref = f"u{self._count}"
            self._uploads[ref] = pixels.numpy()
            while len(self._uploads) > UPLOADS_KEPT:
                self._uploads.popitem(last=False)
        return ref


class LiveModel:
    """The run's model, loaded from the config recorded in results.h5. Every computation
    holds one lock: TensorFlow runs one request at a time."""

    def __init__(self, view: RunView, spec):
        from omegaconf import OmegaConf

        from pipeline.graph import NoClassScores, feature_model, logits_head
        from pipeline.models.sources import load_model

        cfg = OmegaConf.create(view.config)
        bundle = load_model(cfg.model, cfg.get("cache_dir"))
        if view.weights_sha256 and bundle.weights_sha256 and bundle.weights_sha256 != view.weights_sha256:
            raise PipelineError("the model's weights differ from the run's (weights_sha256): live panes are off")
        self.model, self.spec, self.view = bundle.model, spec, view
        names = [e.name for e in view.layers]
        try:
            node, self._head = logits_head(self.model, cfg.model.get("output"))
            names.append(node)
            self.classifier = True
        except (NoClassScores, PipelineError) as err:
            logger.info("viewer: no predictions (%s)", err)
            self.classifier, self._head = False, None
        self._features = feature_model(self.model, names)
        self._backprop: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, dict] = OrderedDict()

    def _input(self, pixels: np.ndarray):
        import tensorflow as tf

        from pipeline.preprocess import normalize

        return normalize(tf.constant(pixels[None]), self.spec.normalize)

    def forward(self, pixels: np.ndarray) -> dict:
        """{'maps': {layer key: (H, W, C) float32}, 'probs': (classes,) or None}, cached."""
        key = hashlib.sha1(pixels.tobytes()).digest() + np.asarray(pixels.shape).tobytes()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            outs = self._features(self._input(pixels), training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            result = {"maps": {}, "probs": None}
            for e, out in zip(self.view.layers, outs):
                out = np.asarray(out)[0]
                result["maps"][e.key] = out[None, None, :] if out.ndim == 1 else out
            if self.classifier:
                logits = outs[len(self.view.layers)]
                logits = self._head(logits) if self._head is not None else logits
                from pipeline.explain import softmax

                result["probs"] = softmax(np.asarray(logits, np.float64)[0])
            self._cache[key] = result
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
            return result

    def predictions(self, pixels: np.ndarray, k: int = 5) -> list[dict]:
        probs = self.forward(pixels)["probs"]
        if probs is None:
            return []
        top = np.argsort(-probs, kind="stable")[:k]
        return [{"class": int(c), "name": self.view.class_name(int(c)), "p": float(probs[c])} for c in top]

    def activations(self, pixels: np.ndarray, key: str) -> dict:
        """Every channel of one layer as a tile, in one picture; geometry for clicks."""
        maps = self.forward(pixels)["maps"][key]
        h, w, c = maps.shape
        blank = maps.std(axis=(0, 1)) == 0
        tiles = channel_tiles(maps, blank, TILE_PX)
        cols = math.ceil(math.sqrt(c))
        return {"layer": key, "cols": cols, "tile": list(tiles.shape[1:3]), "gap": GAP,
                "png": png_url(tile(tiles, cols, GAP)), "max": float(maps.max()),
                "argmax": int(np.argmax(maps.reshape(-1, c).max(axis=0)))}

    def unit(self, pixels: np.ndarray, key: str, unit: int, method: str | None) -> dict:
        """The unit's map on this image, enlarged to the input size, and (method) the
        deconv / guided backprop of the whole channel map, seeded with its own values as
        the toolbox seeds it."""
        maps = self.forward(pixels)["maps"][key]
        if not 0 <= unit < maps.shape[2]:
            raise NotFound(f"layer {key} has units 0 to {maps.shape[2] - 1}")
        channel = maps[..., unit]
        y, x = np.unravel_index(int(np.argmax(channel)), channel.shape)
        out = {"layer": key, "unit": unit, "max": float(channel.max()), "at": [int(y), int(x)],
               "map": png_url(heat_image(channel, self.spec.size))}
        if method:
            out["backprop"] = png_url(self.backprop(pixels, key, unit, method))
            out["method"] = method
        return out

    def backprop(self, pixels: np.ndarray, key: str, unit: int, method: str) -> np.ndarray:
        from pipeline.backprop import Backprop

        if method not in BACKPROP_METHODS:
            raise NotFound(f"unknown method {method!r}: use one of {', '.join(BACKPROP_METHODS)}")
        e = self.view.layer(key)
        maps = self.forward(pixels)["maps"][key]
        with self._lock:
            program = self._backprop.get((key, method))
            if program is None:
                program = self._backprop[(key, method)] = Backprop(self.model, e.name, method)
            seed = np.zeros((1,) + tuple(program.output_shape), np.float32)
            if seed.ndim == 4:
                seed[0, ..., unit] = maps[..., unit]
            else:
                seed[0, unit] = maps[0, 0, unit]
            grad = np.asarray(program(self._input(pixels), seed))[0]
        return to_rgb(panel_to_uint8(grad, percentile=PANEL_PERCENTILE))  # as the stored panels

    def warm(self) -> None:
        """Trace every (layer, method) backward program once, so the first click is fast."""
        probe = np.zeros(self.spec.size + (self.spec.channels,), np.uint8)
        for e in self.view.layers:
            for method in BACKPROP_METHODS:
                self.backprop(probe, e.key, 0, method)
