"""Evaluate a tilescan model on a labelled image split: metrics, figures, optional record.

``run_evaluate`` streams the split through the model in batches (the whole image resized
to the model input, decoded in a thread pool while the model works on the previous batch),
computes the metrics with numpy, and writes into ``out_dir``:

==========================  =================================================================
``report.json``             every metric, the model (id, sha256), split, n, TTA flag, dataset
                            provenance, timing and images/s (and the explanation study)
``predictions.csv``         path, true, pred, confidence (probability of ``pred``)
``per_class.csv``           class, precision, recall, F1, support, predicted count
``confusion_matrix.csv``    counts, rows = true class, columns = predicted class
``confusion_matrix.png``    the same, normalised by row (recall on the diagonal), annotated
``explanations.png``        a seeded pick of right and wrong predictions with their CAMs
``explanations.csv``        with ``explanations=True``: faithfulness and cost per CAM method
==========================  =================================================================

Metrics: :mod:`tilescan.training.metrics`. ``tta=True`` averages the softmax over the 8
dihedral views of each image (the four rotations, flipped and not), stacked into one array:
overhead imagery has no "up", so the prediction is exactly invariant to flips and rotations
of the input. ``record=True`` writes the scores into the model file's metadata (``scores``
in ``tilescan.json``) atomically.
"""

from __future__ import annotations

import json
import os
import time
import unicodedata
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..backend import usable_cores
from ..config import positive_int
from ..errors import ConfigError, InputError, OutputError, OutputExistsError
from ..log import emit
from ..outputs.files import csv_text, folder_kept_if_used, staged_files, write_json, write_text
from ..outputs.fonts import check_names
from .cam_study import explanation_study, explanation_table, study_rows
from .data import ALL
from .metrics import compute_metrics
from ..explain.figures import (RIGHT_COLOR, WRONG_COLOR, FigureRow, figure_fonts, glyphs_said, new_figure,
                               render_rows, save_figure)

DEFAULT_OUT_DIR = "evaluation"
SEED = 20261126


def _workers() -> int:
    return max(2, min(8, usable_cores()))


# ---------------------------------------------------------------------------- predicting


def dihedral_views(x: np.ndarray) -> np.ndarray:
    """The 8 dihedral views of a batch (B, H, W, C) with H == W, stacked view-major into
    (8 * B, H, W, C): rotations by 0, 90, 180, 270 degrees, then the same of the
    left-right mirror. Row ``v * B + b`` is view ``v`` of image ``b``."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"dihedral views need square images (B, S, S, C), got {x.shape}")
    mirror = x[:, :, ::-1]
    views = [np.rot90(v, k, axes=(1, 2)) for v in (x, mirror) for k in range(4)]
    return np.ascontiguousarray(np.concatenate(views, axis=0))


def _run_model(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities of ``x`` in calls of ``batch_size`` rows. A short last chunk is padded
    to ``batch_size`` when full chunks exist, so the compiled predict function sees one
    input shape and is traced once (rows are independent: BatchNorm runs in inference)."""
    out = []
    for s in range(0, len(x), batch_size):
        chunk = x[s : s + batch_size]
        m = len(chunk)
        if m < batch_size and len(x) > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(model.predict_on_batch(chunk), dtype=np.float32)[:m])
    return np.concatenate(out, axis=0)


def predict_probs(model, x: np.ndarray, tta: bool = False, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (B, K) of a batch; with ``tta`` the mean over the 8 dihedral
    views (stacked into one array and run ``batch_size`` rows per model call)."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    if not tta:
        return _run_model(model, x, batch_size)
    p = _run_model(model, dihedral_views(x), batch_size)
    return p.reshape(8, len(x), -1).astype(np.float64).mean(axis=0).astype(np.float32)


def iter_image_batches(
    paths: Sequence[Path], size: int, batch_size: int, workers: int | None = None, prefetch: int = 2
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, x)``: batches of evaluation views (:func:`tilescan.training.data.load_eval_image`)
    decoded in a thread pool, ``prefetch`` batches ahead of the consumer (bounded memory)."""
    from .data import load_eval_image

    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=workers or _workers(), thread_name_prefix="tilescan-decode") as pool:
        pending: deque = deque()

        def submit() -> None:
            s = next(starts, None)
            if s is not None:
                pending.append((s, [pool.submit(load_eval_image, p, size) for p in paths[s : s + batch_size]]))

        for _ in range(prefetch + 1):
            submit()
        while pending:
            s, futures = pending.popleft()
            batch = np.stack([f.result() for f in futures])
            submit()
            yield s, batch


# ---------------------------------------------------------------------------- files


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (percent of each true class), annotated."""
    cm = np.asarray(cm, dtype=np.float64)
    k = len(classes)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    side = max(5.0, 0.42 * k + 2.8)
    fig = new_figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(100 * norm, cmap="Blues", vmin=0.0, vmax=100.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="% of the true class (the cells' numbers)")
    font = 9 if k <= 12 else 8 if k <= 20 else 7 if k <= 36 else 5
    for i in range(k):
        for j in range(k):
            v = norm[i, j]
            if cm[i, j] > 0:
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=font, color="white" if v > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=60, ha="right", rotation_mode="anchor", fontsize=font + 1)
    ax.set_yticklabels([f"{c} ({int(s)})" for c, s in zip(classes, support[:, 0])], fontsize=font + 1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (support)")
    ax.set_title(title, fontsize=10)
    figure_fonts(fig)  # before the layout measures the class names
    with glyphs_said():
        fig.tight_layout()
    return save_figure(fig, path)


def pick_examples(y_true: np.ndarray, y_pred: np.ndarray, n: int, seed: int = SEED) -> np.ndarray:
    """Seeded indices of ``n`` examples: up to half wrong predictions, the rest right
    (more of either when the other runs out), sorted."""
    n = min(int(n), len(y_true))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(y_true != y_pred)
    right = np.flatnonzero(y_true == y_pred)
    n_wrong = min(len(wrong), max(1, n // 2))
    n_wrong = max(n_wrong, n - len(right))
    pick = np.concatenate([rng.choice(wrong, n_wrong, replace=False), rng.choice(right, n - n_wrong, replace=False)])
    return np.sort(pick)


def record_scores(model_path: str | os.PathLike, key: str, entry: dict[str, Any]) -> str:
    """Store ``entry`` as ``meta["scores"][key]`` in a model file; returns the new sha256. The
    loss training recorded for its val split stays where ``entry`` scores the same images
    (the split's sha256 that training recorded): evaluate measures no loss."""
    from ..model import rewrite_metadata

    def update(meta: dict) -> None:
        scores = meta.setdefault("scores", {})
        trained_on = ((meta.get("training") or {}).get("split_sha256") or {}).get(key)
        was = scores.get(key) or {}
        same = entry.get("split_sha256") is not None and entry.get("split_sha256") == trained_on
        scores[key] = {**entry, **({k: was[k] for k in ("loss", "loss_note") if k in was} if same else {})}

    return rewrite_metadata(model_path, update)


# ---------------------------------------------------------------------------- the command


def run_evaluate(
    model_path: str | None,
    data: str,
    split: str = "test",
    out_dir: str = DEFAULT_OUT_DIR,
    splits_dir: str | None = None,
    batch_size: int = 64,
    tta: bool = False,
    explain_samples: int = 8,
    explanations: bool = False,
    cam_methods: Sequence[str] = ("gradcam",),
    record: bool = False,
    limit: int | None = None,
    log: Callable[[str], None] = emit,
    faithfulness_limit: int | None = None,
    faithfulness_steps: int = 16,
    seed: int = SEED,
) -> dict[str, Any]:
    """Evaluate a model (``None``: the packaged default) on ``split`` of the dataset at
    ``data``; write the report files into ``out_dir`` and return the report dict.

    ``limit``: evaluate that many images, spread over the classes as ``train --limit`` picks
    its validation images (:func:`~tilescan.training.data.spread`; not allowed with
    ``record``). ``explanations``: also measure each of ``cam_methods`` (faithfulness over
    the split, or ``faithfulness_limit`` images of it, and cost). ``explain_samples``:
    rows of ``explanations.png`` (0: no figure).
    """
    t_start = time.perf_counter()
    cam_methods = _checked_eval_args(batch_size, limit, record, cam_methods, explanations, explain_samples, out_dir)
    batch_size = int(batch_size)

    ds, lm, items, overlap = _eval_inputs(model_path, data, split, splits_dir, log)
    check_names(lm.classes, log, "the confusion matrix")
    items = _limited(items, limit)
    rel_paths = [p for p, _ in items]
    paths = [ds.root / p for p in rel_paths]
    y_true = np.array([c for _, c in items], dtype=np.int64)
    n, k = len(items), len(lm.classes)
    classes = lm.classes
    load_s = time.perf_counter() - t_start
    log(f"evaluating {lm.model_id} on {ds.name or data} '{split}' ({n} images{', TTA x8' if tta else ''})")
    with folder_kept_if_used(out_dir) as out:
        probs, warmup_s, predict_s = _predict_split(lm, paths, n, k, batch_size, tta)
    y_pred = probs.argmax(axis=1)
    conf = probs[np.arange(n), y_pred]

    # -- metrics and tables ---------------------------------------------------------------
    metrics = compute_metrics(y_true, y_pred, classes)
    top5 = _top5(probs, y_true) if k > 5 else None
    title = (f"{lm.model_id} on {ds.name or 'data'} {split} (n={n}{', TTA' if tta else ''}): "
             f"accuracy {metrics['accuracy']:.2%}, macro F1 {metrics['macro']['f1']:.3f}")
    # made aside, moved into place at the end (an earlier evaluation's other files removed): a stop before leaves
    # that one's files as they were
    with staged_files(out, "evaluation", last="report.json", own=EVAL_OUTPUTS) as stage:
        _write_tables(stage, rel_paths, y_true, y_pred, conf, metrics, classes, title)
        outputs = ["report.json", "predictions.csv", "confusion_matrix.csv", "confusion_matrix.png", "per_class.csv"]
        if explain_samples > 0:
            _explanation_figure(stage / "explanations.png", lm, paths, y_true, y_pred, conf, cam_methods,
                                explain_samples, seed, split)
            outputs.append("explanations.png")

        study = None
        if explanations:
            study = _study(stage, lm, paths, cam_methods, faithfulness_steps, batch_size, faithfulness_limit, seed, log)
            outputs.append("explanations.csv")

        # -- report and record -----------------------------------------------------------------
        provenance = ds.provenance()
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        timing = {"load_s": load_s, "warmup_s": warmup_s, "predict_s": predict_s, "batch_size": batch_size}
        report = _report(lm, split, n, k, limit, tta, metrics, top5, provenance, timing, date, outputs)
        report.update({"explanations": study} if study is not None else {}, **({"split_warning": overlap} if overlap else {}))
        if record:
            report["recorded"] = _record(lm, split, tta, metrics, n, date, provenance, log)
        report["timing"]["total_s"] = time.perf_counter() - t_start
        write_json(stage / "report.json", report)
    _log_summary(metrics, n, report, outputs, out, log)
    return report


def _study(stage: Path, lm, paths: list, cam_methods: Sequence[str], steps: int, batch_size: int, limit: int | None,
           seed: int, log: Callable[[str], None]) -> dict:
    """The explanation study of ``cam_methods`` against random maps, its table written into ``stage``."""
    log(f"explanation study: {', '.join(cam_methods)} + random maps, deletion/insertion AUC over "
        f"{limit or len(paths)} images ({steps} steps, blur baseline)")
    study = explanation_study(lm, paths, cam_methods, steps, batch_size, limit, seed, log)
    write_text(stage / "explanations.csv", csv_text(study_rows(study)))
    log(explanation_table(study))
    return study


def _limited(items: list, limit: int | None) -> list:
    """``limit`` of the items, spread over the classes as train --limit picks its validation
    images (so a model's recorded score reproduces); all of them without a limit."""
    from .data import spread

    return spread(items, int(limit)) if limit is not None and int(limit) < len(items) else items


def _top5(probs: np.ndarray, y_true: np.ndarray) -> float:
    """The share of images whose true class is among the five most probable."""
    return float(np.mean((np.argsort(-probs, axis=1)[:, :5] == y_true[:, None]).any(axis=1)))


#: Every file an evaluation may write into its folder.
EVAL_OUTPUTS = ("report.json", "predictions.csv", "confusion_matrix.csv", "confusion_matrix.png", "per_class.csv",
                "explanations.png", "explanations.csv")


def _checked_eval_args(batch_size: int, limit: int | None, record: bool, cam_methods: Sequence[str],
                       explanations: bool, explain_samples: int, out_dir) -> list[str]:
    """The CAM method names, lower-cased without repeats, after checking the arguments (and that
    ``out_dir`` is no run's output folder, whose report.json the evaluation's would replace)."""
    try:
        theirs = json.loads((Path(out_dir) / "report.json").read_text())
    except (OSError, ValueError):
        theirs = {}
    if isinstance(theirs, dict) and ("exit_code" in theirs or theirs.get("running")):
        raise OutputExistsError("holds the report.json of a 'tilescan run' (its output folder): give the evaluation "
                                "a folder of its own", path=str(out_dir))
    positive_int("batch_size", batch_size)
    if limit is not None:
        positive_int("limit", limit)
    if record and limit is not None:
        raise ConfigError("--record (record=True) stores the scores of the whole split: do not combine it with "
                          "--limit (limit=N)")
    if not (explanations or explain_samples > 0):
        return list(cam_methods)
    from ..explain.cam import checked_methods

    return checked_methods(cam_methods)


def _predict_split(lm, paths: list[Path], n: int, k: int, batch_size: int, tta: bool):
    """The class probabilities of every image, and the seconds of the warm-up batch and of the predictions."""
    model = lm.model
    size = lm.input_size
    t0 = time.perf_counter()
    predict_probs(model, np.zeros((min(batch_size, n), size, size, 3), np.float32), tta=False, batch_size=batch_size)
    warmup_s = time.perf_counter() - t0
    probs = np.empty((n, k), dtype=np.float32)
    t0 = time.perf_counter()
    for s, x in iter_image_batches(paths, size, batch_size):
        probs[s : s + len(x)] = predict_probs(model, x, tta=tta, batch_size=batch_size)
    predict_s = time.perf_counter() - t0
    return probs, warmup_s, predict_s


def _report(lm, split: str, n: int, k: int, limit: int | None, tta: bool, metrics: dict, top5: float | None,
            provenance: dict, timing: dict, date: str, outputs: list[str]) -> dict[str, Any]:
    """report.json's content (before the explanation study, the record and the total time)."""
    import keras

    from .. import __version__

    predict_s = timing["predict_s"]
    return {
        "model": {"id": lm.model_id, "path": lm.path, "sha256": lm.sha256, "input_size": lm.input_size, "classes": k},
        "split": split,
        "n": n,
        "limit": limit,
        "tta": bool(tta),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro"]["f1"],
        "weighted_f1": metrics["weighted"]["f1"],
        "top5_accuracy": top5,
        "metrics": metrics,
        "dataset": provenance,
        "timing": {
            "load_s": timing["load_s"],
            "warmup_s": timing["warmup_s"],
            "predict_s": predict_s,
            "images_per_s": n / predict_s if predict_s > 0 else None,
            "batch_size": timing["batch_size"],
            "decode_workers": _workers(),
            "total_s": None,
        },
        "images_per_s": n / predict_s if predict_s > 0 else None,
        "date": date,
        "backend": keras.backend.backend(),
        "tilescan_version": __version__,
        "outputs": outputs,
        "recorded": None,
    }


def _log_summary(metrics: dict, n: int, report: dict, outputs: list[str], out: Path, log: Callable[[str], None]) -> None:
    """Log the headline scores, the weakest classes and the files written."""
    weakest = sorted((r for r in metrics["per_class"] if r["support"] > 0 and r["f1"] < 1), key=lambda r: r["f1"])[:5]
    own = metrics["macro_supported"]
    over = (f" ({own['f1']:.4f} over the {own['classes']} classes with images)"
            if own["classes"] < metrics["macro"]["classes"] else "")
    log(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro']['f1']:.4f}{over}  weighted F1 "
        f"{metrics['weighted']['f1']:.4f}  ({n} images, {report['images_per_s']:.0f} images/s)")
    absent = [r for r in metrics["per_class"] if r["support"] == 0 and r.get("predicted")]
    log("weakest classes (F1): " + (", ".join(f"{r['class']} {r['f1']:.3f}" for r in weakest) or "none below 1")
        + ("; predicted, with no image in the split (all wrong): " + ", ".join(
            f"{r['class']} {r['predicted']} time{'s' if r['predicted'] != 1 else ''}" for r in absent) if absent else ""))
    log(f"wrote {', '.join(outputs)} to {out}")


def _eval_inputs(model_path: str | None, data: str, split: str, splits_dir: str | None, log: Callable[[str], None]):
    """The dataset, split as the model's training split it (its seed and fractions), the model
    (its classes checked against the dataset's from the metadata, before the slow Keras load),
    the split's items, and why they may hold training images (:func:`_split_changed`)."""
    from . import transfer
    from .chips import read_card
    from .data import load_dataset
    from ..model import load_model, read_metadata
    from ..model import model_path as model_file

    meta = read_metadata(model_file(model_path))  # "default", None: the packaged one
    trained = meta.get("training") or {}
    drawn = {k: v for k, v in (trained.get("config") or {}).items() if k in ("val_fraction", "test_fraction", "seed")}
    ds = load_dataset(data, splits_dir=splits_dir, **drawn)
    if split == ALL:  # a folder kept for scoring: every image, whichever split it lies in
        items = ds.all_items()
        ds.check_found(**{ALL: items})
    else:
        items = ds.items(split)
        ds.check_found(**{split: items})
    if not items:
        raise InputError(f"the '{split}' split is empty", path=str(data))
    model_classes = [unicodedata.normalize("NFC", c) for c in meta["classes"]]  # in one Unicode form, as datasets read them
    items = _in_model_classes(items, ds.classes, model_classes, data, log)
    lm = load_model(model_path)
    if lm.num_bands != 3:
        raise ConfigError(f"the model takes {lm.num_bands} bands; image datasets are RGB", path=lm.path)
    card = read_card(ds.root)
    overlap = (_trained_on(trained, ds) if split == ALL else None) or _split_changed(trained, ds, split) \
        or _same_labels_other_cut(trained, card, ds, split)
    if overlap:
        log(f"warning: {overlap}")
    if other := transfer.chips_bands_differ(card, lm):
        log(f"warning: {other}")
    return ds, lm, items, overlap


def _in_model_classes(items: list, classes: list[str], model_classes: list[str], data: str, log) -> list:
    """The items with the model's class indices: a dataset may hold some of its classes (a test
    region without water), in any order; one the model does not know is refused."""
    unknown = [c for c in classes if c not in model_classes]
    if unknown:
        alike = [f"{c!r} is the model's {m!r}" + (", whose folder is there too: merge them" if m in classes else "")
                 for c in unknown for m in model_classes if _loose(c) == _loose(m)]  # another case or spacing
        near = f"rename the folders to the model's names ({'; '.join(alike)}): class names are matched exactly"
        raise InputError(f"the dataset has classes the model does not know: {unknown} (the model's: {model_classes}); "
                         + "; ".join(([near] if alike else []) + (["evaluate a model on a dataset of its own legend"]
                                                                   if len(alike) < len(unknown) else [])), path=str(data))
    items = [(p, model_classes.index(classes[c])) for p, c in items]
    seen = {k for _, k in items}  # a class of the dataset may have no image in this split either
    if absent := [c for k, c in enumerate(model_classes) if k not in seen]:
        log(f"warning: {data}: the scored split has images of {len(seen)} of the model's {len(model_classes)} classes; "
            f"the others ({', '.join(absent)}) have none: no recall, and they count in the scores (macro averages "
            "included) only where the model predicts them")
    return items


def _loose(name: str) -> str:
    """A class name without case, spaces, ``_`` and ``-``: to name a near miss, never to match."""
    return "".join(ch for ch in name.casefold() if ch not in " _-")


def _same_dataset(trained: dict, ds) -> bool:
    """Whether ``ds`` is the dataset the model was trained on: its folder name and kind of split
    (a chips dataset, whose images are all in an images/ folder, by its own name too)."""
    def kind(source) -> str:
        return str(source).split("(")[0].split(":")[0]

    if kind(trained.get("split_source")) != kind(ds.split_source) or trained.get("root") != ds.root.name:
        return False
    return ds.root.name.lower() != "images" or str(trained.get("dataset", "")).casefold() == ds.name.casefold()


def _trained_on(trained: dict, ds) -> str | None:
    """Why ``--split all`` of ``ds`` holds the model's training images: its train or val split
    is the model's (the same images, by their split's hash: a copy or a link of the folder too),
    or it has one and the name and layout of the dataset the model was trained on."""
    was = trained.get("split_sha256") or {}
    same = [s for s in ("train", "val") if ds.splits.get(s) and was.get(s) == ds.split_sha256.get(s)]
    if same:
        return (f"the dataset holds the model's own {' and '.join(same)} images (the split{'s' if len(same) > 1 else ''} "
                "it was trained with): split 'all' scores it too high; score its test split, or a folder the model never saw")
    if not _same_dataset(trained, ds) or not (ds.splits.get("train") or ds.splits.get("val")):
        return None
    return ("the dataset has the name and layout of the one the model was trained on: split 'all' may hold its train "
            "and val images, and score it too high; score its test split, or a folder the model never saw")


def _split_changed(trained: dict, ds, split: str) -> str | None:
    """Why ``split`` may hold images the model was trained on: the dataset is the one it was
    trained on (its folder name, its kind of split), but its train or val split differs from
    the one recorded then (files added, removed or renamed since); None when they match or
    there is nothing to compare (another dataset)."""
    was = trained.get("split_sha256") or {}
    if not _same_dataset(trained, ds):
        return None
    if not ds.splits.get("train") and not ds.splits.get("val"):
        return None  # a set only for scoring (chips --split test), not the training set changed
    changed = [s for s in ("train", "val") if s in was and was[s] != ds.split_sha256.get(s)]
    if not changed:
        return None
    return (f"the dataset's {' and '.join(changed)} split{'s' if len(changed) > 1 else ''} differ from the model's at "
            "training (files added, removed or renamed since, or other split lists): its "
            f"'{split}' split may hold images the model was trained on, and score it too high")


def _same_labels_other_cut(trained: dict, card: dict | None, ds, split: str) -> str | None:
    """Why ``split`` of a chips dataset may lie over the model's training chips on the ground:
    it was cut from the labels file the model was trained from (the same sha256), but in
    another cut (other tiles or another split); None otherwise."""
    labels = (card or {}).get("labels") or {}
    was = ((trained.get("chips") or {}).get("labels") or {}).get("sha256")
    if not was or labels.get("sha256") != was:
        return None
    trained_split = trained.get("split_sha256") or {}
    if all(trained_split.get(s) == ds.split_sha256.get(s) for s in ("train", "val")):
        return None  # the very chips it was trained from: their own test split is apart
    return (f"its chips were cut from the labels the model was trained from ({labels.get('file')}, the same sha256) "
            f"in another cut (other tiles or another split): its '{split}' chips may lie over the model's training "
            "chips on the ground and score it too high; score it on the test split of the chips it was trained "
            "from, or on labels it never saw")


def _write_tables(out: Path, rel_paths, y_true, y_pred, conf, metrics: dict, classes: Sequence[str], title: str) -> None:
    """predictions.csv, confusion_matrix.csv/.png and per_class.csv."""
    k = len(classes)
    cm = np.array(metrics["confusion_matrix"])
    write_text(
        out / "predictions.csv",
        csv_text([("path", "true", "pred", "confidence")]
                 + [(p, classes[t], classes[q], f"{c:.6f}") for p, t, q, c in zip(rel_paths, y_true, y_pred, conf)]),
    )
    write_text(out / "confusion_matrix.csv", csv_text([["true\\pred", *classes]] + [[classes[i], *cm[i].tolist()] for i in range(k)]))
    write_text(
        out / "per_class.csv",
        csv_text([("class", "precision", "recall", "f1", "support", "predicted")]
                 + [(r["class"], *("" if r[m] is None else f"{r[m]:.6f}" for m in ("precision", "recall", "f1")),
                     r["support"], r["predicted"]) for r in metrics["per_class"]]),
    )
    plot_confusion(cm, classes, out / "confusion_matrix.png", title)


def _explanation_figure(path: Path, lm, paths, y_true, y_pred, conf, cam_methods: Sequence[str], samples: int,
                        seed: int, split: str) -> None:
    """The study's figure for a seeded pick of right and wrong images, one batch per method."""
    from ..explain.cam import get_cam, upsample

    classes, size = lm.classes, lm.input_size
    pick = pick_examples(y_true, y_pred, samples, seed)
    x = np.stack([x for _, x in iter_image_batches([paths[i] for i in pick], size, len(pick))][0])
    maps = {}
    for m in cam_methods:  # explaining the predicted class
        res = get_cam(m, lm.model, layer=lm.cam_layer)(x, target=y_pred[pick].astype(np.int32))
        maps[m] = upsample(res.cam, (size, size))
    rows = [FigureRow(x[r], {m: maps[m][r] for m in cam_methods},
                      f"true: {classes[y_true[i]]}\npred: {classes[y_pred[i]]} ({conf[i]:.2f})",
                      WRONG_COLOR if y_pred[i] != y_true[i] else RIGHT_COLOR)
            for r, i in enumerate(pick)]
    fig = render_rows(rows, cam_methods, suptitle=f"{split}: {int((y_pred[pick] != y_true[pick]).sum())} wrong, "
                                                  f"{int((y_pred[pick] == y_true[pick]).sum())} right (seeded pick)")
    save_figure(fig, path)


def _record(lm, split: str, tta: bool, metrics: dict, n: int, date: str, provenance: dict, log) -> dict:
    """Store the scores in the model file's metadata (``scores[split]`` or ``[split_tta]``)."""
    key = f"{split}_tta" if tta else split
    entry = {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro"]["f1"],
        "weighted_f1": metrics["weighted"]["f1"],
        "n": n,
        "tta": bool(tta),
        "date": date,
        "split_sha256": provenance.get("split_sha256", {}).get(split),
        "dataset": provenance.get("dataset"),
    }
    try:
        new_sha = record_scores(lm.path, key, entry)
    except OSError as exc:
        raise OutputError(f"cannot record the scores in the model file: {exc}", path=lm.path) from None
    log(f"recorded scores['{key}'] in {lm.path}")
    return {"key": key, "entry": entry, "model_sha256_after": new_sha}
