#!/usr/bin/env python
"""How many row groups of a large collected table a bbox query skips, by layout.

Run from the project root::

    python benchmarks/collect_pruning.py                       # about 2-4 min on 2 cores
    python benchmarks/collect_pruning.py --rows 1000000 --out benchmarks/results/collect-pruning.json

The table: the real collected table of the four reference scenes of the tests (``tilescan
run --tile-size 128 --units px`` over RGB.byte, image_rgb, cog_rgb and cogeo, then
``tilescan collect``; made here in a temporary folder), its rows copied onto a square grid of
scene footprints (one degree apart, jittered) until there are ``--rows`` rows: a mosaic of
many scenes, as a national collection would be. Layouts, each a GeoParquet 1.1 file with the
``bbox`` covering column and its per-row-group statistics:

- ``scene order, N-row groups``: scene after scene (the footprints in a random order, as
  folder names that follow dates or ids put them), in row groups of N rows;
- ``Hilbert, N-row groups``: ``tilescan.outputs.spatial.sort_parquet`` (what ``collect`` does to a
  table over ``spatial.SORT_MIN_ROWS`` rows).

Queries: 200 random squares per size (1, 4 and 16 footprint steps on a side), each counted
from the row-group statistics alone (``spatial.row_groups_hit``), as a reader filtering on
the covering column does. Reported: the mean fraction of row groups skipped, the mean
fraction of rows in the row groups read (the I/O), and the rows that actually match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tilescan.outputs import spatial

SCENES = ("rasterio/RGB.byte.tif", "rio-cogeo/image_rgb.tif", "rio-tiler/cog_rgb.tif", "rasterio/cogeo.tif")


def _collected(data: Path, tmp: Path) -> pa.Table:
    out = tmp / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    cli = [sys.executable, "-m", "tilescan.cli"]
    subprocess.run([*cli, "run", "--no-progress", "-q", "-o", out, *(data / "scenes" / s for s in SCENES),
                    "--tile-size", "128", "--units", "px"], check=True, env=env)
    subprocess.run([*cli, "collect", "-q", "--no-gpkg", out], check=True, env=env)
    return pq.read_table(out / "collected" / "tiles.parquet")


def _mosaic(src: pa.Table, rows: int, rng) -> tuple[pa.Table, int]:
    """``src``'s rows copied onto a jittered grid of 1-degree footprints, the copies in a
    random order (scene folder names, which collect sorts by, rarely follow geography).
    Only ``bbox`` is moved (what the statistics and the queries use)."""
    b = src.column("bbox").combine_chunks()
    f = {k: b.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")}
    x0, y0 = f["xmin"].min(), f["ymin"].min()
    scale = 0.8 / max(f["xmax"].max() - x0, f["ymax"].max() - y0)  # each copy squeezed into 0.8 degrees
    side = math.ceil(math.sqrt(rows / src.num_rows))
    cells = rng.permutation(side * side)
    n = src.num_rows
    t = src.take(pa.array(np.tile(np.arange(n), len(cells))))
    dx = np.repeat(cells // side + rng.uniform(0, 0.2, len(cells)), n)
    dy = np.repeat(cells % side + rng.uniform(0, 0.2, len(cells)), n)
    cols = []
    for k in ("xmin", "ymin", "xmax", "ymax"):
        base = np.tile((f[k] - (x0 if k[0] == "x" else y0)) * scale, len(cells))
        cols.append(pa.array(base + (dx if k[0] == "x" else dy)))
    t = t.set_column(t.column_names.index("bbox"), "bbox", pa.StructArray.from_arrays(cols, fields=list(b.type)))
    names = np.repeat(np.array([f"s{c:05d}" for c in cells]), n)
    return t.set_column(0, src.schema.field("scene"), pa.array(names)), side


def _measure(path: Path, queries: list[tuple], bx: dict) -> dict:
    md = pq.ParquetFile(path).metadata
    ext = spatial.row_group_extents(path)
    skipped, matched = [], []
    for q in queries:
        hit, total = spatial.row_groups_hit(ext, q)
        skipped.append(1 - hit / total)
        matched.append(int(((bx["xmin"] <= q[2]) & (bx["xmax"] >= q[0]) & (bx["ymin"] <= q[3]) & (bx["ymax"] >= q[1])).sum()))
    return {"row_groups": int(md.num_row_groups), "file_mb": round(path.stat().st_size / 2**20, 1),
            "skipped_mean": float(np.mean(skipped)), "skipped_min": float(np.min(skipped)),
            "matching_rows_mean": float(np.mean(matched))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    data = Path(os.environ.get("TILESCAN_DATA", REPO.parent / "shared" / "data"))
    rng = np.random.default_rng(0)
    report: dict = {"command": " ".join(sys.argv), "layouts": {}}
    with tempfile.TemporaryDirectory(prefix="tilescan-pruning-") as tmp:
        tmp = Path(tmp)
        src = _collected(data, tmp)
        table, side = _mosaic(src, args.rows, rng)
        n = table.num_rows
        report.update(rows=n, source_rows=src.num_rows, footprints_per_side=side)
        print(f"{n:,} rows: {src.num_rows} real collected rows x {side * side} footprints ({side} x {side} degrees)",
              file=sys.stderr)
        queries = {}
        for size in (1, 4, 16):
            qs = []
            for _ in range(args.queries):
                qx, qy = rng.uniform(0, side - size, 2)
                qs.append((qx, qy, qx + size, qy + size))
            queries[size] = qs
        layouts = {}
        for g in (4096, 16384, 65536):
            layouts[f"scene order, {g}-row groups"] = ("plain", g)
            layouts[f"Hilbert, {g}-row groups"] = ("hilbert", g)
        bx = {k: table.column("bbox").combine_chunks().field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")}
        for name, (kind, g) in layouts.items():
            path = tmp / f"{name.replace(' ', '_').replace(',', '')}.parquet"
            t0 = time.monotonic()
            with pq.ParquetWriter(path, src.schema, compression="zstd", store_schema=False) as w:
                w.write_table(table, row_group_size=g)
                w.add_key_value_metadata(src.schema.metadata)
            if kind == "hilbert":
                spatial.sort_parquet(path, row_group_rows=g)
            secs = time.monotonic() - t0
            res = {size: _measure(path, qs, bx) for size, qs in queries.items()}
            report["layouts"][name] = {"write_s": round(secs, 1), "by_query_side_deg": res}
            print(f"{name}: " + ", ".join(f"{s} deg: skipped {r['skipped_mean']:.1%}" for s, r in res.items()),
                  file=sys.stderr)
    print("\n| layout | row groups | file MB | skipped: 1° query | 4° | 16° |")
    print("|---|---|---|---|---|---|")
    for name, r in report["layouts"].items():
        q = r["by_query_side_deg"]
        print(f"| {name} | {q[1]['row_groups']:,} | {q[1]['file_mb']} | {q[1]['skipped_mean']:.1%} | "
              f"{q[4]['skipped_mean']:.1%} | {q[16]['skipped_mean']:.1%} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
