"""Scene values to the model's input: the stretch ``clip((v - lo) * inv, 0, 1)`` in float32,
band by band in cache-sized pieces, and the uint8 table a preview is drawn from."""

from __future__ import annotations

import numpy as np

__all__ = ["SCALE_CHUNK_BYTES", "preview_rgb", "preview_table", "to_unit"]

#: Most bytes of scaled output written per step of :func:`to_unit`: each step's bands meet
#: in a cache-sized piece instead of streaming the whole window once per band through a
#: cache that the other cores share (benchmarks/README.md).
SCALE_CHUNK_BYTES = 2**20


def to_unit(data: np.ndarray, valid: np.ndarray, out: np.ndarray, lo: np.ndarray, inv: np.ndarray) -> None:
    """Scale ``data`` (C, ...) into ``out`` (..., C) float32 (e.g. (C, h, w) into (h, w, C)):
    ``clip((v - lo[c]) * inv[c], 0, 1)`` in float32 (``lo``, ``inv``: float32 per band),
    pixels where ``valid`` (...) is False set to 0.

    A few rows (first axis) at a time, at most ``SCALE_CHUNK_BYTES`` of ``out`` each, band by
    band through one small buffer: the pieces stay in the core's own cache while the bands
    meet in ``out`` (the same values as the whole array at once; benchmarks/README.md)."""
    if not len(out):
        return
    step = max(1, SCALE_CHUNK_BYTES // max(1, out[0].nbytes))
    band = np.empty(out.shape[:-1] if step >= len(out) else (step, *out.shape[1:-1]), dtype=np.float32)
    all_valid = bool(valid.all())
    with np.errstate(invalid="ignore", over="ignore"):
        for a in range(0, len(out), step):
            piece, d, tmp = out[a:a + step], data[:, a:a + step], band[:len(out) - a]
            for i in range(len(d)):
                np.copyto(tmp, d[i], casting="unsafe")
                tmp -= lo[i]
                tmp *= inv[i]
                np.clip(tmp, 0.0, 1.0, out=tmp)
                piece[..., i] = tmp
            if not all_valid:
                piece[~valid[a:a + step]] = 0.0


def preview_table(dtype: np.dtype, lo: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """(C, 2**bits) uint8 for an 8/16-bit ``dtype``: each possible value of each band as a
    preview shows it, scaled as :func:`to_unit` scales it, then rounded."""
    dtype = np.dtype(dtype)
    n = 2 ** (8 * dtype.itemsize)
    values = np.arange(n).astype(f"u{dtype.itemsize}").view(dtype)
    unit = np.empty((n, len(lo)), dtype=np.float32)
    to_unit(np.broadcast_to(values, (len(lo), n)), np.ones(n, dtype=bool), unit, lo, inv)
    return np.ascontiguousarray(np.rint(unit.T * 255.0).astype(np.uint8))


def preview_rgb(data: np.ndarray, valid: np.ndarray, dtype: np.dtype, lo: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """The uint8 RGB ``(h, w, 3)`` a preview shows of a decimated read ``data`` ``(C, h, w)``
    of a scene of ``dtype`` stretched by ``lo``, ``inv`` (:func:`to_unit`, rounded): the
    first three bands as R, G, B, one band as grey, two as R, G, G; nodata (``~valid``) black.
    Plain arrays in, so an output helper process can draw it as well as the run."""
    dtype = np.dtype(dtype)
    c, shape = len(data), data.shape[1:]
    pick = [0, 1, 2] if c >= 3 else ([0, 0, 0] if c == 1 else [0, 1, 1])
    if dtype.kind in "ui" and dtype.itemsize <= 2 and data.dtype == dtype:
        # 8/16-bit: every value's uint8 in a table per band shown, then one look-up per pixel
        shown = max(pick) + 1  # the bands shown are the first ones
        lut8 = preview_table(dtype, lo[:shown], inv[:shown])
        index = data.view(f"u{dtype.itemsize}")
        rgb = np.empty((*shape, 3), dtype=np.uint8)
        for i, b in enumerate(pick):
            rgb[..., i] = lut8[b].take(index[b])
        if not valid.all():
            rgb[~valid] = 0
        return rgb
    x = np.empty((*shape, c), dtype=np.float32)
    to_unit(data, valid, x, lo, inv)
    return np.rint(x[:, :, pick] * 255.0).astype(np.uint8)
