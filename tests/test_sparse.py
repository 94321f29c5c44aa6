"""Empty areas cost nothing (issue 17): a scene's time and outputs follow its data.

Every scene here is made from real imagery placed in a large frame written sparse (only the
blocks holding the island are stored), so a 12,000 x 12,000 px scene is a few MB on disk.
The island alone and the island in its frame must give the same outputs; tiles in empty
blocks are never read (``run.json`` ``counts.tiles_empty`` and ``reads``, the reader's
``windows_read``), and the stretch statistics come from where the data is.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from conftest import HEAT_NODATA, LABEL_NODATA, QUIET_AFFINE, check_outputs, invoke, scene
from tilescan.config import TilingConfig
from tilescan.scene.info import TilingWarning
from tilescan.scene.plan import open_scene

NAIP = "opengeos-naip/m_4709963_se_14_1_20100629.tif"  # R,G,B,NIR uint8, nodata 0, 5 m
MOSAIC = "rio-tiler/mosaic_cog1.tif"  # Landsat 8 uint16, nodata 0, a COG with a nodata collar
RGB_BYTE = "rasterio/RGB.byte.tif"  # uint8, nodata 0 around a rotated footprint
RGBA_BYTE = "rasterio/RGBA.byte.tif"  # the same, masked by an alpha band

FRAME = 12_000  # frame edge (px): 8,836 tiles of 128 px
TILE = 128
ALIGNED = (5120, 3840)  # island origin (col, row): multiples of the tile (and of 4: heat pixels)
SHIFTED = (4999, 7013)  # not aligned to tiles nor blocks
ISLAND = Window(0, 0, 928, 720)  # NAIP crop; 928 x 720 are multiples of 4, so heat pixels align


pytestmark = QUIET_AFFINE


def write_frame(path: Path, island: np.ndarray, island_transform: Affine, crs, offset: tuple[int, int], *,
                size: int = FRAME, nodata=0, block: int = 512, colorinterp=None, mask: np.ndarray | None = None,
                sparse: bool = True) -> Path:
    """A ``size``-square tiled GeoTIFF holding ``island`` (C, h, w) at ``offset`` (col, row),
    georeferenced so the island's pixels keep their map position. Written sparse: blocks
    never written are not stored. ``mask`` (the island's) becomes an internal mask band."""
    col, row = offset
    c, h, w = island.shape
    prof = dict(driver="GTiff", width=size, height=size, count=c, dtype=island.dtype.name, crs=crs,
                transform=island_transform @ Affine.translation(-col, -row), tiled=True, blockxsize=block,
                blockysize=block, compress="deflate", sparse_ok=sparse, nodata=nodata)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **{k: v for k, v in prof.items() if v is not None}) as dst:
            if colorinterp:
                dst.colorinterp = colorinterp
            if island.size:
                dst.write(island, window=Window(col, row, w, h))
            if mask is not None:
                full = np.zeros((size, size), np.uint8)
                full[row:row + h, col:col + w] = mask
                dst.write_mask(full)
    return path


def read_island(rel: str, window: Window | None = None):
    with rasterio.open(scene(rel)) as ds:
        arr = ds.read(window=window)
        tf = ds.window_transform(window) if window is not None else ds.transform
        return arr, tf, ds.crs, ds.profile


def tile_fractions(valid: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Valid share of every padded tile of a scene whose valid mask is ``valid`` (computed
    here with numpy, independently of tilescan)."""
    H, W = valid.shape
    nr, nc = math.ceil(H / tile), math.ceil(W / tile)
    pad = np.zeros((nr * tile, nc * tile), bool)
    pad[:H, :W] = valid
    return pad.reshape(nr, tile, nc, tile).sum(axis=(1, 3)) / tile**2


def placed(island_valid: np.ndarray, offset: tuple[int, int], size: int = FRAME) -> np.ndarray:
    full = np.zeros((size, size), bool)
    h, w = island_valid.shape
    full[offset[1]:offset[1] + h, offset[0]:offset[0] + w] = island_valid
    return full


# ------------------------------------------------------------------------------------
# one run over the island and its frames (the packaged AID model: NAIP is at its scale)


@pytest.fixture(scope="module")
def naip_run(tmp_path_factory, scenes_dir):
    d = tmp_path_factory.mktemp("sparse")
    arr, tf, crs, prof = read_island(NAIP, ISLAND)
    island = d / "island.tif"
    with rasterio.open(island, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=4, dtype="uint8",
                       crs=crs, transform=tf, nodata=0, tiled=True, blockxsize=512, blockysize=512,
                       compress="deflate") as dst:
        dst.write(arr)
    aligned = write_frame(d / "frame_aligned.tif", arr, tf, crs, ALIGNED)
    shifted = write_frame(d / "frame_shifted.tif", arr, tf, crs, SHIFTED)
    empty = write_frame(d / "frame_empty.tif", arr[:, :0, :0], tf, crs, (0, 0))
    assert aligned.stat().st_size < 4 * 2**20  # 576 MB of pixels, stored sparse
    out = d / "out"
    res = invoke(["run", island, aligned, shifted, empty, "-o", out, "--tile-size", TILE, "--no-progress"])
    assert res.exit_code == 0, res.output
    valid = (arr[:3] != 0).all(axis=0)  # the model's bands (R, G, B): a pixel is nodata in any
    return {"out": out, "island": island, "aligned": aligned, "shifted": shifted, "empty": empty,
            "valid": valid, "output": res.output}


def load(run, name: str) -> dict:
    """The checked outputs of scene ``name`` of the run (see conftest.check_outputs)."""
    return check_outputs(run["out"] / run[name].stem, run[name], TILE)


def tiles_touching(blocks: np.ndarray, block: int = 512, size: int = FRAME) -> int:
    """How many tiles of a ``size``-square scene touch a block marked in ``blocks``."""
    n = math.ceil(size / TILE)
    return sum(bool(blocks[r * TILE // block:(min(r * TILE + TILE, size) - 1) // block + 1,
                           c * TILE // block:(min(c * TILE + TILE, size) - 1) // block + 1].any())
               for r in range(n) for c in range(n))


def blocks_with_data(valid: np.ndarray, block: int) -> np.ndarray:
    """Which ``block``-square blocks of a scene hold a valid pixel."""
    H, W = valid.shape
    nr, nc = math.ceil(H / block), math.ceil(W / block)
    pad = np.zeros((nr * block, nc * block), bool)
    pad[:H, :W] = valid
    return pad.reshape(nr, block, nc, block).any(axis=(1, 3))


def test_island_alone_and_in_a_sparse_frame_give_the_same_outputs(naip_run):
    """Tile-aligned offset: the same tiles, labels, confidences, valid fractions and
    footprints (map coordinates equal, pixel offsets shifted by the island's offset), the
    same label cells and heat (within 1e-6) on the data region, nodata everywhere else."""
    a = load(naip_run, "island")
    b = load(naip_run, "aligned")
    dc, dr = ALIGNED[0] // TILE, ALIGNED[1] // TILE
    ga = a["gdf"].sort_values(["row", "col"]).reset_index(drop=True)
    gb = b["gdf"].sort_values(["row", "col"]).reset_index(drop=True)
    assert len(ga) == len(gb) > 30
    np.testing.assert_array_equal(gb.row - dr, ga.row)
    np.testing.assert_array_equal(gb.col - dc, ga.col)
    np.testing.assert_array_equal(gb.col_off - ALIGNED[0], ga.col_off)
    np.testing.assert_array_equal(gb.row_off - ALIGNED[1], ga.row_off)
    assert gb.label.tolist() == ga.label.tolist()
    np.testing.assert_array_equal(gb.valid_fraction, ga.valid_fraction)
    np.testing.assert_allclose(gb.confidence, ga.confidence, atol=1e-6)
    np.testing.assert_allclose(np.stack(gb.probabilities), np.stack(ga.probabilities), atol=1e-6)
    assert gb.geometry.geom_equals_exact(ga.geometry, 1e-6).all()
    # the island's valid fractions, computed here
    want = tile_fractions(naip_run["valid"])
    np.testing.assert_allclose(ga.valid_fraction, want[ga.row, ga.col], atol=1e-6)

    h, w = a["labels"].shape
    np.testing.assert_array_equal(b["labels"][dr:dr + h, dc:dc + w], a["labels"])
    rest = b["labels"].copy()
    rest[dr:dr + h, dc:dc + w] = LABEL_NODATA
    assert (rest == LABEL_NODATA).all()

    hr, hc = ALIGNED[1] // 4, ALIGNED[0] // 4  # heatmap_scale 0.25
    hh, hw = a["heat"].shape
    np.testing.assert_allclose(b["heat"][hr:hr + hh, hc:hc + hw], a["heat"], atol=1e-6)
    rest = b["heat"].copy()
    rest[hr:hr + hh, hc:hc + hw] = HEAT_NODATA
    assert (rest == HEAT_NODATA).all()

    # almost nothing of the frame was read
    n = (FRAME // TILE + 1) ** 2
    counts, man = b["manifest"]["counts"], b["manifest"]
    assert counts["tiles_total"] == n and counts["tiles_classified"] == len(ga)
    blocks = blocks_with_data(placed(naip_run["valid"], ALIGNED), 512)
    assert blocks.sum() == 4 and counts["tiles_empty"] == n - tiles_touching(blocks) == n - 64
    assert man["reads"]["windows"] < 100 and man["reads"]["pixels"] < 16 * 512 * 512
    cov = man["scene_info"]["coverage"]
    assert cov["blocks"] == math.ceil(FRAME / 512) ** 2 and cov["blocks_empty"] == cov["blocks"] - 4
    assert {"scan", "stats", "read", "compute", "write", "total"} <= set(man["timings_s"])
    assert man["scene_info"]["scale"] == a["manifest"]["scene_info"]["scale"]


def test_outputs_of_a_sparse_frame_are_written_sparse(naip_run):
    """The heatmap COG stores only the blocks holding heat (and the label COG only blocks
    holding labels), so outputs stay proportional to the data; both are valid COGs
    (check_outputs runs rio-cogeo's validation)."""
    b = load(naip_run, "aligned")
    folder = naip_run["out"] / naip_run["aligned"].stem
    with rasterio.open(folder / "heatmap.tif") as hm:
        bh, bw = hm.block_shapes[0]
        stored = {(i, j) for i in range(math.ceil(hm.height / bh)) for j in range(math.ceil(hm.width / bw))
                  if hm.get_tag_item(f"BLOCK_SIZE_{j}_{i}", "TIFF", bidx=1)}
    rows, cols = np.nonzero(b["heat"] != HEAT_NODATA)
    want = {(i // bh, j // bw) for i, j in zip(rows, cols)}
    assert stored == want
    assert (folder / "heatmap.tif").stat().st_size < 512 * 1024


def test_non_aligned_offset_counts_and_valid_fractions(naip_run):
    """Island at an offset aligned to neither tiles nor blocks: the classified tiles and
    their valid fractions are those computed here from the island's pixels, every other
    tile is skipped, and the tiles never read are exactly those touching no stored block."""
    b = load(naip_run, "shifted")
    full = placed(naip_run["valid"], SHIFTED)
    want = tile_fractions(full)
    got = {(r.row, r.col): r.valid_fraction for r in b["gdf"].itertuples()}
    assert set(got) == {tuple(k) for k in np.argwhere(want >= 0.5)}
    for (r, c), v in got.items():
        assert v == pytest.approx(want[r, c], abs=1e-6)
    # the stored blocks (512 px) are those holding island pixels
    blocks = blocks_with_data(full, 512)
    n = FRAME // TILE + 1
    counts = b["manifest"]["counts"]
    assert counts["tiles_empty"] == n * n - tiles_touching(blocks)
    assert counts["tiles_skipped"] == n * n - len(got)


def test_scene_with_no_data_at_all(naip_run):
    """A frame with no block stored: no valid data, said in run.json; valid empty outputs
    (robustness row 23); not one tile read."""
    o = load(naip_run, "empty")
    man = o["manifest"]
    n = (FRAME // TILE + 1) ** 2
    assert man["counts"]["tiles_empty"] == man["counts"]["tiles_total"] == n
    assert man["counts"]["tiles_classified"] == 0 and len(o["gdf"]) == 0
    assert man["reads"]["windows"] <= 1  # one block decoded to prove the absent ones empty
    assert any("no valid pixel found" in w for w in man["warnings"])
    assert (o["labels"] == LABEL_NODATA).all() and (o["heat"] == HEAT_NODATA).all()
    assert "no valid pixel" in naip_run["output"]


def test_empty_scene_reader_reads_nothing(tmp_path, scenes_dir):
    """The same at the reader: opening, listing tiles and the quicklook preview decode one
    block of a 144-Mpx scene, whatever its size."""
    arr, tf, crs, _ = read_island(NAIP, ISLAND)
    path = write_frame(tmp_path / "empty.tif", arr[:, :0, :0], tf, crs, (0, 0))
    with pytest.warns(TilingWarning, match="no valid pixel found: all 576 blocks"):
        r = open_scene(path, TilingConfig(tile_size=TILE, units="px", bands=[1, 2, 3]), 3, TILE)
    with r:
        tiles, n_empty = r.tiles_with_data()
        assert len(tiles) == 0 and n_empty == len(r.grid)
        r.gather_preview(1024)
        rgb, valid = r.read_overview(1024)
        assert not valid.any() and not rgb.any()
        assert r.windows_read == 1 and r.coverage.all_empty and r.coverage.absent == 576


# ------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("offset", [(4999, 7013), (0, 0), (FRAME - 779, FRAME - 790)])
def test_uint16_stretch_of_a_sparse_frame_equals_the_island_alone(tmp_path, scenes_dir, offset):
    """A uint16 Landsat island (nodata 0) in a sparse 12,000 px frame: the percentile
    stretch comes from the blocks holding data, so it equals the island's own (within 1%
    of the range; here it is exact), and only those blocks are decoded."""
    arr, tf, crs, _ = read_island(MOSAIC)
    path = write_frame(tmp_path / "frame16.tif", arr, tf, crs, offset)
    cfg = TilingConfig(tile_size=TILE, units="px", bands=[1, 2, 3])
    with open_scene(scene(MOSAIC), cfg, 3, TILE) as alone, open_scene(path, cfg, 3, TILE) as framed:
        data = int(blocks_with_data(placed((arr != 0).any(axis=0), offset), 512).sum())
        assert framed.timings["scan"] >= 0 and framed.coverage.n_empty == framed.coverage.n_blocks - data
        assert framed.pixels_read <= (data + 1) * 512 * 512  # the blocks with data, one proof read
        for (lo, hi), (flo, fhi) in zip(alone.scale, framed.scale):
            assert hi > lo + 100
            assert abs(flo - lo) <= 0.01 * (hi - lo) and abs(fhi - hi) <= 0.01 * (hi - lo)


# ------------------------------------------------------------------------------------
# masks: nodata, alpha, internal mask band


def _mask_frame(kind: str, d: Path) -> tuple[Path, np.ndarray]:
    """A 3,072 px sparse frame (256 px blocks) holding the rotated Landsat footprint of
    RGB.byte.tif, masked by ``kind``; and its valid mask."""
    size, offset = 3072, (1000, 1100)
    rgb, tf, crs, _ = read_island(RGB_BYTE)
    rgba, *_ = read_island(RGBA_BYTE)
    alpha = rgba[3]
    kw = dict(size=size, block=256)
    if kind == "nodata":
        path = write_frame(d / "nodata.tif", rgb, tf, crs, offset, nodata=0, **kw)
        valid = (rgb != 0).all(axis=0)
    elif kind == "alpha":
        path = write_frame(d / "alpha.tif", rgba, tf, crs, offset, nodata=None,
                           colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha], **kw)
        valid = alpha != 0
    else:
        path = write_frame(d / "mask.tif", rgb, tf, crs, offset, nodata=None, mask=alpha,
                           colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue], **kw)
        valid = alpha != 0
    return path, placed(valid, offset, size)


@pytest.mark.parametrize("kind", ["nodata", "alpha", "mask"])
def test_empty_blocks_found_for_every_kind_of_mask(tmp_path, scenes_dir, kind):
    """Nodata, an alpha band and an internal mask band each make the empty blocks known
    before any tile is read; the tiles left out hold no valid pixel, and the tiles read have
    exactly the valid fractions computed here from the scene's own mask."""
    path, valid = _mask_frame(kind, tmp_path)
    with rasterio.open(path) as ds:
        flags = ds.mask_flag_enums[0]
        assert {"nodata": "nodata", "alpha": "alpha", "mask": "per_dataset"}[kind] in {f.name for f in flags}
        if kind != "nodata":  # GDAL agrees with the mask made here
            np.testing.assert_array_equal(ds.dataset_mask() != 0, valid)
    want = tile_fractions(valid)
    data = int(blocks_with_data(valid, 256).sum())
    with open_scene(path, TilingConfig(tile_size=TILE, units="px"), 3, TILE) as r:
        opened = r.windows_read
        assert r.coverage.n_empty == r.coverage.n_blocks - data
        tiles, n_empty = r.tiles_with_data()
        assert opened <= data + 4 and r.windows_read == opened  # listing tiles reads nothing
        assert n_empty + len(tiles) == len(r.grid) == 24 * 24 and n_empty >= 0.85 * len(r.grid)
        kept = {(t.row, t.col) for t in tiles}
        for rc in zip(*np.nonzero(want)):
            assert rc in kept  # no tile with data is left out
        _, v = r.read_batch(tiles)
        got = v.reshape(len(tiles), -1).mean(axis=1)
        np.testing.assert_allclose(got, [want[t.row, t.col] for t in tiles], atol=1e-9)
        assert r.windows_read - opened <= len(tiles)


# ------------------------------------------------------------------------------------
# a real scene with a nodata collar: the same outputs as reading every tile


def test_collar_scene_same_outputs_with_and_without_the_scan(tmp_path, scenes_dir, monkeypatch):
    """mosaic_cog1.tif (a Landsat COG, nodata 0) stores its collar as identical small
    blocks: 5 of its 16 blocks are found empty, their tiles are not read, and every output
    equals that of a run that reads every tile (scan turned off)."""
    import tilescan.scene.coverage as coverage_module

    path = scene(MOSAIC)
    res = invoke(["run", path, "-o", tmp_path / "scan", "--tile-size", TILE, "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(coverage_module, "MAX_SCAN_BLOCKS", 0)  # no scan: every tile is read
    res = invoke(["run", path, "-o", tmp_path / "plain", "--tile-size", TILE, "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    a = check_outputs(tmp_path / "scan" / path.stem, path, TILE)
    b = check_outputs(tmp_path / "plain" / path.stem, path, TILE)
    assert a["manifest"]["scene_info"]["coverage"]["blocks_empty"] == 5
    assert b["manifest"]["scene_info"]["coverage"] is None
    assert a["manifest"]["counts"]["tiles_empty"] > 0 and b["manifest"]["counts"]["tiles_empty"] == 0
    # a scene this small is decoded once, whole, for its statistics, and its tiles are cut
    # from that read; the scan adds only its proof reads (a large scene: test_empty_blocks_found_for_every_kind_of_mask)
    assert b["manifest"]["reads"]["windows"] == 1
    assert a["manifest"]["reads"]["windows"] == 1 + a["manifest"]["scene_info"]["coverage"]["proof_reads"]
    for k in ("tiles_total", "tiles_skipped", "tiles_classified", "per_class"):
        assert a["manifest"]["counts"][k] == b["manifest"]["counts"][k]
    assert a["manifest"]["scene_info"]["scale"] == b["manifest"]["scene_info"]["scale"]
    ta = pq.read_table(tmp_path / "scan" / path.stem / "tiles.parquet").drop(["geometry"])
    tb = pq.read_table(tmp_path / "plain" / path.stem / "tiles.parquet").drop(["geometry"])
    assert ta.equals(tb)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["heat"], b["heat"])
