"""Spatially sorted GeoParquet: row groups a bbox query can skip.

``tilescan collect`` writes the collected table scene by scene. A large table is then
rewritten in the order of a Hilbert curve through the footprint centres (the GeoParquet 1.1
best practice for large files), in row groups of :data:`ROW_GROUP_ROWS` rows: neighbouring
tiles share row groups, each row group covers a compact area, and the per-row-group
min/max statistics of the ``bbox`` covering column (``bbox.xmin`` …, written by Parquet for
every leaf column) let a reader (GDAL, DuckDB, GeoPandas with a bbox filter, pyarrow) skip
the row groups outside its query. :func:`row_groups_hit` evaluates a query from those
statistics alone, as such a reader does.

The rewrite is an external sort: the keys (8 bytes a row) are computed from the ``bbox``
column, rows are dealt into at most :data:`MAX_BUCKETS` key-range buckets (Arrow IPC files
beside the table) one source row group at a time, then each bucket is sorted and written.
Memory is bounded by one bucket, not by the table.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .table import dictionary_columns

#: rows per row group of a spatially sorted table (benchmarks/README.md: pruning vs. size)
ROW_GROUP_ROWS = 16384
#: tables with more rows than this are sorted; a smaller one is one or two row groups anyway
SORT_MIN_ROWS = 2 * ROW_GROUP_ROWS
#: bound on the temporary bucket files open at once
MAX_BUCKETS = 256
HILBERT_ORDER = 16  # bits per axis: 65,536 cells across the table's extent


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int = HILBERT_ORDER) -> np.ndarray:
    """Distance along a Hilbert curve of the cells ``(x, y)`` (integers in [0, 2**order))."""
    n = 1 << order
    x = np.asarray(x, dtype=np.int64).copy()
    y = np.asarray(y, dtype=np.int64).copy()
    d = np.zeros(x.shape, dtype=np.uint64)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += np.uint64(s) * np.uint64(s) * ((3 * rx.astype(np.uint64)) ^ ry.astype(np.uint64))
        # rotate the quadrant so the curve stays continuous
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def hilbert_keys(bbox: pa.Array, extent: Sequence[float] | None = None, order: int = HILBERT_ORDER) -> np.ndarray:
    """Hilbert keys of the centres of a ``bbox`` struct column (xmin, ymin, xmax, ymax), on a
    grid over ``extent`` (default: the column's own); rows without a bbox sort last."""
    if isinstance(bbox, pa.ChunkedArray):
        bbox = bbox.combine_chunks()
    valid = np.asarray(bbox.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    f = lambda name: bbox.field(name).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: E731
    cx = (f("xmin") + f("xmax")) / 2
    cy = (f("ymin") + f("ymax")) / 2
    ok = valid & np.isfinite(cx) & np.isfinite(cy)
    keys = np.full(len(cx), np.iinfo(np.uint64).max, dtype=np.uint64)
    if not ok.any():
        return keys
    x0, y0, x1, y1 = extent if extent is not None else (cx[ok].min(), cy[ok].min(), cx[ok].max(), cy[ok].max())
    cells = (1 << order) - 1
    sx = cells / (x1 - x0) if x1 > x0 else 0.0
    sy = cells / (y1 - y0) if y1 > y0 else 0.0
    gx = np.clip(np.round((cx[ok] - x0) * sx), 0, cells)
    gy = np.clip(np.round((cy[ok] - y0) * sy), 0, cells)
    keys[ok] = hilbert_index(gx, gy, order)
    return keys


def sort_parquet(path: Path, row_group_rows: int | None = None, column: str = "bbox") -> int:
    """Rewrite the GeoParquet file ``path`` in place (atomically) in Hilbert order of its
    ``column`` centres, in row groups of ``row_group_rows``; file metadata is kept. Returns
    the number of row groups written."""
    path = Path(path)
    row_group_rows = row_group_rows or ROW_GROUP_ROWS
    src = pq.ParquetFile(path)
    n = src.metadata.num_rows
    keys = hilbert_keys(src.read(columns=[column]).column(column))
    order = np.argsort(keys, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    n_buckets = min(MAX_BUCKETS, max(1, math.ceil(n / row_group_rows)))
    per_bucket = math.ceil(n / n_buckets / row_group_rows) * row_group_rows  # whole row groups per bucket
    bucket_of = rank // per_bucket
    n_buckets = int(bucket_of.max()) + 1 if n else 0
    schema = src.schema_arrow
    tmp_dir = path.parent / f".{path.name}.sort-{os.getpid()}"
    tmp_dir.mkdir()
    out = path.parent / f".{path.name}.sorted-{os.getpid()}"
    groups = 0
    try:
        sinks = [ipc.new_file(str(tmp_dir / f"{b:05d}.arrow"), schema.append(pa.field("_rank", pa.int64())))
                 for b in range(n_buckets)]
        start = 0
        for g in range(src.num_row_groups):
            t = src.read_row_group(g)
            r = rank[start:start + t.num_rows]
            b = bucket_of[start:start + t.num_rows]
            t = t.append_column("_rank", pa.array(r))
            for k in np.unique(b):
                sinks[int(k)].write_table(t.filter(pa.array(b == k)))
            start += t.num_rows
        for s in sinks:
            s.close()
        meta = schema.metadata
        with pq.ParquetWriter(out, schema, compression="zstd", store_schema=True,
                              use_dictionary=dictionary_columns(schema)) as w:
            for b in range(n_buckets):
                with ipc.open_file(str(tmp_dir / f"{b:05d}.arrow")) as f:
                    t = f.read_all()
                t = t.take(pa.array(np.argsort(t.column("_rank").to_numpy(), kind="stable")))
                t = t.drop_columns(["_rank"]).replace_schema_metadata(meta)
                w.write_table(t, row_group_size=row_group_rows)
                groups += math.ceil(t.num_rows / row_group_rows)
            if meta:  # "geo" and "tilescan": as collect writes them
                w.add_key_value_metadata(meta)
        os.replace(out, path)
    finally:
        for p in tmp_dir.glob("*"):
            p.unlink()
        tmp_dir.rmdir()
        if out.exists():
            out.unlink()
    return groups


def row_group_extents(path: Path, column: str = "bbox") -> np.ndarray:
    """``(G, 4)`` extents (xmin, ymin, xmax, ymax) of the row groups from the statistics of
    the covering column's leaves (NaN where a row group has none)."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).path for i in range(md.num_columns)]
    idx = [names.index(f"{column}.{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
    ext = np.full((md.num_row_groups, 4), np.nan)
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        st = [rg.column(i).statistics for i in idx]
        if all(s is not None and s.has_min_max for s in st):
            # the group's rows have xmin >= min(xmin) and xmax <= max(xmax): its extent
            ext[g] = (st[0].min, st[1].min, st[2].max, st[3].max)
    return ext


def row_groups_hit(path: Path | np.ndarray, query: Sequence[float], column: str = "bbox") -> tuple[int, int]:
    """``(row groups whose bbox statistics intersect query, all row groups)`` for a query
    ``(xmin, ymin, xmax, ymax)``: what a reader filtering on the covering column must read.
    ``path`` may be :func:`row_group_extents` already read."""
    ext = path if isinstance(path, np.ndarray) else row_group_extents(path, column)
    qx0, qy0, qx1, qy1 = query
    unknown = np.isnan(ext).any(axis=1)  # no statistics: a reader must read it
    hit = unknown | ((ext[:, 0] <= qx1) & (ext[:, 2] >= qx0) & (ext[:, 1] <= qy1) & (ext[:, 3] >= qy0))
    return int(hit.sum()), len(ext)
