"""``tilescan collect``'s per-class summary: tiles, areas and mean confidence per scene and class
(``summary.json``'s ``classes`` and ``scenes``, and ``summary.csv``).

A tile's area counts its share of the ground: with a stride below the tile size, tiles
overlap, and each one counts the cell of the stride around its centre (the label raster's
pixel, ``area_m2 * (stride_px / tile_px) ** 2``), so overlapping footprints are not counted
twice (the cells, as the label raster, stop half the overlap short of the scene's edges).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

AREA_NOTE = ("geodesic, WGS 84 ellipsoid, m^2; valid_area_m2 = area_m2 * valid_fraction (a footprint cut short of its "
             "pixel window, at 180 degrees or a disc's edge: the share of it that is data); each tile counts "
             "the cell of the stride around its centre (area_m2 * (stride_px / tile_px)^2 of its footprint), "
             "so overlapping tiles are not counted twice")


class ClassSummary:
    def __init__(self):
        self.rows: dict[tuple[str, str], dict] = {}
        self.scenes: dict[str, dict] = {}

    def add(self, scene: str, t: pa.Table, share: float = 1.0) -> None:
        """A unit's collected rows; ``share``: the part of each footprint that is the tile's own
        ((stride / tile size) squared)."""
        s = self.scenes.setdefault(scene, {"tiles": 0, "area_m2": 0.0, "valid_area_m2": 0.0})
        labels = np.asarray(t.column("label").to_pylist(), dtype=object)
        ci = t.column("class_index").to_numpy()
        area = share * t.column("area_m2").to_numpy(zero_copy_only=False).astype(np.float64)
        varea = share * t.column("valid_area_m2").to_numpy(zero_copy_only=False).astype(np.float64)
        conf = t.column("confidence").to_numpy().astype(np.float64)
        check = t.column("scale_check")[0].as_py() if t.num_rows else None
        for lab in sorted(set(labels)):
            m = labels == lab
            r = self.rows.setdefault((scene, lab), {"scene": scene, "label": lab, "class_index": int(ci[m][0]), "tiles": 0,
                                                    "area_m2": None, "valid_area_m2": None, "_conf": 0.0,
                                                    "scale_check": check})
            r["tiles"] += int(m.sum())
            r["area_m2"], r["valid_area_m2"] = _plus(r["area_m2"], area[m]), _plus(r["valid_area_m2"], varea[m])
            r["_conf"] += float(conf[m].sum())
        if t.num_rows and s["tiles"] == 0:
            s["area_m2"] = s["valid_area_m2"] = None  # unknown until a tile's area is known
        s["tiles"] += t.num_rows
        s["area_m2"], s["valid_area_m2"] = _plus(s["area_m2"], area), _plus(s["valid_area_m2"], varea)

    def table(self) -> list[dict]:
        out = []
        for (_, _), r in sorted(self.rows.items()):
            row = {k: v for k, v in r.items() if not k.startswith("_")}
            row["mean_confidence"] = r["_conf"] / r["tiles"] if r["tiles"] else math.nan
            out.append(row)
        return out


def _plus(total: float | None, values: np.ndarray) -> float | None:
    """``total`` plus the known (not NaN) ``values``; None while none is known (a scene without a
    CRS has no ground area: unknown, not 0)."""
    known = values[~np.isnan(values)]
    return total if not known.size else (total or 0.0) + float(known.sum())


def csv_rows(rows: list[dict]) -> list[list]:
    """The per-class summary as CSV rows: areas to the millimetre, confidences to 1e-6."""
    cols = ["scene", "label", "class_index", "tiles", "area_m2", "valid_area_m2", "mean_confidence", "scale_check"]
    return [cols] + [[f"{r[k]:.6f}" if k == "mean_confidence" and isinstance(r[k], float) else
                      f"{r[k]:.3f}" if isinstance(r[k], float) else r[k] for k in cols] for r in rows]
