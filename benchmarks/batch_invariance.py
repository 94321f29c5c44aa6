#!/usr/bin/env python
"""TensorFlow's oneDNN kernels on and off: model + Grad-CAM speed, and whether a tile's result
depends on the batch it is in.

    python benchmarks/batch_invariance.py --rounds 5 --out benchmarks/results/batch-invariance.json

For each ``TF_ENABLE_ONEDNN_OPTS`` (1: what tilescan sets unless the user set it; 0: what
TensorFlow picks by itself on CPUs without AVX-512 VNNI/BF16 or AMX) a fresh process builds
the run's engine (the shipped model + Grad-CAM, the default config) and, on real tiles of the
Landsat scene, measures tiles/s at the run's batch size, then runs the same tiles again with
the batch rolled (each tile at another place, beside other tiles) and as a shorter batch, and
counts the tiles whose probabilities or heat maps are not the same bits. The two settings'
processes alternate, ``--rounds`` times each; the medians and each round are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import bench  # noqa: E402

SETTINGS = ("1", "0")


def _differ(a, b) -> dict:
    """Tiles of ``a`` and ``b`` (two results for the same tiles) whose probabilities or maps
    differ in any bit, and the largest differences."""
    probs = ~(a.probs == b.probs).all(axis=1)
    cam = ~(a.cam == b.cam).reshape(len(a.cam), -1).all(axis=1)
    return {"tiles": len(a.probs), "probs_differ": int(probs.sum()), "cam_differ": int(cam.sum()),
            "labels_differ": int((a.probs.argmax(1) != b.probs.argmax(1)).sum()),
            "probs_max_abs": float(np.abs(a.probs - b.probs).max()), "cam_max_abs": float(np.abs(a.cam - b.cam).max())}


def _child(batches: int) -> dict:
    from tilescan.backend import tensorflow_onednn_enabled

    cfg = bench.default_config()
    engine = bench.make_engine(cfg)
    engine.ready()
    bs = engine.batch_size
    x = bench.ready_tiles(bs)
    engine(x)  # warm
    t0 = time.perf_counter()
    for _ in range(batches):
        whole = engine(x)
    rate = batches * bs / (time.perf_counter() - t0)
    shift = bs // 3
    rolled = engine(np.roll(x, shift, axis=0))
    back = dataclasses.replace(rolled, probs=np.roll(rolled.probs, -shift, axis=0), cam=np.roll(rolled.cam, -shift, axis=0))
    half = engine(x[: bs // 2])
    return {"onednn": tensorflow_onednn_enabled(), "precision": engine.precision, "batch": bs,
            "tiles_per_s": round(rate, 1), "rolled": _differ(whole, back), "half": _differ(whole.rows(0, bs // 2), half)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for r in range(args.rounds):
        for s in SETTINGS:
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": s, "KERAS_BACKEND": "tensorflow"}
            p = subprocess.run([sys.executable, __file__, "_child", str(args.batches)], capture_output=True,
                               text=True, env=env, check=True)
            got = json.loads(p.stdout.strip().splitlines()[-1])
            runs[s].append(got)
            bench.log(f"TF_ENABLE_ONEDNN_OPTS={s}, round {r + 1}: {got['tiles_per_s']} tiles/s, "
                      f"rolled batch: {got['rolled']['probs_differ']} / {got['rolled']['tiles']} tiles differ")
    rate = {s: bench.median([g["tiles_per_s"] for g in runs[s]]) for s in SETTINGS}
    res = {"benchmark": "batch_invariance", "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(argv or sys.argv[1:]),
           "machine": bench.machine(), "versions": bench.versions(),
           "tiles_per_s": rate, "onednn_to_eigen": round(rate["1"] / rate["0"], 3),
           "ratio_by_round": [round(a["tiles_per_s"] / b["tiles_per_s"], 3) for a, b in zip(runs["1"], runs["0"])],
           "rolled_tiles_differ": {s: [g["rolled"]["probs_differ"] for g in runs[s]] for s in SETTINGS},
           "runs": runs}
    bench.report(res, args.out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        print(json.dumps(_child(int(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
