"""The report of a run, rendered from results.h5 only: layer sheets and their
previews, the run figures, unit cards and thumbnails, per-image sheets, the book
(report.pdf) and the HTML pages. No model is loaded and TensorFlow is never imported.

    sheets/<layer>.png            every unit of a layer: its top patches as a montage
    sheets/run/sparsity.png, .pdf the share of zero activations by depth
    sheets/run/selectivity.png    class selectivity by depth (labelled scans), and .pdf
    sheets/images/image_<id>.png  per-image sheets: photo, stored predictions, Grad-CAM,
                                  occlusion maps, activation grids
    report/cards/<layer>/...      one card per unit (render.cards)
    report/thumbs/<layer>/...     one small thumbnail per unit
    report/<layer>.html           the units of a layer; a card on click (render.site)
    report.pdf                    the book: sheets, chosen cards, per-image sheets (render.book)
    index.html                    the run, its layers and everything above
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.render import dissection
from pipeline.render.canvas import resize_patches, save_figure, write_png
from pipeline.render.image_sheet import PerImage, image_sheet, sheet_images
from pipeline.render.maps import redraw_stale_sheets
from pipeline.render.results import (
    as_str,
    class_namer,
    fmt,
    ints,
    read_layers,
    stored_preprocessing,
    str_array,
)
from pipeline.render.draw import CAM_TITLES
from pipeline.names import shown
from pipeline.store import read_paths
from pipeline.render.sheets import MAX_SLOTS, compose_sheet, selectivity_figure, sheet_grid, sparsity_figure
from pipeline.store import replacing

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# other stages' sheets (linked from the index)
# ----------------------------------------------------------------------------

EXTRA_SHEETS = (  # (results.h5 group, section title, files relative to the run directory)
    ("train", "Training", ("sheets/training_curve.png", "sheets/training_curve.pdf")),
    ("evolution", "Feature evolution during training", ("sheets/evolution/*.png",)),
    ("invariance", "Invariance", ("sheets/invariance.png", "sheets/invariance.pdf")),
    ("correspondence", "Correspondence", ("sheets/correspondence.png", "sheets/correspondence.pdf")),
    ("filters", "Filters: weights and patterns", ("sheets/filters/*.png", "sheets/filters/kernels.txt")),
    ("cam", "Class activation maps (cam stage)", ("cam/*.png",)),
    ("activations", "Activations (activations stage)", ("activations/blank_fraction.png", "activations/*_grid_*.png")),
    ("occlusion", "Occlusion (occlusion stage)", ("occlusion/*.png",)),
)


def in_network_order(paths, stored: list[str]) -> list[Path]:
    """Files named after layers, in the layers' network order (`stored`: stored names by
    depth); other files after them, numbers in names compared as numbers
    (features_2 before features_14)."""
    def key(p: Path):
        name = p.as_posix()
        depth = max(((len(s), i) for i, s in enumerate(stored) if s in name), default=(0, len(stored)))[1]
        return depth, [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]

    return sorted(paths, key=key)


def _extras(f: h5py.File, run_dir: Path, stored: list[str]) -> list[tuple[str, list[tuple[str, Path]]]]:
    out = []
    for group, title, patterns in EXTRA_SHEETS:
        if group not in f:
            continue
        files = []
        for pattern in patterns:
            for p in in_network_order(run_dir.glob(pattern), stored):
                if p.is_file() and p not in [q for _, q in files]:
                    files.append((p.relative_to(run_dir).as_posix(), p))
        if files:
            out.append((title, files))
    toolbox = run_dir / "toolbox"
    if toolbox.is_dir():
        files = [(p.relative_to(run_dir).as_posix(), p)
                 for p in in_network_order(toolbox.glob("*/*/*_0000*.jpg"), stored)[:6]]
        files += [(p.relative_to(run_dir).as_posix(), p)
                  for p in in_network_order(toolbox.glob("regularized_opt/*/whole_layer.jpg"), stored)]
        if files:
            out.append(("Deep Visualization Toolbox export (toolbox/, examples)", files))
    return out


# ----------------------------------------------------------------------------
# stage entry point
# ----------------------------------------------------------------------------

PRINT_DPI = 300  # run figures (sparsity, selectivity) as PNG
# per-image sheets: RGB PNG at up to SHEET_DPI, no larger than the book embeds pixel for pixel
# (book.MAX_IMAGE_PX a side; at 300 dpi the book area-reduced them to about 110 dpi)
SHEET_DPI = 200


def faithfulness_table(f: h5py.File):
    """(title, note, header, rows) of the CAM family's deletion and insertion areas, or None."""
    if "cam" not in f:
        return None
    rows, steps = [], 0
    for m in json.loads(as_str(f["cam"].attrs.get("methods", "[]"))):
        g = f["cam"].get(m)
        if g is None or "deletion_auc" not in g:
            continue
        steps = int(g.attrs.get("faithfulness_steps", 0))
        d, i = g["deletion_auc"][()], g["insertion_auc"][()]
        rows.append([CAM_TITLES.get(m, m), f"{d.mean():.3f} \u00b1 {d.std():.3f}", f"{i.mean():.3f} \u00b1 {i.std():.3f}",
                     f"{(i - d).mean():.3f}", str(len(d))])
    if not rows:
        return None
    return ("Faithfulness of the class activation maps",
            f"Deletion and insertion (Petsiuk et al. 2018): the target probability as the most salient pixels are "
            f"removed from the input (deletion, lower is better) or put back into a blank input (insertion, higher "
            f"is better), in {steps} steps; areas under the curves, mean \u00b1 standard deviation over the maps.",
            ["method", "deletion AUC", "insertion AUC", "insertion - deletion", "maps"], rows)


def selective_units(f: h5py.File, infos, per_class: int = 8) -> dict[str, list[tuple[str, int, float]]]:
    """Dataset class name -> the units (of every layer) that prefer it, most selective first
    (classes/preferred_max and selectivity_max of labelled scans), for the search box."""
    names = json.loads(as_str(f["images"].attrs.get("class_names", "[]"))) if "images" in f else []
    layer, unit, cls, value = [], [], [], []
    for i, info in enumerate(infos):
        g = f["layers"][info.stored].get("classes")
        if g is not None:
            c, v = g["preferred_max"][()], g["selectivity_max"][()]
            keep = np.flatnonzero((c >= 0) & np.isfinite(v))
            layer.append(np.full(len(keep), i))
            unit.append(keep)
            cls.append(c[keep])
            value.append(v[keep])
    if not layer:
        return {}
    layer, unit, cls, value = (np.concatenate(a) for a in (layer, unit, cls, value))
    order = np.lexsort((-value, cls))  # by class, most selective first; ties keep network order
    layer, unit, cls, value = layer[order], unit[order], cls[order], value[order]
    starts = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
    return {(shown(names[c]) if c < len(names) else str(int(c))):
            [(infos[layer[j]].stored, int(unit[j]), float(value[j])) for j in range(s, min(s + per_class, e))]
            for s, e, c in zip(starts, np.r_[starts[1:], len(cls)], cls[starts])}


def randomization_table(f: h5py.File):
    """(title, note, header, rows) of the model-randomization check, or None."""
    if "randomization" not in f:
        return None
    g = f["randomization"]
    rows = [[f"top layers down to {name}", f"{a.mean():.3f}", f"{b.mean():.3f}"]
            for name, a, b in zip(str_array(g["layers"]), g["gradcam"][()], g["guided_backprop"][()])]
    return ("Model randomization", f"Adebayo et al. 2018: the weighted layers are re-initialised from the top down, "
            f"cumulatively; each row is the mean Spearman correlation, over {len(g['image'])} images, of the maps "
            f"with those of the trained model. A map that explains the model should fall towards 0 (Grad-CAM at "
            f"{as_str(g.attrs['layer'])}); guided backpropagation is the known negative control.",
            ["re-initialised", "Grad-CAM", "guided backprop"], rows)


def run_figures(f: h5py.File, infos, model: str) -> dict:
    """The run's figures over layers, name -> (title, function -> Figure): sparsity by depth
    (stats/zero_fraction) and class selectivity by depth (classes/, labelled scans)."""
    out = {}
    zero = [(i.name, f["layers"][i.stored]["stats/zero_fraction"][()]) for i in infos
            if "stats/zero_fraction" in f["layers"][i.stored]]
    if zero:
        out["sparsity"] = ("Sparsity by depth",
                           partial(sparsity_figure, [n for n, _ in zero], [z for _, z in zero], model))
    chosen = [(i.name, f["layers"][i.stored]["classes/selectivity_max"][()]) for i in infos
              if "classes/selectivity_max" in f["layers"][i.stored]]
    if chosen:
        out["selectivity"] = ("Class selectivity by depth",
                              partial(selectivity_figure, [n for n, _ in chosen], [s for _, s in chosen], model))
    return out
PREVIEW_PX = 480  # sheet previews on the index


def _preview(image: np.ndarray, path: Path) -> Path:
    h, w = image.shape[:2]
    f = max(1, math.ceil(max(h, w) / PREVIEW_PX))
    if f > 1:  # whole-factor box average (integer sums of strided views)
        h2, w2 = h // f, w // f
        image = resize_patches(image[None, :h2 * f, :w2 * f], (h2, w2))[0]
    with replacing(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=85)
    return path



def scan_border(config: str) -> int:
    """scan.border of the run's recorded config (0 when it is not there)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return int(OmegaConf.select(OmegaConf.create(config or "{}"), "scan.border", default=0) or 0)
    except (yaml.YAMLError, OmegaConfBaseException, TypeError, ValueError):  # an older or foreign record:
        return 0  # say nothing of a border it may not have had


def border_line(g: h5py.Group, shape, border: int) -> str:
    """How many of a layer's top-k winners sit on the outermost rows or columns of its map,
    and what scan.border does about them ('' for maps with no inside)."""
    h, w = (int(v) for v in shape[:2]) if shape is not None and len(shape) >= 3 else (0, 0)
    t = g.get("topk")
    if t is None or "y" not in t or h <= 2 * max(border, 1) or w <= 2 * max(border, 1):
        return ""
    image, y, x = t["image"][()], t["y"][()], t["x"][()]
    ring = max(border, 0)  # with scan.border=b the winners' outermost possible place is b in
    edge = (image >= 0) & ((y <= ring) | (y >= h - 1 - ring) | (x <= ring) | (x >= w - 1 - ring))
    total = int((image >= 0).sum())
    if not total:
        return ""
    n = int(edge.sum())
    where = "outermost rows or columns of the map" if not border else \
        f"first rows or columns inside the {border} left out (scan.border={border})"
    said = (f"{n:,} of {total:,} top-k winners ({100 * n / total:.0f} %) sit on the {where}, where the "
            f"convolutions see zero padding as well as the image. ")
    if border:
        return said + f"scan.border={border} kept the {border} outermost rows and columns out of the top-k and bottom-k."
    return said + ("scan.border=1 leaves the outermost ring out of the top-k and bottom-k (the statistics still "
                   "cover every position).")


def _chosen_units(units, channels: int) -> list[int]:
    if isinstance(units, (list, tuple)) or (hasattr(units, "__iter__") and not isinstance(units, str)):
        return sorted({int(u) for u in units if 0 <= int(u) < channels})
    return list(range(min(int(units or 0), channels)))


def _start_cards(f, infos, chosen: dict, cards: str, report_dir: Path, then: list):
    """Unit cards and thumbnails (cards: all, chosen: the units in `chosen`, none), started
    on worker processes where there are many (render.cards.CardRender), the book's first,
    then the `then` tasks (the per-image sheets)."""
    from pipeline.render.cards import CardJob, CardRender

    every = cards == "all"
    jobs = [] if cards == "none" else [
        CardJob(i, None if every else chosen.get(i.stored, []), report_dir / "cards" / i.stored,
                report_dir / "thumbs" / i.stored if every else None)
        for i in infos if i.shape and int(i.shape[-1]) and (every or chosen.get(i.stored))]
    return CardRender(f, jobs, first=chosen, then=then)


def _render_sheets(f, infos, n_ok: int, figures: dict, sheet_dir: Path, report_dir: Path, pixels: dict):
    """Layer sheets and their previews, the run figures (sheets/run/<name>.png and .pdf;
    figures: name -> (title, function -> Figure)); `pixels` gets each sheet's path -> pixels."""
    sheets: dict[str, Path] = {}
    previews: dict[str, Path] = {}
    for info in tqdm(infos, desc="layer sheets", unit="layer"):
        path = sheet_dir / f"{info.stored}.png"
        image = compose_sheet(f["layers"][info.stored], info, n_ok)
        write_png(path, image)
        pixels[path] = image
        sheets[info.stored] = path
        previews[info.stored] = _preview(image, report_dir / "previews" / f"{info.stored}.jpg")
    figure_pngs = {}
    for name, (_, make) in figures.items():
        fig = make()
        figure_pngs[name] = save_figure(fig, sheet_dir / "run" / f"{name}.png", PRINT_DPI)
        save_figure(fig, sheet_dir / "run" / f"{name}.pdf", PRINT_DPI)
    return sheets, previews, figure_pngs


class RenderCache:
    """What the last render drew, per part of the report, from which inputs
    (report/.rendered.json); written after each part is drawn."""

    FILE = ".rendered.json"

    def __init__(self, out_dir: Path, report_dir: Path, inputs: dict[str, str] | None):
        self.out_dir, self.path, self.inputs = Path(out_dir), Path(report_dir) / self.FILE, inputs or {}
        self.saved = {}
        if self.inputs and self.path.exists():
            try:
                self.saved = json.loads(self.path.read_text())
            except ValueError:
                self.saved = {}

    def kept(self, part: str):
        """The files of `part` from the last render, if its inputs are the same and its files exist."""
        entry = self.saved.get(part)
        if not self.inputs or entry is None or entry["key"] != self.inputs.get(part):
            return None
        if not all((self.out_dir / rel).exists() for rel in entry["files"]):
            return None
        return getattr(self, f"_load_{part}")(entry["data"])

    def record(self, part: str, value) -> None:
        if not self.inputs:
            return
        data, files = getattr(self, f"_dump_{part}")(value)
        self.saved[part] = dict(key=self.inputs.get(part), data=data, files=files)
        from pipeline.store import atomic_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path, "w") as fh:
            json.dump(self.saved, fh)

    def _rel(self, path: Path | None) -> str | None:
        return None if path is None else Path(path).relative_to(self.out_dir).as_posix()

    def _abs(self, rel: str | None) -> Path | None:
        return None if rel is None else self.out_dir / rel

    def _dump_layers(self, value):
        sheets, previews, figures, card_files = value
        cards = {k: dict(cards={u: self._rel(p) for u, p in c.cards.items()},
                         thumbs={u: self._rel(p) for u, p in c.thumbs.items()}, size=list(c.size), thumb=c.thumb)
                 for k, c in card_files.items()}
        data = dict(sheets={k: self._rel(p) for k, p in sheets.items()},
                    previews={k: self._rel(p) for k, p in previews.items()},
                    figures={k: self._rel(p) for k, p in figures.items()}, cards=cards)
        files = list(data["sheets"].values()) + list(data["previews"].values()) + \
            [rel for c in cards.values() for rel in (*c["cards"].values(), *c["thumbs"].values())]
        return data, files + list(data["figures"].values())

    def _load_layers(self, data):
        from pipeline.render.cards import LayerCardFiles

        cards = {k: LayerCardFiles(k, {int(u): self._abs(p) for u, p in c["cards"].items()},
                                   {int(u): self._abs(p) for u, p in c["thumbs"].items()}, tuple(c["size"]), c["thumb"])
                 for k, c in data["cards"].items()}
        return ({k: self._abs(p) for k, p in data["sheets"].items()},
                {k: self._abs(p) for k, p in data["previews"].items()},
                {k: self._abs(p) for k, p in data.get("figures", {}).items()}, cards)

    def _dump_images(self, value):
        data = [[int(i), self._rel(p), caption] for i, p, caption in value]
        return data, [rel for _, rel, _ in data]

    def _load_images(self, data):
        return [(i, self._abs(rel), caption) for i, rel, caption in data]

    def _dump_site(self, value):
        book, pages = value
        data = dict(book=self._rel(book), pages=[self._rel(p) for p in pages])
        return data, data["pages"] + ([data["book"]] if book else [])

    def _load_site(self, data):
        return self._abs(data["book"]), [self._abs(p) for p in data["pages"]]


@dataclass
class RunRecord:
    """What every part of the report reads about the run: results.h5's attributes, the
    scanned images (path, whether it was read, why not) and layers, the per-image maps."""

    attrs: dict
    paths: list[str]
    ok: np.ndarray  # (N,) bool
    errors: list[str]
    infos: list
    per_image: PerImage

    @classmethod
    def read(cls, f: h5py.File) -> "RunRecord":
        if "images" in f:
            paths = read_paths(f["images"])
            ok = f["images/ok"][()].astype(bool)
            errors = str_array(f["images/error"]) if "images/error" in f else [""] * len(paths)
        else:
            paths, ok, errors = [], np.zeros(0, bool), []
        return cls({key: f.attrs[key] for key in f.attrs}, paths, ok, errors, read_layers(f), PerImage.read(f))

    @property
    def n_ok(self) -> int:
        return int(self.ok.sum())

    @property
    def model(self) -> str:
        return as_str(self.attrs.get("model", "model"))

    @property
    def config(self) -> str:
        return as_str(self.attrs.get("config", ""))

    def facts(self) -> list[tuple[str, str]]:
        """The run's lines at the top of the index and the book."""
        infos = self.infos
        return [("model", self.model), ("input", fmt(ints(self.attrs.get("input_size"), ()))),
                ("preprocessing", as_str(self.attrs.get("preprocessing", "?"))),
                ("images", f"{self.n_ok} scanned, {len(self.paths) - self.n_ok} skipped"),
                ("layers", f"{len(infos)} ({sum(int(i.shape[-1]) for i in infos if i.shape)} units)"),
                ("version", as_str(self.attrs.get("version", "?")))]


@dataclass
class LayerFiles:
    """The drawn files of every layer: sheets and previews, the run figures, cards."""

    sheets: dict[str, Path]
    previews: dict[str, Path]
    figure_pngs: dict[str, Path]
    card_files: dict  # stored layer name -> cards.LayerCardFiles

    def paths(self) -> list[Path]:
        out = list(self.sheets.values())
        for png in self.figure_pngs.values():
            out += [png, png.with_suffix(".pdf")]
        for files in self.card_files.values():
            out += list(files.cards.values()) + list(files.thumbs.values())
        return out


def _layer_files(f: h5py.File, run: RunRecord, figures: dict, chosen: dict, cards: str, cache: RenderCache,
                 sheet_dir: Path, report_dir: Path, images: "ImageSheets", with_first, pixels: dict):
    """Layer sheets, previews, run figures and unit cards: the last render's where their
    inputs did not change, else drawn now; and the per-image sheets (`images`). Worker
    processes draw the cards and the per-image sheets while this process draws the layer
    sheets, then `with_first(layer files holding at least the book's cards, the per-image
    sheets)` (the book).
    Returns (LayerFiles, the per-image sheets, with_first's value)."""
    kept = cache.kept("layers")
    if kept is not None:
        files = LayerFiles(*kept)
        logger.info("report: layer sheets and %d unit cards kept, their inputs did not change",
                    sum(len(c.cards) for c in files.card_files.values()))
        other = images.collect(None)
        return files, other, with_first(files, other)
    with _start_cards(f, run.infos, chosen, cards, report_dir, images.tasks()) as render:
        sheets = _render_sheets(f, run.infos, run.n_ok, figures, sheet_dir, report_dir, pixels)
        other = images.collect(render)
        early = with_first(LayerFiles(*sheets, render.first_files()), other)
        files = LayerFiles(*sheets, render.result())
    cache.record("layers", (files.sheets, files.previews, files.figure_pngs, files.card_files))
    return files, other, early


@dataclass
class ImageSheets:
    """The per-image sheets of a render: the last render's when their inputs did not change,
    else drawn by `draw_image_sheet`, on the card workers where there are any."""

    results: str
    ids: list[int]
    paths: list[str]  # of the run's images
    cache: RenderCache
    sheet_dir: Path

    def __post_init__(self):
        self.kept = self.cache.kept("images")

    def tasks(self) -> list:
        """(function, args) of each sheet to draw: none when the last render's are kept."""
        if self.kept is not None:
            return []
        return [(draw_image_sheet, (self.results, i, self.sheet_dir / "images" / f"image_{i}.png")) for i in self.ids]

    def collect(self, render) -> list[tuple[int, Path, str]]:
        """(image id, sheet, caption) of each sheet, once drawn (render: the CardRender the
        tasks went to; None: draw them here)."""
        if self.kept is not None:
            return self.kept
        with tqdm(total=len(self.ids), desc="per-image sheets", unit="image") as bar:
            if render is None:
                drawn = []
                for fn, args in self.tasks():
                    drawn.append(fn(*args))
                    bar.update(1)
            else:
                drawn = render.then_results(bar)
        for _, said in drawn:  # a worker's warnings (a photo not readable now), in this process's log
            for name, level, message in said:
                logging.getLogger(name).log(level, "%s", message)
        sheets = [(i, path, f"image #{i}: {shown(Path(self.paths[i]).name)}") for i, (path, _) in zip(self.ids, drawn)]
        self.cache.record("images", sheets)
        return sheets


class _Said(logging.Handler):
    """Keeps the warnings of the pipeline's loggers, to be logged by the stage's process."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.said: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append((record.name, record.levelno, record.getMessage()))


def draw_image_sheet(results: str, image_id: int, path: Path) -> tuple[Path, list[tuple[str, int, str]]]:
    """One per-image sheet from results.h5 and the photo, as PNG (in a card worker process
    or in the stage's own), and the warnings said while drawing it (logger, level, message):
    a worker's own log reaches neither the console's format nor run.log."""
    from pipeline.render.book import MAX_IMAGE_PX

    log, said = logging.getLogger("pipeline"), _Said()
    log.addHandler(said)
    propagate, log.propagate = log.propagate, False
    try:
        with h5py.File(results, "r") as f:
            fig, _ = image_sheet(f, PerImage.read(f), image_id, class_namer(f), stored_preprocessing(f.attrs),
                                 SHEET_DPI)
        dpi = min(SHEET_DPI, math.floor(MAX_IMAGE_PX / max(fig.get_size_inches())))
        return save_figure(fig, path, dpi, alpha=False), said.said
    finally:
        log.removeHandler(said)
        log.propagate = propagate


def missing_notes(f: h5py.File, run: RunRecord) -> list[str]:
    """What the run lacks and the stage that would add it, said once on the index and in the book."""
    infos, pi = run.infos, run.per_image
    notes = []
    if infos and not any(i.has_patches for i in infos):
        notes.append("receptive-field patches: run stages=[crop]")
    if infos and not any("panels" in f["layers"][i.stored] for i in infos):
        notes.append("deconv / backprop panels: run stages=[panels]")
    if "filters" not in f:
        notes.append("filter weights and patterns: run stages=[filters]")
    if not pi.ids():
        notes.append("per-image maps (activation grids, Grad-CAM, occlusion): "
                     "run stages=[activations,cam,occlusion]")
    elif not pi.cam_rows:
        notes.append("predictions and Grad-CAM: run stages=[cam] (cam.target=top cam.top_n=5 for the top-5)")
    return notes


@dataclass
class ReportParts:
    """Everything the book and the site are made of, read and drawn while results.h5 is open."""

    run: RunRecord
    figures: dict  # name -> (title, function -> Figure)
    grids: dict  # stored layer name -> the book's sheet grid
    borders: dict  # stored layer name -> its line on the border of the scan
    chosen: dict  # stored layer name -> the units whose cards the book shows
    layers: LayerFiles
    image_sheets: list  # (image id, sheet, caption)
    extras: list
    tables: list
    class_units: dict
    notes: list[str]


def _write_book(parts: ReportParts, path: Path, pixels: dict | None = None) -> Path:
    from pipeline.render.book import Book, BookLayer, write_book

    run, cards = parts.run, parts.layers.card_files
    book = Book(title=run.model, facts=run.facts(),
                layers=[BookLayer(i.name, parts.layers.sheets[i.stored],
                                  [(u, cards[i.stored].cards[u]) for u in parts.chosen.get(i.stored, [])
                                   if i.stored in cards and u in cards[i.stored].cards],
                                  parts.grids.get(i.stored))
                        for i in run.infos],
                images=[(caption, sheet) for _, sheet, caption in parts.image_sheets],
                config=run.config, figures=list(parts.figures.values()), notes=parts.notes,
                pixels=pixels or {})
    write_book(book, path)
    return path


def _write_site(parts: ReportParts, cards: str, book_path: Path | None, out_dir: Path,
                results_path: Path) -> list[Path]:
    """The HTML pages (the index last) and the dissected layers' figures they show."""
    from pipeline.render.site import Site, SiteImage, SiteLayer, write_site

    run, layers = parts.run, parts.layers
    site_layers = []
    for i in run.infos:
        files = layers.card_files.get(i.stored) if cards == "all" else None
        site_layers.append(SiteLayer(
            name=i.name, stored=i.stored, depth=i.depth, shape=fmt(i.shape),
            receptive_field=f"{fmt(i.rf_size)} / {fmt(i.rf_stride)}",
            units=int(i.shape[-1]) if i.shape else 0, sparsity=i.sparsity,
            note="" if i.mappable else i.geometry_message, sheet=layers.sheets[i.stored],
            preview=layers.previews.get(i.stored),
            cards=dict(files.cards) if files else {}, thumbs=dict(files.thumbs) if files else {},
            thumb_px=files.thumb if files else 64, card_hw=files.size if files else (0, 0),
            border=parts.borders.get(i.stored, "")))
    skipped = [(p, e) for p, good, e in zip(run.paths, run.ok, run.errors) if not good]
    images_note = "" if parts.image_sheets else (
        "No per-image maps in results.h5: run stages=[activations,cam,occlusion] to draw per-image sheets."
        if not run.per_image.ids() else "Per-image sheets are off (report.per_image=0).")
    topk = max((i.topk for i in run.infos), default=MAX_SLOTS)
    lead = (f"Top-{min(topk, MAX_SLOTS)} receptive-field patches per channel"
            + (f" (of the {topk} kept)" if topk > MAX_SLOTS else "") + ", unit cards and per-image maps.")
    site = Site(title=run.model, lead=lead,
                facts=run.facts(), images_line=f"{run.n_ok} images scanned, {len(skipped)} skipped.",
                skipped=skipped, layers=site_layers,
                figures=[(parts.figures[k][0], png) for k, png in layers.figure_pngs.items() if k in parts.figures],
                images=[SiteImage(i, caption, sheet) for i, sheet, caption in parts.image_sheets],
                images_note=images_note, extras=parts.extras, book=book_path, config=run.config, notes=parts.notes,
                tables=parts.tables, class_units=parts.class_units)
    with h5py.File(results_path, "r") as f:  # dissected layers' figures and tables on their pages
        figures = dissection.layer_pages(site, f, out_dir)
    return figures + write_site(site, out_dir)


def _draw_parts(f: h5py.File, out_dir: Path, sheet_dir: Path, report_dir: Path, cache: RenderCache, cards: str,
                units, pdf: bool, per_image, book: bool) -> tuple[ReportParts, Path | None]:
    """Read the run and draw (or keep) its layer files and per-image sheets, and the book
    (book=True) as soon as its cards are there; (parts, report.pdf or None)."""
    run = RunRecord.read(f)
    infos = run.infos
    ids = sheet_images(run.per_image, per_image, len(run.paths))  # a bad list stops here, before any file
    redraw_stale_sheets(Path(f.filename), out_dir)  # per-image stages' sheets missing or older than their part
    sheet_dir.mkdir(parents=True, exist_ok=True)
    figures = run_figures(f, infos, run.model)
    figures.update(dissection.run_figures(f, run.model))  # detectors by depth, where layers were dissected
    border = scan_border(run.config)
    chosen = {i.stored: _chosen_units(units, int(i.shape[-1]) if i.shape else 0) for i in infos} if pdf else {}
    parts = ReportParts(
        run=run, figures=figures,
        grids={i.stored: sheet_grid(f["layers"][i.stored], i) for i in infos} if pdf else {},
        borders={i.stored: border_line(f["layers"][i.stored], i.shape, border) for i in infos},
        chosen=chosen, layers=None, image_sheets=[],
        extras=_extras(f, out_dir, [i.stored for i in infos]),
        tables=[t for t in (faithfulness_table(f), randomization_table(f)) if t is not None],
        class_units=selective_units(f, infos),
        notes=missing_notes(f, run))

    pixels: dict = {}  # the layer sheets drawn now, path -> pixels: the book takes them without decoding their PNGs

    def write(layers: LayerFiles, image_sheets: list) -> Path | None:
        if not book:
            return None
        return _write_book(replace(parts, layers=layers, image_sheets=image_sheets), out_dir / "report.pdf", pixels)

    images = ImageSheets(f.filename, ids, run.paths, cache, sheet_dir)
    layers, image_sheets, book_path = _layer_files(f, run, figures, chosen, cards, cache, sheet_dir, report_dir,
                                                   images, write, pixels)
    return replace(parts, layers=layers, image_sheets=image_sheets), book_path


def render_report(results_path: Path, out_dir: Path, *, cards: str | bool = "all", units=8, pdf: bool = True,
                  per_image=8, inputs: dict[str, str] | None = None) -> list[Path]:
    """Render everything from results.h5 into out_dir (the run directory); return the files.

    sheets/<layer>.png (network order, first in the list), sheets/run/sparsity.png and .pdf,
    report/previews/<layer>.jpg, report/cards/<layer>/unit_%04d.jpg and
    report/thumbs/<layer>/unit_%04d.jpg (cards="all": every unit; "chosen": only the units
    the book shows; "none": no cards; True and False mean all and chosen),
    sheets/images/image_<id>.png (per_image: N or a list of ids),
    report.pdf (pdf=True; `units` per layer: N first units or a list), report/<layer>.html,
    and index.html (last in the list).

    `inputs`: a key per part of the report (layers, images, site) that changes whenever
    what it is drawn from changes; a part whose key equals the last render's, with its
    files still there, is kept instead of drawn again.
    """
    from pipeline.render.site import REPORT_DIR
    from pipeline.validate import card_mode

    mode = card_mode(cards)
    if mode is None:
        raise ValueError(f"cards={cards!r}: use all, chosen or none")
    out_dir = Path(out_dir)
    sheet_dir = out_dir / "sheets"
    report_dir = out_dir / REPORT_DIR
    cache = RenderCache(out_dir, report_dir, inputs)
    site = cache.kept("site")  # the pages and the book of the last render, if nothing changed
    with h5py.File(Path(results_path), "r") as f:
        parts, book_path = _draw_parts(f, out_dir, sheet_dir, report_dir, cache, mode, units, pdf, per_image,
                                       book=pdf and site is None)
    written = parts.layers.paths() + [sheet for _, sheet, _ in parts.image_sheets]
    if site is not None:
        book_path, pages = site
        logger.info("report: nothing changed since the last render; open %s", pages[-1])
        return written + ([book_path] if book_path else []) + pages
    pages = _write_site(parts, mode, book_path, out_dir, Path(results_path))
    cache.record("site", (book_path, pages))
    logger.info("report: %d sheets, %d cards, %d per-image sheets%s; open %s", len(parts.layers.sheets),
                sum(len(c.cards) for c in parts.layers.card_files.values()), len(parts.image_sheets),
                ", report.pdf" if book_path else "", pages[-1])
    return written + ([book_path] if book_path else []) + pages

