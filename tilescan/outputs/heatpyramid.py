"""The heatmap COG's overviews and the quicklook's heat, built row by row while the heat is blended.

GDAL's COG driver builds a raster's overviews when it copies it, on one thread, after the
scene's last tile, and the quicklook read the heat back averaged to its size: for a large
heatmap, the serial part of its tail. Here both are computed as finished heat rows arrive,
by GDAL's own rule for ``average`` (each level from the one above, ``floor(n / 2)`` pixels a
side; every output pixel the mean of the source pixels under it, weighted by the part of each
it covers; nodata left out), and the COG is copied from the heat with these levels attached,
as existing overviews. tests/test_heat_overviews.py checks them against GDAL's: nodata the
same, values within 1e-6 (a float32 ulp here and there, where sums run in another order).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np

from .files import _remove_quietly


def level_sizes(width: int, height: int, levels: int) -> list[tuple[int, int]]:
    """``(width, height)`` of each overview level: each half the one above, rounded down."""
    sizes, w, h = [], int(width), int(height)
    for _ in range(levels):
        w, h = w // 2, h // 2
        sizes.append((w, h))
    return sizes


_QUEUED_BYTES = 256 << 20  # heat rows waiting for the pyramid's thread at most: then feed() waits


def _nicer() -> None:
    """The pyramid's thread: 10 nicer than the thread that started it (Linux; else as it is)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except (AttributeError, OSError):
        pass


class BlockRows:
    """Rows of a tiled GeoTIFF open for writing (``ds``, band 1, blocks ``block_h`` rows high),
    handed to GDAL a whole row of blocks at a time. GDAL writes such a row straight to the
    file; a part of one waits in its block cache as dirty blocks until the file is closed, and
    rasterio's close flushes them with Python's GIL held, a stall for every other thread of
    the run. Rows not given before a row of blocks is written are ``nodata``, as a sparse file
    reads them.

    Finished rows of blocks wait in memory up to ``hold_bytes`` (the oldest written first past
    that) and the rest by :meth:`flush`: a scratch file takes its disk space when its rows are
    all there, as it did in GDAL's cache, so on a nearly full disk the scenes finished before
    it are written first."""

    def __init__(self, ds, block_h: int, nodata: float, hold_bytes: int = 0):
        self._ds, self._bh, self._nodata, self._hold = ds, int(block_h), nodata, int(hold_bytes)
        self._buf: np.ndarray | None = None  # the row of blocks being filled
        self._top = -1  # its first row; -1: none
        self._end = 0  # rows [top, end) of it set so far (nodata where none was given)
        self._held: collections.deque[tuple[int, np.ndarray]] = collections.deque()  # (top, rows) not written
        self._held_bytes = 0

    def write(self, row: int, rows: np.ndarray) -> None:
        """Rows ``[row, row + len(rows))``, given in order (never a row twice)."""
        height = self._ds.height
        while len(rows):
            top = row - row % self._bh
            if top != self._top:
                self._row_done()
                if self._buf is None:
                    self._buf = np.empty((min(self._bh, height), self._ds.width), np.float32)
                self._top, self._end = top, top
            stop = min(top + self._bh, height)
            n = min(len(rows), stop - row)
            self._buf[self._end - top:row - top] = self._nodata
            self._buf[row - top:row - top + n] = rows[:n]
            self._end, row, rows = row + n, row + n, rows[n:]
            if self._end == stop:
                self._row_done()

    def _row_done(self) -> None:
        """The row of blocks being filled is complete (its rows not given: nodata): held or written."""
        if self._top < 0:
            return
        rows = self._buf[:min(self._top + self._bh, self._ds.height) - self._top]
        rows[self._end - self._top:] = self._nodata
        self._held.append((self._top, rows))
        self._held_bytes += rows.nbytes
        self._top = -1
        if self._hold > 0:
            self._buf = None  # held: the next row of blocks gets a buffer of its own
        self._write_held(self._hold)

    def _write_held(self, keep_bytes: int) -> None:
        from rasterio.windows import Window

        while self._held and self._held_bytes > keep_bytes:
            top, rows = self._held.popleft()
            self._held_bytes -= rows.nbytes
            self._ds.write(rows, 1, window=Window(0, top, self._ds.width, len(rows)))

    def flush(self) -> None:
        """Write every row given so far (the row of blocks being filled completed with nodata)."""
        self._row_done()
        self._write_held(0)


_EDGE = 1e-8  # pixels: how far past an edge a footprint must reach to take the next pixel


@functools.lru_cache(maxsize=64)
def _taps(n_src: int, n_dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each of ``n_dst`` output pixels along an axis: its first and (past the) last
    source pixel, the source indexes ``(n_dst, T)`` and their weights ``(n_dst, T)``: the
    part of each source pixel that the footprint ``[i * r, (i + 1) * r)`` covers
    (``r = n_src / n_dst``), 0 past its end."""
    r = n_src / n_dst
    x0 = np.arange(n_dst) * r
    x1 = np.minimum((np.arange(n_dst) + 1) * r, n_src)
    # a footprint that ends (starts) a rounding error past a pixel edge does not take that pixel
    lo = np.floor(x0 + _EDGE).astype(np.int64)
    hi = np.minimum(np.ceil(x1 - _EDGE).astype(np.int64), n_src)
    t = int((hi - lo).max())
    idx = lo[:, None] + np.arange(t)[None, :]
    x0, x1 = x0[:, None], x1[:, None]
    w = np.minimum(idx + 1, x1) - np.maximum(idx, x0)
    w = np.where(idx < hi[:, None], np.maximum(w, 0.0), 0.0)
    idx = np.minimum(idx, hi[:, None] - 1)  # padding taps (weight 0) stay inside the footprint
    for a in (lo, hi, idx, w):
        a.setflags(write=False)
    return lo, hi, idx, w


class _Level:
    """One overview level: the horizontally reduced rows of the level above, waiting until
    every source row under the next output row has come."""

    def __init__(self, src_w: int, src_h: int, w: int, h: int, nodata: float):
        self.src_w, self.w, self.h, self.nodata = src_w, w, h, nodata
        self._x = _taps(src_w, w)
        self._y = _taps(src_h, h)
        self._pairs = src_w == 2 * w  # every output pixel is two whole source pixels
        self._rows = np.zeros((0, 2, w))  # per source row: sum(weight * value), sum(weight)
        self._first = 0  # source row of self._rows[0]
        self._next = 0  # next output row

    def _across(self, block: np.ndarray) -> np.ndarray:
        """``(n, 2, w)``: each source row reduced across, its weighted sums and weights."""
        ok = block != self.nodata
        full = bool(ok.all())  # no nodata: every row's weights are the taps' sums
        v = block if full else np.where(ok, block, block.dtype.type(0))
        out = np.empty((len(block), 2, self.w))
        if self._pairs:
            v = v.astype(np.float64)
            np.add(v[:, 0::2], v[:, 1::2], out=out[:, 0])
            if full:
                out[:, 1] = 2.0
            else:
                c = ok.view(np.uint8)
                np.add(c[:, 0::2], c[:, 1::2], out=out[:, 1], dtype=np.float64)
            return out
        # gathered as they are (float32, bool) and widened by the float64 weights: the same
        # products as from float64 copies, with half the memory traffic
        _, _, idx, wx = self._x
        np.multiply(v[:, idx[:, 0]], wx[:, 0], out=out[:, 0])
        if full:
            out[:, 1] = wx[:, 0]
        else:
            np.multiply(ok[:, idx[:, 0]], wx[:, 0], out=out[:, 1])
        for t in range(1, idx.shape[1]):
            out[:, 0] += v[:, idx[:, t]] * wx[:, t]
            out[:, 1] += wx[:, t] if full else ok[:, idx[:, t]] * wx[:, t]
        return out

    def feed(self, block: np.ndarray) -> np.ndarray | None:
        """Take the next source rows ``(n, src_w)``; return the output rows they complete
        ``(m, w)`` (float32, nodata where no valid pixel lies under one), or None."""
        self._rows = np.concatenate([self._rows, self._across(block)])
        lo, hi, idy, wy = self._y
        end = int(np.searchsorted(hi, self._first + len(self._rows), side="right"))
        if end <= self._next:
            return None
        o = slice(self._next, end)
        k = idy[o] - self._first  # (m, T) rows of the buffer under each output row
        acc = self._rows[k[:, 0]] * wy[o, 0, None, None]
        for t in range(1, k.shape[1]):
            acc += self._rows[k[:, t]] * wy[o, t, None, None]
        self._next = end
        if end < self.h:  # drop source rows no later output row needs
            drop = int(lo[end]) - self._first
            if drop > 0:
                self._rows = self._rows[drop:]
                self._first += drop
        ok = acc[:, 1] > 0
        out = np.divide(acc[:, 0], acc[:, 1], out=np.full(ok.shape, self.nodata), where=ok)
        return out.astype(np.float32)

    def skip(self, n: int) -> tuple[np.ndarray | None, int]:
        """The next ``n`` source rows are nodata: return the output rows they complete, as
        those computed (``(m, w)`` or None) and then the count of those that lie wholly on
        the skipped rows (nodata, not computed): an empty band costs its edges only."""
        lo, hi, _, _ = self._y
        s0 = self._first + len(self._rows)
        s1 = s0 + n
        end = int(np.searchsorted(hi, s1, side="right"))
        # output rows before `end` that also cover rows already here: computed the usual way,
        # from the nodata rows they need (the same sums as feeding every skipped row)
        j = min(max(self._next, int(np.searchsorted(lo, s0, side="left"))), end)
        out = None
        if j > self._next:
            need = int(hi[j - 1]) - s0
            out = self.feed(np.full((need, self.src_w), self.nodata, np.float32))
            s0 += need
        empty = max(end - self._next, 0)
        if empty:
            self._next = end
            keep = int(lo[end]) if end < self.h else s1  # the first source row a later output row needs
            first = max(keep, self._first)
            self._rows = self._rows[first - self._first:]
            self._first = first
            s0 = max(s0, first)
        # the skipped rows a later output row still needs wait, reduced (all zero)
        if s1 > s0:
            self._rows = np.concatenate([self._rows, np.zeros((s1 - s0, 2, self.w))])
        return out, empty


class HeatPyramid:
    """The overview levels of a ``width x height`` heat with ``nodata``, fed its rows in order
    (:meth:`feed`; rows skipped are nodata, and cost only where they meet fed rows) and
    written to uncompressed, sparse, tiled scratch GeoTIFFs at ``paths``. :meth:`vrt`
    attaches them to the heat file as its overviews, for GDAL's COG driver to copy. With
    ``preview`` ``(h, w)``, also the heat averaged to that size in memory (:attr:`preview`),
    as GDAL's decimated read of the heat file gives it. With ``background``, the rows are
    taken in on a thread of its own. Each level's rows wait in memory up to its share of
    ``hold_bytes`` (:class:`BlockRows`)."""

    def __init__(self, width: int, height: int, levels: int, nodata: float, paths: Sequence[Path],
                 preview: tuple[int, int] | None = None, background: bool = False, hold_bytes: int = 0):
        import rasterio
        from rasterio.transform import Affine

        self.width, self.height, self.nodata = int(width), int(height), float(nodata)
        self.paths = [Path(p) for p in paths]
        self.sizes = level_sizes(width, height, levels)
        src = [(self.width, self.height), *self.sizes]
        self._levels = [_Level(*src[k], *src[k + 1], self.nodata) for k in range(levels)]
        # the quicklook's heat, (h, w): the same average straight from the heat, as a decimated read gives
        self._preview = None if preview is None else _Level(self.width, self.height, preview[1], preview[0],
                                                            self.nodata)
        self._preview_rows: list[np.ndarray] = []
        self._row = 0  # next heat row expected
        self._written = [0] * levels
        self._files = []
        self._out: list[BlockRows] = []  # each level's rows to its file, a row of blocks at a time
        # its own thread, started by the first feed() (so on that thread's cores), nicer than it:
        # it takes the CPU the run leaves, and whatever it has not done waits for finish()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tilescan-heat-levels",
                                        initializer=_nicer) if background else None
        self._queued: collections.deque[tuple[Future, int]] = collections.deque()
        try:
            for k, ((w, h), p) in enumerate(zip(self.sizes, self.paths)):
                block = min(256, 16 * math.ceil(max(w, h) / 16))
                # a plain pixel grid (the VRT takes only the pixels): rasterio warns on none
                self._files.append(rasterio.open(p, "w", driver="GTiff", dtype="float32", count=1, width=w,
                                                 height=h, nodata=self.nodata, transform=Affine(1, 0, 0, 0, -1, h),
                                                 tiled=True, blockxsize=block, blockysize=block, sparse_ok=True,
                                                 bigtiff="IF_SAFER"))
                # each level a quarter of the one above: held as long as the heat's rows are
                self._out.append(BlockRows(self._files[-1], block, self.nodata, hold_bytes >> 2 * (k + 1)))
        except BaseException:
            self.close()
            for p in self.paths:
                _remove_quietly(p)
            raise

    def feed(self, row: int, heat: np.ndarray) -> None:
        """Heat rows ``[row, row + len(heat))`` are final (rows before ``row`` not yet fed
        are nodata). With ``background``, handed to the pyramid's own thread (``heat`` must
        not change afterwards); an error there is raised by a later call or :meth:`finish`."""
        if self._pool is None:
            self._feed(row, heat)
            return
        while self._queued and (self._queued[0][0].done() or sum(n for _, n in self._queued) >= _QUEUED_BYTES):
            self._queued.popleft()[0].result()
        self._queued.append((self._pool.submit(self._feed, row, heat), heat.nbytes))

    def _feed(self, row: int, heat: np.ndarray) -> None:
        self.skip_to(row)
        self._push(0, heat)
        self._row = row + len(heat)

    def skip_to(self, row: int) -> None:
        """Rows before ``row`` not fed so far are nodata (no tile touched them)."""
        row = min(int(row), self.height)
        if self._row < row:
            self._skip(0, row - self._row)
            self._row = row

    def _push(self, k: int, rows: np.ndarray) -> None:
        if k == 0 and self._preview is not None:
            done = self._preview.feed(rows)
            if done is not None:
                self._preview_rows.append(done)
        if k >= len(self._levels):
            return
        out = self._levels[k].feed(rows)
        if out is not None:
            self._emit(k, out)

    def _emit(self, k: int, out: np.ndarray) -> None:
        """Level ``k``'s next rows: written, and fed to the level below."""
        if (out != self.nodata).any():  # all nodata: left unwritten, the sparse file reads it so
            self._out[k].write(self._written[k], out)
        self._written[k] += len(out)
        self._push(k + 1, out)

    def _skip(self, k: int, n: int) -> None:
        """``n`` nodata rows into level ``k``'s source (k = 0: the heat's)."""
        if k == 0 and self._preview is not None:
            done, empty = self._preview.skip(n)
            if done is not None:
                self._preview_rows.append(done)
            if empty:
                self._preview_rows.append(np.full((empty, self._preview.w), self.nodata, np.float32))
        if k >= len(self._levels):
            return
        done, empty = self._levels[k].skip(n)
        if done is not None:
            self._emit(k, done)
        if empty:  # nodata: left unwritten, the sparse file reads it so
            self._written[k] += empty
            self._skip(k + 1, empty)

    def finish(self) -> None:
        """The rows not fed are nodata; every level is complete and its file closed."""
        if self._pool is not None:
            while self._queued:
                self._queued.popleft()[0].result()
            self._pool.shutdown()
        self.skip_to(self.height)
        for out in self._out:
            out.flush()
        if self._written != [h for _, h in self.sizes]:
            raise RuntimeError(f"overview rows written {self._written}, expected {[h for _, h in self.sizes]}")
        if self._preview is not None:
            self._preview_rows = [np.concatenate(self._preview_rows)]
            if len(self._preview_rows[0]) != self._preview.h:
                raise RuntimeError(f"preview rows {len(self._preview_rows[0])}, expected {self._preview.h}")
        self.close()

    @property
    def preview(self) -> np.ndarray:
        """The preview ``(h, w)`` float32 with nodata, after :meth:`finish`."""
        if self._preview is None or len(self._preview_rows) != 1 or len(self._preview_rows[0]) != self._preview.h:
            raise RuntimeError("HeatPyramid.preview needs a preview size and finish()")
        return self._preview_rows[0]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        for f in self._files:
            if not f.closed:
                f.close()

    def vrt(self, heat_path: Path, vrt_path: Path) -> None:
        """Write at ``vrt_path`` a VRT of the (finished, closed) heat file that lists the
        levels as its overviews."""
        import rasterio.shutil

        rasterio.shutil.copy(str(heat_path), str(vrt_path), driver="VRT")
        text = Path(vrt_path).read_text(encoding="utf-8")
        ov = "".join(f'<Overview><SourceFilename relativeToVRT="0">{escape(os.path.abspath(p))}</SourceFilename>'
                     f"<SourceBand>1</SourceBand></Overview>" for p in self.paths)
        if text.count("</VRTRasterBand>") != 1:
            raise RuntimeError(f"unexpected VRT of {heat_path}")
        Path(vrt_path).write_text(text.replace("</VRTRasterBand>", ov + "</VRTRasterBand>"), encoding="utf-8")
