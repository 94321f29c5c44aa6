"""The per-tile table: rows gathered per batch as columns, written as GeoParquet 1.1 and GeoPackage.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OutputError
from ..log import catching_warnings
from .files import _dumps, _temp_name, as_files_are_made, atomic_output
from .geometry import BBOX_TYPE, _projjson, bbox_column, extent, geo_metadata, gpkg_polygons, pyproj_crs, wkb_polygons

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


_ROW_GROUP = 65536


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth Parquet's dictionary encoding (``use_dictionary``): the names
    (strings), whose values repeat. On the probabilities, CAM statistics and coordinates,
    whose values hardly do, it made a scene's table larger and slower to write."""
    return [f.name for f in schema
            if pa.types.is_dictionary(f.type) or pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


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

    def seal(self) -> None:
        """Put each column's chunks together now, so that writers in several threads at once
        only read them (each writer otherwise does it on its first call)."""
        for name, chunks in self._chunks.items():
            if len(chunks) > 1:
                self._chunks[name] = [np.concatenate(chunks)]

    def _columns(self, k: int) -> dict[str, np.ndarray]:
        """Concatenate the chunks (kept concatenated afterwards) and sort by tile_index."""
        self.seal()
        out = {}
        for name, chunks in self._chunks.items():
            if chunks:
                out[name] = chunks[0]
            elif name == "corners":
                out[name] = np.zeros((0, 4, 2), np.float64)
            elif name == "probabilities":
                out[name] = np.zeros((0, k), np.float32)
            elif name == "label_code":
                out[name] = np.zeros(0, np.int32)
            else:
                out[name] = np.zeros(0, _SCALARS[name][0])
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
                         model_id: str, extra_metadata: Mapping[str, Any] | None = None,
                         scale_check: str | None = None) -> Path:
        """Write the table as GeoParquet 1.1 (zstd) atomically at ``path``.

        Columns: ``scene`` (dictionary string), tile ids and windows, ``valid_fraction``,
        ``label`` (dictionary string), ``class_index``, ``confidence``, ``scale_check`` (the
        scene's, as run.json's ``tiling.scale``: ``coarser`` where labels are not meaningful;
        null when not given), ``probabilities``
        (``list<float32>``, in ``classes`` order), the CAM statistics, ``geometry`` (WKB
        Polygon, counter-clockwise) and ``bbox`` (struct covering column). File metadata:
        ``geo`` (GeoParquet 1.1; ``crs`` is PROJJSON, or null for pixel space) and
        ``tilescan`` (``classes``, ``model_id``, ``scene``, ``n_tiles`` and ``extra_metadata``).
        """
        classes, cols, codes, label_names = self._prepared(classes)
        k = len(classes)
        corners = cols["corners"]
        n = corners.shape[0]

        geo = geo_metadata(_projjson(crs), extent(corners))
        meta = _tilescan_meta(classes, model_id, scene, n, extra_metadata)

        label_type = pa.dictionary(pa.int32(), pa.string())
        fields = [pa.field("scene", pa.dictionary(pa.int32(), pa.string()), nullable=False)]
        for name in _ORDER_HEAD[1:]:
            if name == "label":
                fields.append(pa.field("label", label_type, nullable=False))
            else:
                fields.append(pa.field(name, _SCALARS[name][1], nullable=False))
        fields += [pa.field("scale_check", label_type), pa.field("probabilities", pa.list_(pa.float32()), nullable=False)]
        fields += [pa.field(name, _SCALARS[name][1]) for name in _ORDER_CAM]
        fields.append(pa.field("geometry", pa.binary(), nullable=False))
        fields.append(pa.field("bbox", BBOX_TYPE, nullable=False))
        schema = pa.schema(fields, metadata={b"geo": _dumps(geo).encode(), b"tilescan": _dumps(meta).encode()})

        scene_dict = pa.array([str(scene)], pa.string())
        label_dict = pa.array(label_names, pa.string())
        check_dict = pa.array([scale_check or ""], pa.string())
        no_check = np.full(min(n, _ROW_GROUP), scale_check is None)

        def batch(lo: int, hi: int) -> pa.RecordBatch:
            m = hi - lo
            arrays: list[pa.Array] = [pa.DictionaryArray.from_arrays(pa.array(np.zeros(m, np.int32)), scene_dict)]
            for name in _ORDER_HEAD[1:]:
                if name == "label":
                    arrays.append(pa.DictionaryArray.from_arrays(pa.array(codes[lo:hi]), label_dict))
                else:
                    arrays.append(pa.array(cols[name][lo:hi]))
            arrays.append(pa.DictionaryArray.from_arrays(pa.array(np.zeros(m, np.int32), mask=no_check[:m]), check_dict))
            p = np.ascontiguousarray(cols["probabilities"][lo:hi], dtype=np.float32)
            offsets = np.arange(0, (m + 1) * k, k, dtype=np.int32) if k else np.zeros(m + 1, np.int32)
            arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(p.reshape(-1))))
            arrays += [pa.array(cols[name][lo:hi]) for name in _ORDER_CAM]
            c = corners[lo:hi]
            arrays.append(wkb_polygons(c))
            arrays.append(bbox_column(c))
            return pa.RecordBatch.from_arrays(arrays, schema=schema)

        with atomic_output(path) as tmp:
            with pq.ParquetWriter(str(tmp), schema, compression="zstd", write_statistics=True,
                                  use_dictionary=dictionary_columns(schema)) as writer:
                for lo in range(0, n, _ROW_GROUP):
                    writer.write_batch(batch(lo, min(n, lo + _ROW_GROUP)), row_group_size=_ROW_GROUP)
        return Path(path)

    # -- GeoPackage

    def write_gpkg(self, path: str | os.PathLike, crs: Any, classes: Sequence[str], scene: str,
                   model_id: str, extra_metadata: Mapping[str, Any] | None = None,
                   layer: str = "tiles", scale_check: str | None = None) -> Path:
        """Write the same rows as a GeoPackage layer (default ``tiles``), atomically.

        For GIS installs whose GDAL reads no Parquet. Differences from the GeoParquet file:
        no ``bbox`` column (GeoPackage keeps its own extent and R-tree index), plain string
        ``scene``/``label``/``scale_check`` columns, and the probabilities as one float column per class,
        ``p_<class>`` (non-alphanumerics replaced by ``_``). The ``tilescan`` metadata JSON is
        stored as layer metadata. GeoPackage 1.2 with an R-tree index (:mod:`tilescan.outputs.gpkg`), so
        GDAL >= 2.2 (QGIS 3.x) reads it fully.

        GDAL writes it (``pyogrio.write_arrow``, GDAL >= 3.8; geopandas is not used). A table
        of up to :data:`GPKG_FILL_ROWS` rows is written as a copy of an empty layer that GDAL
        wrote once per process, CRS and columns (:func:`_gpkg_template`), filled by Python's
        ``sqlite3`` as GDAL would fill it (:func:`tilescan.outputs.gpkg.fill_copy`): GDAL's
        set-up of a new file costs more than a small scene's rows, and its bulk write less
        than ``sqlite3`` for many rows.
        """
        from . import gpkg

        schema, batches, corners = self._gpkg_arrow(classes, scene, scale_check)
        pj = pyproj_crs(crs)
        wkt = None if pj is None else pj.to_wkt()
        meta = _dumps(_tilescan_meta(classes, model_id, scene, len(corners), extra_metadata))
        if len(corners) > GPKG_FILL_ROWS:
            try:
                import pyogrio
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise OutputError("cannot write a GeoPackage: the 'pyogrio' package is not installed",
                                  path=str(path)) from exc
            with atomic_output(path) as tmp:
                check_gpkg_path(tmp, path, _NO_GPKG)
                # tilescan's index, not GDAL's: whether GDAL's SQLite has the R-tree module inside
                # a run depends on what loaded SQLite first (see gpkg), and its failure prints an error
                pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, batches), str(tmp), layer=layer,
                                    driver="GPKG", geometry_name="geometry", geometry_type="Polygon", crs=wkt,
                                    layer_metadata={"tilescan": meta}, dataset_options=gpkg.DATASET_OPTIONS,
                                    layer_options={"SPATIAL_INDEX": "NO"})
                gpkg.add_rtree(tmp, name=path)
                as_files_are_made(tmp)
            return Path(path)
        with atomic_output(path) as tmp:
            check_gpkg_path(tmp, path, _NO_GPKG)
            template, srs_id, no_index = _gpkg_template(schema, layer, wkt)
            columns: dict[str, list] = {name: [] for name in schema.names if name != "geometry"}
            for b in batches:
                for name in columns:
                    columns[name] += b.column(name).to_pylist()
            geometry, boxes = gpkg_polygons(corners, srs_id)
            gpkg.fill_copy(template, tmp, columns, geometry, boxes.tolist(), metadata=(_META_MARK, meta))
        if no_index is not None:
            warnings.warn(f"{path}: written without a spatial index: {no_index}", stacklevel=2)
        return Path(path)

    def _gpkg_arrow(self, classes: Sequence[str], scene: str,
                    scale_check: str | None = None) -> tuple[pa.Schema, Iterator[pa.RecordBatch], np.ndarray]:
        """The GeoPackage layer's columns as Arrow record batches, the geometry as WKB (as
        GDAL would be given them), and the footprints' corners."""
        classes, cols, codes, label_names = self._prepared(classes)
        k = len(classes)
        n = cols["corners"].shape[0]
        fields = [pa.field("scene", pa.string())]
        fields += [pa.field("label", pa.string()) if name == "label" else pa.field(name, _SCALARS[name][1])
                   for name in _ORDER_HEAD[1:]]
        fields.append(pa.field("scale_check", pa.string()))
        fields += [pa.field(p, pa.float32()) for p in prob_column_names(classes)]
        fields += [pa.field(name, _SCALARS[name][1]) for name in _ORDER_CAM]
        fields.append(pa.field("geometry", pa.binary()))
        schema = pa.schema(fields)
        label_arr = np.array(label_names + [""], dtype=object)

        def batches() -> Iterator[pa.RecordBatch]:
            for lo in range(0, max(n, 1), GPKG_BATCH_ROWS):
                hi = min(n, lo + GPKG_BATCH_ROWS)
                m = hi - lo
                arrays = [pa.array([str(scene)] * m, pa.string())]
                for name in _ORDER_HEAD[1:]:
                    if name == "label":
                        arrays.append(pa.array(label_arr[codes[lo:hi]], pa.string()))
                    else:
                        arrays.append(pa.array(cols[name][lo:hi]))
                arrays.append(pa.array([scale_check] * m, pa.string()))
                probs = cols["probabilities"][lo:hi]
                arrays += [pa.array(np.ascontiguousarray(probs[:, i])) for i in range(k)]
                arrays += [pa.array(cols[name][lo:hi]) for name in _ORDER_CAM]
                arrays.append(wkb_polygons(cols["corners"][lo:hi]))
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)

        return schema, batches(), cols["corners"]


_NO_GPKG = "leave the GeoPackage out (--no-gpkg, gpkg=False from Python)"

#: Most rows of a GeoPackage filled from a template (:meth:`TileTable.write_gpkg`); about
#: where the two ways take the same time.
GPKG_FILL_ROWS = 2048

#: Rows in each batch GDAL writes to a GeoPackage: pyogrio holds Python's GIL while GDAL writes
#: a batch, so the run's other threads get it back between batches.
GPKG_BATCH_ROWS = 2048

#: The longest path SQLite opens a database by, in bytes (its unix VFS's 512 less "-journal").
SQLITE_MAX_PATH = 504


def check_gpkg_path(tmp: Path, path: str | os.PathLike, no_gpkg: str) -> None:
    """Refuse a GeoPackage whose temporary path ``tmp`` is longer than SQLite opens (it says
    only "unable to open database file"), saying what to do (``no_gpkg``: how to leave it out)."""
    n = len(os.fsencode(os.path.realpath(tmp)))  # SQLite resolves links first
    if n > SQLITE_MAX_PATH:
        raise OutputError(f"cannot write the GeoPackage: SQLite opens files by paths of at most {SQLITE_MAX_PATH} "
                          f"bytes, and its temporary file's is {n}; choose an output folder at least {n - SQLITE_MAX_PATH} "
                          f"bytes shorter, or {no_gpkg}", path=str(path))


def check_gpkg_fits(path: str | os.PathLike, shown: str | os.PathLike) -> None:
    """:func:`check_gpkg_path` for the temporary file writing ``path`` will open, before any
    work that would end there; ``shown``: the GeoPackage's path as the user knows it."""
    check_gpkg_path(_temp_name(Path(path)), shown, _NO_GPKG)


#: Stands for the ``tilescan`` metadata JSON in a GeoPackage template (:func:`_gpkg_template`).
_META_MARK = "tilescan-metadata-0b9e7c41"

_templates: dict[tuple, tuple[Path, int, str | None]] = {}
_templates_lock = threading.Lock()
_template_numbers = itertools.count()


def _gpkg_template(schema: pa.Schema, layer: str, crs_wkt: str | None) -> tuple[Path, int, str | None]:
    """An empty GeoPackage layer with these columns and CRS, written by GDAL once per process
    (into a temporary folder removed at exit), with its R-tree index and :data:`_META_MARK`
    as its ``tilescan`` metadata; the GeoPackage id of its CRS; and None, or why it has no
    index (no SQLite at hand has the R-tree module)."""
    key = (schema.to_string(show_schema_metadata=False), layer, crs_wkt)
    with _templates_lock:
        got = _templates.get(key)
        if got is not None and got[0].exists():
            return got
        try:
            import pyogrio
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise OutputError("cannot write a GeoPackage: the 'pyogrio' package is not installed") from exc
        from . import gpkg

        folder = _template_folder()
        path = folder / f"template-{next(_template_numbers)}.gpkg"
        with catching_warnings():  # a scene in pixel space has no CRS, by the user's choice
            warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
            pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, iter([])), str(path), layer=layer,
                                driver="GPKG", geometry_name="geometry", geometry_type="Polygon", crs=crs_wkt,
                                layer_metadata={"tilescan": _META_MARK}, dataset_options=gpkg.DATASET_OPTIONS,
                                layer_options={"SPATIAL_INDEX": "NO"})
        no_index = gpkg.try_rtree(path)  # tilescan's index, as for large tables below
        con = gpkg.connect_read_only(path)
        try:
            (srs_id,), = con.execute("SELECT srs_id FROM gpkg_geometry_columns").fetchall()
        finally:
            con.close()
        _templates[key] = (path, int(srs_id), no_index)
        return _templates[key]


_folder: list = []  # [this process's template folder, the open file that holds its lock]
_OWNER = "owner.lock"
_UNOWNED_AGE_S = 86400  # a folder without an owner file this old was left by a killed process


def _template_folder() -> Path:
    """This process's folder for GeoPackage templates, made once and removed at exit. It
    holds a lock while this process lives, so that a later process removes the folders of
    processes that were killed before their exit ran (:func:`_sweep_templates`)."""
    if not _folder or not _folder[0].is_dir():
        import atexit
        import shutil
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="tilescan-gpkg-"))
        lock = _hold_lock(folder)
        _folder[:] = [folder, lock]
        atexit.register(shutil.rmtree, folder, True)
        if lock is not None:
            atexit.register(lock.close)  # first (last in, first out): the lock ends with the process
        _sweep_templates(folder)
    return _folder[0]


def _hold_lock(folder: Path):
    """Lock a file in ``folder`` for as long as this process lives (the kernel lets go when
    it ends, however it ends); locked under a temporary name first, so that a sweeper never
    sees an owner file nobody holds yet. None where there are no advisory locks."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: killed processes' folders stay
        return None
    f = open(folder / (_OWNER + ".new"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(folder / (_OWNER + ".new"), folder / _OWNER)
    except OSError:  # a file system without locks: the folder stays unowned (swept a day old)
        f.close()
        return None
    return f


def _sweep_templates(mine: Path) -> None:
    """Remove the template folders beside ``mine`` whose process has ended without removing
    its own (killed: SIGKILL, out of memory): their owner file's lock can be taken. Folders
    from before the lock are removed once a day old."""
    try:
        import fcntl
        import shutil
    except ImportError:  # pragma: no cover - not POSIX
        return
    import time

    for folder in mine.parent.glob("tilescan-gpkg-*"):
        if folder == mine:
            continue
        try:
            if not (folder / _OWNER).exists():  # made by a version without the lock
                if time.time() - folder.stat().st_mtime > _UNOWNED_AGE_S:
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            with open(folder / _OWNER, "r+") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)  # while held: no one else takes it
        except OSError:  # alive (locked), not ours to open, or already gone
            continue


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
