"""Reading tiles of one scene as model-ready arrays: windows, band scaling, masks, previews.

Each thread gets its own dataset handle, so reader threads read in parallel (GDAL releases
the GIL).
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from typing import Iterable, Sequence

import cv2
import numpy as np
from affine import Affine
from rasterio.enums import MaskFlags
from rasterio.windows import Window

from ..errors import InputError
from .coverage import BlockCoverage, find_empty_blocks
from .grid import Tile, TileGrid, TileSet, TilingPlan, _ceil_div, valid_fraction
from .info import SceneInfo, _apply, _describe, _nodata_in_dtype, open_quiet
from .decimate import DecimatedCopy, decimated_shape
from .scaling import preview_rgb, to_unit

#: Long side of the decimated read used for the per-band percentile stretch.
STATS_MAX_SIZE = 1024


#: Scenes (without overviews) of more pixels than this take their stretch statistics from
#: whole blocks spread over the scene, about this many pixels decoded, instead of decoding
#: every block for the decimated read (timings in benchmarks/README.md).
STATS_SAMPLE_PIXELS = 4 * 2**20


#: Most scene pixels read with one window when neighbouring tiles are read together.
READ_RUN_PIXELS = 2**20


#: Codecs without implicit overviews, decimated block by block in SceneReader._read_decimated.
_PLAIN_CODECS = {"none", "lzw", "deflate", "zstd", "packbits", "lzma", "lerc", "lerc_deflate", "lerc_zstd"}


def mirror_outside_data(tile: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``tile`` (t, t, C) with its pixels outside the box of its ``valid`` ones (past the
    scene's edge, a frame's nodata round the data) mirroring the box; invalid pixels inside it
    stay 0. Black there made an edge the model read as a class (benchmarks/README.md); the
    rule reads only the tile, so a scene alone and in an empty frame get the same inputs."""
    if (box := data_box(valid)) is None:
        return tile
    r0, r1, c0, c1 = box
    inside = tile[r0:r1, c0:c1]
    mode = "reflect" if min(inside.shape[:2]) > 1 else "edge"  # one row or column: repeated
    return np.pad(inside, ((r0, valid.shape[0] - r1), (c0, valid.shape[1] - c1), (0, 0)), mode=mode)


def data_box(valid: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(row_start, row_stop, col_start, col_stop)`` round a tile's ``valid`` pixels; None
    where that is the whole tile, or there are none."""
    rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
    box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) if len(rows) else None
    return None if box in (None, (0, valid.shape[0], 0, valid.shape[1])) else box


def _scan(fn, items: Sequence) -> list:
    """``[fn(item) for item in items]`` on two threads (GDAL decodes without the GIL): the
    whole-scene samples taken when a scene is opened."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="tilescan-scan") as pool:
        return list(pool.map(fn, items))


class SceneReader:
    """Reads tiles of one scene; made by :func:`open_scene`.

    Attributes: ``info`` (:class:`SceneInfo`), ``grid`` (:class:`TileGrid` in scene
    pixels), ``bands`` (1-based band indexes fed to the model, in model order),
    ``tile_px`` (tile edge in scene pixels), ``input_size`` (model input edge),
    ``scale`` (per model band ``(lo, hi)``: value ``v`` becomes ``(v - lo) / (hi - lo)``
    clipped to [0, 1]).

    Thread-safe: each thread reads through its own rasterio dataset handle.
    """

    def __init__(self, info: SceneInfo, ds, bands: Sequence[int], grid: TileGrid,
                 input_size: int, scale: Sequence[tuple[float, float]] | None = None):
        self.info = info
        self.grid = grid
        self.bands = tuple(int(b) for b in bands)
        self.tile_px = grid.tile_size
        self.input_size = int(input_size)
        self._dtype = np.dtype(info.dtype)
        self._nodata = tuple(_nodata_in_dtype(info.nodatavals[b - 1], self._dtype) for b in self.bands)
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        self._alpha = info.alpha_band
        # An internal (per-dataset) mask that is not an alpha band: read it with read_masks.
        self.internal_mask = self._alpha is None and any(
            MaskFlags.per_dataset in f and MaskFlags.alpha not in f for f in flags
        )
        self._float = np.issubdtype(self._dtype, np.floating)
        self._block_h = int(ds.block_shapes[self.bands[0] - 1][0])  # kept: a copy from a reader process has no handle
        # read in the model's order (the alpha band after them, unless it is one of them): the
        # bands are then the read's first rows, a view, not a reordered copy of each window
        self._read_idx = tuple(self.bands) + ((self._alpha,) if self._alpha and self._alpha not in self.bands else ())
        self._alpha_pos = self._read_idx.index(self._alpha) if self._alpha else None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._local.ds = ds
        self._local.decode_threads = 1
        # Threads per read: GDAL decodes a window's blocks on this many threads (handles
        # opened from now on) and the scaling is split over as many. 1: all on the caller.
        self.decode_threads = 1
        self._scale_pool = None
        self._handles = [ds]
        self._closed = False
        self._decimated: tuple | None = None  # (shape, data, valid) of the last decimated read
        self.plan: TilingPlan | None = None  # set by open_scene
        self._preview: DecimatedCopy | None = None
        self.scale: tuple[tuple[float, float], ...] = tuple(scale) if scale is not None else ()
        self._set_scale(self.scale)
        #: Blocks known to be empty (:meth:`scan_coverage`; open_scene runs it); None: unknown.
        self.coverage: BlockCoverage | None = None
        #: Seconds spent opening the scene, by stage ("scan" for the data, "stats" for the stretch).
        self.timings: dict[str, float] = {}
        #: Windows read (and decoded) from the file so far, and their pixels.
        self.windows_read = 0
        self.pixels_read = 0
        #: Set once a reader process (tilescan.pipeline.readers) holds a copy of this reader.
        self.process_key: int | None = None

    # -- handles --------------------------------------------------------------------

    def _ds(self):
        ds = getattr(self._local, "ds", None)
        if ds is None or ds.closed or self._local.decode_threads != self.decode_threads:
            if self._closed:
                raise ValueError("SceneReader is closed")
            ds = open_quiet(self.info.path, self.decode_threads)
            self._local.decode_threads = self.decode_threads
            with self._lock:
                if self._closed:
                    ds.close()
                    raise ValueError("SceneReader is closed")
                self._handles.append(ds)
            self._local.ds = ds
        return ds

    @property
    def block_height(self) -> int:
        """Rows of the file's blocks (tiles or strips) in the first band read."""
        return self._block_h

    def release_handles(self) -> None:
        """Close the GDAL handles opened so far; a later read opens a fresh one. Once a
        scene's tiles are all read, its blocks in GDAL's cache are then freed for the
        outputs' own reads to reuse, instead of those growing the memory beside them."""
        with self._lock:
            handles, self._handles = self._handles, []
        for ds in handles:
            ds.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
            pool, self._scale_pool = self._scale_pool, None
            self._decimated = self._preview = None
        for ds in handles:
            ds.close()
        if pool is not None:
            pool.shutdown()

    def __getstate__(self) -> dict:
        """For a reader process (:mod:`tilescan.pipeline.readers`): no handles, locks or previews."""
        state = self.__dict__.copy()
        for k in ("_lock", "_local", "_handles", "_scale_pool", "_decimated", "_preview"):
            del state[k]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _local=threading.local(), _handles=[], _scale_pool=None,
                             _decimated=None, _preview=None, decode_threads=1)

    def holds_whole(self) -> bool:
        """True when the scene's statistics read holds it whole in memory (a small scene)."""
        return self._decimated is not None and self._decimated[0] == (self.info.height, self.info.width)

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.grid)

    # -- raw reads ------------------------------------------------------------------

    def _scratch(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An array of ``shape`` in this thread's buffer ``name``, reused from call to call
        (grown when too small): a window's read then writes into memory already in use
        instead of fresh pages, which the kernel must zero first (benchmarks/README.md)."""
        need = math.prod(shape) * np.dtype(dtype).itemsize
        buf = getattr(self._local, name, None)
        if buf is None or buf.nbytes < need:
            buf = np.empty(need, dtype=np.uint8)
            setattr(self._local, name, buf)
        return buf[:need].view(dtype).reshape(shape)

    def _read_raw(self, window: Window | None = None, out_shape: tuple[int, int] | None = None,
                  use_mask: bool = True, scratch: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Bands (model order, native dtype, (C, h, w)) and the valid mask (h, w)
        (``use_mask=False``: without the internal mask, from the pixel values alone;
        ``scratch``: both in this thread's reused buffers, valid until its next such read)."""
        if self._closed:
            raise ValueError("SceneReader is closed")
        if out_shape is None and use_mask and (held := self._held(window)) is not None:
            return held
        ds = self._ds()
        kw = {}
        if window is not None:
            kw["window"] = window
        if out_shape is not None:
            kw["out_shape"] = (len(self._read_idx), *out_shape)
        scratch = scratch and window is not None and out_shape is None
        if scratch:
            kw["out"] = self._scratch("raw", (len(self._read_idx), int(window.height), int(window.width)), self._dtype)
        raw = ds.read(list(self._read_idx), **kw)
        with self._lock:
            self.windows_read += 1
            self.pixels_read += raw[0].size
        data = raw[:len(self.bands)]
        valid = self._scratch("valid", raw.shape[1:], bool) if scratch else np.empty(raw.shape[1:], dtype=bool)
        valid.fill(True)
        for i, nd in enumerate(self._nodata):
            if nd is not None:
                if self._float and math.isnan(nd):
                    continue  # NaN is caught by the finiteness test below
                valid &= data[i] != nd
        if self._alpha_pos is not None:
            valid &= raw[self._alpha_pos] != 0
        if self.internal_mask and use_mask:
            mkw = {k: v for k, v in kw.items() if k != "out"}
            if out_shape is not None:
                mkw["out_shape"] = out_shape
            valid &= ds.read_masks(self.bands[0], **mkw) != 0
        if self._float:
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

    def _held(self, window: Window | None) -> tuple[np.ndarray, np.ndarray] | None:
        """``window`` of a small scene that its statistics read holds whole, at full
        resolution (no second decode); None when not held."""
        if window is None or not self.holds_whole():
            return None
        whole = self._decimated
        r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        if r0 >= 0 and c0 >= 0 and r0 + h <= whole[0][0] and c0 + w <= whole[0][1]:
            return whole[1][:, r0:r0 + h, c0:c0 + w], whole[2][r0:r0 + h, c0:c0 + w]
        return None

    def _plain_layout(self, ds) -> bool:
        """No overviews and a codec without implicit ones: a decimated read decodes every block."""
        comp = (ds.compression.name.lower() if ds.compression else "none")
        return not ds.overviews(self.bands[0]) and comp in _PLAIN_CODECS

    # -- finding the data -----------------------------------------------------------

    def scan_coverage(self) -> BlockCoverage | None:
        """Find the blocks that hold no valid pixel (:class:`BlockCoverage`), set
        ``coverage`` and return it; None (nothing known) for a file without a TIFF block
        index, or when the scan fails (the scene is then read as usual)."""
        t0 = time.monotonic()
        try:
            cov = find_empty_blocks(self)
        except Exception:  # an odd file: the reads find its problems and name them
            cov = None
        if cov is not None:
            cov = dataclasses.replace(cov, seconds=time.monotonic() - t0)
        self.coverage = cov
        self.timings["scan"] = time.monotonic() - t0
        return cov

    def tiles_with_data(self, row_start: int = 0, row_stop: int | None = None) -> tuple[TileSet, int]:
        """The tiles of grid rows ``[row_start, row_stop)`` that touch a block not known to be
        empty (row-major), and how many were left out: those hold no valid pixel, so their
        valid fraction is 0 and reading them could only skip them."""
        g = self.grid
        r0, r1 = max(0, row_start), g.n_rows if row_stop is None else min(row_stop, g.n_rows)
        cov = self.coverage
        if cov is None or not cov.n_empty or r1 <= r0:
            return TileSet.rows_of(g, r0, r1), 0
        data = np.zeros((cov.empty.shape[0] + 1, cov.empty.shape[1] + 1), np.int64)
        np.cumsum(np.cumsum(~cov.empty, axis=0), axis=1, out=data[1:, 1:])

        def span(starts: np.ndarray, size: int, block: int) -> tuple[np.ndarray, np.ndarray]:
            ends = np.minimum(starts + g.tile_size, size)  # the tile clipped to the scene
            return starts // block, (ends - 1) // block + 1

        a0, a1 = span(np.arange(r0, r1) * g.stride, self.info.height, cov.block_h)
        b0, b1 = span(np.arange(g.n_cols) * g.stride, self.info.width, cov.block_w)
        count = (data[np.ix_(a1, b1)] - data[np.ix_(a0, b1)] - data[np.ix_(a1, b0)] + data[np.ix_(a0, b0)])
        rr, cc = np.nonzero(count > 0)
        return TileSet(g, rr.astype(np.int64) + r0, cc.astype(np.int64)), int(count.size - rr.size)

    def _read_block_sample(self, max_pixels: int, where_data: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """Whole blocks on an even grid over the scene, about ``max_pixels`` decoded in all,
        plus the last block (a truncated file misses its end): bands ``(C, N)`` in model
        order and the valid mask ``(N,)``. None when the file's blocks are too big for that
        (e.g. one strip holding the whole scene).

        ``where_data``: only blocks not known to be empty (``coverage``), all of them when
        they fit in ``max_pixels``, else spread evenly over them; the last block is then the
        one stored at the end of the file. No block at all when every block is empty."""
        ds = self._ds()
        H, W = self.info.height, self.info.width
        cov = self.coverage if where_data else None
        if cov is not None:
            bh, bw = cov.block_h, cov.block_w
        else:
            bh, bw = ds.block_shapes[self.bands[0] - 1]
            bh, bw = min(bh, H), min(bw, W)
        if bh * bw * 4 > max_pixels:
            return None
        nbr, nbc = _ceil_div(H, bh), _ceil_div(W, bw)
        k = max(1, max_pixels // (bh * bw))
        if cov is not None:
            full = np.argwhere(~cov.empty)
            pick = full if len(full) <= k else full[((np.arange(k) + 0.5) * len(full) / k).astype(np.int64)]
            blocks = [(int(r), int(c)) for r, c in pick]
            if cov.last_block is not None and not cov.empty[cov.last_block] and cov.last_block not in blocks:
                blocks.append(cov.last_block)
        else:
            kr = min(nbr, k, max(1, round(math.sqrt(k * nbr / nbc))))
            kc = min(nbc, max(1, k // kr))
            rows = sorted({int((i + 0.5) * nbr / kr) for i in range(kr)})
            cols = sorted({int((j + 0.5) * nbc / kc) for j in range(kc)})
            blocks = [(r, c) for r in rows for c in cols]
            if blocks[-1] != (nbr - 1, nbc - 1):
                blocks.append((nbr - 1, nbc - 1))
        if not blocks:
            return np.zeros((len(self.bands), 0), self._dtype), np.zeros(0, bool)

        def read(block):
            r, c = block
            d, v = self._read_raw(Window(c * bw, r * bh, min(bw, W - c * bw), min(bh, H - r * bh)))
            return d.reshape(len(d), -1), v.ravel()

        parts = _scan(read, blocks)
        return np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts])

    def _read_decimated(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``_read_raw(out_shape=shape)``: the whole scene decimated (nearest) to ``shape``.

        Files with overviews are read through GDAL (which uses them). Others would make GDAL
        decode every block, and again per band once the scene outgrows the block cache; here
        the scene is read instead in block-aligned windows (only those holding a sampled
        row), on two threads, each block decoded once, and the sampled pixels are picked
        with GDAL's own rule (source pixel ``floor((i + 0.5) * size / n)``), so the result
        is identical. The last result is kept (a few MB): the stretch statistics and the
        quicklook use the same read.
        """
        shape = (int(shape[0]), int(shape[1]))
        if self._decimated is not None and self._decimated[0] == shape:
            return self._decimated[1], self._decimated[2]
        ds = self._ds()
        H, W = self.info.height, self.info.width
        n, m = shape
        # overviews (JPEG files have implicit ones), or barely decimated: let GDAL read
        if not self._plain_layout(ds) or n * m * 4 > H * W:
            data, valid = self._read_raw(out_shape=shape)
        else:
            picked = DecimatedCopy(shape, H, W, len(self.bands), self._dtype)
            rows, cols = picked.rows, picked.cols
            bh, bw = ds.block_shapes[self.bands[0] - 1]
            step_r = bh * max(1, 256 // bh)
            step_c = W if bw >= W else bw * max(1, 4096 // bw)
            cov = self.coverage
            cov = cov if cov is not None and cov.n_empty and (cov.block_h, cov.block_w) == (min(bh, H), min(bw, W)) else None
            windows = []  # block-aligned bands, cut to their first and last sampled pixel
            for r0 in range(0, H, step_r):
                i0, i1 = np.searchsorted(rows, [r0, r0 + step_r])
                if i0 == i1:
                    continue  # no sampled row in this band of blocks
                for c0 in range(0, W, step_c):
                    j0, j1 = np.searchsorted(cols, [c0, c0 + step_c])
                    if j0 < j1 and (cov is None or not cov.empty[r0 // bh:_ceil_div(r0 + step_r, bh),
                                                                 c0 // bw:_ceil_div(c0 + step_c, bw)].all()):
                        windows.append(Window(int(cols[j0]), int(rows[i0]), int(cols[j1 - 1]) + 1 - int(cols[j0]),
                                              int(rows[i1 - 1]) + 1 - int(rows[i0])))
            _scan(lambda w: picked.take(w, *self._read_raw(w)), windows)
            data, valid = picked.data, picked.valid
        self._decimated = (shape, data, valid)
        return data, valid

    def gather_preview(self, max_size: int) -> None:
        """Build the :meth:`read_overview` preview from the tiles as :meth:`read_tile` reads
        them (the same pixels a decimated read would pick), so a job that reads every tile
        need not decode the scene a second time for its quicklook. Only for files where
        that read would decode every block (no overviews); a no-op otherwise."""
        shape = decimated_shape(self.info.height, self.info.width, max_size)
        if (self._decimated is not None and self._decimated[0] == shape) or not self._plain_layout(self._ds()):
            return
        self._preview = DecimatedCopy(shape, self.info.height, self.info.width, len(self.bands), self._dtype)
        self._preview.mark_empty(self.coverage)  # skipped tiles are empty there

    def _set_scale(self, scale: Sequence[tuple[float, float]]) -> None:
        lo = np.array([s[0] for s in scale], dtype=np.float64) if scale else np.zeros(len(self.bands))
        hi = np.array([s[1] for s in scale], dtype=np.float64) if scale else np.ones(len(self.bands))
        with np.errstate(over="ignore", divide="ignore"):  # beyond float32: open_scene refuses the stretch
            self._lo = lo.astype(np.float32)
            self._inv = (1.0 / (hi - lo)).astype(np.float32)

    def _to_unit(self, data: np.ndarray, valid: np.ndarray, out: np.ndarray) -> None:
        """:func:`tilescan.scene.scaling.to_unit` with this scene's stretch."""
        to_unit(data, valid, out, self._lo, self._inv)

    def _first_bad_tile(self, tiles: Iterable[Tile]) -> tuple[Tile, Exception] | None:
        """The first of ``tiles`` whose window fails to read, and its error, through a fresh
        single-threaded handle (after a failed multi-threaded read GDAL may hand back
        zeros from its cache for the blocks that failed)."""
        ds = open_quiet(self.info.path)
        try:
            for tile in tiles:
                try:
                    ds.read(list(self._read_idx), window=tile.clipped)
                except Exception as exc:
                    return tile, exc
        finally:
            ds.close()
        return None

    def _to_unit_split(self, data: np.ndarray, valid: np.ndarray, out: np.ndarray, split: bool = True) -> None:
        """``_to_unit`` in ``decode_threads`` bands of rows at once (numpy's take and
        arithmetic release the GIL); in one piece unless ``split``."""
        n = min(self.decode_threads, len(out)) if split else 1
        if n <= 1:
            self._to_unit(data, valid, out)
            return
        with self._lock:
            if self._scale_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._scale_pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="tilescan-scale")
            pool = self._scale_pool
        cuts = [len(out) * k // n for k in range(n + 1)]
        parts = [(data[:, a:b], valid[a:b], out[a:b]) for a, b in zip(cuts, cuts[1:])]
        futures = [pool.submit(self._to_unit, *p) for p in parts[1:]]
        self._to_unit(*parts[0])
        for f in futures:
            f.result()

    # -- public reads ---------------------------------------------------------------

    def read_tile(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """``(x, valid)`` for one tile.

        ``x``: float32 ``(input_size, input_size, C)`` in [0, 1]; invalid pixels are 0, and
        those outside the box of the valid ones (past the scene's edge) mirror it
        (:func:`mirror_outside_data`). ``valid``: bool ``(tile_px, tile_px)`` at scene resolution, True
        where the pixel is inside the scene and not nodata on any model band, not masked
        (internal mask, alpha = 0) and finite.
        """
        x, valid = self.read_batch([tile])
        return x[0], valid[0]

    def read_batch(self, tiles: Sequence[Tile] | TileSet, empty=np.empty) -> tuple[np.ndarray, np.ndarray]:
        """``read_tile`` over several tiles (of this reader's grid), stacked: ``(B, S, S, C)``
        and ``(B, T, T)``; ``empty(shape, dtype)`` makes the first (e.g.
        :meth:`tilescan.pipeline.memory.ArrayPool.empty`).

        Neighbouring tiles of one grid row are read with one window and scaled together
        (the same values as tile by tile): one GDAL call per run of tiles instead of one
        per tile, whose fixed cost dominated (benchmarks/README.md)."""
        tiles = TileSet.of(self.grid, tiles)
        t, s = self.tile_px, self.input_size
        x = empty((len(tiles), s, s, len(self.bands)), np.float32)  # every tile is written by its run
        valid = np.zeros((len(tiles), t, t), dtype=bool)
        # runs: consecutive columns of one row, at most READ_RUN_PIXELS per window
        max_run = max(1, READ_RUN_PIXELS // (t * t))
        cut = np.flatnonzero((np.diff(tiles.row) != 0) | (np.diff(tiles.col) != 1)) + 1
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(tiles)]):
            for start in range(int(a), int(b), max_run):
                k = min(start + max_run, int(b))
                self._read_run(tiles[start:k], x[start:k], valid[start:k])
        return x, valid

    def _read_run(self, tiles: TileSet, x: np.ndarray, valid: np.ndarray) -> None:
        """Read adjacent tiles of one row with one window into ``x`` and ``valid``."""
        c0, r0 = int(tiles.col_off[0]), int(tiles.row_off[0])
        h = int(tiles.clipped_height[0])
        widths = tiles.clipped_width
        window = Window(c0, r0, int(tiles.col_off[-1] + widths[-1]) - c0, h)
        held = self._held(window)
        try:
            data, v = held if held is not None else self._read_raw(window, scratch=True)
        except ValueError:
            raise
        except Exception as exc:
            tile, exc = self._first_bad_tile(tiles) or (tiles[0], exc)
            raise InputError(
                f"corrupt or truncated TIFF: reading tile row {tile.row} col {tile.col} "
                f"(window {tile.clipped}) failed: {_describe(exc)}", path=str(self.info.path)) from exc
        if self._preview is not None:
            self._preview.take(window, data, v)
        t, s, n = self.tile_px, self.input_size, len(tiles)
        # a held scene's read is small and comes from memory, and while many small scenes
        # run, finishers hold the other cores: handing half to a helper thread costs more
        split = held is None
        # whole tiles side by side from the run's start (often all but the last, clipped at
        # the scene's right edge): scaled straight into x, seen as (row, tile, column, band),
        # without a strip copy
        k = 0
        if t == s and h == t:
            side = (tiles.col_off - c0 == np.arange(n) * t) & (widths == t)
            k = n if side.all() else int(np.argmin(side))
        if k:
            head = v[:, :k * t].reshape(t, k, t)
            self._to_unit_split(data[:, :, :k * t].reshape(len(data), t, k, t), head, x[:k].transpose(1, 0, 2, 3), split)
            valid[:k] = head.transpose(1, 0, 2)
            if not head.all():  # a frame's nodata round the data: mirrored, as past the scene's edge
                for i in np.flatnonzero(~valid[:k].all(axis=(1, 2))):
                    x[i] = mirror_outside_data(x[i], valid[i])
            if k == n:
                return
        # the others through a strip from the first of them on
        a0 = int(tiles.col_off[k]) - c0
        unit = np.empty((h, window.width - a0, len(self.bands)), dtype=np.float32)
        self._to_unit_split(data[:, :, a0:], v[:, a0:], unit, split)
        for j in range(k, n):
            a = int(tiles.col_off[j]) - c0
            w = int(widths[j])
            valid[j, :h, :w] = v[:, a:a + w]
            a -= a0
            full = x[j] if t == s else np.empty((t, t, len(self.bands)), dtype=np.float32)  # in place where it can
            full[...] = 0.0
            full[:h, :w] = unit[:, a:a + w]
            if not valid[j].all():  # only then is there a box to mirror: no copy for a whole tile
                full[...] = mirror_outside_data(full, valid[j])
            if t != s:
                interp = cv2.INTER_AREA if t > s else cv2.INTER_LINEAR
                x[j] = cv2.resize(full, (s, s), interpolation=interp).reshape(s, s, -1)

    valid_fraction = staticmethod(valid_fraction)

    def read_overview(self, max_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """A decimated preview of the whole scene: uint8 RGB ``(h, w, 3)`` (long side at
        most ``max_size``; same bands and scaling as the tiles, the first three model
        bands as R, G, B, a single band as grey) and its bool valid mask ``(h, w)``."""
        data, valid = self.overview_read(max_size)
        return preview_rgb(data, valid, *self.preview_stretch()), valid

    def overview_read(self, max_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`read_overview` draws: the scene's bands decimated to a long side of at
        most ``max_size`` ``(C, h, w)`` and their valid mask; from the tiles when the reads
        gathered it (:meth:`gather_preview`)."""
        shape = decimated_shape(self.info.height, self.info.width, max_size)
        pv = self._preview
        if pv is not None and pv.shape == shape and pv.seen.all():
            self._decimated = (shape, pv.data, pv.valid)
            self._preview = None
        return self._read_decimated(shape)

    def preview_stretch(self) -> tuple[np.dtype, np.ndarray, np.ndarray]:
        """``(dtype, lo, inv)``: how :func:`~tilescan.scene.scaling.preview_rgb` scales
        :meth:`overview_read` as the tiles are scaled."""
        return self._dtype, self._lo, self._inv

    # -- georeferencing helpers -----------------------------------------------------

    def tile_transform(self, tile: Tile) -> Affine:
        """Affine transform of the full tile window (= ``rasterio.windows.transform``)."""
        t = self.info.transform
        x0, y0 = _apply(t, tile.window.col_off, tile.window.row_off)
        return Affine(t.a, t.b, x0, t.d, t.e, y0)

    def tile_bounds(self, tile: Tile, clipped: bool = False) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the tile in the scene CRS: the box round its footprint."""
        xs, ys = zip(*self.footprint(tile, clipped))  # a rotated, sheared or south-up transform too
        return min(xs), min(ys), max(xs), max(ys)

    def footprint(self, tile: Tile, clipped: bool = False) -> list[tuple[float, float]]:
        """Closed ring of the tile's corners in the scene CRS (exact for rotated
        geotransforms): top-left, top-right, bottom-right, bottom-left, top-left."""
        w = tile.clipped if clipped else tile.window
        c0, r0 = w.col_off, w.row_off
        c1, r1 = c0 + w.width, r0 + w.height
        T = self.info.transform
        ring = [_apply(T, c0, r0), _apply(T, c1, r0), _apply(T, c1, r1), _apply(T, c0, r1)]
        return [(float(x), float(y)) for x, y in ring + ring[:1]]

    def __repr__(self) -> str:
        return (f"SceneReader({self.info.path.name!r}, {self.info.width}x{self.info.height}, "
                f"bands={list(self.bands)}, tile_px={self.tile_px}, tiles={len(self.grid)})")
