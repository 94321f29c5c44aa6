"""tilescan.outputs.gpkg: the GeoPackage R-tree tilescan builds itself (packed, as SQLite lays it out).

The index is checked in a fresh interpreter whose SQLite has the R-tree module (this test
process may have loaded TensorFlow, whose SQLite lacks it): SQLite's own ``rtreecheck``,
and window queries through the index against the tiles' exact boxes.
"""

from __future__ import annotations

import json
import re
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
from tilescan.outputs import table as table_mod
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
    """An R-tree box's lower bounds go to the nearest float32 at or below, its upper bounds at
    or above: the float32 values around ``x`` found here from ``struct``'s rounding."""
    def around(v: float) -> tuple[float, float]:
        f = struct.unpack(">f", struct.pack(">f", v))[0]  # the nearest float32, compared as float64
        below = f if f <= v else float(np.nextafter(np.float32(f), np.float32(-np.inf)))
        above = f if f >= v else float(np.nextafter(np.float32(f), np.float32(np.inf)))
        return below, above

    (lo, hi), (nlo, nhi) = around(x), around(-x)
    assert lo <= x <= hi
    assert hi == lo or np.nextafter(np.float32(lo), np.float32(np.inf)) == np.float32(hi)
    got = gpkg._f32_boxes([(x, x, -x, -x)])
    assert got.dtype == np.float32 and got.tolist() == [[lo, hi, nlo, nhi]]


def test_helper_started_early_indexes_the_next_file(tmp_path):
    """A run starts the index helper while its first scene is read (``_IndexHelper.start``):
    the file written later is indexed by that same process, and correctly."""
    helper = gpkg._IndexHelper()
    try:
        helper.start()
        started = helper.proc
        assert started is not None and started.poll() is None
        helper.start()  # already running: kept, not started twice
        assert helper.proc is started
        t, boxes = _table(300)
        path = tmp_path / "t.gpkg"
        pyogrio.write_arrow(_arrow_reader(t), str(path), layer="tiles", driver="GPKG", geometry_name="geometry",
                            geometry_type="Polygon", crs="EPSG:32633", layer_options={"SPATIAL_INDEX": "NO"})
        code, why = helper.index(path)
        assert code == 0, why
        assert helper.proc is started
    finally:
        helper.close()
    got = _check(path)
    assert got["check"] == "ok" and got["rows"] == len(boxes)


def test_a_helper_that_cannot_start_is_said_to_be_the_cause(tmp_path, monkeypatch):
    """An interpreter that cannot be run again (replaced during a long run, or not the user's
    to run) was reported as 'tiles.gpkg: cannot write (Permission denied)'; the index step now
    says that its helper could not start, and which interpreter."""
    from tilescan.errors import OutputError

    unrunnable = tmp_path / "python3"
    unrunnable.write_text("not a program")
    unrunnable.chmod(0o644)
    monkeypatch.setattr(sys, "executable", str(unrunnable))
    monkeypatch.setattr(gpkg, "_helper", gpkg._IndexHelper())
    monkeypatch.setattr(gpkg, "_sqlite_has_rtree", lambda: False)  # as where TensorFlow's SQLite came first
    t, _ = _table(10)
    path = tmp_path / "t.gpkg"
    pyogrio.write_arrow(_arrow_reader(t), str(path), layer="tiles", driver="GPKG", geometry_name="geometry",
                        geometry_type="Polygon", crs="EPSG:32633", layer_options={"SPATIAL_INDEX": "NO"})
    with pytest.raises(OutputError) as e:
        gpkg.add_rtree(path, name="out/tiles.gpkg")
    assert str(e.value) == (f"out/tiles.gpkg: cannot add the GeoPackage spatial index (the indexing helper could not "
                            f"start: {unrunnable}: Permission denied)")


def _arrow_reader(t: TileTable):
    """The table's GeoPackage columns as an Arrow stream, as the GDAL writer is given them."""
    import pyarrow as pa

    schema, batches, _ = t._gpkg_arrow(CLASSES, "s.tif")
    return pa.RecordBatchReader.from_batches(schema, batches)


_OPTIONS = """
import json, sqlite3, sys
from tilescan.outputs import gpkg
def has():
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING rtree(id, a, b)")
        return True
    except sqlite3.Error:
        return False
before = gpkg.layer_options(), has()
if sys.argv[1] == "tf":
    import tensorflow  # noqa: F401
print(json.dumps({"before": before, "after": gpkg.layer_options()}))
"""


@pytest.mark.parametrize("load_tf", [False, True])
def test_index_written_in_this_process_when_its_sqlite_can(load_tf):
    """Without TensorFlow's SQLite in the way GDAL builds the index itself (layer_options);
    once TensorFlow is loaded it leaves the index to add_rtree. In a fresh interpreter: this
    test process may have loaded TensorFlow already."""
    r = subprocess.run([sys.executable, "-c", _OPTIONS, "tf" if load_tf else "-"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    (options, has), after = got["before"], got["after"]
    assert options == {"SPATIAL_INDEX": "YES" if has else "NO"}
    assert after == ({"SPATIAL_INDEX": "NO"} if load_tf else options)


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


_WRITE_BOTH = r"""
import sys
if sys.argv[3] == "tf":
    import tensorflow  # noqa: F401 - as in tilescan run: its SQLite (no R-tree module) then serves this process
import pyarrow as pa, pyogrio
sys.path.insert(0, sys.argv[4])
from test_gpkg import _table, CLASSES
from tilescan.outputs import gpkg, table as T

t, _ = _table(int(sys.argv[2]), seed=5)
scene = 'odd & <name> "quoted" é.tif'
extra = {"note": "a & b < c > d"}
t.write_gpkg(sys.argv[1] + "/new.gpkg", "EPSG:32614", CLASSES, scene, "model-1", extra)
t.write_gpkg(sys.argv[1] + "/again.gpkg", "EPSG:32614", CLASSES, scene, "model-1", extra)  # from the cached template
# the reference: GDAL given the same columns, as write_gpkg wrote every file before
schema, batches, _ = t._gpkg_arrow(CLASSES, scene)
meta = T._dumps(T._tilescan_meta(CLASSES, "model-1", scene, len(t), extra))
ref = sys.argv[1] + "/ref.gpkg"
pyogrio.write_arrow(pa.RecordBatchReader.from_batches(schema, batches), ref, layer="tiles", driver="GPKG",
                    geometry_name="geometry", geometry_type="Polygon", crs=T.pyproj_crs("EPSG:32614").to_wkt(),
                    layer_metadata={"tilescan": meta}, dataset_options=gpkg.DATASET_OPTIONS,
                    layer_options=gpkg.layer_options())
gpkg.add_rtree(ref)
print(gpkg.layer_options()["SPATIAL_INDEX"])  # YES: GDAL built the reference's R-tree itself
"""

_RTREE_ROWS = r"""
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
print(json.dumps({"check": con.execute("SELECT rtreecheck('rtree_tiles_geom')").fetchone()[0],
                  "rows": con.execute('SELECT * FROM "rtree_tiles_geom" ORDER BY id').fetchall()}))
"""


def _gpkg_dump(path) -> dict:
    """Every table and schema entry of a GeoPackage but the R-tree's node pages, with the
    write times left out."""
    con = sqlite3.connect(path)
    try:
        # trigger SQL compared without spaces and case: GDAL's own R-tree triggers differ from
        # tilescan's (the 1.2 spec's) only there
        out = {"schema": sorted((k, name, t, re.sub(r"\s+", "", sql).lower() if k == "trigger" else sql)
                                for k, name, t, sql in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                                                   "WHERE name NOT LIKE 'rtree%\\_node' ESCAPE '\\'"))}
        for t in ("tiles", "gpkg_ogr_contents", "gpkg_metadata", "gpkg_geometry_columns", "gpkg_spatial_ref_sys",
                  "sqlite_sequence"):
            out[t] = con.execute(f"SELECT * FROM {t}").fetchall()
        out["gpkg_extensions"] = sorted(con.execute("SELECT * FROM gpkg_extensions").fetchall(), key=repr)
        out["contents"] = con.execute("SELECT table_name, data_type, identifier, description, srs_id "
                                      "FROM gpkg_contents").fetchall()
        out["extent"] = con.execute("SELECT min_x, min_y, max_x, max_y FROM gpkg_contents").fetchall()
        out["metadata_reference"] = con.execute("SELECT reference_scope, table_name, column_name, row_id_value, "
                                                "md_file_id, md_parent_id FROM gpkg_metadata_reference").fetchall()
        out["pragmas"] = [con.execute(f"PRAGMA {p}").fetchall() for p in ("application_id", "user_version", "page_size")]
        return out
    finally:
        con.close()


@pytest.mark.parametrize("sqlite_of", ["python", "tf"])
@pytest.mark.parametrize("n", [0, 16, 700, table_mod.GPKG_FILL_ROWS + 1])
def test_gpkg_filled_from_a_template_equals_gdal_writing_it(tmp_path, n, sqlite_of):
    """write_gpkg copies an empty layer GDAL wrote and adds the rows with Python's sqlite3
    (tables up to GPKG_FILL_ROWS rows; larger ones GDAL writes whole): the same rows (geometry
    blobs byte for byte), metadata, extent, count, extensions and schema as GDAL writing the
    whole table, and an R-tree SQLite accepts holding the same boxes; also inside a process
    that loaded TensorFlow (whose SQLite has no R-tree module)."""
    if sqlite_of == "tf":
        pytest.importorskip("tensorflow")
    from conftest import REPO

    res = subprocess.run([sys.executable, "-c", _WRITE_BOTH, str(tmp_path), str(n), sqlite_of,
                          str(REPO / "tests")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = _gpkg_dump(tmp_path / "ref.gpkg")
    for name in ("new.gpkg", "again.gpkg"):
        got = _gpkg_dump(tmp_path / name)
        ext_got, ext_ref = got.pop("extent"), ref["extent"]
        assert got == {k: v for k, v in ref.items() if k != "extent"}
        assert np.allclose(np.array(ext_got, float), np.array(ext_ref, float), rtol=1e-15, atol=0, equal_nan=True)
        assert len(got["tiles"]) == n and got["gpkg_ogr_contents"] == [("tiles", n)]
        assert "é" in got["gpkg_metadata"][0][4] and "&amp;" in got["gpkg_metadata"][0][4]
    rtrees = []
    for name in ("ref.gpkg", "new.gpkg"):
        r = subprocess.run([sys.executable, "-c", _RTREE_ROWS, str(tmp_path / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rtrees.append(json.loads(r.stdout))
    assert rtrees[1]["check"] == "ok" and len(rtrees[1]["rows"]) == n
    if res.stdout.split()[-1] == "YES":  # the reference's R-tree is SQLite's own
        # SQLite rounds a bound outwards to float32 with a multiply, at times one step further
        got, want = np.array(rtrees[1]["rows"]).reshape(-1, 5), np.array(rtrees[0]["rows"]).reshape(-1, 5)
        assert np.array_equal(got[:, 0], want[:, 0]) and np.allclose(got, want, rtol=2.5e-7, atol=0)
        boxes = _table(n, seed=5)[1]
        assert np.all(got[:, [1, 3]] <= boxes[:, [0, 2]]) and np.all(got[:, [2, 4]] >= boxes[:, [1, 3]])
    else:  # both packed by tilescan (as every file written inside tilescan run was)
        assert rtrees[1]["rows"] == rtrees[0]["rows"]
    if n:  # GDAL reads it through the index (in a fresh interpreter: its SQLite has the R-tree module)
        bbox = ",".join(repr(float(v)) for v in ref["extent"][0])
        r = subprocess.run([sys.executable, "-c", "import pyogrio, sys; df = pyogrio.read_dataframe(sys.argv[1], "
                            "bbox=tuple(map(float, sys.argv[2].split(',')))); print(len(df), df.crs.to_epsg())",
                            str(tmp_path / "new.gpkg"), bbox], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.split() == [str(n), "32614"], r.stderr


_HOLDER = ("import sys, time\nfrom tilescan.outputs.table import _template_folder\n"
           "print(_template_folder(), flush=True)\nif sys.argv[1] == 'stay': time.sleep(120)\n")


def _holder(tmp, mode: str):
    """A process that makes its GeoPackage template folder in ``tmp``, says where, and
    stays (``stay``) or exits (``exit``)."""
    import os
    from pathlib import Path

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, mode], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "TMPDIR": str(tmp)})
    return p, Path(p.stdout.readline().strip())


def test_template_folders_of_killed_processes_are_removed_by_the_next(tmp_path):
    """A process removes its template folder at exit; one killed before its exit ran leaves
    it, and the next process to make one removes it, but never a living process's; a folder
    without an owner file (an older tilescan) goes once a day old."""
    import os
    import signal
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    old, fresh = tmp / "tilescan-gpkg-old", tmp / "tilescan-gpkg-fresh"
    for d in (old, fresh):
        d.mkdir()
        (d / "template-0.gpkg").write_bytes(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    killed, killed_dir = _holder(tmp, "stay")
    alive, alive_dir = _holder(tmp, "stay")
    try:
        assert killed_dir.is_dir() and alive_dir.is_dir() and killed_dir != alive_dir
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert killed_dir.is_dir()  # nothing of it ran at its end
        last, last_dir = _holder(tmp, "exit")
        assert last.wait(30) == 0
        assert not last_dir.exists()  # removed at its own exit
        assert not killed_dir.exists() and not old.exists()
        assert alive_dir.is_dir() and fresh.is_dir()
    finally:
        alive.kill()
        alive.wait(10)
        for p in (killed, alive):
            p.stdout.close()


@pytest.mark.parametrize("n", [10, 3000])  # filled from a template, and written by GDAL
def test_a_path_longer_than_sqlite_opens_is_refused_clearly(tmp_path, n):
    """A GeoPackage deeper than SQLite opens files (it said only "unable to open database
    file") is refused with the limit and what to do, nothing left behind; one a little less
    deep is written."""
    import os

    from tilescan.errors import OutputError

    t, _ = _table(n)
    fits, deep = tmp_path / "a", tmp_path / "b"
    while len(os.fsencode(deep)) < 480:
        fits, deep = fits / ("d" * 20), deep / ("d" * 20)
    while len(os.fsencode(fits)) > 430:
        fits = fits.parent
    fits.mkdir(parents=True)
    deep.mkdir(parents=True)
    with pytest.raises(OutputError, match=r"SQLite opens files by paths of at most 504 bytes, and its temporary "
                                          r"file's is \d+; choose an output folder at least \d+ bytes shorter, or "
                                          r"leave the GeoPackage out \(--no-gpkg"):
        t.write_gpkg(deep / "tiles.gpkg", "EPSG:32633", CLASSES, "s", "m")
    assert os.listdir(deep) == []
    t.write_gpkg(fits / "tiles.gpkg", "EPSG:32633", CLASSES, "s", "m")
    assert len(pyogrio.read_dataframe(fits / "tiles.gpkg")) == n


@pytest.mark.parametrize("n", [10, 3000])  # filled from a template (a copy), and written by GDAL (SQLite makes it)
def test_a_geopackage_gets_the_mode_the_umask_gives(tmp_path, n):
    """In a group's shared folder (umask 002) a GeoPackage is group-writable as every other
    output is (SQLite makes its files 0644 whatever the umask)."""
    import os
    import stat

    t, _ = _table(n)
    was = os.umask(0o002)
    try:
        t.write_gpkg(tmp_path / "tiles.gpkg", "EPSG:32633", CLASSES, "s", "m")
    finally:
        os.umask(was)
    assert stat.S_IMODE(os.stat(tmp_path / "tiles.gpkg").st_mode) == 0o664
