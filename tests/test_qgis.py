"""The outputs open as they should in a real QGIS (issue 18), and the GeoPackage in old GDALs.

One ``tilescan run`` of the NAIP quick-start scene (and one ``tilescan collect``) is shared
by the module. QGIS's Python bindings do not load into the project's interpreter, so each
QGIS check runs ``tests/qgis_check.py`` under a Python that has them (Debian's
``/usr/bin/python3`` with ``python3-qgis``, or ``TILESCAN_QGIS_PYTHON``) and reads the JSON
it prints. Without QGIS those tests skip with the reason, except with
``TILESCAN_REQUIRE_QGIS=1`` (set in ``.ci/run``), where that is a failure.

The run and the collect happen in a work folder holding a copy of the scene and the output
folder; the folder is then renamed, so the projects are opened from a place where no
absolute path written at run time exists any more.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from conftest import invoke, unavailable
from tilescan.outputs.gpkg import has_rtree
from tilescan.outputs.quicklook import LABEL_BLEND
from tilescan.outputs.palette import class_colors

NAIP = "opengeos-naip/m_4709963_se_14_1_20190904.tif"
STEM = Path(NAIP).stem
CHECKER = Path(__file__).with_name("qgis_check.py")


def _qgis_python() -> str:
    """A Python whose ``import qgis.core`` works; skips (or fails in CI) otherwise."""
    candidates = [os.environ["TILESCAN_QGIS_PYTHON"]] if os.environ.get("TILESCAN_QGIS_PYTHON") else ["/usr/bin/python3"]
    for py in candidates:
        if shutil.which(py):
            probe = subprocess.run([py, "-c", "import qgis.core"], capture_output=True, text=True,
                                   env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
            if probe.returncode == 0:
                return py
    msg = (f"no Python with QGIS's bindings ({', '.join(candidates)}: import qgis.core failed); on Debian/Ubuntu "
           "apt-get install python3-qgis, or set TILESCAN_QGIS_PYTHON")
    unavailable(msg, "TILESCAN_REQUIRE_QGIS")


def qgis(py: str, spec: dict, tmp: Path) -> dict:
    """Run the checker on ``spec`` under QGIS's Python; its JSON report."""
    path = tmp / f"spec-{os.getpid()}-{len(list(tmp.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # not the venv's paths
    env.update(QT_QPA_PLATFORM="offscreen", XDG_RUNTIME_DIR=str(tmp))
    res = subprocess.run([py, str(CHECKER), str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def made(tmp_path_factory, scenes_dir):
    """Run and collect in ``work/``, then rename it to ``moved/``; paths of both."""
    root = tmp_path_factory.mktemp("qgis")
    work = root / "work"
    (work / "scenes").mkdir(parents=True)
    scene = work / "scenes" / Path(NAIP).name
    shutil.copyfile(scenes_dir / NAIP, scene)
    out = work / "out"
    res = invoke(["run", scene, "-o", out, "--no-progress"])
    assert res.exit_code == 0, res.output
    res = invoke(["collect", out])
    assert res.exit_code == 0, res.output
    with rasterio.open(scene) as ds:
        crs = ds.crs
    table = pq.read_table(out / STEM / "tiles.parquet")
    moved = root / "moved"
    os.rename(work, moved)
    return {"root": root, "old": work, "new": moved, "dir": moved / "out" / STEM, "out": moved / "out",
            "epsg": f"EPSG:{crs.to_epsg()}", "table": table,
            "classes": json.loads(table.schema.metadata[b"tilescan"])["classes"]}


@pytest.fixture(scope="module")
def qgis_py():
    return _qgis_python()


@pytest.fixture(scope="module")
def report(made, qgis_py):
    """Every output opened on its own, both projects read, and the renders, in one QGIS."""
    d, out, tmp = made["dir"], made["out"], made["root"]
    # the output folder alone, away from the scenes: its own files must still resolve
    alone = made["root"] / "alone"
    shutil.copytree(out, alone)
    table = made["table"]
    centres = []  # map coordinates of every tile centre, with the tile's class
    for g, label in zip(table.column("bbox").to_pylist(), table.column("label").to_pylist()):
        centres.append(([(g["xmin"] + g["xmax"]) / 2, (g["ymin"] + g["ymax"]) / 2], label))
    points = [c for c, _ in centres]
    project = str(d / f"{STEM}.qgs")
    spec = {
        "layers": [{"path": str(d / "heatmap.tif")}, {"path": str(d / "labels.tif")},
                   {"path": str(d / "tiles.gpkg"), "kind": "vector"}],
        "projects": [project, str(out / "collected" / "collected.qgs"), str(alone / STEM / f"{STEM}.qgs")],
        "renders": [
            {"project": project, "png": str(tmp / "project.png"), "size": [934, 723], "points": points},
            {"project": project, "png": str(tmp / "scene.png"), "size": [934, 723], "points": points,
             "layers": ["scene"]},
            {"project": project, "png": str(tmp / "labels.png"), "size": [934, 723], "points": points,
             "layers": ["labels"]},
        ],
    }
    rep = qgis(qgis_py, spec, tmp)
    rep["centres"] = centres
    return rep


def _present(made) -> list[str]:
    labels = set(made["table"].column("label").to_pylist())
    return [c for c in made["classes"] if c in labels]


def _color(made, name: str) -> list[int]:
    return list(class_colors(len(made["classes"]))[made["classes"].index(name)])


# ------------------------------------------------------------------------------------ files on disk


def test_styles_and_project_written_with_relative_paths(made):
    d = made["dir"]
    for f in ("heatmap.qml", "labels.qml", "tiles.qml", f"{STEM}.qgs"):
        assert (d / f).is_file(), f
    root = ET.parse(d / f"{STEM}.qgs").getroot()
    sources = {m.findtext("layername"): m.findtext("datasource") for m in root.iter("maplayer")}
    assert sources["tiles"] == "./tiles.gpkg|layername=tiles"
    assert sources["labels"] == "./labels.tif" and sources["heatmap"] == "./heatmap.tif"
    assert sources["scene"] == f"../../scenes/{Path(NAIP).name}"
    # nothing in the project points at the folder the run wrote it in
    assert str(made["old"]) not in (d / f"{STEM}.qgs").read_text()
    collected = made["out"] / "collected"
    assert (collected / "tiles.qml").is_file() and (collected / "collected.qgs").is_file()


def test_no_styles_writes_neither_styles_nor_project(tmp_path, scenes_dir):
    """The lean set for many chips: no styles, project, GeoPackage or quicklook; the tables,
    COGs and run.json as always."""
    scene = scenes_dir / NAIP
    res = invoke(["run", scene, "-o", tmp_path / "o", "--no-styles", "--no-gpkg", "--no-quicklook", "--no-progress"])
    assert res.exit_code == 0, res.output
    names = {p.name for p in (tmp_path / "o" / STEM).iterdir()}
    assert not {n for n in names if n.endswith((".qml", ".qgs", ".gpkg", ".png"))}, names
    assert {"tiles.parquet", "labels.tif", "heatmap.tif", "run.json"} <= names
    assert "--no-gpkg" not in res.output  # no project, so no word on its tiles layer
    res = invoke(["run", scene, "-o", tmp_path / "p", "--no-gpkg", "--no-quicklook", "--no-progress"])
    assert res.exit_code == 0 and "[output] gpkg = false): the tiles layer of the scenes' QGIS projects is tiles.parquet" in res.output


def test_gpkg_is_version_12_with_a_valid_rtree(made):
    """Written inside ``tilescan run`` (TensorFlow loaded): GeoPackage 1.2, and an R-tree that
    SQLite's own integrity check accepts and that finds every tile."""
    gpkg = made["dir"] / "tiles.gpkg"
    con = sqlite3.connect(f"file:{gpkg}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # "GPKG"
        assert con.execute("PRAGMA user_version").fetchone()[0] == 10200
        ext = con.execute("SELECT table_name, column_name, definition FROM gpkg_extensions "
                          "WHERE extension_name = 'gpkg_rtree_index'").fetchall()
        triggers = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    finally:
        con.close()
    assert ext and ext[0][2].endswith("#extension_rtree")
    t, g = ext[0][:2]
    assert {f"rtree_{t}_{g}_{s}" for s in ("insert", "update1", "update2", "update3", "update4", "delete")} <= triggers
    assert has_rtree(gpkg)
    # the R-tree module is read in a fresh interpreter (this process's SQLite may lack it)
    code = (
        "import sqlite3, sys, json; con = sqlite3.connect(sys.argv[1]);"
        f"check = con.execute(\"SELECT rtreecheck('rtree_{t}_{g}')\").fetchone()[0];"
        f"n = con.execute('SELECT count(*) FROM \"rtree_{t}_{g}\"').fetchone()[0];"
        f"rows = con.execute('SELECT count(*) FROM \"{t}\"').fetchone()[0];"
        f"box = con.execute('SELECT min(minx), min(miny), max(maxx), max(maxy) FROM \"rtree_{t}_{g}\"').fetchone();"
        "print(json.dumps([check, n, rows, box]))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(gpkg)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    check, n, rows, box = json.loads(res.stdout)
    assert check == "ok"
    assert n == rows == made["table"].num_rows
    b = made["table"].column("bbox").to_pylist()
    want = [min(r["xmin"] for r in b), min(r["ymin"] for r in b), max(r["xmax"] for r in b), max(r["ymax"] for r in b)]
    assert np.allclose(box, want, rtol=0, atol=1.0)  # float32 boxes, rounded outwards


# ------------------------------------------------------------------------------------ real QGIS


def test_each_output_opens_in_qgis_with_its_style(made, report):
    layers = {Path(lyr["path"]).name: lyr for lyr in report["layers"]}
    present = _present(made)
    for name, lyr in layers.items():
        assert lyr["valid"], name
        assert lyr["crs"] == made["epsg"], name

    heat = layers["heatmap.tif"]["renderer"]
    assert heat["type"] == "singlebandpseudocolor"  # not the grey default
    assert (heat["min"], heat["max"]) == (0.0, 1.0)
    items = heat["items"]
    assert items[0]["value"] == 0 and items[-1]["value"] == 1
    assert items[0]["color"][3] == 0 and items[-1]["color"][3] == 255  # low heat transparent
    assert len({tuple(i["color"][:3]) for i in items}) == len(items)  # a colour ramp, not one grey
    # the legend, as QGIS reads it, says what the ends mean (each tile's map is divided by its own peak)
    assert items[0]["label"].startswith("0: no evidence") and "strongest in its own tile" in items[-1]["label"]
    # and QGIS >= 3.18, which draws the ramp as one bar without those labels, labels its ends the same
    ends = heat["ramp_legend"]
    assert ends["continuous"] and (ends["min_label"], ends["max_label"]) == (items[0]["label"], items[-1]["label"])

    labels = layers["labels.tif"]["renderer"]
    assert labels["type"] == "paletted"
    assert [c["label"] for c in labels["classes"]] == present
    for c in labels["classes"]:
        assert c["value"] == made["classes"].index(c["label"])
        assert c["color"][:3] == _color(made, c["label"])

    tiles = layers["tiles.gpkg"]
    assert tiles["features"] == made["table"].num_rows
    assert tiles["spatial_index"] is True
    assert tiles["gdal_messages"] == []  # no "may only be partially supported"
    r = tiles["renderer"]
    assert r["type"] == "categorizedSymbol" and r["attribute"] == "label"
    assert [c["value"] for c in r["categories"]] == present  # one category per class present
    for c in r["categories"]:
        assert c["color"][:3] == _color(made, c["value"])
    assert tiles["opacity"] == pytest.approx(LABEL_BLEND)


def test_project_opens_after_the_folder_moved(made, report):
    p = report["projects"][0]
    assert p["read"] and p["crs"] == made["epsg"]
    assert p["absolute_paths"] in (False, None)
    by_name = {lyr["name"]: lyr for lyr in p["layers"]}
    assert list(by_name) == ["tiles", "heatmap", "labels", "scene"]  # top to bottom
    for name, lyr in by_name.items():
        assert lyr["valid"], (name, lyr["source"])
        assert lyr["source"].startswith(str(made["new"])), (name, lyr["source"])  # resolved at the new place
        assert lyr["crs"] == made["epsg"], name
    assert by_name["tiles"]["features"] == made["table"].num_rows
    assert by_name["tiles"]["renderer"]["type"] == "categorizedSymbol"
    assert by_name["tiles"]["current_style"] == "label"
    assert by_name["tiles"]["other_styles"]["confidence"]["type"] == "graduatedSymbol"
    assert by_name["tiles"]["other_styles"]["confidence"]["attribute"] == "confidence"
    assert by_name["heatmap"]["renderer"]["type"] == "singlebandpseudocolor"
    assert by_name["labels"]["renderer"]["type"] == "paletted"
    assert by_name["scene"]["renderer"]["type"] == "multibandcolor"
    assert [n for n, lyr in by_name.items() if lyr["visible"]] == ["tiles", "scene"]
    x0, y0, x1, y1 = p["view_extent"]
    b = made["table"].column("bbox").to_pylist()
    assert x0 <= min(r["xmin"] for r in b) and x1 >= max(r["xmax"] for r in b)
    assert y0 <= min(r["ymin"] for r in b) and y1 >= max(r["ymax"] for r in b)


def test_project_of_the_output_folder_alone_keeps_its_own_layers(report):
    """Moved without the scenes, the outputs still open; only the scene is missing."""
    p = report["projects"][2]
    assert p["read"]
    broken = [lyr["name"] for lyr in p["layers"] if not lyr["valid"]]
    assert broken == ["scene"]


def test_collect_project_opens(made, report):
    p = report["projects"][1]
    assert p["read"] and p["crs"] == made["epsg"]  # one scene: its CRS
    by_name = {(lyr["group"], lyr["name"]): lyr for lyr in p["layers"]}
    # drawing order, top first: every tile (hidden), then each scene's group: its tiles over its
    # rasters, not under its image; each layer named with its scene (QGIS's pickers list names)
    assert list(by_name) == [(None, "tiles"), (STEM, f"tiles {STEM}"), (STEM, f"heatmap {STEM}"),
                             (STEM, f"labels {STEM}"), (STEM, f"scene {STEM}")]
    for key, lyr in by_name.items():
        assert lyr["valid"], (key, lyr["source"])
        assert lyr["source"].startswith(str(made["new"])), key
    every, tiles = by_name[(None, "tiles")], by_name[(STEM, f"tiles {STEM}")]
    assert not every["visible"] and tiles["visible"]  # a scene's tiles go on and off with its group
    for lyr in (every, tiles):
        assert lyr["features"] == made["table"].num_rows and lyr["crs"] == "EPSG:4326"
        assert [c["value"] for c in lyr["renderer"]["categories"]] == _present(made)


def test_collected_project_of_one_place_in_two_years_keeps_each_years_tiles_in_its_group(tmp_path, scenes_dir,
                                                                                         qgis_py):
    """Two years of one NAIP quarter quad collected: each scene's group holds its own tiles
    (the table filtered to it), legends of its own classes, layers named with it, the later
    year switched off; and the scenes, on a store apart from OUT, are found by absolute paths
    once OUT moves alone."""
    years = ("20100629", "20190904")
    out = tmp_path / "work" / "out"
    res = invoke(["run", *(scenes_dir / f"opengeos-naip/m_4709963_se_14_1_{y}.tif" for y in years), "-o", out,
                  "--no-progress"])
    assert res.exit_code == 0, res.output
    assert invoke(["collect", out]).exit_code == 0
    moved = tmp_path / "elsewhere" / "deeper" / "out"
    moved.parent.mkdir(parents=True)
    os.rename(out, moved)
    rep = qgis(qgis_py, {"projects": [str(moved / "collected" / "collected.qgs")]}, tmp_path)
    p = rep["projects"][0]
    assert p["read"] and all(lyr["valid"] for lyr in p["layers"]), p["layers"]
    by_name = {(lyr["group"], lyr["name"]): lyr for lyr in p["layers"]}
    total = 0
    for y in years:
        stem = f"m_4709963_se_14_1_{y}"
        table = pq.read_table(moved / stem / "tiles.parquet")
        own = set(table.column("label").to_pylist())
        tiles, labels = by_name[(stem, f"tiles {stem}")], by_name[(stem, f"labels {stem}")]
        assert tiles["features"] == table.num_rows
        assert {c["value"] for c in tiles["renderer"]["categories"]} == own
        assert {c["label"] for c in labels["renderer"]["classes"]} == own
        assert by_name[(stem, f"scene {stem}")]["valid"]
        total += table.num_rows
    assert by_name[(None, "tiles")]["features"] == total and not by_name[(None, "tiles")]["visible"]
    # one place: the first year's group is shown, the other's starts switched off, so their tiles
    # past the scene's edge (no scene covers them) do not blend into colours of no class
    first, second = (f"m_4709963_se_14_1_{y}" for y in years)
    assert by_name[(first, f"tiles {first}")]["visible"] and by_name[(first, f"scene {first}")]["visible"]
    assert not by_name[(second, f"tiles {second}")]["visible"] and not by_name[(second, f"scene {second}")]["visible"]
    # the view holds the whole scenes, their unlabelled east edge too, not only the tiles
    with rasterio.open(scenes_dir / f"opengeos-naip/{first}.tif") as ds:
        left, bottom, right, top = ds.bounds
    x0, y0, x1, y1 = p["view_extent"]
    assert x0 <= left and y0 <= bottom and x1 >= right and y1 >= top, (p["view_extent"], ds.bounds)


def test_a_detail_scene_inside_an_overview_is_drawn_above_it_and_shown(tmp_path, scenes_dir, qgis_py):
    """A scene lying inside a much larger one (RGB.byte inside the world mosaic), whatever their
    names' order: its group is drawn above the overview's and starts shown (it is not the same
    place in another year, which starts switched off)."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    scenes.mkdir()
    (scenes / "a_world.tif").symlink_to(scenes_dir / "rasterio/world.rgb.tif")  # named before the detail
    (scenes / "b_rgb.tif").symlink_to(scenes_dir / "rasterio/RGB.byte.tif")
    assert invoke(["run", scenes, "-o", out, "--no-progress"]).exit_code == 0
    assert invoke(["collect", out]).exit_code == 0
    p = qgis(qgis_py, {"projects": [str(out / "collected" / "collected.qgs")]}, tmp_path)["projects"][0]
    assert p["read"] and all(lyr["valid"] for lyr in p["layers"]), p["layers"]
    groups = list(dict.fromkeys(lyr["group"] for lyr in p["layers"] if lyr["group"]))
    assert [g.split(" ")[0] for g in groups] == ["b_rgb", "a_world"], groups  # the first is drawn on top
    shown = {lyr["name"].split(" (")[0]: lyr["visible"] for lyr in p["layers"] if lyr["group"]}
    assert all(shown[f"{kind} {s}"] for kind in ("tiles", "scene") for s in ("b_rgb", "a_world")), shown


def test_qgis_draws_the_class_colours_at_tile_centres(made, report):
    project, scene, labels = report["renders"]
    for r in report["renders"]:
        assert r["errors"] == [] and r["size"] == [934, 723]
    assert project["layers"] == ["tiles", "scene"] and labels["layers"] == ["labels"]
    names = made["classes"]
    palette = np.array(class_colors(len(names)), float)
    for (xy, label), s_lab, s_scene, s_proj in zip(report["centres"], labels["samples"], scene["samples"],
                                                   project["samples"]):
        assert s_lab["rgba"] is not None, xy
        # the label raster alone: exactly the class colour
        assert s_lab["rgba"][:3] == _color(made, label), (xy, label)
        # the project as it opens: the tile's colour at the quicklook's opacity over the scene;
        # the class whose blend is nearest to what QGIS drew must be the tile's class
        under = np.array(s_scene["rgba"][:3], float)
        drawn = np.array(s_proj["rgba"][:3], float)
        expect = (1 - LABEL_BLEND) * under + LABEL_BLEND * palette
        err = np.abs(expect - drawn).max(axis=1)
        assert names[int(err.argmin())] == label, (xy, label, drawn)
        assert err[names.index(label)] <= 3, (xy, label, drawn)


def test_what_an_alpha_band_or_internal_mask_hides_is_transparent_in_the_projects(tmp_path, scenes_dir, qgis_py):
    """RGBA.byte.tif (an alpha band) and the same pixels with the alpha as an internal mask:
    in the scene's project and the collected one, a real QGIS draws the pixels they hide
    transparent (the white map background shows), not black, and the others drawn."""
    rgba = scenes_dir / "rasterio" / "RGBA.byte.tif"
    masked = tmp_path / "in" / "masked.tif"
    masked.parent.mkdir()
    with rasterio.open(rgba) as src:
        alpha, pixels = src.read(4), src.read((1, 2, 3))
        profile = {**src.profile, "count": 3}
        transform = src.transform
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(masked, "w", **profile) as dst:
        dst.write(pixels)
        dst.write_mask(alpha)
    rng = np.random.default_rng(0)
    points, hidden = [], []
    for value in (0, 255):
        rows, cols = np.nonzero(alpha == value)
        pick = rng.choice(len(rows), 40, replace=False)
        xs, ys = rasterio.transform.xy(transform, rows[pick], cols[pick])  # pixel centres
        points += [[float(x), float(y)] for x, y in zip(xs, ys)]
        hidden += [value == 0] * len(pick)
    out = tmp_path / "out"
    for scene in (rgba, masked):
        res = invoke(["run", scene, "-o", out, "--no-progress"])
        assert res.exit_code == 0, res.output
    res = invoke(["collect", out, "--no-gpkg"])
    assert res.exit_code == 0, res.output
    assert "[output] gpkg = false): the tiles layer of collected.qgs is tiles.parquet, which QGIS opens only with GDAL >= 3.8" \
        in res.output, res.output  # the project's tiles layer opens in fewer QGIS installs: said
    projects = [out / "RGBA.byte" / "RGBA.byte.qgs", out / "masked" / "masked.qgs", out / "collected" / "collected.qgs"]
    shown = (["scene"], ["scene"], ["scene RGBA.byte", "scene masked"])  # collected: both scenes, named
    spec = {"renders": [{"project": str(p), "size": [791, 718], "points": points, "layers": layers}
                        for p, layers in zip(projects, shown)], "projects": [str(p) for p in projects]}
    rep = qgis(qgis_py, spec, tmp_path)
    # a 300 m scene: its labels are outside the model's scale, and the layers QGIS lists say so
    flag = " (labels not meaningful at this scale)"
    assert {lyr["name"] for lyr in rep["projects"][0]["layers"]} == {"tiles" + flag, "heatmap", "labels" + flag, "scene"}
    collected = {lyr["name"]: lyr["group"] for lyr in rep["projects"][2]["layers"]}
    assert collected["tiles RGBA.byte" + flag] == collected["labels RGBA.byte" + flag] == "RGBA.byte" + flag
    white = [255, 255, 255, 255]
    for r, layers in zip(rep["renders"], shown):
        assert r["errors"] == [] and r["layers"] == layers, r
        seen = [(s["rgba"], h) for s, h in zip(r["samples"], hidden) if s["rgba"] is not None]  # in the view
        assert sum(h for _, h in seen) >= 30 and sum(not h for _, h in seen) >= 30, r["project"]
        assert all(c == white for c, h in seen if h), r["project"]  # hidden: transparent
        assert sum(c != white for c, h in seen if not h) >= 30, r["project"]  # the scene is drawn


def test_a_scene_named_with_a_percent_escape_has_its_tiles_layer_in_qgis(tmp_path, scenes_dir, qgis_py):
    """QGIS opened the GeoPackage of a folder named ``a%20b/`` as ``a b/`` (GDAL's read-only
    SQLite URI unescapes it), so the tiles layer of its project was broken: ``%`` is kept out
    of scene folder names, and an output folder with one in its path is warned of."""
    scenes = tmp_path / "in"
    scenes.mkdir()
    shutil.copyfile(scenes_dir / "rio-cogeo" / "image_rgb.tif", scenes / "a%20b.tif")
    fast = ("--tile-size", "256", "--units", "px", "--no-progress", "--no-quicklook")
    res = invoke(["run", scenes, "-o", tmp_path / "out", *fast])
    assert res.exit_code == 0 and "'%'" not in res.output, res.output
    res = invoke(["collect", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    projects = [tmp_path / "out" / "a_20b" / "a_20b.qgs", tmp_path / "out" / "collected" / "collected.qgs"]
    rep = qgis(qgis_py, {"projects": [str(p) for p in projects]}, tmp_path)
    for project in rep["projects"]:
        tiles = [lyr for lyr in project["layers"] if lyr["name"].startswith("tiles")]
        assert tiles and all(lyr["valid"] for lyr in tiles), project

    res = invoke(["run", scenes, "-o", tmp_path / "out%41", *fast])
    assert res.exit_code == 0, res.output
    assert f"{tmp_path / 'out%41'}: QGIS cannot open the scenes' tiles.gpkg in a path with a '%'" in res.output
