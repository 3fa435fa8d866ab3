"""One PDF book of a run, written with matplotlib's PdfPages (A4 pages).

    page 1              title, run facts, contents with page numbers
    page 2              sparsity by depth (vector figure), when the run has statistics
    per layer           its sheet (one page), then its chosen units' cards, CARDS_PER_PAGE a page
    per image           its per-image sheet (one page each)
    last                the resolved config (as many pages as it needs)

Raster pages (sheets, cards) are embedded pixel for pixel, never resampled by the PDF
backend (images larger than MAX_IMAGE_PX a side are area-reduced first).
"""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from pipeline.store import replacing

logger = logging.getLogger(__name__)

A4 = (8.27, 11.69)  # inches, portrait
CARDS_PER_PAGE = 2
MAX_IMAGE_PX = 2400  # a sheet in the book: about 290 dpi across an A4 page
CONFIG_LINES_PER_PAGE = 90


@dataclass
class BookLayer:
    name: str
    sheet: Path
    cards: list[tuple[int, Path]] = field(default_factory=list)  # (unit, card PNG)


@dataclass
class Book:
    title: str
    facts: list[tuple[str, str]]
    layers: list[BookLayer]
    images: list[tuple[str, Path]]  # (caption, per-image sheet PNG)
    config: str
    figures: list = field(default_factory=list)  # run figures: (title, function () -> matplotlib Figure)
    notes: list[str] = field(default_factory=list)


def page_count(book: Book) -> int:
    """Pages write_book produces for `book` (tests and the log use it)."""
    n = 1 + len(book.figures)
    for layer in book.layers:
        n += 1 + math.ceil(len(layer.cards) / CARDS_PER_PAGE)
    n += len(book.images)
    return n + _config_pages(book.config)


def _config_pages(config: str) -> int:
    lines = config.rstrip("\n").splitlines() if config.strip() else []
    return math.ceil(len(lines) / CONFIG_LINES_PER_PAGE) if lines else 0


def _reduce(image: np.ndarray, max_px: int = MAX_IMAGE_PX) -> np.ndarray:
    """Whole-factor box average so neither side exceeds max_px."""
    h, w = image.shape[:2]
    f = math.ceil(max(h, w) / max_px)
    if f <= 1:
        return image
    from pipeline.render.canvas import resize_patches

    h2, w2 = h // f, w // f
    return resize_patches(image[None, :h2 * f, :w2 * f, :3], (h2, w2))[0]


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _image_page(pdf: PdfPages, image: np.ndarray, title: str, page: int) -> None:
    h, w = image.shape[:2]
    landscape = w > 1.15 * h
    size = (A4[1], A4[0]) if landscape else A4
    fig = Figure(figsize=size)
    top, bottom, side = 0.55, 0.4, 0.4  # inches of margin
    box_w, box_h = size[0] - 2 * side, size[1] - top - bottom
    scale = min(box_w / w, box_h / h)
    iw, ih = w * scale, h * scale
    ax = fig.add_axes(((size[0] - iw) / 2 / size[0], (bottom + (box_h - ih) / 2) / size[1], iw / size[0],
                       ih / size[1]))
    ax.imshow(image, interpolation="none")
    ax.set_axis_off()
    fig.text(0.5, 1 - 0.3 / size[1], title, ha="center", va="center", fontsize=11, weight="bold")
    fig.text(0.5, 0.2 / size[1], str(page), ha="center", va="center", fontsize=8, color="0.4")
    pdf.savefig(fig)


def _cards_page(pdf: PdfPages, cards: list[tuple[int, Path]], layer: str, page: int) -> None:
    fig = Figure(figsize=A4)
    slot_h = (A4[1] - 1.0) / CARDS_PER_PAGE
    for i, (unit, path) in enumerate(cards):
        image = _load(path)
        h, w = image.shape[:2]
        scale = min((A4[0] - 0.8) / w, (slot_h - 0.25) / h)
        iw, ih = w * scale, h * scale
        y = A4[1] - 0.6 - (i + 1) * slot_h + (slot_h - ih) / 2
        ax = fig.add_axes(((A4[0] - iw) / 2 / A4[0], y / A4[1], iw / A4[0], ih / A4[1]))
        ax.imshow(image, interpolation="none")
        ax.set_axis_off()
    fig.text(0.5, 1 - 0.3 / A4[1], f"{layer}: unit cards", ha="center", va="center", fontsize=11, weight="bold")
    fig.text(0.5, 0.2 / A4[1], str(page), ha="center", va="center", fontsize=8, color="0.4")
    pdf.savefig(fig)


def _title_page(pdf: PdfPages, book: Book, contents: list[tuple[str, int]]) -> None:
    fig = Figure(figsize=A4)
    y = 1 - 0.9 / A4[1]
    fig.text(0.08, y, book.title, fontsize=20, weight="bold", va="top")
    y -= 0.5 / A4[1]
    fig.text(0.08, y, "channel report: top patches, unit cards and per-image maps", fontsize=11, color="0.3",
             va="top")
    y -= 0.55 / A4[1]
    for name, value in book.facts:
        lines = textwrap.wrap(str(value), 80) or [""]
        fig.text(0.08, y, name, fontsize=9, color="0.35", va="top")
        fig.text(0.3, y, "\n".join(lines), fontsize=9, va="top", linespacing=1.3)
        y -= (0.22 + 0.17 * (len(lines) - 1)) / A4[1]
    y -= 0.3 / A4[1]
    fig.text(0.08, y, "Contents", fontsize=13, weight="bold", va="top")
    y -= 0.35 / A4[1]
    for title, page in contents:
        if y < 1.4 / A4[1]:
            fig.text(0.08, y, "\u2026", fontsize=9, va="top")
            break
        fig.text(0.1, y, title, fontsize=9, va="top")
        fig.text(0.9, y, str(page), fontsize=9, va="top", ha="right")
        y -= 0.2 / A4[1]
    if book.notes:
        text = "Not in this run: " + "; ".join(book.notes)
        fig.text(0.08, 0.9 / A4[1], "\n".join(textwrap.wrap(text, 110)), fontsize=7, color="0.4", va="bottom")
    fig.text(0.5, 0.2 / A4[1], "1", ha="center", va="center", fontsize=8, color="0.4")
    pdf.savefig(fig)


def _config_page(pdf: PdfPages, lines: list[str], part: int, parts: int, page: int) -> None:
    fig = Figure(figsize=A4)
    title = "Configuration" + (f" ({part} of {parts})" if parts > 1 else "")
    fig.text(0.08, 1 - 0.5 / A4[1], title, fontsize=13, weight="bold", va="top")
    fig.text(0.08, 1 - 0.9 / A4[1], "\n".join(line[:120] for line in lines), fontsize=6.5, family="monospace",
             va="top", linespacing=1.25)
    fig.text(0.5, 0.2 / A4[1], str(page), ha="center", va="center", fontsize=8, color="0.4")
    pdf.savefig(fig)


def write_book(book: Book, path: Path) -> int:
    """Write the book to `path`; returns the number of pages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contents: list[tuple[str, int]] = []
    page = 2
    for title, _ in book.figures:
        contents.append((title, page))
        page += 1
    for layer in book.layers:
        contents.append((f"{layer.name}: sheet" + (f" and {len(layer.cards)} unit cards" if layer.cards else ""),
                         page))
        page += 1 + math.ceil(len(layer.cards) / CARDS_PER_PAGE)
    if book.images:
        contents.append((f"Per-image sheets ({len(book.images)})", page))
        page += len(book.images)
    if _config_pages(book.config):
        contents.append(("Configuration", page))
    total = page_count(book)
    with replacing(path) as tmp, PdfPages(tmp) as pdf, tqdm(total=total, desc="pdf book", unit="page") as bar:
        info = pdf.infodict()
        info["Title"] = f"{book.title}: channel report"
        info["Creator"] = "cnn-lens"
        _title_page(pdf, book, contents)
        n = 1
        bar.update(1)
        for _, make in book.figures:
            fig = make()
            n += 1
            fig.text(0.5, 0.01, str(n), ha="center", va="bottom", fontsize=8, color="0.4")
            pdf.savefig(fig)
            bar.update(1)
        for layer in book.layers:
            n += 1
            _image_page(pdf, _reduce(_load(layer.sheet)), f"{layer.name}: all units", n)
            bar.update(1)
            for start in range(0, len(layer.cards), CARDS_PER_PAGE):
                n += 1
                _cards_page(pdf, layer.cards[start:start + CARDS_PER_PAGE], layer.name, n)
                bar.update(1)
        for _, sheet in book.images:  # the sheet carries its own title
            n += 1
            _image_page(pdf, _reduce(_load(sheet)), "", n)
            bar.update(1)
        lines = book.config.rstrip("\n").splitlines() if book.config.strip() else []
        parts = _config_pages(book.config)
        for part in range(parts):
            n += 1
            _config_page(pdf, lines[part * CONFIG_LINES_PER_PAGE:(part + 1) * CONFIG_LINES_PER_PAGE], part + 1, parts,
                         n)
            bar.update(1)
    logger.info("pdf book: %d pages in %s", n, path)
    return n
