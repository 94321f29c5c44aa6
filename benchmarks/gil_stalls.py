#!/usr/bin/env python
"""How long a large scene's table writers keep the run's other threads from Python's GIL.

    python benchmarks/gil_stalls.py --repo OLD_CHECKOUT --repo . [--rows 8352] [--rounds 4] [--out results/X.json]

A thread that wakes every millisecond (as one feeding a GPU waits on it) runs beside each of
tilescan's writers of a ``--rows`` tile table (``table_formats.synthetic_table``: 30 classes,
the 12k mosaic's 8,352 tiles by default): the GeoPackage (``TileTable.write_gpkg``) and the
GeoParquet (``write_geoparquet``), each once first untimed (imports and GDAL's set-up, which a
run pays once). Each checkout runs in a fresh process on 2 cores,
checkouts alternated round by round; each write gives its wall time, that thread's longest
wait for the GIL, and its waits past Python's 5 ms switch interval (time one call held the
GIL throughout), medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]

#: Child-script source: a thread that wakes every millisecond (as one feeding a GPU waits on
#: it), and ``waits(a, b)``: its longest wait for the GIL between perf_counter times ``a`` and
#: ``b``, and its waits past Python's 5 ms switch interval (one call holding the GIL throughout).
WAKER = r"""
import threading, time
_wakes = []
def _wake():
    while True:
        t = time.perf_counter()
        time.sleep(0.001)
        now = time.perf_counter()
        _wakes.append((now, now - t - 0.001))
threading.Thread(target=_wake, daemon=True).start()
time.sleep(0.2)
def waits(a, b):
    late = [w for t, w in _wakes if a <= t < b]
    return max(late, default=0.0), sum(w for w in late if w > 0.005)
"""

_CHILD = r"""
import json, sys, time
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import tilescan.outputs.table  # the checkout's, before table_formats puts this project's first on the path
from table_formats import synthetic_table
assert tilescan.__file__.startswith(sys.argv[1]), tilescan.__file__
classes = [f"class_{k}" for k in range(30)]
table = synthetic_table(int(sys.argv[4]), classes)
""" + WAKER + r"""
out, got = sys.argv[3], {}
for name, write in (("gpkg", lambda p: table.write_gpkg(p, "EPSG:32633", classes, "scene.tif", "model")),
                    ("parquet", lambda p: table.write_geoparquet(p, "EPSG:32633", classes, "scene.tif", "model"))):
    write(f"{out}/warm.{name}")  # imports and GDAL's first set-up, once per run: not timed
    a = time.perf_counter()
    write(f"{out}/t.{name}")
    b = time.perf_counter()
    longest, past = waits(a, b)
    got[name] = {"s": b - a, "longest_wait_s": longest, "waits_past_5ms_s": past}
print(json.dumps(got))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", required=True, help="a checkout (twice or more: side by side)")
    ap.add_argument("--rows", type=int, default=8352)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(REPO / "benchmarks")]
    import bench

    repos = [str(Path(r).resolve()) for r in args.repo]
    runs: dict[str, list[dict]] = {r: [] for r in repos}
    with tempfile.TemporaryDirectory(prefix="tilescan-gilstalls-") as work:
        for k in range(args.rounds):
            for repo in repos if k % 2 == 0 else repos[::-1]:
                got = subprocess.run(["taskset", "-c", "0,1", sys.executable, "-c", _CHILD, repo,
                                      str(REPO / "benchmarks"), work, str(args.rows)],
                                     capture_output=True, text=True, check=True)
                runs[repo].append(json.loads(got.stdout.strip().splitlines()[-1]))
                print(repo, runs[repo][-1], flush=True)
    res = {"benchmark": "gil-stalls", "command": "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": bench.machine(), "rows": args.rows,
           "rounds": args.rounds, "checkouts": {}}
    for repo, rs in runs.items():
        res["checkouts"][repo] = {w: {key: round(median(r[w][key] for r in rs), 4) for key in rs[0][w]}
                                  for w in rs[0]} | {"runs": rs}
    print(json.dumps({r: {w: v for w, v in x.items() if w != "runs"} for r, x in res["checkouts"].items()}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
