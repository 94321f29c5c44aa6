"""Fine-tuning from a parent model: ``tilescan train DATA --init default|MODEL.keras``.

The child is the same ResNet-18 with the parent's input size, band order and input
normalisation (the first layer), every backbone weight copied from the parent, and a
head sized to the new legend: the parent's head when the classes are the same (rows
reordered when only their order differs), a fresh one otherwise. ``freeze_epochs`` trains
the head alone first (the backbone, BatchNorm statistics included, stays exactly the
parent's), then everything at ``finetune_lr``. A fresh head starts from the parent's
features of the training images (:func:`imprint_head`), so that even a few labels per
class give a working model after few steps.

What the child records (:func:`child_metadata`): the parent's id, file name, sha256 and
terms, how the head was made, the chips provenance when the data came from
``tilescan chips``, and its ground-scale range (:func:`child_scale`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..scene.grid import within_scale

HEAD = "logits"


def parent_path(init: str) -> str | None:
    """The model file ``init`` names (``default``: the packaged model)."""
    from ..model import model_path

    return model_path(init)


def check_parent(card, image_size: int, image_size_given: bool, chips_card: dict | None) -> int:
    """The child's input size, or a :class:`ConfigError` when the parent cannot be one:
    not a 3-band model, another input size than asked for or than the chips were cut at."""
    p = card.path
    if card.num_bands != 3:
        raise ConfigError(f"the parent model takes {card.num_bands} bands ({', '.join(card.meta.get('bands') or [])}); "
                          "tilescan train makes RGB models from RGB images: choose a 3-band parent", path=p)
    arch = card.meta.get("architecture", "resnet18")
    if arch != "resnet18":
        raise ConfigError(f"the parent is a {arch!r}; --init takes tilescan ResNet-18 models", path=p)
    size = card.input_size
    if image_size_given and image_size != size:
        raise ConfigError(f"the parent model takes {size} px inputs but --image-size is {image_size}: a fine-tuned "
                          f"model keeps its parent's input size (leave --image-size out, or choose a {image_size} px parent)", path=p)
    if chips_card is not None and int(chips_card.get("input_size", size)) != size:
        raise ConfigError(f"the chips were cut at {chips_card['input_size']} px (for model {chips_card['model']['id']}) but "
                          f"the parent takes {size} px inputs: cut the chips again with --model {Path(p).name}", path=p)
    return size


def head_plan(parent_classes: Sequence[str], classes: Sequence[str]) -> str:
    """``kept`` (same classes, same order), ``reordered`` (same classes) or ``new``."""
    if list(parent_classes) == list(classes):
        return "kept"
    if sorted(parent_classes) == sorted(classes) and len(set(classes)) == len(classes):
        return "reordered"
    return "new"


def copy_weights(parent, child, parent_classes: Sequence[str], classes: Sequence[str]) -> str:
    """Copy every weight of ``parent`` into ``child`` layer by layer (by name); the head as
    :func:`head_plan` says. Returns the plan. Raises :class:`ConfigError` when a backbone
    layer does not fit (not the same architecture)."""
    import numpy as np

    plan = head_plan(parent_classes, classes)
    by_name = {layer.name: layer for layer in parent.layers}
    for layer in child.layers:
        if not layer.weights:
            continue
        if layer.name == HEAD:
            if plan == "new":
                continue
            w, b = by_name[HEAD].get_weights()
            if plan == "reordered":
                order = [list(parent_classes).index(c) for c in classes]
                w, b = w[:, order], b[order]
            layer.set_weights([w, b])
            continue
        src = by_name.get(layer.name)
        theirs = [] if src is None else src.get_weights()
        mine = layer.get_weights()
        if len(theirs) != len(mine) or any(np.shape(a) != np.shape(b) for a, b in zip(theirs, mine)):
            raise ConfigError(f"the parent's layer {layer.name!r} does not fit this ResNet-18 "
                              f"({[np.shape(a) for a in theirs]} vs {[np.shape(b) for b in mine]})")
        layer.set_weights(theirs)
    return plan


def imprint_head(model, paths: Sequence[Path], labels, k: int, size: int, label_smoothing: float = 0.0,
                 per_class: int = 100, seed: int = 0) -> dict[str, float]:
    """Start a new head where the parent's features already separate the classes: each
    class's weights from the mean backbone feature of its training images (weight
    imprinting), as a Gaussian classifier with one shared spherical variance, its logits
    scaled by the factor that fits those images best. Uses at most ``per_class`` images of
    each class (seeded), in their evaluation view. Returns the scale and the fit."""
    import keras
    import numpy as np

    from .data import load_eval_image

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(k)])
    feats = keras.Model(model.input, model.get_layer("avg_pool").output)
    f = []
    for s in range(0, len(pick), 64):
        x = np.stack([load_eval_image(Path(paths[i]), size) for i in pick[s:s + 64]])
        f.append(np.asarray(feats.predict_on_batch(x), dtype=np.float64))
    f, y = np.concatenate(f), labels[pick]
    mu = np.stack([f[y == c].mean(axis=0) if (y == c).any() else f.mean(axis=0) for c in range(k)])
    within = float(np.mean(np.sum((f - mu[y]) ** 2, axis=1))) / f.shape[1]
    spread = float(np.mean(np.sum((f - f.mean(axis=0)) ** 2, axis=1))) / f.shape[1]
    # at least a tenth of the features' whole spread: one image a class has none within its class,
    # and a variance near 0 made logits no temperature of the search below brings back
    var = max(within, 0.1 * spread, 1e-12)
    base = (f @ mu.T - 0.5 * np.sum(mu * mu, axis=1)) / var
    target = np.full((len(y), k), label_smoothing / k)
    target[np.arange(len(y)), y] += 1.0 - label_smoothing
    best = None
    for scale in np.geomspace(1e-4, 1.0, 41):  # the temperature: class means alone are far too confident
        z = base * scale
        z -= z.max(axis=1, keepdims=True)
        loss = float(-(target * (z - np.log(np.exp(z).sum(axis=1, keepdims=True)))).sum(axis=1).mean())
        if best is None or loss < best[1]:
            best = (float(scale), loss)
    scale = best[0]
    w = (mu.T / var * scale).astype(np.float32)
    b = (-0.5 * np.sum(mu * mu, axis=1) / var * scale).astype(np.float32)
    model.get_layer(HEAD).set_weights([w, b])
    return {"images": int(len(y)), "scale": scale, "loss": best[1],
            "train_accuracy": float(np.mean((base.argmax(axis=1)) == y))}


def set_backbone_trainable(model, trainable: bool) -> None:
    """Freeze (or thaw) every layer but the head; a frozen BatchNorm also keeps its statistics."""
    for layer in model.layers:
        layer.trainable = True if layer.name == HEAD else trainable


def child_scale(parent_meta: dict | None, chips_card: dict | None, size: int) -> tuple[dict | None, float | None]:
    """The child's ``scale`` and ``gsd_m``, or (None, None) to keep what ``[train] gsd_m``
    states.

    * chips cut by tilescan with every chip inside the parent's range: the parent's range (its
      backbone was measured there and the new classes were seen there), and as ``gsd_m`` (what
      ``resample_to_gsd`` reads scenes at) the scale the chips were cut at, their range's
      geometric middle: the parent's own would read scenes where the new classes were never seen;
    * chips otherwise: the range of metres per input pixel the chips were cut at, and its middle;
    * no chips card: unknown here (the caller falls back on ``[train] gsd_m``).
    """
    if chips_card is None:
        return None, None
    got = chips_card.get("input_gsd_m")
    prange = ((parent_meta or {}).get("scale") or {}).get("input_gsd_m")
    if parent_meta is not None and got and prange and all(within_scale(g, *prange) for g in got):
        scale = {k: v for k, v in parent_meta["scale"].items()}
        scale["source"] = (f"inherited from the parent {parent_meta.get('id')}: its chips were cut by tilescan chips at "
                           f"{got[0]:.4g}-{got[1]:.4g} m per input pixel, inside the parent's range")
        scale["parent_source"] = parent_meta["scale"].get("source")
        scale["chips_input_gsd_m"] = got
        return scale, middle_gsd(got)
    if got:
        lo, hi = float(got[0]), float(got[1])
        return {
            "input_gsd_m": [lo, hi],
            "tile_footprint_m": [round(lo * size, 1), round(hi * size, 1)],
            "source": f"chips: cut by tilescan chips at {lo:.4g}-{hi:.4g} m per input pixel"
                      + (" (outside the parent's range, so the parent's is not inherited)" if parent_meta else ""),
        }, middle_gsd(got)
    return None, None


def middle_gsd(span: Sequence[float] | None) -> float | None:
    """A model's ``gsd_m`` (what ``resample_to_gsd`` reads scenes at) from the range of metres per
    input pixel its classes were seen at: the range's geometric middle; None for no range."""
    if not span:
        return None
    lo, hi = float(span[0]), float(span[1])
    return min(max(math.sqrt(lo * hi), lo), hi)


def chips_provenance(card: dict) -> dict[str, Any]:
    """What the model keeps of a chips dataset's card: names and hashes, no local paths."""
    split = card.get("split", {})
    return {
        "format": card.get("format"),
        "labels": {k: card["labels"].get(k) for k in ("file", "sha256", "layer", "class_field", "crs", "features",
                                                      "renamed_classes")},
        "scenes": [{"scene": s["scene"], "crs": s.get("crs"), "gsd_m": s.get("gsd_m"), "tile_px": s["tiling"].get("tile_px"),
                    "chips": s.get("chips")} for s in card.get("scenes", [])],
        "cut_for_model": {k: card.get("model", {}).get(k) for k in ("id", "sha256")},
        "input_gsd_m": card.get("input_gsd_m"),
        "min_cover": card.get("tiling", {}).get("min_cover"),
        "min_valid": card.get("tiling", {}).get("min_valid"),
        "split": {k: split.get(k) for k in ("method", "block_m", "seed", "val_fraction", "test_fraction", "counts")},
        "created": card.get("created"),
    }


def scene_bands(card: dict, parent) -> list[int] | None:
    """The scene bands the chips were cut from when given (``chips --bands``), else those of the
    parent they were cut for: what ``run`` reads for the model (``LoadedModel.tiling_for``)."""
    bands = (card.get("tiling") or {}).get("bands") or (parent.meta.get("scene_bands") if parent is not None else None)
    return [int(b) for b in bands] if bands else None


def chips_bands_differ(card: dict | None, lm) -> str | None:
    """Why a chips dataset (its ``chips.json``) holds other scene bands than the model ``lm``
    reads (its ``scene_bands``), or None: chips cut with other ``--bands``, or by colour for
    the packaged model. Its scores would be of input it was not trained on."""
    from ..model import describe_model

    own = [int(b) for b in lm.meta.get("scene_bands") or ()]
    if card is None or not own:
        return None
    cut = ",".join(str(int(b)) for b in (card.get("tiling") or {}).get("bands") or ())
    if not cut and (card.get("model") or {}).get("sha256") == describe_model(None).sha256:
        cut = "red, green, blue by colour"
    if not cut or cut == ",".join(map(str, own)):
        return None
    return (f"the chips were cut from scene bands {cut} (chips.json), but the model reads bands "
            f"{','.join(map(str, own))} (its scene_bands): its scores here are of input it was not trained on")


def child_metadata(parent_card, head: str, freeze_epochs: int, finetune_lr: float) -> dict[str, Any]:
    """The ``parent`` entry of a fine-tuned model's metadata (and the terms it inherits)."""
    pm = parent_card.meta
    training = pm.get("training") or {}
    entry = {
        "id": parent_card.model_id,
        "sha256": parent_card.sha256,
        "file": Path(parent_card.path).name,
        "classes": len(pm["classes"]),
        "head": head,
        "freeze_epochs": freeze_epochs,
        "finetune_learning_rate": finetune_lr,
    }
    for key in ("dataset", "citation", "terms"):
        if training.get(key) or (pm.get("parent") or {}).get(key):
            entry[key] = training.get(key) or pm["parent"][key]
    return entry

