#!/usr/bin/env python
"""Chips by the thousand: a run's cost per scene as their number grows, and ``tilescan collect`` over them.

Run from the project root::

    python benchmarks/many_chips.py [--counts 200,2000] [--size 128] [--out benchmarks/results/many-chips.json]
    python benchmarks/many_chips.py --repo OLD_CHECKOUT --repo . [--pairs 2]   # collect side by side

Chips of ``--size`` px cut from the real Landsat scene (``pipeline.py``'s chips: tiled, LZW;
one tile each at 128 px, run at 128 px tiles). For each count, the no-op run of
``pipeline.py`` (the model step replaced, everything else real: every output of every chip)
in a fresh process pinned to one core: scenes/s, the process's CPU per scene, its peak RSS,
and the size of ``report.json`` (rewritten as each scene ends). A cost per scene that grew with the count
would show as the larger count's figures falling behind the smaller's. Then ``tilescan
collect`` of the largest count's output, the real command in a fresh process (start-up
included), timed ``--pairs`` times per checkout (with several ``--repo``, each checkout's own
tilescan, alternated), and the collected tables compared with the first checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
import pipeline  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def _collect(repo: Path, out: Path) -> dict:
    """``tilescan collect -q OUT`` with ``repo``'s tilescan, in a fresh process run from outside it."""
    shutil.rmtree(out / "collected", ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tilescan", "collect", "-q", str(out)], check=True, cwd=out.parent,
                   env={**os.environ, "PYTHONPATH": str(repo)})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="200,2000", help="numbers of chips to run, comma-separated")
    ap.add_argument("--size", type=int, default=128, help="chip size in px")
    ap.add_argument("--repo", action="append", type=Path, help="a checkout whose collect to time (repeat to compare)")
    ap.add_argument("--pairs", type=int, default=2, help="collect runs of each checkout, alternated")
    ap.add_argument("--work", type=Path, help="folder for chips and outputs (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    counts = sorted(int(c) for c in args.counts.split(","))
    repos = [r.resolve() for r in (args.repo or [HERE.parent])]
    work = args.work or Path(tempfile.mkdtemp(prefix="tilescan-manychips-"))
    chips = pipeline._small_scenes(work / "chips", n=counts[-1], size=args.size)
    runs = {}
    for n in counts:
        folder, out = work / f"run-{n}", work / f"out-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        folder.mkdir(parents=True)
        for p in chips[:n]:
            (folder / p.name).symlink_to(p)
        got = pipeline._taskset("1", folder, out, "overlap", "1")
        runs[n] = {"scenes_per_s": got["scenes_per_s"],
                   "cpu_ms_per_scene": round(sum(got["cpu_ms_per_tile"].values()) * got["tiles"] / n, 2),
                   "peak_rss_mib": got["peak_rss_mib"], "report_json_kb": round((out / "report.json").stat().st_size / 1024)}
        bench.log(f"many_chips: {n} chips of {args.size} px: {runs[n]}")
    out = work / f"out-{counts[-1]}"
    collect: dict[str, list[dict]] = {str(r): [] for r in repos}
    tables = {}  # each checkout's collected table, from its first collect
    for k in range(args.pairs):
        for repo in pipeline._in_turn(repos, k):
            collect[str(repo)].append(_collect(repo, out))
            bench.log(f"many_chips: collect with {repo}: {collect[str(repo)][-1]}")
            tables.setdefault(str(repo), pq.read_table(out / "collected" / "tiles.parquet"))
    same = {r: t.equals(tables[str(repos[0])], check_metadata=True) for r, t in tables.items() if r != str(repos[0])}
    result = {"command": "python benchmarks/many_chips.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": bench.machine(), "chip_px": args.size, "runs_one_core": runs,
              "collect_chips": counts[-1],
              "collect_wall_s": {r: median(g["wall_s"] for g in gs) for r, gs in collect.items()},
              "collect": collect, **({"collected_table_equal_to_first": same} if len(repos) > 1 else {})}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
