"""STAC Items describing a run's outputs, so they can be catalogued beside the inputs.

``tilescan run --stac-items`` writes ``OUT/<scene>/item.json`` for each finished scene (done
or already complete), after the scenes are processed: one STAC 1.1 Item whose assets are the
scene's outputs -- ``labels`` (the label COG), ``heatmap`` (the CAM COG), ``tiles`` (the
GeoParquet table), ``quicklook`` (PNG) and ``run`` (``run.json``) -- with the projection
extension on the item (the scene's CRS, bounds and grid) and on each COG asset (its own
grid), the label COG's classes (classification extension: value, name, colour) and both COGs'
data type and nodata, the model id and hash, and a ``derived_from`` link to the input (the
source STAC item when there was one, else the scene's URL or path, without credentials).
The item's ``datetime`` is the time of the data where tilescan can know it -- the source
item's (or its start and end), else the acquisition time GDAL reads from the scene's
metadata, else the TIFF's own date tag -- and only then the time the outputs were finished;
``tilescan:datetime_source`` says which. A scene whose corners cannot be put in longitude
and latitude (a geostationary view reaching past the Earth's disc) gets an item without a
footprint (``geometry`` null, as STAC allows) that says so. Everything is read back from the
finished folder (run.json, the COG headers), so items can be written again at any time. Row
bands of a scene split across shards get no item (neither does ``collect``'s join of them).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..layout import COLLECTED, MANIFEST, TIME_FORMAT
from .cog import LABEL_NODATA
from .files import write_json
from .geometry import (BOWED_PER_EDGE, antimeridian_parts, bowed_edges, crs_text, edge_points, polar_cap_ring,
                       pole_turns, ring_in_lonlat, through_poles)

ITEM = "item.json"
_ASSETS = {
    "labels.tif": ("labels", "image/tiff; application=geotiff; profile=cloud-optimized", ["data", "labels"],
                   f"tile labels (class index per tile, nodata {LABEL_NODATA})"),
    "heatmap.tif": ("heatmap", "image/tiff; application=geotiff; profile=cloud-optimized", ["data"],
                    "CAM heatmap of each tile's label: 0..1, 1 the tile's strongest evidence, overlapping tiles "
                    "averaged, nodata -1"),
    "tiles.parquet": ("tiles", "application/vnd.apache.parquet", ["data"],
                      "one row per tile: footprint, label, probabilities, CAM statistics (GeoParquet 1.1)"),
    "tiles.gpkg": ("tiles-gpkg", "application/geopackage+sqlite3", ["data"], "the tiles table as a GeoPackage"),
    "quicklook.png": ("quicklook", "image/png", ["overview"], "the scene with its labels and heatmap"),
    MANIFEST: ("run", "application/json", ["metadata"], "tilescan's run manifest"),
}


_PROCESSING = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
_CLASSIFICATION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"


def _grid(path: Path) -> dict[str, Any]:
    """A COG's grid, CRS, data type and nodata, and its colour table where it has one."""
    import rasterio

    with rasterio.open(path) as ds:
        try:
            colormap = ds.colormap(1)
        except ValueError:  # no colour table
            colormap = None
        return {"shape": [ds.height, ds.width], "transform": list(ds.transform)[:6], "crs": crs_text(ds.crs),
                "bounds": list(ds.bounds), "data_type": ds.dtypes[0], "nodata": ds.nodata, "colormap": colormap}


def _classes(classes: list[str], colormap: dict | None) -> list[dict]:
    """classification:classes of the label COG: each class's pixel value, a machine name (the
    extension allows letters, digits, - and _ only), its own name as title, its colour; then nodata."""
    import re

    out = []
    for i, name in enumerate(classes):
        c = {"value": i, "name": re.sub(r"[^0-9A-Za-z_-]", "_", name) or f"class_{i}", "title": name}
        if colormap and i in colormap:
            c["color_hint"] = "".join(f"{v:02X}" for v in colormap[i][:3])
        out.append(c)
    return out + [{"value": LABEL_NODATA, "name": "nodata", "title": "no label (not classified)", "nodata": True}]


def item_for(folder: Path) -> dict:
    """The STAC Item (a dict) for a finished scene folder."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension

    m = json.loads((folder / MANIFEST).read_text())
    si = m["scene_info"]
    crs = si.get("crs")
    w, h = si["width"], si["height"]
    a, b, c, d, e, f = si["transform"]
    xs = [c, c + a * w, c + b * h, c + a * w + b * h]
    ys = [f, f + d * w, f + e * h, f + d * w + e * h]
    native_bbox = [min(xs), min(ys), max(xs), max(ys)]
    ring = [[c, f], [c + a * w, f + d * w], [c + a * w + b * h, f + d * w + e * h], [c + b * h, f + e * h], [c, f]]
    geometry, no_footprint = _footprint(crs, ring)
    source = m.get("source") or {}
    finished = dt.datetime.strptime(m["finished_at"], TIME_FORMAT).replace(tzinfo=dt.timezone.utc)
    when, span, when_from = _when(source, si.get("acquired"), finished)
    item = pystac.Item(id=f"{folder.name}-tilescan", geometry=geometry, bbox=geometry and _lonlat_bbox(geometry),
                       datetime=when, start_datetime=span[0], end_datetime=span[1], properties={
        "created": _iso(finished),
        "tilescan:datetime_source": when_from,
        "title": f"tilescan outputs for {folder.name}",
        "tilescan:model_id": m["model"]["id"],
        "tilescan:model_sha256": m["model"]["sha256"],
        "tilescan:classes": m["model"]["classes"],
        "tilescan:tile_px": m["tiling"].get("tile_px"),
        "tilescan:cam_method": m["config"]["cam"]["method"],
        "tilescan:scene": m["scene"],
        "processing:software": {"tilescan": m["versions"].get("tilescan")},
    })
    if no_footprint:
        item.properties["tilescan:footprint"] = no_footprint
    item.stac_extensions += [_PROCESSING, _CLASSIFICATION]
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    _set_crs(proj, crs)
    proj.shape = [h, w]
    proj.transform = [a, b, c, d, e, f]
    proj.bbox = native_bbox
    for name in m.get("outputs", []) + [MANIFEST]:
        if name not in _ASSETS or not (folder / name).exists():
            continue
        key, media, roles, title = _ASSETS[name]
        asset = pystac.Asset(href=f"./{name}", media_type=media, roles=roles, title=title)
        item.add_asset(key, asset)
        if name.endswith(".tif"):
            g = _grid(folder / name)
            ap = ProjectionExtension.ext(asset)
            _set_crs(ap, g["crs"])
            ap.shape = g["shape"]
            ap.transform = g["transform"]
            ap.bbox = g["bounds"]  # its own: the label COG's whole tiles reach past the scene's edge
            asset.extra_fields.update(data_type=g["data_type"], nodata=g["nodata"])  # STAC 1.1 common metadata
            if key == "labels":
                asset.extra_fields["classification:classes"] = _classes(m["model"]["classes"], g["colormap"])
        elif name == "quicklook.png":  # a picture, not on the scene's grid: no CRS, its own size
            asset.extra_fields.update({"proj:code": None, "proj:shape": _png_shape(folder / name)})
    from ..scene.grid import scale_note

    note = scale_note(m.get("warning_details") or [])
    if note:  # labels outside the model's scale
        item.properties["tilescan:scale_warning"] = note
    if source.get("kind") == "stac":
        item.properties["tilescan:source_item"] = source.get("item")
        if source.get("collection"):
            item.properties["tilescan:source_collection"] = source["collection"]
    item.add_link(pystac.Link("derived_from", m["scene"].split("#", 1)[0] if source.get("kind") == "stac" else m["scene"],
                              title="the input scene" if source.get("kind") != "stac" else f"source item {source.get('item')}"))
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    return d


def _set_crs(proj, crs: str | None) -> None:
    """proj:code ("EPSG:n"), or null with proj:wkt2 for a CRS without a code; null without a CRS."""
    if crs and crs.upper().startswith("EPSG:"):
        proj.epsg = int(crs.split(":", 1)[1])
        return
    proj.properties["proj:code"] = None  # the extension asks for null, not a missing key (pystac drops it)
    if crs:
        from rasterio.crs import CRS

        proj.wkt2 = CRS.from_user_input(crs).to_wkt(version="WKT2_2019")  # the field is WKT2 (GDAL's default is WKT1)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _when(source: dict, acquired: dict | None,
          finished: dt.datetime) -> tuple[dt.datetime | None, tuple[dt.datetime | None, dt.datetime | None], str]:
    """The item's datetime, its start and end, and where they come from: the source item's,
    the scene's acquisition or image date (run.json ``scene_info.acquired``), else the run's end."""
    def parse(text):  # in UTC, as the run's own times are written
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(dt.timezone.utc) if text else None

    span = parse(source.get("start_datetime")), parse(source.get("end_datetime"))
    if source.get("datetime") or all(span):
        return parse(source.get("datetime")), span if all(span) else (None, None), "source item"
    if acquired and acquired.get("datetime"):
        return parse(acquired["datetime"]), (None, None), acquired["from"]
    return finished, (None, None), "processing time (the scene carries no date)"


def _footprint(crs: str | None, ring: list[list[float]]) -> tuple[dict | None, str | None]:
    """The scene's outline in longitude and latitude (:func:`_lonlat_geometry`); None and why
    where there is no CRS or a point of it has no longitude."""
    if not crs:
        return None, None
    from rasterio.crs import CRS
    from rasterio.warp import transform

    src = CRS.from_user_input(crs)

    def to_lonlat(x, y):
        return transform(src, "EPSG:4326", np.asarray(x).tolist(), np.asarray(y).tolist())

    try:
        corners = np.asarray(ring, dtype=np.float64)[None, :4]
        dense = edge_points(corners, BOWED_PER_EDGE)
        outline = ring_in_lonlat(dense, to_lonlat)  # corners at 0, k, 2k, 3k
        bowed = bool(np.isfinite(outline).all() and bowed_edges(corners, outline[:, ::BOWED_PER_EDGE], to_lonlat)[0])
        if bowed:
            outline = through_poles(dense[0], outline[0], to_lonlat)[None]
    except Exception as exc:  # GDAL's "Point outside of projection domain" (rasterio's CPLE_* are private)
        why = f"a point of its outline lies outside the area its CRS maps; GDAL: {str(exc).strip()}"
    else:
        why = None if np.isfinite(outline).all() else "a point of its outline has no finite longitude or latitude"
    if why:
        return None, (f"no footprint: the scene's corners cannot be put in longitude and latitude ({why}); "
                      "a view past the Earth's edge (a geostationary disc) has corners in space")
    return _lonlat_geometry(outline[0], bowed), None


def _lonlat_geometry(outline: np.ndarray, bowed: bool) -> dict:
    """A scene's outline (an open longitude/latitude ring of ``BOWED_PER_EDGE`` points along
    each edge, the corners first; where its edges bow, with a point where one passes through a
    pole) as a GeoJSON Polygon of its corners, or of all its points where its edges bow there
    (near a pole, or a scene hundreds of km across): counter-clockwise, its first point first;
    in -180..180, cut at 180° into a MultiPolygon where it crosses it (its longitudes followed
    along the edges: a scene over 180° wide goes the long way round, 0..360 data come back);
    round a pole, a cap over every longitude closed along the pole."""
    if pole_turns(outline[None])[0] != 0:
        cap, _ = polar_cap_ring(outline if bowed else outline[::BOWED_PER_EDGE])
        return {"type": "Polygon", "coordinates": [[[float(x), float(y)] for x, y in cap]]}
    r = outline.copy()
    r[:, 0] = np.unwrap(r[:, 0], period=360.0)  # unchanged where no step is over 180°
    r = r if bowed else r[::BOWED_PER_EDGE]
    west = r[:, 0].min()
    if r[:, 0].max() - west >= 360.0:  # every longitude (a world mosaic, in 0..360 too, or wider): -180..180, uncut
        r[:, 0] = np.clip(r[:, 0] - (west + 180.0), -180.0, 180.0)
        parts = [r]
    else:
        r[:, 0] -= 360.0 * np.floor((west + 180.0) / 360.0)
        parts = antimeridian_parts(r) if r[:, 0].max() > 180.0 else [r]
    polys = [[_ccw([[float(x), float(y)] for x, y in [*part, part[0]]])] for part in parts]
    return {"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1 else {"type": "MultiPolygon", "coordinates": polys}


def _polygons(geometry: dict) -> list:
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def _ccw(ring: list) -> list:
    """A closed ring counter-clockwise (RFC 7946, 3.1.6; a scene's corners in order run clockwise)."""
    x, y = np.asarray(ring, dtype=np.float64)[:, :2].T
    twice_area = float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))
    return [list(p) for p in (ring if twice_area >= 0 else ring[::-1])]


def _png_shape(path: Path) -> list[int]:
    """A PNG's [height, width], from its header."""
    import struct

    with open(path, "rb") as fh:
        w, h = struct.unpack(">II", fh.read(24)[16:24])
    return [h, w]


def _lonlat_bbox(geometry: dict) -> list[float]:
    """A GeoJSON geometry's bbox; for one cut at the antimeridian, west of it first and east
    last, so west > east (RFC 7946, 5.2), rather than a box around the globe."""
    polys = _polygons(geometry)
    boxes = [(min(p[0] for p in poly[0]), min(p[1] for p in poly[0]), max(p[0] for p in poly[0]),
              max(p[1] for p in poly[0])) for poly in polys]
    south, north = min(b[1] for b in boxes), max(b[3] for b in boxes)
    east_of = [b for b in boxes if b[2] >= 180.0]  # the parts ending at 180° and those starting at -180°
    west_of = [b for b in boxes if b[0] <= -180.0]
    if east_of and west_of and len(east_of) + len(west_of) == len(boxes):
        return [min(b[0] for b in east_of), south, max(b[2] for b in west_of), north]
    return [min(b[0] for b in boxes), south, max(b[2] for b in boxes), north]


def write_items(out: Path, folders: list[Path], log: Callable[[str], None]) -> dict[Path, dict]:
    """``item.json`` in each finished whole-scene folder of ``folders``; returns, for each folder
    whose item has no footprint or could not be written, a structured warning (also logged)."""
    said = {}
    for folder in folders:
        if folder.parent != out or not (folder / MANIFEST).is_file():
            continue  # a row band: no item
        try:
            item = item_for(folder)
            write_json(folder / ITEM, item)
        except Exception as exc:  # an item is an extra: its failure never fails the run
            said[folder] = {"code": "stac_item", "message": f"{folder}: no STAC item written: {type(exc).__name__}: {exc}"}
        else:
            if note := item["properties"].get("tilescan:footprint"):
                said[folder] = {"code": "stac_item", "message": f"{folder / ITEM}: {note}"}
        if folder in said:
            log(f"warning: {said[folder]['message']}")
    return said


COLLECTION = "collection.json"
ITEM_COLLECTION = "items.json"


def write_collection(stage: Path, out: Path, folders: list[Path], log: Callable[[str], None]) -> int:
    """``collection.json`` (a STAC Collection linking each scene's ``item.json`` by relative
    paths, its extent theirs) and ``items.json`` (those items as one ItemCollection, each
    naming the Collection, its assets by absolute path: what GDAL's STACIT driver and pgstac
    take) into ``stage``, the collected folder being made in ``out``, for the whole-scene
    folders of ``folders`` that have an item (``run --stac-items``); returns how many."""
    items, without = [], []
    for folder in folders:
        if folder.parent != out or not (folder / ITEM).is_file():
            name = folder.relative_to(out).parts[0] if folder.is_relative_to(out) else str(folder)
            without += [name] if name not in without else []  # a scene of row bands once
            continue
        try:
            items.append((folder, json.loads((folder / ITEM).read_text())))
        except (OSError, ValueError) as exc:
            log(f"warning: collect: {folder / ITEM} cannot be read ({exc}): left out of {COLLECTION}")
    if not items:
        return 0
    if without:  # a scene run without --stac-items, or split into row bands (which get no item)
        log(f"collect: {len(without)} scene folder(s) without a STAC item, left out of {COLLECTION}: "
            f"{', '.join(without[:5])}{' …' if len(without) > 5 else ''} (run --stac-items on them writes one)")
    cid = f"{out.name}-tilescan"
    features = []
    for folder, d in items:
        d = {**d, "collection": cid, "links": d.get("links", []) + [{"rel": "collection", "type": "application/json",
                                                                      "href": str(out / COLLECTED / COLLECTION)}]}
        # absolute: GDAL takes a relative href from its working folder, not from the document
        d["assets"] = {k: {**a, "href": str((folder / a["href"]).resolve())} for k, a in d["assets"].items()}
        features.append(d)
    collection = {
        "type": "Collection", "stac_version": "1.1.0", "id": cid, "title": f"tilescan outputs in {out.name}",
        "description": "Tile labels, CAM heatmaps and tables that tilescan made, one item per scene",
        "license": "other", "extent": {"spatial": {"bbox": [_union_bbox([d.get("bbox") for _, d in items])]},
                                       "temporal": {"interval": [_interval([d["properties"] for _, d in items])]}},
        "links": [{"rel": "item", "href": f"../{folder.name}/{ITEM}", "type": "application/geo+json"} for folder, _ in items]
                 + [{"rel": "items", "href": f"./{ITEM_COLLECTION}", "type": "application/geo+json"}]}
    write_json(stage / COLLECTION, collection)
    write_json(stage / ITEM_COLLECTION, {"type": "FeatureCollection", "features": features})
    return len(items)


def _union_bbox(boxes: list) -> list[float]:
    """The lon/lat box round the items' boxes: the narrowest span of longitudes holding them all,
    west > east where it crosses 180° (RFC 7946, as an item's box does); the whole range of
    longitudes where they circle the globe or none has a box (no footprint)."""
    boxes = [b for b in boxes if b]
    if not boxes:
        return [-180.0, -90.0, 180.0, 90.0]
    west, east = _lon_span([(b[0], b[2]) for b in boxes])
    return [west, min(b[1] for b in boxes), east, max(b[3] for b in boxes)]


def _lon_span(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """(west, east) of the narrowest span of longitudes holding every (west, east) span of
    ``spans`` (each crossing 180° where west > east): the circle less its widest gap."""
    pieces = sorted(p for w, e in spans for p in ([(w, e)] if w <= e else [(w, 180.0), (-180.0, e)]))
    runs: list[list[float]] = []  # the pieces merged where they overlap or touch
    for w, e in pieces:
        if runs and w <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], e)
        else:
            runs.append([w, e])
    # each gap as (width, the west edge after it, the east edge before it), the one across 180° last
    gaps = [(b[0] - a[1], b[0], a[1]) for a, b in zip(runs, runs[1:])]
    gaps.append((runs[0][0] + 360.0 - runs[-1][1], runs[0][0], runs[-1][1]))
    width, west, east = max(gaps, key=lambda g: (g[0], g[1] <= g[2]))  # a tie: rather not across 180°
    return (west, east) if width > 0 or len(runs) > 1 else (-180.0, 180.0)


def _interval(props: list[dict]) -> list[str | None]:
    """The first and last time of the items (datetime, or start and end)."""
    times = sorted(t for p in props for t in (p.get("datetime"), p.get("start_datetime"), p.get("end_datetime")) if t)
    return [times[0], times[-1]] if times else [None, None]
