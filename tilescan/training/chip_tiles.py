"""Which tiles of one scene become chips of which class, for ``tilescan chips``
(:mod:`tilescan.training.chips`):

* polygons: a tile whose footprint is covered at least ``min_cover`` by one class, counting
  only area no polygon of another class claims too;
* points: the grid tile around each point (of the tiles holding it, the one whose centre is
  nearest); points of two classes in one tile make it mixed;
* skipped and counted: ``no_label`` (no labelled area), ``partly_labelled`` (one class,
  below ``min_cover``), ``mixed`` (several classes, none reaching ``min_cover``),
  ``overlap`` (a class would reach it but polygons of another class overlap it),
  ``nodata`` (less than ``min_valid`` of the tile is valid scene data).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..outputs.geometry import window_corners
from ..outputs.quicklook import read_north_up
from .labels import Labels

if TYPE_CHECKING:
    from .chips import ChipOptions

SKIP_REASONS = ("no_label", "partly_labelled", "mixed", "overlap", "nodata")
READ_BATCH = 64


# ---------------------------------------------------------------------------- geometry


def grid_corners(grid, transform) -> np.ndarray:
    """(N, 4, 2) corners in the scene CRS of every tile of ``grid``, row-major (top-left,
    top-right, bottom-right, bottom-left; exact for rotated geotransforms)."""
    r, c = np.divmod(np.arange(len(grid)), grid.n_cols)
    t = np.full(len(grid), grid.tile_size)
    return window_corners(transform, c * grid.stride, r * grid.stride, t, t)


def _polygons(corners: np.ndarray):
    import shapely

    return shapely.polygons(np.concatenate([corners, corners[:, :1]], axis=1))


def _transform_corners(corners: np.ndarray, src, dst) -> np.ndarray:
    from pyproj import Transformer

    if src == dst:
        return corners
    tr = Transformer.from_crs(src, dst, always_xy=True)
    x, y = tr.transform(corners[..., 0].ravel(), corners[..., 1].ravel())
    return np.stack([np.asarray(x).reshape(corners.shape[:-1]), np.asarray(y).reshape(corners.shape[:-1])], axis=-1)


# ---------------------------------------------------------------------------- one scene


#: Share of a tile's area below which a polygon's overlap with it is a sliver, not a label:
#: polygons reprojected from another CRS meet a tile they only border by ~1e-12 of its area.
SLIVER = 1e-6


@dataclass
class _TileCall:
    outcome: str
    cls: int = -1
    cover: float = float("nan")
    labels: tuple[int, ...] = ()


def _polygon_calls(tile_polys, geoms: np.ndarray, cls: np.ndarray, idx: np.ndarray, min_cover: float) -> dict[int, _TileCall]:
    """What the polygons say about each tile they touch (tiles they miss: no label)."""
    import shapely

    calls: dict[int, _TileCall] = {}
    if not len(idx):
        return calls
    tree = shapely.STRtree(geoms[idx])
    ti, gi = tree.query(tile_polys, predicate="intersects")
    if not len(ti):
        return calls
    gi = idx[gi]
    inter = shapely.intersection(tile_polys[ti], geoms[gi])
    tile_area = shapely.area(tile_polys)
    keep = shapely.area(inter) > SLIVER * tile_area[ti]  # a shared edge, once reprojected, is no label
    ti, gi, inter = ti[keep], gi[keep], inter[keep]
    order = np.argsort(ti, kind="stable")
    ti, gi, inter = ti[order], gi[order], inter[order]
    starts = np.flatnonzero(np.r_[True, ti[1:] != ti[:-1]])
    ends = np.r_[starts[1:], len(ti)]
    for s, e in zip(starts, ends):
        t = int(ti[s])
        full = float(tile_area[t])
        by_class: dict[int, list] = {}
        for g, piece in zip(gi[s:e], inter[s:e]):
            by_class.setdefault(int(cls[g]), []).append(piece)
        labels = tuple(int(g) for g in gi[s:e])
        unions = {c: (p[0] if len(p) == 1 else shapely.union_all(p)) for c, p in by_class.items()}
        if len(unions) == 1:
            (c, u), = unions.items()
            cover = float(u.area) / full
            calls[t] = _TileCall("chip" if cover >= min_cover else "partly_labelled", c, cover, labels)
            continue
        plain = {c: float(u.area) / full for c, u in unions.items()}
        own = {}
        for c, u in unions.items():
            others = shapely.union_all([v for d, v in unions.items() if d != c])
            own[c] = float(shapely.difference(u, others).area) / full
        best = max(own, key=own.get)
        if own[best] >= min_cover:
            calls[t] = _TileCall("chip", best, own[best], labels)
        elif max(plain.values()) >= min_cover:
            calls[t] = _TileCall("overlap", -1, own[best], labels)
        else:
            calls[t] = _TileCall("mixed", -1, own[best], labels)
    return calls


def _point_tiles(grid, transform, pts: np.ndarray) -> np.ndarray:
    """Index of the grid tile around each point (x, y in the scene CRS), -1 outside the
    scene. Of the tiles holding a point, the one whose centre is nearest."""
    inv = ~transform
    out = np.full(len(pts), -1, dtype=np.int64)
    t, s = grid.tile_size, grid.stride
    for i, (x, y) in enumerate(pts):
        col, row = inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f
        if not (0 <= col < grid.width and 0 <= row < grid.height):
            continue

        def nearest(v: float, n: int) -> int:
            cands = range(max(0, int(np.floor((v - t) / s))), min(n, int(np.floor(v / s)) + 1))
            cands = [k for k in cands if k * s <= v < k * s + t] or [min(n - 1, int(v // s))]
            return min(cands, key=lambda k: abs(k * s + t / 2 - v))

        out[i] = nearest(row, grid.n_rows) * grid.n_cols + nearest(col, grid.n_cols)
    return out


def _scene_polygon(info):
    import shapely

    T = info.transform
    ring = [(T.a * c + T.b * r + T.c, T.d * c + T.e * r + T.f)
            for c, r in ((0, 0), (info.width, 0), (info.width, info.height), (0, info.height), (0, 0))]
    return shapely.Polygon(ring)


def _save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG", compress_level=6)


def _cut_scene(reader, key: str, labels: Labels, geoms: np.ndarray, opts: ChipOptions, images: Path,
               inside: np.ndarray, used: np.ndarray) -> tuple[list[dict], Counter]:
    """Chips of one scene (written under ``images``), and the counts of skipped tiles."""
    import shapely

    info, grid = reader.info, reader.grid
    corners = grid_corners(grid, info.transform)
    tile_polys = _polygons(corners)
    scene_poly = _scene_polygon(info)
    live = np.array([g is not None for g in geoms])
    here = np.zeros(len(geoms), dtype=bool)
    here[live] = shapely.intersects(geoms[live], scene_poly)
    inside |= here

    poly_idx = np.flatnonzero(here & (labels.kind == "polygon"))
    calls = _polygon_calls(tile_polys, geoms, labels.cls, poly_idx, opts.min_cover)
    pt_idx = np.flatnonzero(here & (labels.kind == "point"))
    if len(pt_idx):
        xy = np.array([(g.x, g.y) for g in geoms[pt_idx]])
        tiles = _point_tiles(grid, info.transform, xy)
        by_tile: dict[int, list[int]] = {}
        for g, t in zip(pt_idx, tiles):
            if t >= 0:
                by_tile.setdefault(int(t), []).append(int(g))
        for t, gs in by_tile.items():
            classes = {int(labels.cls[g]) for g in gs}
            prev = calls.get(t)
            if prev is not None and prev.outcome in ("mixed", "overlap"):
                continue  # the polygons already rule this tile out
            sliver = prev is not None and prev.outcome == "partly_labelled" and prev.cover <= 1 - opts.min_cover
            if prev is not None and not sliver:
                classes.add(prev.cls)  # a polygon of another class in the tile makes it mixed, unless a sliver
            if len(classes) == 1:
                c = classes.pop()  # the cover of its own class's polygon; a sliver of another's is none of its
                calls[t] = _TileCall("chip", c, prev.cover if prev is not None and prev.cls == c else float("nan"),
                                     tuple(gs) + (prev.labels if prev else ()))
            else:
                calls[t] = _TileCall("mixed", -1, float("nan"), tuple(gs) + (prev.labels if prev else ()))

    counts: Counter = Counter({r: 0 for r in SKIP_REASONS})
    counts["no_label"] = len(grid) - len(calls)
    for t, c in calls.items():
        if c.outcome != "chip":  # a tile mostly past the scene's edge is short of data, whatever its labels
            w = grid[t].window
            in_scene = (min(w.width, info.width - w.col_off) * min(w.height, info.height - w.row_off)) / (w.width * w.height)
            counts["nodata" if in_scene < opts.min_valid else c.outcome] += 1
    wanted = sorted(t for t, c in calls.items() if c.outcome == "chip")
    rows: list[dict] = []
    t_px = reader.tile_px
    for k in range(0, len(wanted), READ_BATCH):
        chunk = [grid[t] for t in wanted[k:k + READ_BATCH]]
        x, valid = read_north_up(reader, chunk)  # a chip as run's model sees the tile
        frac = np.count_nonzero(valid.reshape(len(chunk), -1), axis=1) / float(t_px * t_px)
        for tile, xi, f in zip(chunk, x, frac):
            call = calls[tile.index]
            if f < opts.min_valid:
                counts["nodata"] += 1
                continue
            cname = labels.classes[call.cls]
            rel = f"{cname}/{key}_r{tile.row:04d}_c{tile.col:04d}.png"
            (images / cname).mkdir(exist_ok=True)
            _save_png(images / rel, np.rint(xi * 255.0).astype(np.uint8))
            mine = [g for g in call.labels if labels.cls[g] == call.cls]  # slivers of neighbours do not count
            used[mine] = True
            w = tile.window
            rows.append({
                "chip": rel, "cls": call.cls, "row": tile.row, "col": tile.col,
                "col_off": int(w.col_off), "row_off": int(w.row_off), "width": int(w.width), "height": int(w.height),
                "valid_fraction": float(f), "cover": float(call.cover),
                "label_fids": sorted({int(labels.fid[g]) for g in mine}),
                "corners": corners[tile.index],
            })
    counts["chips"] = len(rows)
    counts["tiles"] = len(grid)
    return rows, counts
