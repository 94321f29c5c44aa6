"""Helpers shared by the batch tests (Slurm, Kubernetes, cron, resume, preemption, collect).

The reference is one plain single-process ``tilescan run`` over four small real scenes,
then ``tilescan collect``; it is made once per test session (cached here) and every
sharded, resumed or scheduled variant must collect to the same rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio

from conftest import REPO, scene

SCENES = ("rasterio/RGB.byte.tif", "rio-cogeo/image_rgb.tif", "rio-tiler/cog_rgb.tif", "rasterio/cogeo.tif")
ARGS = ("--tile-size", "128", "--units", "px")  # pixel tiles on every scene: the tests count them
# The order tilescan processes them in (sorted resolved paths) and their output folders.
UNITS = ("RGB.byte", "cogeo", "image_rgb", "cog_rgb")
JOBS = REPO / "jobs"
K8S = JOBS / "k8s"
RASTERS = ("labels.tif", "heatmap.tif")  # the rasters a unit writes

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


def finished_folders(out: Path) -> dict[str, Path]:
    """Every visible folder under OUT that holds outputs, checked to be complete."""
    found = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if any(part.startswith(".") for part in rel.parts):
            continue  # staging, locks: never where a user looks for results
        assert ".tmp-" not in p.name, f"temporary file in a final location: {rel}"
        if p.is_dir() and any((p / f).exists() for f in ("tiles.parquet", "labels.tif", "heatmap.tif", "run.json")):
            assert (p / "run.json").is_file(), f"{rel} holds outputs but no run.json"
            m = json.loads((p / "run.json").read_text())
            assert m["status"] == "complete"
            for f in m["outputs"]:
                assert (p / f).is_file(), f"{rel}/{f} listed in run.json but missing"
            found[str(rel)] = p
    return found


def assert_unit_equal(got: Path, want: Path) -> None:
    """Two finished units hold the same table and rasters, and the rasters are valid COGs."""
    a, b = pq.read_table(got / "tiles.parquet"), pq.read_table(want / "tiles.parquet")
    assert a.num_rows == b.num_rows and a.equals(b), f"{got.name}: tiles.parquet differs"
    for name in RASTERS:
        with rasterio.open(got / name) as x, rasterio.open(want / name) as y:
            assert x.profile == y.profile
            np.testing.assert_array_equal(x.read(), y.read(), err_msg=f"{got.name}/{name}")
    from rio_cogeo.cogeo import cog_validate

    for name in RASTERS:
        ok, errors, _ = cog_validate(str(got / name), quiet=True)
        assert ok, errors


def container(doc: dict) -> dict:
    """The one container of a Job, Indexed Job or CronJob manifest."""
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    return c


def local_argv(argv: list[str], data: Path) -> list[str]:
    """The container's argv with /data mapped to a local folder and tilescan to this venv's."""
    out = []
    for a in argv:
        a = a.replace("/data", str(data))
        a = a if a != "tilescan" else exe()
        out.append(re.sub(r"(?<![\w/.-])tilescan(?= (run|collect)\b)", exe(), a))
    return out


def start_container(doc: dict, data: Path, **extra_env: str) -> subprocess.Popen:
    """A manifest's container command run here as a process, /data mapped to ``data``."""
    c = container(doc)
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"/data"}
    # the reference run uses batch_helpers.ARGS (128-px tiles in scene pixels): the pods get
    # the same tiling through the environment, as a cluster's config would set it
    e = env(**{**{v["name"]: v["value"] for v in c.get("env", [])}, "TILESCAN_TILING__UNITS": "px", **extra_env})
    return subprocess.Popen(local_argv(c["command"] + c.get("args", []), data), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e)
