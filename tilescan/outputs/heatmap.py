"""The scene heatmap: tile CAMs blended where tiles overlap, streamed to a COG row band by row band.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import rasterio
from rasterio.enums import MaskFlags, Resampling
from rasterio.transform import Affine

from ..errors import OutputError
from .cog import HEATMAP_NODATA, _cog_copy, _compression, _overview_level, write_cog
from .files import _describe, _dumps, _io_error_types, _remove_quietly, _temp_name, atomic_output, probe_folder
from .geometry import _rasterio_crs
from .heatgrid import _HeatGrid, _axis_interp, _stretch_counts  # noqa: F401 - re-exported
from .heatpyramid import BlockRows, HeatPyramid

# --------------------------------------------------------------------------- heatmap

#: Largest heatmap (in heat pixels, 4 bytes each) held whole in memory instead of a scratch
#: file: that of a 4,096 px scene at heatmap scale 0.25.
HEAT_IN_MEMORY_PX = 1 << 20

#: Finished heat rows kept in memory before they go to the scratch files (``BlockRows``):
#: a scene's scratch takes disk space at its end, after the scenes finished before it.
HEAT_HELD_BYTES = 64 << 20



class HeatmapWriter:
    """Blend per-tile CAMs into a scene heatmap COG, in row strips with bounded memory.

    The heatmap grid is ``ceil(W*scale) x ceil(H*scale)`` pixels covering the scene exactly:
    its transform is ``scene_transform @ Affine.scale(W/out_w, H/out_h)``. Each tile's CAM is
    resampled bilinearly onto the heat pixels of its footprint; where tiles overlap the heat
    is the mean weighted by each tile's valid-pixel coverage (nodata pixels weigh 0). Heat
    pixels that no valid tile pixel covers get :data:`HEATMAP_NODATA` (-1.0).

    :meth:`add` blends one tile, :meth:`add_batch` a batch with array operations (the same
    heat, bit for bit). Tiles must arrive in row-major order of the tile grid (non-decreasing
    ``row_off``).
    Adding a tile at ``row_off = r`` implies that rows above ``r`` are final (as does an
    explicit :meth:`finish_rows`): finished heat rows go to a temporary tiled float32
    GeoTIFF and are freed, so memory is about ``width * (tile + stride) * scale`` heat
    pixels, not the scene. A heatmap of at most :data:`HEAT_IN_MEMORY_PX` pixels (a small
    scene's) is kept whole in memory instead: no temporary file to make, fill and read back.
    The scratch file's overviews are built as its rows are written (:mod:`.heatpyramid`, as
    GDAL's ``average`` builds them), so the copy at the end has none to compute; so is, with
    ``preview_size``, the :meth:`preview` of that size the quicklook takes.
    :meth:`close` turns the temporary file (or array) into a COG at ``path`` (average
    overviews) atomically; :meth:`abort` removes the temporary files. As a context manager it
    closes on success and aborts on error.
    """

    def __init__(self, path: str | os.PathLike, scene_width: int, scene_height: int,
                 scene_transform: Affine, crs: Any, scale: float, tile_px: int, stride_px: int,
                 compress: str = "deflate", preview_size: int | None = None):
        if not (0 < scale <= 1):
            raise ValueError(f"heatmap scale must be in (0, 1], got {scale}")
        if scene_width < 1 or scene_height < 1:
            raise ValueError(f"scene size must be positive, got {scene_width}x{scene_height}")
        self.path = Path(path)
        self.scale = float(scale)
        self.tile_px, self.stride_px = int(tile_px), int(stride_px)
        self.compress = _compression(compress)
        self.grid = _HeatGrid.make(int(scene_width), int(scene_height), self.scale)
        g = self.grid
        self.transform = Affine(*scene_transform[:6]) @ Affine.scale(g.width / g.out_w, g.height / g.out_h)
        self.crs = _rasterio_crs(crs)
        self.width, self.height = g.out_w, g.out_h
        # strip buffer: heat rows [base, base + rows) accumulate sum(w * v) and sum(w)
        self._base = 0
        cap = max(1, math.ceil((self.tile_px + max(self.stride_px, 1)) * self.scale) + 2)
        self._acc = np.zeros((2, cap, g.out_w), np.float64)  # sum(w * v) and sum(w), one array
        self._rows = 0
        self._last_row_off = None
        self.peak_buffer_rows = 0
        self._closed = False
        self._scratch_gone = False  # close() or abort() removed the scratch file
        self._finished = False  # finish(): no more rows; the tags taken
        self._strips = _temp_name(self.path, "strips")
        self._dst = None
        self._rows_out: BlockRows | None = None  # the scratch file's rows, a row of blocks at a time
        self._profile = dict(driver="GTiff", dtype="float32", count=1, width=g.out_w, height=g.out_h,
                             crs=self.crs, transform=self.transform, nodata=HEATMAP_NODATA,
                             tiled=True, blockxsize=256, blockysize=256)
        self._tags: dict[str, str] = {}
        self._mem = None  # the whole heat, when it is small enough to hold (no scratch file)
        self._pyramid: HeatPyramid | None = None  # the COG's overviews, built as rows are written
        self._preview_size: int | None = None  # the preview built beside them, if any
        self._vrt = _temp_name(self.path.with_suffix(".vrt"), "heat")
        if g.out_w * g.out_h <= HEAT_IN_MEMORY_PX:
            probe_folder(self.path)  # an unwritable destination fails now, as the scratch file would
            self._mem = np.full((g.out_h, g.out_w), HEATMAP_NODATA, np.float32)
            return
        try:
            profile = dict(self._profile, bigtiff="IF_SAFER", sparse_ok=True)
            # The strips file is a scratch copy read once by close(): left uncompressed, so
            # blending never pays for compression on the model's cores; the COG is compressed once. Sparse:
            # rows no tile touched are never written, and read back as nodata.
            self._dst = rasterio.open(self._strips, "w", **profile)
            self._rows_out = BlockRows(self._dst, profile["blockysize"], HEATMAP_NODATA, HEAT_HELD_BYTES)
            levels = _overview_level(g.out_w, g.out_h)
            self._preview_size = preview_size if preview_size and max(g.out_w, g.out_h) > preview_size else None
            if levels or self._preview_size:
                self._pyramid = HeatPyramid(
                    g.out_w, g.out_h, levels, HEATMAP_NODATA,
                    [_temp_name(self.path, f"ovr{k + 1}") for k in range(levels)],
                    preview=None if self._preview_size is None else _preview_shape(g.out_w, g.out_h, preview_size),
                    background=True, hold_bytes=HEAT_HELD_BYTES)
        except _io_error_types() as exc:
            self.abort()
            raise OutputError(_describe(exc, self.path), path=str(self.path)) from exc

    # -- context manager

    def __enter__(self) -> "HeatmapWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def buffer_nbytes(self) -> int:
        """Bytes held by the strip accumulators now."""
        return self._acc.nbytes

    @property
    def _sum(self) -> np.ndarray:
        return self._acc[0]

    @property
    def _wsum(self) -> np.ndarray:
        return self._acc[1]

    # -- accumulate

    def _ensure_rows(self, end_row: int) -> None:
        need = end_row - self._base
        if need > self._acc.shape[1]:
            cap = max(need, int(self._acc.shape[1] * 1.5) + 1)
            new = np.zeros((2, cap, self._acc.shape[2]), np.float64)
            new[:, : self._rows] = self._acc[:, : self._rows]
            self._acc = new
        self._rows = max(self._rows, need)
        self.peak_buffer_rows = max(self.peak_buffer_rows, self._rows)

    def add(self, tile_window: Sequence[int], cam: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Blend one tile: ``tile_window`` = (col_off, row_off, width, height) in scene pixels,
        ``cam`` (h, w) in 0..1 spanning that window, ``valid`` (height, width) bool or None
        (all valid). A mask of another size is stretched over the window (nearest)."""
        if self._closed:
            raise RuntimeError("HeatmapWriter is closed")
        row_off = int(tile_window[1])
        if self._last_row_off is not None and row_off < self._last_row_off:
            raise ValueError(f"tiles must arrive in row-major order: row_off {row_off} after {self._last_row_off}")
        if self._last_row_off is None or row_off > self._last_row_off:
            self.finish_rows(row_off)
            self._last_row_off = row_off
        got = self.grid.contribution(tile_window, cam, valid)
        if got is None:
            return
        j0, i0, value, weight = got
        if j0 < self._base:
            raise ValueError(f"tile {tuple(tile_window)} touches heat rows already written (< {self._base})")
        nj, ni = value.shape
        self._ensure_rows(j0 + nj)
        a = j0 - self._base
        self._sum[a:a + nj, i0:i0 + ni] += weight * value
        self._wsum[a:a + nj, i0:i0 + ni] += weight

    def add_batch(self, col_off, row_off, size, cams: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Blend a batch of square tiles with array operations: the same heat, bit for bit,
        as :meth:`add` tile by tile in the same order.

        ``col_off``, ``row_off`` (length ``n``) and ``size`` (one or ``n`` values) give each
        tile's window in scene pixels, ``cams`` ``(n, h, w)`` spans it, ``valid`` ``(n, S, S)``
        bool or None (all valid; a mask of another size than the window is stretched over
        it, nearest). Tiles come in row-major order; a batch may span several grid rows,
        whose finished heat rows are written between them as :meth:`add` does.
        """
        if self._closed:
            raise RuntimeError("HeatmapWriter is closed")
        c0 = np.asarray(col_off, dtype=np.int64).reshape(-1)
        r0 = np.asarray(row_off, dtype=np.int64).reshape(-1)
        n = len(c0)
        span = np.broadcast_to(np.asarray(size, dtype=np.int64), (n,)) if np.ndim(size) == 0 else \
            np.asarray(size, dtype=np.int64).reshape(-1)
        cams = np.asarray(cams, dtype=np.float64)
        if len(r0) != n or len(span) != n:
            raise ValueError(f"col_off, row_off and size need one value per tile, got {n}, {len(r0)}, {len(span)}")
        if cams.ndim != 3 or len(cams) != n or min(cams.shape[1:], default=0) < 1:
            raise ValueError(f"cams must be (n={n}, h, w) with h, w >= 1, got shape {cams.shape}")
        if valid is not None:
            valid = np.asarray(valid, dtype=bool)
            if valid.ndim != 3 or len(valid) != n:
                raise ValueError(f"valid masks must be (n={n}, S, S), got shape {valid.shape}")
        if n == 0:
            return
        if np.any(span < 1):
            raise ValueError(f"tile size must be positive, got {int(span.min())}")
        prev = r0[:-1] if self._last_row_off is None else np.concatenate([[self._last_row_off], r0[:-1]])
        back = np.flatnonzero(r0[-len(prev):] < prev)
        if len(back):
            k = int(back[0]) + n - len(prev)
            raise ValueError(f"tiles must arrive in row-major order: row_off {int(r0[k])} after {int(prev[back[0]])}")
        full = np.ones(n, dtype=bool) if valid is None else valid.reshape(n, -1).all(axis=1)
        # runs of one grid row (one window size, columns left to right) blend together
        cut = np.flatnonzero((r0[1:] != r0[:-1]) | (span[1:] != span[:-1]) | (c0[1:] < c0[:-1])) + 1
        for s, e in zip([0, *cut.tolist()], [*cut.tolist(), n]):
            row = int(r0[s])
            if self._last_row_off is None or row > self._last_row_off:
                self.finish_rows(row)
                self._last_row_off = row
            self._blend_run(c0[s:e], row, int(span[s]), cams[s:e],
                            None if valid is None else valid[s:e], full[s:e])

    def _blend_run(self, c0: np.ndarray, r0: int, span: int, cams: np.ndarray,
                   valid: np.ndarray | None, full: np.ndarray) -> None:
        """Blend tiles of one grid row (``c0`` non-decreasing) into the strip buffers,
        adding to each heat pixel in tile order, as tile-by-tile blending does."""
        g = self.grid
        rows = g._axis("r", r0, span)
        if rows is None:
            return
        inside = (c0 < g.width) & (c0 + span > 0)
        if not inside.all():
            c0, cams, full = c0[inside], cams[inside], full[inside]
            valid = None if valid is None else valid[inside]
            if len(c0) == 0:
                return
        j0, j1, ra, rb, share_r = rows
        if j0 < self._base:
            raise ValueError(f"tile {(int(c0[0]), r0, span, span)} touches heat rows already written (< {self._base})")
        m, (ch, cw) = len(c0), cams.shape[1:]
        i0, ni, a, b, share_c, rx = g.columns_of(c0, span, cw, self.stride_px)
        nj, width = j1 - j0, rx.shape[1]

        # (value * weight, weight) of every tile, laid out (2, heat row, tile, heat column)
        pw = np.empty((2, nj, m, width), dtype=np.float64)
        value, weight = pw[0], pw[1]
        ry = _axis_interp(j0, j1, r0, span, ch, g.height, g.out_h)
        with np.errstate(invalid="ignore"):  # a NaN CAM cell: its tile weighs nothing below
            # the same stacked products as the per-tile ry @ cam @ rx.T, written in place
            np.matmul(np.matmul(ry, cams), rx.transpose(0, 2, 1), out=value.transpose(1, 0, 2))
        # weights: outer(share_r, share_c) where the mask is all valid, else valid counts / area
        np.multiply(share_r[:, None], share_c.reshape(1, -1), out=weight.reshape(nj, -1))
        part = np.flatnonzero(~full)
        if len(part):
            v = valid[part]
            cy, cx = _stretch_counts(v.shape[1], span), _stretch_counts(v.shape[2], span)
            my = cy[rb] - cy[ra]  # (nj, S): window pixels of each heat row per mask row
            mx = cx[b[part]] - cx[a[part]]  # (p, NI, S)
            # whole counts, exact in float32 while a tile has under 2**24 pixels (half the work)
            ft = np.float32 if span <= 4096 else np.float64
            counts = np.matmul(np.matmul(my.astype(ft), v.astype(ft)), mx.astype(ft).transpose(0, 2, 1))
            col_len = np.diff(g.col_start)[np.minimum(i0[part, None] + np.arange(width), g.out_w - 1)]
            area = (g.row_start[j0 + 1:j1 + 1] - g.row_start[j0:j1])[None, :, None] * col_len[:, None, :]
            weight[:, part] = (counts.astype(np.float64) / area).transpose(1, 0, 2)
        if not (np.isfinite(cams).all() and np.abs(cams).max() < 1e300) and not np.isfinite(value).all():
            bad = ~np.isfinite(value)
            value[bad] = 0.0
            weight[bad] = 0.0
        np.multiply(value, weight, out=value)

        # round k adds, at each heat column, its k-th tile (tiles left to right): every heat
        # pixel gets its tiles' terms in tile order, as tile by tile
        self._ensure_rows(j1)
        lo, hi = int(i0[0]), int((i0 + ni).max())
        px = np.arange(lo, hi)
        first = np.searchsorted(i0 + ni, px, side="right")
        last = np.searchsorted(i0, px, side="right") - 1
        flat = pw.reshape(2 * nj, m * width)
        acc = self._acc[:, j0 - self._base:j1 - self._base]
        for k in range(int((last - first).max()) + 1):
            t = first + k
            ok = t <= last
            if not ok.all():
                px, t, first, last = px[ok], t[ok], first[ok], last[ok]
            terms = flat[:, t * width + (px - i0[t])].reshape(2, nj, -1)
            if k == 0 and len(px) == hi - lo:  # every column covered: one slice
                acc[:, :, lo:hi] += terms
            else:
                acc[:, :, px] += terms

    def finish_rows(self, scene_row: int) -> None:
        """Declare that no later tile touches scene rows above ``scene_row``: heat rows made
        only of those scene rows are written out and freed."""
        if self._closed:
            raise RuntimeError("HeatmapWriter is closed")
        g = self.grid
        scene_row = min(max(int(scene_row), 0), g.height)
        done = int(np.searchsorted(g.row_start, scene_row, side="right")) - 1  # rows [0, done) final
        done = min(done, g.out_h)
        if done <= self._base:
            return
        n_buf = min(self._rows, done - self._base)
        if n_buf > 0:
            self._write(self._base, self._sum[:n_buf], self._wsum[:n_buf])
            keep = self._rows - n_buf
            self._acc[:, :keep] = self._acc[:, n_buf:self._rows]
            self._acc[:, keep:self._rows] = 0.0
            self._rows = keep
        # rows no tile touched stay unwritten: the sparse scratch file reads them as nodata
        self._base = done

    def _write(self, row: int, s: np.ndarray, w: np.ndarray) -> None:
        ok = w > 0
        heat = np.divide(s, w, out=np.full(s.shape, HEATMAP_NODATA, dtype=np.float64), where=ok)
        self._write_raw(row, heat.astype(np.float32))

    def _write_raw(self, row: int, heat: np.ndarray) -> None:
        if self._mem is not None:
            self._mem[row:row + heat.shape[0], :heat.shape[1]] = heat
            return
        with self._aborting():
            self._rows_out.write(row, heat)
            if self._pyramid is not None:
                self._pyramid.feed(row, heat)

    @contextlib.contextmanager
    def _aborting(self, keep_scratch: threading.Event | None = None) -> Iterator[None]:
        """On any error drop the temporary files (:meth:`abort`), once ``keep_scratch`` is set
        if given (a preview may be read from them meanwhile); a failed write becomes an
        :class:`OutputError` naming the heatmap."""
        try:
            yield
        except _io_error_types() as exc:
            self._abort_after(keep_scratch)
            raise OutputError(_describe(exc, self.path), path=str(self.path)) from exc
        except BaseException:
            self._abort_after(keep_scratch)
            raise

    def _abort_after(self, keep_scratch: threading.Event | None) -> None:
        if keep_scratch is not None:
            keep_scratch.wait()
        self.abort()

    # -- finish

    def finish(self, tags: Mapping[str, Any] | None = None) -> None:
        """Write the remaining rows and tags to the scratch file; no tile can be added after.
        :meth:`close` does this itself; call it first to take a :meth:`preview` before."""
        if self._closed or self._finished:
            return
        with self._aborting():  # e.g. the strips file could not be flushed: disk full
            self.finish_rows(self.grid.height)
            meta = {"HEATMAP_SCALE": repr(self.scale), "TILE_PX": str(self.tile_px),
                    "STRIDE_PX": str(self.stride_px), "HEATMAP_NODATA": repr(HEATMAP_NODATA)}
            meta.update({str(k): v if isinstance(v, str) else _dumps(v) for k, v in (tags or {}).items()})
            self._tags = meta
            self._finished = True
            if self._dst is not None:
                self._rows_out.flush()
                self._dst.set_band_description(1, "heat")
                self._dst.update_tags(**meta)
                self._dst.close()
            if self._pyramid is not None:
                self._pyramid.finish()

    @contextlib.contextmanager
    def _mem_dataset(self) -> Iterator[Any]:
        """The in-memory heat as an open GeoTIFF in GDAL's memory file system, as the
        scratch file would be (tags, band description, nodata)."""
        from rasterio.io import MemoryFile

        with MemoryFile() as mf, mf.open(**self._profile) as ds:
            ds.write(self._mem, 1)
            ds.set_band_description(1, "heat")
            ds.update_tags(**self._tags)
            yield ds

    def preview(self, max_size: int = 1024) -> np.ndarray:
        """:func:`read_heatmap_preview` of the finished heat (after :meth:`finish`), read
        from the scratch file (or array), so a quicklook can be drawn while :meth:`close`
        writes the COG."""
        if self._scratch_gone or not self._finished:
            raise RuntimeError("HeatmapWriter.preview needs finish() first, and the scratch file (close() removes it)")
        if self._mem is not None:
            if max(self.width, self.height) <= max_size:  # what GDAL's masked read at full size gives
                return _nan_for_nodata(self._mem)
            with self._mem_dataset() as ds:
                return _preview_of(ds, max_size)
        if max_size == self._preview_size and self._pyramid is not None:  # built as the rows came
            return _nan_for_nodata(self._pyramid.preview)
        with self._aborting(), _uncached():  # _aborting: the scratch file came out short (a full disk)
            return read_heatmap_preview(self._strips, max_size)

    def close(self, tags: Mapping[str, Any] | None = None, keep_scratch: threading.Event | None = None) -> Path:
        """Write the remaining rows and convert to a COG at ``path`` (atomic). ``tags`` are
        ignored after :meth:`finish` (which took them). With ``keep_scratch`` the scratch file
        is removed only once that event is set: another thread may read a :meth:`preview`
        from it meanwhile."""
        if self._closed:
            return self.path
        self.finish(tags)
        size = (self.grid.out_w, self.grid.out_h)
        try:
            with self._aborting(keep_scratch):  # a failure too leaves the preview's reading be
                self._closed = True
                with atomic_output(self.path) as tmp:
                    if self._mem is not None:
                        def gdal_write() -> None:
                            with self._mem_dataset() as src:  # copied while open, as the label COG is
                                _cog_copy(src, tmp, self.compress, "average", _overview_level(*size), size)

                        write_cog(tmp, self._mem, gdal_write, transform=self.transform, crs=self.crs,
                                  nodata=HEATMAP_NODATA, tags=self._tags, description="heat", compress=self.compress)
                    elif self._pyramid is not None and self._pyramid.sizes:  # the overviews made while the heat came
                        self._pyramid.vrt(self._strips, self._vrt)
                        with _uncached():
                            _cog_copy(self._vrt, tmp, self.compress, "average", -1, size)
                    else:
                        with _uncached():
                            _cog_copy(self._strips, tmp, self.compress, "average", 0, size)
        finally:
            if keep_scratch is not None:
                keep_scratch.wait()
            self._scratch_gone = True
            self._remove_scratch()
        self._acc = np.zeros((2, 0, self.grid.out_w))
        return self.path

    def abort(self) -> None:
        """Drop everything: close and remove the temporary files; ``path`` is not touched."""
        self._closed = self._scratch_gone = True
        if self._dst is not None and not self._dst.closed:
            with contextlib.suppress(Exception):
                self._dst.close()
        if self._pyramid is not None:
            with contextlib.suppress(Exception):
                self._pyramid.close()
        self._remove_scratch()

    def _remove_scratch(self) -> None:
        _remove_quietly(self._strips)
        _remove_quietly(self._vrt)
        for p in self._pyramid.paths if self._pyramid is not None else ():
            _remove_quietly(p)


def _uncached() -> rasterio.Env:
    """Reads of the uncompressed scratch file past GDAL's block cache (the same values): the
    heat is read twice, for the preview and the COG, and would sit in the cache whole."""
    return rasterio.Env(GTIFF_DIRECT_IO="YES")


def read_heatmap_preview(path: str | os.PathLike, max_size: int = 1024) -> np.ndarray:
    """Read a heatmap COG decimated so its longer side is at most ``max_size`` (GDAL reads
    from the overviews); nodata becomes NaN. Returns float32 ``(h, w)``."""
    with rasterio.open(path) as src:
        return _preview_of(src, max_size)


def _nan_for_nodata(heat: np.ndarray) -> np.ndarray:
    """A copy of ``heat`` with NaN where it is nodata, as a masked read fills it."""
    return np.where(heat == HEATMAP_NODATA, np.float32(np.nan), heat)


def _preview_shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` of a preview whose longer side is at most ``max_size``."""
    f = max(width, height) / float(max_size)
    if f <= 1:
        return height, width
    return max(1, round(height / f)), max(1, round(width / f))


def _preview_of(src: Any, max_size: int) -> np.ndarray:
    shape = _preview_shape(src.width, src.height, max_size)
    if src.nodata is not None and src.mask_flag_enums[0] == [MaskFlags.nodata]:
        # GDAL's average leaves nodata pixels out and gives nodata where all are: what the
        # masked read gives, without reading and resampling the mask as well
        data = src.read(1, out_shape=shape, resampling=Resampling.average).astype(np.float32, copy=False)
        data[data == src.nodata] = np.nan
        return data
    data = src.read(1, out_shape=shape, masked=True, resampling=Resampling.average)
    return np.ma.filled(data.astype(np.float32), np.nan)
