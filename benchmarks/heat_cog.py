#!/usr/bin/env python
"""The heatmap of a large scene: its blending, and the COG written after the last tile.

    python benchmarks/heat_cog.py --repo OLD_CHECKOUT --repo . [--rounds 4] [--out benchmarks/results/heat-cog.json]
    python benchmarks/heat_cog.py --repo OLD_CHECKOUT --repo . --beside   # the GIL it leaves another thread

The heat of the 12,246 x 11,160 px mosaic of ``pipeline.py host`` (8,352 tiles of 128 px,
heatmap scale 0.25: 3,062 x 2,790 heat pixels, three overview levels), each tile's 4 x 4 CAM
taken from the real Landsat scene's pixels (so the heat has a real scene's texture, not noise),
written by each checkout's ``HeatmapWriter`` in a fresh process pinned with ``taskset`` to 1
core and to 2 cores, checkouts alternated round by round: the blending (``add_batch`` in
batches of 256, row by row, as a run calls it, then ``finish()``), the quicklook's heat
``preview(1024)`` (``preview_size=1024`` where the checkout's writer takes it, as a run passes
its quicklook size) and ``close()`` (the COG: its overviews, compression, the atomic move).
With ``--beside`` (2 cores only) a thread beside them wakes every millisecond, as one
feeding a GPU waits on it, and each step also gives how long that thread was kept waiting
for the GIL past Python's switch interval (``*_beside_stalled_s``, and its longest wait):
the time one call held the GIL throughout.
The preview and the COG are what a one-scene run waits for after its last batch (side by
side, each on its thread); the blending runs beside the stream. Each figure: wall seconds
and the calling thread's CPU, medians over rounds.
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
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]

W, H, TILE, SCALE, BATCH = 12246, 11160, 128, 0.25, 256

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from rasterio.transform import from_origin
from tilescan.outputs.heatmap import HeatmapWriter
W, H, TILE, SCALE, BATCH = (int(a) if "." not in a else float(a) for a in sys.argv[3:8])
cams_all = np.load(sys.argv[9])
rows, cols = -(-H // TILE), -(-W // TILE)
r, c = np.divmod(np.arange(rows * cols), cols)
import inspect
kw = {"preview_size": 1024} if "preview_size" in inspect.signature(HeatmapWriter).parameters else {}
beside = sys.argv[10] == "beside"
if beside:  # a thread of the run that waits on something else (as one feeding a GPU): how late it gets the GIL
    exec(sys.argv[11])  # gil_stalls.WAKER: waits(a, b)
marks = []
def mark():
    marks.append((time.perf_counter(), time.thread_time()))
mark()
hw = HeatmapWriter(sys.argv[2], W, H, from_origin(600000.0, 4000000.0, 30.0, 30.0), "EPSG:32621", SCALE, TILE, TILE,
                   **kw)
for s in range(0, len(r), BATCH):
    hw.add_batch(c[s:s + BATCH] * TILE, r[s:s + BATCH] * TILE, TILE, cams_all[s:s + BATCH])
mark()
hw.finish()
mark()
hw.preview(1024)
mark()
hw.close()
mark()
got = {}
for name, (a, b) in zip(("add", "finish", "preview", "close"), zip(marks, marks[1:])):
    got[name + "_s"], got[name + "_cpu_s"] = b[0] - a[0], b[1] - a[1]
    if beside:  # its waits past Python's switch interval (5 ms): the GIL held by one call all along
        got[name + "_beside_longest_s"], got[name + "_beside_stalled_s"] = waits(a[0], b[0])
got["blend_s"], got["blend_cpu_s"] = got["add_s"] + got["finish_s"], got["add_cpu_s"] + got["finish_cpu_s"]
print(json.dumps(got))
"""


def _cams(path: Path) -> None:
    """Each tile's 4 x 4 CAM: the real scene's brightness (bands 3, 2, 1), mirror-tiled to the
    mosaic's tile grid, each tile scaled to a maximum of 1 (as the engine normalises)."""
    import numpy as np
    import rasterio

    import bench

    rows, cols = -(-H // TILE), -(-W // TILE)
    with rasterio.open(bench.LANDSAT) as src:
        img = src.read([3, 2, 1], out_shape=(3, 352, 384)).astype(np.float32).mean(axis=0)
    reps = (-(-rows * 4 // img.shape[0]), -(-cols * 4 // img.shape[1]))
    img = np.tile(np.concatenate([img, img[::-1]], axis=0), (reps[0], reps[1]))[: rows * 4, : cols * 4]
    cams = img.reshape(rows, 4, cols, 4).transpose(0, 2, 1, 3).reshape(rows * cols, 4, 4)
    cams = cams / np.maximum(cams.reshape(len(cams), -1).max(axis=1), 1e-6)[:, None, None]
    np.save(path, cams.astype(np.float32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", required=True, help="a checkout (twice or more: side by side)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--beside", action="store_true",
                    help="a thread running Python beside the heat's (2 cores only): the share of each step it ran")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import bench
    import gil_stalls

    repos = [str(Path(r).resolve()) for r in args.repo]
    if not bench.LANDSAT.exists():
        raise SystemExit(f"the real Landsat scene is missing: {bench.LANDSAT} (set TILESCAN_DATA to shared/data)")
    work = Path(tempfile.mkdtemp(prefix="tilescan-heatcog-"))
    cams = work / "cams.npy"
    _cams(cams)
    core_counts = ("2",) if args.beside else ("1", "2")
    runs: dict[str, dict[str, list[dict]]] = {r: {c: [] for c in core_counts} for r in repos}
    for k in range(args.rounds):
        for cores in core_counts:
            for repo in repos if k % 2 == 0 else repos[::-1]:
                out = work / f"heat-{k}-{cores}.tif"
                cpu = "0" if cores == "1" else "0,1"
                got = subprocess.run(["taskset", "-c", cpu, sys.executable, "-c", _CHILD, repo, str(out), str(W), str(H),
                                      str(TILE), str(SCALE), str(BATCH), "-", str(cams),
                                      "beside" if args.beside and cores == "2" else "-", gil_stalls.WAKER],
                                     capture_output=True, text=True, check=True)
                runs[repo][cores].append(json.loads(got.stdout.strip().splitlines()[-1]))
                os.remove(out)
                print(repo, cores, runs[repo][cores][-1], flush=True)
    res = {"benchmark": "heat-cog", "command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine(),
           "heat_px": [round(W * SCALE), round(H * SCALE)], "tiles": -(-H // TILE) * -(-W // TILE),
           "rounds": args.rounds, "checkouts": {}}
    shutil.rmtree(work, ignore_errors=True)
    for repo in repos:
        res["checkouts"][repo] = {
            cores: {key: round(median(r[key] for r in rs), 3) for key in rs[0]} | {"runs": rs}
            for cores, rs in runs[repo].items()}
    print(json.dumps({r: {c: {k: v for k, v in d.items() if k != "runs"} for c, d in x.items()}
                      for r, x in res["checkouts"].items()}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
