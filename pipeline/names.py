"""Names (file paths, class folders, labels) losslessly and readably.

Paths live in Python as the OS gives them: `str`, with bytes that are not UTF-8 held as
lone surrogates (U+DC80..U+DCFF, Python's "surrogateescape"). `os.fsencode` gives the
exact bytes back, so such a path still opens its file. HDF5 text must be valid UTF-8,
so stored text goes through `readable` (those bytes become a visible `\\xNN`) and the
exact bytes of each path are stored beside it (see store.write_paths).

`shown` is what every picture, page and text file prints: `readable`, with control
characters (newline, tab, bell, ...) escaped, so a name always stays on one line.
"""

from __future__ import annotations

import os
import re

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def readable(text: str) -> str:
    """`text` as valid UTF-8: surrogate-escaped bytes become `\\xNN` (other lone
    surrogates `\\udNNN`); text that already is valid is returned as it is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _escape(match: re.Match) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def shown(text) -> str:
    """One line of valid text for people: `readable`, control characters escaped."""
    return _CONTROL.sub(_escape, readable(str(text)))


def exact_bytes(path: str) -> bytes:
    """The bytes the file system knows `path` by."""
    return os.fsencode(path)


def from_bytes(raw: bytes) -> str:
    """The path (surrogate-escaped str) of exact file-system bytes."""
    return os.fsdecode(bytes(raw))
