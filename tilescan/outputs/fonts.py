"""The fonts of the text tilescan draws (the quicklook's legend, explain's and evaluate's
figures): DejaVu Sans as shipped with matplotlib (Latin, Greek, Cyrillic), and, for a text
holding characters it lacks (class names in Chinese, Japanese, Korean, Thai...), a font that
has them all: ``TILESCAN_FONT`` (a .ttf/.otf/.ttc file) first, then the fonts installed in the
usual folders. When none has them, :func:`check_names` names the characters and how to get a font.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import unicodedata
from pathlib import Path
from typing import Callable, Sequence

#: A font file to use for characters DejaVu Sans lacks, before the installed ones.
FONT_ENV = "TILESCAN_FONT"

#: Where fonts are installed (Linux, macOS, Windows); searched only for a text DejaVu cannot draw.
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts", "/Library/Fonts",
             "/System/Library/Fonts", "~/Library/Fonts", "C:/Windows/Fonts")
_FONT_SUFFIXES = (".ttf", ".otf", ".ttc")


@functools.lru_cache(maxsize=1)
def dejavu_path() -> str | None:
    """DejaVu Sans as shipped with matplotlib (found without importing it), or None."""
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return str(p)
    return None


@functools.lru_cache(maxsize=None)
def _chars(path: str) -> frozenset[int]:
    """The code points the font's first face maps (empty when it cannot be read)."""
    try:
        from fontTools.ttLib import TTFont

        with TTFont(path, lazy=True, fontNumber=0) as f:
            return frozenset(f.getBestCmap() or ())
    except Exception:  # not a font fontTools reads (or fontTools missing): never chosen
        return frozenset()


#: Words in the file names of fonts made for many scripts: read first.
_WIDE_FONTS = ("cjk", "wqy", "hei", "song", "ming", "gothic", "fallback", "unifont", "noto", "arialuni")

#: At most this many font files are read (a desktop may have thousands; each read takes ms).
MAX_FONTS_READ = 300


@functools.lru_cache(maxsize=1)
def _installed() -> tuple[str, ...]:
    """The font files in :data:`FONT_DIRS`, those named for many scripts first, at most
    :data:`MAX_FONTS_READ` of them."""
    found: list[str] = []
    for d in FONT_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            found += sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in _FONT_SUFFIXES)
    found.sort(key=lambda p: not any(w in Path(p).name.lower() for w in _WIDE_FONTS))  # stable: folder order kept
    return tuple(found[:MAX_FONTS_READ])


def _needed(text: str) -> frozenset[int]:
    """The characters of ``text`` DejaVu Sans lacks (none for ASCII, without reading a font)."""
    if text.isascii():
        return frozenset()
    base = dejavu_path()
    have = _chars(base) if base else frozenset()
    return frozenset(ord(c) for c in text if not c.isspace() and ord(c) not in have)


@functools.lru_cache(maxsize=1024)
def font_for(text: str) -> str | None:
    """The font file to draw ``text`` in: DejaVu Sans when it has every character, else the
    first of ``TILESCAN_FONT`` and the installed fonts that has them all, else the one that has
    most of them (a Chinese name beside an emoji: the Chinese drawn), else DejaVu Sans
    (:func:`check_names` names what shows as boxes)."""
    need = _needed(text)
    if not need:
        return dejavu_path()
    own = os.environ.get(FONT_ENV, "")
    best, most = dejavu_path(), 0
    for path in ([own] if own else []) + list(_installed()):
        have = len(need & _chars(path))
        if have == len(need):
            return path
        if have > most:
            best, most = path, have
    return best


def _missing(text: str) -> frozenset[int]:
    """The characters of ``text`` that the font it is drawn in (:func:`font_for`) lacks."""
    need = _needed(text)
    return need - _chars(font_for(text)) if need and font_for(text) else need


def check_names(names: Sequence[str], log: Callable[[str], None], where: str) -> None:
    """Warn through ``log`` when no font found draws some characters of the class ``names``
    (they would show as boxes in ``where``). Called once by the command that draws them: the
    quicklooks may be drawn in helper processes, whose messages reach no one."""
    chars = sorted({chr(c) for n in names for c in _missing(n)})
    if chars:
        log(f"warning: no installed font has the characters {''.join(chars[:20])!r} of the class names: they show "
            f"as boxes in {where}; install a font that has them (e.g. Debian's {_font_package(chars)}) or name one in "
            f"{FONT_ENV}")


def _font_package(chars: Sequence[str]) -> str:
    """Debian's font packages that have ``chars``: by script, as far as a hint can tell."""
    def kind(c: str) -> str:
        if ord(c) >= 0x1F000 or unicodedata.category(c) == "So":
            return "symbols"
        return "wide" if unicodedata.east_asian_width(c) in "WF" else "other"

    kinds = {kind(c) for c in chars}
    packs = [p for k, p in (("wide", "fonts-noto-cjk for Chinese, Japanese, Korean"),
                            ("symbols", "fonts-symbola for symbols and emoji"),
                            ("other", "fonts-noto-core for other scripts")) if k in kinds]
    return ", ".join(packs)


def family_for(text: str) -> str | None:
    """matplotlib's family name for :func:`font_for`'s font when it is not DejaVu Sans (the
    file registered with matplotlib's font manager), else None."""
    path = font_for(text)
    if path is None or path == dejavu_path():
        return None
    return _registered(path)


@functools.lru_cache(maxsize=16)
def _registered(path: str) -> str:
    from matplotlib import font_manager

    font_manager.fontManager.addfont(path)
    return font_manager.FontProperties(fname=path).get_name()
