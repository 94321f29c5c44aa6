#!/usr/bin/env python
"""The scaling step of the tile reader: a window of uint16 bands to the model's float32 input.

Run from the project root::

    python benchmarks/scaling.py --out benchmarks/results/scaling.json   # about 1 min

One window as the host-ceiling run reads it (128 rows of 64 whole tiles of 128 px, 3 bands,
the real Landsat scene's pixels repeated across), scaled into the batch array two ways:
``table``, the way of sessions 11-17 (each band looked up in a 65,536-entry float32 table
built with the same float32 steps, over the whole window, then copied into the interleaved
batch), and ``reader``, ``SceneReader._to_unit`` (``tilescan.scene.scaling.to_unit``) as it is now. Each is timed in a fresh
process pinned to one core, alone and with a copy of itself on the other core at the same
time (the two cores share the L3 cache), the ways alternated, ``--rounds`` each; ns per
value, medians. Both ways must give the same array.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def _window():
    """(reader, data (3, 128, 64 * 128) uint16, the batch array (64, 128, 128, 3))."""
    import bench
    from rasterio.windows import Window

    from tilescan.config import TilingConfig
    from tilescan.scene.plan import open_scene

    reader = open_scene(bench.LANDSAT, TilingConfig(bands=list(bench.LANDSAT_BANDS), units="px", tile_size=128), 3, 128)
    raw, _ = reader._read_raw(Window(0, 640, 15 * 128, 128))
    data = np.ascontiguousarray(np.concatenate([raw] * 5, axis=2)[:, :, :64 * 128])
    return reader, data, np.empty((64, 128, 128, 3), np.float32)


def _table_way(reader, data: np.ndarray, x: np.ndarray) -> None:
    """Sessions 11-17: one float32 table per band, looked up over the whole window."""
    values = np.arange(65536, dtype=np.uint16).astype(np.float32)
    lut = np.clip((values[None, :] - reader._lo[:, None]) * reader._inv[:, None], 0.0, 1.0)
    out = x.transpose(1, 0, 2, 3)
    d = data.reshape(3, 128, 64, 128)
    for i in range(3):
        out[..., i] = lut[i].take(d[i])


def _reader_way(reader, data: np.ndarray, x: np.ndarray) -> None:
    reader._to_unit(data.reshape(3, 128, 64, 128), np.ones((128, 64, 128), bool), x.transpose(1, 0, 2, 3))


WAYS = {"table": _table_way, "reader": _reader_way}


def _child(way: str, repeats: int) -> float:
    """ns per value of ``way`` over ``repeats`` windows (after one untimed)."""
    reader, data, x = _window()
    fn = WAYS[way]
    fn(reader, data, x)
    t = time.perf_counter()
    for _ in range(repeats):
        fn(reader, data, x)
    return (time.perf_counter() - t) / repeats / data.size * 1e9


def _timed(way: str, cpus: list[int], repeats: int) -> float:
    """The slowest of one pinned process per cpu, all at once."""
    procs = [subprocess.Popen(["taskset", "-c", str(c), sys.executable, __file__, "_child", way, str(repeats)],
                              stdout=subprocess.PIPE, text=True) for c in cpus]
    got = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"the {way} run failed")
    return max(got)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        print(_child(argv[1], int(argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=40, help="windows scaled per timed process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import bench

    reader, data, x = _window()
    _table_way(reader, data, x)
    want = x.copy()
    _reader_way(reader, data, x)
    if not np.array_equal(want, x):
        raise SystemExit("the two ways differ")
    runs: dict[str, dict[str, list[float]]] = {w: {"one core": [], "two at once": []} for w in WAYS}
    for r in range(args.rounds):
        for w in (WAYS if r % 2 == 0 else list(WAYS)[::-1]):
            runs[w]["one core"].append(round(_timed(w, [0], args.repeats), 3))
            runs[w]["two at once"].append(round(_timed(w, [0, 1], args.repeats), 3))
        bench.log(f"scaling: round {r + 1}: " + ", ".join(f"{w} {v['one core'][-1]} / {v['two at once'][-1]} ns"
                                                      for w, v in runs.items()))
    res = {"benchmark": "scaling", "command": "python benchmarks/scaling.py " + " ".join(argv),
           "machine": bench.machine(), "window": {"shape": list(data.shape), "dtype": "uint16"},
           "same_values": True,
           "ns_per_value": {w: {k: round(median(v), 3) for k, v in m.items()} for w, m in runs.items()}, "rounds": runs}
    bench.report(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
