"""Opening a scene for a run: band choice, tile size from the model's scale, band stretch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import TilingConfig
from ..config_values import nodata_setting, scaling_mode
from ..errors import ConfigError, InputError
from .grid import MAX_TILE_PX, TileGrid, TilingPlan, _metres, scale_side, within_scale
from .info import SceneInfo, _check_file, _describe, _nodata_in_dtype, open_quiet, _scene_info, tiling_warning, warn_big_strips
from .decimate import decimated_shape
from .reader import STATS_MAX_SIZE, STATS_SAMPLE_PIXELS, SceneReader, _scan
from .bands import _pick_bands, check_band_count


def _in_range_reason(size: int, gsd: float, model_scale: tuple[float, float], input_size: int) -> str:
    """Why ``units = "auto"`` keeps tiles of ``size`` pixels on a scene inside the model's range,
    and, when the size the user chose takes the input pixel out of it, that too."""
    lo, hi = model_scale
    reason = (f"tiles of {size} scene pixels: the scene's {gsd:.3g} m/px is inside the "
              f"model's range ({lo:.3g}–{hi:.3g} m per input pixel)")
    want = gsd * size / input_size
    if not within_scale(want, lo, hi):
        reason += (f", but {size}-px tiles give {want:.3g} m per input pixel, outside it; kept "
                   f"as configured ({input_size}-px tiles keep the scene's scale)")
    return reason


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
    _warn_unsquare(p, info)
    units, scale = "px", "forced"
    if cfg.resample_to_gsd and model_gsd_m is None:
        tiling_warning(f"{p}: [tiling] resample_to_gsd is set but the model declares no native "
                      "GSD; tiles are not resampled", stacklevel=3)
    if cfg.resample_to_gsd and model_gsd_m is not None:
        if gsd is None:
            raise InputError("[tiling] resample_to_gsd needs a georeferenced scene with a "
                             "known ground sample distance; this one has none", path=p)
        tile_px = round(input_size * model_gsd_m / gsd)
        stride_px = round(tile_px * stride / size)
        how = (f"(model GSD {model_gsd_m:g} m x {input_size} px, scene GSD {gsd:.4g} m; "
               "turn off [tiling] resample_to_gsd)")
        units, reason = "m", f"resample_to_gsd: tiles of {input_size} model pixels at {model_gsd_m:g} m"
        _warn_upsampled(p, gsd, model_gsd_m)
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
                side = scale_side(gsd, lo, hi)
                if side == "finer":  # finer than the model: tiles of `size` pixels at its finest scale
                    tile_px = math.ceil(size * lo / gsd - 1e-9)  # up: the input pixel stays >= lo
                    stride_px = round(tile_px * stride / size)
                    units = "m"
                    reason = (f"scene at {gsd:.3g} m/px is finer than the model's range "
                              f"({lo:.3g}–{hi:.3g} m per input pixel): tiles of {_metres(tile_px * gsd)} "
                              f"({tile_px} px) resampled to {input_size} px")
                    how = f"(the model's finest scale {lo:.3g} m per input pixel at {gsd:.4g} m/px; use --units px)"
                elif side == "coarser":
                    reason = (f"scene at {_metres(gsd)} per pixel is coarser than the model's range "
                              f"({lo:.3g}–{hi:.3g} m per input pixel): no tiling reaches it; "
                              f"tiles of {size} scene pixels")
                else:
                    reason = _in_range_reason(size, gsd, model_scale, input_size)
                scale = "auto"
    if tile_px < 1:
        raise InputError(f"tiles would be smaller than one pixel {how}", path=p)
    if tile_px > MAX_TILE_PX:
        raise InputError(f"tiles would be {tile_px} px wide, above the {MAX_TILE_PX} px limit "
                         f"{how or '(' + cfg.origin('tile_size') + ')'}: give a smaller tile size", path=p)
    stride_px = min(max(1, stride_px), tile_px)
    input_gsd = gsd * tile_px / input_size if gsd is not None else None
    scale = _scale_check(p, scale, units, cfg, tile_px, input_size, gsd, input_gsd, model_scale)
    return TilingPlan(tile_px, stride_px, units, reason, scale, gsd, input_gsd,
                      None if gsd is None else gsd * tile_px, model_scale, input_size)


def _scale_check(p: str, scale: str, units: str, cfg: TilingConfig, tile_px: int, input_size: int, gsd: float | None,
                 input_gsd: float | None, model_scale: tuple[float, float] | None) -> str:
    """The plan's ``scale`` once its tile size is known ("auto"/"forced" as :func:`_tile_geometry`
    chose; else as it is), after a warning for pixel tiles enlarged more than 2x."""
    if scale in ("auto", "forced") and model_scale is not None and input_gsd is not None:
        # a tile enlarged to the input holds no finer detail than the scene's own pixels
        scale = (scale_side(max(input_gsd, gsd), *model_scale) or scale_side(input_gsd, *model_scale)
                 or ("resampled" if units == "m" and cfg.units == "auto" else "in_range"))
    elif scale == "auto":
        scale = "unchecked"
    if input_gsd is not None and tile_px * 2 < input_size and not cfg.resample_to_gsd and scale != "coarser":
        # (resample_to_gsd warns on its own, and a coarser scene's scale warning says it)
        tiling_warning(f"{p}: its {tile_px}-px tiles are enlarged {input_size / tile_px:.3g}x to the model's {input_size} px: "
                       f"the model sees the detail of {gsd:.3g} m pixels at {input_gsd:.3g} m per input pixel, which it "
                       "was not trained on; larger tiles read the scene at its own detail", stacklevel=4,
                       code="upsampled", factor=round(input_size / tile_px, 3))
    return scale


#: The ground aspect ratios tilescan's training crops span (training/data.py: 3/4 to 4/3).
TRAINED_ASPECT = 4 / 3


def _warn_unsquare(path: str, info: SceneInfo) -> None:
    """Pixels whose ground height and width differ more than the model saw in training: square
    degrees of a geographic CRS away from the equator, above all."""
    a = info.pixel_aspect
    if a is None or 1 / TRAINED_ASPECT <= a <= TRAINED_ASPECT:
        return
    t = info.transform
    square = math.isclose(math.hypot(t.a, t.d), math.hypot(t.b, t.e), rel_tol=0.01)  # in the CRS's units
    degrees = info.crs is not None and info.crs.is_geographic
    why = (" (its CRS counts pixels in degrees, and a degree of longitude shrinks away from the equator)" if degrees
           else " (its CRS stretches the ground there)" if square else "")
    fix = ("reproject it to a conformal projected CRS with square pixels first (e.g. gdalwarp -t_srs EPSG:<UTM zone>)"
           if square else "resample it to square pixels first (e.g. gdalwarp -tr SIZE SIZE, SIZE the finer of its pixel sides)")
    tiling_warning(f"{path}: its pixels are {max(a, 1 / a):.2f}x as long on the ground "
                   f"{'north-south as east-west' if a > 1 else 'east-west as north-south'}{why}, so each tile shows "
                   f"the ground squeezed beyond the 4:3 the model was trained on; its labels may suffer: {fix}",
                   stacklevel=4, code="unsquare_pixels", pixel_aspect=round(a, 3))


def _warn_upsampled(path: str, gsd: float, model_gsd_m: float) -> None:
    """resample_to_gsd blowing a scene up more than 2x: the model's pixel size, not its detail."""
    if gsd > 2 * model_gsd_m:
        tiling_warning(f"{path}: [tiling] resample_to_gsd enlarges the scene {gsd / model_gsd_m:.2f}x, from {gsd:.3g} m "
                       f"to the model's {model_gsd_m:g} m per pixel: its tiles have the model's pixel size but "
                       f"the detail of {gsd:.3g} m pixels, which the model was not trained on; without "
                       "resample_to_gsd the default tiling (--units auto) reads the scene at its own scale "
                       "where the model's range allows", stacklevel=4, code="upsampled", factor=round(gsd / model_gsd_m, 3))


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
        tiling_warning(
            f"{reader.info.path}: nodata value {values[0] if len(values) == 1 else values} "
            f"also occurs in valid data: {partial:.1%} of sampled pixels have it in some bands "
            "but not all; those pixels are treated as nodata (if they are data, run with --nodata none "
            "or another value, or fix the file's nodata, e.g. gdal_edit.py -unsetnodata or -a_nodata)",
            stacklevel=4)


#: Share of sampled pixels at 0 in every model band above which a scene that declares no
#: nodata, mask or alpha is suspected of a fill border (a Landsat scene's collar, say).
UNDECLARED_FILL_FRACTION = 0.01


#: Magnitude beyond which a float scene's value is taken for fill (ArcGIS' -3.4028235e38,
#: float64's -1.797e308), never a measurement.
EXTREME_FILL = 1e30


def _fill_candidates(data: np.ndarray, least: float):
    """``(value, pixels)`` of the fills a scene may hold undeclared, where the first band has
    more than ``least`` of them: 0 in every band, and for a float scene one value of magnitude
    >= :data:`EXTREME_FILL` in every band (its most common)."""
    zero = data[0] == 0
    if np.count_nonzero(zero) > least:  # the usual answer, from one band
        for band in data[1:]:
            zero &= band == 0
        yield 0, zero
    if np.issubdtype(data.dtype, np.floating):
        extreme = np.abs(data[0]) >= EXTREME_FILL
        if np.count_nonzero(extreme) > least:
            values, counts = np.unique(data[0][extreme], return_counts=True)
            value = values[np.argmax(counts)]
            yield value.item(), np.all(data == value, axis=0)


def _hint_undeclared_fill(reader: SceneReader, data: np.ndarray, valid: np.ndarray) -> None:
    """Warn when a scene that declares no nodata, mask or alpha holds 0 in every band over a
    share of its sample (or, in a float scene, one huge value such as -3.4e38): such pixels
    are classified and stretched as data, and a fill border would then get labels of its own
    and darken the stretch of the rest (a huge one leaves no stretch at all)."""
    if (reader.info.nodata_from != "file" or reader._alpha or reader.internal_mask
            or any(nd is not None for nd in reader._nodata) or not valid.size):
        return
    for value, fill in _fill_candidates(data, UNDECLARED_FILL_FRACTION * valid.size):
        share = np.count_nonzero(fill & valid) / valid.size
        if share > UNDECLARED_FILL_FRACTION:
            said = "0" if value == 0 else str(data.dtype.type(value))  # as the file holds it: -3.4028235e+38
            tiling_warning(
                f"{reader.info.path}: {share:.1%} of sampled pixels are {said} in every band and the file declares "
                "no nodata, so they are classified and stretched as data; if they are fill, run with "
                f"--nodata {said} ([tiling] nodata = {said})", stacklevel=4, code="undeclared_fill",
                fill_value=float(value), **{"zero_share" if value == 0 else "fill_share": round(share, 4)})
            return


def _warn_range_misses(reader: SceneReader, cfg: TilingConfig, data: np.ndarray, valid: np.ndarray,
                       pairs: Sequence[tuple[float, float]]) -> None:
    """Warn when ``value_range`` holds under half of a band's sampled values: the rest stretch to
    0 or 1 (a range in reflectance over a file that stores scaled integers, or another sensor's)."""
    for i, (lo, hi) in enumerate(pairs):
        vals = data[i][valid]
        held = np.count_nonzero((vals >= lo) & (vals <= hi)) / max(vals.size, 1)
        if vals.size and held < 0.5:
            band, (low, high) = reader.bands[i], np.percentile(vals, [2, 98])
            ds = reader._ds()
            scale, offset = ds.scales[band - 1], ds.offsets[band - 1]
            declared = (f"; the file declares scale {scale:g} and offset {offset:g}, which tilescan does not apply: "
                        "value_range is in the values as stored") if (scale, offset) != (1.0, 0.0) else ""
            tiling_warning(f"{reader.info.path}: {cfg.origin('value_range')} holds {held:.0%} of band {band}'s sampled "
                           f"values (2nd-98th percentile {low:g} to {high:g}{declared}), so the rest stretch to 0 or 1 "
                           "and the labels mean little: give the range in the file's values", stacklevel=4,
                           code="value_range_misses", band=int(band), held=round(held, 4))
            return


def fill_note(details: Sequence[dict]) -> str | None:
    """What the quicklook says under its legend when :func:`_hint_undeclared_fill` warned (from
    the unit's structured warnings, without the path); None when it did not."""
    for d in details:
        if d["code"] == "undeclared_fill":
            value, share = d.get("fill_value", 0), d.get("zero_share", d.get("fill_share"))
            said = repr(float(value)) if value else "0"  # exact: what --nodata needs
            return (f"{share:.1%} of the sampled pixels are {said} in every band and the file declares no "
                    f"nodata, so they are labelled as data; if they are fill, run with --nodata {said}")
    return None


def _compute_scale(reader: SceneReader, cfg: TilingConfig) -> list[tuple[float, float]]:
    """Per model band ``(lo, hi)`` from a sample of the scene: the decimated read, or on a
    large scene without overviews whole blocks spread over it (``STATS_SAMPLE_PIXELS``).

    Also serves as the up-front corrupt/truncated check: both samples touch blocks across
    the whole scene, the last one included. (A damaged block elsewhere fails when its tile
    is read, naming the tile; the job's staging keeps nothing of that scene.)
    """
    dtype = np.dtype(reader.info.dtype)
    mode = scaling_mode(cfg.scaling, dtype)
    n = len(reader.bands)
    H, W = reader.info.height, reader.info.width
    shape = decimated_shape(H, W, STATS_MAX_SIZE)
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
        tiling_warning(f"{reader.info.path}: no valid pixel found: all {cov.n_blocks} blocks of the "
                      "scene are empty (not stored, or nodata / masked; all nodata?)", stacklevel=3)
    elif not valid.any():
        tiling_warning(f"{reader.info.path}: no valid pixel found in a sample of {valid.size} pixels "
                      "spread over the scene (all nodata?)", stacklevel=3)
    _warn_nodata_collision(reader, data)
    _hint_undeclared_fill(reader, data, valid)
    if mode == "none":
        return [(0.0, 1.0)] * n
    if mode == "range":  # the user's stretch, the same for every scene
        check_band_count(cfg, n)
        pairs = list(zip(cfg.value_range[::2], cfg.value_range[1::2]))
        pairs = pairs * n if len(pairs) == 1 else pairs
        _warn_range_misses(reader, cfg, data, valid, pairs)
        return pairs
    if mode == "dtype":
        if np.issubdtype(dtype, np.integer):
            return [(0.0, float(np.iinfo(dtype).max))] * n
        return [(0.0, 1.0)] * n
    lo_q, hi_q = cfg.percentiles
    every = bool(valid.all())  # then no masked copy of each band

    def band(i: int) -> tuple[float, float]:
        vals = data[i] if every else data[i][valid]
        if vals.size == 0:
            lo, hi = (0.0, float(np.iinfo(dtype).max)) if np.issubdtype(dtype, np.integer) else (0.0, 1.0)
        else:
            lo, hi = (float(v) for v in _percentiles(vals, (lo_q, hi_q)))
        if not hi > lo:
            hi = lo + 1.0
        return lo, hi

    # a large sample's bands side by side (numpy counts and sorts without the GIL)
    return _scan(band, range(n)) if valid.size >= 2**20 and n > 1 else [band(i) for i in range(n)]


_COUNT_CHUNK = 2**20  # values counted at once by _percentiles (8 MB of intp)


def _percentiles(vals: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.percentile(vals, q)``, the same floats: for 8- and 16-bit integers the order
    statistics come from a histogram (one counting pass instead of a partition) and numpy's
    own interpolation is applied to them; other dtypes go to ``np.percentile``."""
    vals = np.asarray(vals).ravel()
    if vals.dtype not in (np.uint8, np.uint16, np.int8, np.int16) or vals.size < 2:
        return np.percentile(vals, q)
    try:  # numpy's private steps of method "linear", so the floats are numpy's exactly
        from numpy.lib import _function_base_impl as fb
        linear = fb._QuantileMethods["linear"]
        qs = np.true_divide(np.asanyarray(q, dtype=np.float64), 100)
        vi = np.asanyarray(linear["get_virtual_index"](vals.size, qs))
        prev_i, next_i = fb._get_indexes(vals, vi, vals.size)
        gamma = fb._get_gamma(vi, prev_i, linear)
    except (ImportError, AttributeError, KeyError, TypeError):  # another numpy: its own percentile
        return np.percentile(vals, q)
    info = np.iinfo(vals.dtype)
    n_values = info.max - info.min + 1
    counts = np.zeros(n_values, np.int64)
    for i in range(0, vals.size, _COUNT_CHUNK):  # bincount copies its input to intp: a chunk at a time
        part = vals[i:i + _COUNT_CHUNK]
        counts += np.bincount(part.astype(np.int32) - info.min if info.min else part, minlength=n_values)
    np.cumsum(counts, out=counts)
    ranks = np.concatenate([prev_i, next_i]) % vals.size  # numpy's -1 means the last
    at = (np.searchsorted(counts, ranks, side="right") + info.min).astype(vals.dtype)
    return fb._lerp(at[:len(prev_i)], at[len(prev_i):], gamma)


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
    _check_model_args(model_bands, input_size, model_gsd_m, model_scale)
    path, ds = _open_dataset(path)
    reader = None
    try:
        info = _declared_nodata(_checked_info(path, ds, cfg), cfg)
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
        if not (np.isfinite(reader._lo).all() and np.isfinite(reader._inv).all()):  # NaN inputs, labels of nothing
            lo_hi = ", ".join(f"{lo:.4g}..{hi:.4g}" for lo, hi in reader.scale)
            fill = next((v for b in reader.scale for v in b if abs(v) >= EXTREME_FILL), None)
            raise InputError(f"its stretch ({lo_hi} per band) cannot be applied in float32: " + (
                f"if {fill!r} is fill, run with --nodata {fill!r}" if fill is not None
                else "its values' range is too narrow for it (rescale the file)"), path=str(path))
        return reader
    except BaseException:
        if reader is not None:
            reader.close()
        else:
            ds.close()
        raise


def _check_model_args(model_bands: int, input_size: int, model_gsd_m: float | None,
                      model_scale: Sequence[float] | None) -> None:
    """Refuse model properties no model can have (a caller's bug, not a user's input)."""
    if model_bands < 1 or input_size < 1:
        raise ValueError(f"model_bands and input_size must be >= 1, got {model_bands}, {input_size}")
    if model_gsd_m is not None and not model_gsd_m > 0:
        raise ValueError(f"model_gsd_m must be > 0, got {model_gsd_m}")
    if model_scale is not None and not 0 < model_scale[0] <= model_scale[1]:
        raise ValueError(f"model_scale must be (lo, hi) with 0 < lo <= hi, got {model_scale}")


def _quiet_look(path, look):
    """``look(info)`` of the scene at ``path``, its warnings not said (this only compares
    settings); None where the scene cannot be opened, whose run says what is wrong."""
    from .info import collecting_tiling_warnings

    try:
        path, ds = _open_dataset(path)
        with ds, collecting_tiling_warnings():
            return look(_scene_info(path, ds))
    except Exception:  # noqa: BLE001 - the run's own open says what is wrong with the scene
        return None


def auto_bands(path, cfg: TilingConfig, model_bands: int, model_band_names: Sequence[str] | None) -> list[int] | None:
    """The scene bands ``open_scene`` picks with no bands given, or None where the scene cannot be opened."""
    return _quiet_look(path, lambda info: _pick_bands(info, dataclasses.replace(cfg, bands=()), model_bands,
                                                      model_band_names))


def tile_sizes(path, cfg: TilingConfig, input_size: int, model_gsd_m: float | None,
               model_scale: Sequence[float] | None) -> tuple[int, int] | None:
    """The tile and stride in scene pixels ``open_scene`` would choose, or None where the scene cannot be opened."""
    def sizes(info: SceneInfo) -> tuple[int, int]:
        plan = _tile_geometry(info, cfg, input_size, model_gsd_m,
                              None if model_scale is None else (float(model_scale[0]), float(model_scale[1])))
        return plan.tile_px, plan.stride_px

    return _quiet_look(path, sizes)


def check_scene_file(path) -> None:
    """The cheap checks opening a local scene makes first (there, a readable regular file, a
    TIFF by its first bytes); a remote scene is checked as it is opened."""
    if not getattr(path, "remote", False):
        _check_file(Path(path))


def _open_dataset(path):
    """The scene's path (a Path, or the remote scene itself) and its open rasterio dataset."""
    remote = getattr(path, "remote", False)  # a URL or STAC item: tilescan.scene.sources
    path = path if remote else Path(path)
    if remote:
        return path, path.open()  # InputError naming the URL (without credentials) and the cause
    _check_file(path)
    try:
        return path, open_quiet(path)
    except Exception as exc:
        raise InputError(f"corrupt or truncated TIFF (GDAL cannot open it): {_describe(exc)}",
                         path=str(path)) from exc


def _checked_info(path, ds, cfg: TilingConfig) -> SceneInfo:
    """The scene's :class:`SceneInfo`, after refusing a scene without pixels, bands, a readable
    pixel type or (unless ``cfg.allow_pixel_space``) georeferencing."""
    p = str(path)
    if ds.width < 1 or ds.height < 1:
        raise InputError(f"scene has no pixels ({ds.width}x{ds.height})", path=p)
    if ds.count < 1:
        raise InputError("scene has no bands", path=p)
    try:
        kind = np.dtype(ds.dtypes[0]).kind
    except TypeError:  # a GDAL type numpy has no name for (complex_int16: SAR's CInt16)
        kind = "c"
    if kind not in "uif":
        raise InputError(f"unsupported pixel type {ds.dtypes[0]} (tilescan reads integer "
                         "and floating-point rasters)", path=p)
    t = ds.transform
    if t.a * t.e - t.b * t.d == 0:  # every pixel at one point, or on one line
        raise InputError(f"its geotransform is singular (pixel size {t.a:g} x {t.e:g}, rotation {t.b:g}, {t.d:g}): "
                         "its pixels have no extent; fix it (e.g. gdal_edit.py -a_ullr ULX ULY LRX LRY)", path=p)
    info = _scene_info(path, ds)
    if not info.georeferenced:
        _allow_pixel_space(p, ds, cfg)
    bh, bw = ds.block_shapes[0]
    if bw >= ds.width and bh > 1:  # strips as stored; one GDAL shows cut into rows reads near tiled speed
        warn_big_strips(p, ds, bh)
    return info


def _declared_nodata(info: SceneInfo, cfg: TilingConfig) -> SceneInfo:
    """``info`` with the nodata of ``cfg.nodata`` in place of the file's on every band (as if
    the file declared it), or unchanged for ``file``; a number no pixel of the scene's type
    can hold is refused, naming the setting and the file."""
    replace, value = nodata_setting(cfg.nodata)
    if not replace:
        return info
    dtype = np.dtype(info.dtype)
    if value is not None and (value := _nodata_in_dtype(value, dtype)) is None:
        span = f" ({np.iinfo(dtype).min}..{np.iinfo(dtype).max})" if dtype.kind in "iu" else ""
        raise ConfigError(f"{cfg.origin('nodata')}: no pixel of this {dtype} scene{span} can hold that value",
                          path=str(info.path))
    return dataclasses.replace(info, nodata=value, nodatavals=(value,) * info.count, nodata_from=cfg.origin("nodata"))


def _allow_pixel_space(p: str, ds, cfg: TilingConfig) -> None:
    """Refuse a scene that is not georeferenced, or warn that it is processed in pixel space."""
    if ds.crs is None and ds.transform.is_identity:
        what = "has no CRS and no geotransform"
    elif ds.crs is None:
        what = "has no CRS"
    else:
        what = "has no geotransform"
    if ds.gcps[0]:
        what += " (it has ground control points: warp it first, e.g. with gdalwarp)"
    elif ds.rpcs:
        what += " (it has RPCs: orthorectify it first, e.g. gdalwarp -rpc -to RPC_DEM=dem.tif in.tif out.tif)"
    if not cfg.allow_pixel_space:
        raise InputError(
            f"scene {what}; pass --allow-pixel-space (allow_pixel_space = true in "
            "[tiling]) to process it anyway (outputs will not be georeferenced)", path=p)
    where = ("in pixel coordinates (x = column, y = row)" if ds.transform.is_identity
             else "in the units of its geotransform")
    tiling_warning(f"{p}: scene {what}; processing it {where}, outputs carry no CRS "
                  "(allow_pixel_space = true)", stacklevel=4)  # points at open_scene's caller
