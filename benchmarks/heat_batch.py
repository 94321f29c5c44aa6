#!/usr/bin/env python
"""Heat blending: HeatmapWriter.add tile by tile against add_batch, on the host-ceiling geometry.

Run from the project root::

    python benchmarks/heat_batch.py --out benchmarks/results/heat-batch.json
    python benchmarks/heat_batch.py --rounds 3 --rows 2000      # a quicker, smaller run

A 12,246 x 11,160 px scene (the size of the host-ceiling benchmark's scene), 128 px tiles,
heatmap scale 0.25, 4x4 CAMs, all-valid masks with about 5% of tiles partly nodata, fed in
row-major order in batches of 32 and of 128 tiles: (a) stride 128, (b) stride 64. Each round
feeds the whole scene to a fresh writer (finished heat rows written to its scratch file, as in
a run; the COG conversion at the end is the same for both and not timed), the variants
alternated round by round; tiles/s are medians over the rounds. Once per geometry, both
variants' heatmap COGs are written and compared pixel by pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from bench import log, machine, median, versions  # noqa: E402
from tilescan.outputs.heatmap import HeatmapWriter  # noqa: E402

WIDTH, HEIGHT, TILE, SCALE, CAM = 12246, 11160, 128, 0.25, 4
PARTIAL = 0.05  # share of tiles with a partial valid mask
POOL = 8  # distinct batches of masks and CAMs, cycled over the scene


def batches(width: int, height: int, stride: int, batch: int, rng) -> list[tuple]:
    """The scene's tiles in row-major batches: (col_off, row_off, cams, valid) per batch, the
    arrays (CAMs, masks) taken from a small pool so the scene's masks need not all fit."""
    rows, cols = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij")
    c0, r0 = cols.ravel(), rows.ravel()
    pool = []
    for _ in range(POOL):
        cams = rng.uniform(0, 1, (batch, CAM, CAM)).astype(np.float32)
        valid = np.ones((batch, TILE, TILE), bool)
        for j in np.flatnonzero(rng.uniform(size=batch) < PARTIAL):
            valid[j] = rng.uniform(size=(TILE, TILE)) > 0.3  # scattered nodata
            valid[j, :, rng.integers(1, TILE):] = False  # and an edge of nodata
        pool.append((cams, valid))
    out = []
    for k, s in enumerate(range(0, len(c0), batch)):
        cams, valid = pool[k % POOL]
        n = min(batch, len(c0) - s)
        out.append((c0[s:s + n], r0[s:s + n], cams[:n], valid[:n]))
    return out


def writer(folder: Path, name: str, width: int, height: int, stride: int) -> HeatmapWriter:
    return HeatmapWriter(folder / name, width, height, from_origin(500000.0, 4000000.0, 1.0, 1.0),
                         "EPSG:32633", SCALE, TILE, stride)


def per_tile(hw: HeatmapWriter, data: list[tuple]) -> None:
    """What the pipeline's writer thread does today: add() per tile, Python int windows."""
    for c0, r0, cams, valid in data:
        for j, (c, r) in enumerate(zip(c0.tolist(), r0.tolist())):
            hw.add((c, r, TILE, TILE), cams[j], valid[j])


def batched(hw: HeatmapWriter, data: list[tuple]) -> None:
    for c0, r0, cams, valid in data:
        hw.add_batch(c0, r0, TILE, cams, valid)


def feed_rate(folder: Path, fn: Callable, data: list[tuple], width: int, height: int, stride: int) -> float:
    """Tiles/s of feeding the whole scene to a fresh writer (its scratch file dropped after)."""
    n = sum(len(b[0]) for b in data)
    hw = writer(folder, "heat.tif", width, height, stride)
    try:
        t0 = time.perf_counter()
        fn(hw, data)
        hw.finish_rows(height)  # the last rows' write, as finish() would
        return n / (time.perf_counter() - t0)
    finally:
        hw.abort()


def same_heat(folder: Path, data: list[tuple], width: int, height: int, stride: int) -> dict[str, Any]:
    """Both variants' COGs, compared: how many pixels differ and by how much at most."""
    got = {}
    for key, fn in (("add", per_tile), ("add_batch", batched)):
        with writer(folder, f"{key}.tif", width, height, stride) as hw:
            fn(hw, data)
        with rasterio.open(folder / f"{key}.tif") as src:
            got[key] = src.read(1)
    a, b = got["add"], got["add_batch"]
    return {"pixels": int(a.size), "bit_identical": bool(np.array_equal(a.view(np.uint32), b.view(np.uint32))),
            "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternated rounds per geometry (default 5)")
    ap.add_argument("--rows", type=int, default=HEIGHT, help=f"scene height in px (default {HEIGHT})")
    ap.add_argument("--strides", default="128,64", help="strides to run (default 128,64)")
    ap.add_argument("--batches", default="32,128", help="batch sizes (default 32,128)")
    ap.add_argument("--out", type=Path, help="write every number here (JSON)")
    args = ap.parse_args(argv)
    width, height = WIDTH, args.rows
    res: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                           "machine": machine(), "versions": versions(),
                           "scene": [width, height], "tile": TILE, "scale": SCALE, "cam": [CAM, CAM],
                           "partial_share": PARTIAL, "rounds": args.rounds, "geometries": {}}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="heat-batch-") as tmp:
        folder = Path(tmp)
        for stride in [int(s) for s in args.strides.split(",")]:
            for batch in [int(b) for b in args.batches.split(",")]:
                data = batches(width, height, stride, batch, rng)
                n = sum(len(b[0]) for b in data)
                name = f"stride{stride}-batch{batch}"
                log(f"{name}: {n} tiles, {args.rounds} rounds")
                runners = {"add": per_tile, "add_batch": batched}
                for fn in runners.values():  # warm-up: caches, first file writes
                    feed_rate(folder, fn, data[: max(1, len(data) // 10)], width, height, stride)
                rates: dict[str, list[float]] = {k: [] for k in runners}
                for _ in range(args.rounds):
                    for key, fn in runners.items():
                        rates[key].append(feed_rate(folder, fn, data, width, height, stride))
                med = {k: median(v) for k, v in rates.items()}
                g = {"stride": stride, "batch": batch, "tiles": n, "tiles_per_s": rates,
                     "median_tiles_per_s": med, "speedup": med["add_batch"] / med["add"],
                     "same_heat": same_heat(folder, data, width, height, stride)}
                res["geometries"][name] = g
                log(f"  add {med['add']:.0f} tiles/s, add_batch {med['add_batch']:.0f} tiles/s: "
                    f"{g['speedup']:.2f}x; same heat: {g['same_heat']}")
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
