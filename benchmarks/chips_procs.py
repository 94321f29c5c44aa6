#!/usr/bin/env python
"""Many small scenes in one ``tilescan run`` process, or in several that share the machine.

Run from the project root::

    python benchmarks/chips_procs.py --procs 1,4 --out benchmarks/results/chips-procs.json

``--chips`` scenes of 512 x 512 px (16 tiles each, cut from the real Landsat scene as
``pipeline.py small`` cuts them) go through the real ``tilescan`` command: once in one
process, then in P processes at once, each its shard ``--shard k/P`` of the same folder (as
P array tasks on one node would run). A process's own work on a small scene (opening it,
the per-scene bookkeeping, writing ten files) holds Python's GIL for part of its time, so one
process can feed a GPU only so many scenes a second whatever its cores; several processes
each bring their own. Reported for each P: the whole wall time (start-up included), the
tiles a second over it, and over the time from the last process's engine being ready to the
last one's end (``report*.json``: the scenes' part, start-up left out). On a CPU the model
needs every core, so there P > 1 only shares them; the question is for a GPU host, where
``benchmarks/gpu/readers.sh`` runs it. The run's settings come from the environment
(``TILESCAN_INFERENCE__BATCH_SIZE``, ``TILESCAN_OUTPUT__GPKG`` ...), as ``tilescan run`` takes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench  # noqa: E402
import pipeline  # noqa: E402  (the chips cut as ``small`` cuts them)


def _one(chips: Path, out: Path, procs: int) -> dict:
    """The folder through ``procs`` concurrent ``tilescan run`` processes, one shard each."""
    shutil.rmtree(out, ignore_errors=True)
    cmds = [[*bench.tilescan_cmd(), "-q", "run", str(chips), "-o", str(out), "--bands", "3,2,1", "--no-progress",
             *([] if procs == 1 else ["--shard", f"{k}/{procs}"])] for k in range(procs)]
    t0 = time.monotonic()
    running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    ends = []
    for p in running:
        _, err = p.communicate()
        ends.append(time.monotonic() - t0)
        if p.returncode != 0:
            raise SystemExit(f"tilescan run failed ({p.returncode}):\n{err.decode()[-2000:]}")
    wall = max(ends)
    reports = [json.loads(f.read_text()) for f in sorted(out.glob("report*.json"))]
    tiles = sum(r["counts"]["tiles_classified"] for rep in reports for r in rep["done"])
    # each process's engine ready, from its own start (the processes start within milliseconds)
    ready = [max(s.get("engine_ready_s") or 0.0 for s in rep["timings_s"]["streams"]) for rep in reports]
    scenes_s = wall - max(ready)
    shutil.rmtree(out, ignore_errors=True)
    return {"procs": procs, "tiles": tiles, "wall_s": round(wall, 2), "tiles_per_s_wall": round(tiles / wall, 1),
            "engine_ready_s": [round(r, 2) for r in ready], "after_ready_s": round(scenes_s, 2),
            "tiles_per_s_after_ready": round(tiles / scenes_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chips", type=int, default=160, help="scenes of 512 px (default 160)")
    ap.add_argument("--procs", default="1,4", help="process counts to compare, comma-separated (default 1,4)")
    ap.add_argument("--rounds", type=int, default=1, help="times each count runs, alternated")
    ap.add_argument("--work", type=Path, help="folder for the chips and outputs (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    counts = [int(p) for p in args.procs.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="tilescan-chips-"))
    chips = work / f"chips-{args.chips}"
    if len(list(chips.glob("chip-*.tif"))) != args.chips:
        shutil.rmtree(chips, ignore_errors=True)
        pipeline._small_scenes(chips, n=args.chips)
    runs: dict[int, list[dict]] = {p: [] for p in counts}
    for r in range(args.rounds):
        for p in counts:
            got = _one(chips, work / f"out-{p}", p)
            runs[p].append(got)
            bench.log(f"chips_procs: {p} process(es), round {r + 1}: {got['tiles_per_s_wall']} tiles/s over the wall, "
                      f"{got['tiles_per_s_after_ready']} after the engines were ready")
    med = {p: {k: median(g[k] for g in rs) for k in ("tiles_per_s_wall", "tiles_per_s_after_ready")}
           for p, rs in runs.items()}
    for p in counts:  # each count's rate after the engines were ready, against the first count's
        med[p][f"after_ready_ratio_to_{counts[0]}"] = round(med[p]["tiles_per_s_after_ready"]
                                                           / med[counts[0]]["tiles_per_s_after_ready"], 3)
    res = {"benchmark": "chips_procs", "command": "python benchmarks/chips_procs.py " + " ".join(sys.argv[1:]),
           "machine": bench.machine(), "chips": args.chips, "chip_px": 512, "by_procs": med, "runs": runs}
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    bench.report(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
