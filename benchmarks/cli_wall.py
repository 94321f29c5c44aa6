#!/usr/bin/env python
"""The whole ``tilescan run`` command as a user waits for it: start-up, the run, and the exit.

Run from the project root::

    python benchmarks/cli_wall.py --repo /path/to/older/checkout --repo . --pairs 3 \\
        --out benchmarks/results/cli-wall.json

Fresh ``python -m tilescan run ... -q`` processes (the command as installed runs it, with
tilescan imported from each ``--repo`` in turn), alternated, on two inputs: one NAIP scene
(42 tiles, the README's quick start) and 40 chips of 512 x 512 px cut from the real Landsat
scene (``pipeline.py small``'s). Per process: the wall time from its start to its exit, the
run's own time (``report.json``: ``wall``, ``engine_ready_s``), the time from the model's
step being ready to the first batch's results, the scenes' own seconds, and the time from the
report being written to the process's end (the exit). ``--inputs`` adds the Landsat scene in
128 px tiles (240 tiles); ``--env`` sets a variable for every run (e.g. the GPU's pipeline).
With several checkouts each pair's ratio of wall times to the first checkout's is reported:
this shared machine's speed drifts, so only ratios measured side by side carry. One run of
each checkout comes first and is not counted (``--warmup``): the first import of a checkout
compiles its modules.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402

NAIP = bench.DATA / "scenes" / "opengeos-naip" / "m_4709963_se_14_1_20190904.tif"


def _once(repo: Path, args: list[str], out: Path, extra_env: dict | None = None) -> dict:
    """One ``python -m tilescan run`` with tilescan from ``repo``; its times."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": str(repo)}
    t0 = time.time()
    # run from the work folder: from the project root, its own tilescan would be imported first
    p = subprocess.run([sys.executable, "-m", "tilescan", "run", *args, "-o", str(out), "-q"], env=env,
                       cwd=out.parent, capture_output=True, text=True)
    t1 = time.time()
    if p.returncode:
        raise SystemExit(f"tilescan from {repo} exited {p.returncode}:\n{p.stderr[-3000:]}")
    report = out / "report.json"
    rep = json.loads(report.read_text())
    timings, stream = rep["timings_s"], rep["timings_s"]["streams"][0]
    got = {"wall_s": round(t1 - t0, 3), "run_s": timings["wall"],
           "engine_ready_s": stream["engine_ready_s"],
           # from the step's readiness to the first batch's results, and the scenes' own seconds
           "ready_to_first_batch_s": round(stream["first_batch_s"] - stream["engine_ready_s"], 3),
           "scenes_s": round(sum(r["seconds"] for r in rep["done"]), 3),
           "after_report_s": round(t1 - report.stat().st_mtime, 3)}
    shutil.rmtree(out, ignore_errors=True)
    return got


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", type=Path,
                    help="a tilescan checkout to run (repeat to compare; default: this one)")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each checkout per input, alternated")
    ap.add_argument("--warmup", type=int, default=1,
                    help="runs of each checkout first, not counted (Python compiles a fresh checkout's modules)")
    ap.add_argument("--inputs", default="naip-scene,40-chips",
                    help="comma-separated, of naip-scene, 40-chips and landsat (the Landsat scene in 128 px tiles)")
    ap.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                    help="set for every run, e.g. TILESCAN_INFERENCE__PIPELINE=overlap (a GPU's pipeline)")
    ap.add_argument("--work", type=Path, help="folder for the chips and outputs (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not NAIP.exists():
        raise SystemExit(f"needs the real data: {NAIP} is missing")
    import pipeline

    repos = [r.resolve() for r in (args.repo or [HERE.parent])]
    work = args.work or Path(tempfile.mkdtemp(prefix="tilescan-cliwall-"))
    chips = work / "chips"
    if len(list(chips.glob("chip-*.tif"))) != 40:
        shutil.rmtree(chips, ignore_errors=True)
        pipeline._small_scenes(chips)
    every = {"naip-scene": [str(NAIP)], "40-chips": [str(chips), "--bands", "3,2,1", "--units", "px"],
             "landsat": [str(bench.LANDSAT), "--bands", "3,2,1", "--units", "px", "--tile-size", "128"]}
    inputs = {name: every[name] for name in args.inputs.split(",")}
    extra_env = dict(e.split("=", 1) for e in args.env)
    runs: dict[str, dict[str, list[dict]]] = {name: {str(r): [] for r in repos} for name in inputs}
    for _ in range(args.warmup):
        for repo in repos:
            _once(repo, next(iter(inputs.values())), work / "out", extra_env)
    for pair in range(args.pairs):
        for name, run_args in inputs.items():
            for repo in repos:
                got = _once(repo, run_args, work / "out", extra_env)
                runs[name][str(repo)].append(got)
                bench.log(f"cli_wall: {name}, pair {pair + 1}, {repo}: {got}")
    summary: dict = {}
    for name, by_repo in runs.items():
        first = by_repo[str(repos[0])]
        summary[name] = {
            repo: {**{k: round(median(g[k] for g in got), 3) for k in got[0]},
                   **({"wall_ratio_to_first": [round(g["wall_s"] / f["wall_s"], 3) for g, f in zip(got, first)]}
                      if repo != str(repos[0]) else {})}
            for repo, got in by_repo.items()}
    bench.report({"command": "python benchmarks/cli_wall.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": bench.machine(), "pairs": args.pairs, "summary": summary, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
