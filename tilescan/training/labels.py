"""Vector labels drawn in a GIS: read them, name their classes, put them in a scene's CRS.

A label file is anything GDAL reads as vectors (GeoPackage, GeoJSON, Shapefile, ... via
pyogrio) or a GeoParquet file (read with pyarrow: the GDAL in pyogrio's wheels has no
Parquet driver). Each feature is a polygon (an area of one class), a point (the tile
around it is of that class) or is left out with its reason counted: no class value, no
geometry, a line, an empty geometry.

Shapely (GEOS) parses the WKB, repairs invalid rings (``make_valid``), reprojects the
coordinates with pyproj and measures how much of a tile each class covers.
"""

from __future__ import annotations

import math
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from ..layout import class_folder_name, fold
from ..model import file_sha256
from ..outputs.geometry import pyproj_crs

#: Class field names tried, in order, when none is given (matched case-insensitively).
DEFAULT_CLASS_FIELDS = ("class", "label")
_PARQUET_SUFFIXES = (".parquet", ".geoparquet")


@dataclass
class Labels:
    """Label features with a class: ``geoms`` (shapely, in ``crs``), ``cls`` (index into
    ``classes``), ``fid`` (the feature's id in a vector file, as QGIS shows it; in GeoParquet
    its row number, 0-based) and ``kind`` (``polygon``
    or ``point``; a multi-point is one row per point)."""

    path: Path
    layer: str | None
    class_field: str
    crs: Any  # pyproj.CRS or None
    classes: list[str]
    geoms: np.ndarray
    cls: np.ndarray
    fid: np.ndarray
    kind: np.ndarray
    n_features: int
    dropped: dict[str, int] = field(default_factory=dict)
    """Features left out, by reason (``no_class``, ``no_geometry``, ``empty``, ``line``, ``invalid_geometry``)."""
    dropped_fids: dict[str, list[int]] = field(default_factory=dict)
    """Their ids (as ``fid``), by reason."""
    renamed: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def usable(self) -> int:
        """How many features have a class and a polygon or point (those not left out)."""
        return self.n_features - sum(self.dropped.values())

    def in_crs(self, crs) -> np.ndarray:
        """The geometries reprojected into ``crs`` (a rasterio or pyproj CRS); geometries
        that do not reproject to finite coordinates become None."""
        import shapely

        target = pyproj_crs(crs)
        if self.crs is None or target is None or self.crs == target:
            return self.geoms
        from pyproj import Transformer

        tr = Transformer.from_crs(self.crs, target, always_xy=True)

        def move(xy: np.ndarray) -> np.ndarray:
            x, y = tr.transform(xy[:, 0], xy[:, 1])
            return np.column_stack([x, y])

        out = shapely.transform(self.geoms, move)
        coords_ok = np.array([g is not None and np.isfinite(shapely.get_coordinates(g)).all() for g in out])
        out = np.where(coords_ok, out, None)
        poly = (self.kind == "polygon") & coords_ok
        out[poly] = shapely.make_valid(out[poly])
        return out


def _read_geoparquet(path: Path):
    import json

    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise InputError(f"cannot read the labels as Parquet: {exc}", path=str(path)) from None
    geo = (table.schema.metadata or {}).get(b"geo")
    if not geo:
        raise InputError("a Parquet file without GeoParquet metadata ('geo'): not a GeoParquet label file", path=str(path))
    geo = json.loads(geo)
    col = geo.get("primary_column", "geometry")
    info = geo.get("columns", {}).get(col, {})
    if info.get("encoding", "WKB").upper() != "WKB":
        raise InputError(f"GeoParquet geometry encoding {info.get('encoding')!r} is not supported (WKB is)", path=str(path))
    crs = info.get("crs", "OGC:CRS84")  # GeoParquet: a missing crs means longitude/latitude
    return table, (None if crs is None else pyproj_crs(json.dumps(crs) if isinstance(crs, dict) else crs)), col, None, None


def _read_ogr(path: Path, layer: str | None):
    import pyogrio

    try:
        layers = pyogrio.list_layers(str(path))
        names = [str(n) for n in layers[:, 0]]
        if layer is None and len(layers) > 1:
            warnings.warn(f"{path}: {len(layers)} layers ({', '.join(names)}); reading the first, "
                          f"'{layers[0, 0]}' (choose one with --layer)", UserWarning, stacklevel=4)  # read_labels' caller
            layer = names[0]  # named: the card records it, and pyogrio does not warn again in its own words
        if layer is not None and str(layer) not in names:
            raise ConfigError(f"--layer {layer!r} is not a layer of the labels; layers: {', '.join(names)}", path=str(path))
        meta, table = pyogrio.read_arrow(str(path), layer=layer, return_fids=True)
    except ConfigError:
        raise
    except Exception as exc:  # pyogrio's DataSourceError, DataLayerError, ...
        raise InputError(f"GDAL cannot read the labels as a vector file: {exc}", path=str(path)) from None
    if str(meta.get("encoding") or "UTF-8").upper().replace("-", "") != "UTF8" and not _utf8_text(table):
        # a Shapefile without a .cpg: GDAL hands over its bytes; guessing would give a legend of mojibake
        raise InputError("the labels' text is not UTF-8 and the file does not say which encoding it is in (a "
                         "Shapefile without its .cpg): put a .cpg file beside it naming the encoding (e.g. GBK for "
                         "Chinese, CP1252 for Western European), or set SHAPE_ENCODING to it (SHAPE_ENCODING=GBK) when you run this",
                         path=str(path))
    fid_col, fids = meta.get("fid_column"), None
    if fid_col in table.column_names:  # the file's own feature ids (QGIS' $id), kept apart from the fields
        fids, table = table.column(fid_col).to_pylist(), table.drop([fid_col])
    col = None
    for f in table.schema:
        if (f.metadata or {}).get(b"ARROW:extension:name", b"").startswith(b"geoarrow"):
            col = f.name
    if col is None:
        col = meta.get("geometry_name") or "wkb_geometry"
    crs = meta.get("crs")
    return table, (None if not crs else pyproj_crs(crs)), col, fids, layer


def _utf8_text(table) -> bool:
    """Whether the field names and text values of an Arrow table are valid UTF-8."""
    import pyarrow as pa

    try:
        table.column_names  # decoded here
        for col in table.columns:
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                col.validate(full=True)
    except (UnicodeDecodeError, pa.ArrowInvalid):
        return False
    return True


def _class_name(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            value = int(value)
    text = str(value).strip()
    return text or None


def _sort_classes(names: set[str]) -> list[str]:
    """Numeric codes in numeric order (2 before 10), names in alphabetical order."""
    if names and all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names, key=lambda n: (n.casefold(), n))


def read_labels(path: str | Path, class_field: str | None = None, layer: str | None = None) -> Labels:
    """Read a label file; see the module docstring. Raises :class:`InputError` naming the
    file when it is missing, unreadable, empty, has no class field or no usable feature."""
    path = Path(path)
    p = str(path)
    table, crs, gcol, file_fids, read = _read_table(path, layer)
    n = table.num_rows
    if n == 0:
        raise InputError("the labels file has no features: draw polygons or points of your classes first", path=p)
    try:
        fname = _class_field([c for c in table.column_names if c != gcol], class_field, p)
    except ConfigError as exc:
        raise ConfigError(exc.message + _other_layers(path, layer), path=p) from None
    if gcol not in table.column_names:
        raise InputError("the labels file has no geometry column", path=p)
    values = [_class_name(v) for v in table.column(fname).to_pylist()]
    geoms, names, fids, kinds, dropped_rows = _features(values, table.column(gcol).to_pylist())
    file_id = (lambda i: int(file_fids[i])) if file_fids is not None else int  # a vector file's ids, not row numbers
    fids = [file_id(i) for i in fids]
    dropped_fids = {k: [file_id(i) for i in rows] for k, rows in sorted(dropped_rows.items())}
    dropped = {k: len(v) for k, v in dropped_fids.items()}
    if not geoms:
        why = ", ".join(f"{c} {k.replace('_', ' ')}" for k, c in sorted(dropped.items()))
        raise InputError(f"none of the {n} label features is usable ({why}); features need a polygon or point "
                         f"geometry and a value in the class field '{fname}'", path=p)
    names, renamed = _folder_safe(names, p)
    classes = _sort_classes(set(names))
    index = {c: i for i, c in enumerate(classes)}
    if crs is None:
        warnings.warn(f"{p}: the labels have no CRS; they are taken to be in each scene's CRS", UserWarning, stacklevel=2)
    return Labels(path=path, layer=read, class_field=fname, crs=crs, classes=classes,
                  geoms=np.array(geoms, dtype=object), cls=np.array([index[v] for v in names], dtype=np.int64),
                  fid=np.array(fids, dtype=np.int64), kind=np.array(kinds), n_features=n,
                  dropped=dropped, dropped_fids=dropped_fids, renamed=renamed, sha256=file_sha256(path) if path.is_file() else "")


def _other_layers(path: Path, layer: str | None) -> str:
    """What a message about the fields adds where the file has other layers than the one read."""
    if layer is not None or path.suffix.lower() in _PARQUET_SUFFIXES:
        return ""
    import pyogrio

    names = [str(n) for n in pyogrio.list_layers(str(path))[:, 0]]
    return (f"; these are the fields of layer '{names[0]}', the first of {len(names)} ({', '.join(names)}): "
            "another may hold the classes (--layer NAME)") if len(names) > 1 else ""


def _read_table(path: Path, layer: str | None):
    """The labels as an Arrow table, their CRS (None: not stated), the geometry column's name,
    the features' ids in the file (None: row numbers serve, as in GeoParquet) and the layer read
    (None for a file of one layer)."""
    p = str(path)
    if not path.exists():
        raise InputError("labels file not found", path=p)
    if path.is_dir() and path.suffix.lower() not in (".gdb",):
        raise InputError("labels path is a folder; give a vector file (GeoPackage, GeoJSON, Shapefile, GeoParquet)", path=p)
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        return _read_geoparquet(path)
    return _read_ogr(path, layer)


def _class_field(fields: list[str], class_field: str | None, p: str) -> str:
    """The field holding the class: ``class_field`` (any case), else the first of :data:`DEFAULT_CLASS_FIELDS`."""
    if class_field is not None:
        match = [c for c in fields if c == class_field] or [c for c in fields if c.casefold() == class_field.casefold()]
        if not match:
            raise ConfigError(f"--class-field {class_field!r} is not a field of the labels; fields: {', '.join(fields) or 'none'}", path=p)
    else:
        match = []
        for want in DEFAULT_CLASS_FIELDS:
            match = [c for c in fields if c.casefold() == want]
            if match:
                break
        if not match:
            raise ConfigError(f"the labels have no 'class' or 'label' field; name the field that holds the class with "
                              f"--class-field (fields: {', '.join(fields) or 'none'})", path=p)
    return match[0]


def _features(values: list[str | None], wkb: list[bytes | None]):
    """The usable features (points one by one, polygons made valid and merged per feature) as geometries,
    class names, feature ids and kinds, and the rows left out by reason."""
    import shapely

    dropped: dict[str, list[int]] = {}  # reason -> rows
    geoms, names, fids, kinds = [], [], [], []
    for i, (v, w) in enumerate(zip(values, wkb)):
        try:  # a ring left open: GEOS refuses it (hand-edited GeoJSON has them)
            g = None if v is None or w is None else shapely.from_wkb(w)
        except shapely.errors.GEOSException:
            dropped.setdefault("invalid_geometry", []).append(i)
            continue
        if g is None or g.is_empty:
            dropped.setdefault("no_class" if v is None else "no_geometry" if w is None else "empty", []).append(i)
            continue
        if not np.isfinite(shapely.get_coordinates(g)).all():  # NaN or infinite vertices: GEOS fails on them
            dropped.setdefault("invalid_geometry", []).append(i)
            continue
        gt = g.geom_type
        # points one by one; a GeometryCollection's too (collections within it opened), beside its polygons
        parts = _simple_parts(g) if gt == "GeometryCollection" else []
        points = list(shapely.get_parts(g)) if gt in ("Point", "MultiPoint") else [p for p in parts if p.geom_type == "Point"]
        for part in points:
            geoms.append(part), names.append(v), fids.append(i), kinds.append("point")
        if gt in ("Polygon", "MultiPolygon", "GeometryCollection"):
            g = shapely.make_valid(shapely.GeometryCollection([p for p in parts if p.geom_type == "Polygon"])
                                   if gt == "GeometryCollection" else g)
            polys = [q for q in shapely.get_parts(g) if q.geom_type in ("Polygon", "MultiPolygon") and q.area > 0]
            if polys:
                geoms.append(shapely.union_all(polys)), names.append(v), fids.append(i), kinds.append("polygon")
            elif not points:
                dropped.setdefault("line" if gt == "GeometryCollection" else "empty", []).append(i)
        elif not points:
            dropped.setdefault("line", []).append(i)
    return geoms, names, fids, kinds, dropped


def _simple_parts(g) -> list:
    """A collection's non-empty points, lines and polygons, collections within it opened."""
    import shapely

    out = []
    for p in shapely.get_parts(g):
        if p.geom_type == "GeometryCollection" or p.geom_type.startswith("Multi"):
            out.extend(_simple_parts(p))
        elif not p.is_empty:
            out.append(p)
    return out


def _folder_safe(names: list[str], p: str) -> tuple[list[str], dict[str, str]]:
    """Class names made safe as folder names (with a warning naming the changes), and the changes;
    refuses two classes that would meet in one folder."""
    renamed: dict[str, str] = {}
    for v in set(names):
        safe = class_folder_name(v)
        if safe != v:
            renamed[v] = safe
    names = [renamed.get(v, v) for v in names]
    by_fold: dict[str, set[str]] = {}
    for v in set(names):
        by_fold.setdefault(fold(v), set()).add(v)
    clash = [sorted(s) for s in by_fold.values() if len(s) > 1]
    if clash:
        raise InputError(f"classes {clash[0]} differ only in case or in characters a folder name cannot hold; "
                         "rename one of them in the labels", path=p)
    if renamed:
        warnings.warn(f"{p}: class names changed to be folder names: "
                      + ", ".join(f"{a!r} -> {b!r}" + (" (its Unicode NFC form)" if unicodedata.normalize("NFC", a) == b
                                                      else "") for a, b in sorted(renamed.items())), UserWarning,
                      stacklevel=3)  # points at read_labels' caller
    return names, renamed


def crs_name(crs) -> str | None:
    """``EPSG:4326``-style name of a CRS when it has one, else its WKT name."""
    pj = pyproj_crs(crs)
    if pj is None:
        return None
    auth = pj.to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else pj.name

