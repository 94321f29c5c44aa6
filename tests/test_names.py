"""Scene names never choose where tilescan writes (issue 16).

Copies of one real 512 px scene under odd names (``..tif``, ``.tilescan-locks.tif``,
``report.json.tif``, 250-character stems, NFC/NFD twins, ``CON.tif``, ``A.tif`` beside
``a.tif``...) go through one ``tilescan run`` (the real CLI in this process, the packaged
model, four tiles a scene); the tests then check what a user would see in OUT and beside it,
``tilescan collect``, reruns and shards. The name mapping itself is property-tested.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import xml.etree.ElementTree as ET
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import invoke, read_report, scene, tree_hashes
from tilescan import layout
from tilescan.errors import OutputError
from tilescan.outputs.gpkg import has_rtree
from tilescan.pipeline.units import move_into_place

SCENE = "rio-cogeo/image_rgb.tif"  # 512 x 512, EPSG:3857
FAST = ("--tile-size", "256", "--units", "px", "--no-progress")
LONG = "x" * 250  # a 254-byte file name with ".tif": legal on ext4, APFS, NTFS

# file (relative to the scene folder) -> the folder tilescan must give it (None: checked apart)
NAMES = {
    "..tif": "_",
    "...tif": "__",
    ".tilescan-locks.tif": "_tilescan-locks",
    ".tilescan-staging.tif": "_tilescan-staging",
    "report.json.tif": "report.json_",
    "report-shard-0000-of-0002.json.tif": "report-shard-0000-of-0002.json_",
    "collected.tif": "collected_",
    "CON.tif": "CON_",
    "with space.tif": "with space",
    "a%20b.tif": "a_20b",  # QGIS cannot open a GeoPackage under a%20b/
    "take #2.tif": "take _2",  # '#' would end the path of a STAC link to its item
    "new\nline.tif": "new_line",
    "plain.tif": "plain",  # an ordinary name maps to itself
    f"one/{LONG}.tif": None,
    f"two/{LONG}.tif": None,
    unicodedata.normalize("NFC", "café.tif"): None,
    unicodedata.normalize("NFD", "café.tif"): None,
    "A.tif": None,
    "a.tif": None,
}


def folders(rep: dict) -> dict[str, Path]:
    """Scene file (relative to the scene folder) -> its output folder, from a report."""
    return {str(Path(r["scene"]).relative_to(rep["_scenes"])): Path(r["out_dir"]) for r in rep["done"]}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    scenes = root / "scenes"
    for rel in NAMES:
        (scenes / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(scene(SCENE), scenes / rel)
    assert len({p for p in scenes.rglob("*.tif")}) == len(NAMES)  # NFC and NFD are two files here
    out = root / "work" / "out"
    out.mkdir(parents=True)
    beside = sorted(os.listdir(out.parent))
    res = invoke(["run", scenes, "-o", out, *FAST])
    rep = read_report(out)
    rep["_scenes"] = str(scenes.resolve())
    return {"root": root, "scenes": scenes, "out": out, "beside": beside, "res": res, "report": rep}


def test_every_scene_gets_its_own_safe_folder_inside_out(batch):
    out, rep = batch["out"], batch["report"]
    assert batch["res"].exit_code == 0, batch["res"].output
    assert rep["counts"] == {"done": len(NAMES), "skipped": 0, "failed": 0}
    assert sorted(os.listdir(out.parent)) == batch["beside"] == ["out"]  # nothing created or moved beside OUT
    got = folders(rep)
    assert set(got) == set(NAMES)
    for rel, folder in got.items():
        assert folder.parent == out and folder.is_dir() and not folder.is_symlink(), rel
        assert len(folder.name.encode()) <= layout.MAX_NAME_BYTES and not folder.name.startswith(".")
        if NAMES[rel] is not None:
            assert folder.name == NAMES[rel], rel
        m = json.loads((folder / "run.json").read_text())
        assert m["status"] == "complete" and m["scene"] == str((batch["scenes"] / rel).resolve())  # the original path
        t = pq.read_table(folder / "tiles.parquet", columns=["scene"])
        assert set(t.column("scene").cast("string").to_pylist()) == {Path(rel).name}  # the original name, as is
        assert t.num_rows == 4
    # distinct even where macOS and Windows fold case and Unicode forms
    assert len({layout.fold(f.name) for f in got.values()}) == len(NAMES)
    nfc, nfd = (got[unicodedata.normalize(f, "café.tif")].name for f in ("NFC", "NFD"))
    assert nfc != nfd and nfc.startswith("café-") and nfd.startswith("café-")
    assert got["A.tif"].name.startswith("A-") and got["a.tif"].name.startswith("a-")
    assert got[f"one/{LONG}.tif"] != got[f"two/{LONG}.tif"]
    # OUT holds the scene folders and the report, and no bookkeeping is left after a successful run
    assert sorted(os.listdir(out)) == sorted([f.name for f in got.values()] + ["report.json"])
    assert read_report(out)["exit_code"] == 0  # report.json is the invocation's report, intact


def test_collect_gathers_every_scene(batch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(batch["out"], out)
    res = invoke(["collect", out, "--no-gpkg"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out / "collected" / "tiles.parquet", columns=["scene", "scene_file", "scene_path"]).to_pandas()
    got = folders(batch["report"])
    assert len(t) == 4 * len(NAMES)
    assert set(t["scene"]) == {f.name for f in got.values()}
    assert set(t["scene_file"]) == {Path(rel).name for rel in NAMES}
    assert set(t["scene_path"]) == {str((batch["scenes"] / rel).resolve()) for rel in NAMES}
    assert sorted(os.listdir(out)) == sorted([f.name for f in got.values()] + ["report.json", "collected"])


def test_an_output_folder_named_with_uri_characters_collects(batch, tmp_path):
    """'#', '?' and '%20' in the output folder's path are part of its name for every writer:
    collect's GeoPackage is indexed where it is, and nothing lands beside the folder."""
    out = tmp_path / "res #1 %20 ?x" / "out"
    shutil.copytree(batch["out"], out)
    res = invoke(["collect", out])
    assert res.exit_code == 0, res.output
    assert sorted(os.listdir(tmp_path)) == ["res #1 %20 ?x"] and os.listdir(out.parent) == ["out"]
    gpkg = out / "collected" / "tiles.gpkg"
    assert has_rtree(gpkg)  # read back where it is, '#' and all (plain SQL: no R-tree module needed)
    con = sqlite3.connect(gpkg)
    try:
        assert con.execute("SELECT count(*) FROM tiles").fetchone()[0] == 4 * len(NAMES)
        assert con.execute("SELECT count(*) FROM rtree_tiles_geom_rowid").fetchone()[0] == 4 * len(NAMES)
    finally:
        con.close()


def test_rerun_skips_all_and_old_folder_names_are_refused(batch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(batch["out"], out)
    res = invoke(["run", batch["scenes"], "-o", out, *FAST])
    assert res.exit_code == 0, res.output
    assert read_report(out)["counts"] == {"done": 0, "skipped": len(NAMES), "failed": 0}

    # CON.tif's outputs where tilescan put them before names were made safe on every
    # filesystem (OUT/CON): refused by name, not redone elsewhere, not touched
    new = folders(batch["report"])["CON.tif"].name
    os.rename(out / new, out / "CON")
    before = tree_hashes(out / "CON", folders=True)
    res = invoke(["run", batch["scenes"], "-o", out, *FAST])
    assert res.exit_code == 3, res.output
    rep = read_report(out)
    assert rep["counts"] == {"done": 0, "skipped": len(NAMES) - 1, "failed": 1}
    reason = rep["failed"][0]["reason"]
    assert str(out / "CON") in reason and str(out / new) in reason and "earlier tilescan version" in reason
    assert tree_hashes(out / "CON", folders=True) == before and not (out / new).exists()
    # collect takes its rows from there and says so: not a scene missing from the set
    res = invoke(["collect", out, "--no-gpkg", "--no-styles", "--require-complete"])
    assert res.exit_code == 0 and "not in the collected set" not in res.output, res.output
    assert (f"1 scene(s) are collected from the folder an earlier tilescan named them by, which the latest run left "
            f"as it was ({new}: CON): move each to its new name") in res.output, res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert not summary["failed_in_run"] and [u["outputs_in"] for u in summary["earlier_outputs"]] == ["CON"]
    os.rename(out / "CON", out / new)

    # a.tif's outputs under its bare name (OUT/a: as an older tilescan wrote them, or as a run
    # that had not seen A.tif yet did): they stay a.tif's folder, skipped; A.tif keeps its own
    new = folders(batch["report"])["a.tif"].name
    os.rename(out / new, out / "a")
    before = tree_hashes(out / "a", folders=True)
    res = invoke(["run", batch["scenes"], "-o", out, *FAST])
    assert res.exit_code == 0, res.output
    assert read_report(out)["counts"] == {"done": 0, "skipped": len(NAMES), "failed": 0}
    assert tree_hashes(out / "a", folders=True) == before and not (out / new).exists()


def test_a_scene_of_the_same_stem_arriving_later_leaves_the_first_where_it_is(tmp_path):
    """A cron job's folder: dup.tif is done as OUT/dup; later another dup.tif arrives in a
    subfolder. The first is not done again under a new name (nor counted twice by collect);
    the newcomer gets a name of its own."""
    scenes, out = tmp_path / "scenes", tmp_path / "out"
    (scenes / "later").mkdir(parents=True)
    shutil.copyfile(scene(SCENE), scenes / "dup.tif")
    assert invoke(["run", scenes, "-o", out, *FAST]).exit_code == 0
    first = tree_hashes(out / "dup", folders=True)
    shutil.copyfile(scene(SCENE), scenes / "later" / "dup.tif")
    res = invoke(["run", scenes, "-o", out, *FAST])
    assert res.exit_code == 0, res.output
    rep = read_report(out)
    assert [Path(r["out_dir"]).name for r in rep["skipped"]] == ["dup"]
    assert [r["scene"] for r in rep["done"]] == [str((scenes / "later" / "dup.tif").resolve())]
    assert tree_hashes(out / "dup", folders=True) == first
    assert invoke(["collect", out]).exit_code == 0
    table = pq.read_table(out / "collected" / "tiles.parquet")
    per_scene = {s: table.column("scene").to_pylist().count(s) for s in set(table.column("scene").to_pylist())}
    assert len(per_scene) == 2 and len(set(per_scene.values())) == 1, per_scene


def test_a_newcomer_named_like_a_tagged_folder_leaves_that_folder_to_its_scene(tmp_path):
    """a.tif and a.TIF are done as OUT/a-<tag> each; later a scene named like one of those
    folders arrives (a-<tag>.tif): the folder stays its scene's, skipped, and the newcomer
    gets a name of its own (it was the tagged scene that moved, and was refused as an older
    tilescan's outputs)."""
    scenes, out = tmp_path / "scenes", tmp_path / "out"
    scenes.mkdir()
    for name in ("a.tif", "a.TIF"):
        shutil.copyfile(scene(SCENE), scenes / name)
    assert invoke(["run", scenes, "-o", out, *FAST]).exit_code == 0
    taken = {Path(r["scene"]).name: Path(r["out_dir"]).name for r in read_report(out)["done"]}
    before = tree_hashes(out / taken["a.TIF"], folders=True)
    shutil.copyfile(scene(SCENE), scenes / f"{taken['a.TIF']}.tif")
    res = invoke(["run", scenes, "-o", out, *FAST])
    assert res.exit_code == 0, res.output
    rep = read_report(out)
    assert sorted(Path(r["out_dir"]).name for r in rep["skipped"]) == sorted(taken.values())
    (done,) = rep["done"]
    assert Path(done["scene"]).name == f"{taken['a.TIF']}.tif" and Path(done["out_dir"]).name not in taken.values()
    assert tree_hashes(out / taken["a.TIF"], folders=True) == before


def test_shards_cover_the_same_folders(batch, tmp_path):
    out = tmp_path / "out"
    for i in range(2):
        res = invoke(["run", batch["scenes"], "-o", out, *FAST, "--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
    mine = [set(Path(r["out_dir"]).name for r in read_report(out, f"report-shard-{i:04d}-of-0002.json")["done"])
            for i in range(2)]
    assert not mine[0] & mine[1]
    assert mine[0] | mine[1] == {f.name for f in folders(batch["report"]).values()}
    assert sorted(os.listdir(out)) == sorted(mine[0] | mine[1] | {f"report-shard-{i:04d}-of-0002.json" for i in range(2)})


def test_row_bands_of_an_odd_name_stay_in_its_folder(batch, tmp_path):
    """One scene, two shards: its tile rows are split, each band written to OUT/_/rows-…"""
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    for i in range(2):
        res = invoke(["run", batch["scenes"] / "..tif", "-o", out, "--tile-size", "128", "--units", "px", "--no-progress",
                      "--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
    assert os.listdir(out.parent) == ["out"]
    assert sorted(os.listdir(out / "_")) == ["rows-00000-00002", "rows-00002-00004"]
    res = invoke(["collect", out, "--no-gpkg"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert summary["scenes"]["_"]["complete"] and summary["tiles"] == 16


def test_outputs_in_the_way_say_what_they_were_made_from(tmp_path):
    """A finished folder in the way of a scene names what differs: another scene file of the
    same name (run in another invocation), or another version of this file; never just
    "something", so --overwrite is not given on a guess."""
    out = tmp_path / "out"
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copyfile(scene(SCENE), tmp_path / d / "s.tif")
    assert invoke(["run", tmp_path / "a" / "s.tif", "-o", out, *FAST]).exit_code == 0
    res = invoke(["run", tmp_path / "b" / "s.tif", "-o", out, *FAST])
    assert res.exit_code == 6 and f"of another scene file of the same name ({tmp_path / 'a' / 's.tif'}) exist: if " \
        "this is that file moved, run it alone with --overwrite" in res.output, res.output
    os.utime(tmp_path / "a" / "s.tif", (1e9, 1e9))
    res = invoke(["run", tmp_path / "a" / "s.tif", "-o", out, *FAST])
    assert res.exit_code == 6 and "made from another version of the scene file" in res.output, res.output


def test_collect_takes_a_geostationary_scene_with_its_footprints_cut_at_the_disc(tmp_path):
    """A geostationary scene's edge tiles reach off the earth disc: their lon/lat footprints are
    the part on it (the scene was left out of the set before); each is valid, holds the tile's
    mapped corners and its CAM peak, lies in the tile on the disc and overlaps no neighbour; the scene's layers
    stay out of the collected project (QGIS 3.22 hangs drawing them in lon/lat)."""
    import geopandas as gpd
    import numpy as np
    import pyproj
    import shapely

    src = tmp_path / "scenes"
    src.mkdir()
    shutil.copyfile(scene("rasterio/goes.tif"), src / "goes.tif")
    shutil.copyfile(scene(SCENE), src / "rgb.tif")
    out = tmp_path / "out"
    res = invoke(["run", src, "-o", out, *FAST])
    assert res.exit_code == 0, res.output
    res = invoke(["collect", out, "--no-gpkg"])
    assert res.exit_code == 0, res.output
    said = [ln for ln in res.output.splitlines() if ln.startswith("collect: goes: ")]
    assert len(said) == 1 and "tile footprints reach past the area the CRS 'unnamed' (Geostationary Satellite" in said[0]
    assert "$schema" not in res.output and "PROJJSON" not in res.output  # one readable line, no CRS dump
    own = gpd.read_parquet(out / "goes" / "tiles.parquet")
    got = gpd.read_parquet(out / "collected" / "tiles.parquet")
    goes = got[got["scene"] == "goes"].reset_index(drop=True)
    assert len(goes) == len(own) > 0 and goes.geometry.notna().all() and goes.geometry.is_valid.all()
    summary = json.loads((out / "collected" / "summary.json").read_text())
    to_lonlat = pyproj.Transformer.from_crs(own.crs, "OGC:CRS84", always_xy=True)
    cut = 0
    for i, tile in own.geometry.items():
        x, y = (np.asarray(v) for v in tile.exterior.xy)
        lon, lat = (np.asarray(v) for v in to_lonlat.transform(x, y))
        on = np.isfinite(lon) & np.isfinite(lat)
        cut += not on.all()
        ring = goes.geometry[i]
        corners = shapely.points(lon[on], lat[on])
        assert shapely.dwithin(ring, corners, 1e-6).all()  # every corner on the disc is in the cut footprint
        back = np.column_stack(to_lonlat.transform(*np.asarray(ring.exterior.xy), direction="INVERSE"))
        assert np.isfinite(back).all() and shapely.dwithin(tile, shapely.points(back), 1e-3 * tile.length).all()  # in the tile
        peak = shapely.Point(goes["cam_peak_lon"][i], goes["cam_peak_lat"][i])
        assert shapely.dwithin(ring, peak, 1e-6)
    assert cut == summary["scenes"]["goes"]["clipped_tiles"] > 0 and summary["failed"] == []
    # a cut footprint meets its neighbours edge to edge, as the tiles do: no overlaps, no gaps
    shapes = list(goes.geometry)
    overlap = max(shapes[i].intersection(shapes[j]).area / min(shapes[i].area, shapes[j].area)
                  for i in range(len(shapes)) for j in range(i + 1, len(shapes)))
    assert overlap < 1e-9
    # a cut tile's valid pixels all lie on the disc: its valid area is no smaller a share of its
    # cut footprint than of its pixel window, and never more than the footprint
    cut_rows = goes[~np.isclose(goes["valid_area_m2"], goes["area_m2"] * goes["valid_fraction"])]
    assert len(cut_rows) and (cut_rows["valid_area_m2"] > cut_rows["area_m2"] * cut_rows["valid_fraction"]).all()
    assert (goes["valid_area_m2"] <= goes["area_m2"] * (1 + 1e-9)).all()
    project = ET.parse(out / "collected" / "collected.qgs").getroot()
    assert [g.get("name") for g in project.iter("layer-tree-group") if g.get("name")] == ["rgb"]


# ----------------------------------------------------------------------------- no model


def test_an_output_folder_that_refuses_the_finished_unit_is_the_one_named(tmp_path, monkeypatch):
    """OUT made read-only while a run works (the staging folder inside it stays writable): the
    error names OUT, which cannot be written, not the staging folder."""
    from tilescan.outputs.files import write_error
    from tilescan.pipeline import units

    out = tmp_path / "out"
    stage = out / layout.STAGING / "x"
    stage.mkdir(parents=True)

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(src), str(dst))

    monkeypatch.setattr(units.os, "replace", refused)
    with pytest.raises(PermissionError) as exc:
        units.move_into_place(stage, out / "x", out)
    err = write_error(exc.value, exc.value.filename)
    assert err.path == str(out) and "Permission denied" in str(err), str(err)


def test_a_scene_whose_geopackage_sqlite_cannot_open_fails_before_its_work(tmp_path, monkeypatch):
    """OUT deep enough that a 250-character scene name takes its GeoPackage past SQLite's
    504-byte path limit, while a short one fits: the long one fails as it opens, its tiles
    never read, with the path the user knows and what to do; the short one is written."""
    from tilescan.pipeline import process

    out = Path(os.path.realpath(tmp_path)) / "o"
    out = out / ("d" * (260 - len(os.fsencode(out)) - 1))
    src = tmp_path / "in"
    src.mkdir()
    for name in ("short.tif", f"{LONG}.tif"):
        shutil.copy(scene(SCENE), src / name)
    read, real_read = [], process.UnitJob.read

    def counted(job, *args, **kwargs):
        read.append(job.unit.name)
        return real_read(job, *args, **kwargs)

    monkeypatch.setattr(process.UnitJob, "read", counted)
    res = invoke(["run", src, "-o", out, *FAST])
    assert res.exit_code == 3, res.output  # some scenes failed, the others were written
    assert set(read) == {"short"}
    assert layout.read_manifest(out / "short")["status"] == "complete" and (out / "short" / "tiles.gpkg").is_file()
    rep = read_report(out)
    [failed] = rep["failed"]
    folder = out / failed["unit"]
    assert failed["reason"].startswith(f"{folder / 'tiles.gpkg'}: cannot write the GeoPackage: SQLite opens "
                                       f"files by paths of at most 504 bytes"), failed["reason"]
    assert "--no-gpkg" in failed["reason"] and failed["error_kind"] == "output" and not folder.exists()


def test_move_into_place_only_targets_unit_folders(tmp_path):
    out = tmp_path / "out"
    stage = out / layout.STAGING / "x"
    stage.mkdir(parents=True)
    (stage / "run.json").write_text("{}")
    keep = out / "other"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (out / "linked").symlink_to(tmp_path / "elsewhere")
    before = tree_hashes(tmp_path, folders=True)
    for target in (out / ".", out / "..", out / ".hidden", out / "a" / "b", out / "other" / "notes.txt",
                   out / "linked" / "rows-00000-00002", tmp_path / "elsewhere", out / "report.json"):
        with pytest.raises(OutputError):
            move_into_place(stage, target, out)
    assert tree_hashes(tmp_path, folders=True) == before
    move_into_place(stage, out / "scene" / "rows-00000-00002", out)
    assert (out / "scene" / "rows-00000-00002" / "run.json").is_file()


def test_lock_file_is_removed_when_released(tmp_path):
    path = tmp_path / layout.LOCKS / "scene.lock"
    a, b = layout.FileLock(path), layout.FileLock(path)
    a.acquire()
    with pytest.raises(layout.Busy) as busy:
        b.acquire()
    assert busy.value.holder.startswith(f"pid {os.getpid()} ")
    a.release()
    assert not path.exists()
    b.acquire()  # free again, on a new file
    assert path.exists()
    b.release()
    assert not path.exists()
    layout.tidy(tmp_path)
    assert not (tmp_path / layout.LOCKS).exists()


def test_lock_files_follow_the_umask_and_one_not_writable_is_still_taken(tmp_path):
    """In a group's shared folder (umask 002) a lock file is group-writable, so the group's other
    runs can take it; a lock file this user may read but not write (one a killed run of another
    user left) is taken all the same, and replaced by one naming this run as its holder."""
    import shutil
    import stat
    import subprocess
    import sys

    path = tmp_path / layout.LOCKS / "scene.lock"
    was = os.umask(0o002)
    try:
        lock = layout.FileLock(path)
        lock.acquire()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o664
        lock.release()
    finally:
        os.umask(was)
    path.write_text("pid 1 on elsewhere")
    path.chmod(0o444)
    caps = "-dac_override,-dac_read_search"  # root as an ordinary user: file modes apply
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to take a lock as an ordinary user while root")
    code = ("import sys; from pathlib import Path; from tilescan import layout; "
            "lock = layout.FileLock(Path(sys.argv[1])); lock.acquire(); print(Path(sys.argv[1]).read_text()); "
            "lock.release()")
    p = subprocess.run([*prefix, sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("pid ") and "elsewhere" not in p.stdout  # its own holder line, not the dead run's
    assert not path.exists()  # released: removed, as every lock is


# ----------------------------------------------------------------------------- properties

_ANY = st.text(st.characters(blacklist_categories=()), max_size=300)  # surrogates included
_ODD = st.sampled_from([".", "..", "...", ".tilescan-locks", "report.json", "REPORT.JSON", "collected", "Collected",
                        "con", "CON.tif", "lpt\u00b9", "nul .x", " ", "a.", "a ", "", "x" * 251, "é" * 200,
                        "a/b", "a\\b", "a\0b", "a\nb", "\u2028", "report-shard-0001-of-0009.json"])
_NAMES = _ANY | _ODD
# Windows device names, stated here independently of layout.py: reserved with any extension
# ("CON.tif") and trailing spaces.
WINDOWS_DEVICES = ({"con", "prn", "aux", "nul", "conin$", "conout$", "clock$"}
                   | {f"{p}{d}" for p in ("com", "lpt") for d in "0123456789\u00b9\u00b2\u00b3"})


def _assert_safe(name: str) -> None:
    raw = name.encode("utf-8")  # no lone surrogates left
    assert 0 < len(raw) <= layout.MAX_NAME_BYTES
    assert name not in (".", "..") and not name.startswith(".") and not name.endswith((".", " "))
    assert not set(name) & set('<>:"/\\|?*%\0') and not any(unicodedata.category(c) in ("Cc", "Cs") for c in name)
    assert unicodedata.normalize("NFC", name) == name
    assert layout.is_safe_name(name) and layout.folder_name(name) == name
    assert not re.fullmatch(r"report(-shard-.*)?\.json|collected|\.tilescan.*", name.casefold())
    assert name.split(".")[0].rstrip(" ").casefold() not in WINDOWS_DEVICES
    # every name derived from it stays within one path component's 255 bytes
    for derived in (layout.slot(name) + ".lock", layout.slot(name, "rows-999999-999999") + ".lock",
                    layout.aside_name(layout.slot(name, "rows-999999-999999")), layout.with_tag(name, "f" * 40)):
        assert len(derived.encode()) <= layout.MAX_DERIVED_BYTES


@given(_NAMES)
@settings(max_examples=400, deadline=None)
def test_any_name_maps_to_one_safe_component(stem):
    _assert_safe(layout.folder_name(stem))


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}[A-Za-z0-9_-]", fullmatch=True))
def test_ordinary_names_map_to_themselves(stem):
    if stem.split(".")[0].casefold() in WINDOWS_DEVICES or re.fullmatch(r"report(-shard-.*)?\.json|collected",
                                                                        stem.casefold()):
        return
    assert layout.folder_name(stem) == stem


def test_real_scene_names_map_to_themselves(scenes_dir):
    for p in scenes_dir.rglob("*.[tT][iI][fF]"):
        assert layout.folder_name(p.stem) == p.stem


def _file_name_ok(stem: str) -> bool:
    """Whether a file could have this stem (os.walk gives undecodable bytes as U+DC80..U+DCFF)."""
    try:
        os.fsencode(stem)
    except UnicodeEncodeError:
        return False
    return "/" not in stem and "\0" not in stem


@given(st.lists(st.tuples(st.integers(0, 2), _NAMES.filter(_file_name_ok)), min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_distinct_scenes_get_distinct_folders(items):
    paths = sorted({Path(f"/nonexistent-tilescan-test/d{k}/{stem}.tif") for k, stem in items})
    names = layout.scene_folder_names(paths)
    assert names == layout.scene_folder_names(paths)  # stable: every shard and rerun agrees
    assert len({layout.fold(n) for n in names}) == len(paths)
    for n in names:
        _assert_safe(n)


def test_a_name_that_is_not_utf8_fails_alone_with_a_clear_message(tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copyfile(scene(SCENE), scenes / "good.tif")
    shutil.copyfile(scene(SCENE), os.path.join(os.fsencode(scenes), b"bad\xff.tif"))
    out = tmp_path / "out"
    res = invoke(["run", scenes, "-o", out, *FAST])
    assert res.exit_code == 3, res.output
    assert "not valid UTF-8" in res.output
    rep = read_report(out)  # still valid JSON
    assert [Path(r["scene"]).name for r in rep["done"]] == ["good.tif"]
    assert "not valid UTF-8" in rep["failed"][0]["reason"]


def test_a_bad_scene_named_with_a_newline_is_said_on_one_line(tmp_path):
    """A file name holding a newline: its error is one log line (the newline escaped), so a
    `grep '^error:'` of the log keeps the reason; report.json keeps the name as it is."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copyfile(scene(SCENE), scenes / "good.tif")
    (scenes / "bad\nname.tif").write_bytes(b"not a tiff at all")
    out = tmp_path / "out"
    res = invoke(["run", scenes, "-o", out, *FAST])
    assert res.exit_code == 3, res.output
    said = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and "bad\\nname.tif: not a TIFF" in said[0], res.output
    assert read_report(out)["failed"][0]["scene"] == str(scenes / "bad\nname.tif")


def test_an_out_inside_the_input_folder_is_not_read_as_scenes(tmp_path):
    """OUT inside the input folder, or the input folder itself: a rerun finds only the
    user's scenes, not the labels and heatmaps of its own outputs, nor what a killed run
    left in staging, nor macOS's ``._`` companion files; nothing fails, nothing new is made."""
    scenes = tmp_path / "in"
    scenes.mkdir()
    shutil.copyfile(scene(SCENE), scenes / "a.tif")
    for out in (scenes / "out", scenes):
        assert invoke(["run", scenes, "-o", out, *FAST]).exit_code == 0
        (out / ".tilescan-staging" / "a").mkdir(parents=True, exist_ok=True)  # as a killed run leaves it
        shutil.copyfile(out / "a" / "heatmap.tif", out / ".tilescan-staging" / "a" / ".heatmap.tif.tmp-1-x.tif")
        (scenes / "._a.tif").write_bytes(b"\0\5\26\7" + bytes(60))  # AppleDouble: not a TIFF
        before = sorted(n for n in os.listdir(out) if not n.startswith("."))
        res = invoke(["run", scenes, "-o", out, *FAST])
        assert res.exit_code == 0, res.output
        rep = read_report(out)
        assert [Path(r["scene"]).name for r in rep["skipped"]] == ["a.tif"] and not rep["done"] and not rep["failed"]
        assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == before  # nothing new
        assert not (out / ".tilescan-staging").exists()  # the leftover swept
    # OUT inside the input folder with a scene's run.json damaged: OUT is still never searched
    out = scenes / "out"
    (out / "a" / "run.json").write_text("")
    res = invoke(["run", scenes, "-o", out, *FAST, "--overwrite"])
    rep = read_report(out)
    assert res.exit_code == 0 and [Path(r["scene"]).name for r in rep["done"]] == ["a.tif"] and not rep["failed"], res.output


def test_a_scene_alone_with_its_stem_keeps_the_tagged_folder_it_was_done_in(tmp_path):
    """x/s.tif and y/s.tif are done as OUT/s-<hash>; x/s.tif run by itself, or y/s.tif
    removed, leaves x's outputs where they are: not done again as OUT/s (collect would
    count the scene twice)."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    for sub in ("x", "y"):
        (scenes / sub).mkdir(parents=True)
        shutil.copyfile(scene(SCENE), scenes / sub / "s.tif")
    assert invoke(["run", scenes, "-o", out, *FAST]).exit_code == 0
    tagged = sorted(os.listdir(out))
    assert len([n for n in tagged if n.startswith("s-")]) == 2
    (scenes / "y" / "s.tif").unlink()
    for inputs in (scenes / "x" / "s.tif", scenes):
        res = invoke(["run", inputs, "-o", out, *FAST])
        assert res.exit_code == 0, res.output
        rep = read_report(out)
        assert len(rep["skipped"]) == 1 and not rep["done"]
        assert sorted(os.listdir(out)) == tagged


def test_what_a_user_adds_beside_the_outputs_outlives_overwrite_and_collect(tmp_path):
    """A project saved beside a scene's outputs and notes in OUT/collected are kept when
    ``--overwrite`` replaces the scene's outputs and a new ``collect`` replaces the set; what
    tilescan wrote there is replaced, a stale output it no longer writes is not kept."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    scenes.mkdir()
    shutil.copyfile(scene(SCENE), scenes / "a.tif")
    assert invoke(["run", scenes, "-o", out, *FAST]).exit_code == 0
    assert invoke(["collect", out]).exit_code == 0
    (out / "a" / "a-edited.qgs").write_text("<qgis/>")
    (out / "a" / "notes").mkdir()
    (out / "collected" / "NOTES.txt").write_text("mine")
    res = invoke(["run", scenes, "-o", out, *FAST, "--overwrite", "--no-gpkg"])
    assert res.exit_code == 0 and "kept what was added beside its outputs: a-edited.qgs, notes" in res.output, res.output
    assert (out / "a" / "a-edited.qgs").read_text() == "<qgis/>" and (out / "a" / "notes").is_dir()
    assert not (out / "a" / "tiles.gpkg").exists()  # tilescan's, not written this time: not kept
    res = invoke(["collect", out])
    assert res.exit_code == 0 and "kept what was added to" in res.output, res.output
    assert (out / "collected" / "NOTES.txt").read_text() == "mine" and (out / "collected" / "tiles.parquet").is_file()


def test_collect_counts_a_scene_file_once_whatever_folders_hold_it(tmp_path):
    """Outputs of one scene file in two folders (an earlier tilescan did it again under a new
    name): collect takes the one finished last, once, and says why it skipped the other."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    scenes.mkdir()
    shutil.copyfile(scene(SCENE), scenes / "a.tif")
    assert invoke(["run", scenes, "-o", out, *FAST]).exit_code == 0
    shutil.copytree(out / "a", out / "a-5e1f0000")
    m = json.loads((out / "a-5e1f0000" / "run.json").read_text())
    m["finished_at"] = "2020-01-01T00:00:00Z"
    (out / "a-5e1f0000" / "run.json").write_text(json.dumps(m))
    res = invoke(["collect", out])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert list(summary["scenes"]) == ["a"] and summary["tiles"] == 4
    (skip,) = [s for s in summary["skipped"] if s["unit"] == "a-5e1f0000"]
    assert "the same scene file" in skip["reason"] and "as a, which was finished later" in skip["reason"]


def test_a_class_folder_keeps_a_percent_sign():
    """Only scene folders hold a GeoPackage that QGIS must open: a class named "50% tree cover"
    keeps its name as its chips folder's (``train`` reads the class from it)."""
    assert layout.class_folder_name("50% tree cover") == "50% tree cover"
    assert layout.folder_name("50% tree cover") == "50_ tree cover"
