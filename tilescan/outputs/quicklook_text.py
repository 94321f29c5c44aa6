"""Text on the quicklook: its font, lines wrapped to a width, and Pillow's drawing confined to
a band of rows, each text rendered once and pasted (:class:`BandDraw`).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from .fonts import font_for


def font(size: int, text: str = ""):
    """A TrueType font of ``size`` px that has the characters of ``text`` (:func:`fonts.font_for`:
    DejaVu Sans, or an installed font for the characters it lacks); Pillow's own font if there
    is none. Not cached: a font object is not shared between the threads that draw quicklooks."""
    from PIL import ImageFont

    path = font_for(text)
    if path is not None:
        with contextlib.suppress(OSError):
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


_font = font  # for BandDraw.text, whose argument is named ``font`` as Pillow's is


def wrap(size: int, text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` px wide in the ``size`` px font
    (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_len(size, f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def fit(size: int, text: str, width: int) -> str:
    """``text``, or its longest start that fits ``width`` px with "…" after it, in the ``size`` px
    font: a class name longer than the legend's room is cut, not drawn over the colour bar."""
    if text_len(size, text) <= width:
        return text
    lo, hi = 0, len(text) - 1  # the longest start that fits lies in lo..hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_len(size, text[:mid].rstrip() + "…") <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


class Overflow(Exception):
    """Something drawn on a band of the quicklook would reach outside it."""


@functools.lru_cache(maxsize=4096)
def ink_box(size: int, text: str) -> tuple[int, int, int, int]:
    """Where the ink of ``text`` in the ``size`` px font falls, relative to where it is drawn."""
    return tuple(font(size, text).getbbox(text))


@functools.lru_cache(maxsize=4096)
def text_len(size: int, text: str) -> float:
    """The advance of ``text`` in the ``size`` px font (as ``ImageDraw.textlength`` measures it)."""
    from PIL import Image, ImageDraw

    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font(size, text))


@functools.lru_cache(maxsize=4096)
def text_mask(size: int, text: str):
    """``text`` in the ``size`` px font as Pillow draws it: its coverage mask (an "L" image of
    its ink box) and the box's offset from the point drawn at. Rendered once per text; each
    quicklook pastes it, which blends exactly as ``ImageDraw.text`` does (both fill the ink
    through the same mask)."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = ink_box(size, text)
    mask = Image.new("L", (max(1, x1 - x0), max(1, y1 - y0)), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), text, fill=255, font=font(size, text))
    return mask, x0, y0


class BandDraw:
    """Pillow's drawing on rows ``y0 .. y1`` of the quicklook, in the quicklook's coordinates;
    raises :class:`Overflow` instead of drawing anything that would reach outside those rows."""

    def __init__(self, image, y0: int, y1: int, size: int):
        from PIL import ImageDraw

        self.image, self.y0, self.y1, self.size = image, y0, y1, size
        self.draw = None if image is None else ImageDraw.Draw(image)

    def _rows(self, top: int, bottom: int) -> int:
        if top < self.y0 or bottom > self.y1:
            raise Overflow
        return self.y0

    def textlength(self, text: str, font=None) -> float:
        return text_len(self.size, text)

    def text(self, xy, text: str, fill, font) -> None:
        _, top, _, bottom = ink_box(self.size, text)
        y0 = self._rows(xy[1] + top, xy[1] + bottom)
        x, y = xy[0], xy[1] - y0
        if isinstance(x, int) and isinstance(y, int):
            mask, dx, dy = text_mask(self.size, text)
            self.image.paste(fill, (x + dx, y + dy), mask)
        else:  # a sub-pixel position: drawn afresh, in the font its characters need
            self.draw.text((x, y), text, fill=fill, font=_font(self.size, text))

    def rectangle(self, xy, fill=None, outline=None) -> None:
        x0, ya, x1, yb = xy
        y0 = self._rows(min(ya, yb), max(ya, yb) + 1)
        self.draw.rectangle([x0, ya - y0, x1, yb - y0], fill=fill, outline=outline)

    def line(self, xy, fill) -> None:
        x0, ya, x1, yb = xy
        y0 = self._rows(min(ya, yb), max(ya, yb) + 1)
        self.draw.line([x0, ya - y0, x1, yb - y0], fill=fill)


def drawn(canvas: np.ndarray, y0: int, y1: int, size: int, paint) -> np.ndarray:
    """Rows ``y0 .. y1`` of ``canvas`` after ``paint(draw)`` drew on them (a :class:`BandDraw`)."""
    from PIL import Image

    if y1 <= y0:
        paint(BandDraw(None, y0, y1, size))  # any drawing there overflows
        return canvas[y0:y1]
    image = Image.fromarray(canvas[y0:y1], "RGB")
    paint(BandDraw(image, y0, y1, size))
    return np.asarray(image)
