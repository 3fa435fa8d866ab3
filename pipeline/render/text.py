"""Text on numpy images: a glyph atlas rendered once per size by matplotlib's FreeType
wrapper (`FT2Font`; CJK from the system's fallback fonts, a boxed '?' where none has the
character), strings pasted with numpy, so a line of text costs microseconds and no figure.

Used by the unit cards and the layer sheets; nothing here knows about either.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np

from pipeline.names import shown
from pipeline.render.fonts import PRIMARY, fallback_files

logger = logging.getLogger(__name__)

INK = (34, 34, 34)  # default text colour
CARD_BG = 255  # the white that dark text is blended over from a cache


class GlyphFont:
    """DejaVu Sans at one pixel size: glyphs rendered once by FreeType, strings pasted in numpy.

    A character DejaVu Sans lacks comes from the first fallback font that has it (CJK fonts,
    fonts.fallback_files; `fallbacks=()` uses none), one that no font has is a boxed '?'.
    Kerning is not applied (labels and numbers only). `mask(text)` gives an alpha image
    (height, width) float32 in [0, 1]; the baseline lies `ascent` rows below its top.
    """

    def __init__(self, size_px: int, bold: bool = False, fallbacks: tuple[str, ...] | None = None):
        from matplotlib import font_manager
        from matplotlib.font_manager import FontProperties

        path = font_manager.findfont(FontProperties(family=PRIMARY, weight="bold" if bold else "normal"))
        self._ft = self._open(path, size_px)
        upem = self._ft.units_per_EM
        self.size = size_px
        self.bold = bold
        self.ascent = int(math.ceil(self._ft.ascender / upem * size_px))
        self.descent = int(math.ceil(-self._ft.descender / upem * size_px))
        self.height = self.ascent + self.descent
        self._glyphs: dict[str, tuple[np.ndarray, int, int, int]] = {}
        self._fallback_paths = fallbacks
        self._fallbacks: list | None = None  # opened on the first character DejaVu Sans lacks

    @staticmethod
    def _open(path: str, size_px: int):
        from matplotlib.ft2font import FT2Font

        ft = FT2Font(path)
        ft.set_size(float(size_px), 72.0)  # 72 dpi: one point is one pixel
        return ft

    def _face(self, ch: str):
        """The first font that has `ch`, or None."""
        if self._ft.get_char_index(ord(ch)):
            return self._ft
        if self._fallbacks is None:
            paths = fallback_files(self.bold) if self._fallback_paths is None else self._fallback_paths
            self._fallbacks = []
            for p in paths:
                try:
                    self._fallbacks.append(self._open(p, self.size))
                except (OSError, RuntimeError) as e:
                    logger.warning("font %s not usable (%s): left out", p, e)
        return next((ft for ft in self._fallbacks if ft.get_char_index(ord(ch))), None)

    def _glyph(self, ch: str) -> tuple[np.ndarray, int, int, int]:
        """(alpha, left offset, row of the bitmap's top relative to the top of the line, advance)."""
        got = self._glyphs.get(ch)
        if got is not None:
            return got
        from matplotlib.ft2font import LoadFlags

        ft = self._face(ch)
        if ft is None:
            got = self._placeholder()
        else:
            ft.set_text(ch, 0.0, flags=LoadFlags.FORCE_AUTOHINT)
            ft.draw_glyphs_to_bitmap(antialiased=True)
            alpha = np.asarray(ft.get_image(), np.float32) / 255.0
            left = math.floor(ft.get_bitmap_offset()[0] / 64)  # the bitmap starts at the pixel holding xMin
            g = ft.load_char(ord(ch), flags=LoadFlags.FORCE_AUTOHINT)
            # the bitmap's first row lies floor(yMax) + 1 pixels above the baseline (yMax: top of
            # the glyph's outline box, 26.6 fixed point)
            top = self.ascent - (g.bbox[3] // 64 + 1)
            got = (alpha, left, top, g.horiAdvance / 64)  # the hinted advance, as the hinted bitmap was drawn
        self._glyphs[ch] = got
        return got

    def _placeholder(self) -> tuple[np.ndarray, int, int, int]:
        """A '?' in a box: a character no font here has, visibly not dropped."""
        mark, _, mark_top, _ = self._glyph("?")
        mh, mw = mark.shape
        h, w = self.ascent + 1, mw + 4
        box = np.zeros((h, w), np.float32)
        box[[0, -1], :] = 1.0
        box[:, [0, -1]] = 1.0
        y0 = max(0, min(h - mh, mark_top))
        box[y0:y0 + mh, 2:2 + mw] = np.maximum(box[y0:y0 + mh, 2:2 + mw], mark[:h - y0])
        return box, 1, 0, float(w + 2)

    def width(self, text: str) -> int:
        glyphs = self._glyphs
        try:  # every character drawn before (nearly always): plain look-ups, the same sum
            return int(math.ceil(sum(glyphs[ch][3] for ch in text)))
        except KeyError:
            return int(math.ceil(sum(self._glyph(ch)[3] for ch in text)))

    def fit(self, text: str, max_width: int | None) -> str:
        """`text`, cut and ended with an ellipsis where it is wider than max_width."""
        if max_width is None or self.width(text) <= max_width:
            return text
        ell = self.width("\u2026")
        out, used = [], 0
        for ch in text:
            adv = self._glyph(ch)[3]
            if used + adv + ell > max_width:
                break
            out.append(ch)
            used += adv
        return "".join(out) + "\u2026"

    def mask(self, text: str) -> np.ndarray:
        return _mask(self, text).copy()


@lru_cache(maxsize=16384)
def _mask(font: GlyphFont, text: str) -> np.ndarray:
    width = max(1, font.width(text) + 2)
    out = np.zeros((font.height + 2, width), np.float32)
    words = text.split(" ")
    if len(words) < 3 or not _composable(font, text):
        _draw_glyphs(font, text, out, 0)
        return out
    # a line of many words (a card's statistics, mostly the same words with other numbers):
    # pasted from cached words, the same pixels as glyph by glyph where every advance is a
    # whole pixel and no glyph reaches PAD beyond its advance
    space, pen = int(font._glyph(" ")[3]), 0
    for word in words:
        if word:
            piece = _word(font, word)
            x0 = pen - PAD
            a, b = max(0, x0), min(width, x0 + piece.shape[1])
            if b > a:
                np.maximum(out[:, a:b], piece[:, a - x0:b - x0], out=out[:, a:b])
            pen += font.width(word)
        pen += space
    return out


PAD = 8  # px a word's cached mask keeps on either side for glyphs reaching beyond their advance


def _composable(font: GlyphFont, text: str) -> bool:
    for ch in set(text):
        alpha, left, _, adv = font._glyph(ch)
        if adv != int(adv) or left < -PAD or left + alpha.shape[1] > adv + PAD:
            return False
    return True


@lru_cache(maxsize=4096)
def _word(font: GlyphFont, word: str) -> np.ndarray:
    out = np.zeros((font.height + 2, font.width(word) + 2 * PAD), np.float32)
    _draw_glyphs(font, word, out, PAD)
    return out


def _draw_glyphs(font: GlyphFont, text: str, out: np.ndarray, start: int) -> None:
    """Glyph by glyph onto the line mask `out`, the pen starting at column `start`."""
    pen = float(start)
    for ch in text:
        alpha, left, top, adv = font._glyph(ch)
        h, w = alpha.shape
        gx = int(round(pen)) + left
        y0, x0 = max(0, top), max(0, gx)
        y1, x1 = min(out.shape[0], top + h), min(out.shape[1], gx + w)
        if y1 > y0 and x1 > x0:
            region = out[y0:y1, x0:x1]
            np.maximum(region, alpha[y0 - top:y1 - top, x0 - gx:x1 - gx], out=region)
        pen += adv


@lru_cache(maxsize=16)
def font(size_px: int, bold: bool = False) -> GlyphFont:
    return GlyphFont(size_px, bold)


def wrap(text: str, size: int, width: int, bold: bool = False) -> list[str]:
    """Greedy word wrap of `text` into lines no wider than `width` pixels."""
    f = font(int(size), bold)
    lines, line = [], ""
    for word in shown(text).split(" "):
        trial = f"{line} {word}" if line else word
        if line and f.width(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    if line:
        lines.append(line)
    return lines


def draw_text(canvas: np.ndarray, text: str, x: float, y: float, size: int = 12, color=INK,
              bold: bool = False, align: str = "left", max_width: int | None = None) -> int:
    """Draw one line of text on canvas (..., H, W, 3) uint8 in place; (x, y) is the
    left/centre/right end (align) of the line box's top. Leading axes (a block of
    cards) all get the same text. Returns the drawn width in pixels."""
    alpha, weight = _fitted(font(int(size), bold), shown(text), max_width)  # control characters escaped
    h, w = alpha.shape
    x0 = int(round(x - (w if align == "right" else w / 2 if align == "center" else 0)))
    y0 = int(round(y))
    H, W = canvas.shape[-3:-1]
    cy0, cx0, cy1, cx1 = max(0, y0), max(0, x0), min(H, y0 + h), min(W, x0 + w)
    if cy1 <= cy0 or cx1 <= cx0:
        return 0
    region = canvas[..., cy0:cy1, cx0:cx1, :]
    if canvas.ndim == 3 and max(color) <= 160 and region.min() == CARD_BG:
        # dark text on the card's white (most of a card's text): the blend over white, cached
        np.minimum(region, _inked(alpha, weight, tuple(color))[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], out=region)
        return w
    a = weight[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None]  # uint16, 0..256
    mixed = region * (256 - a) + np.asarray(color, np.uint16) * a + 128
    region[...] = (mixed >> 8).astype(np.uint8)
    return w


_INKED: dict = {}


def _inked(alpha: np.ndarray, weight: np.ndarray, color: tuple) -> np.ndarray:
    """(h, w, 3) uint8: the text of `weight` blended over CARD_BG exactly as draw_text blends."""
    key = (id(alpha), color)
    got = _INKED.get(key)
    if got is None or got[0] is not alpha:
        if len(_INKED) > 16384:
            _INKED.clear()
        a = weight[..., None]
        ink = ((CARD_BG * (256 - a) + np.asarray(color, np.uint16) * a + 128) >> 8).astype(np.uint8)
        got = _INKED[key] = (alpha, ink)
    return got[1]


@lru_cache(maxsize=16384)
def _fitted(f: GlyphFont, text: str, max_width: int | None) -> tuple[np.ndarray, np.ndarray]:
    alpha = _mask(f, f.fit(text, max_width))
    return alpha, np.rint(alpha * 256).astype(np.uint16)


def fmt_value(v: float) -> str:
    """A stored value in at most about five characters: 0, 0.123, 12.3, 1.23e+05, '-' for NaN."""
    if not np.isfinite(v):
        return "\u2013"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3g}" if a < 100 else f"{v:.1f}"
