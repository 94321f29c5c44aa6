#!/usr/bin/env python
"""At what ground scale does a tilescan model work? Accuracy on AID as a function of scale.

Run from the project root::

    python benchmarks/scale_curve.py --data ../shared/data/aid \\
        --out benchmarks/results/scale-curve.json --plot docs/scale-curve.png
    python benchmarks/scale_curve.py --data ../shared/data/aid --limit 60 --out /tmp/s.json   # smoke run

AID images are 600 px at 0.5-8 m/px, stored in ``../shared/data/aid`` at 150 px; the
model's evaluation view resizes the whole stored image to the model input (128 px), so at
that native view one input pixel covers ``600/128 x [0.5, 8] = [2.34, 37.5]`` m. The
relative scale ``s`` is the effective metres per input pixel relative to that view
(``s < 1``: finer pixels, ``s > 1``: coarser). Three ways of changing it:

``zoom_in``  (s < 1) a centre crop of side ``round(150 s)`` of the stored image, resized to
             128: finer pixels and a smaller footprint, as when a finer scene is cut into
             128-px tiles;
``blur``     (s > 1) the whole image resized to ``round(128 / s)`` px and back up to 128:
             the same footprint at a coarser effective resolution (what resampling a tile
             cannot restore);
``context``  (s > 1) the image shrunk to a cell of ``round(128 / s)`` px, put in the centre
             cell of a k x k mosaic (k odd, k * cell >= 128) whose other cells are other
             images of the same class and split (a seeded order per image), and the central
             128 px cropped: a larger footprint and coarser pixels, as when a coarser scene is
             cut into 128-px tiles.

At ``s = 1`` all three are the evaluation view itself, measured once and shared.

Every level is scored on the val split, the curve is extended outwards (by factors of
sqrt 2) while its outermost val accuracy is still at least ``--extend-below`` x the peak,
and then the test split is scored at the same levels (scoring only: nothing is chosen on
it). The recorded range comes from the val curve: peak = the best val accuracy over all
levels and modes; from s = 1 outwards, ``s_in`` is where the zoom-in curve first falls
below ``threshold x peak`` (linear in log s between the two levels around the crossing; the
last level when it never falls), ``s_out`` the same on the context curve (``s_out_blur``
on the blur curve, reported only). The model's range in metres per input pixel is
``[2.34 s_in, 37.5 s_out]`` and its nominal 128-px tile footprint 128 times that.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a plain checkout
    sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

from tilescan.training.data import decode_rgb, load_dataset, resize

MODES = ("zoom_in", "blur", "context")
DEFAULT_LEVELS = (0.25, 0.35, 0.5, 0.71, 1.0, 1.41, 2.0, 2.83, 4.0)
AID_SOURCE_PX = 600  # AID's original image side (Xia et al. 2017)
AID_GSD_M = (0.5, 8.0)  # the dataset's span of metres per original pixel; per-image GSD is not given
THRESHOLD = 0.9
EXTEND_BELOW = 0.5
SEED = 20261126
MIN_CROP_PX = 8  # smallest centre crop (px of the stored image) a zoom-in level may take
MIN_CELL_PX = 4  # smallest cell (px) an image may shrink to for a zoom-out level


def native_gsd(input_px: int) -> tuple[float, float]:
    """Metres per model-input pixel of AID's evaluation view (the whole image resized)."""
    f = AID_SOURCE_PX / input_px
    return (AID_GSD_M[0] * f, AID_GSD_M[1] * f)


# ----------------------------------------------------------------------------- transforms


def crop_side(stored_px: int, s: float) -> int:
    return max(1, int(round(stored_px * s)))


def cell_side(input_px: int, s: float) -> int:
    return max(1, int(round(input_px / s)))


def mosaic_k(input_px: int, cell: int) -> int:
    """The smallest odd k with k * cell >= input_px."""
    k = max(1, math.ceil(input_px / cell))
    return k if k % 2 == 1 else k + 1


def zoom_in(img: np.ndarray, s: float, size: int) -> np.ndarray:
    """Centre crop of side round(H * s) of ``img`` (H x H), resized to ``size``."""
    h, w = img.shape[:2]
    side = min(crop_side(h, s), h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    return resize(img[y0 : y0 + side, x0 : x0 + side], size)


def blur(img: np.ndarray, s: float, size: int) -> np.ndarray:
    """The whole image resized to round(size / s) px and back up to ``size``."""
    return resize(resize(img, cell_side(size, s)), size)


def context(cell_imgs: Sequence[np.ndarray], size: int) -> np.ndarray:
    """The central ``size`` px of a k x k mosaic of equal square cells, filled row by row
    (``cell_imgs[0]`` goes in the centre cell, the rest in the others in reading order)."""
    cell = cell_imgs[0].shape[0]
    k = mosaic_k(size, cell)
    if len(cell_imgs) != k * k:
        raise ValueError(f"a {k}x{k} mosaic needs {k * k} cells, got {len(cell_imgs)}")
    mosaic = np.empty((k * cell, k * cell, 3), dtype=cell_imgs[0].dtype)
    centre = (k // 2) * k + k // 2
    order = [0] * (k * k)
    others = iter(range(1, k * k))
    for pos in range(k * k):
        order[pos] = 0 if pos == centre else next(others)
    for pos, idx in enumerate(order):
        r, c = divmod(pos, k)
        mosaic[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = cell_imgs[idx]
    o = (k * cell - size) // 2
    return mosaic[o : o + size, o : o + size]


def partner_orders(labels: np.ndarray, seed: int = SEED) -> list[np.ndarray]:
    """For each image, a seeded order of the other images of its class (indices into
    ``labels``); the same order serves every level, so levels differ only in scale."""
    labels = np.asarray(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    out = []
    for i, c in enumerate(labels):
        pool = by_class[c][by_class[c] != i]
        if len(pool) == 0:
            pool = np.array([i])  # a class of one image: the mosaic repeats it
        out.append(np.random.default_rng((seed, i)).permutation(pool))
    return out


def context_batch(images: Sequence[np.ndarray], idx: Sequence[int], partners: list[np.ndarray], s: float, size: int,
                  cells: dict[int, np.ndarray]) -> np.ndarray:
    """Context views of ``images[idx]``; ``cells`` caches each image shrunk to the cell."""
    cell = cell_side(size, s)
    k = mosaic_k(size, cell)
    need = k * k - 1
    out = np.empty((len(idx), size, size, 3), np.uint8)
    for j, i in enumerate(idx):
        p = partners[i]
        picks = np.resize(p, need) if need else p[:0]  # cycle through the partners when a class has too few
        members = [i, *picks.tolist()]
        for m in members:
            if m not in cells:
                cells[m] = resize(images[m], cell)
        out[j] = context([cells[m] for m in members], size)
    return out


def view_batch(mode: str, s: float, images: Sequence[np.ndarray], idx: Sequence[int], partners: list[np.ndarray],
               size: int, cells: dict[int, np.ndarray]) -> np.ndarray:
    """uint8 model inputs (B, size, size, 3) of ``images[idx]`` at relative scale ``s``."""
    if s == 1.0:
        return np.stack([resize(images[i], size) for i in idx])
    if mode == "zoom_in":
        return np.stack([zoom_in(images[i], s, size) for i in idx])
    if mode == "blur":
        return np.stack([blur(images[i], s, size) for i in idx])
    if mode == "context":
        return context_batch(images, idx, partners, s, size, cells)
    raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")


# ----------------------------------------------------------------------------- scoring


def score(model, classes: Sequence[str], images: Sequence[np.ndarray], labels: np.ndarray, partners: list[np.ndarray],
          mode: str, s: float, size: int, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy and macro-F1 of ``model`` on the views of one mode and level (float32, no TTA)."""
    from tilescan.training.evaluate import predict_probs
    from tilescan.training.metrics import compute_metrics

    n = len(images)
    pred = np.empty(n, np.int64)
    cells: dict[int, np.ndarray] = {}
    chunk = batch_size * 4
    for a in range(0, n, chunk):
        idx = range(a, min(n, a + chunk))
        x = view_batch(mode, s, images, idx, partners, size, cells).astype(np.float32) / 255.0
        pred[a : a + len(x)] = predict_probs(model, x, tta=False, batch_size=batch_size).argmax(axis=1)
    m = compute_metrics(labels, pred, classes)
    row: dict[str, Any] = {"s": s, "accuracy": m["accuracy"], "macro_f1": m["macro"]["f1"], "n": m["n"],
                           "top_confusions": m["top_confusions"][:3]}
    stored = images[0].shape[0]
    if mode == "zoom_in" and s != 1.0:
        row["crop_px"] = crop_side(stored, s)
        row["s_effective"] = row["crop_px"] / stored
    elif mode in ("blur", "context") and s != 1.0:
        row["cell_px"] = cell_side(size, s)
        row["s_effective"] = size / row["cell_px"]
        if mode == "context":
            row["mosaic_k"] = mosaic_k(size, row["cell_px"])
    return row


def mode_levels(mode: str, levels: Sequence[float]) -> list[float]:
    """The levels a mode covers, always including s = 1, ordered outwards from it."""
    if mode == "zoom_in":
        return sorted({1.0, *(s for s in levels if s < 1)}, reverse=True)
    return sorted({1.0, *(s for s in levels if s > 1)})


def next_level(mode: str, s: float, stored_px: int, size: int) -> float | None:
    """The next level outwards (a factor sqrt 2), or None past the smallest crop/cell."""
    t = round(s / math.sqrt(2) if mode == "zoom_in" else s * math.sqrt(2), 3)
    if mode == "zoom_in":
        return t if crop_side(stored_px, t) >= MIN_CROP_PX else None
    return t if cell_side(size, t) >= MIN_CELL_PX else None


def peak_of(curves: dict[str, list[dict]]) -> dict[str, Any]:
    best = max(((row["accuracy"], mode, row["s"]) for mode, rows in curves.items() for row in rows), key=lambda t: t[0])
    return {"accuracy": best[0], "mode": "native" if best[2] == 1.0 else best[1], "s": best[2]}


def edge(rows: Sequence[dict], level: float) -> float:
    """Going out from s = 1 along ``rows`` (ordered outwards), where accuracy first falls
    below ``level``: interpolated linearly in log s between the levels around the
    crossing; the last level if it never falls, s = 1 if it starts below."""
    if rows[0]["accuracy"] < level:
        return float(rows[0]["s"])
    for a, b in zip(rows, rows[1:]):
        if b["accuracy"] < level:
            t = (a["accuracy"] - level) / (a["accuracy"] - b["accuracy"])
            return float(math.exp(math.log(a["s"]) + t * (math.log(b["s"]) - math.log(a["s"]))))
    return float(rows[-1]["s"])


def summarise(curves: dict[str, list[dict]], input_px: int, threshold: float = THRESHOLD,
              split: str = "val") -> dict[str, Any]:
    """Peak, edges and the model's ground-scale range from one split's curves (val for the record)."""
    peak = peak_of(curves)
    level = threshold * peak["accuracy"]
    s_in = edge(curves["zoom_in"], level)
    s_out = edge(curves["context"], level)
    lo, hi = native_gsd(input_px)
    gsd = [lo * s_in, hi * s_out]
    return {
        "peak": {**peak, "split": split},
        "threshold": threshold,
        "threshold_accuracy": level,
        "s_in": s_in,
        "s_out": s_out,
        "s_out_blur": edge(curves["blur"], level),
        "native_gsd_m": [lo, hi],
        "input_gsd_m": gsd,
        "tile_footprint_m": [input_px * gsd[0], input_px * gsd[1]],
    }


def measure(model, classes: Sequence[str], size: int, splits: dict[str, tuple[list[np.ndarray], np.ndarray]],
            levels: Sequence[float] = DEFAULT_LEVELS, extend_below: float = EXTEND_BELOW, batch_size: int = 64,
            seed: int = SEED, log: Callable[[str], None] = print) -> dict[str, dict[str, list[dict]]]:
    """``{mode: {split: [row per level, outwards from s = 1]}}``. The val split decides the
    levels (grid, then extension); the other splits are scored at those levels."""
    if "val" not in splits:
        raise ValueError("the val split is required: the levels and the range are chosen on it")
    order = ["val", *(k for k in splits if k != "val")]
    results: dict[str, dict[str, list[dict]]] = {m: {} for m in MODES}
    for split in order:
        images, labels = splits[split]
        partners = partner_orders(labels, seed)
        native = None
        t0 = time.perf_counter()
        for mode in MODES:
            wanted = mode_levels(mode, levels) if split == "val" else [r["s"] for r in results[mode]["val"]]
            rows = []
            for s in wanted:
                if s == 1.0 and native is not None:
                    rows.append(dict(native))
                    continue
                rows.append(score(model, classes, images, labels, partners, mode, s, size, batch_size))
                log(f"  {split:4s} {mode:7s} s={s:<6g} acc={rows[-1]['accuracy']:.4f} "
                    f"macroF1={rows[-1]['macro_f1']:.4f}  ({time.perf_counter() - t0:.0f} s)")
                if s == 1.0:
                    native = rows[-1]
            results[mode][split] = rows
        if split == "val" and extend_below > 0:
            stored = images[0].shape[0]
            for mode in MODES:
                rows = results[mode]["val"]
                while rows[-1]["accuracy"] >= extend_below * peak_of({m: results[m]["val"] for m in MODES})["accuracy"]:
                    s = next_level(mode, rows[-1]["s"], stored, size)
                    if s is None:
                        break
                    rows.append(score(model, classes, images, labels, partners, mode, s, size, batch_size))
                    log(f"  val  {mode:7s} s={s:<6g} acc={rows[-1]['accuracy']:.4f} (extended)")
    return results


# ----------------------------------------------------------------------------- plot


def plot(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Accuracy against effective metres per input pixel, one line per mode and split."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    from tilescan.explain.figures import new_figure, save_figure

    lo, hi = report["native_gsd_m"]
    mid = math.sqrt(lo * hi)
    colours = {"zoom_in": "#1f77b4", "blur": "#ff7f0e", "context": "#2ca02c"}
    names = {"zoom_in": "zoom in (centre crop)", "blur": "zoom out: blur (down + up)", "context": "zoom out: context (mosaic)"}
    fig = new_figure(12, 6.2)
    ax = fig.add_axes((0.07, 0.11, 0.64, 0.76))
    ax.set_xscale("log")
    for mode in MODES:
        for split, style in (("val", "-"), ("test", "--")):
            rows = report["results"][mode].get(split)
            if not rows:
                continue
            rows = sorted(rows, key=lambda r: r["s"])
            ax.plot([r["s"] * mid for r in rows], [r["accuracy"] for r in rows], style, color=colours[mode],
                    marker="o" if split == "val" else "s", ms=5 if split == "val" else 4, lw=2 if split == "val" else 1.4)
    thr = report["threshold_accuracy"]
    ax.axhline(thr, color="0.35", ls=":", lw=1.5)
    ax.axvspan(report["s_in"] * mid, report["s_out"] * mid, color="#2ca02c", alpha=0.12, lw=0)
    ax.axvline(report["s_out_blur"] * mid, color=colours["blur"], ls=":", lw=1.2)
    all_s = sorted({r["s"] for mode in MODES for r in report["results"][mode]["val"]})
    x0, x1 = all_s[0] * mid / 1.15, all_s[-1] * mid * 1.15
    ax.set_xlim(x0, x1)
    ax.set_ylim(0, 1)
    ticks = [t for t in (0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500) if x0 <= t <= x1]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"effective metres per input pixel  (s x {mid:.1f} m: the geometric middle of AID's {lo:.2f}-{hi:.1f} m)",
                  fontsize=11)
    ax.set_ylabel("accuracy", fontsize=11)
    top = ax.secondary_xaxis("top", functions=(lambda m: m / mid, lambda s: s * mid))
    top.xaxis.set_major_locator(FixedLocator(all_s))
    top.xaxis.set_minor_locator(NullLocator())
    top.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    top.set_xlabel("relative scale s  (1 = the evaluation view: the whole AID image resized to 128 px)", fontsize=11)
    ax.tick_params(labelsize=10)
    top.tick_params(labelsize=9)
    ax.grid(True, which="major", alpha=0.3)
    handles = [Line2D([], [], color=colours[m], lw=2.5, label=names[m]) for m in MODES]
    handles += [Line2D([], [], color="0.2", ls="-", marker="o", ms=5, lw=2, label="val split (chooses the range)"),
                Line2D([], [], color="0.2", ls="--", marker="s", ms=4, lw=1.4, label="test split (scored only)"),
                Line2D([], [], color="0.35", ls=":", lw=1.5, label=f"{report['threshold']:.0%} of the val peak ({thr:.3f})"),
                Patch(color="#2ca02c", alpha=0.25, label="kept range (context edge)"),
                Line2D([], [], color=colours["blur"], ls=":", lw=1.2, label="coarse edge on the blur curve")]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.725, 0.87), fontsize=10, frameon=False)
    g, f = report["input_gsd_m"], report["tile_footprint_m"]
    p = report["peak"]
    fig.text(0.73, 0.11,
             f"val peak {p['accuracy']:.3f} ({p['mode'].replace('_', ' ')}, s = {p['s']:g})\n"
             f"kept range: s = {report['s_in']:.2f} to {report['s_out']:.2f}\n"
             f"  (blur curve: up to s = {report['s_out_blur']:.2f})\n"
             f"input pixel: {g[0]:.1f} to {g[1]:.1f} m\n"
             f"128-px tile: {f[0]:.0f} m to {f[1] / 1000:.1f} km",
             fontsize=10.5, va="bottom", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    ax.set_title(f"{report['model']['id']} on AID: accuracy vs ground scale", fontsize=12, pad=34)
    return save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- main


def load_split(ds, split: str, limit: int | None, seed: int) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    items = ds.items(split)
    if limit is not None and limit < len(items):
        sel = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = [items[i] for i in sel]
    images = [decode_rgb(ds.root / p) for p, _ in items]
    shapes = {im.shape for im in images}
    if len(shapes) != 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        raise SystemExit(f"scale_curve: {ds.root}: the '{split}' images must all be square and of one size, got {sorted(shapes)[:4]}")
    return [p for p, _ in items], images, np.array([c for _, c in items], np.int64)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="AID folder (images/, classes.txt, splits/)")
    ap.add_argument("--model", default=None, help="a tilescan .keras model (default: the packaged one)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--plot", default=None, help="write the curve PNG here")
    ap.add_argument("--limit", type=int, default=None, help="a seeded subset of N images per split (smoke runs)")
    ap.add_argument("--levels", default=",".join(f"{s:g}" for s in DEFAULT_LEVELS),
                    help="relative scales s, comma-separated (1 is always added)")
    ap.add_argument("--splits", default="val,test", help="splits to score; val is required")
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="fraction of the val peak the range keeps")
    ap.add_argument("--extend-below", type=float, default=EXTEND_BELOW,
                    help="extend a curve outwards while its end is at least this fraction of the peak (0: never)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        levels = sorted({float(v) for v in args.levels.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"scale_curve: --levels: expected comma-separated numbers, got {args.levels!r}") from None
    if not levels or min(levels) <= 0:
        raise SystemExit(f"scale_curve: --levels: every level must be > 0, got {args.levels!r}")
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if "val" not in splits:
        raise SystemExit("scale_curve: --splits must include val (the range is chosen on it)")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"scale_curve: --limit must be >= 1, got {args.limit}")

    from tilescan.model import load_model

    lm = load_model(args.model)
    ds = load_dataset(args.data)
    if lm.classes != ds.classes:
        raise SystemExit(f"scale_curve: {args.data}: the dataset's classes differ from the model's ({lm.path})")
    size = lm.input_size
    data: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    for split in splits:
        t0 = time.perf_counter()
        _, images, labels = load_split(ds, split, args.limit, args.seed)
        data[split] = (images, labels)
        print(f"decoded {len(images)} {split} images ({images[0].shape[0]} px) in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"scoring {lm.model_id} at s = {', '.join(f'{s:g}' for s in levels)}", flush=True)
    results = measure(lm.model, lm.classes, size, data, levels, args.extend_below, args.batch_size, args.seed,
                      log=lambda m: print(m, flush=True))
    report = build_report(results, size, args.threshold, lm, ds, {k: len(v[1]) for k, v in data.items()},
                          images_px=data["val"][0][0].shape[0],
                          command=shlex.join(["python", "benchmarks/scale_curve.py", *argv]),
                          seconds=time.perf_counter() - t_start, limit=args.limit, seed=args.seed,
                          batch_size=args.batch_size)
    if args.out:
        from tilescan.outputs.files import write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
        print(f"wrote {args.out}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    print(format_table(report))
    return report


def build_report(results, size: int, threshold: float, lm, ds, counts: dict[str, int], images_px: int, command: str,
                 seconds: float, limit: int | None = None, seed: int = SEED, batch_size: int = 64) -> dict[str, Any]:
    summary = summarise({m: results[m]["val"] for m in MODES}, size, threshold)
    levels = sorted({r["s"] for m in MODES for r in results[m]["val"]})
    test_edges = None
    if all("test" in results[m] for m in MODES):  # the same rule on test, for comparison only
        t = summarise({m: results[m]["test"] for m in MODES}, size, threshold, split="test")
        test_edges = {k: t[k] for k in ("peak", "s_in", "s_out", "s_out_blur")}
    return {
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "model": {"id": lm.model_id, "path": lm.path, "sha256": lm.sha256, "input_px": size},
        "dataset": {**ds.provenance(), "stored_px": images_px, "source_px": AID_SOURCE_PX, "source_gsd_m": list(AID_GSD_M),
                    "scored": counts, "limit": limit},
        "settings": {"precision": "float32", "batch_size": batch_size, "tta": False, "seed": seed},
        "modes": {
            "zoom_in": "s < 1: centre crop of side round(stored_px * s), resized to input_px",
            "blur": "s > 1: whole image resized to round(input_px / s) and back to input_px",
            "context": "s > 1: image shrunk to a cell of round(input_px / s) px in the centre of a k x k mosaic "
                       "(k odd, k * cell >= input_px) of other same-class images of the split, central input_px cropped",
        },
        "levels": levels,
        "results": results,
        **summary,
        "test_edges_for_comparison": test_edges,
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per level, val / test accuracy per mode."""
    splits = [s for s in ("val", "test") if s in report["results"]["zoom_in"]]
    head = "| s | m/px (mid) | " + " | ".join(f"{m} {sp}" for m in MODES for sp in splits) + " |"
    lines = [head, "|" + "---|" * (2 + len(MODES) * len(splits))]
    mid = math.sqrt(report["native_gsd_m"][0] * report["native_gsd_m"][1])
    for s in report["levels"]:
        cells = []
        for m in MODES:
            for sp in splits:
                row = next((r for r in report["results"][m][sp] if r["s"] == s), None)
                cells.append(f"{row['accuracy']:.3f}" if row else "")
        lines.append(f"| {s:g} | {s * mid:.1f} | " + " | ".join(cells) + " |")
    g, f = report["input_gsd_m"], report["tile_footprint_m"]
    lines.append("")
    lines.append(f"peak {report['peak']['accuracy']:.4f} ({report['peak']['mode']}, s={report['peak']['s']:g}, val); "
                 f"{report['threshold']:.0%} of it = {report['threshold_accuracy']:.4f}; s_in = {report['s_in']:.3f}, "
                 f"s_out = {report['s_out']:.3f} (blur {report['s_out_blur']:.3f}); input GSD {g[0]:.2f}-{g[1]:.1f} m; "
                 f"tile footprint {f[0]:.0f}-{f[1]:.0f} m")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
