#!/usr/bin/env python
"""Reduced precision against float32 on the AID test split: do the labels hold?

    python benchmarks/precision.py [--split test] [--n N] [--out benchmarks/results/precision-cpu.json]
    KERAS_BACKEND=jax python benchmarks/precision.py --out benchmarks/results/precision-h200.json   # on a GPU

Runs the shipped model + Grad-CAM in float32 and in bf16 (``[inference] precision``) on the
same images (every image of the split by default, resized as ``tilescan evaluate`` does), on
whatever device the backend uses, and reports: the share of images whose label is the same in
both, each precision's accuracy against the true labels, how close the changed labels were
to a tie in float32, CAM and probability differences, and the speed of each. ``auto`` may use
a reduced precision on a device only where the label agreement is at least
``AUTO_MIN_AGREEMENT`` (issue 13). Evaluation only: nothing is trained or tuned on the split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import bench  # noqa: E402  (compare_outputs, machine facts, the shared data folder)

#: Label agreement with float32 a reduced precision needs before ``auto`` may pick it.
AUTO_MIN_AGREEMENT = 0.995


def split_images(split: str, n: int | None, size: int, classes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The split's images (all, or ``n`` spread over it) as the model sees them, their true
    class indexes and names; exits with a message where the data is missing."""
    from tilescan.training.data import load_eval_image

    root = bench.DATA / "aid"
    lst = root / "splits" / f"{split}.txt"
    if not lst.exists():
        sys.exit(f"precision.py: {lst} is missing (the AID data, see ../shared/data/README.md)")
    names = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
    if n is not None and n < len(names):
        names = [names[int(i)] for i in np.linspace(0, len(names) - 1, num=n)]
    index = {c: i for i, c in enumerate(classes)}  # a test image's class is its folder
    truth = np.array([index.get(p.split("/")[0], -1) for p in names])
    x = np.stack([load_eval_image(root / "images" / p, size) for p in names])
    return x, truth, names


def run_engine(engine, x: np.ndarray, bs: int) -> tuple[np.ndarray, float]:
    engine(x[:bs])  # compiled and warm before the clock starts
    t0 = time.perf_counter()
    probs = np.concatenate([np.asarray(engine(x[i:i + bs]).probs) for i in range(0, len(x), bs)])
    return probs, len(x) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=("test", "val"))
    ap.add_argument("--n", type=int, help="images spread over the split (default: all)")
    ap.add_argument("--batch", type=int, help="batch size (default: [inference] batch_size)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)

    from tilescan.pipeline.engine import Engine

    engines = {p: Engine(bench.default_config(inference={"precision": p})) for p in ("float32", "bf16")}
    ref = engines["float32"]
    bs = args.batch or ref.batch_size
    x, truth, names = split_images(args.split, args.n, ref.input_size, list(ref.classes))
    known = truth >= 0
    res: dict = {"benchmark": "precision", "command": "python benchmarks/precision.py " + " ".join(sys.argv[1:]),
                 "machine": bench.machine(), "runtime": ref.runtime, "split": f"AID {args.split}",
                 "images": int(len(x)), "batch": bs, "auto_min_agreement": AUTO_MIN_AGREEMENT, "precisions": {}}
    probs = {}
    for p, eng in engines.items():
        probs[p], rate = run_engine(eng, x, bs)
        acc = float((probs[p].argmax(1)[known] == truth[known]).mean()) if known.any() else None
        res["precisions"][p] = {"model_tiles_per_s": round(rate, 1), "accuracy": None if acc is None else round(acc, 4)}
        bench.log(f"precision: {p}: {rate:.1f} images/s, accuracy {acc}")
    check = bench.compare_outputs(ref, engines["bf16"], x, bs)  # labels, CAMs, probabilities
    changed = np.flatnonzero(probs["float32"].argmax(1) != probs["bf16"].argmax(1))
    res["precisions"]["bf16"].update(check)
    res["precisions"]["bf16"]["changed"] = [names[i] for i in changed[:50]]
    res["precisions"]["bf16"]["auto_may_pick"] = check["label_agreement"] >= AUTO_MIN_AGREEMENT
    bench.report(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
