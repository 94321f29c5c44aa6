"""Decimated copies of a scene (nearest, GDAL's rule): the stretch sample and the preview,
filled window by window as the scene is read."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rasterio.windows import Window

if TYPE_CHECKING:
    from .coverage import BlockCoverage

__all__ = ["DecimatedCopy", "decimated_shape", "pick", "sample_index"]


def decimated_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """(rows, columns) of a scene shrunk so that its long side is at most ``max_size``."""
    f = min(1.0, max_size / max(height, width))
    return max(1, round(height * f)), max(1, round(width * f))


def sample_index(n: int, size: int) -> np.ndarray:
    """The source pixels a nearest decimation of ``size`` pixels to ``n`` picks, GDAL's
    rule: ``floor((i + 0.5) * size / n)``."""
    return np.minimum(((np.arange(n) + 0.5) * (size / n)).astype(np.int64), size - 1)


def pick(rows: np.ndarray, cols: np.ndarray, window: Window, data: np.ndarray,
         valid: np.ndarray) -> tuple | None:
    """The samples (scene ``rows`` x ``cols``) inside ``window`` of its ``data`` (C, h, w) and
    ``valid`` (h, w): ``(i0, i1, j0, j1, data, valid)``, the decimated copy's part they fill;
    None when the window holds no sample."""
    r0, c0 = int(window.row_off), int(window.col_off)
    i0, i1 = np.searchsorted(rows, [r0, r0 + int(window.height)])
    j0, j1 = np.searchsorted(cols, [c0, c0 + int(window.width)])
    if i0 == i1 or j0 == j1:
        return None
    ri, ci = rows[i0:i1] - r0, cols[j0:j1] - c0
    return int(i0), int(i1), int(j0), int(j1), data[:, ri][:, :, ci], valid[ri][:, ci]


class DecimatedCopy:
    """A decimated copy of the scene filled window by window: from the tiles as they are
    read (``gather_preview``) or from block windows (``_read_decimated``). Threads write
    disjoint parts (overlapping windows write the same values)."""

    def __init__(self, shape: tuple[int, int], height: int, width: int, bands: int, dtype: np.dtype):
        self.shape = shape
        self.rows, self.cols = sample_index(shape[0], height), sample_index(shape[1], width)
        self.data = np.zeros((bands, *shape), dtype=dtype)
        self.valid = np.zeros(shape, dtype=bool)
        self.seen = np.zeros(shape, dtype=bool)

    def take(self, window: Window, data: np.ndarray, valid: np.ndarray) -> None:
        self.put(pick(self.rows, self.cols, window, data, valid))

    def put(self, picked: tuple | None) -> None:
        """Store what :func:`pick` took from a window (e.g. in a reader process)."""
        if picked is None:
            return
        i0, i1, j0, j1, data, valid = picked
        self.data[:, i0:i1, j0:j1] = data
        self.valid[i0:i1, j0:j1] = valid
        self.seen[i0:i1, j0:j1] = True

    def mark_empty(self, coverage: "BlockCoverage | None") -> None:
        """Count the samples inside known-empty blocks as seen (invalid): no read needed there."""
        if coverage is not None and coverage.n_empty:
            self.seen |= coverage.empty[np.ix_(self.rows // coverage.block_h, self.cols // coverage.block_w)]
