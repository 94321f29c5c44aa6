"""Writers for everything a run leaves behind: the tile table, label and heatmap rasters,
the quicklook picture and JSON manifests.

Every file is written through :func:`atomic_output`: the data goes to a hidden temporary
file in the destination folder and is renamed over the final name only once it is complete
and flushed to disk, so a killed or failed run never leaves a file that looks finished.
Operating-system write failures (full disk, file too large, permission denied, a parent that
is not a folder...) are re-raised as :class:`~tilescan.errors.OutputError` naming the file.

Outputs (see the "Output contract" in the design notes):

* :class:`TileTable` collects one row per tile in compact numpy columns and writes
  **GeoParquet 1.1** (WKB polygons built here with numpy, a ``bbox`` covering column,
  PROJJSON CRS, zstd) and, for GIS installs without Arrow, a **GeoPackage** (via pyogrio).
* :func:`write_labels_cog` writes the per-tile class grid as a Cloud-Optimized GeoTIFF with a
  colour table, nodata 255 and class names (tags, plus a ``.aux.xml`` with GDAL category
  names and a raster attribute table, which QGIS and GDAL pick up without styling).
* :class:`HeatmapWriter` blends overlapping per-tile CAMs into a scene heatmap COG in row
  strips, holding only about one tile row of the heatmap in memory.
* :func:`write_quicklook` draws scene | labels | heatmap side by side as a PNG.

No Keras, TensorFlow, geopandas or shapely here: this module stays fast to import.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import errno
import functools
import io
import json
import math
import os
import re
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.transform import Affine
from rasterio.windows import Window

from .errors import InputError, OutputError

__all__ = [
    "HEATMAP_NODATA",
    "LABEL_BLEND",
    "LABEL_NODATA",
    "HeatmapWriter",
    "QuicklookLayout",
    "TileTable",
    "atomic_output",
    "class_colors",
    "quicklook_layout",
    "read_heatmap_preview",
    "wkb_polygons",
    "write_json",
    "write_labels_cog",
    "write_quicklook",
]

LABEL_NODATA = 255
"""Value of skipped tiles in the label raster (uint8)."""

HEATMAP_NODATA = -1.0
"""Value of heatmap pixels no valid tile pixel covers. Heat itself is in 0..1, so -1 can
never be a real value; it is used instead of NaN because several tools (older QGIS
styling, some web tilers, overview builders) handle a finite nodata more reliably."""

_COMPRESSIONS = ("deflate", "zstd", "lzw", "lzma", "packbits", "raw")
_PREDICTOR_OK = ("deflate", "zstd", "lzw", "lzma")


def _compression(compress: str) -> str:
    """``[output] compress`` as rio-cogeo names it ("none" -> "raw"); ValueError if unknown."""
    compress = "raw" if compress.lower() == "none" else compress.lower()
    if compress not in _COMPRESSIONS:
        raise ValueError(f"unsupported compression {compress!r}; choose one of {', '.join(_COMPRESSIONS)}")
    return compress


# --------------------------------------------------------------------------- atomic files


def _io_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the write failed" rather than "the caller has a bug"."""
    types: list[type[BaseException]] = [OSError]  # includes RasterioIOError, ArrowIOError
    try:  # GDAL errors raised by rasterio while writing blocks (private module, so guarded)
        from rasterio import _err

        types += [_err.CPLE_FileIOError, _err.CPLE_OpenFailedError, _err.CPLE_NoWriteAccessError,
                  # libtiff's write errors (a full disk, a file-size limit) arrive as
                  # "AppDefined", and a failed GDAL copy without a message as SystemError
                  _err.CPLE_AppDefinedError, SystemError]
    except (ImportError, AttributeError):  # pragma: no cover - depends on rasterio build
        pass
    try:
        from pyogrio import errors as _pe

        types += [_pe.DataSourceError, _pe.DataLayerError]
    except ImportError:  # pragma: no cover - pyogrio is optional
        pass
    return tuple(types)


def _space_hint(folder: Path | None) -> str:
    """"; disk full: ..." / "; file-size limit ..." when the likely cause of a failed write is
    a full file system or the process's ``ulimit -f`` (GDAL's own messages rarely say)."""
    hints = []
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            hints.append(f"the process file-size limit (ulimit -f) is {soft} bytes")
    except (ImportError, OSError, ValueError):  # pragma: no cover - not on every platform
        pass
    if folder is not None:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(folder).free
            if free < 64 * 2**20:
                hints.append(f"disk full? only {free / 2**20:.1f} MiB free in {folder}")
    return "; " + "; ".join(hints) if hints else ""


def _describe(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """"cannot write (<reason>)", then a hint about space or limits for write failures."""
    folder = Path(path).parent if path is not None else None
    if isinstance(exc, OSError) and exc.strerror:
        hint = _space_hint(folder) if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        return f"cannot write ({exc.strerror}){hint}"
    text = str(exc).strip() or type(exc).__name__
    return f"cannot write ({text}){_space_hint(folder)}"


def _temp_name(path: Path, tag: str = "tmp") -> Path:
    # Hidden, unique, in the same folder (so os.replace is a rename on one file system);
    # the final suffix is kept at the end so drivers that look at the extension still
    # recognise the format (GDAL's GPKG driver warns on any other extension).
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


_SIDECARS = ("", ".aux.xml", "-journal", "-wal", "-shm", ".ovr")


def _remove_quietly(path: Path) -> None:
    for extra in _SIDECARS:
        with contextlib.suppress(OSError):
            os.remove(str(path) + extra)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not possible everywhere (e.g. Windows): best effort
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary file is ``.{name}.tmp-<pid>-<random>{suffix}`` in the same folder. When the
    ``with`` body finishes, the file is fsync'ed and ``os.replace``d over ``path`` (and the
    folder is fsync'ed). When the body raises, the temporary file (and any GDAL/SQLite
    sidecar of it) is removed and nothing appears at ``path``.

    Write failures -- :class:`OSError` (ENOSPC, EFBIG, EACCES, ENOTDIR...) and GDAL/pyogrio
    file errors -- become :class:`OutputError` naming ``path``. The folder is probed before
    the body runs, so an unwritable destination fails fast, before any work is done.
    """
    final = Path(path)
    tmp = _temp_name(final)
    io_errors = _io_error_types()
    try:
        # Probe: reserve the name, proving the folder exists and is writable.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(fd)
        os.remove(tmp)
    except OSError as exc:
        raise OutputError(_describe(exc, final), path=str(final)) from exc
    try:
        yield tmp
        if not tmp.exists():
            raise OutputError("cannot write (the writer produced no file)", path=str(final))
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, final)
        if fsync:
            _fsync_dir(final.parent)
    except OutputError:
        _remove_quietly(tmp)
        raise
    except io_errors as exc:
        _remove_quietly(tmp)
        raise OutputError(_describe(exc, final), path=str(final)) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    finally:
        # GDAL may leave a PAM sidecar for the temporary name; it never belongs to the output.
        with contextlib.suppress(OSError):
            os.remove(str(tmp) + ".aux.xml")


# --------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths, dates, sets and dataclasses to JSON types;
    non-finite floats become ``null`` so the output is strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_jsonable(v) for v in obj), key=repr)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "to_wkt") and hasattr(obj, "to_string"):  # a rasterio or pyproj CRS
        return obj.to_string()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON: {obj!r}")


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (its folder is created if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8, atomically."""
    return write_bytes(path, text.encode("utf-8"))


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """CSV (``\n`` line ends) of ``rows``, the first being the header."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (numpy values converted), atomically."""
    text = _dumps(obj, indent=2) + "\n"  # convert first: a TypeError leaves no file at all
    with atomic_output(path) as tmp:
        # a file name that is not valid UTF-8 arrives as lone surrogates: written as JSON \u escapes
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(text)
    return Path(path)


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


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB colours ``(..., 3)``."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@functools.lru_cache(maxsize=8)
def _extend_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """:data:`_PALETTE` continued to ``n`` colours by the same farthest-first rule (for
    models with more than 30 classes)."""
    g = np.arange(0, 256, _PALETTE_GRID)
    cand = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = _srgb_to_lab(cand)
    keep = ((lab[:, 0] >= _PALETTE_L[0]) & (lab[:, 0] <= _PALETTE_L[1])
            & (np.hypot(lab[:, 1], lab[:, 2]) >= _PALETTE_MIN_CHROMA))
    cand, lab = cand[keep], lab[keep]
    out = list(_PALETTE)
    dist = np.min(np.linalg.norm(lab[:, None] - _srgb_to_lab(np.array(out))[None], axis=-1), axis=1)
    while len(out) < n:
        i = int(np.argmax(dist))
        out.append(tuple(int(v) for v in cand[i]))
        dist = np.minimum(dist, np.linalg.norm(lab - lab[i], axis=1))
    return tuple(out)


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


# --------------------------------------------------------------------------- CRS helpers


def pyproj_crs(crs: Any):
    """A pyproj CRS for a rasterio CRS / pyproj CRS / user string, or None."""
    if crs is None:
        return None
    import pyproj

    if isinstance(crs, pyproj.CRS):
        return crs
    if hasattr(crs, "to_wkt"):
        try:  # WKT2 keeps the axis order and identifiers; older rasterio lacks `version`
            wkt = crs.to_wkt(version="WKT2_2019")
        except TypeError:
            wkt = crs.to_wkt()
        if not wkt:
            return None
        return pyproj.CRS.from_user_input(wkt)
    return pyproj.CRS.from_user_input(crs)


def _rasterio_crs(crs: Any):
    if crs is None:
        return None
    from rasterio.crs import CRS as RioCRS

    if isinstance(crs, RioCRS):
        return crs if crs.to_wkt() else None
    pj = pyproj_crs(crs)
    return None if pj is None else RioCRS.from_wkt(pj.to_wkt())


# --------------------------------------------------------------------------- WKB


WKB_HEADER = struct.pack("<BIII", 1, 3, 1, 5)  # little-endian, Polygon, 1 ring, 5 points
WKB_POLY_SIZE = len(WKB_HEADER) + 5 * 2 * 8  # 93 bytes


def _ccw_rings(corners: np.ndarray) -> np.ndarray:
    """Closed 5-point rings (N,5,2) from (N,4,2) corners, exterior counter-clockwise."""
    c = np.asarray(corners, dtype=np.float64)
    x, y = c[..., 0], c[..., 1]
    twice_area = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
    flip = twice_area < 0
    c = c.copy()
    c[flip] = c[flip][:, ::-1]  # reversed ring, same polygon
    return np.concatenate([c, c[:, :1]], axis=1)


def wkb_polygons(corners: np.ndarray) -> pa.BinaryArray:
    """Little-endian WKB Polygons (one closed ring of 5 points) for (N,4,2) corners.

    Built in one vectorised step: a fixed 13-byte header plus the 10 coordinates of each
    ring. Rings are made counter-clockwise (the orientation GeoParquet can declare).
    """
    c = np.asarray(corners, dtype=np.float64)
    if c.ndim != 3 or c.shape[1:] != (4, 2):
        raise ValueError(f"corners must have shape (N, 4, 2), got {c.shape}")
    n = c.shape[0]
    rings = np.ascontiguousarray(_ccw_rings(c), dtype="<f8").reshape(n, 10)
    buf = np.empty((n, WKB_POLY_SIZE), dtype=np.uint8)
    buf[:, : len(WKB_HEADER)] = np.frombuffer(WKB_HEADER, dtype=np.uint8)
    buf[:, len(WKB_HEADER):] = rings.view(np.uint8).reshape(n, 80)
    offsets = np.arange(0, (n + 1) * WKB_POLY_SIZE, WKB_POLY_SIZE, dtype=np.int32)
    return pa.BinaryArray.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(buf.reshape(-1))]
    )


# --------------------------------------------------------------------------- tile table

# name -> (numpy dtype, arrow type, default or None when required)
_SCALARS: dict[str, tuple[Any, Any, Any]] = {
    "tile_index": (np.int64, pa.int64(), None),
    "row": (np.int32, pa.int32(), None),
    "col": (np.int32, pa.int32(), None),
    "col_off": (np.int32, pa.int32(), None),
    "row_off": (np.int32, pa.int32(), None),
    "width": (np.int32, pa.int32(), None),
    "height": (np.int32, pa.int32(), None),
    "valid_fraction": (np.float32, pa.float32(), 1.0),
    "class_index": (np.int16, pa.int16(), None),
    "confidence": (np.float32, pa.float32(), None),
    "cam_mean": (np.float32, pa.float32(), np.nan),
    "cam_max": (np.float32, pa.float32(), np.nan),
    "cam_raw_max": (np.float32, pa.float32(), np.nan),
    "cam_peak_x": (np.float64, pa.float64(), np.nan),
    "cam_peak_y": (np.float64, pa.float64(), np.nan),
}
_CORNER_KEYS = ("x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3")
_ACCEPTED = set(_SCALARS) | {"corners", "probabilities", "label", *_CORNER_KEYS}
# output column order
_ORDER_HEAD = ("scene", "tile_index", "row", "col", "col_off", "row_off", "width", "height",
               "valid_fraction", "label", "class_index", "confidence")
_ORDER_CAM = ("cam_mean", "cam_max", "cam_raw_max", "cam_peak_x", "cam_peak_y")
BBOX_TYPE = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()),
                        ("xmax", pa.float64()), ("ymax", pa.float64())])
_ROW_GROUP = 65536



def wkb_polygon_rings(geom) -> np.ndarray:
    """(N, 5, 2) coordinates back from :func:`wkb_polygons`' fixed layout (a pyarrow array)."""
    geom = geom.cast(pa.binary())
    n = len(geom)
    if n == 0:
        return np.zeros((0, 5, 2))
    offsets = np.frombuffer(geom.buffers()[1], np.int32)[geom.offset: geom.offset + n + 1]
    if geom.null_count or not np.all(np.diff(offsets) == WKB_POLY_SIZE):
        raise InputError("unexpected geometry encoding (not tilescan's 5-point Polygon WKB)")
    data = np.frombuffer(geom.buffers()[2], np.uint8)[offsets[0]: offsets[-1]].reshape(n, WKB_POLY_SIZE)
    head = len(WKB_HEADER)
    if not np.all(data[:, :head] == np.frombuffer(WKB_HEADER, np.uint8)):
        raise InputError("unexpected geometry encoding (not little-endian single-ring Polygon WKB)")
    return np.ascontiguousarray(data[:, head:]).view("<f8").reshape(n, 5, 2)



class TileTable:
    """Per-tile results, accumulated batch by batch in compact numpy columns.

    ``add(batch)`` takes a dict of equal-length arrays (one entry per tile):

    * required: ``tile_index`` (int64), ``row``, ``col``, ``col_off``, ``row_off``,
      ``width``, ``height`` (int32: the full tile window in scene pixels), ``class_index``
      (int16), ``confidence`` (float32), ``probabilities`` (B,K float32), and the footprint,
      either ``corners`` (B,4,2: UL, UR, LR, LL in scene CRS, may be rotated) or
      ``x0, y0, ..., x3, y3`` in that order;
    * optional: ``label`` (str; else ``classes[class_index]`` at write time),
      ``valid_fraction`` (default 1), ``cam_mean``, ``cam_max``, ``cam_raw_max`` (float32),
      ``cam_peak_x``, ``cam_peak_y`` (float64 map coords of the heat peak) -- NaN if absent.

    Rows are written sorted by ``tile_index`` (so a resumed run writes the same file).
    Memory is about ``150 + 4 K`` bytes per tile.
    """

    def __init__(self, classes: Sequence[str] | None = None):
        self.classes = None if classes is None else [str(c) for c in classes]
        self._chunks: dict[str, list[np.ndarray]] = {k: [] for k in (*_SCALARS, "corners", "probabilities", "label_code")}
        self._label_names: list[str] = []
        self._label_lookup: dict[str, int] = {}
        self._n = 0
        self._k: int | None = None if classes is None else len(self.classes)

    def __len__(self) -> int:
        return self._n

    @property
    def n_classes(self) -> int | None:
        return self._k

    # -- accumulate

    def add(self, batch: Mapping[str, Any]) -> None:
        unknown = set(batch) - _ACCEPTED
        if unknown:
            raise ValueError(f"TileTable.add: unknown columns {sorted(unknown)}; accepted: {sorted(_ACCEPTED)}")
        if "corners" in batch:
            corners = np.asarray(batch["corners"], dtype=np.float64)
        elif all(k in batch for k in _CORNER_KEYS):
            corners = np.stack([np.asarray(batch[k], dtype=np.float64) for k in _CORNER_KEYS], axis=-1)
            corners = corners.reshape(-1, 4, 2)
        else:
            raise ValueError("TileTable.add: give the footprint as 'corners' (B,4,2) or x0..y3")
        if corners.ndim != 3 or corners.shape[1:] != (4, 2):
            raise ValueError(f"TileTable.add: corners must be (B, 4, 2), got {corners.shape}")
        b = corners.shape[0]

        cols: dict[str, np.ndarray] = {}
        for name, (dtype, _, default) in _SCALARS.items():
            if name in batch:
                arr = np.asarray(batch[name])
                if arr.shape != (b,):
                    raise ValueError(f"TileTable.add: {name!r} has shape {arr.shape}, expected ({b},)")
                if np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(arr.dtype, np.integer):
                    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
                        raise ValueError(f"TileTable.add: {name!r} must hold integers")
                cols[name] = arr.astype(dtype, copy=True)
            elif default is None:
                raise ValueError(f"TileTable.add: missing required column {name!r}")
            else:
                cols[name] = np.full(b, default, dtype=dtype)

        probs = np.asarray(batch.get("probabilities"), dtype=np.float32) if "probabilities" in batch else None
        if probs is None:
            raise ValueError("TileTable.add: missing required column 'probabilities'")
        if probs.ndim != 2 or probs.shape[0] != b:
            raise ValueError(f"TileTable.add: probabilities must be (B, K) with B={b}, got {probs.shape}")
        if self._k is None:
            self._k = probs.shape[1]
        elif probs.shape[1] != self._k:
            raise ValueError(f"TileTable.add: probabilities have {probs.shape[1]} classes, expected {self._k}")

        if "label" in batch:
            labels = np.asarray(batch["label"]).astype(str)
            if labels.shape != (b,):
                raise ValueError(f"TileTable.add: 'label' has shape {labels.shape}, expected ({b},)")
            uniq, inverse = np.unique(labels, return_inverse=True)
            remap = np.array([self._label_code(str(u)) for u in uniq], dtype=np.int32)
            codes = remap[inverse.reshape(-1)] if b else np.zeros(0, np.int32)
        else:
            codes = np.full(b, -1, dtype=np.int32)

        for name, arr in cols.items():
            self._chunks[name].append(arr)
        self._chunks["corners"].append(corners.copy())
        self._chunks["probabilities"].append(probs.copy())
        self._chunks["label_code"].append(codes)
        self._n += b

    def _label_code(self, name: str) -> int:
        code = self._label_lookup.get(name)
        if code is None:
            code = self._label_lookup[name] = len(self._label_names)
            self._label_names.append(name)
        return code

    def _columns(self, k: int) -> dict[str, np.ndarray]:
        """Concatenate the chunks (kept concatenated afterwards) and sort by tile_index."""
        out = {}
        for name, chunks in self._chunks.items():
            if len(chunks) != 1:
                if chunks:
                    merged = np.concatenate(chunks)
                elif name == "corners":
                    merged = np.zeros((0, 4, 2), np.float64)
                elif name == "probabilities":
                    merged = np.zeros((0, k), np.float32)
                elif name == "label_code":
                    merged = np.zeros(0, np.int32)
                else:
                    merged = np.zeros(0, _SCALARS[name][0])
                self._chunks[name] = [merged]
            out[name] = self._chunks[name][0]
        order = np.argsort(out["tile_index"], kind="stable")
        if not np.all(order == np.arange(order.size)):
            out = {name: arr[order] for name, arr in out.items()}
        return out

    def _prepared(self, classes: Sequence[str]) -> tuple[list[str], dict[str, np.ndarray], np.ndarray, list[str]]:
        """Class names checked against the probabilities, the columns, and the label codes
        and names: what both table writers start from."""
        classes = [str(c) for c in classes]
        k = self._k if self._k is not None else len(classes)
        if k != len(classes):
            raise ValueError(f"TileTable: probabilities have {k} classes but {len(classes)} class names were given")
        cols = self._columns(k)
        codes, label_names = self._labels_for(cols, classes)
        return classes, cols, codes, label_names

    def _labels_for(self, cols: dict[str, np.ndarray], classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Dictionary codes and dictionary for the label column (filling missing labels
        from ``classes[class_index]``)."""
        codes = cols["label_code"].copy()
        names = list(self._label_names)
        missing = codes < 0
        if missing.any():
            ci = cols["class_index"][missing].astype(np.int64)
            if ci.size and (ci.min() < 0 or ci.max() >= len(classes)):
                raise ValueError("TileTable: class_index outside the class list; pass 'label' explicitly")
            lookup = dict(zip(names, range(len(names))))
            class_codes = np.empty(len(classes), np.int32)
            for i, c in enumerate(classes):
                if c not in lookup:
                    lookup[c] = len(names)
                    names.append(c)
                class_codes[i] = lookup[c]
            codes[missing] = class_codes[ci]
        return codes, names

    # -- GeoParquet

    def write_geoparquet(self, path: str | os.PathLike, crs: Any, classes: Sequence[str], scene: str,
                         model_id: str, extra_metadata: Mapping[str, Any] | None = None) -> Path:
        """Write the table as GeoParquet 1.1 (zstd) atomically at ``path``.

        Columns: ``scene`` (dictionary string), tile ids and windows, ``valid_fraction``,
        ``label`` (dictionary string), ``class_index``, ``confidence``, ``probabilities``
        (``list<float32>``, in ``classes`` order), the CAM statistics, ``geometry`` (WKB
        Polygon, counter-clockwise) and ``bbox`` (struct covering column). File metadata:
        ``geo`` (GeoParquet 1.1; ``crs`` is PROJJSON, or null for pixel space) and
        ``tilescan`` (``classes``, ``model_id``, ``scene``, ``n_tiles`` and ``extra_metadata``).
        """
        classes, cols, codes, label_names = self._prepared(classes)
        k = len(classes)
        corners = cols["corners"]
        n = corners.shape[0]

        geo_col: dict[str, Any] = {
            "encoding": "WKB",
            "geometry_types": ["Polygon"],
            "crs": _projjson(crs),
            "orientation": "counterclockwise",
            "edges": "planar",
            "covering": {"bbox": {"xmin": ["bbox", "xmin"], "ymin": ["bbox", "ymin"],
                                  "xmax": ["bbox", "xmax"], "ymax": ["bbox", "ymax"]}},
        }
        if n:
            geo_col["bbox"] = [float(corners[..., 0].min()), float(corners[..., 1].min()),
                               float(corners[..., 0].max()), float(corners[..., 1].max())]
        geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": geo_col}}
        meta = _tilescan_meta(classes, model_id, scene, n, extra_metadata)

        label_type = pa.dictionary(pa.int32(), pa.string())
        fields = [pa.field("scene", pa.dictionary(pa.int32(), pa.string()), nullable=False)]
        for name in _ORDER_HEAD[1:]:
            if name == "label":
                fields.append(pa.field("label", label_type, nullable=False))
            else:
                fields.append(pa.field(name, _SCALARS[name][1], nullable=False))
        fields.append(pa.field("probabilities", pa.list_(pa.float32()), nullable=False))
        fields += [pa.field(name, _SCALARS[name][1]) for name in _ORDER_CAM]
        fields.append(pa.field("geometry", pa.binary(), nullable=False))
        fields.append(pa.field("bbox", BBOX_TYPE, nullable=False))
        schema = pa.schema(fields, metadata={b"geo": _dumps(geo).encode(), b"tilescan": _dumps(meta).encode()})

        scene_dict = pa.array([str(scene)], pa.string())
        label_dict = pa.array(label_names, pa.string())

        def batch(lo: int, hi: int) -> pa.RecordBatch:
            m = hi - lo
            arrays: list[pa.Array] = [pa.DictionaryArray.from_arrays(pa.array(np.zeros(m, np.int32)), scene_dict)]
            for name in _ORDER_HEAD[1:]:
                if name == "label":
                    arrays.append(pa.DictionaryArray.from_arrays(pa.array(codes[lo:hi]), label_dict))
                else:
                    arrays.append(pa.array(cols[name][lo:hi]))
            p = np.ascontiguousarray(cols["probabilities"][lo:hi], dtype=np.float32)
            offsets = np.arange(0, (m + 1) * k, k, dtype=np.int32) if k else np.zeros(m + 1, np.int32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(p.reshape(-1))))
            arrays += [pa.array(cols[name][lo:hi]) for name in _ORDER_CAM]
            c = corners[lo:hi]
            arrays.append(wkb_polygons(c))
            arrays.append(pa.StructArray.from_arrays(
                [pa.array(c[..., 0].min(axis=1)), pa.array(c[..., 1].min(axis=1)),
                 pa.array(c[..., 0].max(axis=1)), pa.array(c[..., 1].max(axis=1))],
                fields=list(BBOX_TYPE)))
            return pa.RecordBatch.from_arrays(arrays, schema=schema)

        with atomic_output(path) as tmp:
            with pq.ParquetWriter(str(tmp), schema, compression="zstd", write_statistics=True) as writer:
                for lo in range(0, n, _ROW_GROUP):
                    writer.write_batch(batch(lo, min(n, lo + _ROW_GROUP)), row_group_size=_ROW_GROUP)
                if n == 0:
                    writer.write_table(pa.Table.from_batches([batch(0, 0)], schema=schema))
        return Path(path)

    # -- GeoPackage

    def write_gpkg(self, path: str | os.PathLike, crs: Any, classes: Sequence[str], scene: str,
                   model_id: str, extra_metadata: Mapping[str, Any] | None = None,
                   layer: str = "tiles") -> Path:
        """Write the same rows as a GeoPackage layer (default ``tiles``), atomically.

        For GIS installs whose GDAL reads no Parquet. Differences from the GeoParquet file:
        no ``bbox`` column (GeoPackage keeps its own extent and R-tree index), plain string
        ``scene``/``label`` columns, and the probabilities as one float column per class,
        ``p_<class>`` (non-alphanumerics replaced by ``_``). The ``tilescan`` metadata JSON is
        stored as layer metadata. GeoPackage 1.2 with an R-tree index (:mod:`tilescan.gpkg`), so
        GDAL >= 2.2 (QGIS 3.x) reads it fully. Needs ``pyogrio`` (``pyogrio.write_arrow``, GDAL
        >= 3.8); geopandas is not used.
        """
        try:
            import pyogrio
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise OutputError("cannot write a GeoPackage: the 'pyogrio' package is not installed",
                              path=str(path)) from exc
        classes, cols, codes, label_names = self._prepared(classes)
        k = len(classes)
        n = cols["corners"].shape[0]
        prob_names = prob_column_names(classes)

        fields = [pa.field("scene", pa.string())]
        fields += [pa.field("label", pa.string()) if name == "label" else pa.field(name, _SCALARS[name][1])
                   for name in _ORDER_HEAD[1:]]
        fields += [pa.field(p, pa.float32()) for p in prob_names]
        fields += [pa.field(name, _SCALARS[name][1]) for name in _ORDER_CAM]
        fields.append(pa.field("geometry", pa.binary()))
        schema = pa.schema(fields)
        label_arr = np.array(label_names + [""], dtype=object)

        def batches() -> Iterator[pa.RecordBatch]:
            for lo in range(0, max(n, 1), _ROW_GROUP):
                hi = min(n, lo + _ROW_GROUP)
                m = hi - lo
                arrays = [pa.array([str(scene)] * m, pa.string())]
                for name in _ORDER_HEAD[1:]:
                    if name == "label":
                        arrays.append(pa.array(label_arr[codes[lo:hi]], pa.string()))
                    else:
                        arrays.append(pa.array(cols[name][lo:hi]))
                probs = cols["probabilities"][lo:hi]
                arrays += [pa.array(np.ascontiguousarray(probs[:, i])) for i in range(k)]
                arrays += [pa.array(cols[name][lo:hi]) for name in _ORDER_CAM]
                arrays.append(wkb_polygons(cols["corners"][lo:hi]))
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)

        from . import gpkg

        pj = pyproj_crs(crs)
        meta = _dumps(_tilescan_meta(classes, model_id, scene, n, extra_metadata))
        with atomic_output(path) as tmp:
            reader = pa.RecordBatchReader.from_batches(schema, batches())
            pyogrio.write_arrow(reader, str(tmp), layer=layer, driver="GPKG", geometry_name="geometry",
                                geometry_type="Polygon", crs=None if pj is None else pj.to_wkt(),
                                layer_metadata={"tilescan": meta}, dataset_options=gpkg.DATASET_OPTIONS,
                                layer_options=gpkg.layer_options())
            gpkg.add_rtree(tmp, name=path)
        return Path(path)



def _projjson(crs: Any) -> dict | None:
    pj = pyproj_crs(crs)
    return None if pj is None else pj.to_json_dict()


def _tilescan_meta(classes: Sequence[str], model_id: str, scene: str, n: int,
                   extra: Mapping[str, Any] | None) -> dict:
    base = {"classes": list(classes), "model_id": model_id, "scene": str(scene), "n_tiles": int(n)}
    clash = set(base) & set(extra or {})
    if clash:
        raise ValueError(f"extra_metadata may not override {sorted(clash)}")
    return {**base, **dict(extra or {})}


def prob_column_names(classes: Sequence[str]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for c in classes:
        base = "p_" + (re.sub(r"\W+", "_", c).strip("_") or "class")
        name, i = base, 2
        while name.lower() in seen:  # GeoPackage column names are case-insensitive
            name, i = f"{base}_{i}", i + 1
        seen.add(name.lower())
        names.append(name)
    return names


# --------------------------------------------------------------------------- label COG


def _cog_profile(compress: str) -> dict:
    from rio_cogeo.profiles import cog_profiles

    profile = dict(cog_profiles.get(_compression(compress)))
    profile["num_threads"] = "ALL_CPUS"
    profile["sparse_ok"] = True  # blocks all at nodata are not written
    return profile


def _cog_copy(src: str | os.PathLike, dst: str | os.PathLike, compress: str, resampling: str, overviews: int) -> None:
    """Copy a tiled GeoTIFF to a COG with GDAL's COG driver in one pass: 512 px blocks,
    ``compress`` with the predictor (floating-point for floats), ``overviews`` levels built
    with ``resampling`` (nodata-aware), tags, nodata and band descriptions carried over.
    Sparse: blocks all at nodata are not written (nor encoded), in the image and overviews.
    Overviews are built through a temporary file beside ``dst``, so memory stays small
    whatever the raster size; rio-cogeo's ``cog_translate`` encodes the data twice, so this is
    faster (benchmarks/README.md)."""
    import rasterio.shutil

    compress = _compression(compress)
    opts = dict(COMPRESS="NONE" if compress == "raw" else compress.upper(), BLOCKSIZE="512",
                BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS", OVERVIEW_RESAMPLING=resampling.upper(),
                SPARSE_OK="TRUE")
    if compress in _PREDICTOR_OK:
        opts["PREDICTOR"] = "YES"
    if overviews > 0:
        opts["OVERVIEW_COUNT"] = str(overviews)
    else:
        opts["OVERVIEWS"] = "NONE"
    rasterio.shutil.copy(str(src), str(dst), driver="COG", **opts)


def _overview_level(width: int, height: int, block: int = 512) -> int:
    """Number of 2x overview levels: until the longer side fits one block (rio-cogeo's own
    rule looks at the shorter side, which leaves long thin rasters without overviews)."""
    level = 0
    while max(width, height) > block * 2**level and min(width, height) >= 2 ** (level + 1):
        level += 1
    return level


def _aux_xml(classes: Sequence[str], colors: Sequence[tuple[int, int, int]]) -> str:
    """GDAL PAM sidecar: category names and a thematic raster attribute table for band 1."""
    from xml.sax.saxutils import escape

    cats = "".join(f"      <Category>{escape(c)}</Category>\n" for c in classes)
    # Field types: 0 integer, 2 string. Usages: 0 generic, 2 name, 5 min-max (the value),
    # 6/7/8 red/green/blue.
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8)]
    defs = "".join(
        f'      <FieldDefn index="{i}">\n        <Name>{name}</Name>\n        <Type>{t}</Type>\n'
        f"        <Usage>{u}</Usage>\n      </FieldDefn>\n"
        for i, (name, t, u) in enumerate(fields)
    )
    rows = "".join(
        f'      <Row index="{i}"><F>{i}</F><F>{escape(c)}</F><F>{r}</F><F>{g}</F><F>{b}</F></Row>\n'
        for i, (c, (r, g, b)) in enumerate(zip(classes, colors))
    )
    return (
        "<PAMDataset>\n"
        '  <PAMRasterBand band="1">\n'
        "    <CategoryNames>\n" + cats + "    </CategoryNames>\n"
        '    <GDALRasterAttributeTable tableType="thematic">\n' + defs + rows +
        "    </GDALRasterAttributeTable>\n"
        "  </PAMRasterBand>\n"
        "</PAMDataset>\n"
    )


def write_labels_cog(path: str | os.PathLike, labels: np.ndarray, grid_transform: Affine, crs: Any,
                     classes: Sequence[str], *, compress: str = "deflate",
                     tags: Mapping[str, Any] | None = None) -> Path:
    """Write the tile class grid as a paletted uint8 Cloud-Optimized GeoTIFF.

    ``labels`` is ``(n_rows, n_cols)`` with class indexes, ``-1`` for skipped tiles (written
    as nodata 255). ``grid_transform`` maps grid cells (one per stride step) to the scene
    CRS. The file gets a colour table (:func:`class_colors`, nodata transparent), band
    description ``class``, tags ``CLASS_NAMES`` (JSON list) and ``CLASS_<i>=<name>``,
    nearest-neighbour overviews, and a sidecar ``<path>.aux.xml`` holding GDAL category
    names and a raster attribute table (GDAL keeps these only in PAM sidecars for GeoTIFF),
    so QGIS shows class names and colours without styling. Both files are atomic; the
    sidecar is renamed into place just before the raster.
    """
    from rio_cogeo.cogeo import cog_translate

    classes = [str(c) for c in classes]
    arr = np.asarray(labels)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"labels must be a non-empty 2-D grid, got shape {arr.shape}")
    if len(classes) > LABEL_NODATA:
        raise ValueError(f"a uint8 label raster holds at most {LABEL_NODATA} classes, got {len(classes)}")
    if arr.size and (arr.min() < -1 or arr.max() >= len(classes)):
        raise ValueError(f"labels must be -1 or a class index below {len(classes)}")
    data = np.where(arr < 0, LABEL_NODATA, arr).astype(np.uint8)
    colors = class_colors(len(classes))
    cmap = {i: (*rgb, 255) for i, rgb in enumerate(colors)}
    cmap[LABEL_NODATA] = (0, 0, 0, 0)
    all_tags = {"CLASS_NAMES": _dumps(classes)}
    all_tags.update({f"CLASS_{i}": c for i, c in enumerate(classes)})
    all_tags.update({str(k): v if isinstance(v, str) else _dumps(v) for k, v in (tags or {}).items()})

    profile = dict(driver="GTiff", dtype="uint8", count=1, height=data.shape[0], width=data.shape[1],
                   crs=_rasterio_crs(crs), transform=grid_transform, nodata=LABEL_NODATA)
    aux_path = Path(str(path) + ".aux.xml")
    with atomic_output(path) as tmp:
        with MemoryFile() as mem:
            with mem.open(**profile) as dst:
                dst.write(data, 1)
                dst.write_colormap(1, cmap)
                dst.set_band_description(1, "class")
                dst.update_tags(**all_tags)
            with mem.open() as src:
                cog_translate(src, str(tmp), _cog_profile(compress), nodata=LABEL_NODATA,
                              overview_resampling="nearest",
                              overview_level=_overview_level(data.shape[1], data.shape[0]), in_memory=True, quiet=True,
                              additional_cog_metadata=all_tags)
        with atomic_output(aux_path) as tmp_aux:
            tmp_aux.write_text(_aux_xml(classes, colors), encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------- heatmap


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


@dataclasses.dataclass(frozen=True)
class _HeatGrid:
    width: int  # scene pixels
    height: int
    out_w: int  # heat pixels
    out_h: int
    col_start: np.ndarray
    row_start: np.ndarray

    _axes: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

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


class HeatmapWriter:
    """Blend per-tile CAMs into a scene heatmap COG, in row strips with bounded memory.

    The heatmap grid is ``ceil(W*scale) x ceil(H*scale)`` pixels covering the scene exactly:
    its transform is ``scene_transform @ Affine.scale(W/out_w, H/out_h)``. Each tile's CAM is
    resampled bilinearly onto the heat pixels of its footprint; where tiles overlap the heat
    is the mean weighted by each tile's valid-pixel coverage (nodata pixels weigh 0). Heat
    pixels that no valid tile pixel covers get :data:`HEATMAP_NODATA` (-1.0).

    Tiles must arrive in row-major order of the tile grid (non-decreasing ``row_off``).
    Adding a tile at ``row_off = r`` implies that rows above ``r`` are final (as does an
    explicit :meth:`finish_rows`): finished heat rows go to a temporary tiled float32
    GeoTIFF and are freed, so memory is about ``width * (tile + stride) * scale`` heat
    pixels, not the scene. :meth:`close` turns the temporary file into a COG at ``path``
    (average overviews) atomically; :meth:`abort` removes the temporary files. As a context
    manager it closes on success and aborts on error.
    """

    def __init__(self, path: str | os.PathLike, scene_width: int, scene_height: int,
                 scene_transform: Affine, crs: Any, scale: float, tile_px: int, stride_px: int,
                 compress: str = "deflate"):
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
        self._sum = np.zeros((cap, g.out_w), np.float64)
        self._wsum = np.zeros((cap, g.out_w), np.float64)
        self._rows = 0
        self._last_row_off = None
        self.peak_buffer_rows = 0
        self._closed = False
        self._strips = _temp_name(self.path, "strips")
        self._dst = None
        try:
            profile = dict(driver="GTiff", dtype="float32", count=1, width=g.out_w, height=g.out_h,
                           crs=self.crs, transform=self.transform, nodata=HEATMAP_NODATA,
                           tiled=True, blockxsize=256, blockysize=256, bigtiff="IF_SAFER", sparse_ok=True)
            # The strips file is a scratch copy read once by close(): left uncompressed, so
            # blending never pays for compression on the model's cores; the COG is compressed once. Sparse:
            # rows no tile touched are never written, and read back as nodata.
            self._dst = rasterio.open(self._strips, "w", **profile)
        except _io_error_types() as exc:
            _remove_quietly(self._strips)
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
        return self._sum.nbytes + self._wsum.nbytes

    # -- accumulate

    def _ensure_rows(self, end_row: int) -> None:
        need = end_row - self._base
        if need > self._sum.shape[0]:
            cap = max(need, int(self._sum.shape[0] * 1.5) + 1)
            for name in ("_sum", "_wsum"):
                old = getattr(self, name)
                new = np.zeros((cap, old.shape[1]), np.float64)
                new[: self._rows] = old[: self._rows]
                setattr(self, name, new)
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
            self._sum[:keep] = self._sum[n_buf:self._rows]
            self._wsum[:keep] = self._wsum[n_buf:self._rows]
            self._sum[keep:self._rows] = 0.0
            self._wsum[keep:self._rows] = 0.0
            self._rows = keep
        # rows no tile touched stay unwritten: the sparse scratch file reads them as nodata
        self._base = done

    def _write(self, row: int, s: np.ndarray, w: np.ndarray) -> None:
        heat = np.full(s.shape, HEATMAP_NODATA, dtype=np.float32)
        ok = w > 0
        heat[ok] = (s[ok] / w[ok]).astype(np.float32)
        self._write_raw(row, heat)

    def _write_raw(self, row: int, heat: np.ndarray) -> None:
        with self._aborting():
            self._dst.write(heat, 1, window=Window(0, row, heat.shape[1], heat.shape[0]))

    @contextlib.contextmanager
    def _aborting(self) -> Iterator[None]:
        """On any error drop the temporary files (:meth:`abort`); a failed write becomes an
        :class:`OutputError` naming the heatmap."""
        try:
            yield
        except _io_error_types() as exc:
            self.abort()
            raise OutputError(_describe(exc, self.path), path=str(self.path)) from exc
        except BaseException:
            self.abort()
            raise

    # -- finish

    def finish(self, tags: Mapping[str, Any] | None = None) -> None:
        """Write the remaining rows and tags to the scratch file; no tile can be added after.
        :meth:`close` does this itself; call it first to take a :meth:`preview` before."""
        if self._closed or self._dst.closed:
            return
        with self._aborting():  # e.g. the strips file could not be flushed: disk full
            self.finish_rows(self.grid.height)
            self._dst.set_band_description(1, "heat")
            meta = {"HEATMAP_SCALE": repr(self.scale), "TILE_PX": str(self.tile_px),
                    "STRIDE_PX": str(self.stride_px), "HEATMAP_NODATA": repr(HEATMAP_NODATA)}
            meta.update({str(k): v if isinstance(v, str) else _dumps(v) for k, v in (tags or {}).items()})
            self._dst.update_tags(**meta)
            self._dst.close()

    def preview(self, max_size: int = 1024) -> np.ndarray:
        """:func:`read_heatmap_preview` of the finished heat (after :meth:`finish`), read
        from the scratch file, so a quicklook can be drawn while :meth:`close` writes the COG."""
        if self._closed or not self._dst.closed:
            raise RuntimeError("HeatmapWriter.preview needs finish() first and close() not yet")
        with self._aborting():  # the scratch file came out short: a full disk
            return read_heatmap_preview(self._strips, max_size)

    def close(self, tags: Mapping[str, Any] | None = None) -> Path:
        """Write the remaining rows and convert to a COG at ``path`` (atomic). ``tags`` are
        ignored after :meth:`finish` (which took them)."""
        if self._closed:
            return self.path
        self.finish(tags)
        try:
            with self._aborting():
                self._closed = True
                with atomic_output(self.path) as tmp:
                    _cog_copy(self._strips, tmp, self.compress, "average",
                              _overview_level(self.grid.out_w, self.grid.out_h))
        finally:
            _remove_quietly(self._strips)
        self._sum = self._wsum = np.zeros((0, self.grid.out_w))
        return self.path

    def abort(self) -> None:
        """Drop everything: close and remove the temporary files; ``path`` is not touched."""
        self._closed = True
        if self._dst is not None and not self._dst.closed:
            with contextlib.suppress(Exception):
                self._dst.close()
        _remove_quietly(self._strips)


def read_heatmap_preview(path: str | os.PathLike, max_size: int = 1024) -> np.ndarray:
    """Read a heatmap COG decimated so its longer side is at most ``max_size`` (GDAL reads
    from the overviews); nodata becomes NaN. Returns float32 ``(h, w)``."""
    with rasterio.open(path) as src:
        f = max(src.width, src.height) / float(max_size)
        if f <= 1:
            shape = (src.height, src.width)
        else:
            shape = (max(1, round(src.height / f)), max(1, round(src.width / f)))
        data = src.read(1, out_shape=shape, masked=True, resampling=Resampling.average)
    return np.ma.filled(data.astype(np.float32), np.nan)


# --------------------------------------------------------------------------- quicklook


LABEL_BLEND = 0.55
"""Weight of the class colour in the quicklook's label panel; the scene shows through with
the rest (a labelled pixel is ``(1 - LABEL_BLEND) * scene + LABEL_BLEND * colour``)."""

HEAT_BLEND = 0.5
"""Weight of the colour-mapped heat in the quicklook's Grad-CAM panel."""

_OUTLINE_RGB = (24, 24, 24)
_HEAT_CAPTION = "Grad-CAM (0 = no evidence, 1 = strongest)"


@dataclasses.dataclass(frozen=True)
class QuicklookLayout:
    """Where :func:`write_quicklook` puts things: three ``panel_w`` x ``panel_h`` panels
    (scene, labels, Grad-CAM) side by side below a title row, ``gap`` pixels apart; the
    legend and the heat colour bar below them."""

    panel_w: int
    panel_h: int
    font_px: int
    gap: int
    title_h: int
    pad: int

    @property
    def width(self) -> int:
        return 3 * self.panel_w + 2 * self.gap

    def origin(self, k: int) -> tuple[int, int]:
        """``(x, y)`` of panel ``k``'s top-left pixel in the PNG (0 scene, 1 labels, 2 heat)."""
        if k not in (0, 1, 2):
            raise ValueError(f"panel must be 0, 1 or 2, got {k}")
        return k * (self.panel_w + self.gap), self.title_h

    def colorbar_box(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` (exclusive ends) of the heat colour bar, under the heat
        panel: heat 0 at column ``x0``, 1 at ``x1 - 1``."""
        x0, y0 = self.origin(2)
        x0, y0 = x0 + self.pad, y0 + self.panel_h + self.pad
        return x0, y0, x0 + max(1, self.panel_w - 2 * self.pad), y0 + self.font_px


def quicklook_layout(panel_w: int, panel_h: int) -> QuicklookLayout:
    """The layout of a quicklook whose preview is ``panel_w`` x ``panel_h`` pixels; the
    font grows with the panel (``panel_w / 64``, between 11 and 24 px)."""
    font_px = int(min(24, max(11, round(panel_w / 64))))
    return QuicklookLayout(panel_w, panel_h, font_px, gap=max(4, font_px // 2),
                           title_h=round(font_px * 1.7), pad=max(4, font_px // 3))


@functools.lru_cache(maxsize=1)
def _font_path() -> str | None:
    """DejaVu Sans as shipped with matplotlib (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return str(p)
    return None


def _font(size: int):
    """A TrueType font of ``size`` px; Pillow's own font if DejaVu Sans is missing. Not
    cached: a font object is not shared between the threads that draw quicklooks."""
    from PIL import ImageFont

    path = _font_path()
    if path is not None:
        with contextlib.suppress(OSError):
            return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _preview_tiles(n_preview: int, n_scene: int, tile_px: int, stride: int, n_tiles: int) -> np.ndarray:
    """The grid column (or row) drawn at each preview pixel along one axis: the tile whose
    window centre is nearest to the scene pixel the preview pixel shows (the pixel the
    preview reader samples); on a tie, the later tile. With ``stride == tile_px`` that is
    the one tile whose window holds the pixel."""
    from .tiling import _sample_index

    sp = _sample_index(n_preview, n_scene)
    # nearest of the centres k * stride + tile_px / 2 to sp + 0.5, in integers
    k = (2 * sp + 1 - tile_px + stride) // (2 * stride)
    return np.clip(k, 0, n_tiles - 1)


def _label_image(labels: np.ndarray, h: int, w: int, scene_size: tuple[int, int], tile_px: int,
                 stride: int, row_offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class index per preview pixel (-1: no tile or a skipped one), and the grid row and
    column drawn at each preview row / column."""
    from .tiling import TileGrid

    grid = TileGrid(int(scene_size[0]), int(scene_size[1]), int(tile_px), int(stride))
    n_band, n_cols = labels.shape
    if n_cols != grid.n_cols or row_offset < 0 or row_offset + n_band > grid.n_rows:
        raise ValueError(
            f"labels of shape {labels.shape} at grid row {row_offset} do not fit the "
            f"{grid.n_rows} x {grid.n_cols} grid of {tile_px} px tiles (stride {stride}) "
            f"over a {scene_size[0]} x {scene_size[1]} scene")
    rows = _preview_tiles(h, grid.height, grid.tile_size, grid.stride, grid.n_rows)
    cols = _preview_tiles(w, grid.width, grid.tile_size, grid.stride, grid.n_cols)
    band = rows - row_offset
    inside = (band >= 0) & (band < n_band)
    out = np.full((h, w), -1, dtype=np.int64)
    out[inside] = labels[band[inside]][:, cols]
    return out, rows, cols


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` px wide (a longer word
    stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def write_quicklook(path: str | os.PathLike, preview_rgb: np.ndarray, preview_valid: np.ndarray | None,
                    labels: np.ndarray | None, heat: np.ndarray | None, classes: Sequence[str], *,
                    scene_size: tuple[int, int] | None = None, tile_px: int | None = None,
                    stride: int | None = None, row_offset: int = 0, outlines: bool = False) -> Path:
    """Write a PNG: scene | scene with label colours | Grad-CAM heat (jet) over the scene,
    with panel titles (layout: :func:`quicklook_layout`), a legend of the classes present
    (most frequent first) and a colour bar for the heat.

    ``preview_rgb`` (h, w, 3) uint8 and ``preview_valid`` (h, w) bool cover the whole
    scene, sampled as the scene reader's preview samples it. ``labels`` holds the class of
    each tile (-1: skipped) for grid rows ``row_offset ..`` of the tile grid that
    ``scene_size`` (width, height in scene pixels), ``tile_px`` and ``stride`` (default
    ``tile_px``) define; each tile is drawn over its own window, clipped to the scene
    (where tiles overlap, each pixel shows the tile whose centre is nearest, the later
    one on a tie).
    ``outlines`` draws the tile borders. ``heat`` (any size, NaN or negative = nodata;
    e.g. from :func:`read_heatmap_preview`) is stretched over the scene.
    """
    import cv2
    from PIL import Image, ImageDraw

    rgb = np.asarray(preview_rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"preview_rgb must be (h, w, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    valid = np.ones((h, w), bool) if preview_valid is None else np.asarray(preview_valid, bool)
    if valid.shape != (h, w):
        raise ValueError(f"preview_valid must be {(h, w)}, got {valid.shape}")
    classes = [str(c) for c in classes]
    palette = np.array(class_colors(len(classes)) or [(0, 0, 0)], dtype=np.float32)

    base = rgb.astype(np.float32)
    base[~valid] *= 0.35  # dim nodata so the footprint is visible
    scene_panel = base

    label_panel = base.copy()
    present: list[int] = []
    cells = None  # the grid row / column drawn at each preview row / column
    if labels is not None and np.asarray(labels).size:
        if scene_size is None or tile_px is None:
            raise ValueError("write_quicklook needs scene_size and tile_px to place the labels")
        grid_labels = np.asarray(labels, dtype=np.int64)
        if grid_labels.ndim != 2:
            raise ValueError(f"labels must be a 2-D tile grid, got shape {grid_labels.shape}")
        lab, *cells = _label_image(grid_labels, h, w, scene_size, tile_px,
                                   tile_px if stride is None else stride, row_offset)
        hit = (lab >= 0) & (lab < len(classes)) & valid
        label_panel[hit] = (1.0 - LABEL_BLEND) * base[hit] + LABEL_BLEND * palette[lab[hit]]
        flat = grid_labels.ravel()
        flat = flat[(flat >= 0) & (flat < len(classes))]
        counts = np.bincount(flat, minlength=len(classes))
        present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    if outlines and cells is not None:
        rows, cols = cells  # a border on the first preview pixel of each tile
        edge = np.zeros((h, w), bool)
        edge[1:][rows[1:] != rows[:-1]] = True
        edge[:, 1:][:, cols[1:] != cols[:-1]] = True
        label_panel[edge] = _OUTLINE_RGB

    cmap = cv2.COLORMAP_JET
    heat_panel = base.copy()
    has_heat = heat is not None and np.asarray(heat).size > 0
    if has_heat:
        hm = np.asarray(heat, dtype=np.float32)
        ok = np.isfinite(hm) & (hm >= 0)
        hm_r = cv2.resize(np.where(ok, hm, 0).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        ok_r = cv2.resize(ok.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool) & valid
        jet = cv2.applyColorMap(np.clip(hm_r * 255 + 0.5, 0, 255).astype(np.uint8), cmap)
        jet = jet[..., ::-1].astype(np.float32)  # BGR -> RGB
        heat_panel[ok_r] = (1.0 - HEAT_BLEND) * base[ok_r] + HEAT_BLEND * jet[ok_r]
    else:
        heat_panel *= 0.5

    lay = quicklook_layout(w, h)
    s, pad = lay.font_px, lay.pad
    font = _font(s)
    row_h = round(s * 1.5)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # the legend goes under the scene and label panels, the colour bar under the heat panel
    legend_w = (2 * w + lay.gap if has_heat else lay.width) - 2 * pad
    lines: list[list[tuple[int, int]]] = []
    for i in present:
        width = s + s // 2 + round(probe.textlength(classes[i], font=font)) + s
        if lines and sum(e[1] for e in lines[-1]) + width <= legend_w:
            lines[-1].append((i, width))
        else:
            lines.append([(i, width)])
    legend_h = (len(lines) * row_h + 2 * pad) if lines else 0
    bx, by, bx1, by1 = lay.colorbar_box()
    bar_w, bar_h, tick = bx1 - bx, by1 - by, max(3, s // 3)
    caption = _wrap(probe, _HEAT_CAPTION, font, bar_w) if has_heat else []
    bar_band = (2 * pad + bar_h + tick + row_h * (1 + len(caption))) if has_heat else 0
    total_h = lay.title_h + h + max(legend_h, bar_band)

    canvas = np.full((total_h, lay.width, 3), 255, dtype=np.uint8)
    for k, panel in enumerate((scene_panel, label_panel, heat_panel)):
        x, y = lay.origin(k)
        canvas[y:y + h, x:x + w] = np.clip(panel + 0.5, 0, 255).astype(np.uint8)
    if has_heat:
        ramp = np.clip(np.arange(bar_w) * (255.0 / max(1, bar_w - 1)) + 0.5, 0, 255).astype(np.uint8)
        colors = cv2.applyColorMap(ramp[None, :], cmap)[0, :, ::-1]
        canvas[by:by + bar_h, bx:bx + bar_w] = colors[None]
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    ty = (lay.title_h - s) // 2
    for k, title in enumerate(("scene", "labels", "Grad-CAM" if has_heat else "no heatmap")):
        draw.text((lay.origin(k)[0] + pad, ty), title, fill=(0, 0, 0), font=font)
    if has_heat:
        draw.rectangle([bx - 1, by - 1, bx + bar_w, by + bar_h], outline=(0, 0, 0))
        ly = by + bar_h + tick
        for v in (0.0, 0.5, 1.0):  # tick labels: 0 left-aligned, 0.5 centred, 1 right-aligned
            tx = bx + round(v * (bar_w - 1))
            draw.line([tx, by + bar_h, tx, ly - 1], fill=(0, 0, 0))
            text = f"{v:g}"
            draw.text((tx - round(v * draw.textlength(text, font=font)), ly + 1), text, fill=(0, 0, 0), font=font)
        for j, line in enumerate(caption):
            draw.text((bx, ly + row_h * (j + 1)), line, fill=(0, 0, 0), font=font)
    y = lay.title_h + h + pad
    for line in lines:
        x = pad
        for i, width in line:
            color = tuple(int(c) for c in palette[i])
            draw.rectangle([x, y + (row_h - s) // 2, x + s, y + (row_h - s) // 2 + s], fill=color, outline=(0, 0, 0))
            draw.text((x + s + s // 2, y + (row_h - s) // 2), classes[i], fill=(0, 0, 0), font=font)
            x += width
        y += row_h

    # libpng through OpenCV, zlib level 1 with the RLE strategy: faster than Pillow at any
    # level for about the same size (benchmarks/README.md)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image)[:, :, ::-1]),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:  # pragma: no cover - OpenCV reports no reason
        raise OutputError("cannot encode the quicklook PNG", path=str(path))
    with atomic_output(path) as tmp:
        tmp.write_bytes(png.tobytes())
    return Path(path)
