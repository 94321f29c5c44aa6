"""CRS conversion (pyproj, PROJJSON) and tile footprints as WKB polygons.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from ..errors import InputError

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
        return _pyproj_of(wkt)
    return _pyproj_of(crs) if isinstance(crs, str) else pyproj.CRS.from_user_input(crs)


def crs_text(crs: Any) -> str | None:
    """A rasterio CRS as run.json and STAC Items name it: ``EPSG:n`` where that code is exactly
    it, else its WKT (a CRS GDAL matches to a code at 70 % only, one with a datum shift, keeps it)."""
    if crs is None:
        return None
    code = crs.to_epsg(confidence_threshold=100)
    return f"EPSG:{code}" if code else crs.to_wkt()


@functools.lru_cache(maxsize=64)
def _pyproj_of(text: str):
    """Read once per text: a run's scenes share a few CRSs (pyproj's CRS is safe across threads)."""
    import pyproj

    return pyproj.CRS.from_user_input(text)


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


BBOX_TYPE = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()),
                       ("xmax", pa.float64()), ("ymax", pa.float64())])


def bbox_column(corners: np.ndarray) -> pa.StructArray:
    """The ``bbox`` covering column (GeoParquet 1.1) of (N,4,2) footprint corners."""
    c = np.asarray(corners, dtype=np.float64)
    return pa.StructArray.from_arrays(
        [pa.array(c[..., 0].min(axis=1)), pa.array(c[..., 1].min(axis=1)),
         pa.array(c[..., 0].max(axis=1)), pa.array(c[..., 1].max(axis=1))], fields=list(BBOX_TYPE))


def extent(corners: np.ndarray) -> tuple[float, float, float, float] | None:
    """(xmin, ymin, xmax, ymax) of (N,4,2) footprint corners; None for none."""
    c = np.asarray(corners, dtype=np.float64)
    return (c[..., 0].min(), c[..., 1].min(), c[..., 0].max(), c[..., 1].max()) if len(c) else None


def edge_points(corners: np.ndarray, per_edge: int) -> np.ndarray:
    """``per_edge`` points along each edge of (..., 4, 2) quadrilaterals, the corners first:
    (..., 4 * per_edge, 2), an open ring."""
    c = np.asarray(corners, dtype=np.float64)
    t = (np.arange(per_edge) / per_edge)[:, None]
    return np.concatenate([c[..., j, None, :] + t * (c[..., (j + 1) % 4, None, :] - c[..., j, None, :])
                           for j in range(4)], axis=-2)


#: points along each edge of a footprint drawn as its CRS bends it (:func:`bowed_edges`: near a pole)
BOWED_PER_EDGE = 16


def bowed_edges(corners: np.ndarray, lonlat: np.ndarray, to_lonlat: Callable, tol: float = 1e-3) -> np.ndarray:
    """(N,) True for the (N,4,2) quadrilaterals ``corners`` (in their CRS, ``lonlat`` the same
    corners in longitude/latitude) with an edge whose points at a quarter, the middle or three
    quarters of its length, put in longitude/latitude by ``to_lonlat(x, y)``, lie off the
    straight line between its corners there by more than ``tol`` of that line's length
    (longitudes scaled by the cosine of the tile's latitude, so that both count as on the
    ground; three points, as an edge can bend both ways): their corners alone draw them
    wrongly (near a pole)."""
    c = np.asarray(corners, dtype=np.float64)
    a = np.asarray(lonlat, dtype=np.float64)
    east = np.cos(np.radians(np.nanmean(a[..., 1], axis=1, keepdims=True)))

    def from_a(p: np.ndarray) -> np.ndarray:  # p - a, longitudes the short way round, scaled
        d = p - a
        d[..., 0] = ((d[..., 0] + 180.0) % 360.0 - 180.0) * east
        return d

    ab = from_a(np.roll(a, -1, axis=1))
    length2 = (ab ** 2).sum(axis=-1)
    length2[length2 == 0] = 1.0
    bowed = np.zeros(len(c), dtype=bool)
    for t in (0.25, 0.5, 0.75):
        ap = from_a(points_in_lonlat(c + t * (np.roll(c, -1, axis=1) - c), to_lonlat))
        with np.errstate(invalid="ignore"):
            bow = np.abs(ab[..., 0] * ap[..., 1] - ab[..., 1] * ap[..., 0]) / length2
        bowed |= (np.nan_to_num(bow, nan=0.0) > tol).any(axis=1)
    return bowed


def points_in_lonlat(points: np.ndarray, to_lonlat: Callable) -> np.ndarray:
    """(..., 2) points in their CRS put in longitude/latitude by ``to_lonlat(x, y)``."""
    p = np.asarray(points, dtype=np.float64)
    x, y = to_lonlat(p[..., 0].ravel(), p[..., 1].ravel())
    return np.stack([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)], axis=-1).reshape(p.shape)


def ring_in_lonlat(ring: np.ndarray, to_lonlat: Callable) -> np.ndarray:
    """(..., k, 2) rings in their CRS put in longitude/latitude by ``to_lonlat(x, y)``; a point
    on a pole whose longitude the CRS leaves to chance (polar stereographic: a hair away it is
    another) is taken that hair towards its ring's middle, so that the ring's longitudes turn
    as the ring goes round or past the pole (an edge through it)."""
    r = np.asarray(ring, dtype=np.float64)
    out = points_in_lonlat(r, to_lonlat)
    at_pole = np.abs(out[..., 1]) > 90.0 - 1e-9
    if at_pole.any():
        moved = points_in_lonlat(r + 1e-6 * (r.mean(axis=-2, keepdims=True) - r), to_lonlat)
        turned = np.abs((moved[..., 0] - out[..., 0] + 180.0) % 360.0 - 180.0) > 1.0
        out[at_pole & turned] = moved[at_pole & turned]  # not a CRS in degrees, nor one that draws the pole as a line
    return out


def through_poles(ring: np.ndarray, lonlat: np.ndarray, to_lonlat: Callable, steps: int = 50) -> np.ndarray:
    """An open ring (k, 2) in its CRS, ``lonlat`` the same put in longitude/latitude by
    :func:`ring_in_lonlat`, with a point added where it passes through a pole between two of
    its points (their longitudes half a turn apart, so which way round is anyone's): the
    crossing, found by bisection, taken a hair towards the ring's middle, so that the ring's
    longitudes turn the way its inside lies."""
    r, ll = np.asarray(ring, dtype=np.float64), np.asarray(lonlat, dtype=np.float64)
    nxt = np.roll(np.arange(len(r)), -1)
    half = np.abs((ll[nxt, 0] - ll[:, 0] + 180.0) % 360.0 - 180.0) > 180.0 - 1e-6
    cross = np.flatnonzero(half & (np.abs(ll[:, 1]) > 45.0) & (np.abs(ll[nxt, 1]) > 45.0))
    if not len(cross):
        return ll
    a, b = r[cross], r[nxt[cross]]
    lo, hi = np.zeros(len(cross)), np.ones(len(cross))
    for _ in range(steps):  # the crossing: where the longitude leaves its first point's
        mid = (lo + hi) / 2
        lon = points_in_lonlat(a + mid[:, None] * (b - a), to_lonlat)[:, 0]
        before = np.abs((lon - ll[cross, 0] + 180.0) % 360.0 - 180.0) < 90.0
        lo, hi = np.where(before, mid, lo), np.where(before, hi, mid)
    at = a + lo[:, None] * (b - a)
    return np.insert(ll, cross + 1, points_in_lonlat(at + 1e-6 * (r.mean(axis=0) - at), to_lonlat), axis=0)


def geo_metadata(crs_json: dict | None, bbox: Sequence[float] | None,
                 types: Sequence[str] = ("Polygon",)) -> dict:
    """A table's ``geo`` metadata (GeoParquet 1.1): WKB footprints in ``geometry`` (counter-
    clockwise, planar edges) in the CRS ``crs_json`` (PROJJSON; None: pixel space), with the
    ``bbox`` covering column; ``bbox``: the footprints' extent, left out for a table without rows."""
    col: dict[str, Any] = {"encoding": "WKB", "geometry_types": list(types), "crs": crs_json,
                           "orientation": "counterclockwise", "edges": "planar",
                           "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}
    if bbox is not None:
        col["bbox"] = [float(v) for v in bbox]
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}


def wrap_longitudes(corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,4,2) longitude/latitude corners with each tile's longitudes made continuous (no
    jump of 360 between corners) and its west edge brought into [-180, 180); and which tiles
    then reach east of 180°, across the antimeridian. Scenes in 0..360 longitudes come back
    in -180..180."""
    c = np.array(corners, dtype=np.float64)
    x = c[..., 0]
    x = x[:, :1] + (x - x[:, :1] + 180.0) % 360.0 - 180.0  # within 180° of the first corner
    x -= 360.0 * np.floor((x.min(axis=1, keepdims=True) + 180.0) / 360.0)
    c[..., 0] = x
    return c, x.max(axis=1) > 180.0


def _half(ring: np.ndarray, west: bool) -> list[tuple[float, float]]:
    """The part of a convex ring (open, k x 2) west (or east) of longitude 180."""
    out = []
    for p, q in zip(ring, np.roll(ring, -1, axis=0)):
        p_in, q_in = (p[0] <= 180.0, q[0] <= 180.0) if west else (p[0] >= 180.0, q[0] >= 180.0)
        if p_in:
            out.append((float(p[0]), float(p[1])))
        if p_in != q_in:
            t = (180.0 - p[0]) / (q[0] - p[0])
            out.append((180.0, float(p[1] + t * (q[1] - p[1]))))
    return out


def antimeridian_parts(ring: np.ndarray) -> list[list[tuple[float, float]]]:
    """A convex ring (open, k x 2) with continuous longitudes, its west edge in [-180, 180),
    as its parts west and east of 180° (the east one moved to -180..), open and in the ring's
    orientation, as GeoJSON (RFC 7946) cuts geometries there; one part if it does not cross."""
    parts = []
    for west in (True, False):
        pts = _half(np.asarray(ring, dtype=np.float64), west)
        if len(pts) >= 3:
            parts.append(pts if west else [(x - 360.0, y) for x, y in pts])
    return parts


def antimeridian_wkb(corners: np.ndarray) -> bytes:
    """A tile's footprint that crosses 180° (corners as :func:`wrap_longitudes` gives them) as
    a WKB MultiPolygon of its :func:`antimeridian_parts`, each counter-clockwise; a Polygon if
    one part is empty."""
    ring = _ccw_rings(np.asarray(corners, dtype=np.float64)[None])[0, :4]
    return _parts_wkb(antimeridian_parts(ring))


def _parts_wkb(parts: list[list[tuple[float, float]]]) -> bytes:
    """Open rings as a WKB Polygon each (closed), a MultiPolygon of them where there are several."""
    polys = [struct.pack("<BII", 1, 3, 1) + struct.pack("<I", len(pts) + 1)
             + struct.pack(f"<{2 * (len(pts) + 1)}d", *(v for p in pts + pts[:1] for v in p)) for pts in parts]
    return polys[0] if len(polys) == 1 else struct.pack("<BII", 1, 6, len(polys)) + b"".join(polys)


def domain_ring(corners: np.ndarray, to_lonlat: Callable, per_edge: int = 16,
                steps: int = 40) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a tile's footprint (4 corners in its CRS) that the CRS maps to longitude and
    latitude (a geostationary disc's, whose edge tiles reach into space), as an open ring of
    longitude/latitude points and the same points in the CRS; None where no part maps. The
    ring keeps the tile's corners that map and the points where its edges leave the mapped part,
    so an edge it shares with a neighbour is drawn as the neighbour's (corner to corner); where
    the tile lies off it, the ring follows the mapped part's edge, found from points along the
    tile's edges moved along rays from a point that maps (the tile's centre, else the nearest of
    a 9 x 9 lattice) to the last one that does, by bisection: exact where the part is convex, as
    a disc's is.
    ``to_lonlat(x, y)``: arrays in, arrays out, not finite off it."""
    c = np.asarray(corners, dtype=np.float64)[:4]

    def maps(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ll = points_in_lonlat(p, to_lonlat)
        return ll, np.isfinite(ll).all(axis=-1)

    def last_mapped(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """On each segment from a point that maps (a) to one that does not (b), the last that does."""
        lo, hi = np.zeros(len(b)), np.ones(len(b))
        for _ in range(steps):
            mid = (lo + hi) / 2
            inside = maps(a + mid[:, None] * (b - a))[1]
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        return a + np.maximum(lo - 1e-7, 0.0)[:, None] * (b - a)  # a hair inside: maps back too (the limb's edge may not)

    edge = edge_points(c, per_edge)  # corners at 0, k, 2k, 3k
    u, v = (g.reshape(-1, 1) for g in np.meshgrid(np.linspace(0, 1, 9), np.linspace(0, 1, 9)))
    lattice = (1 - u) * (1 - v) * c[0] + u * (1 - v) * c[1] + u * v * c[2] + (1 - u) * v * c[3]
    ok = maps(lattice)[1]
    if not ok.any():
        return None
    inner = lattice[ok][np.argmin(np.hypot(*(lattice[ok] - c.mean(axis=0)).T))]
    on = maps(edge)[1]
    limb = np.full_like(edge, np.nan)
    limb[~on] = last_mapped(np.repeat(inner[None], int((~on).sum()), axis=0), edge[~on])
    nxt = np.roll(np.arange(len(edge)), -1)
    change = on != on[nxt]  # the boundary crosses the edge between this point and the next
    a, b = np.where(on[change, None], edge[change], edge[nxt][change]), np.where(on[change, None], edge[nxt][change], edge[change])
    cross = np.full_like(edge, np.nan)
    cross[change] = last_mapped(a, b)
    ring = []
    for k in range(len(edge)):
        if on[k] and k % per_edge == 0:
            ring.append(edge[k])  # a corner that maps
        elif not on[k]:
            ring.append(limb[k])
        if change[k]:
            ring.append(cross[k])
    native = np.array(ring)
    pts, fine = maps(native)
    pts, native = pts[fine], native[fine]
    keep = np.r_[True, np.any(np.diff(pts, axis=0) != 0, axis=1)]  # points that bisected onto one
    return (pts[keep], native[keep]) if keep.sum() >= 3 else None


def ring_wkb(ring: np.ndarray) -> tuple[bytes, tuple[float, float, float, float], bool] | None:
    """An open longitude/latitude ring (:func:`domain_ring`) as a WKB Polygon, counter-clockwise,
    cut into a MultiPolygon at 180° where it crosses it; its box (every longitude where cut) and
    whether it was cut. None for a ring round a pole (not handled here)."""
    r = np.asarray(ring, dtype=np.float64).copy()
    r[:, 0] = np.unwrap(r[:, 0], period=360.0)
    if abs((r[0, 0] - r[-1, 0] + 180.0) % 360.0 - 180.0 + r[-1, 0] - r[0, 0]) > 1e-6:
        return None  # the longitudes turn through 360°: round a pole
    r[:, 0] -= 360.0 * np.floor((r[:, 0].min() + 180.0) / 360.0)
    x, y = r[:, 0], r[:, 1]
    if (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() < 0:
        r = r[::-1]
    parts = antimeridian_parts(r) if x.max() > 180.0 else [[(float(a), float(b)) for a, b in r]]
    cut = len(parts) > 1
    return _parts_wkb(parts), ((-180.0 if cut else float(x.min())), float(y.min()), (180.0 if cut else float(x.max())),
                               float(y.max())), cut


def pole_turns(corners: np.ndarray) -> np.ndarray:
    """(N,) for (N,4,2) longitude/latitude corners: 1 or -1 where a tile's ring goes once
    round a pole (its longitudes turn through 360°), else 0."""
    x = np.asarray(corners, dtype=np.float64)[..., 0]
    step = (np.roll(x, -1, axis=1) - x + 180.0) % 360.0 - 180.0
    return np.rint(step.sum(axis=1) / 360.0).astype(np.int64)


def polar_cap_wkb(corners: np.ndarray) -> tuple[bytes, tuple[float, float, float, float]]:
    """:func:`polar_cap_ring` as a WKB Polygon, and its box."""
    closed, box = polar_cap_ring(corners)
    return struct.pack("<BIII", 1, 3, 1, len(closed)) + np.ascontiguousarray(closed, "<f8").tobytes(), box


def polar_cap_ring(corners: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A footprint round a pole (its longitude/latitude points, :func:`pole_turns` not 0) as
    a closed ring in -180..180, counter-clockwise: its ring unrolled eastward across every
    longitude, cut at 180° and closed along the pole, as GeoJSON draws such a cap; and its
    box (xmin, ymin, xmax, ymax)."""
    c = np.asarray(corners, dtype=np.float64)
    lon, lat = c[:, 0], c[:, 1]
    step = (np.roll(lon, -1) - lon + 180.0) % 360.0 - 180.0
    x0 = 180.0 - (180.0 - lon[0]) % 360.0  # in (-180, 180]
    path = np.column_stack([x0 + np.concatenate([[0.0], np.cumsum(step)]), np.append(lat, lat[0])])
    if path[-1, 0] < path[0, 0]:  # westward: the same ring the other way, from x0 to x0 + 360
        path = path[::-1] + [360.0, 0.0]
    k = int(np.searchsorted(path[:, 0], 180.0, side="right")) - 1  # path[k] <= 180 < path[k + 1]
    (xa, ya), (xb, yb) = path[k], path[k + 1]
    y180 = ya + (180.0 - xa) / (xb - xa) * (yb - ya)
    pole = 90.0 if lat.mean() > 0 else -90.0
    east, west = path[:k + 1], path[k + 1:-1] - [360.0, 0.0]  # west of x0 once moved by 360
    ring = np.array([(-180.0, y180), *west, *east, *([(180.0, y180)] if xa < 180.0 else []),
                     (180.0, pole), (-180.0, pole)])
    x, y = ring[:, 0], ring[:, 1]
    if (x * np.roll(y, -1) - np.roll(x, -1) * y).sum() < 0:
        ring = ring[::-1]
    return np.concatenate([ring, ring[:1]]), (-180.0, float(min(y.min(), pole)), 180.0, float(max(y.max(), pole)))


def gpkg_polygons(corners: np.ndarray, srs_id: int) -> tuple[list[bytes], np.ndarray]:
    """GeoPackage geometry blobs of the :func:`wkb_polygons` polygons, as GDAL writes them
    (magic ``GP``, version 0, flags: little-endian with an XY envelope, ``srs_id``, the
    envelope minx, maxx, miny, maxy, then the WKB), and those envelopes (N, 4)."""
    wkb = wkb_polygons(corners)
    n = len(wkb)
    rings = _ccw_rings(np.asarray(corners, dtype=np.float64)) if n else np.zeros((0, 5, 2))
    boxes = np.stack([rings[..., 0].min(1), rings[..., 0].max(1), rings[..., 1].min(1), rings[..., 1].max(1)], 1)
    head = struct.pack("<2sBBi", b"GP", 0, 0x03, int(srs_id))
    buf = np.empty((n, len(head) + 32 + WKB_POLY_SIZE), np.uint8)
    buf[:, :len(head)] = np.frombuffer(head, np.uint8)
    buf[:, len(head):len(head) + 32] = np.ascontiguousarray(boxes, "<f8").view(np.uint8).reshape(n, 32)
    buf[:, len(head) + 32:] = np.frombuffer(wkb.buffers()[2], np.uint8, n * WKB_POLY_SIZE).reshape(n, WKB_POLY_SIZE)
    return [r.tobytes() for r in buf], boxes


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


def _projjson(crs: Any) -> dict | None:
    pj = pyproj_crs(crs)
    return None if pj is None else pj.to_json_dict()


#: Longitude and latitude: where a footprint in a geographic CRS may lie (xmin, ymin, xmax, ymax).
LONLAT_LIMITS = (-180.0, -90.0, 180.0, 90.0)


def lonlat_limits(crs: Any, bounds: Sequence[float]) -> tuple[float, float, float, float] | None:
    """:data:`LONLAT_LIMITS` for a scene in a geographic CRS that lies within them (a world
    mosaic): its edge tiles' footprints stop there, as their part past the scene's edge would
    reach past 180° or the poles; None otherwise (a scene in 0..360 longitudes keeps its own)."""
    if crs is None or not getattr(crs, "is_geographic", False):
        return None
    left, bottom, right, top = bounds
    eps = 1e-9 * 360.0
    inside = (left >= LONLAT_LIMITS[0] - eps and right <= LONLAT_LIMITS[2] + eps
              and bottom >= LONLAT_LIMITS[1] - eps and top <= LONLAT_LIMITS[3] + eps)
    return LONLAT_LIMITS if inside else None


def window_corners(transform, col_off: np.ndarray, row_off: np.ndarray, w: np.ndarray, h: np.ndarray,
                   limits: Sequence[float] | None = None) -> np.ndarray:
    """(B, 4, 2) map coordinates of the top-left, top-right, bottom-right and bottom-left
    corners of pixel windows (exact for rotated geotransforms); ``limits`` (xmin, ymin, xmax,
    ymax): each coordinate held within them (:func:`lonlat_limits`)."""
    cols = np.stack([col_off, col_off + w, col_off + w, col_off], axis=1).astype(np.float64)
    rows = np.stack([row_off, row_off, row_off + h, row_off + h], axis=1).astype(np.float64)
    a, b, c, d, e, f = transform[:6]
    out = np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=-1)
    if limits is not None:
        np.clip(out, limits[:2], limits[2:], out=out)
    return out
