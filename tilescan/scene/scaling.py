"""Scene values to the model's input: the stretch ``clip((v - lo) * inv, 0, 1)`` in float32,
band by band in cache-sized pieces, and the uint8 table a preview is drawn from."""

from __future__ import annotations

import numpy as np

__all__ = ["SCALE_CHUNK_BYTES", "preview_table", "to_unit"]

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
