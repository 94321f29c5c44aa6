#!/usr/bin/env python
"""CPU cost per scene of the quicklook PNG and the QGIS files (styles + project).

Run from the project root::

    python benchmarks/scene_outputs.py --out benchmarks/results/scene-outputs.json

Scenes: 40 chips of 512 x 512 px cut from the real Landsat scene (windows 192 px apart, so
each chip differs: its classes present and its stretch, hence its styles, are its own) and
one 2,048 x 2,048 px scene mirror-tiled from it (``bench.build_scene``). A real
``tilescan run`` with the model step replaced by a no-op (``pipeline.NoopEngine``) writes every
output; the arguments it passes to ``write_scene_quicklook`` and ``write_scene_files`` are kept and
the two calls are then replayed on their own, ``--rounds`` times over every scene (what the
modules memoise forgotten before each round, as in a fresh run). The
figure is the CPU time of the calling thread (``time.thread_time``: OpenCV's, zlib's and
Pillow's work in that thread included, other threads' not) per call, median over all calls;
the quicklook's parts are timed the same way where the module has them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bench  # noqa: E402  (the Landsat scene, the mosaic builder, machine facts)

# the quicklook's steps, timed where tilescan.outputs.quicklook has them
_QUICKLOOK_PARTS = ("_scene_panel", "_label_panel", "_heat_panel", "_compose", "_write_png")


def _chips(folder: Path, n: int = 40, size: int = 512, step: int = 192) -> list[Path]:
    """``n`` distinct ``size`` px chips of the Landsat scene, ``step`` px apart (GeoTIFF, tiled, LZW)."""
    import rasterio
    from rasterio.windows import Window

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(bench.LANDSAT) as src:
        profile = src.profile.copy()
        profile.update(width=size, height=size, tiled=True, blockxsize=256, blockysize=256, compress="lzw")
        cols = (src.width - size) // step + 1
        for k in range(n):
            w = Window((k % cols) * step, (k // cols) * step, size, size)
            p = folder / f"chip-{k:03d}.tif"
            if not p.exists():
                with rasterio.open(p, "w", **{**profile, "transform": src.window_transform(w)}) as dst:
                    dst.write(src.read(window=w))
            paths.append(p)
    return paths


def _captured_run(scenes: list[Path], out: Path) -> tuple[list[tuple], list[tuple]]:
    """One no-op ``tilescan run`` over ``scenes``; the quicklook and QGIS calls it made."""
    import importlib

    importlib.import_module("keras")  # a real run has Keras loaded before its first scene
    import pipeline as P

    import tilescan.pipeline.process as PR
    from tilescan.config import load_config
    from tilescan.model import describe_model
    from tilescan.pipeline.run import run

    quicklooks, qgis = [], []
    real_ql, real_qgis = PR.write_scene_quicklook, PR.write_scene_files

    def ql(path, *args, **kw):
        quicklooks.append((Path(path).parent.name, args, kw))
        return real_ql(path, *args, **kw)

    def sf(folder, **kw):
        qgis.append((Path(kw["location"]), kw))
        return real_qgis(folder, **kw)

    cfg = load_config(overrides={"tiling": {"units": "px", "bands": list(bench.LANDSAT_BANDS)},
                                 "inference": {"pipeline": "lockstep"}}, environ={})
    engine = P.NoopEngine(describe_model(), cfg.inference.batch_size, "lockstep")
    PR.write_scene_quicklook, PR.write_scene_files = ql, sf
    try:
        run(scenes, out, cfg, log=lambda m: None, engine=engine)
    finally:
        PR.write_scene_quicklook, PR.write_scene_files = real_ql, real_qgis
    return quicklooks, qgis


def _timed_parts(module, names: tuple[str, ...], acc: dict[str, list[float]]) -> dict:
    """Wrap ``module``'s functions ``names`` (those it has) to add their thread CPU time to ``acc``."""
    saved = {}
    for name in names:
        fn = getattr(module, name, None)
        if fn is None:
            continue
        saved[name], acc[name] = fn, []

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.thread_time()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name][-1] += time.thread_time() - t

        setattr(module, name, functools.wraps(fn)(timed))
    return saved


def _cold_caches() -> None:
    """Forget what the output modules memoise, so that each round costs what a fresh run over
    these scenes costs (what repeats between its scenes is still found again)."""
    import tilescan.outputs.qgis_style as QS
    import tilescan.outputs.quicklook as Q

    for module in (Q, QS):
        for obj in vars(module).values():
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()
    getattr(QS, "_CRS_FACTS", {}).clear()


def _replay(quicklooks: list[tuple], qgis: list[tuple], rounds: int, work: Path) -> dict:
    """Median thread CPU (ms) per call of write_scene_quicklook (the preview's stretch, the
    drawing and its parts, the PNG) and write_scene_files."""
    import tilescan.outputs.quicklook as Q
    from tilescan.outputs.qgis import write_scene_files

    ql_ms, qgis_ms, parts = [], [], {}
    saved = _timed_parts(Q, _QUICKLOOK_PARTS, parts)
    png_bytes = []
    try:
        for _ in range(rounds):
            _cold_caches()
            for name, args, kw in quicklooks:
                for v in parts.values():
                    v.append(0.0)
                t = time.thread_time()
                p = Q.write_scene_quicklook(work / f"{name}.png", *args, **kw)
                ql_ms.append((time.thread_time() - t) * 1e3)
                png_bytes.append(p.stat().st_size)
            for folder, kw in qgis:
                t = time.thread_time()
                write_scene_files(folder, **kw)
                qgis_ms.append((time.thread_time() - t) * 1e3)
    finally:
        for name, fn in saved.items():
            setattr(Q, name, fn)
    return {
        "calls": len(ql_ms),
        "quicklook_ms": round(median(ql_ms), 2),
        "quicklook_parts_ms": {k: round(median(v) * 1e3, 2) for k, v in parts.items()},
        "qgis_files_ms": round(median(qgis_ms), 2),
        "total_ms": round(median(ql_ms) + median(qgis_ms), 2),
        "quicklook_png_bytes_median": int(median(png_bytes)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    ap.add_argument("--rounds", type=int, default=5, help="replays of every scene's calls")
    ap.add_argument("--work", type=Path, help="folder for the scenes and outputs (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tilescan-scene-outputs-"))
    chips = _chips(work / "chips")
    large = work / "landsat-2048.tif"
    if not large.exists():
        bench.build_scene(large, 2048)
    results = {}
    for key, scenes in (("chip_512", chips), ("scene_2048", [large])):
        out = work / f"out-{key}"
        shutil.rmtree(out, ignore_errors=True)
        quicklooks, qgis = _captured_run(scenes, out)
        pngs = work / f"png-{key}"
        pngs.mkdir(exist_ok=True)
        results[key] = {"scenes": len(scenes), **_replay(quicklooks, qgis, args.rounds, pngs)}
        bench.log(f"{key}: {results[key]}")
    doc = {
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": bench.machine(),
        "rounds": args.rounds,
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
