"""Tile footprints in longitude/latitude for the collected table: WKB (cut at the antimeridian,
capped round a pole, cut at the edge of the area a CRS maps: a geostationary disc), their
boxes and geodesic areas."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .geometry import (antimeridian_wkb, domain_ring, polar_cap_wkb, pole_turns, ring_wkb, wkb_polygons,
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
    """:func:`_lonlat_footprints`, where a footprint reaches past the area its CRS maps (off a
    geostationary disc) the part of it that maps (:func:`domain_ring`; None where none does);
    and how many were so cut."""
    off = ~np.isfinite(lonlat).all(axis=(1, 2))
    if not off.any():
        return (*_lonlat_footprints(lonlat), 0)
    geometry, box, area, n_across = _lonlat_footprints(lonlat[~off]) if (~off).any() else (pa.array([], pa.binary()),
                                                                                           [np.zeros(0)] * 4, np.zeros(0), 0)
    wkb, boxes, areas = [None] * len(lonlat), np.full((len(lonlat), 4), np.nan), np.full(len(lonlat), np.nan)
    for j, i in enumerate(np.flatnonzero(~off)):
        wkb[i], boxes[i], areas[i] = geometry[j].as_py(), [b[j] for b in box], area[j]
    for i in np.flatnonzero(off):
        ring = domain_ring(rings[i, :4], to_lonlat)
        made = ring_wkb(ring) if ring is not None else None
        if made is not None:
            wkb[i], boxes[i] = made[0], made[1]
            areas[i] = abs(_geod().polygon_area_perimeter(ring[:, 0], ring[:, 1])[0])
            n_across += made[2]
    return pa.array(wkb, pa.binary()), list(boxes.T), areas, n_across, int(off.sum())


def _lonlat_footprints(lonlat: np.ndarray) -> tuple[pa.Array, list[np.ndarray], np.ndarray, int]:
    """Reprojected footprints (N,5,2) as the table's WKB, their boxes (xmin, ymin, xmax,
    ymax), geodesic areas, and how many cross the antimeridian: those are cut there into a
    MultiPolygon (RFC 7946's way), and their boxes span every longitude. A tile round a
    pole becomes a cap that spans every longitude up to the pole (:func:`polar_cap_wkb`)."""
    polar = pole_turns(lonlat[:, :4]) != 0
    corners, across = wrap_longitudes(lonlat[:, :4])
    across &= ~polar
    geometry = wkb_polygons(corners)
    xs, ys = corners[..., 0], corners[..., 1]
    box = [xs.min(1), ys.min(1), xs.max(1), ys.max(1)]
    if across.any() or polar.any():
        wkb = geometry.to_pylist()
        for i in np.flatnonzero(across):
            wkb[i] = antimeridian_wkb(corners[i])
        box[0][across], box[2][across] = -180.0, 180.0
        for i in np.flatnonzero(polar):
            wkb[i], cap = polar_cap_wkb(lonlat[i, :4])
            for b, v in zip(box, cap):
                b[i] = v
        geometry = pa.array(wkb, pa.binary())
    return geometry, box, _geodesic_areas(corners), int(across.sum())
