#!/usr/bin/env python
"""Which second tile table to write beside GeoParquet, so that every QGIS reads the result.

Run from the project root::

    python benchmarks/table_formats.py --out benchmarks/results/table-formats.json
    python benchmarks/table_formats.py --rows 10000 --rounds 3     # quicker

Candidates, each written from the same ``TileTable`` through tilescan's own writer code:

* ``parquet``      the primary table (GeoParquet 1.1, zstd): the reference;
* ``gpkg_default`` GeoPackage as GDAL >= 3.8 writes it by default (version 1.4, GDAL's own
                   R-tree step), i.e. what ``--gpkg`` wrote before;
* ``gpkg_compat``  GeoPackage 1.2 with the R-tree added by :mod:`tilescan.outputs.gpkg` (what
                   ``TileTable.write_gpkg`` writes now);
* ``fgb``          FlatGeobuf with its packed Hilbert R-tree (GDAL's default ``SPATIAL_INDEX=YES``).

on two tables: a real scene's (``tiles.parquet`` of a finished ``tilescan run``, ``--scene``)
and a synthetic one of ``--rows`` tiles (random probabilities on a square grid, 30 classes).
TensorFlow is imported first (``--no-tensorflow`` to skip), as in ``tilescan run``: that
changes which SQLite GDAL uses, and so whether GDAL's own R-tree step works.

For each file it reports the write time (median over ``--rounds``, formats alternated round
by round), the size, and what an old reader sees: with ``--reader`` (default
``/usr/bin/python3``, Debian's GDAL 3.6 bindings; skipped when missing) a child process
opens each file, records GDAL's warnings, whether the layer has a fast spatial filter,
the feature count, and the time to read every feature and to run a bounding-box query.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SCENE = "scenes/opengeos-naip/m_4709963_se_14_1_20190904.tif"

# Runs in the old reader's Python: GDAL only, prints one JSON object.
_READER = r"""
import json, sys, time
from osgeo import gdal, ogr
gdal.UseExceptions()
msgs = []
gdal.PushErrorHandler(lambda cls, no, msg: msgs.append(msg))
out = {"gdal": gdal.__version__}
for path in sys.argv[1:]:
    msgs.clear()
    r = {}
    t = time.perf_counter()
    ds = gdal.OpenEx(path, gdal.OF_VECTOR)
    lyr = ds.GetLayer(0)
    r["open_s"] = time.perf_counter() - t
    r["features"] = lyr.GetFeatureCount()
    r["spatial_index"] = bool(lyr.TestCapability(ogr.OLCFastSpatialFilter))
    t = time.perf_counter()
    n = sum(1 for _ in lyr)
    r["read_all_s"] = time.perf_counter() - t
    xmin, xmax, ymin, ymax = lyr.GetExtent()
    w, h = (xmax - xmin) / 20, (ymax - ymin) / 20   # a window of 1/400 of the extent
    cx, cy = (xmin + xmax) / 2, (ymin + ymax) / 2
    t = time.perf_counter()
    for _ in range(20):
        lyr.SetSpatialFilterRect(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        m = sum(1 for _ in lyr)
    r["bbox_query_ms"] = (time.perf_counter() - t) / 20 * 1000
    r["bbox_hits"] = m
    lyr.SetSpatialFilter(None)
    r["read_ok"] = n == r["features"]
    r["messages"] = sorted(set(msgs))
    ds = None
    out[path] = r
print(json.dumps(out))
"""


def synthetic_table(rows: int, classes: list[str], seed: int = 0):
    """A TileTable of ``rows`` tiles on a square grid of 640 m tiles (UTM metres)."""
    import numpy as np

    from tilescan.outputs.table import TileTable

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(rows)))
    idx = np.arange(rows)
    r, c = np.divmod(idx, side)
    x0, y0, s = 400000.0 + c * 640.0, 5300000.0 - r * 640.0, 640.0
    corners = np.stack([np.stack([x0, y0], -1), np.stack([x0 + s, y0], -1),
                        np.stack([x0 + s, y0 - s], -1), np.stack([x0, y0 - s], -1)], axis=1)
    probs = rng.dirichlet(np.full(len(classes), 0.3), size=rows).astype(np.float32)
    cls = probs.argmax(1)
    t = TileTable(classes)
    t.add({"tile_index": idx, "row": r, "col": c, "col_off": c * 128, "row_off": r * 128,
           "width": np.full(rows, 128), "height": np.full(rows, 128), "corners": corners,
           "class_index": cls, "confidence": probs[idx, cls], "probabilities": probs,
           "valid_fraction": np.ones(rows, np.float32), "cam_mean": rng.random(rows, np.float32),
           "cam_max": np.ones(rows, np.float32), "cam_raw_max": rng.random(rows, np.float32) * 5,
           "cam_peak_x": x0 + 320.0, "cam_peak_y": y0 - 320.0})
    return t


def scene_table(parquet: Path):
    """A TileTable holding the rows of a finished run's tiles.parquet, and its classes/CRS."""
    import numpy as np
    import pyarrow.parquet as pq

    from tilescan.outputs.table import TileTable

    pf = pq.read_table(parquet)
    meta = json.loads(pf.schema.metadata[b"tilescan"])
    geo = json.loads(pf.schema.metadata[b"geo"])
    classes = meta["classes"]
    d = pf.to_pydict()
    n = pf.num_rows
    import shapely

    corners = np.array([np.asarray(shapely.from_wkb(g).exterior.coords)[:4] for g in d["geometry"]])
    t = TileTable(classes)
    cols = {k: np.asarray(d[k]) for k in ("tile_index", "row", "col", "col_off", "row_off", "width", "height",
                                          "class_index", "confidence", "valid_fraction", "cam_mean", "cam_max",
                                          "cam_raw_max", "cam_peak_x", "cam_peak_y")}
    t.add({**cols, "corners": corners, "probabilities": np.asarray(d["probabilities"], np.float32).reshape(n, -1)})
    return t, classes, geo["columns"]["geometry"]["crs"], meta


def writers(table, classes, crs, scene, model_id):
    """name -> function(path) writing that format with tilescan's code."""
    import pyogrio

    def gdal(path, driver, **options):
        # the GeoPackage writer's columns, handed to GDAL as a whole
        import pyarrow as pa

        from tilescan.outputs.geometry import pyproj_crs

        schema, batches, _ = table._gpkg_arrow(classes, scene)
        pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, batches), str(path), layer="tiles",
                            driver=driver, geometry_name="geometry", geometry_type="Polygon",
                            crs=pyproj_crs(crs).to_wkt(), **options)

    def gpkg_default(path):
        # the previous writer: GDAL's defaults (GeoPackage 1.4, GDAL's own R-tree step)
        from tilescan.outputs.files import _dumps
        from tilescan.outputs.table import _tilescan_meta

        meta = _dumps(_tilescan_meta(classes, model_id, scene, len(table), None))
        gdal(path, "GPKG", layer_metadata={"tilescan": meta})

    def fgb(path):
        gdal(path, "FlatGeobuf")

    return {
        "parquet": (".parquet", lambda p: table.write_geoparquet(p, crs, classes, scene, model_id)),
        "gpkg_default": (".gpkg", gpkg_default),
        "gpkg_compat": (".gpkg", lambda p: table.write_gpkg(p, crs, classes, scene, model_id)),
        "fgb": (".fgb", fgb),
    }


def measure(name: str, table, classes, crs, rounds: int, work: Path, reader: str | None) -> dict:
    from tilescan.outputs import gpkg

    fmts = writers(table, classes, crs, "scene.tif", "bench")
    times: dict[str, list[float]] = {k: [] for k in fmts}
    paths = {k: work / f"{name}-{k}{ext}" for k, (ext, _) in fmts.items()}
    for _ in range(rounds):
        for k, (_, write) in fmts.items():
            for extra in ("", "-journal"):
                Path(str(paths[k]) + extra).unlink(missing_ok=True)
            t = time.perf_counter()
            write(paths[k])
            times[k].append(time.perf_counter() - t)
    out = {"rows": len(table), "formats": {}}
    for k in fmts:
        p = paths[k]
        entry = {"write_s": statistics.median(times[k]), "write_s_all": times[k], "bytes": p.stat().st_size}
        if p.suffix == ".gpkg":
            entry["gpkg_rtree"] = gpkg.has_rtree(p)
            import sqlite3

            con = sqlite3.connect(p)
            entry["gpkg_user_version"] = con.execute("PRAGMA user_version").fetchone()[0]
            con.close()
        out["formats"][k] = entry
    if reader:
        res = subprocess.run([reader, "-c", _READER, *[str(paths[k]) for k in fmts if k != "parquet"]],
                             capture_output=True, text=True, timeout=600)
        if res.returncode == 0:
            got = json.loads(res.stdout)
            out["reader_gdal"] = got.pop("gdal")
            for k in fmts:
                if str(paths[k]) in got:
                    out["formats"][k]["old_reader"] = got[str(paths[k])]
            # and the Parquet file: does the old reader open it at all?
            probe = subprocess.run([reader, "-c", "import sys; from osgeo import ogr; "
                                    "print(ogr.Open(sys.argv[1]) is not None)", str(paths["parquet"])],
                                   capture_output=True, text=True)
            out["formats"]["parquet"]["old_reader"] = {"opens": probe.stdout.strip() == "True"}
        else:
            out["reader_error"] = res.stderr[-2000:]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the synthetic table")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--scene", help="a finished run's tiles.parquet (default: run tilescan on the NAIP quick-start scene)")
    ap.add_argument("--reader", default="/usr/bin/python3", help="a Python with old GDAL bindings ('' to skip)")
    ap.add_argument("--no-tensorflow", action="store_true", help="do not import TensorFlow first")
    ap.add_argument("--out", help="write the results JSON here")
    a = ap.parse_args(argv)

    if not a.no_tensorflow:
        import tensorflow  # noqa: F401 - as in `tilescan run`: its SQLite serves the process

    reader = a.reader if a.reader and shutil.which(a.reader) else None
    if reader:
        ok = subprocess.run([reader, "-c", "from osgeo import ogr"], capture_output=True).returncode == 0
        reader = reader if ok else None
    work = Path(tempfile.mkdtemp(prefix="tilescan-tables-"))
    try:
        parquet = Path(a.scene) if a.scene else None
        if parquet is None:
            data = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
            scene = data / SCENE
            subprocess.run([sys.executable, "-m", "tilescan.cli", "run", str(scene), "-o", str(work / "run"), "-q",
                            "--no-gpkg"], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            parquet = work / "run" / scene.stem / "tiles.parquet"
        real, classes, crs, meta = scene_table(parquet)
        results = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "tensorflow_loaded": not a.no_tensorflow,
            "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version()},
            "versions": _versions(),
            "tables": {
                "scene": {"source": meta.get("scene"), **measure("scene", real, classes, crs, a.rounds, work, reader)},
                "synthetic": measure("synthetic", synthetic_table(a.rows, classes), classes, crs, a.rounds, work, reader),
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print(results)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _versions() -> dict:
    import pyarrow
    import pyogrio

    import tilescan

    return {"tilescan": tilescan.__version__, "pyarrow": pyarrow.__version__, "pyogrio": pyogrio.__version__,
            "gdal_writer": pyogrio.__gdal_version_string__}


def _print(results: dict) -> None:
    for name, t in results["tables"].items():
        print(f"\n{name}: {t['rows']} rows (old reader: GDAL {t.get('reader_gdal', 'not run')})")
        print("| format | write s | size KiB | old reader: spatial index | warnings | read all s | bbox query ms |")
        print("|---|---:|---:|---|---|---:|---:|")
        for k, f in t["formats"].items():
            o = f.get("old_reader", {})
            si = o.get("spatial_index", "opens" if o.get("opens") else "does not open" if "opens" in o else "")
            print(f"| {k} | {f['write_s']:.3f} | {f['bytes'] / 1024:.0f} | {si} | {len(o.get('messages', []))} | "
                  f"{o.get('read_all_s', float('nan')):.3f} | {o.get('bbox_query_ms', float('nan')):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
