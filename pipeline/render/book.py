"""One PDF book of a run, written with matplotlib's PdfPages: every page A4 portrait.

    page 1              title, run facts, contents with page numbers
    then                the run figures (sparsity, selectivity by depth), one page each
    per layer           its sheet: one page, or, where the units' montages would be drawn
                        smaller than MIN_MONTAGE_PX at BOOK_DPI, cut between whole montages
                        into as many pages as keep them that large; then its chosen units'
                        cards, CARDS_PER_PAGE a page
    per image           its per-image sheet (one page each)
    last                the resolved config (as many pages as it needs)

Raster pages (sheets, cards) are embedded pixel for pixel, never resampled by the PDF
backend (images larger than MAX_IMAGE_PX a side are area-reduced first).
"""

from __future__ import annotations

import logging
import math
import textwrap
from contextlib import contextmanager
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
MAX_IMAGE_PX = 1800  # a sheet in the book: about 240 dpi across an A4 page
CONFIG_LINES_PER_PAGE = 90
BOOK_DPI = 150  # the resolution the book is read at (screen or print)
MIN_MONTAGE_PX = 48  # a unit's montage on a sheet page is at least this wide at BOOK_DPI
FIGURE_DPI = 200  # run figures are drawn at this resolution onto an A4 page
MARGIN_TOP, MARGIN_BOTTOM, MARGIN_SIDE = 0.55, 0.4, 0.4  # inches


@dataclass
class BookLayer:
    name: str
    sheet: Path
    cards: list[tuple[int, Path]] = field(default_factory=list)  # (unit, card image)
    grid: object = None  # sheets.SheetGrid of the sheet: where it may be cut (None: one page)

    def tiles(self) -> list[tuple[int, int, int, int]]:
        return sheet_tiles(self.grid)


def sheet_tiles(grid) -> list[tuple[int, int, int, int]]:
    """A sheet's pages, (y0, y1, x0, x1) in sheet pixels each; (0, 0, 0, 0) is the whole sheet,
    one page, where its montages are drawn at least MIN_MONTAGE_PX wide at BOOK_DPI on A4.
    Otherwise the grid is cut between whole montages into even blocks of rows and columns
    that keep them that large (the page title then names the layer and the part)."""
    if grid is None:
        return [(0, 0, 0, 0)]
    box_w, box_h = A4[0] - 2 * MARGIN_SIDE, A4[1] - MARGIN_TOP - MARGIN_BOTTOM
    need = MIN_MONTAGE_PX / BOOK_DPI / grid.montage_w  # inches per sheet pixel that keep montages readable
    if min(box_w / grid.width, box_h / grid.height) >= need:
        return [(0, 0, 0, 0)]
    cols = max(1, min(grid.cols, int(box_w / need) // grid.pitch_x))
    rows = max(1, min(grid.rows, int(box_h / need) // grid.pitch_y))
    cols = math.ceil(grid.cols / math.ceil(grid.cols / cols))  # pages of even size
    rows = math.ceil(grid.rows / math.ceil(grid.rows / rows))
    return [(grid.top + r0 * grid.pitch_y, grid.top + min(grid.rows, r0 + rows) * grid.pitch_y,
             grid.left + c0 * grid.pitch_x, grid.left + min(grid.cols, c0 + cols) * grid.pitch_x)
            for r0 in range(0, grid.rows, rows) for c0 in range(0, grid.cols, cols)]


@dataclass
class Book:
    title: str
    facts: list[tuple[str, str]]
    layers: list[BookLayer]
    images: list[tuple[str, Path]]  # (caption, per-image sheet PNG)
    config: str
    figures: list = field(default_factory=list)  # run figures: (title, function () -> matplotlib Figure)
    notes: list[str] = field(default_factory=list)
    pixels: dict = field(default_factory=dict)  # sheet path -> its pixels where the caller drew them just now


def page_count(book: Book) -> int:
    """Pages write_book produces for `book` (tests and the log use it)."""
    n = 1 + len(book.figures)
    for layer in book.layers:
        n += len(layer.tiles()) + math.ceil(len(layer.cards) / CARDS_PER_PAGE)
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


def _load(path: Path, pixels: dict | None = None) -> np.ndarray:
    """A sheet's pixels: from `pixels` where they are there (not decoded again), else its file."""
    if pixels and path in pixels:
        return pixels[path]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _figure_image(fig) -> np.ndarray:
    """A run figure drawn at FIGURE_DPI, as pixels for an A4 page (one page size in the book)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(FIGURE_DPI)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _image_page(pdf: PdfPages, image: np.ndarray, title: str, page: int) -> None:
    h, w = image.shape[:2]
    size = A4
    fig = Figure(figsize=size)
    top, bottom, side = MARGIN_TOP, MARGIN_BOTTOM, MARGIN_SIDE  # inches
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


PDF_PNG_LEVEL = 1  # zlib level of the book's rasters: a third less time than Pillow's default 6, 6 % more bytes


@contextmanager
def _png_level(level: int):
    """Pillow's PNG encoder at zlib `level` unless a caller asks for another: matplotlib's PDF
    backend deflates every page raster through it at the default level, with no option of its own."""
    from PIL import Image, PngImagePlugin  # noqa: F401  (importing it registers the PNG encoder)

    saved = Image.SAVE["PNG"]

    def save(im, fp, filename):
        im.encoderinfo.setdefault("compress_level", level)
        return saved(im, fp, filename)

    Image.SAVE["PNG"] = save
    try:
        yield
    finally:
        Image.SAVE["PNG"] = saved


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
        pages = len(layer.tiles())
        contents.append((f"{layer.name}: sheet" + (f" ({pages} pages)" if pages > 1 else "")
                         + (f" and {len(layer.cards)} unit cards" if layer.cards else ""), page))
        page += pages + math.ceil(len(layer.cards) / CARDS_PER_PAGE)
    if book.images:
        contents.append((f"Per-image sheets ({len(book.images)})", page))
        page += len(book.images)
    if _config_pages(book.config):
        contents.append(("Configuration", page))
    total = page_count(book)
    with replacing(path) as tmp, _png_level(PDF_PNG_LEVEL), PdfPages(tmp) as pdf, \
            tqdm(total=total, desc="pdf book", unit="page") as bar:
        info = pdf.infodict()
        info["Title"] = f"{book.title}: channel report"
        info["Creator"] = "cnn-lens"
        _title_page(pdf, book, contents)
        n = 1
        bar.update(1)
        for title, make in book.figures:
            n += 1
            _image_page(pdf, _figure_image(make()), title, n)
            bar.update(1)
        for layer in book.layers:
            sheet = _load(layer.sheet, book.pixels)
            tiles = layer.tiles()
            for i, (y0, y1, x0, x1) in enumerate(tiles):
                n += 1
                part = sheet if y1 == 0 else sheet[y0:y1, x0:x1]
                title = f"{layer.name}: all units" + (f" ({i + 1} of {len(tiles)})" if len(tiles) > 1 else "")
                _image_page(pdf, _reduce(part), title, n)
                bar.update(1)
            for start in range(0, len(layer.cards), CARDS_PER_PAGE):
                n += 1
                _cards_page(pdf, layer.cards[start:start + CARDS_PER_PAGE], layer.name, n)
                bar.update(1)
        for _, sheet in book.images:  # the sheet carries its own title
            n += 1
            _image_page(pdf, _reduce(_load(sheet, book.pixels)), "", n)
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
