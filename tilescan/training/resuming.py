"""What a resumed training run (``train --resume``) shares with its checkpoint: the classes,
the parent, the recipe (:func:`as_checkpointed`), and the images it trains and validates on
(:func:`same_split`: the split recorded as :func:`split_record`, which ``--resume`` draws
again with :func:`checkpoint_split`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Sequence

from ..config import TrainConfig
from ..errors import ConfigError
from ..layout import read_json
from ..outputs.files import _fsync_path, write_text
from .data import Dataset


def split_record(dataset: Dataset, cfg: TrainConfig, limit: int | None) -> dict:
    """What decides which images a run trains and validates on, kept in its checkpoint: the
    split lists' hashes, the seed and fractions a drawn split was drawn with, ``limit``."""
    return {"sha256": {s: dataset.split_sha256.get(s) for s in ("train", "val")}, "seed": cfg.seed,
            "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "limit": limit}


def commit_epoch(ckpt: Path, state: dict, staged: dict[str, str]) -> None:
    """An epoch's checkpoint, whole or not at all: its files written under temporary names
    (``staged``: temporary -> final name), state.json naming them is the commit, then they move
    into place; a run killed in between is finished by :func:`roll_forward` when it resumes."""
    for tmp in staged:  # on disk before state.json says they are whole (a power cut, not only a kill)
        _fsync_path(ckpt / tmp)
    write_text(ckpt / "state.json", json.dumps({**state, "staged": staged}, indent=2))
    roll_forward(ckpt)


def roll_forward(ckpt: Path) -> None:
    """Finish the epoch state.json commits (its staged files into place) and remove files staged
    by an epoch killed before its commit (the best weights of an epoch the state does not know)."""
    state = read_json(ckpt / "state.json")
    for tmp, final in ((state.get("staged") or {}) if isinstance(state, dict) else {}).items():
        if (ckpt / tmp).exists():
            os.replace(ckpt / tmp, ckpt / final)
    for stale in ckpt.glob(".*.tmp.*"):
        stale.unlink(missing_ok=True)


def carry_optimizer_state(model, opt, ckpt: Path) -> None:
    """Build ``opt`` (made as a fresh run makes it) on ``model``'s variables and give it the state
    (step count, moments) of the optimizer ``model`` came back with from its checkpoint."""
    opt.build(model.trainable_variables)
    saved = model.optimizer.variables  # paths "<optimizer name>/<variable>": the names are compared
    if [v.path.split("/", 1)[-1] for v in opt.variables] != [v.path.split("/", 1)[-1] for v in saved]:
        raise ConfigError(f"the optimizer state in {ckpt / 'last.keras'} does not fit this run: pass --overwrite "
                          "to start afresh", path=str(ckpt))
    for v, was in zip(opt.variables, saved):
        v.assign(was)


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".keras") + ".ckpt")


def checkpointed_run(ckpt: Path) -> dict:
    """The run a checkpoint records (its classes, parent, recipe, split); empty when there is no
    checkpoint, or one of an earlier version (refused by :func:`as_checkpointed`)."""
    state = read_json(ckpt / "state.json")
    return (state.get("run") or {}) if isinstance(state, dict) else {}


def checkpoint_split(out: str | Path) -> dict:
    """The seed and fractions the checkpointed run of model file ``out`` drew its split with
    (none for a fresh start, or a checkpoint of an earlier version): ``--resume`` splits the
    data with them."""
    split = checkpointed_run(checkpoint_path(Path(out))).get("split") or {}
    return {k: split[k] for k in ("seed", "val_fraction", "test_fraction") if k in split}


def same_split(dataset: Dataset, cfg: TrainConfig, limit: int | None, ckpt: Path) -> None:
    """Refuse to resume on other train or val images than the checkpointed run's: the epochs
    to come would train on its val or test images (a test score that leaks, unwarned)."""
    was = checkpointed_run(ckpt).get("split")
    if not was:  # no checkpoint yet, or one of an earlier version
        return
    now = split_record(dataset, cfg, limit)
    if now["sha256"] != was["sha256"] or now["limit"] != was["limit"]:
        changed = " and ".join(s for s in ("train", "val") if now["sha256"].get(s) != (was["sha256"] or {}).get(s))
        said = {k: "no --limit" if v is None else f"--limit {v}" for k, v in (("was", was["limit"]), ("now", now["limit"]))}
        limit = f"; {said['was']} then, {said['now']} now" if now["limit"] != was["limit"] else ""
        raise ConfigError(f"this checkpoint is of a run on other {changed or 'train or val'} images (images added, "
                          f"removed or renamed since, other split lists or fractions{limit}): resume with the same "
                          "data and options, or pass --overwrite to start afresh", path=str(ckpt))


#: Train settings a resumed run may change: the rest are the checkpointed run's own.
FREE_ON_RESUME = ("epochs", "workers", "class_colors")


def as_checkpointed(cfg: TrainConfig, ckpt: Path, classes: Sequence[str], log: Callable[[str], None]) -> TrainConfig:
    """``cfg`` for ``--resume``: the run the checkpoint records must be this one. Other classes
    or another ``--init`` are refused; the checkpoint's recipe is kept (its parent, and so the
    parent's terms, when ``--init`` is not repeated; its frozen epochs, learning rates...),
    and settings given otherwise are named. ``epochs`` may change (:data:`FREE_ON_RESUME`)."""
    run = checkpointed_run(ckpt)
    if not run and isinstance(read_json(ckpt / "state.json"), dict):  # this version's epochs all record their run
        raise ConfigError(f"its checkpoint {ckpt} was written by an earlier tilescan, which recorded neither the classes, "
                          "split nor settings of its run, so resuming cannot check that the data and options are that "
                          "run's (other classes would take its weights under their names): train with --overwrite "
                          "instead of --resume to start afresh", path=str(ckpt))
    if not run:  # no checkpoint yet: a fresh start
        return cfg
    if list(run["classes"]) != list(classes):
        raise ConfigError(f"its checkpoint {ckpt} is of a run on other classes ({', '.join(run['classes'])}) than "
                          f"this dataset's ({', '.join(classes)}): resume with that run's data, or pass --overwrite "
                          "to start afresh", path=str(ckpt))
    recipe = run["recipe"]
    if cfg.init:
        from .transfer import parent_path

        if run["init_path"] is None or os.path.realpath(parent_path(cfg.init)) != os.path.realpath(run["init_path"]):
            raise ConfigError(f"--init {cfg.init}: its checkpoint {ckpt} is of a run "
                              + (f"fine-tuned from {recipe['init']}" if recipe["init"] else "trained from scratch")
                              + ": resume it as it was started, or pass --overwrite to start afresh", path=str(ckpt))
    as_given = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if hasattr(cfg, k)}  # JSON: lists
    kept = {k: v for k, v in as_given.items() if v != getattr(cfg, k) and not (k == "init" and cfg.init)}
    if not kept:
        return cfg
    log("resuming with the checkpoint's settings: " + ", ".join(f"{k} {_said(v)} (given {_said(getattr(cfg, k))})"
                                                                 for k, v in kept.items()))
    said = getattr(cfg, "_origins", {})
    cfg = dataclasses.replace(cfg, **kept)
    object.__setattr__(cfg, "_origins", said)
    return cfg


def _said(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return "none" if value in (None, "") else str(value)
