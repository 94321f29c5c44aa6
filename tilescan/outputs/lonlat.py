"""Tile footprints in longitude/latitude for the collected table: WKB (cut at the antimeridian,
capped round a pole, cut at the edge of the area a CRS maps: a geostationary disc), their
boxes and geodesic areas."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .geometry import (BOWED_PER_EDGE, antimeridian_wkb, bowed_edges, domain_ring, edge_points, polar_cap_wkb,
                       points_in_lonlat, pole_turns, ring_in_lonlat, ring_wkb, through_poles, wkb_polygons,
                       wrap_longitudes)


def _geod():
    from pyproj import Geod

    return Geod(ellps="WGS84")


def _geodesic_areas(lonlat: np.ndarray) -> np.ndarray:
    geod = _geod()
    out = np.empty(len(lonlat))
    for i, ring in enumerate(lonlat):
        area, _ = geod.polygon_area_perimeter(ring[:4, 0], ring[:4, 1])
        out[i] = abs(area)
    return out


def footprints_in_lonlat(lonlat: np.ndarray, rings: np.ndarray, to_lonlat) -> tuple:
    """:func:`_lonlat_footprints` of the reprojected rings ``lonlat`` (N,5,2), where a footprint
    reaches past the area its CRS maps (off a geostationary disc) the part of it that maps
    (:func:`domain_ring`; None where none does); their geodesic areas, those of tiles over a
    degree across along their edges as they run (the corners' geodesics cut corners there:
    a world mosaic's tiles); the footprints' areas in the CRS (``rings`` (N,5,2): the native
    rings), and how many cross the antimeridian and were cut at a disc's edge. A tile whose
    edges bow in longitude/latitude (near a pole) is drawn along them (:func:`_bowed_rings`)."""
    off = ~np.isfinite(lonlat).all(axis=(1, 2))
    native = _planar_areas(rings[:, :4])
    on = np.flatnonzero(~off)
    bowed = _bowed_rings(rings[on, :4], lonlat[on, :4], to_lonlat)
    geometry, box, area, n_across = (_lonlat_footprints(lonlat[on], bowed)
                                     if len(on) else (pa.array([], pa.binary()), [np.zeros(0)] * 4, np.zeros(0), 0))
    if not off.any():
        wkb, boxes, areas = geometry, box, area
    else:
        wkb, boxes, areas = [None] * len(lonlat), np.full((len(lonlat), 4), np.nan), np.full(len(lonlat), np.nan)
        good = np.flatnonzero(~off)
        for i, g in zip(good, geometry.to_pylist()):
            wkb[i] = g
        boxes[good], areas[good] = np.column_stack(box) if len(good) else np.zeros((0, 4)), area
        geod = _geod()
        for i in np.flatnonzero(off):
            cut = domain_ring(rings[i, :4], to_lonlat)
            made = ring_wkb(cut[0]) if cut is not None else None
            native[i] = _planar_areas(cut[1][None])[0] if cut is not None else np.nan
            if made is not None:
                wkb[i], boxes[i] = made[0], made[1]
                areas[i] = abs(geod.polygon_area_perimeter(cut[0][:, 0], cut[0][:, 1])[0])
                n_across += made[2]
        wkb, boxes = pa.array(wkb, pa.binary()), list(boxes.T)
    big = np.flatnonzero(~off & ((boxes[2] - boxes[0] > 1.0) | (boxes[3] - boxes[1] > 1.0))
                         & (pole_turns(np.nan_to_num(lonlat[:, :4])) == 0))
    if len(big):
        areas[big] = _areas_along_edges(rings[big, :4], to_lonlat, areas[big])
    return wkb, boxes, areas, native, n_across, int(off.sum())


def _planar_areas(corners: np.ndarray) -> np.ndarray:
    """The areas of (N,k,2) open rings in their own plane (the shoelace formula, about each
    ring's first point: projected coordinates in the millions lose no digits)."""
    c = np.asarray(corners, dtype=np.float64) - np.asarray(corners, dtype=np.float64)[:, :1]
    x, y = c[..., 0], c[..., 1]
    return 0.5 * np.abs((x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1))


def _areas_along_edges(corners: np.ndarray, to_lonlat, fallback: np.ndarray, per_edge: int = 32) -> np.ndarray:
    """Geodesic areas of (B,4,2) tiles in their CRS with each edge followed as the CRS draws it
    (points along it reprojected), not the geodesic between its corners; ``fallback`` where a
    point does not map."""
    dense = edge_points(corners, per_edge)  # (B, 4 * per_edge, 2)
    lon, lat = np.moveaxis(points_in_lonlat(dense, to_lonlat), -1, 0)
    out = np.array(fallback, dtype=np.float64)
    geod = _geod()
    for b in range(len(dense)):
        if np.isfinite(lon[b]).all() and np.isfinite(lat[b]).all():
            out[b] = abs(geod.polygon_area_perimeter(np.unwrap(lon[b], period=360.0), lat[b])[0])
    return out


def _bowed_rings(corners: np.ndarray, lonlat: np.ndarray, to_lonlat) -> dict[int, np.ndarray]:
    """For the (N,4,2) footprints whose edges bow in longitude/latitude (:func:`bowed_edges`:
    near a pole), index -> an open ring of ``BOWED_PER_EDGE`` points along each edge, put there."""
    bowed = np.flatnonzero(bowed_edges(corners, lonlat, to_lonlat))
    if not len(bowed):
        return {}
    dense = edge_points(corners[bowed], BOWED_PER_EDGE)
    rings = ring_in_lonlat(dense, to_lonlat)
    return {int(i): through_poles(d, r, to_lonlat) for i, d, r in zip(bowed, dense, rings) if np.isfinite(r).all()}


def _lonlat_footprints(lonlat: np.ndarray, bowed: dict[int, np.ndarray]) -> tuple[pa.Array, list[np.ndarray], np.ndarray, int]:
    """Reprojected footprints (N,5,2) as the table's WKB, their boxes (xmin, ymin, xmax,
    ymax), geodesic areas, and how many cross the antimeridian: those are cut there into a
    MultiPolygon (RFC 7946's way), and their boxes span every longitude. A tile round a
    pole becomes a cap that spans every longitude up to the pole (:func:`polar_cap_wkb`).
    A tile in ``bowed`` (index -> its ring with points along its edges) is drawn by that ring."""
    polar = pole_turns(lonlat[:, :4]) != 0
    for i, ring in bowed.items():
        polar[i] = pole_turns(ring[None])[0] != 0
    corners, across = wrap_longitudes(lonlat[:, :4])
    across &= ~polar
    geometry = wkb_polygons(corners)
    xs, ys = corners[..., 0], corners[..., 1]
    box = [xs.min(1), ys.min(1), xs.max(1), ys.max(1)]
    if across.any() or polar.any() or bowed:
        wkb = geometry.to_pylist()
        for i in np.flatnonzero(across):
            wkb[i] = antimeridian_wkb(corners[i])
        box[0][across], box[2][across] = -180.0, 180.0
        for i in np.flatnonzero(polar):
            wkb[i], cap = polar_cap_wkb(bowed.get(i, lonlat[i, :4]))
            for b, v in zip(box, cap):
                b[i] = v
        for i, ring in bowed.items():
            if not polar[i] and (made := ring_wkb(ring)) is not None:
                wkb[i], cap, across[i] = made
                for b, v in zip(box, cap):
                    b[i] = v
        geometry = pa.array(wkb, pa.binary())
    return geometry, box, _geodesic_areas(corners), int(across.sum())
