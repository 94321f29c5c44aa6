"""Cloud-optimised GeoTIFF output: the label raster and the COG profile shared with the heatmap.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from . import oneblock
from .files import _dumps, atomic_output
from .geometry import _rasterio_crs
from .palette import colors_for

LABEL_NODATA = 255


HEATMAP_NODATA = -1.0


_COMPRESSIONS = ("deflate", "zstd", "lzw", "lzma", "packbits", "raw")


_PREDICTOR_OK = ("deflate", "zstd", "lzw", "lzma")


def _compression(compress: str) -> str:
    """``[output] compress`` as rio-cogeo names it ("none" -> "raw"); ValueError if unknown."""
    compress = "raw" if compress.lower() == "none" else compress.lower()
    if compress not in _COMPRESSIONS:
        raise ValueError(f"unsupported compression {compress!r}; choose one of {', '.join(_COMPRESSIONS)}")
    return compress


# --------------------------------------------------------------------------- label COG

#: Block size of the COGs written, in pixels.
COG_BLOCK = 512


def _cog_block(width: int, height: int) -> int:
    """The COG's block size: :data:`COG_BLOCK`, or for a raster that fits one such block the
    smallest power of two (16 at least, as TIFF tiles must be) that holds it; a one-block
    file then compresses its pixels, not a block of padding around them."""
    side = max(int(width), int(height), 16)
    return COG_BLOCK if side > COG_BLOCK else 1 << (side - 1).bit_length()


class _SmallBlockNotice(logging.Filter):
    """Drops GDAL's notice that a COG block under 128 px is unusual: :func:`_cog_block` asks for
    one on purpose (a raster that fits one small block), GDAL writes it, and the notice would
    only reach a Python caller's log as a warning about nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "for BLOCKSIZE creation option that should be >= 128" not in record.getMessage()


logging.getLogger("rasterio._env").addFilter(_SmallBlockNotice())


def _cog_copy(src: Any, dst: str | os.PathLike, compress: str, resampling: str, overviews: int,
              size: tuple[int, int]) -> None:
    """Copy a tiled GeoTIFF (a path or an open dataset) to a COG with GDAL's COG driver in one
    pass: blocks of :func:`_cog_block`, ``compress`` with the predictor (floating-point for
    floats), ``overviews`` levels built with ``resampling`` (nodata-aware), tags, nodata and
    band descriptions carried over.
    Sparse: blocks all at nodata are not written (nor encoded), in the image and overviews.
    Overviews are built through a temporary file beside ``dst``, so memory stays small
    whatever the raster size; rio-cogeo's ``cog_translate`` encodes the data twice, so this is
    faster (benchmarks/README.md). ``overviews`` -1: copy the source's own overviews instead
    (a VRT listing them). ``size`` is the raster's (width, height); one that fits one
    block is compressed on this thread (GDAL's worker threads would only add the hand-over)."""
    import rasterio
    import rasterio.shutil

    compress = _compression(compress)
    one_block = max(size) <= COG_BLOCK
    opts = dict(COMPRESS="NONE" if compress == "raw" else compress.upper(), BLOCKSIZE=str(_cog_block(*size)),
                BIGTIFF="IF_SAFER", NUM_THREADS="1" if one_block else "ALL_CPUS", OVERVIEW_RESAMPLING=resampling.upper(),
                SPARSE_OK="TRUE")
    if compress in _PREDICTOR_OK:
        opts["PREDICTOR"] = "YES"
    if compress in ("deflate", "zstd"):  # the fastest level: written once per scene, at its end
        opts["LEVEL"] = "1"
    env = contextlib.nullcontext()
    if overviews > 0:
        opts["OVERVIEW_COUNT"] = str(overviews)
        # GDAL computes the overviews into a temporary GeoTIFF, ZSTD or LZW by default. PackBits
        # costs almost nothing to write and read back, and a compressed file keeps GDAL on the
        # same overview path (each level from full resolution): the same bytes, less CPU, for
        # a temporary file about as large as the overviews' raw pixels
        env = rasterio.Env(COG_TMP_COMPRESSION="PACKBITS")
    elif overviews < 0:
        opts["OVERVIEWS"] = "FORCE_USE_EXISTING"
    else:
        opts["OVERVIEWS"] = "NONE"
    with env:
        rasterio.shutil.copy(src if hasattr(src, "read") else str(src), str(dst), driver="COG", **opts)


def write_cog(tmp: str | os.PathLike, data: np.ndarray, gdal_write: Callable[[], None], *, transform: Affine,
              crs: Any, nodata: float, tags: Mapping[str, str], description: str, compress: str,
              colormap: tuple = ()) -> None:
    """Write the COG of the 2-D ``data`` at ``tmp``: ``gdal_write()`` writes it with GDAL; a
    raster that fits one block (no overviews) is put together by :mod:`.oneblock` once GDAL
    has written one of its kind (``crs`` a rasterio CRS or None)."""
    h, w = data.shape
    if max(w, h) > COG_BLOCK:
        gdal_write()
        return
    oneblock.write(tmp, data, transform=transform, crs_key=crs.to_wkt() if crs is not None else "", nodata=nodata,
                   tags=tags, description=description, colormap=colormap, compress=_compression(compress),
                   block=_cog_block(w, h), gdal_write=gdal_write)


def _overview_level(width: int, height: int, block: int = 512) -> int:
    """Number of 2x overview levels: until the longer side fits one block (rio-cogeo's own
    rule looks at the shorter side, which leaves long thin rasters without overviews)."""
    level = 0
    while max(width, height) > block * 2**level and min(width, height) >= 2 ** (level + 1):
        level += 1
    return level


@functools.lru_cache(maxsize=16)
def _aux_xml(classes: tuple[str, ...], colors: tuple[tuple[int, int, int], ...]) -> str:
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
                     tags: Mapping[str, Any] | None = None, colors: Sequence[Sequence[int]] | None = None) -> Path:
    """Write the tile class grid as a paletted uint8 Cloud-Optimized GeoTIFF.

    ``labels`` is ``(n_rows, n_cols)`` with class indexes, ``-1`` for skipped tiles (written
    as nodata 255). ``grid_transform`` maps grid cells (one per stride step) to the scene
    CRS. The file gets a colour table (``colors``, one per class, else the palette: :func:`~tilescan.outputs.palette.colors_for`; nodata transparent), band
    description ``class``, tags ``CLASS_NAMES`` (JSON list) and ``CLASS_<i>=<name>``,
    nearest-neighbour overviews, and a sidecar ``<path>.aux.xml`` holding GDAL category
    names and a raster attribute table (GDAL keeps these only in PAM sidecars for GeoTIFF),
    so QGIS shows class names and colours without styling. Both files are atomic; the
    sidecar is renamed into place just before the raster.
    """
    classes = [str(c) for c in classes]
    arr = np.asarray(labels)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"labels must be a non-empty 2-D grid, got shape {arr.shape}")
    if len(classes) > LABEL_NODATA:
        raise ValueError(f"a uint8 label raster holds at most {LABEL_NODATA} classes, got {len(classes)}")
    if arr.size and (arr.min() < -1 or arr.max() >= len(classes)):
        raise ValueError(f"labels must be -1 or a class index below {len(classes)}")
    data = np.where(arr < 0, LABEL_NODATA, arr).astype(np.uint8)
    colors = colors_for(len(classes), colors)
    cmap = {i: (*rgb, 255) for i, rgb in enumerate(colors)}
    cmap[LABEL_NODATA] = (0, 0, 0, 0)
    all_tags = {"CLASS_NAMES": _dumps(classes)}
    all_tags.update({f"CLASS_{i}": c for i, c in enumerate(classes)})
    all_tags.update({str(k): v if isinstance(v, str) else _dumps(v) for k, v in (tags or {}).items()})

    rio_crs = _rasterio_crs(crs)
    profile = dict(driver="GTiff", dtype="uint8", count=1, height=data.shape[0], width=data.shape[1],
                   crs=rio_crs, transform=grid_transform, nodata=LABEL_NODATA)
    aux_path = Path(str(path) + ".aux.xml")
    size = (data.shape[1], data.shape[0])
    with atomic_output(path) as tmp:
        def gdal_write() -> None:
            with MemoryFile() as mem:
                with mem.open(**profile) as dst:
                    dst.write_colormap(1, cmap)  # before the pixels: GDAL sets the palette's tag only then
                    dst.write(data, 1)
                    dst.set_band_description(1, "class")
                    dst.update_tags(**all_tags)
                    # copied while open: GDAL's COG driver takes colour table, tags and description
                    # along, and the CRS as it was set (reopening would parse it from GeoKeys again)
                    _cog_copy(dst, tmp, compress, "nearest", _overview_level(*size), size)

        write_cog(tmp, data, gdal_write, transform=grid_transform, crs=rio_crs, nodata=LABEL_NODATA, tags=all_tags,
                  description="class", colormap=tuple(sorted(cmap.items())), compress=compress)
        with atomic_output(aux_path) as tmp_aux:
            tmp_aux.write_text(_aux_xml(tuple(classes), tuple(map(tuple, colors))), encoding="utf-8")  # one per legend
    return Path(path)
