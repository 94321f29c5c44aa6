#!/usr/bin/env python
"""Grad-CAM without a backward pass: the GAP -> Dense head's closed form against autodiff.

Run from the project root::

    python benchmarks/cam_head.py --out benchmarks/results/cam-head-cpu.json
    python benchmarks/cam_head.py --batch 256 --rounds 10     # e.g. on a GPU

On real 128 px Landsat tiles (``bench.ready_tiles``) and the packaged float32 model it times,
alternating round by round: the model's forward pass alone (``predict_on_batch``, as row 1 of
``bench.py``), Grad-CAM through autodiff (``GradCAM(fast_head=False)``) and Grad-CAM from the
dense kernel (``GradCAM(fast_head=True)``). It also records how far the two Grad-CAM paths
differ on those tiles (probabilities, targets, raw and normalised maps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench import REPO, alternate, log, machine, median, ready_tiles, versions  # noqa: E402


def differences(slow, fast, batches) -> dict[str, Any]:
    """Largest differences between the two paths' results over ``batches``."""
    out = {"probs_identical": True, "logits_identical": True, "targets_identical": True,
           "raw_max_abs": 0.0, "raw_max_rel": 0.0, "cam_max_abs": 0.0, "raw_bit_identical": True}
    for x in batches:
        a, b = slow(x), fast(x)
        out["probs_identical"] &= bool(np.array_equal(a.probs, b.probs))
        out["logits_identical"] &= bool(np.array_equal(a.logits, b.logits))
        out["targets_identical"] &= bool(np.array_equal(a.target, b.target))
        out["raw_bit_identical"] &= bool(np.array_equal(a.raw, b.raw))
        diff = np.abs(a.raw - b.raw)
        peak = np.maximum(a.raw.reshape(len(a.raw), -1).max(1), 1e-30)[:, None, None]
        out["raw_max_abs"] = max(out["raw_max_abs"], float(diff.max()))
        out["raw_max_rel"] = max(out["raw_max_rel"], float((diff / peak).max()))
        out["cam_max_abs"] = max(out["cam_max_abs"], float(np.abs(a.cam - b.cam).max()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=2, help="batches per timed call")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from tilescan.backend import import_keras

    keras = import_keras()
    from tilescan.explain.cam import GradCAM
    from tilescan.explain.shims import model_on_accelerator
    from tilescan.model import load_model

    lm = load_model()
    model = lm.model
    x = ready_tiles(args.batch * args.batches, lm.input_size)
    batches = [x[i * args.batch:(i + 1) * args.batch] for i in range(args.batches)]
    slow = GradCAM(model, layer=lm.cam_layer, fast_head=False)
    fast = GradCAM(model, layer=lm.cam_layer, fast_head=True)
    assert slow.path == "autodiff" and fast.path == "gap-dense", (slow, fast)
    auto = GradCAM(model, layer=lm.cam_layer)

    def each(fn: Callable[[np.ndarray], Any]) -> Callable[[], int]:
        def run() -> int:
            for b in batches:
                fn(b)
            return len(x)
        return run

    runners = {"model": each(model.predict_on_batch), "gradcam_autodiff": each(slow), "gradcam_gap_dense": each(fast)}
    log(f"timing {', '.join(runners)}: batch {args.batch}, {args.rounds} rounds")
    rates = alternate(runners, args.rounds)
    res: dict[str, Any] = {k: {"median": round(median(v), 2), "all": [round(r, 1) for r in v]} for k, v in rates.items()}
    for key in ("gradcam_autodiff", "gradcam_gap_dense"):  # per-round ratios: same load within a round
        res[f"{key}_over_model"] = round(median([c / m for c, m in zip(rates[key], rates["model"])]), 3)
    res["gap_dense_over_autodiff"] = round(
        median([f / s for f, s in zip(rates["gradcam_gap_dense"], rates["gradcam_autodiff"])]), 3)
    res["differences"] = differences(slow, fast, batches)
    res["auto_path"] = auto.path
    res["accelerator"] = model_on_accelerator(keras.backend.backend())
    res.update(batch=args.batch, batches_per_call=args.batches, rounds=args.rounds, backend=keras.backend.backend(),
               command=" ".join(["python", "benchmarks/cam_head.py", *(argv if argv is not None else sys.argv[1:])]),
               machine=machine(), versions=versions())
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        from tilescan.outputs.files import write_json

        write_json(args.out if args.out.is_absolute() else REPO / args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
