"""Spatially sorted collected tables (tilescan/outputs/spatial.py): the Hilbert key, the external
sort (same rows, metadata kept, compact row groups) and what a bbox query can skip, read
from the row-group statistics as a reader does; and collect's call site on real outputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batch_helpers as bh
from conftest import assert_geoparquet_conformant
from tilescan.outputs import spatial


def test_hilbert_index_visits_every_cell_once_stepping_to_a_neighbour():
    order = 4
    n = 1 << order
    x, y = np.meshgrid(np.arange(n), np.arange(n))
    d = spatial.hilbert_index(x.ravel(), y.ravel(), order)
    assert sorted(d.tolist()) == list(range(n * n))
    path = np.stack([x.ravel(), y.ravel()], 1)[np.argsort(d)]
    assert (np.abs(np.diff(path, axis=0)).sum(axis=1) == 1).all()  # each step moves to an adjacent cell
    assert spatial.hilbert_index(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0]), 1).tolist() == [0, 1, 2, 3]


def _mosaic(src: pa.Table, scenes_per_side: int, step: float, rng) -> list[pa.Table]:
    """Copies of a real collected table's rows moved onto a grid of scene footprints: one
    table per copy, as collect writes them (scene after scene)."""
    b = src.column("bbox").combine_chunks()
    f = {k: b.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")}
    x0, y0 = f["xmin"].min(), f["ymin"].min()
    out = []
    for i in range(scenes_per_side):
        for j in range(scenes_per_side):
            dx, dy = i * step - x0 + rng.uniform(0, step / 4), j * step - y0 + rng.uniform(0, step / 4)
            bbox = pa.StructArray.from_arrays([pa.array(f["xmin"] + dx), pa.array(f["ymin"] + dy),
                                               pa.array(f["xmax"] + dx), pa.array(f["ymax"] + dy)],
                                              fields=list(b.type))
            t = src.set_column(src.column_names.index("bbox"), "bbox", bbox)
            out.append(t.set_column(0, "scene", pa.array([f"s{i:03d}_{j:03d}"] * t.num_rows)))
    return out


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A real collected table (the four reference scenes, 128 px tiles)."""
    ref = bh.reference(tmp_path_factory)
    return pq.read_table(ref / "collected" / "tiles.parquet")


def test_sort_keeps_rows_and_metadata_and_prunes(collected, tmp_path):
    rng = np.random.default_rng(0)
    parts = _mosaic(collected, 12, 1.0, rng)  # 144 scene copies
    path = tmp_path / "tiles.parquet"
    schema = collected.schema
    with pq.ParquetWriter(path, schema, compression="zstd", store_schema=False) as w:
        for t in parts:
            w.write_table(t.cast(schema), row_group_size=65536)
        w.add_key_value_metadata(schema.metadata)  # as collect writes it
    before = pq.read_table(path)
    n_groups = spatial.sort_parquet(path, row_group_rows=256)
    after = pq.ParquetFile(path)
    assert after.metadata.num_rows == before.num_rows and n_groups == after.num_row_groups
    assert after.schema_arrow.metadata[b"geo"] == schema.metadata[b"geo"]  # still GeoParquet, same covering
    key = lambda t: t.sort_by([("scene", "ascending"), ("unit", "ascending"), ("tile_index", "ascending")])  # noqa: E731
    assert key(pq.read_table(path)).equals(key(before))
    keys = spatial.hilbert_keys(pq.read_table(path, columns=["bbox"]).column("bbox"))
    assert (np.diff(keys.astype(np.int64)) >= 0).all()  # in curve order

    # queries of about one scene copy: every matching row is in a row group the statistics keep
    t = pq.read_table(path, columns=["bbox"]).column("bbox").combine_chunks()
    bx = {k: t.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")}
    rg_of_row = np.repeat(np.arange(after.num_row_groups), [after.metadata.row_group(g).num_rows
                                                            for g in range(after.num_row_groups)])
    skipped_sorted, skipped_plain = [], []
    plain = tmp_path / "plain.parquet"
    with pq.ParquetWriter(plain, schema, compression="zstd", store_schema=False) as w:
        for p in parts:  # scene order, row groups of the same size: the comparison
            w.write_table(p.cast(schema), row_group_size=256)
    for _ in range(20):
        qx, qy = rng.uniform(0, 12, 2)
        q = (qx, qy, qx + 1.0, qy + 1.0)
        hit, total = spatial.row_groups_hit(path, q)
        inside = (bx["xmin"] <= q[2]) & (bx["xmax"] >= q[0]) & (bx["ymin"] <= q[3]) & (bx["ymax"] >= q[1])
        needed = set(rg_of_row[inside].tolist())
        assert len(needed) <= hit
        skipped_sorted.append(1 - hit / total)
        h, tot = spatial.row_groups_hit(plain, q)
        skipped_plain.append(1 - h / tot)
    assert np.mean(skipped_sorted) > 0.9
    assert np.mean(skipped_sorted) >= np.mean(skipped_plain)


def test_collect_sorts_a_large_table(tmp_path, tmp_path_factory, monkeypatch):
    """collect's call site, with the size bounds lowered so the real reference is 'large'."""
    from tilescan.outputs.collect import _TableWriter, run_collect

    out = tmp_path / "out"
    shutil.copytree(bh.reference(tmp_path_factory), out)
    shutil.rmtree(out / "collected")
    monkeypatch.setattr(spatial, "SORT_MIN_ROWS", 10)
    monkeypatch.setattr(spatial, "ROW_GROUP_ROWS", 16)
    monkeypatch.setattr(_TableWriter, "GROUP_ROWS", 20)  # the unsorted table in row groups too, as a large one is
    run_collect(out, gpkg=False, log=lambda m: None)
    f = pq.ParquetFile(out / "collected" / "tiles.parquet")
    assert all(f.metadata.row_group(g).num_rows <= 16 for g in range(f.num_row_groups)) and f.num_row_groups > 4
    keys = spatial.hilbert_keys(f.read(columns=["bbox"]).column("bbox"))
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    bh.assert_same_tiles(bh.collected(out), bh.collected(bh.reference(tmp_path_factory)), exact=True)
    assert json.loads(f.schema_arrow.metadata[b"geo"])["columns"]["geometry"]["covering"]["bbox"]
    label = f.read(columns=["label"]).to_pandas()["label"]  # still every class of the model, in its order
    assert list(label.cat.categories) == json.loads(f.schema_arrow.metadata[b"tilescan"])["classes"]
    order = {o["id"]: o for o in assert_geoparquet_conformant(out / "collected" / "tiles.parquet")["outcomes"]}
    assert order["/conf/distribution/spatial-order"]["status"] == "pass", order["/conf/distribution/spatial-order"]
