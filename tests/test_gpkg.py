"""tilescan.outputs.gpkg: the GeoPackage R-tree tilescan builds itself (packed, as SQLite lays it out).

The index is checked in a fresh interpreter whose SQLite has the R-tree module (this test
process may have loaded TensorFlow, whose SQLite lacks it): SQLite's own ``rtreecheck``,
and window queries through the index against the tiles' exact boxes.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import subprocess
import sys

import numpy as np
import pyogrio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tilescan.outputs import gpkg
from tilescan.outputs.table import TileTable

CLASSES = ["a", "b", "c"]


def _table(n: int, seed: int = 0) -> tuple[TileTable, np.ndarray]:
    """``n`` tiles of random sizes scattered over 100 km, in random order; their boxes."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(400_000, 500_000, n)
    y0 = rng.uniform(5_000_000, 5_100_000, n)
    s = rng.uniform(10, 2000, n)
    corners = np.stack([np.stack([x0, y0], -1), np.stack([x0 + s, y0], -1),
                        np.stack([x0 + s, y0 - s], -1), np.stack([x0, y0 - s], -1)], axis=1)
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    t = TileTable(CLASSES)
    idx = rng.permutation(n)
    t.add({"tile_index": idx, "row": idx, "col": idx, "col_off": idx, "row_off": idx, "width": np.full(n, 8),
           "height": np.full(n, 8), "corners": corners, "class_index": probs.argmax(1),
           "confidence": probs.max(1), "probabilities": probs})
    order = np.argsort(idx)  # rows are written sorted by tile_index: fid k+1 is order[k]
    boxes = np.stack([x0, x0 + s, y0 - s, y0], 1)[order]
    return t, boxes


_CHECK = r"""
import json, random, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
(t, g), = con.execute("SELECT table_name, column_name FROM gpkg_geometry_columns").fetchall()
r = f"rtree_{t}_{g}"
out = {"check": con.execute(f"SELECT rtreecheck('{r}')").fetchone()[0],
       "rows": con.execute(f'SELECT count(*) FROM "{r}"').fetchone()[0], "queries": []}
random.seed(1)
for _ in range(60):
    x, y, w = random.uniform(395e3, 505e3), random.uniform(4.995e6, 5.105e6), random.uniform(1, 20000)
    hits = [i for (i,) in con.execute(f'SELECT id FROM "{r}" WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?',
                                      (x + w, x, y + w, y))]
    out["queries"].append([x, y, w, sorted(hits)])
print(json.dumps(out))
"""


def _check(path) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHECK, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("n", [1, 51, 52, 3000, 20000])
def test_packed_rtree_is_valid_and_finds_every_tile(tmp_path, n):
    """Sizes around one node (51 cells) and several levels of nodes."""
    table, boxes = _table(n, seed=n)
    path = tmp_path / "t.gpkg"
    table.write_gpkg(path, "EPSG:32614", CLASSES, "s", "m")
    # the same file with the index taken out and built again by tilescan's packer
    bare = tmp_path / "bare.gpkg"
    pyogrio.write_dataframe(pyogrio.read_dataframe(path), bare, layer="tiles", driver="GPKG",
                            dataset_options=gpkg.DATASET_OPTIONS, layer_options={"SPATIAL_INDEX": "NO"})
    assert not gpkg.has_rtree(bare)
    gpkg.add_rtree(bare)
    for p in (path, bare):
        assert gpkg.has_rtree(p)
        got = _check(p)
        assert got["check"] == "ok" and got["rows"] == n
        for x, y, w, hits in got["queries"]:
            exact = np.flatnonzero((boxes[:, 0] <= x + w) & (boxes[:, 1] >= x) & (boxes[:, 2] <= y + w) & (boxes[:, 3] >= y)) + 1
            near = np.flatnonzero((boxes[:, 0] <= x + w + 1) & (boxes[:, 1] >= x - 1) & (boxes[:, 2] <= y + w + 1)
                                  & (boxes[:, 3] >= y - 1)) + 1
            assert set(exact) <= set(hits) <= set(near)  # boxes rounded outwards by at most a float32 step


def test_add_rtree_names_the_file_it_cannot_index(tmp_path):
    from tilescan.errors import OutputError

    bad = tmp_path / "not.gpkg"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutputError) as e:
        gpkg.add_rtree(bad, name="out/tiles.gpkg")
    assert "out/tiles.gpkg" in str(e.value) and "spatial index" in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-3e38, max_value=3e38))
def test_float32_bounds_round_outwards(x):
    lo, hi = gpkg._f32(x, False), gpkg._f32(x, True)
    assert lo <= x <= hi
    for v in (lo, hi):  # exactly representable as float32
        assert struct.unpack(">f", struct.pack(">f", v))[0] == v
    assert hi == lo or np.nextafter(np.float32(lo), np.float32(np.inf)) == np.float32(hi)


def test_index_written_in_this_process_when_its_sqlite_can(tmp_path):
    """Without TensorFlow's SQLite in the way GDAL builds the index itself (layer_options)."""
    probe = sqlite3.connect(":memory:")
    try:
        probe.execute("CREATE VIRTUAL TABLE t USING rtree(id, a, b)")
        has = True
    except sqlite3.Error:
        has = False
    assert gpkg.layer_options() == {"SPATIAL_INDEX": "YES" if has else "NO"}


def test_table_formats_benchmark_runs(tmp_path):
    """benchmarks/table_formats.py runs and reports every format (smallest mode), so it
    cannot rot; no timing is asserted."""
    from conftest import REPO

    table, _ = _table(300)
    parquet = tmp_path / "tiles.parquet"
    table.write_geoparquet(parquet, "EPSG:32614", CLASSES, "s.tif", "m")
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "table_formats.py"), "--rows", "500", "--rounds",
                          "1", "--scene", str(parquet), "--no-tensorflow", "--reader", "", "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    for name, rows in (("scene", 300), ("synthetic", 500)):
        t = report["tables"][name]
        assert t["rows"] == rows
        assert set(t["formats"]) == {"parquet", "gpkg_default", "gpkg_compat", "fgb"}
        assert t["formats"]["gpkg_compat"]["gpkg_user_version"] == 10200 and t["formats"]["gpkg_compat"]["gpkg_rtree"]
        assert all(f["bytes"] > 0 and f["write_s"] > 0 for f in t["formats"].values())
    assert "| gpkg_compat |" in res.stdout
