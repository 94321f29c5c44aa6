"""``tilescan collect OUT``: join the per-scene and per-shard tables into one dataset.

A run (or the shards of a sharded run) leaves one folder per *unit* under ``OUT``: a whole
scene in ``OUT/<scene>/``, or a band of tile rows in ``OUT/<scene>/rows-AAAAA-BBBBB/``, each
with ``tiles.parquet`` and a ``run.json`` written last. ``collect`` reads only finished units
(a complete ``run.json``; hidden folders such as ``.tilescan-staging`` are never read) and
writes, into ``OUT/collected/``:

``tiles.parquet``
    One GeoParquet 1.1 file with every tile of every scene, one row per tile, sorted by
    ``(scene, tile_index)``; a large one (over ``spatial.SORT_MIN_ROWS`` rows) along a Hilbert
    curve through the footprint centres instead, in row groups a bbox query can skip
    (:mod:`tilescan.outputs.spatial`). Scenes may come in different CRSs, and a GeoParquet geometry
    column has one CRS, so footprints are reprojected to longitude/latitude (``OGC:CRS84``,
    i.e. WGS 84 in x=lon, y=lat order; corners are transformed exactly, edges are not
    densified -- tiles are small; a footprint across 180° is cut there into a MultiPolygon,
    as RFC 7946 has it, and longitudes of 0..360 data come back in -180..180). The exact footprint in the scene's own CRS is kept as WKB
    in ``geometry_native`` with that CRS in ``crs`` (an authority code or WKT), so nothing
    is lost. Columns: ``scene`` (the scene's folder name under OUT, unique per scene),
    ``unit`` (the unit folder, e.g. ``cogeo/rows-00000-00003``), ``scene_file``,
    ``scene_path``, ``scale_check`` (the unit's ``tiling.scale`` from its run.json: ``coarser``
    where its labels are not meaningful), the per-scene columns (``tile_index``, ``row``, ``col``, pixel window,
    ``valid_fraction``, ``label``, ``class_index``, ``confidence``, ``probabilities``, CAM
    statistics), ``crs``, ``area_m2`` (geodesic area of the footprint on the WGS 84
    ellipsoid), ``valid_area_m2`` (``area_m2 * valid_fraction``; of a footprint cut short of its
    pixel window, at ±180° or a disc's edge, the share of it that is data), ``geometry``, ``bbox``
    (covering column), ``geometry_native``. Scenes without georeferencing (processed with
    ``allow_pixel_space``) get a null geometry and area.
``tiles.gpkg``
    The same rows as a GeoPackage 1.2 layer ``tiles`` (EPSG:4326, R-tree index) for GIS
    installs that read no Parquet: probabilities as one ``p_<class>`` column each, no
    ``bbox``/``geometry_native``; the table's ``tilescan`` metadata as layer metadata.
``summary.csv`` / ``summary.json``
    Tiles and area per class per scene (:mod:`tilescan.outputs.summary`), with the scene's
    ``scale_check``; the JSON also lists each scene's units, whether all
    its tile rows are present, and the units that were skipped and why.
``tiles.qml`` / ``collected.qgs``
    A QGIS style for the table and a QGIS project with the table and, per scene, its label
    and heatmap rasters and the scene itself (:mod:`tilescan.outputs.qgis`; ``styles=False`` skips).

Everything is built in a staging folder and renamed into place, so ``OUT/collected`` is
always one consistent set. (scene, tile_index) is checked to be unique: a scene's row
parts must not overlap, and a finished whole-scene output wins over row parts beside it.
A footprint that reaches past the area its CRS maps to longitude/latitude (a geostationary
disc's edge tile) is the part that maps. A scene that cannot be collected (its table is
unreadable) is left out, named with the reason in the log and under
``failed`` in ``summary.json``; the others are collected and the command exits 3.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import gpkg as gpkg_compat
from .. import faults, layout, stop
from . import spatial
from ..errors import EXIT_PARTIAL, InputError, OutputError, TilescanError
from ..layout import COLLECTED, LOCKS, MANIFEST, STAGING
from ..log import emit
from .table import BBOX_TYPE, check_gpkg_path, dictionary_columns, prob_column_names
from .summary import AREA_NOTE, ClassSummary, csv_rows
from .files import as_files_are_made, atomic_output, csv_text, write_error, write_json, write_text
from .finished import _Scene, _Unit, find_units, one_legend, run_failures, say_models, say_results_versions
from .geometry import geo_metadata, wkb_polygon_rings
from .lonlat import footprints_in_lonlat

TARGET_CRS = "OGC:CRS84"

# ----------------------------------------------------------------------------- geometry


class _Reprojector:
    def __init__(self):
        self._cache: dict[str, Any] = {}

    def __call__(self, crs_json: dict | None, rings: np.ndarray) -> tuple[np.ndarray | None, str | None, Any]:
        """``rings`` in longitude/latitude (not finite where the CRS maps no point there), the
        CRS's name and its transform ``(x, y) -> (lon, lat)``; all None for a table without CRS."""
        if crs_json is None:
            return None, None, None
        from pyproj import CRS, Transformer

        key = json.dumps(crs_json, sort_keys=True)
        if key not in self._cache:
            src = CRS.from_json_dict(crs_json)
            self._cache[key] = (Transformer.from_crs(src, CRS.from_user_input(TARGET_CRS), always_xy=True),
                                src.to_string())
        tf, name = self._cache[key]
        x, y = tf.transform(rings[..., 0].ravel(), rings[..., 1].ravel())
        return np.stack([np.asarray(x), np.asarray(y)], axis=-1).reshape(rings.shape), name, tf.transform


def _crs_label(crs_json: dict) -> str:
    """A CRS in a few words for a message: its authority code, else its name and method."""
    from pyproj import CRS

    crs = CRS.from_json_dict(crs_json)
    auth = crs.to_authority()
    if auth:
        return ":".join(auth)
    op = crs.coordinate_operation
    return f"the CRS '{crs.name}'" + (f" ({op.method_name})" if op is not None else "")


# ----------------------------------------------------------------------------- tables


_TAIL = [
    pa.field("crs", pa.string()),
    pa.field("cam_peak_lon", pa.float64()),  # cam_peak_x/y in longitude/latitude, as the geometry
    pa.field("cam_peak_lat", pa.float64()),
    pa.field("area_m2", pa.float64()),
    pa.field("valid_area_m2", pa.float64()),
    pa.field("geometry", pa.binary()),
    pa.field("bbox", BBOX_TYPE),
    pa.field("geometry_native", pa.binary()),
]
_HEAD = [pa.field("scene", pa.string(), nullable=False), pa.field("unit", pa.string(), nullable=False),
         pa.field("scene_file", pa.string(), nullable=False), pa.field("scene_path", pa.string()),
         pa.field("scale_check", pa.string())]  # from run.json: a unit written before tables had it has it too
_DROP = {"scene", "label", "geometry", "bbox", "scale_check"}


def _unit_table(u: _Unit, reproject: _Reprojector) -> tuple[pa.Table, dict]:
    with pq.ParquetFile(u.folder / "tiles.parquet") as pf:  # one file: without read_table's dataset set-up (most of a chip's read)
        t = pf.read()
    geo = json.loads(t.schema.metadata[b"geo"])
    crs_json = geo["columns"][geo.get("primary_column", "geometry")].get("crs")
    n = t.num_rows
    rings = wkb_polygon_rings(t.column("geometry").combine_chunks())
    peaks = np.stack([t.column(c).to_numpy() for c in ("cam_peak_x", "cam_peak_y")], axis=-1)[:, None]
    lonlat, crs_name, to_lonlat = reproject(crs_json, np.concatenate([rings, peaks], axis=1))  # footprints, CAM peaks
    peaks = None if lonlat is None else lonlat[:, -1].copy()
    if peaks is not None:  # in -180..180 as the footprints are (a 0..360 scene's peaks were past 180)
        on = np.isfinite(peaks[:, 0])  # not those off the CRS's area (a disc's edge), masked below
        peaks[on, 0] = (peaks[on, 0] + 180.0) % 360.0 - 180.0
    meta = json.loads(t.schema.metadata[b"tilescan"])
    if not meta.get("classes"):  # the label column's categories, the summaries' and the styles' legend
        raise InputError(f"{u.key}/tiles.parquet names no model classes in its metadata (made by another tool, or "
                         "edited): rerun the scene with --overwrite", path=str(u.folder / "tiles.parquet"))
    cols: dict[str, pa.Array] = {
        "scene": pa.array([u.scene] * n, pa.string()),
        "unit": pa.array([u.key] * n, pa.string()),
        "scene_file": t.column("scene").cast(pa.string()).combine_chunks(),
        "scene_path": pa.array([u.manifest.get("scene")] * n, pa.string()),
        "scale_check": pa.array([(u.manifest.get("tiling") or {}).get("scale")] * n, pa.string()),
    }
    for name in t.column_names:
        if name == "label":  # every class of the model, in its order, as a scene's table has
            index = t.column("class_index").cast(pa.int32()).combine_chunks()
            cols[name] = pa.DictionaryArray.from_arrays(index, pa.array(meta["classes"], pa.string()))
        elif name not in _DROP:
            c = t.column(name).combine_chunks()
            cols[name] = c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c
    valid = t.column("valid_fraction").to_numpy().astype(np.float64)
    if lonlat is None:
        null_f = pa.nulls(n, pa.float64())
        cols.update({"crs": pa.nulls(n, pa.string()), "cam_peak_lon": null_f, "cam_peak_lat": null_f, "area_m2": null_f,
                     "valid_area_m2": null_f, "geometry": pa.nulls(n, pa.binary()), "bbox": pa.nulls(n, BBOX_TYPE)})
        bounds = None
        n_across = n_clipped = 0
    else:
        geometry, box, area, native, n_across, n_clipped = footprints_in_lonlat(lonlat[:, :-1], rings, to_lonlat)
        # a footprint short of its pixel window (held within ±180°, cut at a disc) holds all its valid pixels
        a, b_, _, d, e = (u.manifest.get("scene_info") or {}).get("transform", [1, 0, 0, 0, 1])[:5]
        window = t.column("width").to_numpy().astype(np.float64) * t.column("height").to_numpy() * abs(a * e - b_ * d)
        kept = np.clip(np.divide(native, window, out=np.ones(n), where=window > 0), 0.0, 1.0)
        valid = np.where(kept < 1 - 1e-6, np.minimum(1.0, valid / np.where(kept > 0, kept, 1.0)), valid)
        off = ~np.isfinite(peaks).all(axis=1)  # a CAM peak off the CRS's area (a disc's edge tile): none
        cols.update({
            "crs": pa.array([crs_name] * n, pa.string()),
            "cam_peak_lon": pa.array(peaks[:, 0], mask=off), "cam_peak_lat": pa.array(peaks[:, 1], mask=off),
            "area_m2": pa.array(area, mask=np.isnan(area)),  # none: a footprint with no part on a disc
            "valid_area_m2": pa.array(area * valid, mask=np.isnan(area)),
            "geometry": geometry,
            "bbox": pa.StructArray.from_arrays([pa.array(v) for v in box], fields=list(BBOX_TYPE), mask=pa.array(geometry.is_null())),
        })
        bounds = (np.nanmin(box[0]), np.nanmin(box[1]), np.nanmax(box[2]), np.nanmax(box[3])) if n - geometry.null_count else None
    cols["geometry_native"] = t.column("geometry").combine_chunks().cast(pa.binary())
    return pa.table(cols), {"bounds": bounds, "classes": meta.get("classes"), "crs": crs_name, "clipped": n_clipped,
                            "crs_label": _crs_label(crs_json) if n_clipped else None,
                            "antimeridian": n_across, "class_colors": meta.get("class_colors")}


def _schema(first: pa.Table) -> pa.Schema:
    mid = [f for f in first.schema if f.name not in {x.name for x in _HEAD} | {x.name for x in _TAIL}]
    return pa.schema(_HEAD + mid + _TAIL)


def _geo_meta(bbox: list[float] | None, antimeridian: int = 0) -> dict:
    """GeoParquet's metadata of the table; ``antimeridian``: footprints cut there into MultiPolygons."""
    from pyproj import CRS

    return geo_metadata(CRS.from_user_input(TARGET_CRS).to_json_dict(), bbox,
                        ("Polygon", "MultiPolygon") if antimeridian else ("Polygon",))


# ----------------------------------------------------------------------------- GeoPackage


def _write_gpkg(parquet: Path, path: Path, classes: list[str]) -> None:
    try:
        import pyogrio
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise OutputError("cannot write a GeoPackage: the 'pyogrio' package is not installed", path=str(path)) from exc
    from pyproj import CRS

    pf = pq.ParquetFile(parquet)
    probs = prob_column_names(classes)
    keep = [f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f  # GeoPackage: plain text
            for f in pf.schema_arrow if f.name not in ("probabilities", "bbox", "geometry_native", "geometry")]
    fields = keep + [pa.field(p, pa.float32()) for p in probs] + [pa.field("geometry", pa.binary())]
    schema = pa.schema(fields)
    k = len(classes)

    def batches() -> Iterator[pa.RecordBatch]:
        for b in pf.iter_batches(batch_size=65536):
            arrays = [b.column(f.name).cast(f.type) for f in keep]
            p = b.column("probabilities").flatten().to_numpy(zero_copy_only=False).reshape(-1, k) if b.num_rows else np.zeros((0, k), np.float32)
            arrays += [pa.array(np.ascontiguousarray(p[:, i]), pa.float32()) for i in range(k)]
            arrays.append(b.column("geometry"))
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    own = pf.schema_arrow.metadata[b"tilescan"].decode()  # classes, scenes, scale warnings: as the table's
    cut = json.loads(own).get("antimeridian_tiles")  # MultiPolygons among them
    with atomic_output(path) as tmp:
        check_gpkg_path(tmp, path, "leave it out (collect --no-gpkg, gpkg=False from Python)")
        reader = pa.RecordBatchReader.from_batches(schema, batches())
        pyogrio.write_arrow(reader, str(tmp), layer="tiles", driver="GPKG", geometry_name="geometry",
                            geometry_type="Unknown" if cut else "Polygon", crs=CRS.from_epsg(4326).to_wkt(),
                            layer_metadata={"tilescan": own}, dataset_options=gpkg_compat.DATASET_OPTIONS,
                            layer_options=gpkg_compat.layer_options())
        gpkg_compat.add_rtree(tmp, name=path)
        as_files_are_made(tmp)


# ----------------------------------------------------------------------------- entry point


class PartialCollectError(TilescanError):
    """Some scenes could not be collected; the others are in ``OUT/collected``.
    ``summary`` is what :func:`run_collect` would have returned."""

    exit_code = EXIT_PARTIAL
    kind = "partial"

    def __init__(self, message: str, path: str, summary: dict):
        super().__init__(message, path=path)
        self.summary = summary


def run_collect(out: str | os.PathLike, gpkg: bool = True, log: Callable[[str], None] = emit,
                strict: bool = True, styles: bool = True) -> dict:
    """Collect the finished units of ``out`` into ``out/collected/`` (see the module doc).

    Returns the summary (also written as ``summary.json``). When some scenes could not be
    collected, the others are still written, and then :class:`PartialCollectError` is raised
    (exit 3) unless ``strict`` is false; the summary lists them under ``failed``."""
    out = Path(out)
    if not out.is_dir():
        raise InputError("is a file, not the output folder of a run" if out.exists() else "no such output folder",
                         path=str(out))
    out = Path(os.path.abspath(out))  # "." or ".." named: the folder's own name (the STAC collection's id), a swap from inside it
    dest = out / COLLECTED
    if (dest / MANIFEST).exists() or any(p.is_dir() and layout.PART_RE.fullmatch(p.name) for p in _entries(dest)):
        raise OutputError("this folder holds a scene's outputs (from a tilescan older than its scene-name "
                          "rules, for a scene named 'collected'); move it away and rerun that scene", path=str(dest))
    lock = layout.FileLock(out / LOCKS / layout.COLLECT_LOCK)
    try:
        lock.acquire()
    except layout.Busy:
        raise OutputError("another 'tilescan collect' is writing this folder", path=str(out)) from None
    except OSError as exc:  # a full disk, a read-only OUT
        raise write_error(exc, lock.path) from None
    try:
        summary = _collect(out, dest, gpkg, log, styles)
    finally:
        lock.release()
        layout.tidy(out)
    log(f"collect: {summary['tiles']} tiles from {len(summary['scenes'])} scene(s), footprints in longitude and "
        f"latitude (OGC:CRS84; each scene's own in geometry_native) -> {dest}")
    faults.point("collected")
    if summary["failed"] and strict:
        names = ", ".join(f["scene"] for f in summary["failed"])
        raise PartialCollectError(
            f"{len(summary['failed'])} scene(s) could not be collected ({names}; reasons above and in "
            f"{dest / 'summary.json'}); the other {len(summary['scenes'])} scene(s) are in {dest}", path=str(out), summary=summary)
    return summary


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return []


def _collect(out: Path, dest: Path, gpkg: bool, log: Callable[[str], None], styles: bool = True) -> dict:
    scenes, skipped = find_units(out, log)
    if not scenes:
        if (out / MANIFEST).is_file():  # a scene's own folder: collect takes the run's output folder above it
            raise InputError(f"this is one scene's output folder: collect the folder that holds it ({out.parent})",
                             path=str(out))
        raise InputError("no finished scene outputs to collect (no complete run.json under it)", path=str(out))
    one_legend(scenes, out)
    stage = out / STAGING / f".collect-{os.getpid()}"  # a dot: never a scene's staging name
    for left in _entries(out / STAGING):  # the sets of collects killed before (this one holds the lock)
        if layout.is_collect_stage(left.name):
            layout.discard(left)
    run_failed = run_failures(out, {u.key: u.manifest for sc in scenes for u in sc.units}, log)
    from .qgis import parquet_only_warning, percent_warning

    if styles and not gpkg:
        log(parquet_only_warning("collected.qgs"))
    if gpkg and (said := percent_warning(dest, "the collected tiles.gpkg")):
        log(said)
    say_models(scenes, log)
    say_results_versions(scenes, log)
    try:
        stage.mkdir(parents=True)
        summary = _build(scenes, skipped, stage, gpkg, log, run_failed)
        if styles:  # a style for the table and a QGIS project with every scene's layers
            from .qgis import MAX_SCENE_GROUPS, write_collect_files

            if len(summary["scenes"]) > MAX_SCENE_GROUPS:
                own = any(str(f).endswith(".qgs") for sc in scenes for u in sc.units for f in u.manifest.get("outputs") or ())
                log(f"collect: {len(summary['scenes'])} scenes: collected.qgs holds their tiles as one layer, without "
                    f"a group per scene (over {MAX_SCENE_GROUPS} groups make it slow to open in QGIS)"
                    + ("; each scene's own project is in its folder" if own else ""))
            drawn = {name for name, s in summary["scenes"].items() if not s.get("clipped_tiles")}  # off a disc: not
            write_collect_files(stage, dest, [(sc.name, u.folder, u.manifest) for sc in scenes for u in sc.units
                                              if sc.name in drawn])
        from .stac_items import COLLECTION, ITEM_COLLECTION, write_collection

        if n := write_collection(stage, out, [u.folder for sc in scenes for u in sc.units], log):
            log(f"collect: {COLLECTION} and {ITEM_COLLECTION}: a STAC Collection of the {n} scenes' items")
        with stop.deferred():  # a stop halfway would drop what the user added to OUT/collected with the new set
            _swap_into_place(stage, dest, log)
            stop.settle()  # the set is in place: a stop from here on has nothing to undo
    except BaseException as exc:
        layout.discard(stage)
        if isinstance(exc, OSError):  # the new set could not be written (a full disk); the old one is kept
            raise write_error(exc, getattr(exc, "filename", None) or stage) from exc
        raise
    return summary


def _one_line(exc: Exception) -> str:
    text = exc.message if isinstance(exc, TilescanError) else f"unexpected error {type(exc).__name__}: {exc}"
    return " ".join(str(text).split())


def _scene_tables(sc: _Scene, reproject: _Reprojector) -> list[tuple[_Unit, pa.Table, dict]]:
    """The collected rows of each unit of a scene, checked for duplicate or unordered tiles."""
    if sc.refused is not None:
        raise sc.refused
    out = []
    last = -1
    for u in sc.units:
        t, info = _unit_table(u, reproject)
        idx = t.column("tile_index").to_numpy()
        if len(idx) and (idx[0] <= last or np.any(np.diff(idx) <= 0)):
            raise InputError(f"duplicate or unordered tile_index values in {u.key}", path=str(u.folder))
        if len(idx):
            last = int(idx[-1])
        out.append((u, t, info))
    return out


class _TableWriter:
    """The collected GeoParquet table, written unit by unit: one schema, one model's classes, the union of the bounds."""

    # rows of a row group: units are gathered to it (a group per 16-tile chip made the footer most of the file)
    GROUP_ROWS = 65536

    def __init__(self, path: Path):
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.pending: list[pa.Table] = []  # units' rows not yet written, fewer than GROUP_ROWS
        self.pending_rows = 0
        self.schema: pa.Schema | None = None
        self.classes: list[str] | None = None
        self.colors: list[str] | None = None  # the first unit's model's own legend colours, where one has them
        self.colors_source = ""
        self.other_colors: list[str] = []  # units of models with other own colours
        self.class_source = ""
        self.bounds: list[float] | None = None
        self.total = 0
        self.antimeridian = 0  # footprints cut at the antimeridian

    def add(self, u: _Unit, t: pa.Table, info: dict) -> pa.Table:
        """Append a unit's rows (cast to the table's schema, which the first unit sets) and return them."""
        if self.classes is None:
            self.classes, self.class_source = info["classes"], u.key
        elif info["classes"] != self.classes:
            raise InputError(f"its model has other classes than {self.class_source}'s; collect outputs of one model "
                             "at a time", path=str(u.folder))
        if info["class_colors"] and self.colors is None:  # a model's own legend colours over the palette
            self.colors, self.colors_source = info["class_colors"], u.key
        elif info["class_colors"] and info["class_colors"] != self.colors:
            self.other_colors.append(u.key)
        if self.schema is None:
            self.schema = _schema(t)
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="zstd", store_schema=False,
                                           use_dictionary=dictionary_columns(self.schema))
        t = t.select(self.schema.names).cast(self.schema)
        self.pending.append(t)
        self.pending_rows += t.num_rows
        if self.pending_rows >= self.GROUP_ROWS:
            self._flush()
        self.total += t.num_rows
        self.antimeridian += info["antimeridian"]
        b = info["bounds"]
        if b is not None:
            bounds = self.bounds
            self.bounds = list(b) if bounds is None else [min(bounds[0], b[0]), min(bounds[1], b[1]),
                                                          max(bounds[2], b[2]), max(bounds[3], b[3])]
        return t

    def _flush(self) -> None:
        """Write the gathered units' rows (row groups of GROUP_ROWS)."""
        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.GROUP_ROWS)
            self.pending, self.pending_rows = [], 0

    def write_metadata(self, scene_info: dict[str, dict]) -> None:
        """The rows still gathered, then the ``geo`` metadata and tilescan's (classes, tile count,
        scenes, their model ids, scale warnings)."""
        assert self.writer is not None and self.classes is not None
        self._flush()
        own = {"classes": self.classes, "n_tiles": self.total, "crs_note": "geometry is OGC:CRS84; "
               "geometry_native and cam_peak_x/y are in each row's crs (cam_peak_lon/lat: the peak in OGC:CRS84)",
               "scenes": sorted(scene_info)}
        ids = sorted({str(info.get("model")) for info in scene_info.values()})
        own.update({"model_id": ids[0]} if len(ids) == 1 else {"model_ids": ids})  # several: collect warned
        scale_warnings = {name: info["scale_warning"] for name, info in sorted(scene_info.items())
                          if "scale_warning" in info}
        if self.colors:
            own["class_colors"] = self.colors
        if scale_warnings:
            own["scale_warnings"] = scale_warnings
        if self.antimeridian:
            own["antimeridian_tiles"] = self.antimeridian
        meta = {"geo": json.dumps(_geo_meta(self.bounds, self.antimeridian)), "tilescan": json.dumps(own)}
        # Arrow's schema, stored as its Parquet writer stores it, now the metadata is known:
        # Arrow readers (pandas, GeoPandas, Polars) get the categorical columns back as such
        arrow = base64.b64encode(self.schema.with_metadata(meta).serialize().to_pybytes()).decode()
        self.writer.add_key_value_metadata({**meta, "ARROW:schema": arrow})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _build(scenes: list[_Scene], skipped: list[dict], stage: Path, gpkg: bool, log: Callable[[str], None],
           run_failed: tuple[list[dict], list[dict], list[dict]] = ([], [], [])) -> dict:
    """Write the collected table, the summaries and (``gpkg``) the GeoPackage into ``stage``; returns the summary."""
    reproject = _Reprojector()
    summary = ClassSummary()
    table = _TableWriter(stage / "tiles.parquet")
    scene_info: dict[str, dict] = {}
    failed: list[dict] = []
    try:
        for sc in scenes:
            try:  # a scene is collected whole or not at all, and one bad scene does not stop the rest
                tables = _scene_tables(sc, reproject)
            except Exception as exc:
                reason = _one_line(exc)
                failed.append({"scene": sc.name, "units": [u.key for u in sc.units], "reason": reason})
                log(f"error: collect: {sc.name}: {reason}")
                continue
            crs_names, clipped = set(), 0
            for u, t, info in tables:
                clipped += info["clipped"]
                if info["clipped"]:
                    log(f"collect: {u.key}: {info['clipped']} of {t.num_rows} tile footprints reach past the area "
                        f"{info['crs_label']} maps to longitude/latitude (beyond a geostationary disc): their lon/lat "
                        "footprints are the part on it (geometry_native keeps each whole); its layers are left out "
                        "of collected.qgs, as QGIS 3.22 hangs drawing them in longitude/latitude")
                tiling = u.manifest.get("tiling") or {}  # overlapping tiles count their stride's cell
                share = (tiling.get("stride_px", 1) / tiling.get("tile_px", 1)) ** 2
                summary.add(sc.name, table.add(u, t, info), share)
                if info["crs"]:
                    crs_names.add(info["crs"])
            scene_info[sc.name] = {**_scene_entry(sc, crs_names), **({"clipped_tiles": clipped} if clipped else {})}
        if table.other_colors:
            log(f"warning: collect: the models of {', '.join(table.other_colors[:3])} have other legend colours than "
                f"{table.colors_source}'s: the collected styles draw every scene in {table.colors_source}'s")
        if table.writer is None:
            raise InputError("no scene could be collected: " + "; ".join(f"{f['scene']}: {f['reason']}" for f in failed))
        table.write_metadata(scene_info)
    finally:
        table.close()
    result = _result(summary, scene_info, table.total, skipped, failed, *run_failed)
    write_text(stage / "summary.csv", csv_text(csv_rows(result["classes"])))
    write_json(stage / "summary.json", result)
    if table.total > spatial.SORT_MIN_ROWS:  # large: Hilbert order, row groups a bbox query can skip
        spatial.sort_parquet(table.path)
    if gpkg:
        _write_gpkg(table.path, stage / "tiles.gpkg", table.classes)
    return result


def _scene_entry(sc: _Scene, crs_names: set[str]) -> dict:
    """A collected scene's entry in summary.json (before its counts)."""
    m = sc.units[0].manifest
    return {
        "path": m.get("scene"),
        "crs": sorted(crs_names)[0] if crs_names else None,
        "units": [u.key for u in sc.units],
        "tile_rows": sc.n_rows,
        "complete": not sc.missing_rows,
        "missing_rows": [list(r) for r in sc.missing_rows],
        "notes": sc.notes,
        "model": m.get("model", {}).get("id"),
        "model_sha256": m.get("model", {}).get("sha256"),
        **({"scale_warning": note} if (note := _scale_note(sc)) else {}),
    }


def _scale_note(sc: _Scene) -> str | None:
    """What the scene's run said about its labels and the model's scale (None: in range)."""
    from ..scene.grid import scale_note

    return next(filter(None, (scale_note(u.manifest.get("warning_details") or []) for u in sc.units)), None)


def _result(summary: ClassSummary, scene_info: dict[str, dict], total: int, skipped: list[dict],
            failed: list[dict], run_failed: list[dict], earlier: list[dict], unfinished: list[dict]) -> dict:
    """summary.json: tiles and areas per scene and class, skipped, not collected (``failed``), failed in the run."""
    rows = summary.table()
    per_scene = {}
    for name, info in scene_info.items():
        s = summary.scenes.get(name, {"tiles": 0, "area_m2": 0.0, "valid_area_m2": 0.0})
        per_scene[name] = {**info, **s, "classes": {r["label"]: {k: r[k] for k in ("tiles", "area_m2", "valid_area_m2")}
                                                    for r in rows if r["scene"] == name}}
    return {
        "tiles": total,
        "geometry_crs": TARGET_CRS,
        "area": AREA_NOTE,
        "scenes": per_scene,
        "classes": rows,
        "skipped": skipped,
        "failed": failed,
        "failed_in_run": run_failed,
        "earlier_outputs": earlier,
        "unfinished_in_run": unfinished,
    }


def _swap_into_place(stage: Path, dest: Path, log: Callable[[str], None]) -> None:
    """Rename ``stage`` to ``OUT/collected``; an old set is parked aside, then removed (what a user added to it kept)."""
    if dest.is_dir() and not dest.is_symlink() and (kept := layout.carry_over(dest, stage, layout.COLLECTED_FILES)):
        log(f"collect: kept what was added to {dest}: {', '.join(kept)}")
    faults.point("swapping")  # what the user added is in the new set now, not yet in place
    if os.path.lexists(dest):
        aside = stage.parent / layout.aside_name(COLLECTED)
        layout.discard(aside)
        os.replace(dest, aside)
        os.replace(stage, dest)
        layout.discard(aside)
    else:
        os.replace(stage, dest)


__all__ = ["run_collect", "PartialCollectError"]
