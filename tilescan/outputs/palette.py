"""Class colours: a fixed palette extended by farthest-first picks in CIELAB, or a legend's
own colours (a model's ``legend.colors``: :mod:`tilescan.training.legend_colors`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

# --------------------------------------------------------------------------- colours

# 30 colours far apart in CIELAB (lightness 35..90, chroma >= 15, so each one stays visible
# blended over imagery): the four seeds (red, green, blue, yellow) then, one at a time, the
# candidate of _PALETTE_GRID farthest from all colours already taken; that is what
# _extend_palette computes, stored here so the colours never change with numpy or rounding.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (75, 0, 255),
    (255, 105, 240), (255, 210, 195), (0, 240, 240), (120, 75, 0), (0, 255, 0),
    (135, 60, 105), (30, 105, 90), (45, 105, 255), (255, 120, 0), (225, 180, 255),
    (180, 180, 90), (165, 210, 240), (255, 135, 165), (135, 15, 195), (165, 240, 60),
    (255, 0, 150), (165, 240, 180), (255, 0, 15), (255, 165, 105), (90, 75, 165),
    (150, 120, 105), (60, 105, 15), (165, 45, 0), (0, 255, 120), (240, 0, 255),
)


_PALETTE_GRID = 15  # RGB step of the candidate colours


_PALETTE_L = (35.0, 90.0)


_PALETTE_MIN_CHROMA = 15.0


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB colours ``(..., 3)``."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@functools.cache
def _candidates() -> tuple[np.ndarray, np.ndarray]:
    """The colours of the _PALETTE_GRID that stay visible over imagery, and their CIELAB."""
    g = np.arange(0, 256, _PALETTE_GRID)
    cand = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = srgb_to_lab(cand)
    keep = ((lab[:, 0] >= _PALETTE_L[0]) & (lab[:, 0] <= _PALETTE_L[1])
            & (np.hypot(lab[:, 1], lab[:, 2]) >= _PALETTE_MIN_CHROMA))
    return cand[keep], lab[keep]


def farthest_colors(taken: Sequence[Sequence[int]], n: int) -> list[tuple[int, int, int]]:
    """``n`` candidate colours, each the one farthest in CIELAB from ``taken`` (not empty) and
    those picked before it: colours a legend's own do not look like."""
    cand, lab = _candidates()
    out: list[tuple[int, int, int]] = []
    dist = np.min(np.linalg.norm(lab[:, None] - srgb_to_lab(np.array(taken))[None], axis=-1), axis=1)
    while len(out) < n:
        i = int(np.argmax(dist))
        out.append(tuple(int(v) for v in cand[i]))
        dist = np.minimum(dist, np.linalg.norm(lab - lab[i], axis=1))
    return out


@functools.lru_cache(maxsize=8)
def _extend_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """:data:`_PALETTE` continued to ``n`` colours by the same farthest-first rule (for
    models with more than 30 classes)."""
    return tuple([*_PALETTE, *farthest_colors(_PALETTE, n - len(_PALETTE))])


def class_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct RGB colours, the same for the same index on every run: the label
    COG's colour table and the quicklook both use them.

    A qualitative palette: each colour is the one farthest (in CIELAB) from all before it,
    so any prefix is well spread; the first 30 are fixed (:data:`_PALETTE`).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= len(_PALETTE):
        return list(_PALETTE[:n])
    return list(_extend_palette(n))


def model_colors(n: int, own: Sequence[str] | None) -> tuple[tuple[int, int, int], ...]:
    """The colour of each of a model's ``n`` classes: its legend's own (``legend.colors``,
    ``#rrggbb`` each, from ``train --class-colors``) where it has one per class, else the palette's."""
    if own and len(own) == n:
        return tuple(parse_color(c) for c in own)
    return tuple(class_colors(n))


def colors_for(n: int, colors: Sequence[Sequence[int]] | None) -> tuple[tuple[int, int, int], ...]:
    """The ``n`` classes' colours a writer draws: ``colors`` (an (r, g, b) each, one per class)
    as integer tuples, else :func:`class_colors`; a ValueError where their count is not ``n``."""
    if colors is None:
        return tuple(class_colors(n))
    out = tuple(tuple(int(v) for v in c[:3]) for c in colors)
    if len(out) != n:
        raise ValueError(f"{len(out)} colours for {n} classes")
    return out  # type: ignore[return-value]


def hex_color(rgb: Sequence[int]) -> str:
    """``#rrggbb`` of an (r, g, b)."""
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


def parse_color(text: str) -> tuple[int, int, int]:
    """An (r, g, b) of ``#rrggbb``, ``#rgb`` or ``r,g,b[,a]`` (0..255 each; QGIS writes the
    latter, sometimes with more after them); a ValueError names what is wrong."""
    t = str(text).strip()
    if t.startswith("#"):
        h = t[1:]
        if len(h) == 3:
            h = "".join(ch * 2 for ch in h)
        if len(h) == 8:  # #rrggbbaa to some tools, #aarrggbb to Qt: not guessed
            raise ValueError(f"{t!r}: 8 hex digits are read as #rrggbbaa by some tools and #aarrggbb by others; "
                             "give #rrggbb")
        if len(h) == 6 and all(ch in "0123456789abcdefABCDEF" for ch in h):
            return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
        raise ValueError(f"{t!r} is not a colour (#rrggbb)")
    parts = [p.strip() for p in t.replace(";", ",").split(",")]
    try:
        rgb = tuple(int(p) for p in parts[:3])
    except ValueError:
        raise ValueError(f"{t!r} is not a colour (#rrggbb or r,g,b)") from None
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"{t!r} is not a colour (#rrggbb or r,g,b with values 0..255)")
    return rgb  # type: ignore[return-value]
