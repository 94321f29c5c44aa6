"""The heatmap COG's overviews, built while the heat is blended (tilescan.outputs.heatpyramid),
against GDAL's own ``average`` overviews of the same heat: same levels, same sizes, same
pixels, on odd sizes, nodata holes and rows no tile touched."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

import tilescan.outputs.heatmap as heatmap_mod
from tilescan.outputs.cog import HEATMAP_NODATA, _cog_copy, _overview_level
from tilescan.outputs.heatmap import HeatmapWriter
from tilescan.outputs.heatpyramid import BlockRows, HeatPyramid

from conftest import QUIET_AFFINE
from test_heat_batch import make_tiles
from test_writers import cog_validate

pytestmark = [QUIET_AFFINE, pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")]


def gdal_levels(tmp_path, heat: np.ndarray) -> list[np.ndarray]:
    """GDAL's COG driver's average overviews of ``heat`` (nodata -1), as the heatmap COG was
    written before: from an uncompressed tiled GeoTIFF, each level read back whole."""
    h, w = heat.shape
    src, dst = tmp_path / "ref-src.tif", tmp_path / "ref.tif"
    with rasterio.open(src, "w", driver="GTiff", dtype="float32", count=1, width=w, height=h,
                       nodata=HEATMAP_NODATA, tiled=True, blockxsize=256, blockysize=256,
                       transform=from_origin(0, h, 1, 1)) as d:
        d.write(heat, 1)
    _cog_copy(src, dst, "deflate", "average", _overview_level(w, h), (w, h))
    return read_levels(dst)


def read_levels(path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        n = len(ds.overviews(1))
        out = [ds.read(1)]
    for k in range(n):
        with rasterio.open(path, OVERVIEW_LEVEL=k) as ds:
            out.append(ds.read(1))
    return out


def assert_same_levels(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [a.shape for a in got] == [b.shape for b in want]
    for k, (a, b) in enumerate(zip(got, want)):
        assert np.array_equal(a == HEATMAP_NODATA, b == HEATMAP_NODATA), f"level {k}: nodata differs"
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"level {k}")


def heat_like(rng, h: int, w: int, holes: bool) -> np.ndarray:
    """Smooth heat in 0..1 with a nodata border, an empty band of rows and, with ``holes``,
    nodata pixels scattered all over (without, most rows hold no nodata at all)."""
    y, x = np.mgrid[0:h, 0:w]
    heat = (0.5 + 0.5 * np.sin(x / 37.0 + rng.uniform(0, 6)) * np.cos(y / 23.0)).astype(np.float32)
    heat += rng.uniform(0, 0.05, heat.shape).astype(np.float32)
    heat = np.clip(heat, 0, 1)
    if holes:
        heat[rng.uniform(size=heat.shape) < 0.05] = HEATMAP_NODATA
        heat[:, : rng.integers(0, 40)] = HEATMAP_NODATA
    else:
        heat[-rng.integers(1, 40):, : rng.integers(1, 40)] = HEATMAP_NODATA
    r = int(rng.integers(0, h - 50))
    heat[r:r + int(rng.integers(1, 50))] = HEATMAP_NODATA
    return heat


def pyramid_of(tmp_path, name, heat, runs, preview, skip_empty):
    """The levels and preview of ``heat`` fed in ``runs`` of rows; with ``skip_empty`` an
    all-nodata run is left out (skipped, as the heat writer skips rows no tile touched)."""
    h, w = heat.shape
    paths = [tmp_path / f"{name}{k}.tif" for k in range(_overview_level(w, h))]
    pyr = HeatPyramid(w, h, len(paths), HEATMAP_NODATA, paths, preview=preview)
    row = 0
    for n in runs:
        part = heat[row:row + n]
        if not skip_empty or (part != HEATMAP_NODATA).any():
            pyr.feed(row, part)
        row += n
    pyr.finish()
    levels = [heat]
    for p in paths:
        with rasterio.open(p) as ds:
            levels.append(ds.read(1))
    return levels, None if preview is None else pyr.preview


@pytest.mark.parametrize("w,h,holes", [(1531, 1395, True), (3062, 2790, False), (2049, 1031, True), (2049, 1031, False),
                                       (1027, 2053, True), (4100, 530, False), (1100, 1100, True)])
def test_pyramid_equals_gdal_average_overviews(tmp_path, w, h, holes):
    rng = np.random.default_rng(w * 7 + h)
    heat = heat_like(rng, h, w, holes)
    assert _overview_level(w, h) >= 1
    runs, row = [], 0
    while row < h:  # rows in uneven runs; an all-nodata run is skipped, as the heat writer skips it
        runs.append(int(rng.integers(1, 70)))
        row += runs[-1]
    got, _ = pyramid_of(tmp_path, "ovr", heat, runs, None, skip_empty=True)
    assert_same_levels(got, gdal_levels(tmp_path, heat))


def test_heatmap_cog_overviews_as_gdal_makes_them(tmp_path, monkeypatch):
    """The heatmap COG of a large scene (its scratch-file way) carries overviews equal to
    those GDAL builds from its full-resolution heat, is a valid COG, and leaves no scratch
    file behind; an aborted one leaves nothing at all."""
    monkeypatch.setattr(heatmap_mod, "HEAT_IN_MEMORY_PX", 0)
    W, H, tile, stride, scale = 5000, 3300, 128, 128, 0.25
    rng = np.random.default_rng(5)
    c0, r0, cams, valid = make_tiles(W, H, tile, stride, 4, 32, rng, drop=0.3)
    keep = (r0 < 1200) | (r0 >= 1800)  # a band of grid rows with no tile: heat rows never written
    c0, r0, cams, valid = c0[keep], r0[keep], cams[keep], valid[keep]
    folder = tmp_path / "odd & <name> é 'x' %20"  # the scratch files and VRT live beside the output
    folder.mkdir()
    path = folder / "heat.tif"
    with HeatmapWriter(path, W, H, from_origin(500000.0, 4000000.0, 3.0, 3.0), "EPSG:32633", scale, tile,
                       stride) as hw:
        assert hw._pyramid is not None
        for s in range(0, len(c0), 256):
            hw.add_batch(c0[s:s + 256], r0[s:s + 256], tile, cams[s:s + 256], valid[s:s + 256])
    got = read_levels(path)
    assert len(got) == 1 + _overview_level(*got[0].shape[::-1]) == 3
    assert (got[0][400] == HEATMAP_NODATA).all()  # the band without tiles
    assert_same_levels(got, gdal_levels(tmp_path, got[0]))
    ok, errors, warnings = cog_validate(path)
    assert ok and not errors and not warnings, (errors, warnings)
    with rasterio.open(path) as ds:
        assert ds.tags()["HEATMAP_NODATA"] == repr(HEATMAP_NODATA) and ds.descriptions == ("heat",)
    assert sorted(p.name for p in folder.iterdir()) == ["heat.tif"]  # no scratch, VRT or level file left

    hw = HeatmapWriter(folder / "gone.tif", W, H, from_origin(0, H, 1, 1), None, scale, tile, stride)
    hw.add_batch(c0[:50], r0[:50], tile, cams[:50], valid[:50])
    hw.abort()
    assert sorted(p.name for p in folder.iterdir()) == ["heat.tif"]


@pytest.mark.parametrize("W,H,preview", [(5000, 3300, 1024), (4100, 6050, 700), (4400, 4300, 1000), (5000, 3300, 1200)])
def test_heatmap_preview_built_as_rows_come_equals_the_read_of_the_heat(tmp_path, monkeypatch, W, H, preview):
    """The quicklook's heat preview that the writer builds while blending equals the one read
    from the heat with GDAL's decimated average (what it was before), NaN where nodata, for
    ratios near 1 and far from it; another size is still read from the heat."""
    monkeypatch.setattr(heatmap_mod, "HEAT_IN_MEMORY_PX", 0)
    tile, scale = 128, 0.25
    rng = np.random.default_rng(W + H)
    c0, r0, cams, valid = make_tiles(W, H, tile, tile, 4, 32, rng, drop=0.3)
    keep = (r0 < 600) | (r0 >= 1400)
    tiles = c0[keep], r0[keep], cams[keep], valid[keep]
    got = {}
    for name, size in (("built", preview), ("read", None)):
        hw = HeatmapWriter(tmp_path / f"{name}.tif", W, H, from_origin(0, H, 1, 1), None, scale, tile, tile,
                           preview_size=size)
        for s in range(0, len(tiles[0]), 256):
            hw.add_batch(tiles[0][s:s + 256], tiles[1][s:s + 256], tile, tiles[2][s:s + 256], tiles[3][s:s + 256])
        hw.finish()
        assert (hw._preview_size is not None) == (size is not None)
        got[name] = hw.preview(preview), hw.preview(preview // 2)
        hw.close()
    built, read = got["built"], got["read"]
    assert built[0].shape == read[0].shape and max(built[0].shape) == preview
    assert np.isnan(built[0]).any() and not np.isnan(built[0]).all()
    for b, r in zip(built, read):  # the second is not the built size: read from the heat
        assert np.array_equal(np.isnan(b), np.isnan(r))
        np.testing.assert_allclose(b, r, rtol=0, atol=1e-6)  # sums in another order: a float32 ulp at most


def test_heatmap_levels_failing_on_their_thread_fail_the_heatmap_and_leave_nothing(tmp_path, monkeypatch):
    """A full disk while the overview levels are written (on the pyramid's own thread) fails
    the heatmap with an OutputError naming it, and every scratch file goes."""
    from tilescan.errors import OutputError
    import tilescan.outputs.heatpyramid as pyramid_mod

    monkeypatch.setattr(heatmap_mod, "HEAT_IN_MEMORY_PX", 0)
    calls = {"n": 0}
    real = pyramid_mod._Level.feed

    def failing(self, block):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device")
        return real(self, block)

    monkeypatch.setattr(pyramid_mod._Level, "feed", failing)
    W, H, tile = 4400, 4300, 128
    rng = np.random.default_rng(3)
    c0, r0, cams, valid = make_tiles(W, H, tile, tile, 4, 32, rng, drop=0.1)
    path = tmp_path / "heat.tif"
    with pytest.raises(OutputError, match="heat.tif"):
        with HeatmapWriter(path, W, H, from_origin(0, H, 1, 1), None, 0.25, tile, tile, preview_size=1024) as hw:
            for s in range(0, len(c0), 256):
                hw.add_batch(c0[s:s + 256], r0[s:s + 256], tile, cams[s:s + 256], valid[s:s + 256])
    assert calls["n"] >= 40
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("w,h,islands", [(3001, 2503, 1), (2049, 3075, 3), (1300, 1300, 0)])
def test_sparse_heat_levels_and_preview_as_if_every_row_were_fed(tmp_path, w, h, islands):
    """A large frame with a few islands of heat (a sparse scene): the empty bands between
    them are skipped, not averaged, and the levels and preview are exactly those of
    feeding every nodata row, and the levels those GDAL builds."""
    rng = np.random.default_rng(w + h)
    heat = np.full((h, w), HEATMAP_NODATA, np.float32)
    for _ in range(islands):
        r, c = int(rng.integers(0, h - 300)), int(rng.integers(0, w - 400))
        heat[r:r + int(rng.integers(1, 300)), c:c + int(rng.integers(1, 400))] = rng.uniform(0, 1)
    runs = list(rng.integers(1, 200, size=h))
    preview = (int(rng.integers(100, 900)), int(rng.integers(100, 900)))
    skipped, prev_skipped = pyramid_of(tmp_path, "skip", heat, runs, preview, skip_empty=True)
    fed, prev_fed = pyramid_of(tmp_path, "fed", heat, runs, preview, skip_empty=False)
    assert [a.shape for a in skipped] == [b.shape for b in fed]
    for k, (a, b) in enumerate(zip(skipped, fed)):
        assert np.array_equal(a, b), f"level {k}"
    assert prev_skipped.shape == preview and np.array_equal(prev_skipped, prev_fed)
    assert (prev_skipped != HEATMAP_NODATA).any() == (islands > 0)
    assert_same_levels(skipped, gdal_levels(tmp_path, heat))


@pytest.mark.parametrize("w,h,block,hold_rows", [(1000, 777, 256, 0), (300, 64, 16, 0), (513, 1030, 256, 0),
                                                 (513, 1030, 256, 300), (1000, 777, 256, 10_000)])
def test_rows_written_a_row_of_blocks_at_a_time_read_back_as_given(tmp_path, w, h, block, hold_rows):
    """BlockRows: rows given in runs with gaps (rows no tile touched), within one row of
    blocks and across them, read back as written whole, the gaps as nodata; rows held in
    memory (up to ``hold_rows`` rows' bytes) take no space in the file until written."""
    rng = np.random.default_rng(w * h)
    want = np.full((h, w), HEATMAP_NODATA, np.float32)
    path = tmp_path / "rows.tif"
    with rasterio.open(path, "w", driver="GTiff", dtype="float32", count=1, width=w, height=h,
                       nodata=HEATMAP_NODATA, tiled=True, blockxsize=block, blockysize=block,
                       sparse_ok=True) as ds:
        out = BlockRows(ds, block, HEATMAP_NODATA, hold_bytes=hold_rows * w * 4)
        empty_size = path.stat().st_size
        row = 0
        while row < h:
            row += int(rng.integers(0, 3 * block)) if rng.random() < 0.3 else 0  # a gap
            n = min(int(rng.integers(1, 2 * block)), h - row)
            if n <= 0:
                break
            rows = rng.uniform(0, 1, (n, w)).astype(np.float32)
            out.write(row, rows)
            want[row:row + n] = rows
            row += n
        if hold_rows >= h:
            assert path.stat().st_size == empty_size  # all held
        out.flush()
    with rasterio.open(path) as ds:
        assert np.array_equal(ds.read(1), want)
