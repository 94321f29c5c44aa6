#!/usr/bin/env python
"""Your own legend, measured: fine-tuning from the shipped model vs training from scratch.

Run from the project root (needs ``pip install -e ".[geo]"`` for writing the label files)::

    python benchmarks/legend_transfer.py --data ../shared/data/aid \\
        --out benchmarks/results/legend-transfer.json
    python benchmarks/legend_transfer.py --data ../shared/data/aid --quick --out /tmp/l.json   # smoke run

The task: a coarse land-cover legend of 8 classes, each a merge of AID scene types
(``COARSE`` below), which the shipped model's 30-way head was never trained on. The user's
labelled data are AID's **val** images; AID's **test** images are only scored; AID's train
split (the shipped model's own training data) is never opened.

The whole user path runs, through the ``tilescan`` CLI:

1. Each split's images (150 px, resized to 128 px) are laid out, in a seeded order, as
   cells of 10 x 10 mosaics: georeferenced GeoTIFF scenes (EPSG:32633, 8 m per pixel, so
   a 128-px tile is 1,024 m, inside the shipped model's range, and one tile is one
   image), with a GeoPackage of one polygon per cell carrying its coarse class, drawn in
   EPSG:4326 (another CRS than the scenes).
2. ``tilescan chips`` cuts the val scenes into the user's dataset (spatial blocks, 20 %
   val, no test) and the test scenes into a scoring set (``--split test``).
3. For each budget (10, 50 or all labels per class, drawn with a seed from the user's
   train split; the val split is the same for every budget) ``tilescan train`` runs twice
   at the same small budget: ``--init default --freeze-epochs F`` (fine-tuning) and from
   scratch, both for ``--epochs E``.
4. ``tilescan evaluate`` scores every model on the test chips (accuracy, macro-F1); the
   shipped model itself, its 30 classes mapped onto the 8 by ``COARSE`` with no training,
   is scored too (how close the source task is to this one).
5. ``tilescan run`` with the fine-tuned all-labels model on one test scene: its tile labels
   are checked against the cells' classes and against what ``evaluate`` said on the same
   chips (chips are exactly the tiles ``run`` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

COARSE = {
    "residential": ["DenseResidential", "MediumResidential", "SparseResidential"],
    "commercial_industrial": ["Center", "Church", "Commercial", "Industrial", "School", "Square", "StorageTanks"],
    "sport_leisure": ["BaseballField", "Park", "Playground", "Resort", "Stadium"],
    "transport": ["Airport", "Bridge", "Parking", "Port", "RailwayStation", "Viaduct"],
    "agriculture": ["Farmland"],
    "vegetation": ["Forest", "Meadow"],
    "water": ["Pond", "River"],
    "bare": ["BareLand", "Beach", "Desert", "Mountain"],
}
TO_COARSE = {aid: coarse for coarse, members in COARSE.items() for aid in members}
CELL = 128          # px per cell = the model input = one tile
GSD = 8.0           # m per pixel of the mosaics
GRID = 10           # cells per mosaic side
EPSG = 32633
SEED = 20261126


def _log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", flush=True)


def build_scenes(aid: Path, split: str, folder: Path, limit: int | None, seed: int) -> tuple[list[Path], Path, dict]:
    """Mosaics of the split's images and their label GeoPackage (EPSG:4326)."""
    import cv2
    import geopandas as gpd
    import rasterio
    from rasterio.transform import from_origin
    from shapely.geometry import box

    lines = [ln.strip() for ln in (aid / "splits" / f"{split}.txt").read_text().split() if ln.strip()]
    assert not any(ln.split("/")[0] not in TO_COARSE for ln in lines), "an AID class without a coarse class"
    order = np.random.default_rng([seed, len(split)]).permutation(len(lines))
    lines = [lines[i] for i in order]
    if limit:
        lines = lines[:limit]
    folder.mkdir(parents=True, exist_ok=True)
    per = GRID * GRID
    scenes, rows = [], []
    for s in range(0, len(lines), per):
        cells = lines[s:s + per]
        n_rows = -(-len(cells) // GRID)
        img = np.zeros((n_rows * CELL, GRID * CELL, 3), np.uint8)
        x0, y0 = 300_000.0 + (s // per) * 20_000.0, 5_000_000.0 + (0 if split == "val" else 100_000.0)
        for i, ln in enumerate(cells):
            r, c = divmod(i, GRID)
            bgr = cv2.imread(str(aid / "images" / ln), cv2.IMREAD_COLOR)
            img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = cv2.resize(
                cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (CELL, CELL), interpolation=cv2.INTER_AREA)
            xa, yb = x0 + c * CELL * GSD, y0 - r * CELL * GSD
            rows.append({"class": TO_COARSE[ln.split("/")[0]], "aid_class": ln.split("/")[0], "image": ln,
                         "scene": f"aid-{split}-{s // per:02d}.tif", "row": r, "col": c,
                         "geometry": box(xa, yb - CELL * GSD, xa + CELL * GSD, yb)})
        path = folder / f"aid-{split}-{s // per:02d}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=img.shape[1], height=img.shape[0], count=3, dtype="uint8",
                           crs=f"EPSG:{EPSG}", transform=from_origin(x0, y0, GSD, GSD), photometric="RGB",
                           tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
            dst.write(np.moveaxis(img, -1, 0))
        scenes.append(path)
    labels = gpd.GeoDataFrame(rows, crs=f"EPSG:{EPSG}").to_crs(4326)
    gpkg = folder / f"labels-{split}.gpkg"
    labels.to_file(gpkg, layer="labels")
    counts = labels["class"].value_counts().to_dict()
    return scenes, gpkg, {"images": len(lines), "scenes": len(scenes), "per_class": {k: int(v) for k, v in sorted(counts.items())}}


def cli(args: list[str], log_to: Path | None = None) -> tuple[float, str]:
    """Run ``tilescan ARGS`` in a fresh process; return its wall time and output."""
    cmd = [sys.executable, "-m", "tilescan.cli", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t
    out = res.stdout + res.stderr
    if log_to is not None:
        log_to.write_text(" ".join(map(shlex.quote, cmd)) + "\n" + out)
    if res.returncode != 0:
        raise SystemExit(f"tilescan {' '.join(map(str, args))} failed ({res.returncode}):\n{out[-3000:]}")
    return wall, out


def budget_splits(user: Path, n: int | None, seed: int) -> Path:
    """A splits folder with at most ``n`` train chips per class (all with None), the same val."""
    train = [ln for ln in (user / "splits" / "train.txt").read_text().split() if ln]
    by: dict[str, list[str]] = {}
    for ln in train:
        by.setdefault(ln.split("/")[0], []).append(ln)
    pick = []
    for c, items in sorted(by.items()):
        items = sorted(items)
        if n is not None and n < len(items):
            idx = np.random.default_rng([seed, n, len(c)]).choice(len(items), n, replace=False)
            items = [items[i] for i in sorted(idx)]
        pick += items
    folder = user / f"splits-{'all' if n is None else n}-s{seed}"
    folder.mkdir(exist_ok=True)
    (folder / "train.txt").write_text("".join(f"{ln}\n" for ln in sorted(pick)))
    shutil.copy(user / "splits" / "val.txt", folder / "val.txt")
    (folder / "test.txt").write_text("")
    return folder


def shipped_baseline(score: Path) -> dict:
    """The shipped 30-class model on the test chips, its labels mapped to the coarse legend."""
    from tilescan.training.data import load_dataset
    from tilescan.training.evaluate import iter_image_batches, predict_probs
    from tilescan.training.metrics import compute_metrics
    from tilescan.model import load_model

    lm = load_model(None)
    ds = load_dataset(score)
    items = ds.items("test")
    paths = [ds.root / p for p, _ in items]
    y = np.array([c for _, c in items])
    probs = np.concatenate([predict_probs(lm.model, x, batch_size=64) for _, x in iter_image_batches(paths, lm.input_size, 64)])
    index = {c: i for i, c in enumerate(ds.classes)}
    pred = np.array([index[TO_COARSE[lm.classes[k]]] for k in probs.argmax(axis=1)])
    m = compute_metrics(y, pred, ds.classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro"]["f1"], "n": int(len(y)),
            "per_class_f1": {r["class"]: r["f1"] for r in m["per_class"]}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "aid")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="keep scenes, datasets and models here (default: a temporary folder)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--freeze-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budgets", default="10,50,all", help="labels per class, comma-separated ('all' = every train chip)")
    ap.add_argument("--seeds", type=int, default=1, help="seeded label draws (and trainings) per budget below 'all'")
    ap.add_argument("--quick", action="store_true", help="200 val / 200 test images, 2 epochs: a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.epochs, limit = 2, 200
    else:
        limit = None
    work = a.work or Path(tempfile.mkdtemp(prefix="tilescan-legend-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    t_all = time.perf_counter()

    _log(f"building mosaics in {work}")
    val_scenes, val_gpkg, val_info = build_scenes(a.data, "val", work / "scenes-val", limit, SEED)
    test_scenes, test_gpkg, test_info = build_scenes(a.data, "test", work / "scenes-test", limit, SEED)
    user, score = work / "user", work / "score"
    t_chips, _ = cli(["chips", *val_scenes, "--labels", val_gpkg, "-o", user, "--split", "blocks", "--val-fraction", "0.2",
                      "--test-fraction", "0", "--overwrite"], logs / "chips-user.txt")
    cli(["chips", *test_scenes, "--labels", test_gpkg, "-o", score, "--split", "test", "--overwrite"], logs / "chips-score.txt")
    user_card = json.loads((user / "chips.json").read_text())
    score_card = json.loads((score / "chips.json").read_text())
    _log(f"chips: user {user_card['chips']['total']} ({t_chips:.1f} s), score {score_card['chips']['total']}")

    _log("shipped model, 30 classes mapped to the 8 (no training)")
    baseline = shipped_baseline(score)
    _log(f"  accuracy {baseline['accuracy']:.4f} macro-F1 {baseline['macro_f1']:.4f}")

    runs = []
    budgets = [None if b.strip() == "all" else int(b) for b in a.budgets.split(",")]
    for n in budgets:
        for seed in range(a.seeds if n is not None else 1):
            splits = budget_splits(user, n, seed)
            n_train = len((splits / "train.txt").read_text().split())
            for init in ("default", "scratch"):
                tag = f"{'all' if n is None else n}-s{seed}-{init}"
                model = work / "models" / f"{tag}.keras"
                model.parent.mkdir(exist_ok=True)
                args = ["train", user, "--splits", splits, "-o", model, "--overwrite", "--epochs", a.epochs,
                        "--batch-size", a.batch_size]
                if init == "default":
                    args += ["--init", "default", "--freeze-epochs", a.freeze_epochs]
                _log(f"train {tag}: {n_train} chips")
                wall, _ = cli(args, logs / f"train-{tag}.txt")
                meta = json.loads(subprocess.run([sys.executable, "-m", "tilescan.cli", "info", str(model)], capture_output=True,
                                                 text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout)
                ev = work / "eval" / tag
                cli(["evaluate", model, score, "--split", "test", "-o", ev, "--explain-samples", "4"], logs / f"eval-{tag}.txt")
                rep = json.loads((ev / "report.json").read_text())
                run = {"labels_per_class": "all" if n is None else n, "seed": seed, "init": init, "train_chips": n_train,
                       "epochs": a.epochs, "freeze_epochs": a.freeze_epochs if init == "default" else 0,
                       "best_epoch": meta["training"]["best_epoch"], "fit_seconds": meta["training"]["seconds_this_run"],
                       "command_seconds": round(wall, 1), "val_accuracy": meta["scores"]["val"]["accuracy"],
                       "test_accuracy": rep["accuracy"], "test_macro_f1": rep["macro_f1"],
                       "test_per_class_f1": {r["class"]: r["f1"] for r in rep["metrics"]["per_class"]}}
                runs.append(run)
                _log(f"  test accuracy {run['test_accuracy']:.4f} macro-F1 {run['test_macro_f1']:.4f}; fit {run['fit_seconds']} s")

    # run the fine-tuned all-labels model on one test scene, and check it against the cells and evaluate
    best = work / "models" / "all-s0-default.keras"
    run_check = None
    if best.exists():
        import csv

        import geopandas as gpd
        import pyarrow.parquet as pq

        out = work / "run"
        wall, _ = cli(["run", test_scenes[0], "--model", best, "-o", out, "--overwrite"], logs / "run.txt")
        tiles = pq.read_table(out / test_scenes[0].stem / "tiles.parquet").to_pandas()
        truth = gpd.read_file(test_gpkg)
        truth = truth[truth["scene"] == test_scenes[0].name].set_index(["row", "col"])["class"]
        with (work / "eval" / "all-s0-default" / "predictions.csv").open() as fh:
            said = {r["path"].split("/", 1)[1]: r["pred"] for r in csv.DictReader(fh)}  # chip file -> evaluate's label
        stem = test_scenes[0].stem
        agree = right = n = 0
        for _, t in tiles.iterrows():
            key = (int(t["row"]), int(t["col"]))
            if key not in truth.index:
                continue
            n += 1
            right += int(t["label"] == truth[key])
            agree += int(said.get(f"{stem}_r{key[0]:04d}_c{key[1]:04d}.png") == t["label"])
        run_check = {"scene": test_scenes[0].name, "tiles_labelled": n, "accuracy_vs_cells": right / max(1, n),
                     "same_label_as_evaluate": agree, "command_seconds": round(wall, 1),
                     "legend_in_table": json.loads(pq.read_schema(out / stem / "tiles.parquet").metadata[b"tilescan"])["classes"]}
        _log(f"run on {test_scenes[0].name}: {right}/{n} tiles right, {agree}/{n} as evaluate said")

    import tensorflow as tf

    result = {
        "command": " ".join(map(shlex.quote, [sys.executable.rsplit('/', 1)[-1], "benchmarks/legend_transfer.py", *(argv or sys.argv[1:])])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": tf.__version__},
        "legend": COARSE,
        "mosaics": {"cell_px": CELL, "gsd_m": GSD, "grid": GRID, "crs": f"EPSG:{EPSG}", "labels_crs": "EPSG:4326",
                    "val": val_info, "test": test_info},
        "user_dataset": {"chips": user_card["chips"], "split": user_card["split"], "labels": user_card["labels"],
                         "input_gsd_m": user_card["input_gsd_m"]},
        "scoring_set": {"chips": score_card["chips"]},
        "recipe": {"epochs": a.epochs, "freeze_epochs": a.freeze_epochs, "batch_size": a.batch_size,
                   "fine_tune": "--init default: the head imprinted from the parent's class-mean features, trained alone "
                                "(AdamW, lr 2e-3, cosine) for the frozen epochs, then the whole model at 2e-4 (2 warmup "
                                "epochs, cosine)",
                   "scratch": "AdamW, lr 2e-3, 2 warmup epochs, cosine (the default [train] recipe)"},
        "shipped_model_mapped": baseline,
        "runs": runs,
        "run_check": run_check,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "quick": a.quick,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"wrote {a.out} ({result['total_seconds']:.0f} s)")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
