"""Compare two `tilescan run` output folders unit by unit: the check a restructuring must pass.

    python benchmarks/same_outputs.py OUT_BEFORE OUT_AFTER [--added COLUMN ...]

For every unit folder (one with a run.json) in either tree: tiles.parquet rows equal (every
column, exact), labels.tif pixels equal, heatmap.tif within 1e-6, quicklook.png pixels
equal (decoded), tiles.gpkg's rows, R-tree, extent, count, metadata and schema equal, the
QGIS styles and project byte for byte, and run.json's counts, tiling and warnings equal. Prints one line per unit and exits 1 on any difference.
``--added COLUMN``: a table column the second tree has and the first has not (a change that
adds one): both tables are compared without it, and each unit's line names it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio


def units(root: Path) -> dict[str, Path]:
    return {str(p.parent.relative_to(root)): p.parent for p in sorted(root.rglob("run.json"))
            if ".tilescan-" not in str(p)}


def compare(a: Path, b: Path, added: tuple[str, ...] = ()) -> list[str]:
    diffs = []
    ta, tb = pq.read_table(a / "tiles.parquet"), pq.read_table(b / "tiles.parquet")
    if added:
        if missing := [c for c in added if c not in tb.column_names or c in ta.column_names]:
            diffs.append(f"tiles.parquet: {missing} not added by the second tree")
        tb = tb.drop_columns([c for c in added if c in tb.column_names]).replace_schema_metadata(tb.schema.metadata)
    if ta.schema != tb.schema:
        diffs.append("tiles.parquet schema differs")
    elif not ta.equals(tb):
        cols = [c for c in ta.column_names if not ta.column(c).equals(tb.column(c))]
        diffs.append(f"tiles.parquet rows differ in {cols}")
    with rasterio.open(a / "labels.tif") as la, rasterio.open(b / "labels.tif") as lb:
        if la.transform != lb.transform or not np.array_equal(la.read(), lb.read()):
            diffs.append("labels.tif pixels or transform differ")
    with rasterio.open(a / "heatmap.tif") as ha, rasterio.open(b / "heatmap.tif") as hb:
        x, y = ha.read(1), hb.read(1)
        if x.shape != y.shape or ha.transform != hb.transform or np.abs(x - y).max(initial=0) > 1e-6:
            diffs.append("heatmap.tif differs by more than 1e-6")
    qa, qb = a / "quicklook.png", b / "quicklook.png"
    if qa.exists() != qb.exists():
        diffs.append("quicklook.png in one tree only")
    elif qa.exists():
        from PIL import Image

        with Image.open(qa) as ia, Image.open(qb) as ib:
            if ia.size != ib.size or not np.array_equal(np.asarray(ia), np.asarray(ib)):
                diffs.append("quicklook.png pixels differ")
    for f in sorted({p.name for p in a.glob("*.q[mg][ls]")} | {p.name for p in b.glob("*.q[mg][ls]")}):
        if not ((a / f).exists() and (b / f).exists() and (a / f).read_bytes() == (b / f).read_bytes()):
            diffs.append(f"{f} differs")
    ga, gb = a / "tiles.gpkg", b / "tiles.gpkg"
    if ga.exists() != gb.exists():
        diffs.append("tiles.gpkg in one tree only")
    elif ga.exists():
        da, db = _gpkg(ga), _gpkg(gb, added)
        diffs += [f"tiles.gpkg {k} differs" for k in da if da[k] != db[k]]
    ma, mb = (json.loads((p / "run.json").read_text()) for p in (a, b))
    for key in ("counts", "tiling", "warnings", "fingerprint"):
        if ma.get(key) != mb.get(key):
            diffs.append(f"run.json {key} differs")
    return diffs


def _gpkg(path: Path, added: tuple[str, ...] = ()) -> dict:
    """A GeoPackage's rows (geometry blobs included), its R-tree's tables, extent, feature
    count, metadata and schema, read with plain SQL (no write times); without the ``added``
    columns of ``tiles``."""
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = ", ".join(f'"{r[1]}"' for r in con.execute('PRAGMA table_info("tiles")') if r[1] not in added)
        out = {t: con.execute(f'SELECT {cols if t == "tiles" else "*"} FROM "{t}"').fetchall() for t in (
            "tiles", "rtree_tiles_geom_node", "rtree_tiles_geom_rowid", "rtree_tiles_geom_parent",
            "gpkg_ogr_contents", "gpkg_metadata", "gpkg_geometry_columns", "gpkg_spatial_ref_sys")}
        out["extent"] = con.execute("SELECT min_x, min_y, max_x, max_y, srs_id FROM gpkg_contents").fetchall()
        out["extensions"] = sorted(con.execute("SELECT * FROM gpkg_extensions").fetchall(), key=repr)
        drop = re.compile("|".join(rf'"{re.escape(c)}" \w+, ' for c in added) or "(?!)")  # a column's definition
        out["schema"] = sorted(((t, n, drop.sub("", sql) if sql else sql)
                                for t, n, sql in con.execute("SELECT type, name, sql FROM sqlite_master")), key=repr)
        return out
    finally:
        con.close()


def main(argv: list[str]) -> int:
    added = tuple(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--added")
    argv = [a for i, a in enumerate(argv) if a != "--added" and (i == 0 or argv[i - 1] != "--added")]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    ra, rb = (Path(p) for p in argv)
    ua, ub = units(ra), units(rb)
    bad = 0
    for key in sorted(set(ua) | set(ub)):
        if key not in ua or key not in ub:
            print(f"{key}: only in {'the first' if key in ua else 'the second'} tree")
            bad += 1
            continue
        d = compare(ua[key], ub[key], added)
        same = "identical" + (f" (but the added {', '.join(added)})" if added else "")
        print(f"{key}: {same if not d else '; '.join(d)}")
        bad += bool(d)
    print(f"{len(set(ua) | set(ub))} units, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
