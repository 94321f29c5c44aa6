#!/usr/bin/env python
"""Model + Grad-CAM under a container's CPU limit: tilescan's sizing against TensorFlow's own.

Run from the project root, as root (it makes a cgroup)::

    python benchmarks/cpu_quota.py --out benchmarks/results/cpu-quota.json

A cgroup with a quota of ``--quota`` CPUs (cgroup v1 ``cpu`` controller, or v2), and in it,
alternated, fresh processes that time model + Grad-CAM on ready batches (as ``bench.py``'s
model figure, as many batches at once as the engine computes):

- ``tilescan``: as a run sizes itself there (``usable_cores``: the quota, rounded up; so
  ``model_streams = "auto"`` and TensorFlow's compute threads follow it);
- ``node-of-N``: what TensorFlow and ``model_streams`` would pick on a node of ``--node-cores``
  cores with the same limit: ``TF_NUM_INTRAOP_THREADS = N`` and two model steps.

A node of N cores is simulated on this machine by its thread count only; the quota is real.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402


def _child(n_tiles: int, rounds: int) -> None:
    """In the cgroup: the model step's tiles/s, ``rounds`` times after one warm-up pass."""
    from tilescan.backend import cpu_budget

    cfg = bench.default_config(inference={"model_streams": os.environ.get("STREAMS", "auto")})
    mb = bench.ModelBench(cfg, n_batches=max(1, n_tiles // cfg.inference.batch_size))
    mb.engine.ready()

    def once() -> float:  # the engine's streams at once, as bench.py's model + Grad-CAM figure
        t0 = time.perf_counter()
        return mb.gradcam() / (time.perf_counter() - t0)

    once()
    print(json.dumps({"tiles_per_s": [round(once(), 1) for _ in range(rounds)], "streams": mb.engine.streams,
                      "cpu": cpu_budget(), "tf_intra_op_threads": os.environ.get("TF_NUM_INTRAOP_THREADS")}))


def _cgroup(name: str, quota: float) -> tuple[str, dict[str, str]]:
    v1 = "/sys/fs/cgroup/cpu"
    if os.path.isfile(os.path.join(v1, "cpu.cfs_quota_us")):
        return os.path.join(v1, name), {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(int(quota * 1e5))}
    if os.path.isfile("/sys/fs/cgroup/cgroup.controllers"):
        return os.path.join("/sys/fs/cgroup", name), {"cpu.max": f"{int(quota * 1e5)} 100000"}
    raise SystemExit("no cgroup CPU controller at /sys/fs/cgroup")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quota", type=float, default=1.0, help="CPUs the cgroup allows")
    ap.add_argument("--node-cores", type=int, default=8, help="cores of the node simulated")
    ap.add_argument("--pairs", type=int, default=3, help="alternated processes of each variant")
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.tiles, 3)
    folder, files = _cgroup(f"tilescan-bench-{os.getpid()}", args.quota)
    os.mkdir(folder)
    try:
        for name, value in files.items():
            Path(folder, name).write_text(value)
        base = {k: v for k, v in os.environ.items() if k not in ("TF_NUM_INTRAOP_THREADS", "STREAMS")}
        variants = {"tilescan": {}, f"node-of-{args.node_cores}": {"TF_NUM_INTRAOP_THREADS": str(args.node_cores),
                                                                   "STREAMS": "2"}}
        runs: dict[str, list[dict]] = {k: [] for k in variants}
        code = "import os, runpy, sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid())); " \
               "sys.argv = [sys.argv[2], '--child', '--tiles', sys.argv[3]]; runpy.run_path(sys.argv[0], run_name='__main__')"
        for r in range(args.pairs):
            for name, env in variants.items():
                p = subprocess.run([sys.executable, "-c", code, folder, __file__, str(args.tiles)],
                                   env={**base, "TF_CPP_MIN_LOG_LEVEL": "2", **env}, capture_output=True, text=True,
                                   check=True)
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
                bench.log(f"cpu_quota: pair {r + 1}, {name}: {runs[name][-1]['tiles_per_s']} tiles/s")
    finally:
        os.rmdir(folder)
    rate = {k: median(t for g in v for t in g["tiles_per_s"]) for k, v in runs.items()}
    other = f"node-of-{args.node_cores}"
    bench.report({"benchmark": "cpu-quota", "command": "python " + " ".join(sys.argv), "machine": bench.machine(),
                  "quota_cpus": args.quota, "tiles": args.tiles, "tiles_per_s": rate,
                  "ratio_tilescan_to_node": round(rate["tilescan"] / rate[other], 3), "runs": runs}, args.out)


if __name__ == "__main__":
    main()
