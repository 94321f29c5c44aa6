"""HeatmapWriter.add_batch against a loop of add(): the same heatmap COG, bit for bit, over
the geometries the pipeline produces (overlap, clipped edge tiles, partial and resampled
masks, NaN CAMs, batches across grid rows)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from tilescan.outputs.cog import HEATMAP_NODATA
from tilescan.outputs.heatmap import HeatmapWriter, _stretch_counts

from conftest import QUIET_AFFINE

pytestmark = QUIET_AFFINE


def make_tiles(W, H, tile, stride, cam_px, mask_px, rng, partial=0.3, drop=0.15, nan=0.0):
    """Row-major tiles of a grid whose windows run past the scene: windows, CAMs, masks
    (mask_px square, stretched over the window; beyond the scene is nodata). ``partial``
    of the tiles get a random hole pattern, ``drop`` are left out (as the pipeline drops
    tiles with too few valid pixels), ``nan`` get a NaN CAM (whole or one cell)."""
    c0s, r0s, cams, masks = [], [], [], []
    for r0 in range(0, H, stride):
        for c0 in range(0, W, stride):
            if rng.uniform() < drop:
                continue
            cam = rng.uniform(0, 1, (cam_px, cam_px)).astype(np.float32)
            if rng.uniform() < nan:
                if rng.uniform() < 0.5:
                    cam[:] = np.nan
                else:
                    cam[rng.integers(cam_px), rng.integers(cam_px)] = np.inf
            m = np.ones((mask_px, mask_px), bool)
            if rng.uniform() < partial:
                m &= rng.uniform(size=(mask_px, mask_px)) > 0.4
            f = mask_px / tile  # the scene's edge, in mask pixels
            m[:, max(0, math.ceil((W - c0) * f)):] = False
            m[max(0, math.ceil((H - r0) * f)):, :] = False
            c0s.append(c0)
            r0s.append(r0)
            cams.append(cam)
            masks.append(m)
    return np.array(c0s), np.array(r0s), np.stack(cams), np.stack(masks)


def write_both(tmp_path, W, H, tile, stride, scale, tiles, batch, masks=True):
    """The heatmap written tile by tile with add() and in batches with add_batch():
    both COGs read back, and both writers (for their buffer peaks)."""
    c0, r0, cams, valid = tiles
    valid = valid if masks else None
    gt = from_origin(500000.0, 4000000.0, 3.0, 3.0)
    one = HeatmapWriter(tmp_path / "one.tif", W, H, gt, "EPSG:32633", scale, tile, stride)
    for j in range(len(c0)):
        one.add((c0[j], r0[j], tile, tile), cams[j], None if valid is None else valid[j])
    many = HeatmapWriter(tmp_path / "many.tif", W, H, gt, "EPSG:32633", scale, tile, stride)
    for s in range(0, len(c0), batch):
        e = s + batch
        many.add_batch(c0[s:e], r0[s:e], tile, cams[s:e], None if valid is None else valid[s:e])
    # the float64 sums still in the strips, before the float32 COG rounds small differences away
    assert one._base == many._base and one._rows == many._rows
    assert np.array_equal(one._sum[:one._rows], many._sum[:many._rows])
    assert np.array_equal(one._wsum[:one._rows], many._wsum[:many._rows])
    one.close()
    many.close()
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "many.tif") as b:
        assert (a.width, a.height) == (b.width, b.height) == (math.ceil(W * scale), math.ceil(H * scale))
        return a.read(1), b.read(1), one, many


def assert_same(ref, got):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), "not bit-identical"


CASES = {
    # name: W, H, tile, stride, scale, cam_px, mask_px
    "aligned-no-overlap": (256, 192, 32, 32, 0.25, 4, 32),
    "unaligned-no-overlap": (203, 157, 40, 40, 0.3, 4, 40),
    "overlap-half": (200, 168, 32, 16, 0.25, 4, 32),
    "overlap-half-unaligned-cam7": (203, 181, 40, 20, 0.3, 7, 40),
    "resampled-masks": (230, 170, 48, 48, 0.25, 4, 16),
    "resampled-masks-overlap-cam7": (211, 163, 50, 25, 0.3, 7, 32),
    "mask-larger-than-window": (150, 140, 24, 12, 0.5, 4, 40),
}


@pytest.mark.parametrize("batch", [1, 7, 32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_add_batch_equals_add_loop(tmp_path, case, batch):
    W, H, tile, stride, scale, cam_px, mask_px = CASES[case]
    tiles = make_tiles(W, H, tile, stride, cam_px, mask_px, np.random.default_rng(len(case) * 100 + batch))
    assert batch == 1 or any(len(set(tiles[1][s:s + batch])) > 1 for s in range(0, len(tiles[0]), batch))
    ref, got, one, many = write_both(tmp_path, W, H, tile, stride, scale, tiles, batch)
    assert_same(ref, got)
    heat = got[got != HEATMAP_NODATA]
    assert heat.size > 0.5 * got.size and heat.min() >= 0 and heat.max() <= 1
    assert many.peak_buffer_rows == one.peak_buffer_rows <= math.ceil((tile + stride) * scale) + 2


@pytest.mark.parametrize("cam_px", [4, 7])
def test_add_batch_nan_cams_and_all_valid(tmp_path, cam_px):
    """NaN and inf CAM cells weigh nothing, as in add(); no masks at all (None)."""
    W, H, tile, stride, scale = 203, 181, 40, 20, 0.3
    tiles = make_tiles(W, H, tile, stride, cam_px, tile, np.random.default_rng(cam_px), nan=0.3)
    assert np.isnan(tiles[2]).any() and np.isinf(tiles[2]).any()
    finite = np.isfinite(tiles[2]).all(axis=(1, 2))
    for masks in (True, False):
        ref, got, _, _ = write_both(tmp_path, W, H, tile, stride, scale, tiles, 16, masks=masks)
        assert_same(ref, got)
        # a tile with a non-finite cell leaves no trace: the heat of the finite tiles alone
        (tmp_path / "finite").mkdir(exist_ok=True)
        _, alone, _, _ = write_both(tmp_path / "finite", W, H, tile, stride, scale,
                                    tuple(a[finite] for a in tiles), 16, masks=masks)
        assert_same(alone, got)


def test_add_batch_host_geometry_rows(tmp_path):
    """The shipped geometry (128 px tiles, stride 128, scale 0.25, 4x4 CAMs) on a scene whose
    size is no multiple of the tile: footprints of 32 and 33 heat pixels, clipped last row
    and column, batches of 128 across grid rows."""
    W, H, tile, stride, scale = 1290, 700, 128, 128, 0.25
    tiles = make_tiles(W, H, tile, stride, 4, tile, np.random.default_rng(5), partial=0.05, drop=0.0)
    ref, got, _, _ = write_both(tmp_path, W, H, tile, stride, scale, tiles, 128)
    assert_same(ref, got)
    assert not (got == HEATMAP_NODATA).any()


def test_add_batch_mixes_with_add_and_finish_rows(tmp_path):
    """add(), add_batch() and explicit finish_rows() in one scene give the add() heatmap."""
    W, H, tile, stride, scale = 160, 130, 32, 16, 0.5
    c0, r0, cams, valid = make_tiles(W, H, tile, stride, 4, tile, np.random.default_rng(3))
    gt = from_origin(0, H, 1, 1)
    with HeatmapWriter(tmp_path / "one.tif", W, H, gt, None, scale, tile, stride) as hw:
        for j in range(len(c0)):
            hw.add((c0[j], r0[j], tile, tile), cams[j], valid[j])
    with HeatmapWriter(tmp_path / "mix.tif", W, H, gt, None, scale, tile, stride) as hw:
        j = 0
        while j < len(c0):
            if j % 3 == 0:
                hw.add((c0[j], r0[j], tile, tile), cams[j], valid[j])
                j += 1
            else:
                hw.add_batch(c0[j:j + 5], r0[j:j + 5], np.full(len(c0[j:j + 5]), tile), cams[j:j + 5], valid[j:j + 5])
                j += 5
            if j < len(c0):
                hw.finish_rows(int(r0[j]))
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "mix.tif") as b:
        assert_same(a.read(1), b.read(1))


def test_add_batch_order_and_shape_errors(tmp_path):
    hw = HeatmapWriter(tmp_path / "h.tif", 64, 64, from_origin(0, 64, 1, 1), None, 0.5, 16, 16)
    cams = np.full((3, 2, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="row-major order: row_off 0 after 16"):
        hw.add_batch([0, 16, 32], [16, 16, 0], 16, cams)
    assert hw._last_row_off is None  # the bad batch added nothing
    hw.add_batch([0, 16], [32, 32], 16, cams[:2])
    with pytest.raises(ValueError, match="row-major order: row_off 16 after 32"):
        hw.add_batch([0], [16], 16, cams[:1])
    with pytest.raises(ValueError, match=r"cams must be \(n=2, h, w\)"):
        hw.add_batch([0, 16], [48, 48], 16, cams)
    with pytest.raises(ValueError, match=r"valid masks must be \(n=1, S, S\)"):
        hw.add_batch([0], [48], 16, cams[:1], np.ones((16, 16), bool))
    hw.add_batch([], [], 16, np.zeros((0, 2, 2)))  # an empty batch is nothing
    hw.abort()
    with pytest.raises(RuntimeError, match="closed"):
        hw.add_batch([0], [48], 16, cams[:1])
    assert list(tmp_path.iterdir()) == []


def test_add_batch_tiles_outside_scene(tmp_path):
    """Windows wholly left of, right of or below the scene add nothing, as in add()."""
    W, H, tile = 100, 60, 32
    gt = from_origin(0, H, 1, 1)
    c0 = np.array([-40, 0, 32, 64, 96, 120, -40, 0, 64, 130, 0])
    r0 = np.array([0, 0, 0, 0, 0, 0, 32, 32, 32, 32, 70])
    cams = np.random.default_rng(0).uniform(0, 1, (len(c0), 4, 4)).astype(np.float32)
    with HeatmapWriter(tmp_path / "one.tif", W, H, gt, None, 0.25, tile, tile) as hw:
        for j in range(len(c0)):
            hw.add((c0[j], r0[j], tile, tile), cams[j], None)
    with HeatmapWriter(tmp_path / "many.tif", W, H, gt, None, 0.25, tile, tile) as hw:
        hw.add_batch(c0, r0, tile, cams)
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "many.tif") as b:
        assert_same(a.read(1), b.read(1))


@pytest.mark.parametrize("mask_px,window", [(128, 256), (128, 200), (64, 128), (128, 96), (7, 13), (40, 24)])
def test_stretch_counts_follow_cv2_nearest(mask_px, window):
    """Mask sums from the stretch counts equal sums over cv2's nearest-stretched mask."""
    v = np.random.default_rng(window).uniform(size=(mask_px, mask_px)) > 0.5
    big = cv2.resize(v.astype(np.uint8), (window, window), interpolation=cv2.INTER_NEAREST)
    c = _stretch_counts(mask_px, window)
    lo, hi = window // 5, window - window // 7
    got = (c[hi] - c[lo]) @ v.astype(np.float64) @ (c[window] - c[0])
    assert got == big[lo:hi, :].sum()
