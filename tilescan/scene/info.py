"""What a scene file is: checks before reading, its georeferencing, ground sample distance and nodata; finding scenes in the inputs.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import re
import shlex
import stat
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import rasterio
import rasterio.windows
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning

from ..errors import InputError, NoScenesError
from ..layout import TIME_FORMAT, is_output_folder

TIFF_SUFFIXES = (".tif", ".tiff")


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


#: (first bytes, what the file looks like, its kind: "image" (explain reads it as one), "raster"
#: (GDAL reads it), None; gdal_translate makes a GeoTIFF of either kind)
_OTHER_MAGIC = (
    (b"\x89PNG", "a PNG image", "image"),
    (b"\xff\xd8\xff", "a JPEG image", "image"),
    (b"GIF8", "a GIF image", "image"),
    (b"\x00\x00\x00\x0cjP", "a JPEG 2000 image", "image"),
    (b"\x89HDF", "an HDF5 file", "raster"),
    (b"CDF", "a netCDF file", "raster"),
    (b"EHFA_HEADER_TAG", "an ERDAS Imagine (.img) file", "raster"),
    (b"PK\x03\x04", "a zip archive: extract the GeoTIFF from it first", None),
    (b"\x1f\x8b", "a gzip archive: gunzip it first", None),
    (b"<VRTDataset", "a GDAL VRT", "raster"),
    (b"<", "an XML/HTML text file", None),
)


def scene_by_content(path: Path) -> bool:
    """Whether a local file's first bytes are a TIFF's, or a raster's that only GDAL reads (a VRT,
    netCDF, HDF5, ERDAS Imagine: the scene reader names it and how to make a GeoTIFF of it)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return False
    return head[:4] in _TIFF_MAGIC or (_looks_like(head) or ("", None))[1] == "raster"


#: Names of rasters GDAL reads in other formats (a folder of them holds no scene tilescan reads)
_OTHER_RASTERS = (".jp2", ".j2k", ".img", ".vrt", ".nc", ".hdf", ".h5", ".png", ".jpg", ".jpeg", ".ecw", ".sid")


def _looks_like(head: bytes) -> tuple[str, str | None] | None:
    """What a file whose first bytes are ``head`` looks like, and its kind (:data:`_OTHER_MAGIC`);
    a VRT also after an XML declaration or blank lines."""
    text = head.lstrip()
    if text.startswith(b"<") and b"<VRTDataset" in head:
        text = b"<VRTDataset"
    return next(((name, kind) for magic, name, kind in _OTHER_MAGIC if text.startswith(magic)), None)


class TilingWarning(UserWarning):
    """Something about a scene the user should know, but that does not stop the run."""


_collector = threading.local()


def tiling_warning(message: str, stacklevel: int = 2, *, code: str = "tiling", **fields) -> None:
    """A :class:`TilingWarning` for the user; inside :func:`collecting_tiling_warnings` on this
    thread it is collected instead (warnings' own catching is process-wide, and a run opens
    scenes on one thread while others write outputs), as ``{"code", "message", **fields}``:
    a warning that outputs act on has a ``code`` of its own (run.json's ``warning_details``)."""
    sink = getattr(_collector, "sink", None)
    if sink is not None:
        sink.append({"code": code, "message": message, **fields})
    else:
        warnings.warn(message, TilingWarning, stacklevel=stacklevel + 1)


#: Decoded size of one compressed strip above which a scene is warned about: GDAL decodes a
#: whole strip for a read inside it, again once it has left the block cache.
BIG_STRIP_BYTES = 128 << 20


def pixel_interleaved(ds) -> bool:
    """Whether one block of the file holds every band (pixel-interleaved, or a single band),
    rather than each band having blocks of its own."""
    return ds.count == 1 or (ds.interleaving is not None and ds.interleaving.name == "pixel")


def warn_big_strips(path: str, ds, rows: int) -> None:
    """A scene stored in compressed strips of ``rows`` rows too big for the cache (one strip for
    the whole scene, say) reads many times slower and with more memory than a tiled copy
    (benchmarks/README.md): say so, and how to make that copy."""
    rows = min(rows, ds.height)
    strip = rows * ds.width * np.dtype(ds.dtypes[0]).itemsize * (ds.count if pixel_interleaved(ds) else 1)
    if ds.compression and strip > BIG_STRIP_BYTES:
        whole = " (one strip holds the whole scene)" if rows >= ds.height else ""
        name = Path(path).name
        tiling_warning(f"{path}: stored in compressed strips of {rows} rows{whole}, {strip / 2**20:,.0f} MiB each when "
                       "decoded: every read decodes a whole strip again, so the scene reads several times slower and "
                       "with more memory than a tiled copy; make one with gdal_translate -co TILED=YES -co "
                       f"COMPRESS=DEFLATE {name} tiled.tif (or gdal_translate -of COG {name} cog.tif)", stacklevel=4,
                       code="big_strips")


@contextlib.contextmanager
def collecting_tiling_warnings() -> Iterator[list[dict]]:
    """Collect this thread's :func:`tiling_warning` calls into the list it yields (as dicts)."""
    outer = getattr(_collector, "sink", None)
    _collector.sink = []
    try:
        yield _collector.sink
    finally:
        _collector.sink = outer


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
    nodata_from: str = "file"
    """Where ``nodata`` comes from: ``file``, or the ``[tiling] nodata`` setting as the user
    gave it (e.g. ``--nodata 0``), which replaced the file's on every band."""
    pixel_aspect: float | None = None
    """A pixel's ground length along its rows' step (north–south in a north-up scene) over its
    columns' step, measured as ``gsd_m`` is: 1 where pixels are square on the ground, about
    1 / cos(latitude) for square degrees of a geographic CRS; None where not measured."""
    acquired: dict | None = None
    """When the scene was taken, where its metadata says: ``{"datetime": ISO 8601 UTC, "from":
    the tag}`` (:func:`_acquired`); None where it does not."""


def _nodata_in_dtype(nodata: float | None, dtype: np.dtype) -> float | None:
    """``nodata`` as a value of ``dtype``, or None if no pixel could ever equal it."""
    if nodata is None:
        return None
    if np.issubdtype(dtype, np.floating):  # as the type holds it: -3.4028235e+38 given is float32's lowest
        with np.errstate(over="ignore"):
            return float(np.dtype(dtype).type(nodata))
    if not math.isfinite(nodata) or nodata != int(nodata):
        return None
    info = np.iinfo(dtype)
    return int(nodata) if info.min <= nodata <= info.max else None


def _apply(t: Affine, col: float, row: float) -> tuple[float, float]:
    """Pixel (col, row) to CRS coordinates (written out: ``Affine * tuple`` is deprecated
    in newer affine releases and ``@`` missing in older ones)."""
    return t.a * col + t.b * row + t.c, t.d * col + t.e * row + t.f


@functools.lru_cache(maxsize=64)
def _geodesy(wkt: str):
    """The ellipsoid of the CRS ``wkt``, a transformer from it to its geographic CRS and that
    CRS's degrees per angular unit (None without either): made once per CRS, as a run's scenes
    mostly share one (pyproj's objects are thread-safe)."""
    import pyproj

    pcrs = pyproj.CRS.from_user_input(wkt)
    geod = pcrs.get_geod()
    geog = pcrs.geodetic_crs
    if geod is None or geog is None:
        return None
    # a geographic CRS in grads (NTF Paris) gives numbers Geod would take for degrees
    unit = geog.axis_info[0].unit_conversion_factor if geog.axis_info else 0.0
    degrees = unit / math.radians(1.0) if unit > 0 else 1.0
    return geod, pyproj.Transformer.from_crs(pcrs, geog, always_xy=True), degrees


def _ground_steps(crs, transform: Affine, width: int, height: int) -> tuple[float, float] | None:
    """A pixel's column and row steps in metres at the scene centre, measured on the CRS's ellipsoid."""
    try:
        tools = _geodesy(crs.to_wkt())
        if tools is None:
            return None
        geod, tr, degrees = tools
        cx, cy = width / 2.0, height / 2.0
        pts = [_apply(transform, cx, cy), _apply(transform, cx + 1, cy), _apply(transform, cx, cy + 1)]
        lon, lat = (np.multiply(v, degrees) for v in tr.transform([p[0] for p in pts], [p[1] for p in pts]))
        if not all(math.isfinite(v) for v in (*lon, *lat)):
            return None
        _, _, dx = geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, dy = geod.inv(lon[0], lat[0], lon[2], lat[2])
        dx, dy = abs(dx), abs(dy)
        return (dx, dy) if all(math.isfinite(v) and v > 0 for v in (dx, dy)) else None
    except Exception:  # an unusual CRS pyproj cannot handle: fall back to nominal
        return None


def _nominal_gsd(crs, res: tuple[float, float]) -> float | None:
    """Metres per pixel from the CRS's linear unit: a projected CRS, or a local (engineering)
    one, a site grid in metres or feet, which has no ellipsoid to measure on."""
    try:
        if crs is None or crs.is_geographic:
            return None
        if crs.is_projected:
            _, factor = crs.linear_units_factor
        else:
            factor = _engineering_unit(crs.to_wkt())
        return (abs(res[0]) + abs(res[1])) / 2.0 * float(factor) if factor else None
    except Exception:
        return None


@functools.lru_cache(maxsize=16)
def _engineering_unit(wkt: str) -> float | None:
    """Metres per unit of a local (engineering) CRS's horizontal axes; None for another kind."""
    import pyproj

    pcrs = pyproj.CRS.from_wkt(wkt)
    units = {a.unit_conversion_factor for a in pcrs.axis_info[:2]}
    return units.pop() if pcrs.type_name == "Engineering CRS" and len(units) == 1 else None


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
    steps = _ground_steps(crs, ds.transform, ds.width, ds.height) if georef else None
    gsd = nominal if steps is None else (steps[0] + steps[1]) / 2.0
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
        pixel_aspect=None if steps is None else steps[1] / steps[0],
        acquired=_acquired(ds, str(path)),
    )


def _acquired(ds, path: str) -> dict | None:
    """The scene's date from its metadata: GDAL's IMAGERY ACQUISITIONDATETIME (read from a local
    file's sidecars too: not probed on remote files, where each probe is a request), else the
    TIFF's DateTime tag (the image's date by the TIFF spec, often when the file was made; with
    no zone, taken as UTC). In UTC; an unset value (year 0, 1970-01-01 00:00) is none."""
    import datetime as dt

    remote = "://" in path or path.startswith("/vsi")
    found = [] if remote else [("IMAGERY ACQUISITIONDATETIME", ds.tags(ns="IMAGERY").get("ACQUISITIONDATETIME"))]
    found.append(("TIFFTAG_DATETIME (the TIFF's image date)", ds.tags().get("TIFFTAG_DATETIME")))
    for tag, text in found:
        # "2015:07:04 10:20:30" (TIFF) or ISO 8601: a date with ":" becomes "-", fractions of a second go
        text = re.sub(r"^(\d{4}):(\d{2}):(\d{2})", r"\1-\2-\3", str(text or "").strip().rstrip("\x00"))
        with contextlib.suppress(ValueError):
            t = dt.datetime.fromisoformat(re.sub(r"(\d{2}:\d{2}:\d{2})\.\d+", r"\1", text))
            t = (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
            if t.year >= 1900 and t != dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc):
                return {"datetime": t.strftime(TIME_FORMAT), "from": tag}
    return None


# --------------------------------------------------------------------------------------
# reading


#: libtiff's "row 4294967295, col 4294967295" (an unset position, -1 unsigned) says nothing to a user.
_UNSET_POSITION = re.compile(r" at row 4294967295, col 4294967295,")


def _describe(exc: BaseException) -> str:
    """The messages of an exception and its causes (rasterio's own message is often just
    "Read failed. See previous exception"; GDAL's detail is in the chain)."""
    parts: list[str] = []
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = _UNSET_POSITION.sub("", str(e).strip())
        if msg and "see previous exception" not in msg.lower() and not any(msg in q for q in parts):
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return "; ".join(parts) or type(exc).__name__


def open_quiet(path: Path | str, decode_threads: int = 1):
    # not catching_warnings: the scan threads of a scene being opened call this too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if decode_threads > 1:  # GDAL decodes the blocks of one read in parallel
            return rasterio.open(path, num_threads=str(decode_threads))
        return rasterio.open(path)


# --------------------------------------------------------------------------------------
# opening a scene


_NOT_REGULAR = "not a regular file (a FIFO, a device or a socket): not a GeoTIFF"


def _dead_link(f: Path) -> str:
    """Why the symbolic link ``f`` leads to no file: a loop, or nothing."""
    try:
        os.stat(f)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (the links lead back to themselves)"
    return "a link to nothing (a broken symbolic link)"


def _check_file(path: Path) -> None:
    p = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError("scene not found (no such file)", path=p) from None
    except OSError as exc:
        raise InputError(f"cannot access scene: {exc.strerror}", path=p) from None
    try:
        as_gdal_reads = p.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the file name is not valid UTF-8, which GDAL cannot open: rename the file",
                         path=p.encode("utf-8", "backslashreplace").decode()) from None
    if as_gdal_reads != os.fsencode(p):  # a non-UTF-8 locale: Python and GDAL spell the name in other bytes
        raise InputError(f"the file name is not ASCII, and this locale ({sys.getfilesystemencoding()}) is not "
                         "UTF-8, in which GDAL reads names: run under a UTF-8 locale (e.g. LC_ALL=C.UTF-8), or "
                         "rename the file", path=p)
    if path.is_dir():
        raise InputError(
            "is a directory, not a GeoTIFF (pass directories as inputs to be searched for "
            "*.tif / *.tiff)", path=p)
    if not stat.S_ISREG(st.st_mode):
        raise InputError(_NOT_REGULAR, path=p)
    if st.st_size == 0:
        raise InputError("empty file (0 bytes): not a GeoTIFF", path=p)
    try:
        with path.open("rb") as fh:
            head = fh.read(256)
    except PermissionError:
        raise InputError("cannot read scene: permission denied", path=p) from None
    except OSError as exc:
        raise InputError(f"cannot read scene: {exc.strerror}", path=p) from None
    if head[:4] not in _TIFF_MAGIC:
        what, kind = _looks_like(head) or (None, None)
        detail = f"it looks like {what}" if what else f"first bytes {head[:4]!r}"
        convert = f": make it one first, e.g. {_make_geotiff(path)}" + (_PHOTOS if kind == "image" else "")
        raise InputError(f"not a TIFF file ({detail}); tilescan reads GeoTIFFs{convert if kind else ''}", path=p)


_PHOTOS = ", if it is georeferenced (a photo without is for tilescan explain or train)"


def _make_geotiff(path: Path) -> str:
    """The command that makes a GeoTIFF, beside it, of a raster in another format at ``path``."""
    out = path.with_name(path.stem + ("-cog.tif" if path.suffix.lower() in TIFF_SUFFIXES else ".tif"))
    return f"gdal_translate -of COG {shlex.quote(str(path))} {shlex.quote(str(out))}"


# --------------------------------------------------------------------------------------
# finding scenes


def _named(f: Path) -> Path:
    """A scene's absolute path; a link to a file keeps its own name (a git-annex or DataLad
    file is a link to a content-named object), and names its output folder."""
    return f.parent.resolve() / f.name if f.is_symlink() else f.resolve()


def one_error(errors: Sequence[InputError]) -> InputError:
    """The error of inputs that all failed: the one, or the first naming how many more and why."""
    if len(errors) == 1:
        return errors[0]
    return InputError(f"{errors[0].message}; and {len(errors) - 1} more: " + "; ".join(map(str, errors[1:6]))
                      + ("; ..." if len(errors) > 6 else ""), path=errors[0].path)


def missing_input(p) -> InputError:
    """The error for an input that is not there; a pattern the shell would have expanded is named
    so, and a link to nothing as a folder search names it."""
    if Path(p).is_symlink():
        return InputError(_dead_link(Path(p)), path=str(p))
    if str(p).startswith("/vsi"):  # GDAL's archive and in-memory paths: not a network scene (vsi.is_remote)
        return InputError("GDAL's /vsi… paths other than the network ones (/vsicurl/, /vsis3/, …) are not read: "
                          "extract the GeoTIFF first (e.g. unzip) and name the file", path=str(p))
    pattern, bare = any(c in str(p) for c in "*?["), str(p).strip()
    if bare != str(p) and os.path.lexists(bare):
        return InputError(f"no such file or directory (the name begins or ends with a space; {bare} is there)", path=str(p))
    return InputError("no such file or directory" + (" (a pattern: tilescan takes files and folders, not patterns; "
                      "expand it with glob.glob() from Python)" if pattern else ""), path=str(p))


def _folder_id(path: Path) -> tuple[int, int] | None:
    """A folder's device and inode (the same through any link to it); None where it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _first_visit(path: Path, walked: set) -> bool:
    """Whether a search has not been in ``path`` yet (recorded now): a folder reached again
    through a link (a loop, or a second link) is searched once."""
    key = _folder_id(path)
    if key is None or key not in walked:
        walked.add(key)
        return True
    return False


def find_scenes(inputs: str | os.PathLike | Iterable[str | os.PathLike], unreadable: list | None = None,
                exclude: str | os.PathLike | None = None) -> list[Path]:
    """Scene paths from files and directories.

    Files are taken as given, whatever their extension (:func:`open_scene` rejects
    non-TIFFs with a clear error); directories are searched recursively for ``*.tif`` /
    ``*.tiff`` (any case), leaving out hidden folders (``.name``: tilescan's own staging, a
    ``.git``), macOS's ``._name.tif`` companions and tilescan's output folders (an OUT inside
    the input folder, :func:`~tilescan.layout.is_output_folder`). The result is absolute,
    sorted and free of duplicates; a link to a file keeps its name (:func:`_named`); a linked folder
    is searched as the folder it links to, once (a loop of links ends).
    Raises :class:`InputError` for a path that does not exist and
    :class:`NoScenesError` when nothing is found. A subfolder that cannot be read and a
    ``*.tif`` link to nothing are errors of their own, put in ``unreadable`` (given), else raised.
    ``exclude``: a folder never searched (the run's OUT, even where its run.json files are damaged).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[Path, None] = {}
    searched: list[str] = []
    errors: list[InputError] = []
    others: list[Path] = []  # rasters of other formats the searches met, for the message when none is a TIFF
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            searched.append(str(p))
            walk = os.walk(p, followlinks=True, onerror=lambda e: errors.append(  # each named absolute, as scenes are
                InputError(f"cannot list this folder: {e.strerror}", path=os.path.abspath(e.filename))))
            walked = {_folder_id(p), *([_folder_id(Path(exclude))] if exclude is not None else [])}  # OUT: never searched
            for root, dirs, files in walk:
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_output_folder(Path(root, d))
                                 and _first_visit(Path(root, d), walked))  # a linked folder once, and no loop
                for name in sorted(files):  # errors in name order too
                    if name.lower().endswith(_OTHER_RASTERS) and len(others) < 3:
                        others.append(Path(root, name))
                    if name.lower().endswith(TIFF_SUFFIXES) and not name.startswith("._"):
                        f = Path(os.path.abspath(root), name)
                        if f.is_file():
                            found[_named(f)] = None
                        elif f.exists():  # a FIFO, device or socket so named: never read (a FIFO would block)
                            errors.append(InputError(_NOT_REGULAR, path=str(f)))
                        elif f.is_symlink():
                            errors.append(InputError(_dead_link(f), path=str(f)))
        elif p.exists():
            found[_named(p)] = None
        else:
            raise missing_input(p)
    if errors and (unreadable is None or not found):
        raise one_error(errors)
    if unreadable is not None:
        unreadable.extend(errors)
    if not found:
        if searched:
            raise NoScenesError("no *.tif / *.tiff scenes found in " + ", ".join(searched) + (
                f" (rasters of other formats are there, e.g. {', '.join(map(str, others))}: tilescan reads GeoTIFFs; "
                f"make them ones first, e.g. {_make_geotiff(others[0])}{_PHOTOS})" if others else ""))
        raise NoScenesError("no scenes given")
    return sorted(found)
