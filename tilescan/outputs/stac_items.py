"""STAC Items describing a run's outputs, so they can be catalogued beside the inputs.

``tilescan run --stac-items`` writes ``OUT/<scene>/item.json`` for each finished scene (done
or already complete), after the scenes are processed: one STAC 1.1 Item whose assets are the
scene's outputs -- ``labels`` (the label COG), ``heatmap`` (the CAM COG), ``tiles`` (the
GeoParquet table), ``quicklook`` (PNG) and ``run`` (``run.json``) -- with the projection
extension on the item (the scene's CRS, bounds and grid) and on each COG asset (its own
grid), the model id and hash, and a ``derived_from`` link to the input (the source STAC item
when there was one, else the scene's URL or path, without credentials). The item's
``datetime`` is the source item's when known, else the time the outputs were finished.
Everything is read back from the finished folder (run.json, the COG headers), so items can
be written again at any time. Row bands of a sharded scene get no item (``collect`` joins them).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..layout import MANIFEST
from .cog import LABEL_NODATA
from .files import write_json
from .geometry import crs_text

ITEM = "item.json"
_ASSETS = {
    "labels.tif": ("labels", "image/tiff; application=geotiff; profile=cloud-optimized", ["data", "labels"],
                   f"tile labels (class index per tile, nodata {LABEL_NODATA})"),
    "heatmap.tif": ("heatmap", "image/tiff; application=geotiff; profile=cloud-optimized", ["data"],
                    "CAM heatmap of each tile's label, blended over the scene"),
    "tiles.parquet": ("tiles", "application/vnd.apache.parquet", ["data"],
                      "one row per tile: footprint, label, probabilities, CAM statistics (GeoParquet 1.1)"),
    "tiles.gpkg": ("tiles-gpkg", "application/geopackage+sqlite3", ["data"], "the tiles table as a GeoPackage"),
    "quicklook.png": ("quicklook", "image/png", ["overview"], "the scene with its labels and heatmap"),
    MANIFEST: ("run", "application/json", ["metadata"], "tilescan's run manifest"),
}


def _grid(path: Path) -> dict[str, Any]:
    import rasterio

    with rasterio.open(path) as ds:
        return {"shape": [ds.height, ds.width], "transform": list(ds.transform)[:6],
                "crs": crs_text(ds.crs), "bounds": list(ds.bounds)}


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
    geometry = bbox = None
    if crs:
        from rasterio.crs import CRS
        from rasterio.warp import transform_geom

        ring = [[c, f], [c + a * w, f + d * w], [c + a * w + b * h, f + d * w + e * h], [c + b * h, f + e * h], [c, f]]
        geometry = _in_longitude_range(transform_geom(CRS.from_user_input(crs), "EPSG:4326",
                                                      {"type": "Polygon", "coordinates": [ring]}, antimeridian_cutting=True))
        bbox = _lonlat_bbox(geometry)
    source = m.get("source") or {}
    finished = dt.datetime.strptime(m["finished_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    when = finished
    if source.get("datetime"):
        when = dt.datetime.fromisoformat(source["datetime"].replace("Z", "+00:00"))
    item = pystac.Item(id=f"{folder.name}-tilescan", geometry=geometry, bbox=bbox, datetime=when, properties={
        "created": finished.isoformat().replace("+00:00", "Z"),
        "title": f"tilescan outputs for {folder.name}",
        "tilescan:model_id": m["model"]["id"],
        "tilescan:model_sha256": m["model"]["sha256"],
        "tilescan:classes": m["model"]["classes"],
        "tilescan:tile_px": m["tiling"].get("tile_px"),
        "tilescan:cam_method": m["config"]["cam"]["method"],
        "tilescan:scene": m["scene"],
        "processing:software": {"tilescan": m["versions"].get("tilescan")},
    })
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    if crs:
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
            if g["crs"]:
                _set_crs(ap, g["crs"])
            ap.shape = g["shape"]
            ap.transform = g["transform"]
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


def _set_crs(proj, crs: str) -> None:
    if crs.upper().startswith("EPSG:"):
        proj.epsg = int(crs.split(":", 1)[1])
    else:
        from rasterio.crs import CRS

        proj.epsg = None
        proj.wkt2 = CRS.from_user_input(crs).to_wkt(version="WKT2_2019")  # the field is WKT2 (GDAL's default is WKT1)


def _in_longitude_range(geometry: dict) -> dict:
    """A lon/lat GeoJSON geometry with longitudes in -180..180: a polygon of 0..360 data (GDAL
    leaves it as it is) moved there and, where it then crosses 180°, cut there."""
    if geometry["type"] != "Polygon" or all(-180.0 <= p[0] <= 180.0 for p in geometry["coordinates"][0]):
        return geometry
    from .geometry import antimeridian_parts, wrap_longitudes

    (ring,), _ = wrap_longitudes(np.array(geometry["coordinates"][0][:-1], dtype=np.float64)[None])
    parts = [[list(p) for p in pts + pts[:1]] for pts in antimeridian_parts(ring)]
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": [parts[0]]}
    return {"type": "MultiPolygon", "coordinates": [[p] for p in parts]}


def _lonlat_bbox(geometry: dict) -> list[float]:
    """A GeoJSON geometry's bbox; for one cut at the antimeridian, west of it first and east
    last, so west > east (RFC 7946, 5.2), rather than a box around the globe."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    boxes = [(min(p[0] for p in poly[0]), min(p[1] for p in poly[0]), max(p[0] for p in poly[0]),
              max(p[1] for p in poly[0])) for poly in polys]
    south, north = min(b[1] for b in boxes), max(b[3] for b in boxes)
    east_of = [b for b in boxes if b[2] >= 180.0]  # the parts ending at 180° and those starting at -180°
    west_of = [b for b in boxes if b[0] <= -180.0]
    if east_of and west_of and len(east_of) + len(west_of) == len(boxes):
        return [min(b[0] for b in east_of), south, max(b[2] for b in west_of), north]
    return [min(b[0] for b in boxes), south, max(b[2] for b in boxes), north]


def write_items(out: Path, folders: list[Path], log: Callable[[str], None]) -> list[Path]:
    """``item.json`` in each finished whole-scene folder of ``folders``; returns their paths."""
    written = []
    for folder in folders:
        if folder.parent != out or not (folder / MANIFEST).is_file():
            continue  # a row band: no item
        try:
            write_json(folder / ITEM, item_for(folder))
            written.append(folder / ITEM)
        except Exception as exc:  # an item is an extra: its failure never fails the run
            log(f"warning: {folder}: no STAC item written: {type(exc).__name__}: {exc}")
    return written
