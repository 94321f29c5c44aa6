"""tilescan collect: one GeoParquet dataset (+ GeoPackage, summary) from the per-scene
and per-shard outputs of real runs; checked with geopandas, pyogrio and pyproj."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import batch_helpers as bh
import tilescan
from conftest import assert_geoparquet_conformant, invoke, quiet, scene
from tilescan.outputs.collect import PartialCollectError, run_collect
from tilescan.errors import InputError
from tilescan.training.legend_colors import read_class_colors



@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    return bh.reference(tmp_path_factory)


def test_one_geoparquet_table_with_every_tile(ref):
    import geopandas as gpd

    path = ref / "collected" / "tiles.parquet"
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    col = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    assert col["encoding"] == "WKB" and col["geometry_types"] == ["Polygon"] and "bbox" in col["covering"]
    gdf = gpd.read_parquet(path)
    assert gdf.crs.equals("OGC:CRS84") and gdf.geometry.is_valid.all()
    assert np.allclose(gdf.total_bounds, col["bbox"])
    assert_geoparquet_conformant(path)
    per_scene = {u: pq.read_table(ref / u / "tiles.parquet") for u in bh.UNITS}
    assert len(gdf) == sum(t.num_rows for t in per_scene.values())
    assert not gdf.duplicated(["scene", "tile_index"]).any()
    assert list(gdf["scene"].unique()) == sorted(bh.UNITS)  # sorted by scene, then tile
    own = json.loads(pq.read_schema(path).metadata[b"tilescan"])  # which model made the labels, as each scene's table says
    ids = {json.loads(pq.read_schema(ref / u / "tiles.parquet").metadata[b"tilescan"])["model_id"] for u in bh.UNITS}
    assert ids == {own["model_id"]} and "model_ids" not in own and own["scenes"] == sorted(bh.UNITS)
    # label is categorical as in a scene's own table: every class of the model, in its order
    assert list(gdf["label"].cat.categories) == own["classes"] and len(own["classes"]) > gdf["label"].nunique()
    # dictionary pages on the name columns only (on numbers they made the table larger)
    f = pq.ParquetFile(path)
    assert f.num_row_groups == 1  # the scenes' rows gathered, not a row group per scene (a footer per chip)
    rg = f.metadata.row_group(0)
    names = {c.name for c in f.schema_arrow if pa.types.is_string(c.type) or pa.types.is_dictionary(c.type)}
    assert {"scene", "unit", "label"} <= names
    assert {rg.column(i).path_in_schema for i in range(rg.num_columns) if rg.column(i).has_dictionary_page} == names
    for name, t in per_scene.items():
        part = gdf[gdf["scene"] == name]
        assert part["tile_index"].tolist() == t.column("tile_index").to_pylist()
        assert part["label"].tolist() == t.column("label").cast("string").to_pylist()
        assert part["geometry_native"].tolist() == t.column("geometry").to_pylist()  # exact, in the scene CRS
        assert set(part["unit"]) == {name}
        np.testing.assert_array_equal(np.stack(part["probabilities"].to_numpy()),
                                      np.array(t.column("probabilities").to_pylist(), np.float32))
        # the lon/lat footprint is the native one, reprojected (checked with shapely + pyproj)
        crs = json.loads(t.schema.metadata[b"geo"])["columns"]["geometry"]["crs"]
        native = gpd.GeoSeries.from_wkb(part["geometry_native"], crs=json.dumps(crs)).to_crs("OGC:CRS84")
        np.testing.assert_allclose(native.bounds.values, part.geometry.bounds.values, atol=1e-9)
        assert (part["crs"] == gpd.GeoSeries([], crs=json.dumps(crs)).crs.to_string()).all()
        # the CAM peak: in the scene's CRS as in its table, and in lon/lat beside the geometry
        np.testing.assert_array_equal(part["cam_peak_x"], t.column("cam_peak_x").to_numpy())
        peak = gpd.GeoSeries(gpd.points_from_xy(part["cam_peak_x"], part["cam_peak_y"]), crs=json.dumps(crs))
        peak = peak.to_crs("OGC:CRS84")
        np.testing.assert_allclose(np.c_[part["cam_peak_lon"], part["cam_peak_lat"]], np.c_[peak.x, peak.y], atol=1e-9)
        assert gpd.GeoSeries(peak.values, index=part.index).within(part.geometry).all()


def test_areas_are_geodesic_square_metres(ref):
    """Ground area, checked another way: the native footprints projected to an equal-area
    projection (Lambert azimuthal, WGS 84 ellipsoid) centred on the scene. The map-unit area
    is ~0.1-0.2 % off for UTM (RGB.byte) and ~60 % for Web Mercator at 37.7 N (cogeo)."""
    import geopandas as gpd

    df = bh.collected(ref)
    np.testing.assert_allclose(df["valid_area_m2"], df["area_m2"] * df["valid_fraction"], rtol=1e-6)
    for name, crs in [("RGB.byte", "EPSG:32618"), ("cogeo", "EPSG:3857")]:
        part = df[df["scene"] == name]
        assert (part["crs"] == crs).all()
        native = gpd.GeoSeries.from_wkb(part["geometry_native"].tolist(), crs=crs)
        lon, lat = native.to_crs(4326).union_all().centroid.coords[0]
        laea = f"+proj=laea +lat_0={lat} +lon_0={lon} +ellps=WGS84 +units=m"
        np.testing.assert_allclose(part["area_m2"], native.to_crs(laea).area, rtol=1e-5)
        assert not np.allclose(part["area_m2"], native.area, rtol=1e-3)  # not the map-unit area


def test_summary_counts_tiles_and_area_per_class_per_scene(ref):
    df = bh.collected(ref)
    rows = list(csv.DictReader((ref / "collected" / "summary.csv").open()))
    got = {(r["scene"], r["label"]): (int(r["tiles"]), float(r["area_m2"])) for r in rows}
    want = df.groupby(["scene", "label"]).agg(tiles=("tile_index", "size"), area=("area_m2", "sum"))
    assert set(got) == set(want.index)
    for key, (n, area) in got.items():
        assert n == want.loc[key, "tiles"] and area == pytest.approx(want.loc[key, "area"], abs=1e-3)  # written in mm² steps
    summary = json.loads((ref / "collected" / "summary.json").read_text())
    assert summary["tiles"] == len(df)
    assert not (ref / "collected" / "collection.json").exists()  # no STAC items made: no STAC collection
    runs = {u: json.loads((ref / u / "run.json").read_text())["counts"] for u in bh.UNITS}
    for name, s in summary["scenes"].items():
        assert s["complete"] and s["units"] == [name]
        assert s["tiles"] == runs[name]["tiles_classified"]
        assert {k: v["tiles"] for k, v in s["classes"].items()} == runs[name]["per_class"]


def test_overlapping_tiles_count_their_own_ground_once(tmp_path):
    """With a stride of half the tile size every spot lies under about four footprints; the
    summary counts each tile's stride cell (the label raster's pixel), so a scene's classes
    add up to its ground, not to four times it; the table keeps each tile's whole footprint."""
    import rasterio

    out = tmp_path / "out"
    path = scene("rasterio/RGB.byte.tif")
    p = bh.tilescan("run", "--no-progress", "-o", out, path, *bh.ARGS, "--stride", "64", "--min-valid", "0")
    assert p.returncode == 0, p.stderr
    assert bh.tilescan("collect", out).returncode == 0
    df = bh.collected(out)
    summary = json.loads((out / "collected" / "summary.json").read_text())
    s = summary["scenes"]["RGB.byte"]
    assert s["area_m2"] == pytest.approx(df["area_m2"].sum() / 4)
    assert sum(c["area_m2"] for c in s["classes"].values()) == pytest.approx(s["area_m2"])
    with rasterio.open(path) as ds:  # UTM, 300 m pixels: the scene's ground in m^2, near enough to geodesic
        ground = ds.width * ds.height * abs(ds.transform.a * ds.transform.e)
    assert 0.9 * ground < s["area_m2"] < 1.05 * ground, (s["area_m2"], ground)


def test_geopackage_copy_has_the_same_rows(ref):
    import geopandas as gpd

    g = gpd.read_file(ref / "collected" / "tiles.gpkg", layer="tiles")
    df = bh.collected(ref)
    assert g.crs.to_epsg() == 4326 and len(g) == len(df)
    g = g.sort_values(["scene", "tile_index"]).reset_index(drop=True)
    assert g["label"].tolist() == df["label"].tolist()
    classes = json.loads((ref / "cogeo" / "run.json").read_text())["model"]["classes"]
    probs = np.stack(df["probabilities"].to_numpy())
    np.testing.assert_array_equal(g["p_" + classes[3]].to_numpy(), probs[:, 3])
    np.testing.assert_array_equal(g.geometry.bounds.values, gpd.GeoSeries.from_wkb(df["geometry"].tolist()).bounds.values)


def _fake_part(out: Path, scene: str, r0: int, r1: int, src: Path) -> Path:
    """A row-band unit cut from a real whole-scene output (as a shard would have written it)."""
    part = out / scene / f"rows-{r0:05d}-{r1:05d}"
    part.mkdir(parents=True)
    t = pq.read_table(src / "tiles.parquet")
    mask = pc.and_(pc.greater_equal(t.column("row"), r0), pc.less(t.column("row"), r1))
    pq.write_table(t.filter(mask), part / "tiles.parquet")
    m = json.loads((src / "run.json").read_text())
    m.update(rows=[r0, r1], unit=f"{scene}/{part.name}")
    (part / "run.json").write_text(json.dumps(m))
    return part


def test_row_parts_unfinished_units_and_staging(ref, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected"))
    # noise that must never be collected: a staged (unfinished) unit, a folder without a
    # manifest, a stale row part beside a finished whole scene
    stage = out / ".tilescan-staging" / "cog_rgb"
    shutil.copytree(ref / "cog_rgb", stage)
    (out / "ghost").mkdir()
    shutil.copy(ref / "cog_rgb" / "tiles.parquet", out / "ghost" / "tiles.parquet")
    shutil.copytree(ref / "cog_rgb", out / "tableless")  # finished, then its table lost
    (out / "tableless" / "tiles.parquet").unlink()
    _fake_part(out, "cogeo", 0, 4, ref / "cogeo")
    killed = out / ".tilescan-staging" / ".collect-999999"  # the half-built set of a SIGKILLed collect
    shutil.copytree(ref / "collected", killed)
    notes: list[str] = []
    summary = run_collect(out, gpkg=False, log=notes.append)
    assert not killed.exists() and (out / ".tilescan-staging" / "cog_rgb").is_dir()  # a run's staging: left to runs
    bh.assert_same_tiles(bh.collected(out), bh.collected(ref), exact=True)
    assert {"unit": "ghost", "reason": "no finished output in this folder"} in summary["skipped"]
    assert {"unit": "tableless", "reason": "tiles.parquet is missing"} in summary["skipped"]
    # the staged unit is named as not finished (a run may be writing it while collect runs)
    assert {"unit": "cog_rgb", "reason": "not finished: being written by a run, or left by one that was stopped "
                                         "(in .tilescan-staging)"} in summary["skipped"]
    assert any("ignoring 1 row part" in n for n in notes)
    assert not (out / "collected" / "tiles.gpkg").exists()


def test_scene_split_in_row_parts(ref, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for r0, r1 in [(0, 3), (3, 8)]:
        _fake_part(out, "cogeo", r0, r1, ref / "cogeo")
    run_collect(out, log=quiet)
    want = bh.collected(ref)
    want = want[want["scene"] == "cogeo"].reset_index(drop=True)
    got = bh.collected(out)
    bh.assert_same_tiles(got, want, exact=True)
    assert sorted(set(got["unit"])) == ["cogeo/rows-00000-00003", "cogeo/rows-00003-00008"]

    shutil.rmtree(out / "cogeo" / "rows-00003-00008")  # a shard that has not finished
    notes: list[str] = []
    summary = run_collect(out, log=notes.append)
    s = summary["scenes"]["cogeo"]
    assert not s["complete"] and s["missing_rows"] == [[3, 8]] and s["tiles"] == 24
    assert any("no finished output yet" in n for n in notes)
    assert not any(p.name.startswith(".collected") for p in out.iterdir())  # the old set was swapped out

    _fake_part(out, "cogeo", 2, 8, ref / "cogeo")  # from a run with another shard count
    with pytest.raises(InputError, match="overlap"):
        run_collect(out, log=quiet)
    # beside another scene: that one is collected, the overlapping one named as not collected
    shutil.copytree(ref / "cog_rgb", out / "cog_rgb")
    with pytest.raises(PartialCollectError) as e:
        run_collect(out, log=quiet)
    summary = e.value.summary
    assert list(summary["scenes"]) == ["cog_rgb"]
    assert [f["scene"] for f in summary["failed"]] == ["cogeo"] and "overlap" in summary["failed"][0]["reason"]
    assert set(bh.collected(out)["scene"]) == {"cog_rgb"}


def test_row_parts_must_share_what_shapes_outputs_as_the_fingerprint_counts_it(ref, tmp_path):
    """collect puts row parts together only when they were made as one run would make them:
    a part in bf16 beside one in float32 is refused (its numbers differ slightly); a part
    written before the nodata setting existed matches one with the default."""
    out = tmp_path / "out"
    out.mkdir()
    parts = [_fake_part(out, "cogeo", r0, r1, ref / "cogeo") for r0, r1 in [(0, 3), (3, 8)]]
    m = json.loads((parts[1] / "run.json").read_text())
    assert m["config"]["tiling"]["nodata"] == "file"
    del m["config"]["tiling"]["nodata"]
    (parts[1] / "run.json").write_text(json.dumps(m))
    run_collect(out, log=quiet)
    assert len(bh.collected(out)) == len(bh.collected(ref).query("scene == 'cogeo'"))

    m["config"]["tiling"]["stride"] = m["config"]["tiling"]["tile_size"]  # the same tiles as stride 0
    m["config"]["tiling"]["bands"] = m["scene_info"]["bands_used"]  # the bands the automatic pick chose
    (parts[1] / "run.json").write_text(json.dumps(m))
    run_collect(out, log=quiet)
    m["config"]["inference"]["precision"] = "bf16"
    (parts[1] / "run.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="different scenes, configs or models"):
        run_collect(out, log=quiet)


def _edit(run_json: Path, **fields) -> None:
    m = json.loads(run_json.read_text())
    m.update(fields)
    run_json.write_text(json.dumps(m))


def test_row_parts_of_another_version_of_the_scene_file_or_newer_than_the_whole_scene(ref, tmp_path):
    """Shards run on both sides of a change to the scene file are not joined as one scene; row
    parts that cover the scene and were finished after a whole-scene output beside it (a
    sharded rerun with --overwrite) are collected instead of that older output."""
    out = tmp_path / "out"
    out.mkdir()
    parts = [_fake_part(out, "cogeo", r0, r1, ref / "cogeo") for r0, r1 in [(0, 3), (3, 8)]]
    m = json.loads((parts[1] / "run.json").read_text())
    _edit(parts[1] / "run.json", scene_version={**m["scene_version"], "size": m["scene_version"]["size"] + 1})
    with pytest.raises(InputError, match="different versions of the scene file"):
        run_collect(out, log=quiet)

    _edit(parts[1] / "run.json", scene_version=m["scene_version"])
    shutil.copytree(ref / "cogeo", out / "cogeo", dirs_exist_ok=True)  # the whole-scene output, finished first
    for p in parts:
        _edit(p / "run.json", finished_at=m["finished_at"].replace(m["finished_at"][:4], "2999"))
    notes: list[str] = []
    summary = run_collect(out, log=notes.append)
    assert summary["scenes"]["cogeo"]["units"] == ["cogeo/rows-00000-00003", "cogeo/rows-00003-00008"]
    assert any("collecting the row parts" in n for n in notes), notes
    bh.assert_same_tiles(bh.collected(out), bh.collected(ref).query("scene == 'cogeo'").reset_index(drop=True))

    newer = m["finished_at"].replace(m["finished_at"][:4], "3000")  # a sharded rerun after the file changed,
    for r0, r1 in [(0, 5), (5, 8)]:                                  # with another shard count
        _edit(_fake_part(out, "cogeo", r0, r1, ref / "cogeo") / "run.json", finished_at=newer,
              scene_version={**m["scene_version"], "size": 1})
    notes.clear()
    summary = run_collect(out, log=notes.append)
    assert summary["scenes"]["cogeo"]["units"] == ["cogeo/rows-00000-00005", "cogeo/rows-00005-00008"], notes
    assert any("ignoring 2 of earlier runs" in n for n in notes), notes
    for r in ("00000-00005", "00005-00008"):
        shutil.rmtree(out / "cogeo" / f"rows-{r}")
    shutil.rmtree(parts[1])  # newer, but not the whole scene: the whole-scene output stays
    notes.clear()
    summary = run_collect(out, log=notes.append)
    assert summary["scenes"]["cogeo"]["units"] == ["cogeo"] and any("ignoring 1 row part" in n for n in notes)


def test_row_parts_finished_at_the_same_time_as_the_whole_scene_are_not_taken_as_newer(ref, tmp_path):
    """Row parts that cover the scene, beside a whole-scene output finished at the same moment
    (not after it): the whole-scene output is collected, the parts named as ignored."""
    out = tmp_path / "out"
    shutil.copytree(ref / "cogeo", out / "cogeo")
    whole = json.loads((ref / "cogeo" / "run.json").read_text())
    for r0, r1 in [(0, 3), (3, 8)]:
        part = _fake_part(out, "cogeo", r0, r1, ref / "cogeo")
        assert json.loads((part / "run.json").read_text())["finished_at"] == whole["finished_at"]
    notes: list[str] = []
    summary = run_collect(out, log=notes.append)
    assert summary["scenes"]["cogeo"]["units"] == ["cogeo"], notes
    assert any("a whole-scene output exists; ignoring 2 row part(s) beside it" in n for n in notes), notes


def test_a_unit_that_failed_is_said_collected_from_its_scenes_earlier_output(ref, tmp_path):
    """A sharded rerun refused beside a finished whole-scene output: its failed row bands are
    that scene's, which is collected from the earlier output (``earlier_outputs``), not missing."""
    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected", "report*.json"))
    failed = [{"unit": f"cogeo/rows-0000{a}-0000{b}", "scene": "x", "error_kind": "output", "reason": "exists"}
              for a, b in ((0, 4), (4, 8))]
    (out / "report.json").write_text(json.dumps({"failed": failed}))
    notes: list[str] = []
    summary = run_collect(out, log=notes.append)
    assert summary["failed_in_run"] == [] and [u["unit"] for u in summary["earlier_outputs"]] == [f["unit"] for f in failed]
    assert not any("are not in the collected set" in n for n in notes)
    shutil.rmtree(out / "cogeo")  # the scene from row bands, its whole-scene rerun failed
    for r0, r1 in [(0, 3), (3, 8)]:
        _fake_part(out, "cogeo", r0, r1, ref / "cogeo")
    (out / "report.json").write_text(json.dumps({"failed": [{"unit": "cogeo", "scene": "x", "reason": "broken"}]}))
    summary = run_collect(out, log=quiet)
    assert summary["failed_in_run"] == [] and [u["unit"] for u in summary["earlier_outputs"]] == ["cogeo"]


def test_outputs_of_a_scene_file_that_is_gone_or_of_another_model_are_said(ref, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected"))
    names = sorted(p.parent.name for p in out.glob("*/run.json"))
    _edit(out / names[0] / "run.json", scene=str(tmp_path / "moved-away.tif"))
    notes: list[str] = []
    summary = run_collect(out, log=notes.append)
    said = f"its scene file {tmp_path / 'moved-away.tif'} is gone (moved, renamed or deleted)"
    assert said in summary["scenes"][names[0]]["notes"][-1] and any(said in n for n in notes), notes
    assert not any("is gone" in str(summary["scenes"][n]["notes"]) for n in names[1:])
    assert not any("models of the same classes" in n for n in notes)
    m = json.loads((out / names[2] / "run.json").read_text())
    _edit(out / names[2] / "run.json", scene_version={**m["scene_version"], "size": m["scene_version"]["size"] + 1})
    notes.clear()
    run_collect(out, log=notes.append)
    assert any(f"{names[2]}: its scene file {m['scene']} changed since its outputs were made" in n for n in notes), notes
    _edit(out / names[2] / "run.json", scene_version=m["scene_version"])

    m = json.loads((out / names[1] / "run.json").read_text())
    _edit(out / names[1] / "run.json", model={**m["model"], "id": "retrained", "sha256": "f" * 64})
    notes.clear()
    summary = run_collect(out, log=notes.append)
    assert summary["scenes"][names[1]]["model"] == "retrained"
    meta = json.loads(pq.read_schema(out / "collected" / "tiles.parquet").metadata[b"tilescan"])
    assert "retrained" in meta["model_ids"] and len(meta["model_ids"]) == 2 and "model_id" not in meta
    assert any("classified by 2 models of the same classes" in n and "retrained (ffffffffffff)" in n for n in notes)
    for n in names:  # the outputs read on another machine: one line, not one per scene
        _edit(out / n / "run.json", scene=f"/elsewhere/{n}.tif")
    notes.clear()
    run_collect(out, log=notes.append)
    assert sum("is gone" in n or "none of the" in n for n in notes) == 1, notes


def _with_colours(table_path: Path, colours: list[str]) -> None:
    t = pq.read_table(table_path)
    meta = dict(t.schema.metadata)
    meta[b"tilescan"] = json.dumps({**json.loads(meta[b"tilescan"]), "class_colors": colours}).encode()
    pq.write_table(t.replace_schema_metadata(meta), table_path)


def test_a_table_whose_metadata_names_no_classes_fails_alone_with_why(ref, tmp_path):
    """A scene's tiles.parquet without the model's classes (written by another tool, or edited)
    cannot give the label column's categories or the legend: that scene fails, named with what
    to do, and the others are collected (exit 3 from the CLI)."""
    from conftest import invoke

    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected"))
    names = sorted(p.parent.name for p in out.glob("*/run.json"))
    table = out / names[0] / "tiles.parquet"
    t = pq.read_table(table)
    meta = dict(t.schema.metadata)
    meta[b"tilescan"] = json.dumps({k: v for k, v in json.loads(meta[b"tilescan"]).items() if k != "classes"}).encode()
    pq.write_table(t.replace_schema_metadata(meta), table)
    res = invoke(["collect", out])
    assert res.exit_code == 3, res.output
    assert (f"error: collect: {names[0]}: {names[0]}/tiles.parquet names no model classes in its metadata (made by "
            "another tool, or edited): rerun the scene with --overwrite") in res.output, res.output
    collected = pq.read_table(out / "collected" / "tiles.parquet")
    assert set(collected.column("scene").to_pylist()) == set(names[1:])


def test_a_models_own_legend_colours_style_the_collected_set_whatever_the_scenes_order(ref, tmp_path):
    """Scenes of a model with its own colours beside scenes of one without (the palette): the
    own colours style the set, also where a palette scene sorts first; other own colours are said."""
    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected"))
    names = sorted(p.parent.name for p in out.glob("*/run.json"))
    classes = json.loads(pq.read_schema(out / names[0] / "tiles.parquet").metadata[b"tilescan"])["classes"]
    own = ["#123456"] * len(classes)
    _with_colours(out / names[-1] / "tiles.parquet", own)
    notes: list[str] = []
    run_collect(out, log=notes.append)
    meta = json.loads(pq.read_schema(out / "collected" / "tiles.parquet").metadata[b"tilescan"])
    drawn = read_class_colors(out / "collected" / "tiles.qml")
    assert meta["class_colors"] == own and drawn and set(drawn.values()) == {(0x12, 0x34, 0x56)}
    assert not any("other legend colours" in n for n in notes)
    _with_colours(out / names[0] / "tiles.parquet", ["#654321"] * len(classes))
    run_collect(out, log=notes.append)
    assert any(f"the models of {names[-1]} have other legend colours than {names[0]}'s" in n for n in notes), notes


def test_a_stac_items_scene_is_not_said_gone_while_its_document_is_there(tmp_path):
    """A scene read through a local STAC item (run.json's scene is DOCUMENT#ID, not a file):
    collect does not say its file is gone while the document is there, and names the document
    once it is gone."""
    item = tmp_path / "item.json"
    item.write_text(json.dumps({
        "type": "Feature", "stac_version": "1.0.0", "id": "plain", "geometry": None,
        "properties": {"datetime": "2020-01-01T00:00:00Z"}, "links": [],
        "assets": {"visual": {"href": str(scene("rio-tiler/cog_rgb.tif")), "type": "image/tiff; application=geotiff"}}}))
    out = tmp_path / "out"
    assert invoke(["run", item, "-o", out, "--units", "px", "--tile-size", "128", "--no-progress"]).exit_code == 0
    res = invoke(["collect", out, "--no-gpkg"])
    assert res.exit_code == 0 and "is gone" not in res.output, res.output
    item.rename(tmp_path / "moved.json")
    res = invoke(["collect", out, "--no-gpkg"])
    assert res.exit_code == 0 and f"plain: its STAC document {item} is gone" in res.output, res.output
    res = invoke(["collect", out / "plain"])  # one scene's folder given: the run's folder is named
    assert res.exit_code == 4 and f"this is one scene's output folder: collect the folder that holds it ({out})" in res.output


def test_nothing_to_collect_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    p = bh.tilescan("collect", tmp_path / "empty")
    assert p.returncode == 4 and "no finished scene outputs" in p.stderr
    p = bh.tilescan("collect", tmp_path / "missing")
    assert p.returncode == 4 and "no such output folder" in p.stderr
    (tmp_path / "report.json").write_text("{}")  # from Python, a run's file given for its folder
    with pytest.raises(InputError, match="is a file, not the output folder of a run"):
        tilescan.collect(tmp_path / "report.json")


@pytest.mark.parametrize("where", ["utm-60s", "lon-0-360"])
def test_tiles_across_the_antimeridian_are_cut_there(tmp_path, where):
    """Real NAIP pixels placed across 180° (in UTM zone 60S near Fiji; in longitudes that run
    from 179.99 on past 180, as 0..360 data do): in the collected lon/lat table no tile spans
    the globe. Those crossing 180° are MultiPolygons cut there (RFC 7946), as is the scene's
    STAC Item, whose bbox goes from west of 180° to east of it; every longitude is
    in -180..180, none is found near 0°, areas are the tiles' ground areas, the GeoPackage
    holds the same, and the collected QGIS project opens on the scene, not on the world."""
    import geopandas as gpd
    import pyproj
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    from conftest import invoke, scene

    src_path = scene("opengeos-naip/m_4709963_se_14_1_20190904.tif")
    with rasterio.open(src_path) as src:
        pixels = src.read((1, 2, 3), window=Window(0, 0, 640, 384))
        profile = {**src.profile, "count": 3, "width": 640, "height": 384}
    if where == "utm-60s":
        x, y = pyproj.Transformer.from_crs("OGC:CRS84", "EPSG:32760", always_xy=True).transform(180.0, -16.8)
        profile.update(crs="EPSG:32760", transform=Affine(5, 0, round(x) - 1500, 0, -5, round(y)))
    else:
        profile.update(crs="EPSG:4326", transform=Affine(4.7e-5, 0, 179.99, 0, -4.5e-5, -16.8))
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / f"{where}.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    out = tmp_path / "out"
    res = invoke(["run", path, "-o", out, "--no-progress", "--stac-items"])
    assert res.exit_code == 0, res.output
    item = json.loads((out / where / "item.json").read_text())  # the scene's STAC Item: cut too
    assert item["geometry"]["type"] == "MultiPolygon"
    west, _, east, _ = item["bbox"]
    assert 179.9 < west < 180 and -180 < east < -179.9  # west > east across 180° (RFC 7946, 5.2)
    res = invoke(["collect", out])
    assert res.exit_code == 0, res.output
    table = out / "collected" / "tiles.parquet"
    gdf = gpd.read_parquet(table)
    assert len(gdf) > 0 and gdf.geometry.is_valid.all()
    cut = gdf[gdf.geom_type == "MultiPolygon"]
    assert 0 < len(cut) < len(gdf)
    xmin, _, xmax, _ = gdf.total_bounds
    assert -180 <= xmin and xmax <= 180
    for g in cut.geometry:  # two narrow parts, one ending at 180°, one starting at -180°
        parts = sorted(g.geoms, key=lambda p: p.bounds[0])
        assert len(parts) == 2 and parts[0].bounds[0] == -180 and parts[1].bounds[2] == 180
        assert all(p.bounds[2] - p.bounds[0] < 0.01 for p in parts)
    assert (gdf.geometry.bounds["maxx"] - gdf.geometry.bounds["minx"] < 0.01).sum() == len(gdf) - len(cut)
    assert len(gdf.cx[0:10, -20:-10]) == 0
    # each tile's CAM peak is on its own footprint, in -180..180 as the footprints are
    assert gdf["cam_peak_lon"].between(-180, 180).all()
    peaks = gpd.GeoSeries(gpd.points_from_xy(gdf["cam_peak_lon"], gdf["cam_peak_lat"]), index=gdf.index)
    assert peaks.distance(gdf.geometry).max() < 1e-9
    geo = json.loads(pq.read_schema(table).metadata[b"geo"])["columns"]["geometry"]
    assert geo["geometry_types"] == ["Polygon", "MultiPolygon"]
    # ground areas, another way: the native footprints in an equal-area projection on the spot
    native = gpd.GeoSeries.from_wkb(gdf["geometry_native"].tolist(), crs=profile["crs"])
    laea = "+proj=laea +lat_0=-16.8 +lon_0=180 +ellps=WGS84 +units=m"
    np.testing.assert_allclose(gdf["area_m2"], native.to_crs(laea).area, rtol=1e-4)
    g = gpd.read_file(out / "collected" / "tiles.gpkg", layer="tiles")
    assert len(g) == len(gdf) and (g.geom_type == "MultiPolygon").sum() == len(cut)
    if where == "utm-60s":  # one CRS: the project's map is in it, on the scene (3.2 km across)
        import xml.etree.ElementTree as ET

        canvas = ET.parse(out / "collected" / "collected.qgs").getroot().find("mapcanvas/extent")
        width = float(canvas.findtext("xmax")) - float(canvas.findtext("xmin"))
        assert 3000 < width < 10_000, width


@pytest.mark.parametrize("pole", ["south", "north"])
def test_a_tile_round_a_pole_is_a_cap_up_to_the_pole(tmp_path, pole):
    """Real NAIP pixels placed over a pole in its polar stereographic CRS: the tile holding the
    pole is, in the collected lon/lat table, a valid Polygon spanning every longitude and closed
    along the pole (as the scene's STAC Item is), not cut at 180° into two slivers; every other
    tile stays a small quadrilateral, and the areas are the tiles' ground areas."""
    import geopandas as gpd
    import rasterio
    from affine import Affine
    from rasterio.windows import Window
    from shapely.geometry import Point

    from conftest import invoke, scene

    with rasterio.open(scene("opengeos-naip/m_4709963_se_14_1_20190904.tif")) as src:
        pixels = src.read((1, 2, 3), window=Window(0, 0, 640, 384))
        profile = {**src.profile, "count": 3, "width": 640, "height": 384}
    crs = "EPSG:3031" if pole == "south" else "EPSG:3413"
    profile.update(crs=crs, transform=Affine(5, 0, -1403, 0, -5, 897))  # the pole in tile (row 1, col 2) at 256 px
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / f"{pole}.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    out = tmp_path / "out"
    assert invoke(["run", path, "-o", out, "--no-progress", "--stac-items", "--units", "px", "--tile-size", "256"]).exit_code == 0
    assert invoke(["collect", out]).exit_code == 0
    gdf = gpd.read_parquet(out / "collected" / "tiles.parquet")
    native = gpd.GeoSeries.from_wkb(gdf["geometry_native"].tolist(), crs=crs)
    at_pole = native.contains(Point(0, 0)).to_numpy()
    assert at_pole.sum() == 1 and gdf.geometry.is_valid.all()
    cap, edge = gdf.geometry[at_pole].iloc[0], 90.0 if pole == "north" else -90.0
    assert cap.geom_type == "Polygon" and cap.bounds[0] == -180 and cap.bounds[2] == 180 and edge in cap.bounds
    assert cap.contains(Point(0, edge * 0.99999)) and cap.contains(Point(90, edge * 0.99999))
    # the others hold their own centres, not the pole
    centres = native[~at_pole].centroid.to_crs("OGC:CRS84")
    assert all(g.contains(c) and not g.contains(Point(0, edge * 0.99999))
               for g, c in zip(gdf.geometry[~at_pole], centres))
    item = json.loads((out / pole / "item.json").read_text())  # GDAL's footprint of the scene: a cap too
    assert item["bbox"][0] == -180 and item["bbox"][2] == 180
    laea = f"+proj=laea +lat_0={edge:g} +lon_0=0 +ellps=WGS84 +units=m"
    np.testing.assert_allclose(gdf["area_m2"], native.to_crs(laea).area, rtol=1e-3)


def test_footprints_near_a_pole_follow_their_edges_as_the_crs_bends_them(tmp_path):
    """Real NAIP pixels near a pole in polar stereographic CRSs, beside the same pixels in their
    own UTM zone: 3 km from the South Pole; 3 km from the North Pole across 180°; with a pole on
    a tile's edge, at its middle or between the points drawn along it. Near a pole a tile's edges bow in longitude/latitude, so its collected
    footprint and the scene's STAC footprint carry points along them: each valid and the same
    ground as its native footprint (IoU >= 0.99), cut at 180° (the item's bbox west > east), the
    item's bbox as far south as the scene reaches; the UTM scene's tiles and item keep their
    four corners."""
    import geopandas as gpd
    import rasterio
    import shapely
    from affine import Affine
    from rasterio.warp import transform_bounds
    from rasterio.windows import Window
    from shapely.geometry import shape

    from conftest import invoke, scene

    (tmp_path / "in").mkdir()
    with rasterio.open(scene("opengeos-naip/m_4709963_se_14_1_20190904.tif")) as src:
        pixels = src.read((1, 2, 3), window=Window(0, 0, 640, 384))
        profile = {**src.profile, "count": 3, "width": 640, "height": 384}
        utm = {**profile, "transform": src.window_transform(Window(0, 0, 640, 384))}
    polar = {"south": ("EPSG:3031", Affine(5, 0, -1600, 0, -5, 3000)),
             "north_across_180": ("EPSG:3413", Affine(5, 0, -3700, 0, -5, 3060)),  # 180° runs to (-x, +y)
             "pole_on_an_edge": ("EPSG:3031", Affine(5, 0, -1600, 0, -5, 640)),  # at an edge's middle
             "pole_between_samples": ("EPSG:3413", Affine(5, 0, -1410, 0, -5, 640))}  # 26 px along a 128-px edge
    for name, prof in [*((n, {**profile, "crs": c, "transform": t}) for n, (c, t) in polar.items()), ("utm", utm)]:
        with rasterio.open(tmp_path / "in" / f"{name}.tif", "w", **prof) as dst:
            dst.write(pixels)
    out = tmp_path / "out"
    args = ["run", tmp_path / "in", "-o", out, "--no-progress", "--stac-items", "--units", "px", "--tile-size", "128"]
    assert invoke(args).exit_code == 0
    assert invoke(["collect", out]).exit_code == 0
    gdf = gpd.read_parquet(out / "collected" / "tiles.parquet")
    points = np.array([len(shapely.get_coordinates(g)) for g in gdf.geometry])
    assert (points[gdf["scene"] == "utm"] == 5).all() and (points[gdf["scene"] != "utm"] > 5).all()
    assert len(json.loads((out / "utm" / "item.json").read_text())["geometry"]["coordinates"][0]) == 5

    def iou(a, b):
        return a.intersection(b).area / a.union(b).area

    for name, (crs, t) in polar.items():
        laea = f"+proj=laea +lat_0={90 if crs == 'EPSG:3413' else -90} +lon_0=0 +ellps=WGS84 +units=m"
        rows = gdf[gdf["scene"] == name]
        assert rows.geometry.is_valid.all(), name
        truth = gpd.GeoSeries.from_wkb(rows["geometry_native"].tolist(), crs=crs).segmentize(1.0).to_crs(laea)
        drawn = gpd.GeoSeries(rows.geometry.values, crs="OGC:CRS84").segmentize(0.01).to_crs(laea)
        assert min(iou(a, b) for a, b in zip(truth, drawn)) >= 0.99, name
        item = json.loads((out / name / "item.json").read_text())
        footprint = shape(item["geometry"])
        assert footprint.is_valid, name
        whole = gpd.GeoSeries([shapely.box(t.c, t.f - 384 * 5, t.c + 640 * 5, t.f)], crs=crs).segmentize(1.0).to_crs(laea)
        assert iou(whole[0], gpd.GeoSeries([footprint], crs="OGC:CRS84").segmentize(0.01).to_crs(laea)[0]) >= 0.99, name
        if name == "north_across_180":
            assert item["geometry"]["type"] == "MultiPolygon" and item["bbox"][0] > item["bbox"][2]
        else:
            reach = transform_bounds(crs, "EPSG:4326", t.c, t.f - 384 * 5, t.c + 640 * 5, t.f, densify_pts=1000)
            assert item["bbox"][1] == pytest.approx(reach[1], abs=1e-4), name


def test_a_scene_that_is_a_git_annex_link_is_named_by_its_link_everywhere(tmp_path):
    """git-annex / DataLad: the scene is a link to a content-named object. run.json, the
    collected table and both QGIS projects name the link the user gave, not the object (which
    changes with every new version); a new version of the scene is that scene again, in its own
    folder, not a second scene."""
    from conftest import scene
    from tilescan.config import load_config
    from tilescan.pipeline.run import run

    objects = tmp_path / "ds" / ".git" / "annex" / "objects"
    objects.mkdir(parents=True)
    shutil.copyfile(scene("rasterio/RGB.byte.tif"), objects / "SHA256E-s1--aaa.tif")
    link = tmp_path / "ds" / "bahamas.tif"
    link.symlink_to(Path(".git/annex/objects/SHA256E-s1--aaa.tif"))
    out = tmp_path / "out"
    cfg = load_config(overrides={"tiling": {"tile_size": 256, "units": "px"}}, environ={})
    assert run([tmp_path / "ds"], out, cfg, log=quiet).exit_code == 0
    manifest = json.loads((out / "bahamas" / "run.json").read_text())
    assert manifest["scene"] == str(link)
    run_collect(out, log=quiet)
    paths = set(pq.read_table(out / "collected" / "tiles.parquet", columns=["scene_path"]).column(0).to_pylist())
    assert paths == {str(link)}
    for qgs in (out / "bahamas" / "bahamas.qgs", out / "collected" / "collected.qgs"):
        text = qgs.read_text()
        assert "bahamas.tif" in text and ".git/annex" not in text, qgs
    # a new version: another object, the link moved to it
    shutil.copyfile(objects / "SHA256E-s1--aaa.tif", objects / "SHA256E-s2--bbb.tif")
    link.unlink()
    link.symlink_to(Path(".git/annex/objects/SHA256E-s2--bbb.tif"))
    rep = run([tmp_path / "ds"], out, cfg, log=quiet).to_dict()
    assert rep["exit_code"] == 6 and "another version of the scene file" in rep["failed"][0]["reason"], rep
    assert run([tmp_path / "ds"], out, cfg.replace("output", overwrite=True), log=quiet).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["bahamas", "collected", "report.json"]


def test_collect_says_when_the_shards_of_a_run_listed_different_scenes(tmp_path):
    """A sharded job over a folder that changes between the shards' starts (a scene dropped in
    after shard 0 began): each shard divides the list it saw, so a scene may be done by none.
    Each report says what its shard listed, and collect warns; once the shards agree, it does not."""
    from conftest import scene
    from tilescan.config import load_config
    from tilescan.pipeline.run import run

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("rasterio/RGB.byte.tif", "rio-tiler/cog_rgb.tif"):
        shutil.copyfile(scene(name), inputs / Path(name).name)
    cfg = load_config(overrides={"tiling": {"tile_size": 256, "units": "px"}}, environ={})
    assert run([inputs], out, cfg, shard=(0, 2), log=quiet).exit_code == 0
    # shard 1/2 not run yet (pending in a queue): collect says the set is not whole
    notes: list[str] = []
    summary = run_collect(out, gpkg=False, log=notes.append)
    assert summary["unfinished_in_run"] == [{"unit": None, "report": "report-shard-0001-of-0002.json",
                                             "why": "no report of shard 1/2: it has not run (or its start failed "
                                                    "before one)"}]
    assert any("the latest run left work undone" in n for n in notes), notes
    # shard 1/2 starts, but its model file is missing: it ends with an error, and collect says so
    with pytest.raises(tilescan.ModelError):
        run([inputs], out, cfg, model_path=str(tmp_path / "missing.keras"), shard=(1, 2), log=quiet)
    (undone,) = run_collect(out, gpkg=False, log=quiet)["unfinished_in_run"]
    assert undone["report"] == "report-shard-0001-of-0002.json"
    assert undone["why"].startswith("its run ended with an error (exit 5, model): ") and "missing.keras" in undone["why"]
    shutil.copyfile(scene("rasterio/RGBA.byte.tif"), inputs / "RGBA.byte.tif")  # arrives between the shards' starts
    assert run([inputs], out, cfg, shard=(1, 2), log=quiet).exit_code == 0
    counts = [json.loads((out / f"report-shard-000{i}-of-0002.json").read_text())["scenes_listed"]["count"] for i in (0, 1)]
    assert counts == [2, 3]
    notes.clear()
    summary = run_collect(out, gpkg=False, log=notes.append)
    assert any("the shards of the latest run listed different scenes (2, 3)" in n for n in notes), notes
    assert any("or each was given other scenes (each took its share of them: run each with --shard 0/1" in n
               for n in notes), notes  # an array whose tasks each run a folder of their own
    assert [u["report"] for u in summary["unfinished_in_run"]] == ["report-shard-0000-of-0002.json, "
                                                                   "report-shard-0001-of-0002.json"]
    from conftest import invoke  # a step that publishes only a whole batch stops here
    res = invoke(["collect", out, "--no-gpkg", "--require-complete"])
    assert res.exit_code == 3 and "left undone" in res.output, res.output
    assert run([inputs], out, cfg, shard=(0, 2), log=quiet).exit_code == 0  # the job again: both list the same
    notes.clear()
    run_collect(out, gpkg=False, log=notes.append)
    assert not any("listed different scenes" in n for n in notes), notes


def test_a_world_mosaic_covers_the_earth_once_with_its_edge_tiles_held_within_it(tmp_path):
    """world.rgb (the whole earth in EPSG:4326, 512 x 256 px) in 200 px tiles: the edge tiles'
    windows reach past 180° and the south pole; their footprints stop there (each table passes
    the GeoParquet checker), the tiles' areas add up to the earth's (each tile's edges followed
    as they run, not the geodesics between its corners), and the valid area of tiles all of
    whose pixels in the scene are data is their whole area."""
    import geopandas as gpd

    from conftest import assert_geoparquet_conformant, invoke

    out = tmp_path / "out"
    res = invoke(["run", scene("rasterio/world.rgb.tif"), "-o", out, "--units", "px", "--tile-size", "200",
                  "--min-valid", "0.1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert invoke(["collect", out, "--no-gpkg", "--no-styles"]).exit_code == 0
    own = gpd.read_parquet(out / "world.rgb" / "tiles.parquet")
    assert len(own) == 6 and tuple(own.total_bounds) == (-180.0, -90.0, 180.0, 90.0)
    for table in (out / "world.rgb" / "tiles.parquet", out / "collected" / "tiles.parquet"):
        assert_geoparquet_conformant(table)
    got = gpd.read_parquet(out / "collected" / "tiles.parquet")
    earth = 5.10066e14  # m², the WGS 84 ellipsoid's surface
    assert got["area_m2"].sum() == pytest.approx(earth, rel=1e-4)
    np.testing.assert_allclose(got["valid_area_m2"], got["area_m2"], rtol=1e-9)  # all data within the earth


def test_scenes_of_two_legends_are_refused_naming_each_legends_models_and_scenes(tmp_path):
    """Two models of other classes into one OUT: collect says which scenes are in which legend
    and what to do, writes nothing, and gives no warning of 'models of the same classes'."""
    from conftest import invoke, scene, tiny_model_file

    out = tmp_path / "out"
    for name, classes, seed in (("RGB.byte", ["built-up", "water"], 1), ("cog_rgb", ["Crop/fallow", "Grünland", "open water"], 2)):
        model = tiny_model_file(tmp_path / f"{seed}.keras", classes, 32, seed=seed, model_id=f"mine-{seed}")
        src = "rasterio/RGB.byte.tif" if name == "RGB.byte" else "rio-tiler/cog_rgb.tif"
        res = invoke(["run", scene(src), "-o", out, "--model", model, "--tile-size", "128", "--units", "px", "--no-progress"])
        assert res.exit_code == 0, res.output
    res = invoke(["collect", out])
    assert res.exit_code == 4, res.output
    assert ("holds scenes classified in 2 legends (built-up, water (model mine-1): scenes RGB.byte; Crop/fallow, Grünland, "
            "open water (model mine-2): scenes cog_rgb); one collected table holds one legend") in res.output, res.output
    assert "of the same classes" not in res.output and not (out / "collected").exists()


def test_work_left_undone_is_said_in_a_line_however_many_units(ref, tmp_path):
    """A run of 206 chips stopped early: collect's warning named each unit with the same reason,
    one line of 12 kB; the units of one reason are named up to five, then counted."""
    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected"))
    report = json.loads((out / "report.json").read_text())
    report["interrupted"] = {"signal": "SIGTERM", "units": ["u0"], "not_started": [f"u{i}" for i in range(1, 12)]}
    (out / "report.json").write_text(json.dumps(report))
    notes: list[str] = []
    summary = run_collect(out, gpkg=False, styles=False, log=notes.append)
    assert len(summary["unfinished_in_run"]) == 12
    (said,) = [n for n in notes if "left work undone" in n]
    assert "u0, u1, u2, u3, u4 and 7 more: its run was stopped by SIGTERM (rerun the job" in said, said


def test_over_so_many_scenes_the_collected_project_is_one_tiles_layer(ref, tmp_path, monkeypatch):
    """545 chips made a collected.qgs of 2,174 layers (a group per scene) that QGIS took nearly
    a minute to open: over MAX_SCENE_GROUPS scenes it holds every tile as one layer, shown."""
    import xml.etree.ElementTree as ET

    from tilescan.outputs import qgis

    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("collected"))
    monkeypatch.setattr(qgis, "MAX_SCENE_GROUPS", len(bh.UNITS) - 1)
    notes: list[str] = []
    run_collect(out, log=notes.append)
    tree = ET.parse(out / "collected" / "collected.qgs").find("layer-tree-group")
    assert tree.findall("layer-tree-group") == []  # no group per scene
    (tiles,) = tree.findall("layer-tree-layer")
    assert tiles.get("name") == "tiles" and tiles.get("checked") == "Qt::Checked"
    assert any(f"{len(bh.UNITS)} scenes: collected.qgs holds their tiles as one layer" in n for n in notes), notes
    assert any("each scene's own project is in its folder" in n for n in notes), notes
    for made in out.rglob("run.json"):  # as --no-styles makes them: no project of their own to point to
        m = json.loads(made.read_text())
        m["outputs"] = [f for f in m["outputs"] if not f.endswith((".qgs", ".qml"))]
        made.write_text(json.dumps(m))
        for f in [*made.parent.glob("*.qgs"), *made.parent.glob("*.qml")]:
            f.unlink()
    notes.clear()
    run_collect(out, log=notes.append)
    said = [n for n in notes if "holds their tiles as one layer" in n]
    assert said and "own project" not in said[0], notes
    monkeypatch.setattr(qgis, "MAX_SCENE_GROUPS", len(bh.UNITS))  # as many as that: a group each
    run_collect(out, log=quiet)
    tree = ET.parse(out / "collected" / "collected.qgs").find("layer-tree-group")
    assert len(tree.findall("layer-tree-group")) == len(bh.UNITS)
