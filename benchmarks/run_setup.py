#!/usr/bin/env python
"""What ``tilescan.run`` costs before its first scene is opened, in a process that runs many.

Run from the project root::

    python benchmarks/run_setup.py --repo /path/to/older/checkout --repo . --pairs 3 \\
        --out benchmarks/results/run-setup.json

The Python API's loop over chips: one process per checkout (tilescan imported from each
``--repo`` in turn, alternated ``--pairs`` times), the engine made once, then ``--runs`` calls
of ``tilescan.pipeline.run.run`` on one 512 x 512 px chip cut from the real Landsat scene
(``pipeline.py small``'s first), each into an empty folder. Per process, medians over the
calls after the first: the time from the call to the first scene being opened (the run's
own set-up), and the call's wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

# the child: ``python -c CHILD repo chip work runs``; prints its figures as JSON
CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
from statistics import median
repo, chip, work, runs = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, repo)
import tilescan
assert Path(tilescan.__file__).resolve().is_relative_to(Path(repo).resolve()), tilescan.__file__
from tilescan.config import load_config
from tilescan.pipeline import process
from tilescan.pipeline.engine import shared_engine
from tilescan.pipeline.run import run
cfg = load_config(overrides={"tiling": {"units": "px", "bands": [3, 2, 1]}}, environ={})
shared_engine(cfg).ready()
opened = []
real_open = process.UnitJob.open
def timed_open(self):
    if opened[-1] is None:
        opened[-1] = time.perf_counter()
    return real_open(self)
process.UnitJob.open = timed_open
setup, wall = [], []
for i in range(runs + 1):
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    opened.append(None)
    t = time.perf_counter()
    run([chip], out, cfg, log=lambda m: None)
    if i:  # the first call pays the process's one-off costs
        setup.append(opened[-1] - t)
        wall.append(time.perf_counter() - t)
shutil.rmtree(work / "out", ignore_errors=True)
print(json.dumps({"setup_ms": round(median(setup) * 1e3, 2), "wall_ms": round(median(wall) * 1e3, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", action="append", required=True, help="a checkout of tilescan (twice or more)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--runs", type=int, default=12, help="calls of run() per process, after a first one")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from pipeline import _small_scenes

    work = args.work or Path(tempfile.mkdtemp(prefix="tilescan-setup-"))
    chip = _small_scenes(work / "scenes", n=1)[0]
    repos = [str(Path(r).resolve()) for r in args.repo]
    got: dict[str, list[dict]] = {r: [] for r in repos}
    for k in range(args.pairs):
        for repo in (repos if k % 2 == 0 else repos[::-1]):
            p = subprocess.run([sys.executable, "-c", CHILD, repo, str(chip), str(work), str(args.runs)],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{repo}: exited {p.returncode}\n{p.stderr[-3000:]}")
            got[repo].append(json.loads(p.stdout.strip().splitlines()[-1]))
            bench.log(f"run_setup: {repo}, pair {k + 1}: {got[repo][-1]}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    bench.report({"benchmark": "run_setup", "command": "python " + " ".join(sys.argv), "machine": bench.machine(),
                  "runs_per_process": args.runs,
                  "checkouts": {r: {"setup_ms": median(x["setup_ms"] for x in v),
                                    "wall_ms": median(x["wall_ms"] for x in v), "processes": v}
                                for r, v in got.items()}}, args.out)


if __name__ == "__main__":
    main()
