"""Where a tile's CAM lands on the scene heatmap: heat pixels, bilinear weights, valid-pixel
coverage (the geometry :class:`~tilescan.outputs.heatmap.HeatmapWriter` blends with).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np


def _pixel_starts(n_scene: int, n_heat: int) -> np.ndarray:
    """First scene pixel of each heat pixel (length ``n_heat + 1``; the last is ``n_scene``).

    A scene pixel belongs to the heat pixel its centre falls in: scene pixel ``p`` maps to
    ``floor((p + 0.5) * n_heat / n_scene)``. Exact integer arithmetic, no rounding drift.
    """
    j = np.arange(n_heat + 1, dtype=np.int64)
    num = 2 * j * n_scene - n_heat
    return -((-num) // (2 * n_heat))


def _heat_index(p: int, n_scene: int, n_heat: int) -> int:
    return ((2 * p + 1) * n_heat) // (2 * n_scene)


def _interp_matrix(pos: np.ndarray, n: int) -> np.ndarray:
    """(len(pos), n) bilinear weights sampling a length-``n`` signal at ``pos`` (pixel-centre
    coordinates, edges clamped) -- the same rule as ``cv2.resize(..., INTER_LINEAR)``."""
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.floor(pos).astype(np.int64)
    t = pos - i0
    i1 = np.minimum(i0 + 1, n - 1)
    m = np.zeros((pos.size, n), dtype=np.float64)
    rows = np.arange(pos.size)
    np.add.at(m, (rows, i0), 1.0 - t)
    np.add.at(m, (rows, i1), t)
    return m


@functools.lru_cache(maxsize=4096)
def _axis_interp(k0: int, k1: int, origin: int, span: int, n_cam: int, n_scene: int, n_heat: int) -> np.ndarray:
    """Bilinear weights ``(k1 - k0, n_cam)`` sampling a CAM of ``n_cam`` cells that spans
    scene pixels ``origin .. origin + span`` at the centres of heat pixels ``k0 .. k1`` along
    one axis. Cached (read-only): every tile of a grid row shares its row weights and every
    tile of a grid column its column weights, so blending costs no matrix building."""
    centres = (np.arange(k0, k1) + 0.5) * (n_scene / n_heat)
    m = _interp_matrix((centres - origin) / span * n_cam - 0.5, n_cam)
    m.setflags(write=False)
    return m


@functools.lru_cache(maxsize=64)
def _stretch_counts(n_mask: int, n_window: int) -> np.ndarray:
    """``(n_window + 1, n_mask)``: row ``x`` counts, for each mask pixel along one axis, the
    window pixels before ``x`` that a nearest stretch of the mask over the window gives it
    (cv2's own map, read off a resized index image). Differences of two rows give how many
    window pixels of a span each mask pixel fills, so mask sums need no stretched mask."""
    if n_mask == n_window:
        src = np.arange(n_window)
    else:
        import cv2

        idx = np.broadcast_to(np.arange(n_mask, dtype=np.float32), (n_mask, n_mask))
        src = cv2.resize(np.ascontiguousarray(idx), (n_window, n_window),
                         interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
    c = np.zeros((n_window + 1, n_mask), dtype=np.float64)
    c[np.arange(1, n_window + 1), src] = 1.0
    np.cumsum(c, axis=0, out=c)
    c.setflags(write=False)
    return c


@dataclasses.dataclass(frozen=True)
class _HeatGrid:
    width: int  # scene pixels
    height: int
    out_w: int  # heat pixels
    out_h: int
    col_start: np.ndarray
    row_start: np.ndarray

    _axes: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    _tables: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def make(cls, width: int, height: int, scale: float) -> "_HeatGrid":
        out_w = max(1, math.ceil(width * scale - 1e-9))
        out_h = max(1, math.ceil(height * scale - 1e-9))
        return cls(width, height, out_w, out_h, _pixel_starts(width, out_w), _pixel_starts(height, out_h))

    def _axis(self, axis: str, origin: int, span: int):
        """Along rows ("r") or columns ("c"), for a tile at ``origin`` of ``span`` scene
        pixels: the heat pixels ``k0 .. k1`` it touches, where its scene pixels start and end
        inside each (relative to ``origin``), and the share of each heat pixel it covers; or
        None outside the scene. Cached: the tiles of a grid row (column) share their rows
        (columns)."""
        key = (axis, origin, span)
        got = self._axes.get(key, False)
        if got is not False:
            return got
        size, n_heat, starts = (self.height, self.out_h, self.row_start) if axis == "r" else \
            (self.width, self.out_w, self.col_start)
        s, e = max(origin, 0), min(origin + span, size)
        if s >= e:
            got = None
        else:
            k0, k1 = _heat_index(s, size, n_heat), _heat_index(e - 1, size, n_heat) + 1
            a = np.clip(starts[k0:k1], s, e) - origin
            b = np.clip(starts[k0 + 1:k1 + 1], s, e) - origin
            share = (b - a) / (starts[k0 + 1:k1 + 1] - starts[k0:k1])
            for arr in (a, b, share):
                arr.setflags(write=False)
            got = (k0, k1, a, b, share)
        if len(self._axes) > 4096:
            self._axes.clear()
        self._axes[key] = got
        return got

    def columns(self, c0: np.ndarray, span: int, n_cam: int):
        """:meth:`_axis` and :func:`_axis_interp` for many tiles of width ``span`` at once
        (``c0`` every tile's first scene column, all inside the scene), padded to the widest
        footprint ``NI``: first heat column ``i0`` and count ``ni`` per tile, scene-column
        bounds ``a``/``b`` and ``share`` ``(n, NI)`` (padding: empty span, share 0), and the
        bilinear weights ``(n, NI, n_cam)`` (padding rows 0). Same arithmetic as the per-tile
        helpers, so the same bits."""
        size, n_heat, starts = self.width, self.out_w, self.col_start
        s, e = np.maximum(c0, 0), np.minimum(c0 + span, size)
        i0 = ((2 * s + 1) * n_heat) // (2 * size)
        ni = ((2 * (e - 1) + 1) * n_heat) // (2 * size) + 1 - i0
        width = int(ni.max())
        pad = np.arange(width)[None, :] >= ni[:, None]
        k = np.minimum(i0[:, None] + np.arange(width)[None, :], (i0 + ni - 1)[:, None])
        a = np.clip(starts[k], s[:, None], e[:, None]) - c0[:, None]
        b = np.clip(starts[k + 1], s[:, None], e[:, None]) - c0[:, None]
        share = (b - a) / (starts[k + 1] - starts[k])
        b[pad] = a[pad]
        share[pad] = 0.0
        # bilinear weights at each heat column centre, as _interp_matrix builds them
        centres = (k + 0.5) * (size / n_heat)
        pos = np.clip((centres - c0[:, None]) / span * n_cam - 0.5, 0.0, n_cam - 1.0)
        lo = np.floor(pos).astype(np.int64)
        t = pos - lo
        hi = np.minimum(lo + 1, n_cam - 1)
        rx = np.zeros((len(c0), width, n_cam), dtype=np.float64)
        n_idx, k_idx = np.indices(k.shape)
        rx[n_idx, k_idx, lo] = 1.0 - t
        rx[n_idx, k_idx, hi] += t
        rx[pad] = 0.0
        return i0, ni, a, b, share, rx

    def columns_of(self, c0: np.ndarray, span: int, n_cam: int, stride: int):
        """:meth:`columns`, read from a table of the tile grid's columns when every tile sits
        on a multiple of ``stride`` (as the grid's tiles do): all grid rows share it."""
        if stride < 1 or c0[0] < 0 or np.any(c0 % stride):
            return self.columns(c0, span, n_cam)
        key = (span, n_cam, stride)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) > 16:
                self._tables.clear()
            table = self._tables[key] = self.columns(np.arange(0, self.width, stride), span, n_cam)
        k = c0 // stride
        return tuple(x[k] for x in table)

    def contribution(self, window: Sequence[int], cam: np.ndarray, valid: np.ndarray | None):
        """Value and weight of one tile over the heat pixels it touches.

        Returns ``(j0, i0, value, weight)`` (``value``/``weight`` float64 of shape
        ``(nj, ni)`` starting at heat row ``j0``, column ``i0``) or None if the tile lies
        outside the scene. ``weight`` is the fraction of each heat pixel's scene pixels that
        are valid pixels of this tile; ``value`` is the CAM bilinearly resampled at the heat
        pixel's centre (the CAM spans the whole tile window).
        """
        c0, r0, tw, th = (int(v) for v in window)
        rows = self._axis("r", r0, th)
        cols = self._axis("c", c0, tw)
        if rows is None or cols is None:
            return None
        cam = np.asarray(cam, dtype=np.float64)
        if cam.ndim != 2 or min(cam.shape) < 1:
            raise ValueError(f"cam must be a non-empty 2-D array, got shape {cam.shape}")
        j0, j1, ra, rb, share_r = rows
        i0, i1, ca, cb, share_c = cols

        # weights: valid tile pixels inside each heat pixel / all scene pixels of it
        v = None if valid is None else np.asarray(valid, dtype=bool)
        if v is not None and v.ndim != 2:
            raise ValueError(f"valid mask must be 2-D, got shape {v.shape}")
        if v is None or v.all():  # every pixel valid (most tiles): no mask sums needed
            weight = np.outer(share_r, share_c)
        else:
            if v.shape != (th, tw):  # e.g. a mask at model resolution: stretch it (nearest)
                import cv2

                v = cv2.resize(v.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST).astype(bool)
            s = np.zeros((th + 1, tw + 1), dtype=np.int64)
            np.cumsum(np.cumsum(v, axis=0), axis=1, out=s[1:, 1:])
            counts = s[np.ix_(rb, cb)] - s[np.ix_(ra, cb)] - s[np.ix_(rb, ca)] + s[np.ix_(ra, ca)]
            area = ((self.row_start[j0 + 1:j1 + 1] - self.row_start[j0:j1])[:, None]
                    * (self.col_start[i0 + 1:i1 + 1] - self.col_start[i0:i1])[None, :])
            weight = counts / area

        # values: bilinear sample of the CAM at each heat pixel centre
        ch, cw = cam.shape
        ry = _axis_interp(j0, j1, r0, th, ch, self.height, self.out_h)
        rx = _axis_interp(i0, i1, c0, tw, cw, self.width, self.out_w)
        value = ry @ cam @ rx.T
        bad = ~np.isfinite(value)
        if bad.any():
            value[bad] = 0.0
            weight = np.where(bad, 0.0, weight)
        return j0, i0, value, weight
