#!/usr/bin/env python
"""Where the host CPU of many small scenes goes, and two checkouts side by side.

Run from the project root::

    python benchmarks/scene_cpu.py --out benchmarks/results/scene-cpu.json
    python benchmarks/scene_cpu.py --repo /path/to/older/checkout --repo . --pairs 5
    python benchmarks/scene_cpu.py --cpus 0 --cpus 0,1 --pairs 4

A real ``tilescan run`` of 160 chips of 512 x 512 px (cut from the real Landsat scene, as
``pipeline.py small-host`` makes them) with the model step replaced by a no-op
(``pipeline.NoopEngine``), in a fresh process pinned to one core (or to the ``--cpus``
given), writers on the run's threads (``output_workers = 0``). Reported per run: the
process's CPU per scene, scenes/s, and the CPU per scene of each step (``time.thread_time``
around it, on whichever thread runs it: the opener, readers, writer, finisher and tail
threads). The CPU of the GeoPackage index helper process is counted with the run's
(``helper_cpu_ms_per_scene``). With several ``--repo``, runs of each checkout alternate
(each imports tilescan and ``benchmarks/pipeline.py`` from its own checkout), and each
pair's ratio of CPU per scene to the first checkout's is reported: this shared machine's
speed drifts, so only ratios measured side by side carry. With several ``--cpus`` (CPU lists
as ``taskset`` takes them), each checkout runs on each list in turn: the same work with its
threads on one core or on two. Each run also reports its user and system CPU, context
switches and minor page faults per scene.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent

#: step -> (module, attribute path) timed in the child; steps a checkout lacks are skipped.
STEPS = {
    "open scene": ("tilescan.pipeline.process", "UnitJob.open"),
    "read tiles": ("tilescan.pipeline.process", "UnitJob.read"),
    "rows and heat": ("tilescan.pipeline.process", "UnitJob.consume"),
    "GeoParquet": ("tilescan.outputs.table", "TileTable.write_geoparquet"),
    "GeoPackage": ("tilescan.outputs.table", "TileTable.write_gpkg"),
    "label COG": ("tilescan.pipeline.process", "write_labels_cog"),
    "heatmap COG": ("tilescan.outputs.heatmap", "HeatmapWriter.close"),
    "quicklook": ("tilescan.pipeline.process", "_write_quicklook"),
    "QGIS files": ("tilescan.pipeline.process", "write_scene_files"),
    "run.json": ("tilescan.pipeline.process", "write_json"),
}


def wrap_steps(steps: dict, wrap) -> None:
    """Replace each step's function (``name -> (module, attribute path)``) by ``wrap(name, fn)``
    in this process; a step a checkout lacks is left out."""
    import importlib

    for name, (mod, attr) in steps.items():
        owner = importlib.import_module(mod)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, last):
            setattr(owner, last, wrap(name, getattr(owner, last)))


#: The figures of each run whose medians the summary gives.
_FIGURES = ("cpu_ms_per_scene", "scenes_per_s", "user_ms_per_scene", "system_ms_per_scene", "minor_faults_per_scene")


def _child(repo: Path, chips: Path) -> dict:
    """One timed no-op run of ``chips`` with tilescan from ``repo`` (in this process)."""
    import collections
    import importlib
    import threading

    sys.path[:0] = [str(repo), str(repo / "benchmarks")]
    import pipeline  # noqa: E402  (repo's own: its no-op run)

    spent: collections.Counter = collections.Counter()
    inside = threading.local()  # a step called inside another is counted in the outer one only

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if getattr(inside, "on", False):
                return fn(*args, **kwargs)
            inside.on, t = True, time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.thread_time() - t
                inside.on = False
        return wrapper

    wrap_steps(STEPS, timed)

    importlib.import_module("keras")  # before the clock: its import is start-up, not the scenes' CPU
    out = Path(tempfile.mkdtemp(prefix="tilescan-scenecpu-"))
    def children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    try:
        c0, k0, r0 = time.process_time(), children(), resource.getrusage(resource.RUSAGE_SELF)
        got = pipeline._host_once(chips, out / "o", "overlap", 1)  # the small-host run: one reader, no helpers
        cpu = time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        from tilescan.outputs import gpkg

        gpkg._helper.close()  # the GeoPackage index helper ends: its CPU is counted with the run's
        helper = children() - k0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n = len(list(chips.glob("chip-*.tif")))
    return {"scenes": n, "scenes_per_s": got["scenes_per_s"], "cpu_ms_per_scene": round((cpu + helper) / n * 1e3, 1),
            "helper_cpu_ms_per_scene": round(helper / n * 1e3, 2),
            "user_ms_per_scene": round((r1.ru_utime - r0.ru_utime) / n * 1e3, 1),
            "system_ms_per_scene": round((r1.ru_stime - r0.ru_stime) / n * 1e3, 1),
            "switches_per_scene": {"voluntary": round((r1.ru_nvcsw - r0.ru_nvcsw) / n),
                                   "involuntary": round((r1.ru_nivcsw - r0.ru_nivcsw) / n)},
            "minor_faults_per_scene": round((r1.ru_minflt - r0.ru_minflt) / n),
            "steps_ms_per_scene": {k: round(v / n * 1e3, 2) for k, v in spent.items()}}


def _one(repo: Path, chips: Path, cpus: str = "0") -> dict:
    p = subprocess.run(["taskset", "-c", cpus, sys.executable, __file__, "_child", str(repo), str(chips)],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the run with {repo} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        print(json.dumps(_child(Path(argv[1]).resolve(), Path(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", action="append", type=Path,
                    help="a tilescan checkout to run (repeat to compare; default: this one)")
    ap.add_argument("--cpus", action="append",
                    help="the CPUs a run may use, as taskset takes them (repeat to compare; default: 0)")
    ap.add_argument("--pairs", type=int, default=3, help="runs of each checkout, alternated")
    ap.add_argument("--work", type=Path, help="folder for the chips (default: a temp folder)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    repos = [r.resolve() for r in (args.repo or [HERE.parent])]
    sys.path[:0] = [str(HERE.parent), str(HERE)]
    import bench
    import pipeline

    work = args.work or Path(tempfile.mkdtemp(prefix="tilescan-scenecpu-"))
    chips = work / "chips"
    if len(list(chips.glob("chip-*.tif"))) != pipeline.SMALL_HOST_SCENES:
        shutil.rmtree(chips, ignore_errors=True)
        pipeline._small_scenes(chips, n=pipeline.SMALL_HOST_SCENES)
    cpu_lists = args.cpus or ["0"]
    # a run's key: its checkout, and its CPUs when more than one list is compared
    setups = [(r, c, str(r) if len(cpu_lists) == 1 else f"{r} on cpus {c}") for r in repos for c in cpu_lists]
    runs: dict[str, list[dict]] = {key: [] for _, _, key in setups}
    for k in range(args.pairs):
        for r, c, key in setups:
            got = _one(r, chips, c)
            runs[key].append(got)
            bench.log(f"scene_cpu: {key}, run {k + 1}: {got['cpu_ms_per_scene']} ms of CPU per scene, "
                      f"{got['scenes_per_s']} scenes/s")
    summary = {}
    for r, rs in runs.items():
        steps = sorted({s for g in rs for s in g["steps_ms_per_scene"]})
        summary[r] = {**{f: median(g[f] for g in rs) for f in _FIGURES},
                      "steps_ms_per_scene": {s: round(median(g["steps_ms_per_scene"].get(s, 0.0) for g in rs), 2)
                                             for s in steps}}
    result = {"command": "python benchmarks/scene_cpu.py " + " ".join(argv), "machine": bench.machine(),
              "chips": pipeline.SMALL_HOST_SCENES, "chip_px": 512, "cpus": cpu_lists, "summary": summary, "runs": runs}
    if len(setups) > 1:  # each setup's CPU per scene against the first's, pair by pair
        base = runs[setups[0][2]]
        result["cpu_ratio_to_first"] = {
            key: {"pairs": [round(g["cpu_ms_per_scene"] / b["cpu_ms_per_scene"], 3)
                            for g, b in zip(runs[key], base)]} for _, _, key in setups[1:]}
        for v in result["cpu_ratio_to_first"].values():
            v["median"] = round(median(v["pairs"]), 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
