"""Fonts for text in any script: DejaVu Sans first, then the system's fonts for Chinese,
Japanese and Korean where it has them (Debian: fonts-noto-cjk), found through fontconfig.

The glyph renderer of cards and sheets (text.GlyphFont) takes each character from the first font that
has it; matplotlib figures get the same list as `font.family` inside `figure_fonts()`
(an rc_context, so importing this changes nothing global). A character no font has is
drawn as a boxed '?' by the cards and as matplotlib's own missing-glyph box in figures.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import shutil
import subprocess
from functools import lru_cache

logger = logging.getLogger(__name__)

PRIMARY = "DejaVu Sans"
LANGS = ("zh", "ja", "ko")
# where fontconfig is missing: file names of the common CJK fonts in the usual folders
GLOBS = ("/usr/share/fonts/**/NotoSansCJK*", "/usr/share/fonts/**/wqy*", "/usr/share/fonts/**/DroidSansFallback*")


def _rank(path: str, bold: bool) -> tuple:
    """Sans before serif and mono; the weight asked for first."""
    name = path.rsplit("/", 1)[-1].lower()
    return ("serif" in name, "mono" in name, ("bold" in name) != bold, name)


@lru_cache(maxsize=2)
def fallback_files(bold: bool = False) -> tuple[str, ...]:
    """Font files that cover CJK, best first; () where the system has none."""
    per_lang: list[list[str]] = []
    if shutil.which("fc-list"):
        for lang in LANGS:
            try:
                out = subprocess.run(["fc-list", f":lang={lang}", "file"], capture_output=True, text=True,
                                     timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            per_lang.append([line.split(":")[0].strip() for line in out.splitlines() if line.strip()])
    else:
        per_lang.append([f for pattern in GLOBS for f in glob.glob(pattern, recursive=True)])
    chosen: list[str] = []
    for files in per_lang:  # the best file of each language (often one file covers all three)
        fonts = sorted((f for f in files if f.lower().endswith((".ttf", ".otf", ".ttc"))), key=lambda p: _rank(p, bold))
        if fonts and fonts[0] not in chosen:
            chosen.append(fonts[0])
    return tuple(chosen)


@lru_cache(maxsize=1)
def family_list() -> tuple[str, ...]:
    """matplotlib's font.family: DejaVu Sans, then the CJK fallbacks (registered with
    matplotlib's font manager, which may not have scanned them)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    names = [PRIMARY]
    for path in fallback_files(False):
        try:
            font_manager.fontManager.addfont(path)
            name = FT2Font(path).family_name
        except (OSError, RuntimeError, ValueError) as e:
            logger.warning("font %s not usable (%s): left out", path, e)
            continue
        if name not in names:
            names.append(name)
    return tuple(names)


@contextlib.contextmanager
def figure_fonts():
    """matplotlib figures made inside draw names in any script the system has a font for,
    literally: file, class and layer names reach titles, and '$x$', '^' or '_{' in one must
    neither crash a sheet nor change its text (no math). Nothing changes outside the block."""
    import matplotlib

    with matplotlib.rc_context({"font.family": list(family_list()), "text.parse_math": False}):
        yield
