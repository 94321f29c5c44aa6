"""The explanation study of ``tilescan evaluate --explanations``: each CAM method's faithfulness
(deletion / insertion AUC against random maps, paired image by image) and its cost."""

from __future__ import annotations

import time
from typing import Any

import numpy as np




def explanation_study(
    lm, paths, methods, steps, batch_size, limit, seed, log
) -> dict[str, Any]:
    """Faithfulness (deletion / insertion AUC, blur baseline) of each CAM method and of
    random maps over ``paths``, explaining the predicted class, plus each method's cost
    measured against plain inference on 32 real images."""
    from ..explain.cam import get_cam, time_methods
    from .evaluate import iter_image_batches
    from ..explain.faithfulness import deletion_insertion, random_maps

    model = lm.model
    if limit is not None and limit < len(paths):
        sel = np.sort(np.random.default_rng(seed + 1).choice(len(paths), int(limit), replace=False))
        paths = [paths[i] for i in sel]
    cams = {m: get_cam(m, model, layer=lm.cam_layer) for m in methods}
    names = list(methods) + ["random"]
    dels: dict[str, list] = {m: [] for m in names}
    inss: dict[str, list] = {m: [] for m in names}
    t0 = time.perf_counter()
    fb = min(batch_size, 32)  # images per faithfulness batch: B * 2 * steps rows each
    for s, x in iter_image_batches(paths, lm.input_size, fb):
        target = None
        # a short last batch is padded for the CAM step (one input shape, one trace)
        xc = np.concatenate([x, np.zeros((fb - len(x), *x.shape[1:]), x.dtype)]) if len(x) < fb < len(paths) else x
        for m, cam in cams.items():
            res = cam(xc)
            res_cam, res_t = res.cam[: len(x)], res.target[: len(x)]
            target = res_t if target is None else target
            d, i = deletion_insertion(model, x, res_cam, res_t, steps=steps)
            dels[m].append(d)
            inss[m].append(i)
        shape = (len(x), *res_cam.shape[1:])
        d, i = deletion_insertion(model, x, random_maps(shape, seed=seed + s), target, steps=steps)
        dels["random"].append(d)
        inss["random"].append(i)
    faith_s = time.perf_counter() - t0

    x32 = np.stack([x for _, x in iter_image_batches(paths[:32], lm.input_size, 32)][0])
    speed = time_methods(model, x32, methods=list(methods), repeats=5, layer=lm.cam_layer)
    inference = speed["inference"]
    out: dict[str, Any] = {
        "n": len(paths),
        "steps": int(steps),
        "baseline": "blur",
        "target": "predicted class",
        "layer": next(iter(cams.values())).layer,
        "inference_tiles_per_s": inference,
        "timing_batch": int(len(x32)),
        "seconds": faith_s,
        "methods": {},
    }
    rand_d, rand_i = np.concatenate(dels["random"]), np.concatenate(inss["random"])
    for m in names:
        d, i = np.concatenate(dels[m]), np.concatenate(inss[m])
        tps = speed.get(m)
        out["methods"][m] = {
            "tiles_per_s": tps,
            "x_inference": (inference / tps) if tps else None,
            "deletion_auc": float(d.mean()),
            "insertion_auc": float(i.mean()),
            "deletion_sem": _sem(d),
            "insertion_sem": _sem(i),
        }
        if m != "random":  # each image scored with both maps: the paired difference, and its error
            out["methods"][m].update({"deletion_vs_random": float((d - rand_d).mean()), "deletion_vs_random_sem": _sem(d - rand_d),
                                      "insertion_vs_random": float((i - rand_i).mean()),
                                      "insertion_vs_random_sem": _sem(i - rand_i)})
            out["methods"][m]["unlike_random"] = _unlike_random(out["methods"][m])
    return out


def _sem(v: np.ndarray) -> float:
    """Standard error of the mean of ``v`` (0 for one value)."""
    return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _unlike_random(r: dict) -> bool:
    """Whether a method's maps beat random ones by two standard errors of the paired difference on either AUC."""
    return (-r["deletion_vs_random"] > 2 * r["deletion_vs_random_sem"]
            or r["insertion_vs_random"] > 2 * r["insertion_vs_random_sem"])


def explanation_table(study: dict[str, Any]) -> str:
    """The study as a markdown table."""
    lines = [
        "| method | tiles/s | × inference | deletion AUC ↓ | insertion AUC ↑ | deletion − random | insertion − random |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| inference | {study['inference_tiles_per_s']:.0f} | 1.00 | | | | |",
    ]
    for m, r in study["methods"].items():
        tps = f"{r['tiles_per_s']:.0f}" if r["tiles_per_s"] else "–"
        rel = f"{r['x_inference']:.2f}" if r["x_inference"] else "–"
        vs = [f"{r[f'{k}_vs_random']:+.3f} ± {r[f'{k}_vs_random_sem']:.3f}" if f"{k}_vs_random" in r else ""
              for k in ("deletion", "insertion")]
        lines.append(f"| {m} | {tps} | {rel} | {r['deletion_auc']:.3f} ± {r['deletion_sem']:.3f} | "
                     f"{r['insertion_auc']:.3f} ± {r['insertion_sem']:.3f} | {vs[0]} | {vs[1]} |")
    like = [m for m, r in study["methods"].items() if r.get("unlike_random") is False]
    if like:
        lines.append(f"(± one standard error over the {study['n']} images; {', '.join(like)}: not told apart from "
                     "random maps, within two standard errors on both AUCs)")
    else:
        lines.append(f"(± one standard error over the {study['n']} images; the differences to random maps are paired, "
                     "image by image)")
    return "\n".join(lines)


def study_rows(study: dict) -> list[tuple]:
    """explanations.csv: cost and faithfulness of each CAM method, plain inference first."""
    vs = ("deletion_vs_random", "deletion_vs_random_sem", "insertion_vs_random", "insertion_vs_random_sem", "unlike_random")
    rows = [("method", "tiles_per_s", "x_inference", "deletion_auc", "insertion_auc", "deletion_sem", "insertion_sem",
             *vs, "n"), ("inference", f"{study['inference_tiles_per_s']:.2f}", "1.0", *[""] * (5 + len(vs)))]
    for m, r in study["methods"].items():
        rows.append((m, "" if r["tiles_per_s"] is None else f"{r['tiles_per_s']:.2f}",
                     "" if r["x_inference"] is None else f"{r['x_inference']:.4f}",
                     f"{r['deletion_auc']:.6f}", f"{r['insertion_auc']:.6f}",
                     f"{r['deletion_sem']:.6f}", f"{r['insertion_sem']:.6f}",
                     *(("" if k not in r else str(r[k]).lower() if isinstance(r[k], bool) else f"{r[k]:.6f}") for k in vs),
                     study["n"]))
    return rows
