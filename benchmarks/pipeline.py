#!/usr/bin/env python
"""How fast the host side of ``tilescan run`` is, apart from the model.

    python benchmarks/pipeline.py host  [--out benchmarks/results/host-ceiling.json]
    python benchmarks/pipeline.py host --repo OLD_CHECKOUT --repo . [--out ...]   # side by side
    python benchmarks/pipeline.py host --readers default --cores 1,all [--out ...]   # a many-core (GPU) host
    python benchmarks/pipeline.py host --readers default --batch 256 [--reader-processes on]   # a GPU's batch
    python benchmarks/pipeline.py small [--out benchmarks/results/small-scenes.json]
    python benchmarks/pipeline.py small --repo OLD_CHECKOUT --repo . [--pairs 3] [--rounds 2]   # side by side
    python benchmarks/pipeline.py small --lean [--out benchmarks/results/small-scenes-lean.json]
    python benchmarks/pipeline.py small-host [--out benchmarks/results/small-host.json]
    python benchmarks/pipeline.py small-host --repo OLD_CHECKOUT --repo . [--reader-processes on]   # side by side

``host``: the real run (reading, scaling, batching, rows, labels, heat blending, every
output) with the model step replaced by a no-op that returns results of the right shape, on
a 12,246 x 11,160 px uint16 Landsat mosaic (8,352 tiles of 128 px), pinned to 1 core and to
2 cores with ``taskset`` (alternated, ``--rounds`` each), with one overlap reader per core
(``--pipeline lockstep`` for the CPU default; ``--readers default`` for the config's
default, ``auto``: one per core on a GPU host, as the no-op engine stands for one): tiles/s
over the run's wall time, and the ratio 2 cores / 1 core; beside it the stream's own rate,
between the first batch and the last (``phases_s``: the scene's opening before it and its
outputs after it are serial ends of a single-scene run, which a run of several scenes
overlaps with the next scene's reading; ``--copies N`` runs N copies of the mosaic in one
run, each its own scene). ``--cores 1,all`` pins to 1 core and to every usable core instead
(``by_cores`` in the JSON, each count against the first): a GPU host's own scaling. With
``--repo`` (twice or more)
each checkout's own run alternates with the others' in every round, and each run's rate is
also given as a ratio to the first checkout's run beside it: this shared machine's speed
drifts, so only those carry. Each run also gives the CPU a tile of the run's own process and
of its helpers (``cpu_ms_per_tile``), and of each thread of the run's process by name
(``run_process_cpu_ms_per_tile_by_thread``, read from ``/proc``): where the serial part is;
and the page faults a tile of each (``minor_faults_per_tile``): memory not reused. A run of one
scene also gives its end step by step (``tail_s``: each output's start and end in seconds
after the last batch, and its CPU on its own thread), and the summary their medians.

``small-host``: the same no-op run over 160 scenes of 512 x 512 px (16 tiles each, cut from
the real Landsat scene), on 1 and on 2 cores, with ``[inference] output_workers`` 0 (the
per-scene GeoPackage, quicklook and QGIS files written by the run's threads) and 2 (by two
helper processes): scenes/s, and the ratio 2 cores / 1 core of each. That ratio is how the
host side of many small scenes scales with cores, as it must on a GPU host.

``small``: 40 scenes of 512 x 512 px (16 tiles each) cut from the real Landsat scene, in one
``tilescan run`` with the real model, against model + Grad-CAM alone on the same tiles in
the same process, alternated: tiles/s over the run's wall time after the engine is ready
(report.json ``timings_s``: start-up excluded, like the model-only figure) / the mean model
tiles/s of the passes just before and just after it, the median over rounds
(``round_ratios``: each round's; ``ratio_to_model_before``: against the pass before only, the
figure of sessions up to 12); and the host side's CPU per scene: the run's CPU (process and
helper) less model-only's (the pass before). ``cpu_ceiling``: the most the run could reach
with the CPU it used, were every core busy all the time: the model-only time of its tiles
over the run's CPU seconds divided by the cores it may keep busy (``cores``, as
``tilescan.backend.usable_cores`` counts them); where the cores are saturated, the ratio
stays under it, and only less CPU per scene raises it.
With ``--repo`` (twice or more) each checkout runs its own ``small`` in a fresh process,
alternated ``--pairs`` times, and each pair's ratio is given beside the first checkout's.
``--lean``: the same run without the per-scene extras a user with many chips can turn off
(``[output] gpkg``, ``quicklook``, ``styles`` = false): tables, label and heat COGs only;
``--no-gpkg``: without the GeoPackage alone; ``--batch N``: at that batch (a GPU's 256).
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
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import bench  # noqa: E402  (the Landsat mosaic builder and machine facts)

HOST_SIZE = (12246, 11160)
#: ``--switch-ms``, ``--batch``: the settings a ``host`` run takes from the environment
_SWITCH_VAR = "TILESCAN_INFERENCE__SWITCH_INTERVAL_MS"
_BATCH_VAR = "TILESCAN_INFERENCE__BATCH_SIZE"


class NoopEngine:
    """Stands in for the model + CAM step: results of the right shape at no cost, so the
    run measures everything else. Labels come from the mean of every 8th pixel (row and column)
    of a tile, CAMs from its pixels."""

    def __init__(self, card, batch_size: int, pipeline: str):
        self.loaded = card
        self.classes = card.classes
        self.input_size = card.input_size
        self.batch_size = batch_size
        self.cam = type("Layer", (), {"layer": "noop"})()
        self.pipeline, self.precision = pipeline, "float32"
        self.streams = 1  # one step at a time, as the engine on a GPU
        from tilescan.backend import usable_cores

        self.cores = usable_cores()
        self.runtime = {"backend": "none (no-op model)", "precision": "float32", "pipeline": pipeline}

    def ready(self) -> None:
        pass

    def readers(self, setting: str) -> int:
        return self.cores if setting == "auto" else int(setting)  # auto: as on a GPU host

    def switch_interval(self, setting: str) -> float | None:
        from tilescan.pipeline.engine import resolve_switch_interval

        return resolve_switch_interval(setting, True)  # as on a GPU host

    def submit(self, x: np.ndarray):
        res = self(x)
        return lambda: res

    def __call__(self, x: np.ndarray):
        from tilescan.explain.cam import CAMResult

        n, k = len(x), len(self.classes)
        mean = x[:, ::8, ::8].mean(axis=(1, 2, 3))  # a sample: a whole batch's mean is no GPU host's cost
        probs = np.full((n, k), 0.5 / (k - 1), np.float32)
        cls = (mean * 1e3).astype(np.int64) % k
        probs[np.arange(n), cls] = 0.5
        raw = x[:, 16::32, 16::32, 0].astype(np.float32)  # (n, 4, 4), like the model's last block
        cam = raw / np.maximum(raw.reshape(n, -1).max(axis=1), 1e-6)[:, None, None]
        return CAMResult(probs, cls, raw, cam, "noop", None)


class _Tail:
    """Wall time (``time.monotonic``) and thread CPU of each call of a scene's end steps in this
    process (``scene_cpu.STEPS``' outputs, and the heat's last rows), for a one-scene run's
    timeline after its last batch: on a host with free cores its end lasts as long as its
    longest chain of steps, on a busy one their CPU shares the cores."""

    def __init__(self):
        import threading

        from scene_cpu import STEPS, wrap_steps

        steps = {"heat rows": ("tilescan.outputs.heatmap", "HeatmapWriter.finish"),
                 **{k: v for k, v in STEPS.items() if k not in ("open scene", "read tiles", "rows and heat")}}
        self.calls: list[tuple[str, float, float, float]] = []
        self._lock = threading.Lock()
        wrap_steps(steps, self._timed)

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            t, c = time.monotonic(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.calls.append((name, t, time.monotonic(), time.thread_time() - c))
        return timed

    def after(self, t0: float, last_batch_s: float) -> dict:
        """Each step's first start and last end in seconds after the last batch (``t0``: the
        run's start on the same clock), and its CPU on its own thread (GDAL's and helper
        processes' not included); steps done before the last batch are left out."""
        got: dict[str, dict] = {}
        for name, a, b, cpu in sorted(self.calls, key=lambda c: c[1]):
            a, b = a - t0 - last_batch_s, b - t0 - last_batch_s
            if b < 0:
                continue
            g = got.setdefault(name, {"start": round(a, 3), "end": 0.0, "cpu": 0.0})
            g["end"], g["cpu"] = round(b, 3), round(g["cpu"] + cpu, 3)
        return got


def _host_once(scene: Path, out: Path, pipeline: str, readers: str, workers: int = 0, gpkg: bool = True,
               procs: bool = False) -> dict:
    """One no-op run in this process (called under taskset) of ``scene``, or of every
    ``chip-*.tif`` in it when it is a folder; ``readers`` "default": the config's default;
    ``gpkg`` False: without the GeoPackage; ``procs``: reader processes."""
    import importlib

    importlib.import_module("keras")  # a real run has Keras loaded before its first scene
    from tilescan.config import load_config
    from tilescan.model import describe_model
    from tilescan.pipeline.run import run

    inference = {"pipeline": pipeline, "output_workers": workers, **({"reader_processes": True} if procs else {})}
    if readers != "default":
        inference["reader_threads"] = int(readers)
    overrides = {"tiling": {"units": "px", "bands": [3, 2, 1]}, "inference": inference}
    if not gpkg:
        overrides["output"] = {"gpkg": False}
    environ = {k: v for k, v in os.environ.items() if k in (_SWITCH_VAR, _BATCH_VAR)}
    cfg = load_config(overrides=overrides, environ=environ)
    engine = NoopEngine(describe_model(), cfg.inference.batch_size, pipeline)
    scenes = sorted(scene.glob("chip-*.tif")) if scene.is_dir() else [scene]
    import resource

    own0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = _Tail() if len(scenes) == 1 else None
    threads = _ThreadCPU()
    t0, m0 = time.perf_counter(), time.monotonic()
    report = run(scenes, out, cfg, log=lambda m: None, engine=engine)
    wall = time.perf_counter() - t0
    by_thread = threads.stop()
    own1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if any(r.status != "done" for r in report.results):
        raise SystemExit(f"a unit failed: {[r.reason for r in report.results if r.status != 'done']}")
    n = sum(r.counts["tiles_classified"] for r in report.results)
    got = {"tiles": n, "wall_s": round(wall, 3), "tiles_per_s": round(n / wall, 1),
           # CPU of the run's own process (its GIL's share is part of it) and of its helpers, a tile
           "cpu_ms_per_tile": {"run_process": round(1e3 * _cpu_s(own0, own1) / n, 4),
                               "helper_processes": round(1e3 * _cpu_s(kids0, kids1) / n, 4)},
           "run_process_cpu_ms_per_tile_by_thread": {k: round(1e3 * v / n, 4) for k, v in by_thread.items()},
           # fresh pages first touched (the kernel zeroes each): memory not reused shows here
           "minor_faults_per_tile": {"run_process": round((own1.ru_minflt - own0.ru_minflt) / n, 2),
                                     "helper_processes": round((kids1.ru_minflt - kids0.ru_minflt) / n, 2)},
           "switch_interval_ms": engine.switch_interval(cfg.inference.switch_interval_ms),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # the process's, imports included
           "batch_size": cfg.inference.batch_size}
    if len(scenes) == 1:
        manifest = json.loads((Path(report.results[0].out_dir) / "run.json").read_text())
        got["timings_s"] = manifest["timings_s"]
        got["reader_threads"] = manifest["runtime"].get("reader_threads")  # what the run used
        got["reader_processes"] = manifest["runtime"].get("reader_processes")
    else:
        got["scenes_per_s"] = round(len(scenes) / wall, 2)
    got.update(_phases(json.loads((out / "report.json").read_text())["timings_s"], cfg.inference.batch_size))
    if tail is not None and "phases_s" in got:
        last = got["phases_s"]["to_first_batch"] + got["phases_s"]["between"]
        got["tail_s"] = tail.after(m0, last)
    return got


class _ThreadCPU:
    """The CPU time of each thread of this process by name (a pool's threads together), read
    from ``/proc`` every 20 ms while the run lasts (a thread's last 20 ms may be missed)."""

    def __init__(self):
        import threading

        self._seen: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="bench-thread-cpu", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import re
        import threading

        tick = os.sysconf("SC_CLK_TCK")
        base: dict[int, float] = {}  # the CPU of the threads already there (the main thread's imports)
        first = True
        while True:
            for t in threading.enumerate():
                if t.native_id is None or t is self._thread:
                    continue
                try:
                    with open(f"/proc/self/task/{t.native_id}/stat") as f:
                        fields = f.read().rpartition(")")[2].split()
                except OSError:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / tick
                if first:
                    base[t.native_id] = cpu
                self._seen[t.native_id] = (re.sub(r"_\d+$", "", t.name), cpu - base.get(t.native_id, 0.0))
            first = False
            if self._stop.wait(0.02):
                return

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        out: dict[str, float] = {}
        for name, s in self._seen.values():
            out[name] = out.get(name, 0.0) + s
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _by_thread(runs: list[dict]) -> dict[str, float]:
    """The median of each thread's CPU a tile over ``runs`` (0 in a run without it)."""
    names = {k for g in runs for k in g.get("run_process_cpu_ms_per_tile_by_thread", {})}
    got = {k: median(g.get("run_process_cpu_ms_per_tile_by_thread", {}).get(k, 0.0) for g in runs) for k in names}
    return dict(sorted(got.items(), key=lambda kv: -kv[1]))


def _cpu_s(before, after) -> float:
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _phases(timings: dict, batch: int) -> dict:
    """A run's three phases from ``report.json``: up to its first batch's results (opening
    and the stretch), between its first and last batch (the stream itself, where readers and
    writer run side by side), and after its last (the scene's outputs); the stream's rate is
    that of the tiles after the first batch over the time between. A multi-scene run
    overlaps one scene's ends with the others' reading; a single scene cannot."""
    if len(timings.get("streams", [])) != 1 or timings["streams"][0].get("last_batch_s") is None:
        return {}  # a checkout from before report.json had last_batch_s
    st = timings["streams"][0]
    first, last = st["first_batch_s"], st["last_batch_s"]
    return {"phases_s": {"to_first_batch": first, "between": round(last - first, 3),
                         "after_last_batch": round(timings["wall"] - last, 3)},
            "stream_tiles_per_s": round((st["tiles"] - min(batch, st["tiles"])) / max(last - first, 1e-9), 1)}


def _copies(scene: Path, n: int) -> Path:
    """A folder of ``n`` hard links to ``scene`` named ``chip-K.tif``: one run over n scenes
    (each its own unit and outputs) that are the same file, as ``_host_once`` takes a folder."""
    folder = scene.parent / f"{scene.stem}-x{n}"
    folder.mkdir(exist_ok=True)
    for k in range(n):
        link = folder / f"chip-{k}.tif"
        if not link.exists():
            os.link(scene, link)
    return folder


def host(args) -> dict:
    counts = _core_counts(args)
    work = Path(args.work)
    scene = work / "landsat-mosaic-12246x11160-lzw.tif"
    if not scene.exists():
        bench.build_scene(scene, HOST_SIZE[0], height=HOST_SIZE[1])
    if args.copies > 1:
        scene = _copies(scene, args.copies)
    if args.repo:
        return _host_side_by_side(args, scene, work)
    if args.reader_processes == "both":
        return _host_readers_compared(args, scene, work, counts)
    runs: dict[str, list[dict]] = {c: [] for c in counts}
    for r in range(args.rounds):
        for cores in counts:
            out = work / f"out-{cores}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            got = _taskset(cores, scene, out, args.pipeline, _readers(args, cores), gpkg=not args.no_gpkg,
                           procs=args.reader_processes == "on")
            runs[cores].append(got)
            bench.log(f"host: {cores} core(s), round {r + 1}: {got['tiles_per_s']} tiles/s")
            shutil.rmtree(out, ignore_errors=True)
    rate = {c: median(g["tiles_per_s"] for g in rs) for c, rs in runs.items()}
    stream = {c: median(g["stream_tiles_per_s"] for g in rs) for c, rs in runs.items()}
    res = {"scene": {"path": scene.name, "size": HOST_SIZE, "tiles": runs[counts[0]][0]["tiles"],
                     "copies": args.copies}, "pipeline": args.pipeline, "reader_threads": _readers_said(args)}
    if counts == ["1", "2"]:  # the figures' names since the first set
        res.update({"tiles_per_s_1core": rate["1"], "tiles_per_s_2cores": rate["2"],
                    "ratio_2_to_1": round(rate["2"] / rate["1"], 3),
                    "stream_tiles_per_s_1core": stream["1"], "stream_tiles_per_s_2cores": stream["2"],
                    "stream_ratio_2_to_1": round(stream["2"] / stream["1"], 3)})
    else:  # e.g. 1 core and every core of a GPU host: each count against the first
        res["by_cores"] = {c: {"tiles_per_s": rate[c], "stream_tiles_per_s": stream[c],
                               f"ratio_to_{counts[0]}": round(rate[c] / rate[counts[0]], 3),
                               f"stream_ratio_to_{counts[0]}": round(stream[c] / stream[counts[0]], 3),
                               "reader_threads": [g.get("reader_threads") for g in runs[c]]} for c in counts}
    res["phases_s"] = {c: {k: median(g["phases_s"][k] for g in rs) for k in rs[0]["phases_s"]}
                       for c, rs in runs.items()}
    if all("tail_s" in g for rs in runs.values() for g in rs):
        res["tail_s"] = {c: _tail_medians(rs) for c, rs in runs.items()}
    res["runs"] = runs
    return res


def _tail_medians(runs: list[dict]) -> dict:
    """The median start, end and CPU of each step after the last batch over ``runs``, by start."""
    names = {k for g in runs for k in g["tail_s"]}
    got = {k: {f: round(median(g["tail_s"][k][f] for g in runs if k in g["tail_s"]), 3) for f in ("start", "end", "cpu")}
           for k in names}
    return dict(sorted(got.items(), key=lambda kv: kv[1]["start"]))


def _host_readers_compared(args, scene: Path, work: Path, counts: list[str]) -> dict:
    """Reader threads and reader processes side by side: each round runs both on each core
    count, alternated; medians of tiles/s and of the CPU a tile in the run's own process (where
    its GIL is) and in its helper processes."""
    runs: dict[str, dict[str, list[dict]]] = {c: {"threads": [], "processes": []} for c in counts}
    for r in range(args.rounds):
        for cores in counts:
            for way in (("threads", "processes") if r % 2 == 0 else ("processes", "threads")):
                out = work / f"out-{cores}-{r}-{way}"
                shutil.rmtree(out, ignore_errors=True)
                got = _taskset(cores, scene, out, args.pipeline, _readers(args, cores), gpkg=not args.no_gpkg,
                               procs=way == "processes")
                runs[cores][way].append(got)
                bench.log(f"host: {cores} core(s), {way}, round {r + 1}: {got['tiles_per_s']} tiles/s")
                shutil.rmtree(out, ignore_errors=True)

    def med(rs: list[dict]) -> dict:
        return {"tiles_per_s": median(g["tiles_per_s"] for g in rs),
                "stream_tiles_per_s": median(g["stream_tiles_per_s"] for g in rs),
                "cpu_ms_per_tile": {k: median(g["cpu_ms_per_tile"][k] for g in rs) for k in rs[0]["cpu_ms_per_tile"]},
                "run_process_cpu_ms_per_tile_by_thread": _by_thread(rs),
                **({"tail_s": _tail_medians(rs)} if all("tail_s" in g for g in rs) else {})}

    by = {}
    for c, ways in runs.items():
        t, p = med(ways["threads"]), med(ways["processes"])
        by[c] = {"threads": t, "processes": p, "ratio_processes_to_threads": round(p["tiles_per_s"] / t["tiles_per_s"], 3),
                 "run_process_cpu_ratio": round(p["cpu_ms_per_tile"]["run_process"] / t["cpu_ms_per_tile"]["run_process"], 3)}
    return {"scene": {"path": scene.name, "size": HOST_SIZE, "tiles": runs[counts[0]]["threads"][0]["tiles"],
                      "copies": args.copies}, "pipeline": args.pipeline, "reader_threads": _readers_said(args),
            "readers_compared": by, "runs": runs}


def _core_counts(args) -> list[str]:
    """``--cores``: the core counts of ``host`` (without ``--repo``), each no more than the
    cores this process may use; ``all`` is that many."""
    if args.repo and args.cores != "1,2":
        raise SystemExit("--cores: side by side (--repo) runs on 1 and 2 cores only")
    avail = len(os.sched_getaffinity(0))
    counts = [str(avail) if c.strip() == "all" else c.strip() for c in args.cores.split(",")]
    if not all(c.isdigit() and 1 <= int(c) <= avail for c in counts):
        raise SystemExit(f"--cores {args.cores}: each count must be 1..{avail} (the cores this process may use) "
                         "or 'all'")
    return list(dict.fromkeys(counts))


def _readers(args, cores: str) -> str:
    """The reader setting of a ``host`` run: one per core, or the config's default."""
    return "default" if args.readers == "default" else cores


def _readers_said(args) -> str | None:
    if args.pipeline != "overlap":
        return None
    return "the config's default" if args.readers == "default" else "one per core"


def _in_turn(repos: list[Path], k: int) -> list[Path]:
    """The checkouts in the order of round (or pair) ``k``: turned by one each time, so
    none always runs first."""
    return repos[k % len(repos):] + repos[:k % len(repos)]


def _host_side_by_side(args, scene: Path, work: Path) -> dict:
    """``host --repo A --repo B``: each checkout's own no-op run (its tilescan and its
    ``benchmarks/pipeline.py``), alternated within every round and core count (the order
    turned each round); per pair the rate's ratio to the first checkout's."""
    repos = [Path(r).resolve() for r in args.repo]
    runs = {str(r): {"1": [], "2": []} for r in repos}
    for k in range(args.rounds):
        for cores in ("1", "2"):
            for repo in _in_turn(repos, k):
                out = work / "out-side-by-side"
                shutil.rmtree(out, ignore_errors=True)
                got = _taskset(cores, scene, out, args.pipeline, _readers(args, cores), repo=repo,
                               gpkg=not args.no_gpkg, procs=args.reader_processes == "on")
                runs[str(repo)][cores].append(got)
                bench.log(f"host: {repo}, {cores} core(s), round {k + 1}: {got['tiles_per_s']} tiles/s")
                shutil.rmtree(out, ignore_errors=True)
    first = runs[str(repos[0])]
    res = {}
    for repo, rs in runs.items():
        rate = {c: median(g["tiles_per_s"] for g in v) for c, v in rs.items()}
        res[repo] = {"tiles_per_s_1core": rate["1"], "tiles_per_s_2cores": rate["2"],
                     "ratio_2_to_1": round(rate["2"] / rate["1"], 3),
                     "run_process_cpu_ms_per_tile": {c: median(g["cpu_ms_per_tile"]["run_process"] for g in v)
                                                     for c, v in rs.items()},
                     "run_process_cpu_ms_per_tile_by_thread": {c: _by_thread(v) for c, v in rs.items()},
                     "per_pair_to_first": {c: [round(g["tiles_per_s"] / f["tiles_per_s"], 3)
                                               for g, f in zip(v, first[c])] for c, v in rs.items()},
                     "runs": rs}
    return {"scene": {"path": scene.name, "size": HOST_SIZE}, "pipeline": args.pipeline,
            "reader_threads": _readers_said(args), "checkouts": res}


#: ``small --lean``: the per-scene extras off.
LEAN_OUTPUTS = {"gpkg": False, "quicklook": False, "styles": False}


def small_host(args) -> dict:
    """``small-host``: the ``host`` measure on many small scenes, with the per-scene outputs
    written by the run's threads (``output_workers`` 0) and by 2 helper processes (and, with
    ``--reader-processes on|both``, the scenes opened in a reader process)."""
    work = Path(args.work)
    folder = work / "chips"
    if len(list(folder.glob("chip-*.tif"))) != SMALL_HOST_SCENES:
        shutil.rmtree(folder, ignore_errors=True)
        _small_scenes(folder, n=SMALL_HOST_SCENES)
    runs: dict[str, list[dict]] = {}
    ways = {"off": (False,), "on": (True,), "both": (False, True)}[args.reader_processes]
    repos = [Path(r).resolve() for r in args.repo] if args.repo else [None]
    for r in range(args.rounds):
        for workers in (0, 2):
            for procs in ways:
                for cores in ("1", "2"):
                    for k, repo in enumerate(repos):  # with --repo: each checkout's run beside the others'
                        out = work / f"out-{workers}-{cores}-{r}-{k}"
                        shutil.rmtree(out, ignore_errors=True)
                        got = _taskset(cores, folder, out, "overlap", cores, workers, repo=repo, procs=procs)
                        label = f"{repo}:" if len(repos) > 1 else ""
                        way = f"{label}workers{workers}{'_procs' if procs else ''}_{cores}core"
                        runs.setdefault(way, []).append(got)
                        bench.log(f"small-host: {label}output_workers {workers}, reader processes {procs}, "
                                  f"{cores} core(s), round {r + 1}: {got['scenes_per_s']} scenes/s")
                        shutil.rmtree(out, ignore_errors=True)
    rate = {k: median(g["scenes_per_s"] for g in rs) for k, rs in runs.items()}
    cpu = {k: {c: median(g["cpu_ms_per_tile"][c] for g in rs) for c in rs[0]["cpu_ms_per_tile"]} for k, rs in runs.items()}
    ways = sorted({k.rsplit("_", 1)[0] for k in runs})
    res = {"scenes": SMALL_HOST_SCENES, "scene_px": 512, "tiles": next(iter(runs.values()))[0]["tiles"],
           "scenes_per_s": rate, "ratio_2_to_1": {w: round(rate[f"{w}_2core"] / rate[f"{w}_1core"], 3) for w in ways},
           "cpu_ms_per_tile": cpu,
           "run_process_cpu_ms_per_tile_by_thread": {k: _by_thread(rs) for k, rs in runs.items()}}
    if len(repos) > 1:  # each run's scenes/s over the first checkout's run beside it
        first = f"{repos[0]}:"
        res["ratio_to_first_checkout"] = {k: [round(g["scenes_per_s"] / f["scenes_per_s"], 3)
                                              for g, f in zip(rs, runs[first + k.split(":", 1)[1]])]
                                          for k, rs in runs.items() if not k.startswith(first)}
    return {**res, "runs": runs}


def _taskset(cores: str, scene: Path, out: Path, pipeline: str, readers: str, workers: int = 0,
             repo: Path | None = None, gpkg: bool = True, procs: bool = False) -> dict:
    """``_host_once`` in a fresh process pinned to the first ``cores`` cores (with tilescan
    and this script from checkout ``repo``, run from outside it, when given)."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:int(cores)])  # the first N usable cores
    script, env, cwd = __file__, None, None
    if repo is not None:
        script, env, cwd = str(repo / "benchmarks" / "pipeline.py"), {**os.environ, "PYTHONPATH": str(repo)}, out.parent
    p = subprocess.run(["taskset", "-c", cpus, sys.executable, script, "_host", str(scene), str(out), pipeline,
                        readers, str(workers), *([] if gpkg else ["no-gpkg"]), *(["procs"] if procs else [])],
                       capture_output=True, text=True,
                       check=True, env=env, cwd=cwd)
    return json.loads(p.stdout.strip().splitlines()[-1])


#: ``small-host``: scenes of 512 x 512 px; enough for a run of several seconds on 2 cores.
SMALL_HOST_SCENES = 160


def _small_scenes(folder: Path, n: int = 40, size: int = 512) -> list[Path]:
    """``n`` scenes of ``size`` px cut from the real Landsat scene (GeoTIFF, tiled, LZW)."""
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(bench.LANDSAT) as src:
        profile = src.profile.copy()
        profile.update(width=size, height=size, tiled=True, blockxsize=256, blockysize=256, compress="lzw")
        cols, rows = (src.width - size) // size, (src.height - size) // size
        for k in range(n):
            col, row = (k % cols) * size, (k // cols % rows) * size
            w = Window(col, row, size, size)
            p = folder / f"chip-{k:03d}.tif"
            with rasterio.open(p, "w", **{**profile, "transform": src.window_transform(w)}) as dst:
                dst.write(src.read(window=w))
            paths.append(p)
    return paths


def _small_side_by_side(args) -> dict:
    """``small --repo A --repo B``: each checkout's own ``small`` run (its tilescan, its
    ``benchmarks/pipeline.py``, in a fresh process with its own model-only passes) of
    ``--rounds`` rounds, the checkouts alternated ``--pairs`` times (the order turned each
    time); per pair each ratio beside the first checkout's."""
    repos = [Path(r).resolve() for r in args.repo]
    work = Path(args.work)
    runs: dict[str, list[dict]] = {str(r): [] for r in repos}
    for k in range(args.pairs):
        for repo in _in_turn(repos, k):
            got = work / "side-by-side.json"
            cmd = [sys.executable, str(repo / "benchmarks" / "pipeline.py"), "small", "--rounds", str(args.rounds),
                   "--work", str(work), "--out", str(got)] + (["--lean"] if args.lean else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"small with {repo} failed:\n{p.stderr[-3000:]}")
            r = json.loads(got.read_text())
            runs[str(repo)].append({key: r[key] for key in ("ratio_to_model", "round_ratios", "model_tiles_per_s",
                                                            "run_tiles_per_s", "host_cpu_ms_per_scene", "cpu_ceiling")
                                    if key in r})  # an older checkout's benchmark may lack a figure
            bench.log(f"small: {repo}, pair {k + 1}: ratio {r['ratio_to_model']} (rounds {r['round_ratios']})")
    first = runs[str(repos[0])]
    return {"scenes": 40, "scene_px": 512, "outputs": LEAN_OUTPUTS if args.lean else "all (defaults)",
            "checkouts": {repo: {"ratio_to_model": round(median(g["ratio_to_model"] for g in rs), 3),
                                 "host_cpu_ms_per_scene": round(median(g["host_cpu_ms_per_scene"] for g in rs), 1),
                                 "per_pair_minus_first": [round(g["ratio_to_model"] - f["ratio_to_model"], 3)
                                                          for g, f in zip(rs, first)],
                                 "runs": rs} for repo, rs in runs.items()}}


def small(args) -> dict:
    if args.repo:
        return _small_side_by_side(args)
    from tilescan.backend import usable_cores
    from tilescan.config import load_config
    from tilescan.pipeline.engine import shared_engine
    from tilescan.pipeline.run import run

    work = Path(args.work)
    scenes = _small_scenes(work / "scenes")
    overrides = {"tiling": {"units": "px", "bands": [3, 2, 1]}}
    if args.lean:
        overrides["output"] = LEAN_OUTPUTS
    elif args.no_gpkg:
        overrides["output"] = {"gpkg": False}
    environ = {k: v for k, v in os.environ.items() if k == _BATCH_VAR}  # --batch
    cfg = load_config(overrides=overrides, environ=environ)
    engine = shared_engine(cfg)
    engine.ready()
    # the same tiles the run classifies, as ready batches, for the model-only figure
    tiles = bench.ready_tiles(640, engine.input_size)
    bs = cfg.inference.batch_size
    rates: dict[str, list[float]] = {"model": [], "run": []}
    host_ms: list[float] = []
    timings = []

    def model_only() -> tuple[float, float]:
        """Model + Grad-CAM alone on the run's number of tiles: (tiles/s, CPU seconds)."""
        t0, c0 = time.perf_counter(), _cpu()
        started: list = []
        for i in range(0, len(tiles), bs):  # as many batches at once as the run's engine computes
            started.append(engine.submit(tiles[i:i + bs]))
            while len(started) >= engine.streams:
                started.pop(0)()
        for collect in started:
            collect()
        return len(tiles) / (time.perf_counter() - t0), _cpu() - c0

    after: list[float] = []
    for r in range(args.rounds):
        rate, model_cpu = model_only()
        rates["model"].append(rate)
        out = work / f"out-{r}"
        shutil.rmtree(out, ignore_errors=True)
        t0, c0 = time.perf_counter(), _cpu()
        report = run(scenes, out, cfg, log=lambda m: None)
        wall = time.perf_counter() - t0
        run_cpu = _cpu() - c0
        data = json.loads((out / "report.json").read_text())
        n = sum(x.counts["tiles_classified"] for x in report.results)
        ready = data["timings_s"]["streams"][0]["engine_ready_s"] or 0.0
        rates["run"].append(n / (wall - ready))
        host_ms.append((run_cpu - model_cpu) / len(scenes) * 1e3)
        timings.append({"wall_s": round(wall, 3), "tiles": n, "cpu_s": {"model_only": round(model_cpu, 2),
                                                                         "run": round(run_cpu, 2)},
                        **data["timings_s"]})
        shutil.rmtree(out, ignore_errors=True)
        after.append(model_only()[0])
        bench.log(f"small: round {r + 1}: model {rates['model'][-1]:.1f} tiles/s before, {after[-1]:.1f} after, "
                  f"run {rates['run'][-1]:.1f} tiles/s, host CPU {host_ms[-1]:.1f} ms per scene")
    m, e = median(rates["model"]), median(rates["run"])
    # each round's run against the model-only passes just before and just after it (their
    # mean): side by side, so a slow spell of this shared machine moves both
    model_around = [(b + a) / 2 for b, a in zip(rates["model"], after)]
    ratios = [r / mo for r, mo in zip(rates["run"], model_around)]
    before = [r / mo for r, mo in zip(rates["run"], rates["model"])]
    # the most the run could reach with its CPU: the model-only time over the time the run's
    # CPU (model and host side) takes on these cores when all of them are busy
    cores = usable_cores()
    ceilings = [(t["tiles"] / mo) / (t["cpu_s"]["run"] / cores) for t, mo in zip(timings, model_around)]
    return {"scenes": len(scenes), "scene_px": 512, "batch_size": bs,
            "outputs": LEAN_OUTPUTS if args.lean else {"gpkg": False} if args.no_gpkg else "all (defaults)",
            "tiles": timings[0]["tiles"], "model_tiles_per_s": round(m, 1),
            "run_tiles_per_s": round(e, 1), "ratio_to_model": round(median(ratios), 3),
            "round_ratios": [round(x, 3) for x in ratios], "ratio_of_medians": round(e / m, 3),
            "ratio_to_model_before": round(median(before), 3), "round_ratios_before": [round(x, 3) for x in before],
            "host_cpu_ms_per_scene": round(median(host_ms), 1), "cores": cores,
            "cpu_ceiling": round(median(ceilings), 3), "round_cpu_ceilings": [round(x, 3) for x in ceilings],
            "rounds": timings,
            "rates": {**{k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                      "model_after": [round(v, 1) for v in after]}}


def _cpu() -> float:
    """CPU seconds of this process and its children still running (the GeoPackage index
    helper), from /proc: the run's CPU beyond the model's is what its host side costs."""
    total = time.process_time()
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                kids = Path(f"/proc/self/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for pid in kids:
                try:
                    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:  # not Linux: this process alone
        pass
    return total


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_host":
        print(json.dumps(_host_once(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5],
                                    int(sys.argv[6]) if len(sys.argv) > 6 else 0, gpkg="no-gpkg" not in sys.argv[7:],
                                    procs="procs" in sys.argv[7:])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("host", "small", "small-host"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pipeline", choices=("overlap", "lockstep"), default="overlap",
                    help="host: overlap (one reader per core, as on a GPU) or lockstep (the CPU default)")
    ap.add_argument("--readers", choices=("per-core", "default"), default="per-core",
                    help="host: one overlap reader per core, or the config's default reader_threads (what a "
                         "user gets; checkouts from 1eff980 on)")
    ap.add_argument("--copies", type=int, default=1,
                    help="host: the mosaic this many times in one run (each copy its own scene and outputs): "
                         "every scene's opening and outputs overlap another's reading, but the first's and the last's")
    ap.add_argument("--cores", default="1,2",
                    help="host: the core counts to pin runs to, comma-separated ('all': every usable core), "
                         "e.g. 1,all on a GPU host; the JSON keeps its 1- and 2-core names for 1,2")
    ap.add_argument("--no-gpkg", action="store_true",
                    help="host, small: without the GeoPackage (as on the GPU machine, whose image lacks pyogrio)")
    ap.add_argument("--reader-processes", choices=("off", "on", "both"), default="off",
                    help="host, small-host: [inference] reader_processes (each overlap reader in a process of its own); "
                         "both: reader threads and processes side by side, alternated")
    ap.add_argument("--switch-ms", help="host: [inference] switch_interval_ms for the runs (default: auto, which the "
                                        "no-op engine, standing for a GPU host, resolves to 0.5)")
    ap.add_argument("--batch", type=int, help="host, small: [inference] batch_size for the runs (default: the "
                                              "config's; 256 as on the H200)")
    ap.add_argument("--lean", action="store_true",
                    help="small: without the GeoPackage, quicklook and QGIS files (tables and COGs only)")
    ap.add_argument("--work", help="folder for scenes and outputs, kept (default: a temp folder, removed at the end)")
    ap.add_argument("--repo", action="append",
                    help="host, small, small-host: a tilescan checkout to run (repeat: checkouts side by side)")
    ap.add_argument("--pairs", type=int, default=3, help="small --repo: times each checkout's run is repeated")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.switch_ms is not None:
        os.environ[_SWITCH_VAR] = args.switch_ms  # the runs' processes inherit it
    if args.batch is not None:
        os.environ[_BATCH_VAR] = str(args.batch)
    own = args.work is None  # a temp folder of its own (the 12k mosaic alone is 630 MB): removed at the end
    if own:
        args.work = tempfile.mkdtemp(prefix=f"tilescan-{args.what}-")
    try:
        res = {"benchmark": args.what, "command": "python benchmarks/pipeline.py " + " ".join(sys.argv[1:]),
               "machine": bench.machine(), **{"host": host, "small": small, "small-host": small_host}[args.what](args)}
    finally:
        if own:
            shutil.rmtree(args.work, ignore_errors=True)
    bench.report(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
