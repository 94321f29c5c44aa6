#!/usr/bin/env python
"""What a tile cut by the scene's edge shows the model past that edge: black, or the part
inside mirrored. Accuracy of the packaged model on AID validation images (never the test
split) cut to their first ``keep`` rows or columns of 128, the rest filled each way.

Run from the project root::

    python benchmarks/edge_padding.py --out benchmarks/results/edge-padding.json   # about 3 min on 2 cores

Fills: ``black`` (0, what ``run`` fed the model before), ``mirror`` (numpy's ``reflect``,
what it feeds now, ``tilescan.scene.reader.mirror_outside_data``), ``edge`` (the last row or
column repeated) and ``mean`` (the images' mean colour). A label counts as kept when the
cut image gets its folder's class; the uncut images give the ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

FILLS = ("black", "mirror", "edge", "mean")


def _filled(x: np.ndarray, keep: int, fill: str, mean: np.ndarray) -> np.ndarray:
    """Images ``x`` (N, 128, 128, C) with rows ``keep:`` replaced by ``fill``."""
    inside = x[:, :keep]
    if fill == "black":
        return np.concatenate([inside, np.zeros_like(x[:, keep:])], axis=1)
    if fill == "mean":
        return np.concatenate([inside, np.broadcast_to(mean, x[:, keep:].shape)], axis=1)
    mode = "reflect" if fill == "mirror" else "edge"
    return np.pad(inside, ((0, 0), (0, x.shape[1] - keep), (0, 0), (0, 0)), mode=mode)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("TILESCAN_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--images", type=int, default=900, help="validation images, drawn with a fixed seed")
    ap.add_argument("--keep", default="96,83,64,45,32", help="rows (or columns) of 128 inside the scene")
    ap.add_argument("--out", help="write the results JSON here")
    a = ap.parse_args(argv)

    import tilescan
    from tilescan.training.data import load_eval_image

    aid = Path(a.data) / "aid"
    if not (aid / "splits" / "val.txt").is_file():
        sys.exit(f"no AID validation split under {aid}: see ../shared/data/README.md")
    lm = tilescan.load_model()
    classes = list(lm.classes)
    names = [ln.split()[0] for ln in (aid / "splits" / "val.txt").read_text().splitlines() if ln.strip()]
    random.Random(0).shuffle(names)
    names = names[: a.images]
    x = np.stack([load_eval_image(aid / "images" / n, lm.input_size) for n in names])
    y = np.array([classes.index(Path(n).parent.name) for n in names])
    mean = x.mean(axis=(0, 1, 2))

    def kept(images: np.ndarray) -> float:
        return float((np.asarray(lm.model.predict(images, batch_size=64, verbose=0)).argmax(-1) == y).mean())

    res = {"images": len(names), "split": "val", "model": lm.meta.get("id"), "uncut": kept(x), "cut": []}
    print(f"uncut: {res['uncut']:.3f} of {len(names)} validation images keep their label")
    for keep in (int(k) for k in a.keep.split(",")):
        for axis in ("rows", "columns"):
            row = {"keep": keep, "of": lm.input_size, "axis": axis}
            for fill in FILLS:
                xs = x if axis == "rows" else x.transpose(0, 2, 1, 3)
                cut = _filled(xs, keep, fill, mean)
                row[fill] = kept(cut if axis == "rows" else cut.transpose(0, 2, 1, 3))
            res["cut"].append(row)
            print(f"{keep:4d} {axis:8s} " + "  ".join(f"{f} {row[f]:.3f}" for f in FILLS), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
