"""The tile grid over a scene, and reading tiles as model-ready arrays.

No Keras here: this module only needs rasterio, numpy, OpenCV and pyproj.

Pieces, in the order a job uses them:

- :func:`find_scenes` turns command-line inputs (files and directories) into scene paths.
- :func:`open_scene` checks one GeoTIFF (readable, georeferenced, bands the model can
  take), picks the bands, computes the per-band scaling once, sizes the tiles (pixels,
  metres, or the model's native ground sample distance) and returns a :class:`SceneReader`.
- :class:`TileGrid` / :class:`Tile`: the window grid (formula in :class:`TileGrid`).
- :meth:`SceneReader.read_tile` reads one tile window (never the whole scene) and returns
  the float32 model input plus a validity mask at scene resolution. Each thread gets its
  own dataset handle, so reader threads can read in parallel (GDAL releases the GIL).
- :class:`BlockCoverage` (``reader.coverage``): the blocks of the file known to hold no
  valid pixel, found from the TIFF's block index before anything is decoded, so
  :meth:`SceneReader.tiles_with_data` skips empty areas in bulk and the stretch sample is
  drawn where the data is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import cv2
import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from .config import TilingConfig
from .errors import ConfigError, InputError, NoScenesError

__all__ = [
    "MAX_TILE_PX",
    "BlockCoverage",
    "SceneInfo",
    "SceneReader",
    "Tile",
    "TileGrid",
    "TilingPlan",
    "TilingWarning",
    "find_scenes",
    "open_scene",
    "valid_fraction",
]

#: Largest tile edge (scene pixels) a reader accepts; a bigger one would need gigabytes
#: per tile (this happens with ``resample_to_gsd`` on a scene far finer than the model).
MAX_TILE_PX = 8192
#: Long side of the decimated read used for the per-band percentile stretch.
STATS_MAX_SIZE = 1024
#: Scenes (without overviews) of more pixels than this take their stretch statistics from
#: whole blocks spread over the scene, about this many pixels decoded, instead of decoding
#: every block for the decimated read (timings in benchmarks/README.md).
STATS_SAMPLE_PIXELS = 4 * 2**20
#: Most scene pixels read with one window when neighbouring tiles are read together.
READ_RUN_PIXELS = 2**20
#: A stored block is compared byte for byte with the others of its size only when it is at
#: most this share of its raw size (a block of one value compresses to a sliver of it).
REPEAT_MAX_SHARE = 0.125
#: Most bytes read from the file to compare such blocks.
REPEAT_MAX_BYTES = 64 * 2**20
#: Most blocks decoded to prove that a group of identical (or absent) blocks is empty.
MAX_PROOF_READS = 64
#: Scenes of more blocks than this are not scanned for empty blocks (the scan walks the
#: block index in Python).
MAX_SCAN_BLOCKS = 2**22
#: Codecs without implicit overviews, decimated block by block in SceneReader._read_decimated.
_PLAIN_CODECS = {"none", "lzw", "deflate", "zstd", "packbits", "lzma", "lerc", "lerc_deflate", "lerc_zstd"}

TIFF_SUFFIXES = (".tif", ".tiff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_OTHER_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x00\x00\x00\x0cjP", "a JPEG 2000 image"),
    (b"\x89HDF", "an HDF5 file"),
    (b"CDF", "a netCDF file"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"<", "an XML/HTML text file"),
)
_DEFAULT_BAND_NAMES = {3: ("red", "green", "blue")}


class TilingWarning(UserWarning):
    """Something about a scene the user should know, but that does not stop the run."""


# --------------------------------------------------------------------------------------
# the grid


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Tile:
    """One cell of a :class:`TileGrid`.

    ``window`` is the full tile (``tile_size`` square); at the right and bottom edges it
    extends past the scene, and that part is padded (and invalid) when read.
    """

    index: int
    """Row-major number of the tile in its grid (``row * n_cols + col``)."""
    row: int
    col: int
    window: Window
    scene_width: int = field(repr=False)
    scene_height: int = field(repr=False)

    @property
    def clipped(self) -> Window:
        """The window intersected with the scene (never empty: tile origins lie inside)."""
        w = self.window
        c0, r0 = int(w.col_off), int(w.row_off)
        return Window(c0, r0, min(c0 + int(w.width), self.scene_width) - c0,
                      min(r0 + int(w.height), self.scene_height) - r0)

    @property
    def size(self) -> int:
        """Tile edge in scene pixels."""
        return int(self.window.width)


@dataclass(frozen=True)
class TileGrid:
    """A grid of square windows over a ``width`` × ``height`` scene.

    With ``T = tile_size`` and ``S = stride`` (``stride = 0`` means ``S = T``; ``S`` may
    not exceed ``T``, or pixels between tiles would be skipped)::

        n_cols = 1 + max(0, ceil((width  - T) / S))
        n_rows = 1 + max(0, ceil((height - T) / S))

    Tile ``(r, c)`` has ``Window(col_off=c*S, row_off=r*S, width=T, height=T)``. Every
    tile origin lies inside the scene; the last column/row of tiles may extend past the
    right/bottom edge and is padded there, so no pixel is dropped. A scene smaller than
    one tile gives exactly one tile. Tiles are numbered in row-major order.
    """

    width: int
    height: int
    tile_size: int
    stride: int = 0
    n_rows: int = field(init=False)
    n_cols: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("width", "height", "tile_size", "stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"TileGrid {name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.width < 1 or self.height < 1:
            raise ValueError(f"scene size must be at least 1x1, got {self.width}x{self.height}")
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if self.stride < 0:
            raise ValueError(f"stride must be >= 0 (0 = tile_size), got {self.stride}")
        if self.stride == 0:
            object.__setattr__(self, "stride", self.tile_size)
        if self.stride > self.tile_size:
            raise ValueError(
                f"stride {self.stride} is larger than tile_size {self.tile_size}: "
                "the pixels between tiles would never be read"
            )
        t, s = self.tile_size, self.stride
        object.__setattr__(self, "n_cols", 1 + max(0, _ceil_div(self.width - t, s)))
        object.__setattr__(self, "n_rows", 1 + max(0, _ceil_div(self.height - t, s)))

    def __len__(self) -> int:
        return self.n_rows * self.n_cols

    def tile(self, row: int, col: int) -> Tile:
        if not (0 <= row < self.n_rows and 0 <= col < self.n_cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.n_rows}x{self.n_cols} grid")
        s, t = self.stride, self.tile_size
        return Tile(row * self.n_cols + col, row, col, Window(col * s, row * s, t, t),
                    self.width, self.height)

    def __getitem__(self, index: int) -> Tile:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"tile index {index} outside a grid of {n} tiles")
        return self.tile(*divmod(index, self.n_cols))

    def tiles(self) -> Iterator[Tile]:
        """All tiles, row-major."""
        return self.rows(0, self.n_rows)

    def __iter__(self) -> Iterator[Tile]:
        return self.tiles()

    def rows(self, start: int, stop: int) -> Iterator[Tile]:
        """Tiles of grid rows ``[start, stop)`` (clamped to the grid), row-major.

        Disjoint row ranges give disjoint tile sets, so a scene can be sharded by rows.
        """
        start, stop = max(0, start), min(self.n_rows, stop)
        for r in range(start, stop):
            for c in range(self.n_cols):
                yield self.tile(r, c)

    def row_ranges(self, count: int) -> list[tuple[int, int]]:
        """Split the grid rows into ``count`` contiguous ``(start, stop)`` ranges whose
        sizes differ by at most one (ranges may be empty when ``count > n_rows``)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        base, extra = divmod(self.n_rows, count)
        out, start = [], 0
        for i in range(count):
            stop = start + base + (1 if i < extra else 0)
            out.append((start, stop))
            start = stop
        return out


def valid_fraction(valid: np.ndarray) -> float:
    """Fraction of the full tile area that is valid (``valid`` covers the whole tile,
    padding included, so a tile half outside the scene has at most 0.5)."""
    return float(np.count_nonzero(valid)) / valid.size if valid.size else 0.0


# --------------------------------------------------------------------------------------
# scene description


@dataclass(frozen=True)
class SceneInfo:
    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: rasterio.crs.CRS | None
    transform: Affine
    nodata: float | None
    """Nodata of band 1 (``nodatavals`` has every band's)."""
    nodatavals: tuple[float | None, ...]
    res: tuple[float, float]
    bounds: tuple[float, float, float, float]
    has_alpha: bool
    alpha_band: int | None
    """1-based index of the alpha band, if any."""
    band_descriptions: tuple[str | None, ...]
    colorinterp: tuple[str, ...]
    georeferenced: bool
    gsd_m: float | None
    """Ground sample distance in metres, measured on the ellipsoid at the scene centre
    (mean of the pixel's x and y steps); None without a CRS. For UTM / State Plane this
    equals ``res`` × the unit to within 0.1 %; for Web Mercator it is the true ground
    size (``res`` × cos(latitude)); for geographic CRSs it converts degrees to metres."""
    nominal_gsd_m: float | None
    """``res`` × the CRS's linear unit in metres (projected CRSs only)."""


def _nodata_in_dtype(nodata: float | None, dtype: np.dtype) -> float | None:
    """``nodata`` as a value of ``dtype``, or None if no pixel could ever equal it."""
    if nodata is None:
        return None
    if np.issubdtype(dtype, np.floating):
        return float(nodata)
    if not math.isfinite(nodata) or nodata != int(nodata):
        return None
    info = np.iinfo(dtype)
    return int(nodata) if info.min <= nodata <= info.max else None


def _apply(t: Affine, col: float, row: float) -> tuple[float, float]:
    """Pixel (col, row) to CRS coordinates (written out: ``Affine * tuple`` is deprecated
    in newer affine releases and ``@`` missing in older ones)."""
    return t.a * col + t.b * row + t.c, t.d * col + t.e * row + t.f


def _ground_gsd(crs, transform: Affine, width: int, height: int) -> float | None:
    """Metres per pixel at the scene centre, measured on the CRS's ellipsoid."""
    try:
        import pyproj

        pcrs = pyproj.CRS.from_user_input(crs.to_wkt())
        geod = pcrs.get_geod()
        geog = pcrs.geodetic_crs
        if geod is None or geog is None:
            return None
        tr = pyproj.Transformer.from_crs(pcrs, geog, always_xy=True)
        cx, cy = width / 2.0, height / 2.0
        pts = [_apply(transform, cx, cy), _apply(transform, cx + 1, cy), _apply(transform, cx, cy + 1)]
        lon, lat = tr.transform([p[0] for p in pts], [p[1] for p in pts])
        if not all(math.isfinite(v) for v in (*lon, *lat)):
            return None
        _, _, dx = geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, dy = geod.inv(lon[0], lat[0], lon[2], lat[2])
        gsd = (abs(dx) + abs(dy)) / 2.0
        return gsd if math.isfinite(gsd) and gsd > 0 else None
    except Exception:  # an unusual CRS pyproj cannot handle: fall back to nominal
        return None


def _nominal_gsd(crs, res: tuple[float, float]) -> float | None:
    try:
        if crs is None or not crs.is_projected:
            return None
        _, factor = crs.linear_units_factor
        return (abs(res[0]) + abs(res[1])) / 2.0 * float(factor)
    except Exception:
        return None


def _is_georeferenced(ds) -> bool:
    return ds.crs is not None and not ds.transform.is_identity


def _scene_info(path: Path, ds) -> SceneInfo:
    ci = tuple(c.name for c in ds.colorinterp)
    alpha = next((i + 1 for i, c in enumerate(ds.colorinterp) if c == ColorInterp.alpha), None)
    georef = _is_georeferenced(ds)
    # A CRS without a geotransform gives pixel coordinates: outputs must not claim that CRS
    # (a GIS would put them near 0, 0 of it), so such a scene is treated as having none.
    crs = ds.crs if ds.crs and not ds.transform.is_identity else None
    res = (float(ds.res[0]), float(ds.res[1]))
    nominal = _nominal_gsd(crs, res) if georef else None
    gsd = _ground_gsd(crs, ds.transform, ds.width, ds.height) if georef else None
    if gsd is None:
        gsd = nominal
    return SceneInfo(
        path=path,
        width=ds.width,
        height=ds.height,
        count=ds.count,
        dtype=str(ds.dtypes[0]),
        crs=crs,
        transform=ds.transform,
        nodata=ds.nodata,
        nodatavals=tuple(ds.nodatavals),
        res=res,
        bounds=tuple(ds.bounds),
        has_alpha=alpha is not None,
        alpha_band=alpha,
        band_descriptions=tuple(ds.descriptions),
        colorinterp=ci,
        georeferenced=georef,
        gsd_m=gsd,
        nominal_gsd_m=nominal,
    )


# --------------------------------------------------------------------------------------
# reading


def _describe(exc: BaseException) -> str:
    """The messages of an exception and its causes (rasterio's own message is often just
    "Read failed. See previous exception"; GDAL's detail is in the chain)."""
    parts: list[str] = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = str(e).strip()
        if msg and "see previous exception" not in msg.lower() and not any(msg in q for q in parts):
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return "; ".join(parts) or type(exc).__name__


def _decimated_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    f = min(1.0, max_size / max(height, width))
    return max(1, round(height * f)), max(1, round(width * f))


def _sample_index(n: int, size: int) -> np.ndarray:
    """The source pixels a nearest decimation of ``size`` pixels to ``n`` picks, GDAL's
    rule: ``floor((i + 0.5) * size / n)``."""
    return np.minimum(((np.arange(n) + 0.5) * (size / n)).astype(np.int64), size - 1)


def _scan(fn, items: Sequence) -> list:
    """``[fn(item) for item in items]`` on two threads (GDAL decodes without the GIL): the
    whole-scene samples taken when a scene is opened."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1), thread_name_prefix="tilescan-scan") as pool:
        return list(pool.map(fn, items))


class _DecimatedCopy:
    """A decimated copy of the scene filled window by window: from the tiles as they are
    read (``gather_preview``) or from block windows (``_read_decimated``). Threads write
    disjoint parts (overlapping windows write the same values)."""

    def __init__(self, shape: tuple[int, int], height: int, width: int, bands: int, dtype: np.dtype):
        self.shape = shape
        self.rows, self.cols = _sample_index(shape[0], height), _sample_index(shape[1], width)
        self.data = np.zeros((bands, *shape), dtype=dtype)
        self.valid = np.zeros(shape, dtype=bool)
        self.seen = np.zeros(shape, dtype=bool)

    def take(self, window: Window, data: np.ndarray, valid: np.ndarray) -> None:
        r0, c0 = int(window.row_off), int(window.col_off)
        i0, i1 = np.searchsorted(self.rows, [r0, r0 + int(window.height)])
        j0, j1 = np.searchsorted(self.cols, [c0, c0 + int(window.width)])
        if i0 == i1 or j0 == j1:
            return
        ri, ci = self.rows[i0:i1] - r0, self.cols[j0:j1] - c0
        self.data[:, i0:i1, j0:j1] = data[:, ri][:, :, ci]
        self.valid[i0:i1, j0:j1] = valid[ri][:, ci]
        self.seen[i0:i1, j0:j1] = True

    def mark_empty(self, coverage: "BlockCoverage | None") -> None:
        """Count the samples inside known-empty blocks as seen (invalid): no read needed there."""
        if coverage is not None and coverage.n_empty:
            self.seen |= coverage.empty[np.ix_(self.rows // coverage.block_h, self.cols // coverage.block_w)]


def _open_quiet(path: Path | str, decode_threads: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if decode_threads > 1:  # GDAL decodes the blocks of one read in parallel
            return rasterio.open(path, num_threads=str(decode_threads))
        return rasterio.open(path)


# --------------------------------------------------------------------------------------
# finding the data


@dataclass(frozen=True)
class BlockCoverage:
    """The blocks of a scene's file proven to hold no valid pixel, found without decoding them.

    Evidence, cheapest first: the TIFF block index (GDAL's ``BLOCK_SIZE_x_y`` /
    ``BLOCK_OFFSET_x_y`` items of the ``TIFF`` metadata domain, read from the file's header,
    so a remote COG costs no range request per block): a block with no bytes (a sparse
    file) reads as the fill value; blocks whose compressed bytes are identical decode to the
    same pixels (compared only for small blocks of a repeated size, in a local file). Each
    such group is proven empty by decoding one block of it with the reader's own validity
    rule (nodata, alpha, internal mask, NaN). Overviews are not used as evidence: an
    overview pixel at nodata does not prove that the full-resolution pixels under it are.

    ``empty[i, j]`` is True when block row ``i``, column ``j`` (``block_h`` x ``block_w``
    scene pixels, cut at the scene's edge) holds no valid pixel; False means "not known to
    be empty", read as usual.
    """

    block_h: int
    block_w: int
    empty: np.ndarray
    absent: int = 0
    """Empty blocks with no bytes in the file (sparse)."""
    repeated: int = 0
    """Empty blocks found through bytes identical to a block decoded as empty."""
    proof_reads: int = 0
    """Blocks decoded to prove that their group is empty."""
    seconds: float = 0.0
    last_block: tuple[int, int] | None = None
    """The stored block at the highest file offset (a truncated file lacks it)."""

    @property
    def n_blocks(self) -> int:
        return int(self.empty.size)

    @property
    def n_empty(self) -> int:
        return int(np.count_nonzero(self.empty))

    @property
    def all_empty(self) -> bool:
        return bool(self.empty.all())

    def to_dict(self) -> dict:
        return {"block_shape": [self.block_h, self.block_w], "blocks": self.n_blocks,
                "blocks_empty": self.n_empty, "absent": self.absent, "repeated": self.repeated,
                "proof_reads": self.proof_reads, "seconds": round(self.seconds, 4)}


def _block_index(ds, bidx: int, nbr: int, nbc: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte count and file offset of every block of band ``bidx`` (0 for a block not stored)."""
    sizes = np.zeros((nbr, nbc), np.int64)
    offsets = np.zeros((nbr, nbc), np.int64)
    get = ds.get_tag_item
    for i in range(nbr):
        for j in range(nbc):
            s = get(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=bidx)
            if s and s != "0":
                sizes[i, j] = int(s)
                offsets[i, j] = int(get(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=bidx) or 0)
    return sizes, offsets


def _content_tokens(sizes: np.ndarray, offsets: np.ndarray, raw_bytes: int, fh, budget: list[int]) -> np.ndarray:
    """Per block: 0 not stored, ``k > 0`` the ``k``-th distinct content among the small
    blocks of a repeated size (compared by a hash of their bytes), -1 unknown."""
    tok = np.full(sizes.size, -1, np.int64)
    flat_s, flat_o = sizes.ravel(), offsets.ravel()
    tok[flat_s == 0] = 0
    if fh is None:
        return tok
    small = np.flatnonzero((flat_s > 0) & (flat_s <= raw_bytes * REPEAT_MAX_SHARE))
    if small.size < 2:
        return tok
    values, counts = np.unique(flat_s[small], return_counts=True)
    cand = small[np.isin(flat_s[small], values[counts >= 2])]
    ids: dict[bytes, int] = {}
    for k in cand[np.argsort(flat_o[cand], kind="stable")]:  # in file order: sequential reads
        size = int(flat_s[k])
        if size > budget[0]:
            break
        budget[0] -= size
        fh.seek(int(flat_o[k]))
        digest = hashlib.blake2b(fh.read(size), digest_size=16).digest()
        tok[k] = ids.setdefault(digest, len(ids) + 1)
    return tok


def _mask_ifd(path: str, ds):
    """The internal mask's own TIFF directory (``GTIFF_DIR:k``), opened, or None: the first
    directory after the image's of the image's size and one band (a multi-page file, where
    that could be another image, has subdatasets and is left out)."""
    if ds.subdatasets:
        return None
    for k in range(2, 2 * (1 + len(ds.overviews(1))) + 2):
        try:
            m = _open_quiet(f"GTIFF_DIR:{k}:{path}")
        except Exception:
            return None
        if (m.width, m.height, m.count) == (ds.width, ds.height, 1):
            return m
        m.close()
    return None


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
        self._internal_mask = self._alpha is None and any(
            MaskFlags.per_dataset in f and MaskFlags.alpha not in f for f in flags
        )
        self._float = np.issubdtype(self._dtype, np.floating)
        self._read_idx = tuple(sorted(set(self.bands) | ({self._alpha} if self._alpha else set())))
        pos = {b: i for i, b in enumerate(self._read_idx)}
        self._band_pos = [pos[b] for b in self.bands]
        self._alpha_pos = pos.get(self._alpha) if self._alpha else None
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
        self._preview: _DecimatedCopy | None = None
        self.scale: tuple[tuple[float, float], ...] = tuple(scale) if scale is not None else ()
        self._set_scale(self.scale)
        #: Blocks known to be empty (:meth:`scan_coverage`; open_scene runs it); None: unknown.
        self.coverage: BlockCoverage | None = None
        #: Seconds spent opening the scene, by stage ("scan" for the data, "stats" for the stretch).
        self.timings: dict[str, float] = {}
        #: Windows read (and decoded) from the file so far, and their pixels.
        self.windows_read = 0
        self.pixels_read = 0

    # -- handles --------------------------------------------------------------------

    def _ds(self):
        ds = getattr(self._local, "ds", None)
        if ds is None or ds.closed or self._local.decode_threads != self.decode_threads:
            if self._closed:
                raise ValueError("SceneReader is closed")
            ds = _open_quiet(self.info.path, self.decode_threads)
            self._local.decode_threads = self.decode_threads
            with self._lock:
                if self._closed:
                    ds.close()
                    raise ValueError("SceneReader is closed")
                self._handles.append(ds)
            self._local.ds = ds
        return ds

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles, self._handles = self._handles, []
            pool, self._scale_pool = self._scale_pool, None
        for ds in handles:
            ds.close()
        if pool is not None:
            pool.shutdown()

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.grid)

    # -- raw reads ------------------------------------------------------------------

    def _read_raw(self, window: Window | None = None, out_shape: tuple[int, int] | None = None,
                  use_mask: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Bands (model order, native dtype, (C, h, w)) and the valid mask (h, w)
        (``use_mask=False``: without the internal mask, from the pixel values alone)."""
        ds = self._ds()
        kw = {}
        if window is not None:
            kw["window"] = window
        if out_shape is not None:
            kw["out_shape"] = (len(self._read_idx), *out_shape)
        raw = ds.read(list(self._read_idx), **kw)
        with self._lock:
            self.windows_read += 1
            self.pixels_read += raw[0].size
        data = raw[self._band_pos] if self._band_pos != list(range(len(self._read_idx))) else raw
        valid = np.ones(raw.shape[1:], dtype=bool)
        for i, nd in enumerate(self._nodata):
            if nd is not None:
                if self._float and math.isnan(nd):
                    continue  # NaN is caught by the finiteness test below
                valid &= data[i] != nd
        if self._alpha_pos is not None:
            valid &= raw[self._alpha_pos] != 0
        if self._internal_mask and use_mask:
            mkw = dict(kw)
            if out_shape is not None:
                mkw["out_shape"] = out_shape
            valid &= ds.read_masks(self.bands[0], **mkw) != 0
        if self._float:
            valid &= np.isfinite(data).all(axis=0)
        return data, valid

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
            cov = self._find_empty_blocks()
        except Exception:  # an odd file: the reads find its problems and name them
            cov = None
        if cov is not None:
            cov = dataclasses.replace(cov, seconds=time.monotonic() - t0)
        self.coverage = cov
        self.timings["scan"] = time.monotonic() - t0
        return cov

    def _find_empty_blocks(self) -> BlockCoverage | None:
        ds = self._ds()
        if ds.driver != "GTiff":
            return None
        H, W = self.info.height, self.info.width
        shapes = {ds.block_shapes[b - 1] for b in self._read_idx}
        if len(shapes) != 1:
            return None
        fbh, fbw = shapes.pop()  # the blocks as stored (may exceed a small scene)
        bh, bw = min(fbh, H), min(fbw, W)
        nbr, nbc = _ceil_div(H, bh), _ceil_div(W, bw)
        if nbr * nbc > MAX_SCAN_BLOCKS:
            return None
        pixel = ds.count == 1 or (ds.interleaving is not None and ds.interleaving.name == "pixel")
        planes = [1] if pixel else list(self._read_idx)
        raw_bytes = fbh * fbw * self._dtype.itemsize * (ds.count if pixel else 1)
        path = str(self.info.path)
        fh = open(path, "rb") if os.path.isfile(path) else None  # remote: absent blocks only
        budget = [REPEAT_MAX_BYTES]
        tokens, last, last_off = [], None, -1
        use_mask, mask_ds = False, None
        try:
            indexes = [(ds, b, raw_bytes) for b in planes]
            mask_ds = _mask_ifd(path, ds) if self._internal_mask else None
            if mask_ds is not None and mask_ds.block_shapes[0] == (fbh, fbw):
                indexes.append((mask_ds, 1, fbh * fbw))
                use_mask = True
            for src, b, raw in indexes:
                sizes, offsets = _block_index(src, b, nbr, nbc)
                k = int(np.argmax(offsets))
                if sizes.flat[k] and offsets.flat[k] > last_off:
                    last_off, last = int(offsets.flat[k]), divmod(k, nbc)
                tokens.append(_content_tokens(sizes, offsets, raw, fh, budget))
        finally:
            if fh is not None:
                fh.close()
            if mask_ds is not None:
                mask_ds.close()
        # blocks with the same content in every plane decode alike: prove one per group
        keys = np.stack(tokens, axis=1)
        known = np.flatnonzero((keys >= 0).all(axis=1))
        empty = np.zeros(nbr * nbc, bool)
        absent = repeated = reads = 0
        if known.size:
            groups, inv = np.unique(keys[known], axis=0, return_inverse=True)
            inv = inv.ravel()
            rows, cols = np.divmod(known, nbc)
            vis_h, vis_w = np.minimum(bh, H - rows * bh), np.minimum(bw, W - cols * bw)
            for g in np.argsort(-np.bincount(inv), kind="stable"):
                members = np.flatnonzero(inv == g)
                while members.size and reads < MAX_PROOF_READS:
                    # the member showing most of the block: an edge block shows a corner of
                    # the same content, so it is proven by any member showing at least as much
                    rep = members[np.argmax(vis_h[members] * vis_w[members])]
                    reads += 1
                    try:
                        _, valid = self._read_raw(Window(int(cols[rep] * bw), int(rows[rep] * bh),
                                                         int(vis_w[rep]), int(vis_h[rep])), use_mask=use_mask)
                    except Exception:
                        break
                    if valid.any():
                        break
                    ok = (vis_h[members] <= vis_h[rep]) & (vis_w[members] <= vis_w[rep])
                    empty[known[members[ok]]] = True
                    if not groups[g].any():
                        absent += int(ok.sum())
                    else:
                        repeated += int(ok.sum())
                    members = members[~ok]
        return BlockCoverage(bh, bw, empty.reshape(nbr, nbc), absent, repeated, reads, 0.0, last)

    def tiles_with_data(self, row_start: int = 0, row_stop: int | None = None) -> tuple[list[Tile], int]:
        """The tiles of grid rows ``[row_start, row_stop)`` that touch a block not known to be
        empty (row-major), and how many were left out: those hold no valid pixel, so their
        valid fraction is 0 and reading them could only skip them."""
        g = self.grid
        r0, r1 = max(0, row_start), g.n_rows if row_stop is None else min(row_stop, g.n_rows)
        cov = self.coverage
        if cov is None or not cov.n_empty or r1 <= r0:
            return list(g.rows(r0, r1)), 0
        data = np.zeros((cov.empty.shape[0] + 1, cov.empty.shape[1] + 1), np.int64)
        np.cumsum(np.cumsum(~cov.empty, axis=0), axis=1, out=data[1:, 1:])

        def span(starts: np.ndarray, size: int, block: int) -> tuple[np.ndarray, np.ndarray]:
            ends = np.minimum(starts + g.tile_size, size)  # the tile clipped to the scene
            return starts // block, (ends - 1) // block + 1

        a0, a1 = span(np.arange(r0, r1) * g.stride, self.info.height, cov.block_h)
        b0, b1 = span(np.arange(g.n_cols) * g.stride, self.info.width, cov.block_w)
        count = (data[np.ix_(a1, b1)] - data[np.ix_(a0, b1)] - data[np.ix_(a1, b0)] + data[np.ix_(a0, b0)])
        rr, cc = np.nonzero(count > 0)
        return [g.tile(int(r) + r0, int(c)) for r, c in zip(rr, cc)], int(count.size - rr.size)

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
            picked = _DecimatedCopy(shape, H, W, len(self.bands), self._dtype)
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
        shape = _decimated_shape(self.info.height, self.info.width, max_size)
        if (self._decimated is not None and self._decimated[0] == shape) or not self._plain_layout(self._ds()):
            return
        self._preview = _DecimatedCopy(shape, self.info.height, self.info.width, len(self.bands), self._dtype)
        self._preview.mark_empty(self.coverage)  # skipped tiles are empty there

    def _set_scale(self, scale: Sequence[tuple[float, float]]) -> None:
        lo = np.array([s[0] for s in scale], dtype=np.float64) if scale else np.zeros(len(self.bands))
        hi = np.array([s[1] for s in scale], dtype=np.float64) if scale else np.ones(len(self.bands))
        self._lo = lo.astype(np.float32)
        self._inv = (1.0 / (hi - lo)).astype(np.float32)
        # 8/16-bit integers: every possible value scaled once, with the same float32 steps as
        # below, so a tile is scaled by one table look-up per pixel and band (the same values,
        # faster: benchmarks/README.md).
        self._lut = None
        if self._dtype.kind in "ui" and self._dtype.itemsize <= 2:
            self._lut_index = np.dtype(f"u{self._dtype.itemsize}")
            values = np.arange(2 ** (8 * self._dtype.itemsize)).astype(self._lut_index)
            values = values.view(self._dtype).astype(np.float32)
            lut = (values[None, :] - self._lo[:, None]) * self._inv[:, None]
            self._lut = np.clip(lut, 0.0, 1.0, out=lut)

    def _to_unit(self, data: np.ndarray, valid: np.ndarray, out: np.ndarray) -> None:
        """Scale ``data`` (C, ...) into ``out`` (..., C) float32 (e.g. (C, h, w) into
        (h, w, C)), pixels where ``valid`` (...) is False set to 0."""
        if self._lut is not None and data.dtype == self._dtype and len(self._lut) == len(data):
            index = data.view(self._lut_index)
            for i in range(len(data)):
                np.take(self._lut[i], index[i], out=out[..., i], mode="clip")
        else:
            with np.errstate(invalid="ignore", over="ignore"):
                np.copyto(out, np.moveaxis(data, 0, -1), casting="unsafe")
                out -= self._lo
                out *= self._inv
                np.clip(out, 0.0, 1.0, out=out)
        if not valid.all():
            out[~valid] = 0.0

    def _first_bad_tile(self, tiles: Sequence[Tile]) -> tuple[Tile, Exception] | None:
        """The first of ``tiles`` whose window fails to read, and its error, through a fresh
        single-threaded handle (after a failed multi-threaded read GDAL may hand back
        zeros from its cache for the blocks that failed)."""
        ds = _open_quiet(self.info.path)
        try:
            for tile in tiles:
                try:
                    ds.read(list(self._read_idx), window=tile.clipped)
                except Exception as exc:
                    return tile, exc
        finally:
            ds.close()
        return None

    def _to_unit_split(self, data: np.ndarray, valid: np.ndarray, out: np.ndarray) -> None:
        """``_to_unit`` in ``decode_threads`` bands of rows at once (numpy's take and
        arithmetic release the GIL)."""
        n = min(self.decode_threads, len(out))
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

        ``x``: float32 ``(input_size, input_size, C)`` in [0, 1]; padding and invalid
        pixels are 0. ``valid``: bool ``(tile_px, tile_px)`` at scene resolution, True
        where the pixel is inside the scene and not nodata on any model band, not masked
        (internal mask, alpha = 0) and finite.
        """
        x, valid = self.read_batch([tile])
        return x[0], valid[0]

    def read_batch(self, tiles: Sequence[Tile]) -> tuple[np.ndarray, np.ndarray]:
        """``read_tile`` over several tiles, stacked: ``(B, S, S, C)`` and ``(B, T, T)``.

        Neighbouring tiles of one grid row are read with one window and scaled together
        (the same values as tile by tile): one GDAL call per run of tiles instead of one
        per tile, whose fixed cost dominated (benchmarks/README.md)."""
        t, s = self.tile_px, self.input_size
        x = np.zeros((len(tiles), s, s, len(self.bands)), dtype=np.float32)
        valid = np.zeros((len(tiles), t, t), dtype=bool)
        start = 0
        # runs: consecutive columns of one row, at most READ_RUN_PIXELS per window
        max_run = max(1, READ_RUN_PIXELS // (t * t))
        for k in range(1, len(tiles) + 1):
            if (k == len(tiles) or tiles[k].row != tiles[k - 1].row or tiles[k].col != tiles[k - 1].col + 1
                    or k - start >= max_run):
                self._read_run(tiles[start:k], x[start:k], valid[start:k])
                start = k
        return x, valid

    def _read_run(self, tiles: Sequence[Tile], x: np.ndarray, valid: np.ndarray) -> None:
        """Read adjacent tiles of one row with one window into ``x`` and ``valid``."""
        first, last = tiles[0].clipped, tiles[-1].clipped
        c0, r0, h = int(first.col_off), int(first.row_off), int(first.height)
        window = Window(c0, r0, int(last.col_off + last.width) - c0, h)
        try:
            data, v = self._read_raw(window)
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
        if t == s and h == t and window.width == n * t:  # whole tiles side by side: scaled
            # straight into x, seen as (row, tile, column, band), without a strip copy
            self._to_unit_split(data.reshape(len(data), t, n, t), v.reshape(t, n, t), x.transpose(1, 0, 2, 3))
            valid[:] = v.reshape(t, n, t).transpose(1, 0, 2)
            return
        unit = np.empty((h, window.width, len(self.bands)), dtype=np.float32)
        self._to_unit_split(data, v, unit)
        for k, tile in enumerate(tiles):
            a = int(tile.clipped.col_off) - c0
            w = int(tile.clipped.width)
            valid[k, :h, :w] = v[:, a:a + w]
            if t == s:
                x[k, :h, :w] = unit[:, a:a + w]
            else:
                full = np.zeros((t, t, len(self.bands)), dtype=np.float32)
                full[:h, :w] = unit[:, a:a + w]
                interp = cv2.INTER_AREA if t > s else cv2.INTER_LINEAR
                x[k] = cv2.resize(full, (s, s), interpolation=interp).reshape(s, s, -1)

    valid_fraction = staticmethod(valid_fraction)

    def read_overview(self, max_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """A decimated preview of the whole scene: uint8 RGB ``(h, w, 3)`` (long side at
        most ``max_size``; same bands and scaling as the tiles, the first three model
        bands as R, G, B, a single band as grey) and its bool valid mask ``(h, w)``."""
        shape = _decimated_shape(self.info.height, self.info.width, max_size)
        pv = self._preview
        if pv is not None and pv.shape == shape and pv.seen.all():
            self._decimated = (shape, pv.data, pv.valid)
            self._preview = None
        data, valid = self._read_decimated(shape)
        x = np.empty((*shape, len(self.bands)), dtype=np.float32)
        self._to_unit(data, valid, x)
        c = x.shape[2]
        pick = [0, 1, 2] if c >= 3 else ([0, 0, 0] if c == 1 else [0, 1, 1])
        rgb = np.rint(x[:, :, pick] * 255.0).astype(np.uint8)
        return rgb, valid

    # -- georeferencing helpers -----------------------------------------------------

    def tile_transform(self, tile: Tile) -> Affine:
        """Affine transform of the full tile window (= ``rasterio.windows.transform``)."""
        t = self.info.transform
        x0, y0 = _apply(t, tile.window.col_off, tile.window.row_off)
        return Affine(t.a, t.b, x0, t.d, t.e, y0)

    def tile_bounds(self, tile: Tile, clipped: bool = False) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of the tile in the scene CRS."""
        w = tile.clipped if clipped else tile.window
        return tuple(rasterio.windows.bounds(w, self.info.transform))

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


# --------------------------------------------------------------------------------------
# opening a scene


def _check_file(path: Path) -> None:
    p = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError("scene not found (no such file)", path=p) from None
    except OSError as exc:
        raise InputError(f"cannot access scene: {exc.strerror}", path=p) from None
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the file name is not valid UTF-8, which GDAL cannot open: rename the file",
                         path=p.encode("utf-8", "backslashreplace").decode()) from None
    if path.is_dir():
        raise InputError(
            "is a directory, not a GeoTIFF (pass directories as inputs to be searched for "
            "*.tif / *.tiff)", path=p)
    if st.st_size == 0:
        raise InputError("empty file (0 bytes): not a GeoTIFF", path=p)
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except PermissionError:
        raise InputError("cannot read scene: permission denied", path=p) from None
    except OSError as exc:
        raise InputError(f"cannot read scene: {exc.strerror}", path=p) from None
    if head[:4] not in _TIFF_MAGIC:
        what = next((name for magic, name in _OTHER_MAGIC if head.startswith(magic)), None)
        detail = f"it looks like {what}" if what else f"first bytes {head[:4]!r}"
        raise InputError(f"not a TIFF file ({detail}); tilescan reads GeoTIFFs", path=p)


_WORD = re.compile(r"[a-z]+")


def _rgb_from_names(names: Sequence[str | None]) -> list[int] | None:
    """1-based indexes of the red, green and blue bands named in ``names``, if all three."""
    found: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            continue
        words = set(_WORD.findall(name.lower()))
        for colour in ("red", "green", "blue"):
            if colour in words and colour not in found:
                found[colour] = i + 1
    if len(found) == 3 and len(set(found.values())) == 3:
        return [found["red"], found["green"], found["blue"]]
    return None


def _pick_bands(info: SceneInfo, cfg: TilingConfig, model_bands: int,
                model_band_names: Sequence[str] | None) -> list[int]:
    p = str(info.path)
    if cfg.bands:
        given = cfg.origin("bands")  # as the user set it: --bands 4,2,1, the variable, or the file
        if len(cfg.bands) != model_bands:
            raise ConfigError(
                f"{given} lists {len(cfg.bands)} band(s), but the model expects {model_bands}")
        bad = [b for b in cfg.bands if not 1 <= b <= info.count]
        if bad:
            raise InputError(
                f"{given} names band {bad[0]}, but the scene has "
                f"{info.count} band(s) (valid indexes 1..{info.count})", path=p)
        return list(cfg.bands)
    plain = [i for i in range(1, info.count + 1) if i != info.alpha_band]
    if model_bands == 3:
        rgb = _rgb_from_names(info.colorinterp) or _rgb_from_names(info.band_descriptions)
        if rgb is not None:
            return rgb
    if len(plain) == model_bands:
        if model_bands == 3:
            warnings.warn(
                f"{p}: the bands carry no red/green/blue colour interpretation; using bands "
                f"{plain} as red, green, blue (if the order differs, give --bands, e.g. "
                "--bands 3,2,1, or [tiling] bands = [3, 2, 1])", TilingWarning, stacklevel=3)
        return plain
    if len(plain) > model_bands:
        pick = plain[:model_bands]
        warnings.warn(
            f"{p}: scene has {len(plain)} bands and the model takes {model_bands}; using "
            f"bands {pick} (choose others with --bands or [tiling] bands)", TilingWarning, stacklevel=3)
        return pick
    names = model_band_names or _DEFAULT_BAND_NAMES.get(model_bands)
    expected = f"{model_bands} bands" + (f" ({', '.join(names)})" if names else "")
    found = f"{len(plain)}" + (" plus an alpha band" if info.alpha_band else "")
    repeat = [plain[0]] * model_bands if plain else [1] * model_bands
    flag = ",".join(str(b) for b in repeat)
    raise InputError(
        f"model expects {expected}, scene has {found}; map scene bands onto the model's "
        f"with --bands {flag} (or [tiling] bands = {repeat}), which repeats band {repeat[0]}: "
        "list one 1-based scene band per model band, in the model's order", path=p)


@dataclass(frozen=True)
class TilingPlan:
    """How a scene's tiles were sized, and whether that puts the model at its scale.

    ``scale`` is the outcome: ``in_range`` (one model input pixel is inside the model's
    range), ``resampled`` (``units = "auto"`` sized the tiles in ground units at the
    range's fine edge, a finer scene), ``coarser`` / ``finer`` (the input pixel is outside
    the range: the scene is too coarse for any tiling, or a forced tile size put it there),
    ``unknown`` (no ground sample distance), ``unchecked`` (the model declares no range) or
    ``forced`` (``units``/``resample_to_gsd`` chose and there is nothing to check against).
    """

    tile_px: int
    stride_px: int
    units: str
    reason: str
    scale: str
    scene_gsd_m: float | None = None
    input_gsd_m: float | None = None
    tile_footprint_m: float | None = None
    model_input_gsd_m: tuple[float, float] | None = None
    model_input_size: int | None = None

    def warning(self, path: str) -> dict | None:
        """A structured warning when the labels are outside the model's scale, else None."""
        lo_hi = self.model_input_gsd_m
        if lo_hi is None:
            return None
        lo, hi = lo_hi
        size = self.model_input_size or 0
        model_tiles = f"{_metres(lo * size)}–{_metres(hi * size)} tiles"
        if self.scene_gsd_m is None:
            msg = (f"{path}: the scene's ground sample distance is unknown (no usable "
                   f"georeferencing), so tilescan cannot check it against the model's scale "
                   f"({lo:.3g}–{hi:.3g} m per input pixel, {model_tiles}); labels are only "
                   "meaningful if its tiles cover about that much ground")
            code = "scale_unknown"
        elif self.input_gsd_m is not None and not lo * (1 - 1e-6) <= self.input_gsd_m <= hi * (1 + 1e-6):
            side = "coarser" if self.input_gsd_m > hi else "finer"
            msg = (f"{path}: scene at {self.scene_gsd_m:.3g} m per pixel; its {self.tile_px}-px tiles "
                   f"cover {_metres(self.tile_footprint_m)} at {self.input_gsd_m:.3g} m per model input "
                   f"pixel, {side} than the model's range ({lo:.3g}–{hi:.3g} m per input pixel, "
                   f"{model_tiles}): its labels are not meaningful at this scale")
            code = "scale_out_of_range"
        else:
            return None
        return {"code": code, "message": msg, "scene_gsd_m": self.scene_gsd_m,
                "tile_px": self.tile_px, "input_gsd_m": self.input_gsd_m,
                "tile_footprint_m": self.tile_footprint_m, "model_input_gsd_m": list(lo_hi),
                "model_tile_footprint_m": [lo * size, hi * size]}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_input_gsd_m"] = list(self.model_input_gsd_m) if self.model_input_gsd_m else None
        return d


def _metres(m: float | None) -> str:
    if m is None:
        return "unknown ground"
    return f"{m / 1000:.3g} km" if m >= 1000 else f"{m:.3g} m"


def _tile_geometry(info: SceneInfo, cfg: TilingConfig, input_size: int,
                   model_gsd_m: float | None,
                   model_scale: tuple[float, float] | None = None) -> TilingPlan:
    """Tile and stride in scene pixels, and why (see ``[tiling] units`` in configs/default.toml).

    ``units = "auto"`` keeps tiles in scene pixels where the model input pixel they give
    (scene GSD x tile / input size) lies inside the model's range ``model_scale`` (metres
    per input pixel); on a finer scene the tile grows until it reaches the range's fine
    edge (and is resampled to the input size); a scene whose own pixels are coarser than
    the range cannot be helped and keeps its pixel tiles (the plan's warning says so).
    """
    p = str(info.path)
    size, stride = cfg.tile_size, cfg.stride or cfg.tile_size
    if stride > size:
        raise ConfigError(f"{cfg.origin('stride')} is larger than {cfg.origin('tile_size')}: "
                          "the pixels between tiles would never be classified")
    gsd = info.gsd_m
    units, scale = "px", "forced"
    if cfg.resample_to_gsd and model_gsd_m is None:
        warnings.warn(f"{p}: [tiling] resample_to_gsd is set but the model declares no native "
                      "GSD; tiles are not resampled", TilingWarning, stacklevel=3)
    if cfg.resample_to_gsd and model_gsd_m is not None:
        if gsd is None:
            raise InputError("[tiling] resample_to_gsd needs a georeferenced scene with a "
                             "known ground sample distance; this one has none", path=p)
        tile_px = round(input_size * model_gsd_m / gsd)
        stride_px = round(tile_px * stride / size)
        how = (f"(model GSD {model_gsd_m:g} m x {input_size} px, scene GSD {gsd:.4g} m; "
               "turn off [tiling] resample_to_gsd)")
        units, reason = "m", f"resample_to_gsd: tiles of {input_size} model pixels at {model_gsd_m:g} m"
    elif cfg.units == "m":
        if gsd is None:
            raise InputError('[tiling] units = "m" needs a georeferenced scene with a known '
                             'ground sample distance; use units = "px"', path=p)
        tile_px, stride_px = round(size / gsd), round(stride / gsd)
        how = f"({size} m at {gsd:.4g} m/px)"
        units, reason = "m", f'units = "m": tiles of {size} m'
    else:
        tile_px, stride_px, how = size, stride, ""
        reason = f'units = "px": tiles of {size} scene pixels'
        if cfg.units == "auto":
            if model_scale is None:
                scale, reason = "unchecked", f"tiles of {size} scene pixels (the model declares no ground-scale range)"
            elif gsd is None:
                scale, reason = "unknown", f"tiles of {size} scene pixels (the scene's ground sample distance is unknown)"
            else:
                lo, hi = model_scale
                if gsd < lo:  # finer than the model: tiles of `size` pixels at its finest scale
                    tile_px = math.ceil(size * lo / gsd - 1e-9)  # up: the input pixel stays >= lo
                    stride_px = round(tile_px * stride / size)
                    units = "m"
                    reason = (f"scene at {gsd:.3g} m/px is finer than the model's range "
                              f"({lo:.3g}–{hi:.3g} m per input pixel): tiles of {_metres(tile_px * gsd)} "
                              f"({tile_px} px) resampled to {input_size} px")
                    how = f"(the model's finest scale {lo:.3g} m per input pixel at {gsd:.4g} m/px; use --units px)"
                elif gsd > hi:
                    reason = (f"scene at {gsd:.3g} m/px is coarser than the model's range "
                              f"({lo:.3g}–{hi:.3g} m per input pixel): no tiling reaches it; "
                              f"tiles of {size} scene pixels")
                else:
                    reason = (f"tiles of {size} scene pixels: the scene's {gsd:.3g} m/px is inside the "
                              f"model's range ({lo:.3g}–{hi:.3g} m per input pixel)")
                scale = "auto"
    if tile_px < 1:
        raise InputError(f"tiles would be smaller than one pixel {how}", path=p)
    if tile_px > MAX_TILE_PX:
        raise InputError(f"tiles would be {tile_px} px wide, above the {MAX_TILE_PX} px limit "
                         f"{how}", path=p)
    stride_px = min(max(1, stride_px), tile_px)
    input_gsd = gsd * tile_px / input_size if gsd is not None else None
    if scale in ("auto", "forced") and model_scale is not None and input_gsd is not None:
        lo, hi = model_scale
        scale = ("coarser" if input_gsd > hi * (1 + 1e-6) else "finer" if input_gsd < lo * (1 - 1e-6)
                 else "resampled" if units == "m" and cfg.units == "auto" else "in_range")
    elif scale == "auto":
        scale = "unchecked"
    return TilingPlan(tile_px, stride_px, units, reason, scale, gsd, input_gsd,
                      None if gsd is None else gsd * tile_px, model_scale, input_size)


#: Share of sampled pixels that may hold the nodata value in some model bands but not in all
#: before a scene is warned about (a real nodata border has it in every band at once).
NODATA_COLLISION_FRACTION = 0.01


def _warn_nodata_collision(reader: SceneReader, data: np.ndarray) -> None:
    """Warn when the nodata value looks like a valid pixel value too.

    A pixel counts as nodata when *any* model band holds the nodata value. Fill areas have
    it in every band at once; when many pixels have it in some bands only, the value also
    occurs in real data (e.g. 0 in dark water, or lossy compression around a border), and
    those pixels are being dropped.
    """
    eq = [data[i] == nd for i, nd in enumerate(reader._nodata)
          if nd is not None and not (isinstance(nd, float) and math.isnan(nd))]
    distinct = {b for b, nd in zip(reader.bands, reader._nodata) if nd is not None}
    if len(eq) < 2 or len(distinct) < 2 or data[0].size == 0:
        return
    eq = np.stack(eq)
    partial = float(np.count_nonzero(eq.any(axis=0) & ~eq.all(axis=0))) / data[0].size
    if partial > NODATA_COLLISION_FRACTION:
        values = sorted({nd for nd in reader._nodata if nd is not None})
        warnings.warn(
            f"{reader.info.path}: nodata value {values[0] if len(values) == 1 else values} "
            f"also occurs in valid data: {partial:.1%} of sampled pixels have it in some bands "
            "but not all; those pixels are treated as nodata (fix the file's nodata, e.g. "
            "gdal_edit.py -unsetnodata or -a_nodata)", TilingWarning, stacklevel=4)


def _compute_scale(reader: SceneReader, cfg: TilingConfig) -> list[tuple[float, float]]:
    """Per model band ``(lo, hi)`` from a sample of the scene: the decimated read, or on a
    large scene without overviews whole blocks spread over it (``STATS_SAMPLE_PIXELS``).

    Also serves as the up-front corrupt/truncated check: both samples touch blocks across
    the whole scene, the last one included. (A damaged block elsewhere fails when its tile
    is read, naming the tile; the job's staging keeps nothing of that scene.)
    """
    dtype = np.dtype(reader.info.dtype)
    mode = cfg.scaling
    if mode == "auto":
        mode = "dtype" if dtype == np.uint8 else "percentile"
    n = len(reader.bands)
    H, W = reader.info.height, reader.info.width
    shape = _decimated_shape(H, W, STATS_MAX_SIZE)
    cov = reader.coverage
    try:
        sample = None
        if cov is not None and cov.all_empty:  # nothing to read
            sample = np.zeros((n, 0), dtype), np.zeros(0, bool)
        elif H * W > STATS_SAMPLE_PIXELS and cov is not None and cov.n_empty:
            # a large scene with empty areas: blocks where the data is (all of them when
            # they fit), so a sparse scene gets the statistics of its data alone
            sample = reader._read_block_sample(STATS_SAMPLE_PIXELS, where_data=True)
        if sample is None and H * W > STATS_SAMPLE_PIXELS and reader._plain_layout(reader._ds()):
            # a large scene: blocks spread over it; decoding all would cost seconds
            sample = reader._read_block_sample(STATS_SAMPLE_PIXELS)
        if sample is None:
            # the decimated read (GDAL uses the overviews when there are any); it decodes
            # blocks all over the scene, and the job's quicklook reuses it
            sample = reader._read_decimated(shape)
        data, valid = sample
    except Exception as exc:
        raise InputError(f"corrupt or truncated TIFF: {_describe(exc)}",
                         path=str(reader.info.path)) from exc
    if cov is not None and cov.all_empty:
        warnings.warn(f"{reader.info.path}: no valid pixel found: all {cov.n_blocks} blocks of the "
                      "scene are empty (not stored, or nodata / masked; all nodata?)", TilingWarning, stacklevel=3)
    elif not valid.any():
        warnings.warn(f"{reader.info.path}: no valid pixel found in a sample of {valid.size} pixels "
                      "spread over the scene (all nodata?)", TilingWarning, stacklevel=3)
    _warn_nodata_collision(reader, data)
    if mode == "none":
        return [(0.0, 1.0)] * n
    if mode == "dtype":
        if np.issubdtype(dtype, np.integer):
            return [(0.0, float(np.iinfo(dtype).max))] * n
        return [(0.0, 1.0)] * n
    lo_q, hi_q = cfg.percentiles
    out = []
    for i in range(n):
        vals = data[i][valid]
        if vals.size == 0:
            lo, hi = (0.0, float(np.iinfo(dtype).max)) if np.issubdtype(dtype, np.integer) else (0.0, 1.0)
        else:
            lo, hi = (float(v) for v in np.percentile(vals, [lo_q, hi_q]))
        if not hi > lo:
            hi = lo + 1.0
        out.append((lo, hi))
    return out


def open_scene(path: str | os.PathLike, cfg: TilingConfig, model_bands: int, input_size: int,
               model_gsd_m: float | None = None,
               model_band_names: Sequence[str] | None = None,
               model_scale: Sequence[float] | None = None) -> SceneReader:
    """Check a GeoTIFF and return a :class:`SceneReader` for it.

    Raises :class:`InputError` (naming the file) when the scene is missing, a directory,
    empty, not a TIFF, corrupt or truncated, not georeferenced (unless
    ``cfg.allow_pixel_space``), has too few bands for the model, or ``cfg.bands`` names a
    band it lacks; :class:`ConfigError` when ``cfg.bands`` has the wrong length or the
    stride exceeds the tile size.

    Band pick (1-based, model order): ``cfg.bands``; else, for a 3-band model, the bands
    whose colour interpretation (or description) says red, green, blue; else all non-alpha
    bands when there are exactly ``model_bands``; else the first ``model_bands`` non-alpha
    bands (with a :class:`TilingWarning`).

    Tile size in scene pixels: ``cfg.tile_size`` (``units = "px"``), or converted from
    metres with the scene GSD (``units = "m"``); with ``cfg.resample_to_gsd`` and a model
    GSD, ``round(input_size * model_gsd_m / scene_gsd_m)`` (the stride keeps its ratio to
    the tile size); with ``units = "auto"`` (the default) from the model's ground-scale
    range ``model_scale`` (metres per input pixel, see :func:`_tile_geometry`). Tiles are
    resized to ``input_size`` when the sizes differ. ``reader.plan`` says what was chosen
    and why (:class:`TilingPlan`).
    """
    if model_bands < 1 or input_size < 1:
        raise ValueError(f"model_bands and input_size must be >= 1, got {model_bands}, {input_size}")
    if model_gsd_m is not None and not model_gsd_m > 0:
        raise ValueError(f"model_gsd_m must be > 0, got {model_gsd_m}")
    if model_scale is not None and not 0 < model_scale[0] <= model_scale[1]:
        raise ValueError(f"model_scale must be (lo, hi) with 0 < lo <= hi, got {model_scale}")
    remote = getattr(path, "remote", False)  # a URL or STAC item: tilescan.sources
    path = path if remote else Path(path)
    p = str(path)
    if remote:
        ds = path.open()  # InputError naming the URL (without credentials) and the cause
    else:
        _check_file(path)
        try:
            ds = _open_quiet(path)
        except Exception as exc:
            raise InputError(f"corrupt or truncated TIFF (GDAL cannot open it): {_describe(exc)}",
                             path=p) from exc
    reader = None
    try:
        if ds.width < 1 or ds.height < 1:
            raise InputError(f"scene has no pixels ({ds.width}x{ds.height})", path=p)
        if ds.count < 1:
            raise InputError("scene has no bands", path=p)
        if np.dtype(ds.dtypes[0]).kind not in "uif":
            raise InputError(f"unsupported pixel type {ds.dtypes[0]} (tilescan reads integer "
                             "and floating-point rasters)", path=p)
        info = _scene_info(path, ds)
        if not info.georeferenced:
            if ds.crs is None and ds.transform.is_identity:
                what = "has no CRS and no geotransform"
            elif ds.crs is None:
                what = "has no CRS"
            else:
                what = "has no geotransform"
            if ds.gcps[0]:
                what += " (it has ground control points: warp it first, e.g. with gdalwarp)"
            if not cfg.allow_pixel_space:
                raise InputError(
                    f"scene {what}; pass --allow-pixel-space (allow_pixel_space = true in "
                    "[tiling]) to process it anyway (outputs will not be georeferenced)", path=p)
            where = ("in pixel coordinates (x = column, y = row)" if ds.transform.is_identity
                     else "in the units of its geotransform")
            warnings.warn(f"{p}: scene {what}; processing it {where}, outputs carry no CRS "
                          "(allow_pixel_space = true)", TilingWarning, stacklevel=2)
        bands = _pick_bands(info, cfg, model_bands, model_band_names)
        plan = _tile_geometry(info, cfg, input_size, model_gsd_m,
                              None if model_scale is None else (float(model_scale[0]), float(model_scale[1])))
        grid = TileGrid(info.width, info.height, plan.tile_px, plan.stride_px)
        reader = SceneReader(info, ds, bands, grid, input_size)
        reader.plan = plan
        reader.scan_coverage()  # before any decode: where the data is
        t0 = time.monotonic()
        reader.scale = tuple(_compute_scale(reader, cfg))
        reader.timings["stats"] = time.monotonic() - t0
        reader._set_scale(reader.scale)
        return reader
    except BaseException:
        if reader is not None:
            reader.close()
        else:
            ds.close()
        raise


# --------------------------------------------------------------------------------------
# finding scenes


def find_scenes(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Scene paths from files and directories.

    Files are taken as given, whatever their extension (:func:`open_scene` rejects
    non-TIFFs with a clear error); directories are searched recursively for ``*.tif`` /
    ``*.tiff`` (any case). The result is absolute, sorted and free of duplicates.
    Raises :class:`InputError` for a path that does not exist and
    :class:`NoScenesError` when nothing is found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[Path, None] = {}
    searched: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            searched.append(str(p))
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in files:
                    if name.lower().endswith(TIFF_SUFFIXES):
                        f = Path(root, name)
                        if f.is_file():
                            found[f.resolve()] = None
        elif p.exists():
            found[p.resolve()] = None
        else:
            raise InputError("no such file or directory", path=str(p))
    if not found:
        if searched:
            raise NoScenesError("no *.tif / *.tiff scenes found in " + ", ".join(searched))
        raise NoScenesError("no scenes given")
    return sorted(found)
