#!/usr/bin/env python
"""Empty areas cost nothing: a sparse scene against its island alone (issue 17).

Run from the project root::

    python benchmarks/sparse.py --out benchmarks/results/sparse-cpu-2core.json
    python benchmarks/sparse.py --baseline ../main          # also the code before, for "today"
    python benchmarks/sparse.py --baseline ../main --baseline-frame   # + the slow 50k run today
    python benchmarks/sparse.py --baseline ../main --baseline-rounds  # the frame on both codes, each round

It builds, in a temporary folder (``--scenes DIR`` keeps them), 50,000 x 50,000 px GeoTIFFs
(tiled 512, deflate, nodata 0, written sparse: a few MB on disk) holding the real NAIP scene
``opengeos-naip/m_4709963_se_14_1_20100629.tif`` (934 x 723 px) once, at a tile-aligned
offset and at a non-aligned one, then times ``tilescan run`` (fresh processes, all outputs,
the packaged model, 128 px tiles) on the island alone and on both frames, alternating round
by round, and checks that the aligned frame gives the island's rows and labels. Real scenes
with a nodata collar (``rasterio/RGB.byte.tif``, ``rio-tiler/mosaic_cog1.tif``) are timed
the same way; with ``--baseline DIR`` (a checkout of the code to compare with) they run on
both codes, alternated, and their outputs are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import rasterio  # noqa: E402
from affine import Affine  # noqa: E402
from rasterio.windows import Window  # noqa: E402

from bench import DATA, log, machine, median, versions  # noqa: E402
from tilescan.outputs.cog import HEATMAP_NODATA  # noqa: E402

NAIP = DATA / "scenes" / "opengeos-naip" / "m_4709963_se_14_1_20100629.tif"
COLLARS = {"RGB.byte": DATA / "scenes" / "rasterio" / "RGB.byte.tif",
           "mosaic_cog1": DATA / "scenes" / "rio-tiler" / "mosaic_cog1.tif"}
TILE = 128

def offsets(size: int) -> dict[str, tuple[int, int]]:
    """Island origins (col, row): ``aligned`` on multiples of the tile size, ``shifted`` on
    neither tiles nor 512 px blocks ((20077, 30211) in a 50,000 px frame)."""
    col, row = round(0.4 * size / TILE) * TILE, round(0.6 * size / TILE) * TILE
    return {"aligned": (col, row), "shifted": (col + 109, row + 259)}

ROW_COLS = ["row", "col", "col_off", "row_off", "class_index", "label", "confidence", "valid_fraction"]


def build_frame(path: Path, size: int, offset: tuple[int, int]) -> Path:
    """The NAIP scene at ``offset`` in a ``size``-square sparse frame, georeferenced so its
    pixels keep their map position."""
    if path.exists():
        return path
    with rasterio.open(NAIP) as src:
        arr, tf, crs = src.read(), src.transform, src.crs
    tmp = path.with_suffix(".part.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=size, height=size, count=arr.shape[0], dtype=arr.dtype.name,
                       crs=crs, transform=tf @ Affine.translation(-offset[0], -offset[1]), nodata=0, tiled=True,
                       blockxsize=512, blockysize=512, compress="deflate", sparse_ok=True, bigtiff="IF_SAFER") as dst:
        dst.write(arr, window=Window(offset[0], offset[1], arr.shape[2], arr.shape[1]))
    os.replace(tmp, path)
    return path


def run(scene: Path, work: Path, code: Path, keep: bool = False) -> dict[str, Any]:
    """``tilescan run SCENE`` in a fresh process with ``code`` first on the path: wall time
    and the run.json of the scene (the outputs folder is kept with ``keep``)."""
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, "-m", "tilescan.cli", "-q", "run", str(scene), "-o", str(out),
           "--tile-size", str(TILE), "--no-progress"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)  # -m puts the cwd first
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    folder = out / scene.stem
    man = json.loads((folder / "run.json").read_text())
    got = {"wall_s": round(wall, 2), "scene_s": man["timings_s"]["total"], "timings_s": man["timings_s"],
           "counts": {k: v for k, v in man["counts"].items() if k != "per_class"},
           "reads": man.get("reads"), "coverage": man["scene_info"].get("coverage"),
           "output_bytes": {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}}
    if keep:
        got["dir"] = str(folder)
    else:
        shutil.rmtree(out, ignore_errors=True)
    return got


def outputs(folder: str) -> dict[str, Any]:
    d = Path(folder)
    with rasterio.open(d / "labels.tif") as L, rasterio.open(d / "heatmap.tif") as H:
        return {"table": pq.read_table(d / "tiles.parquet"), "labels": L.read(1), "heat": H.read(1)}


def same_island(island: dict, frame: dict, offset: tuple[int, int]) -> dict[str, Any]:
    """Rows and labels of the island alone against those of the frame (shifted back)."""
    a = outputs(island["dir"])
    b = outputs(frame["dir"])
    dr, dc = offset[1] // TILE, offset[0] // TILE
    ta = a["table"].select(ROW_COLS).to_pandas().sort_values(["row", "col"]).reset_index(drop=True)
    tb = b["table"].select(ROW_COLS).to_pandas().sort_values(["row", "col"]).reset_index(drop=True)
    shift = {"row": dr, "col": dc, "row_off": offset[1], "col_off": offset[0]}
    same = len(ta) == len(tb) and all(
        np.array_equal(ta[c].to_numpy(), tb[c].to_numpy() - shift[c] if c in shift else tb[c].to_numpy())
        for c in ROW_COLS)
    h, w = a["labels"].shape
    rest = b["labels"].copy()
    rest[dr:dr + h, dc:dc + w] = 255
    return {"rows": len(ta), "rows_identical": bool(same),
            "labels_identical": bool((b["labels"][dr:dr + h, dc:dc + w] == a["labels"]).all() and (rest == 255).all())}


def heat_levels(folder: str) -> list[np.ndarray]:
    """The heatmap COG's overview levels, each read whole."""
    path = Path(folder) / "heatmap.tif"
    with rasterio.open(path) as ds:
        n = len(ds.overviews(1))
    levels = []
    for k in range(n):
        with rasterio.open(path, OVERVIEW_LEVEL=k) as ds:
            levels.append(ds.read(1))
    return levels


def same_outputs(x: dict, y: dict) -> dict[str, Any]:
    a, b = outputs(x["dir"]), outputs(y["dir"])
    la, lb = heat_levels(x["dir"]), heat_levels(y["dir"])
    same_nodata = len(la) == len(lb) and all(
        p.shape == q.shape and np.array_equal(p == HEATMAP_NODATA, q == HEATMAP_NODATA) for p, q in zip(la, lb))
    return {"rows": bool(a["table"].equals(b["table"])), "labels": bool((a["labels"] == b["labels"]).all()),
            "heatmap": bool(np.array_equal(a["heat"], b["heat"])),
            "heat_overviews": len(la), "heat_overviews_nodata_same": bool(same_nodata),
            "heat_overviews_max_diff": float(max((np.abs(p - q).max() for p, q in zip(la, lb)), default=0.0))
            if same_nodata else None}


def summary(runs: list[dict]) -> dict[str, Any]:
    return {"wall_s": median([r["wall_s"] for r in runs]), "scene_s": median([r["scene_s"] for r in runs]),
            "walls": [r["wall_s"] for r in runs], "last": {k: v for k, v in runs[-1].items() if k != "dir"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=50_000, help="frame edge in pixels")
    ap.add_argument("--scenes", type=Path, help="keep the built frames here (reused when present)")
    ap.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (its tilescan/ is run)")
    ap.add_argument("--baseline-frame", action="store_true", help="also run the baseline on the non-aligned frame once")
    ap.add_argument("--baseline-rounds", action="store_true",
                    help="run the baseline on the non-aligned frame in every round too, alternated, "
                         "and compare outputs")
    ap.add_argument("--out", type=Path, help="write every number here (JSON)")
    args = ap.parse_args(argv)
    if not NAIP.exists():
        print(f"real data not found: {NAIP} (set TILESCAN_DATA)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tilescan-sparse-"))
    scenes = args.scenes or tmp / "scenes"
    scenes.mkdir(parents=True, exist_ok=True)
    work = tmp / "work"
    work.mkdir()
    res: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                           "versions": versions(), "size": args.size, "tile": TILE, "rounds": args.rounds}
    try:
        t0 = time.perf_counter()
        where = offsets(args.size)
        frames = {k: build_frame(scenes / f"naip-frame{args.size}-{k}.tif", args.size, off) for k, off in where.items()}
        res["frames"] = {k: {"offset": list(where[k]), "bytes": p.stat().st_size} for k, p in frames.items()}
        log(f"frames built in {time.perf_counter() - t0:.1f} s: {res['frames']}")

        # the island alone against its frames, alternated
        runs: dict[str, list] = {"island": [], "aligned": [], "shifted": []}
        both = bool(args.baseline and args.baseline_rounds)
        if both:
            runs["shifted_baseline"] = []
        for k in range(args.rounds):
            last = k == args.rounds - 1
            runs["island"].append(run(NAIP, work, REPO, keep=last))
            runs["aligned"].append(run(frames["aligned"], work, REPO, keep=last))
            runs["shifted"].append(run(frames["shifted"], work, REPO, keep=last and both))
            if both:
                runs["shifted_baseline"].append(run(frames["shifted"], work, args.baseline, keep=last))
            log(f"round {k + 1}: " + ", ".join(f"{n} {r[-1]['wall_s']} s" for n, r in runs.items()))
        sparse = {n: summary(r) for n, r in runs.items()}
        sparse["aligned_vs_island"] = same_island(runs["island"][-1], runs["aligned"][-1], where["aligned"])
        if both:
            sparse["shifted_vs_baseline"] = same_outputs(runs["shifted"][-1], runs["shifted_baseline"][-1])
        for n in [k for k in runs if k != "island"]:
            sparse[f"{n}_over_island_wall"] = round(sparse[n]["wall_s"] / sparse["island"]["wall_s"], 3)
            sparse[f"{n}_over_island_scene"] = round(sparse[n]["scene_s"] / sparse["island"]["scene_s"], 3)
        if args.baseline and args.baseline_frame:
            sparse["shifted_baseline"] = run(frames["shifted"], work, args.baseline)
            log(f"baseline on the shifted frame: {sparse['shifted_baseline']['wall_s']} s")
        res["sparse"] = sparse

        # real scenes with a nodata collar
        collar: dict[str, Any] = {}
        for name, path in COLLARS.items():
            codes = {"now": REPO, **({"baseline": args.baseline} if args.baseline else {})}
            got: dict[str, list] = {c: [] for c in codes}
            for k in range(args.rounds):
                for c, code in codes.items():
                    got[c].append(run(path, work, code, keep=k == args.rounds - 1))
            entry = {c: summary(r) for c, r in got.items()}
            if args.baseline:
                entry["identical"] = same_outputs(got["now"][-1], got["baseline"][-1])
                entry["scene_s_saved"] = round(entry["baseline"]["scene_s"] - entry["now"]["scene_s"], 3)
            collar[name] = entry
            log(f"{name}: " + ", ".join(f"{c} {e['wall_s']} s wall, {e['scene_s']} s scene" for c, e in entry.items()
                                       if isinstance(e, dict) and "wall_s" in e))
        res["collar"] = collar
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
