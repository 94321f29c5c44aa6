"""Helpers shared by the batch tests (Slurm, Kubernetes, cron, resume, collect).

The reference is one plain single-process ``tilescan run`` over four small real scenes,
then ``tilescan collect``; it is made once per test session (cached here) and every
sharded, resumed or scheduled variant must collect to the same rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from conftest import REPO, scene

SCENES = ("rasterio/RGB.byte.tif", "rio-cogeo/image_rgb.tif", "rio-tiler/cog_rgb.tif", "rasterio/cogeo.tif")
ARGS = ("--tile-size", "128", "--units", "px")  # pixel tiles on every scene: the tests count them
# The order tilescan processes them in (sorted resolved paths) and their output folders.
UNITS = ("RGB.byte", "cogeo", "image_rgb", "cog_rgb")
JOBS = REPO / "jobs"

_cache: dict[str, Path] = {}


def exe(name: str = "tilescan") -> str:
    """The console script of this environment (the venv running pytest)."""
    p = Path(sys.executable).parent / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    assert found, f"{name} is not installed in this environment"
    return found


def scene_paths() -> list[Path]:
    return [scene(s) for s in SCENES]


def scene_folder(dest: Path, rels=SCENES) -> Path:
    """A folder of symlinks to real scenes (as a mounted scene volume would look)."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in rels:
        src = scene(rel)
        (dest / src.name).symlink_to(src)
    return dest


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{Path(exe()).parent}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for k in list(e):  # a test run inside a Slurm or Kubernetes job must not inherit its shard
        if k.startswith("SLURM_ARRAY_") or k in ("JOB_COMPLETION_INDEX", "TILESCAN_SHARD_COUNT", "TILESCAN_TEST_KILL_AT"):
            del e[k]
    e.update(extra)
    return e


def tilescan(*args: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env(**extra_env))


def reference(tmp_path_factory) -> Path:
    """OUT of one uninterrupted single-process run over SCENES, collected (cached)."""
    if "ref" not in _cache:
        out = tmp_path_factory.mktemp("reference") / "out"
        p = tilescan("run", "--no-progress", "-o", out, *scene_paths(), *ARGS)
        assert p.returncode == 0, p.stderr
        p = tilescan("collect", out)
        assert p.returncode == 0, p.stderr
        _cache["ref"] = out
    return _cache["ref"]


def collected(out: Path):
    """The collected table as pandas, sorted, after checking it is one GeoParquet table
    without duplicate (scene, tile_index)."""
    path = out / "collected" / "tiles.parquet"
    t = pq.read_table(path)
    df = t.to_pandas()
    dup = df.duplicated(["scene", "tile_index"])
    assert not dup.any(), f"duplicate tiles in {path}: {df.loc[dup, ['scene', 'tile_index']].values.tolist()[:5]}"
    return df.sort_values(["scene", "tile_index"]).reset_index(drop=True)


def assert_same_tiles(got, want, *, exact: bool = True) -> None:
    """Same rows (scene, tile), same labels; numbers equal (exact) or within float noise
    (a different batch composition changes the last bits of a float32 model)."""
    key = ["scene", "tile_index"]
    gk = set(map(tuple, got[key].values.tolist()))
    wk = set(map(tuple, want[key].values.tolist()))
    assert gk == wk, f"missing {sorted(wk - gk)[:5]}, extra {sorted(gk - wk)[:5]}"
    assert len(got) == len(want)
    for c in ("row", "col", "col_off", "row_off", "width", "height", "scene_file", "crs"):
        assert got[c].tolist() == want[c].tolist(), c
    assert got["label"].tolist() == want["label"].tolist()
    assert got["class_index"].tolist() == want["class_index"].tolist()
    assert got["geometry_native"].tolist() == want["geometry_native"].tolist()
    gp, wp = np.stack(got["probabilities"].to_numpy()), np.stack(want["probabilities"].to_numpy())
    if exact:
        assert got["geometry"].tolist() == want["geometry"].tolist()
        np.testing.assert_array_equal(gp, wp)
        np.testing.assert_array_equal(got["confidence"], want["confidence"])
        np.testing.assert_array_equal(got["cam_mean"], want["cam_mean"])
    else:
        np.testing.assert_allclose(gp, wp, atol=1e-4)
        np.testing.assert_allclose(got["confidence"], want["confidence"], atol=1e-4)
        np.testing.assert_allclose(got["cam_mean"], want["cam_mean"], atol=1e-3)
    np.testing.assert_allclose(got["area_m2"], want["area_m2"], rtol=1e-9)
