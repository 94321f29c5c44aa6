"""Fit a ResNet-18 on a folder-per-class image dataset, with checkpoints and resume.

``train()`` streams the train and val splits only (the test split is never opened),
augments the training set, runs AdamW with warmup + cosine decay and label smoothing,
checkpoints every epoch (full model with optimizer state, best weights, a state file and
the history CSV), stops early when the validation loss stops improving (restoring the best
weights), and saves a float32 ``.keras`` model with tilescan metadata.

Checkpoints live in ``<MODEL>.ckpt/``; ``resume=True`` continues a killed run from its last
finished epoch with the same schedule, data order and early-stopping state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .. import stop
from ..config import TrainConfig
from ..errors import ConfigError, InputError, LockedError, OutputError, OutputExistsError
from ..log import catching_warnings, emit
from ..model import DEFAULT_CAM_LAYER, build_resnet18, class_names_problem, save_model
from ..outputs.files import folder_kept_if_used, make_folder, remove_dead_temps, write_error, write_text
from . import history
from . import resuming
from .data import Dataset, channel_stats, make_batches, train_val_paths
from .recipe import current_lr, make_optimizer, resolve_precision


def _checkpointer(ckpt: Path, state: dict, cfg: TrainConfig, max_seconds: float | None, log: Callable[[str], None]):
    """A Keras callback: history row, best weights, full checkpoint, early stopping, time guard."""
    import keras

    class Checkpointer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t_start = time.monotonic()
            self.t_epoch = self.t_start

        def on_epoch_begin(self, epoch, logs=None):
            self.t_epoch = time.monotonic()

        def on_train_batch_end(self, batch, logs=None):
            stop.check_noted()  # a stop whose exception Python dropped (raised in a gc callback): here again

        on_test_batch_end = on_train_batch_end

        def on_epoch_end(self, epoch, logs=None):
            with stop.deferred():  # a stop signal waits for the epoch's checkpoint to be whole
                try:
                    self._checkpoint(epoch, dict(logs or {}))
                except OSError as e:  # a full disk: said as for any output, the epoch's half-saved files removed
                    for tmp in ckpt.glob(f".*.e{epoch + 1}.tmp.*"):
                        tmp.unlink(missing_ok=True)
                    raise write_error(e, ckpt) from None

        def _checkpoint(self, epoch, logs):
            secs = time.monotonic() - self.t_epoch
            row = {
                "epoch": epoch + 1,
                "loss": logs.get("loss"),
                "accuracy": logs.get("accuracy"),
                "val_loss": logs.get("val_loss"),
                "val_accuracy": logs.get("val_accuracy"),
                "learning_rate": current_lr(self.model.optimizer),
                "seconds": round(secs, 2),
            }
            history.append_row(ckpt / "history.csv", row)
            val = logs.get("val_loss")
            staged = {}  # the epoch's files under temporary names -> their names once state.json commits them
            if val is not None and val < state["best"] - cfg.min_delta:
                state.update(best=float(val), best_epoch=epoch + 1, wait=0,
                             best_val_accuracy=float(logs.get("val_accuracy", float("nan"))))
                staged[f".best.e{epoch + 1}.tmp.weights.h5"] = "best.weights.h5"
                self.model.save_weights(ckpt / f".best.e{epoch + 1}.tmp.weights.h5")
            else:
                state["wait"] += 1
            state["epochs_done"] = epoch + 1
            if cfg.patience and state["wait"] >= cfg.patience:
                state["stopped"] = "early-stopping"
                self.model.stop_training = True
            elapsed = time.monotonic() - self.t_start
            if max_seconds is not None and elapsed + secs > max_seconds:
                state["stopped"] = "time-limit"
                self.model.stop_training = True
            staged[f".last.e{epoch + 1}.tmp.keras"] = "last.keras"
            self.model.save(ckpt / f".last.e{epoch + 1}.tmp.keras")
            resuming.commit_epoch(ckpt, state, staged)
            log(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
                f"val_loss {val if val is not None else float('nan'):.4f} "
                f"val_acc {logs.get('val_accuracy', float('nan')):.4f} lr {row['learning_rate']:.2e} "
                f"({secs:.0f} s){'  *best*' if state['best_epoch'] == epoch + 1 else ''}"
            )
            if state["stopped"] == "early-stopping":
                log(f"early stopping: no better val_loss for {cfg.patience} epochs (the best, epoch {state['best_epoch']}, is kept)")
            elif state["stopped"] == "time-limit":
                log(f"stopping for --max-time: another epoch of {secs:.0f} s would end past {max_seconds:.0f} s; --resume goes on")

    return Checkpointer()


def stated_scale(gsd_m, image_paths, input_size: int) -> dict:
    """The metadata's ``scale`` for a model trained on images of a stated ground sample
    distance (``[train] gsd_m``: metres per pixel of the images as stored, one value or a
    range); unknown (``input_gsd_m`` null) when none is stated. The model sees an image
    resized to ``input_size``, so its metres per input pixel scale by stored px / input px."""
    if not gsd_m:
        return {"input_gsd_m": None, "source": "unknown: the training data states no ground sample distance ([train] gsd_m)"}
    from .data import decode_rgb

    lo, hi = float(min(gsd_m)), float(max(gsd_m))
    side = max(decode_rgb(Path(image_paths[0])).shape[:2])  # stored image edge, from the first image
    f = side / input_size
    return {
        "input_gsd_m": [round(lo * f, 4), round(hi * f, 4)],
        "tile_footprint_m": [round(lo * side, 1), round(hi * side, 1)],
        "source": f"stated: [train] gsd_m = {[lo, hi]} m per stored pixel x {side} px / {input_size} px input",
    }


def train(dataset: Dataset, out: str | Path, cfg: TrainConfig, **kwargs) -> dict:
    """Train and save ``out`` (a ``.keras`` file). Returns a summary dict.

    ``limit`` keeps the first N items of each split per run (for smoke tests);
    ``max_seconds`` stops after the epoch that would cross it (best weights kept).
    ``cfg.init`` fine-tunes from a parent model (:mod:`tilescan.training.transfer`): its input size,
    bands and normalisation, its backbone weights, ``cfg.freeze_epochs`` epochs of the head
    alone, then the whole model at ``cfg.finetune_lr``. Keyword arguments as :func:`_train`.
    Keras' global precision policy is the caller's again afterwards, also after an error or a stop
    (:func:`tilescan.train` keeps the caller's random draws too).
    """
    import keras

    before = keras.mixed_precision.global_policy()
    try:
        with _training_into(Path(out)):
            return _train(dataset, out, cfg, **kwargs)
    finally:
        keras.mixed_precision.set_global_policy(before)


@contextlib.contextmanager
def _training_into(out: Path):
    """Hold the lock ``.<MODEL>.lock`` beside the model while training into it: a second train
    into the same model would write the same checkpoint and history rows in turn."""
    from ..layout import Busy, FileLock

    if out.parent.exists() and not out.parent.is_dir():  # no folder: said as the checkpoint's is made
        yield
        return
    with folder_kept_if_used(out.parent):  # a train refused leaves no folder it made
        lock = FileLock(out.parent / f".{out.name}.lock")
        try:
            lock.acquire()
        except Busy as busy:
            raise LockedError(f"another tilescan process ({busy.holder or 'unknown pid'}) is training into this "
                              "model; wait for it, or train into another -o", path=str(out)) from None
        except OSError as e:
            raise OutputError(f"cannot lock the model's folder ({e.strerror or e})", path=str(out)) from None
        try:
            yield
        finally:
            lock.release()


def _train(
    dataset: Dataset,
    out: str | Path,
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    max_seconds: float | None = None,
    limit: int | None = None,
    half: bool = False,
    verbose: int = 2,
    log: Callable[[str], None] = emit,
) -> dict:
    """:func:`train`'s work."""
    import keras

    from .chips import read_card

    out = Path(out)
    ckpt, cfg = _checked_start(dataset, out, cfg, overwrite, resume, log, limit)
    tr_paths, tr_y, va_paths, va_y = train_val_paths(dataset, limit)
    k = len(dataset.classes)
    chips_card = read_card(dataset.root)
    parent, size = _parent_and_size(cfg, chips_card, log)
    colors = _legend(cfg, dataset, chips_card, parent, log)
    freeze = min(cfg.freeze_epochs, cfg.epochs) if parent is not None else 0
    finetune_lr = (cfg.finetune_lr or cfg.learning_rate / 10) if parent is not None else cfg.learning_rate

    from_checkpoint = resume and (ckpt / "state.json").exists() and (ckpt / "last.keras").exists()
    if from_checkpoint and (kept := _already_saved(out, ckpt, cfg, log)) is not None:
        return kept
    parent_model = None
    if parent is not None and not from_checkpoint:
        from ..model import load_model

        parent_model = load_model(parent.path).model  # before the precision policy: its weights are float32
    policy = resolve_precision(cfg.mixed_precision)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(cfg.seed)
    state, model = _start_state(ckpt, from_checkpoint, resume, parent, tr_paths, size, cfg, log)
    state.setdefault("run", {"classes": list(dataset.classes), "init_path": parent.path if parent is not None else None,
                             "recipe": {k: v for k, v in asdict(cfg).items() if k not in resuming.FREE_ON_RESUME},
                             "split": resuming.split_record(dataset, cfg, limit)})
    if colors:  # kept with the checkpoints: --resume without --class-colors goes on with them
        state["run"]["colors"] = colors
    colors = colors or state["run"].get("colors")
    mean, std = state["mean"], state["std"]

    train_ds = make_batches(
        tr_paths, tr_y, k, cfg.batch_size, size, augment=cfg.augment, shuffle=True, seed=cfg.seed,
        crop_scale=cfg.crop_scale, jitter=cfg.color_jitter, workers=cfg.workers, start_epoch=state["epochs_done"],
    )
    val_ds = make_batches(va_paths, va_y, k, cfg.batch_size, size, workers=cfg.workers)
    head = None
    if model is None:
        model, head = _new_model(size, k, mean, std, parent, parent_model, dataset.classes, tr_paths, tr_y, cfg,
                                 state, log)
        del parent_model
    head = state.get("head", head)

    phases = _phases(cfg, parent is not None, freeze, finetune_lr)
    t0 = time.monotonic()
    _fit_phases(model, phases, train_ds, val_ds, ckpt, state, cfg, parent is not None, freeze, max_seconds, t0,
                verbose, log)
    _restore_best(model, ckpt)
    export, val_loss, val_acc = _export(model, size, k, mean, std, va_paths, va_y, cfg)
    meta = _metadata(dataset, cfg, size, mean, std, tr_paths, policy, state, t0, limit,
                     _val_scores(val_acc, val_loss, len(va_paths), cfg))
    if chips_card is not None:
        _add_chips_metadata(meta, chips_card, cfg, parent, size)
    if parent is not None:
        _add_parent_metadata(meta, parent, head, freeze, finetune_lr, state, dataset, size, cfg, chips_card)
    if colors:
        meta["legend"].update(colors)
    sha = _save(export, out, meta, half, ckpt, state)
    history.keep_beside(out, ckpt)
    stop.settle()  # the model and its history are in place: a stop from now on lets the command end done
    _say_saved(out, ckpt, sha, val_acc, state["best_epoch"], log)
    _say_near_chance(val_acc, k, parent is not None, len(tr_paths), log)
    return {"model": str(out), "sha256": sha, "val_accuracy": float(val_acc), "val_loss": float(val_loss),
            "seconds": round(time.monotonic() - t0, 1), **state}


def _say_saved(out: Path, ckpt: Path, sha: str, val_acc: float, best_epoch: int, log: Callable[[str], None]) -> None:
    log(f"saved {out} (val accuracy {val_acc:.4f}, measured again on the float32 model saved; best epoch "
        f"{best_epoch}, sha256 {sha[:12]})")
    held = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20
    log(f"checkpoints ({held:.0f} MiB) kept in {ckpt} for --resume; remove that folder once you keep the model")


def _say_near_chance(val_acc: float, k: int, fine_tuned: bool, n_train: int, log: Callable[[str], None]) -> None:
    """Warn when the saved model guesses little better than chance on val: from scratch on few
    images the network learns the training images, not the classes; a fine-tuned parent needs far fewer."""
    if k > 1 and val_acc < 1.5 / k:
        advice = ("fine-tuning the packaged model (--init default) needs far fewer images than training from "
                  "scratch (README, 'Train on your own labels')" if not fine_tuned else
                  "more images per class, or more epochs (--epochs, then --resume)")
        log(f"warning: the saved model's val accuracy ({val_acc:.2f}) is near chance for {k} classes "
            f"({1 / k:.2f}) after training on {n_train} images: {advice}")


def _save(export, out: Path, meta: dict, half: bool, ckpt: Path, state: dict) -> str:
    """Save the model and record its sha256 in the checkpoint's state (a --resume with nothing
    left to train then leaves the file be: :func:`_already_saved`)."""
    state["saved_sha256"] = sha = save_model(export, out, meta, half=half)
    write_text(ckpt / "state.json", json.dumps(state, indent=2))
    return sha


def _already_saved(out: Path, ckpt: Path, cfg: TrainConfig, log: Callable[[str], None]) -> dict | None:
    """The summary of the checkpointed run when it has no epoch left to train (all done, or
    stopped early) and ``out`` is still the model it saved: then the model is not written again
    (saving again would give it a new id and sha256, and drop scores recorded since), only its
    history and curves where a stop came before them; else None."""
    from ..model import file_sha256

    state = json.loads((ckpt / "state.json").read_text())
    if not (state.get("epochs_done", 0) >= cfg.epochs or state.get("stopped") == "early-stopping"):
        return None
    if not out.is_file() or state.get("saved_sha256") != (sha := file_sha256(out)):
        return None
    if not all(p.exists() for p in history.beside(out)):
        history.keep_beside(out, ckpt)  # a stop after the model was saved came before them
    early = state.get("stopped") == "early-stopping"
    more = "" if early else f"--epochs above {state['epochs_done']} goes on, "
    log(f"nothing to train: the checkpointed run {'stopped early' if early else 'trained all its epochs'} (epoch "
        f"{state['epochs_done']}, best {state.get('best_epoch')}) and {out} is the model it saved (sha256 {sha[:12]}): "
        f"left as it is; {more}--overwrite trains afresh")
    return {"model": str(out), "sha256": sha, "unchanged": True, **state}


def _legend(cfg: TrainConfig, dataset: Dataset, chips_card: dict | None, parent, log: Callable[[str], None]) -> dict | None:
    """The legend's colours (:func:`~tilescan.training.legend_colors.legend_colors`), a chips
    class matched also by the name it had in the labels file."""
    from .legend_colors import legend_colors

    renamed = ((chips_card or {}).get("labels") or {}).get("renamed_classes") or {}
    return legend_colors(cfg.class_colors, cfg.origin("class_colors"), dataset.classes, parent, log,
                         {safe: name for name, safe in renamed.items()})


def _checked_start(dataset: Dataset, out: Path, cfg: TrainConfig, overwrite: bool, resume: bool,
                   log: Callable[[str], None], limit: int | None = None) -> tuple[Path, TrainConfig]:
    """The checkpoint folder and the recipe to train with, once the data, the output and a
    checkpoint to resume are known to fit."""
    if len(dataset.classes) < 2:
        raise InputError(f"a classifier needs two classes or more; this dataset has {len(dataset.classes)} "
                         f"({', '.join(dataset.classes) or 'none'})", path=str(dataset.root))
    if problem := class_names_problem(dataset.classes):  # found before training, not when the model is saved
        raise InputError(f"the dataset's classes cannot name a model's: its list {problem}", path=str(dataset.root))
    trained = {k for _, k in dataset.items("train")}  # none at all: train_val_paths says why
    if trained and (untaught := [c for i, c in enumerate(dataset.classes) if i not in trained]):
        raise InputError(f"no training image of {len(untaught)} class(es) ({', '.join(untaught[:5])}): the model "
                         "could not learn them; add images to the train split, or leave the class out",
                         path=str(dataset.root))
    ckpt = _checkpoint_dir(out, overwrite, resume)
    remove_dead_temps(out)  # a model half-saved by a run killed then
    if not resume:
        return ckpt, cfg
    cfg = resuming.as_checkpointed(cfg, ckpt, dataset.classes, log)
    resuming.same_split(dataset, cfg, limit, ckpt)
    return ckpt, cfg


def _checkpoint_dir(out: Path, overwrite: bool, resume: bool) -> Path:
    """The checkpoint folder ``<MODEL>.ckpt`` of ``out``, after checking the output name and
    that nothing kept is lost without ``overwrite``: a model file (``resume`` replaces it only
    by going on from its checkpoint), or the finished epochs of an interrupted run."""
    if out.suffix != ".keras":
        raise ConfigError("the output model must end in .keras", path=str(out))
    if overwrite and resume:
        raise ConfigError("--resume goes on from the checkpoint and --overwrite starts afresh: give one of them")
    ckpt = resuming.checkpoint_path(out)
    if overwrite:
        return ckpt
    if resume:
        resuming.roll_forward(ckpt)  # an epoch killed between its commit and its files' renames
    try:
        done = int(json.loads((ckpt / "state.json").read_text())["epochs_done"]) if (ckpt / "last.keras").exists() else 0
    except (OSError, ValueError, KeyError, TypeError):
        done = 0
    if out.exists() and not (resume and done):
        raise OutputExistsError("model file exists; pass --overwrite to replace it"
                                + (f" (there is no checkpoint in {ckpt} to resume)" if resume else ""), path=str(out))
    if done and not resume:
        raise OutputExistsError(f"{ckpt} holds {done} finished epoch(s) of an earlier run: pass --resume to go on "
                                "from there, or --overwrite to start afresh", path=str(out))
    return ckpt


def _parent_and_size(cfg: TrainConfig, chips_card: dict | None, log: Callable[[str], None]):
    """The parent model's card (None: training from scratch) and the input size to train at."""
    from . import transfer

    parent = None  # the parent's card (metadata and hash); its Keras model loads only for a fresh start
    size = cfg.image_size
    if cfg.init:
        from ..model import describe_model

        parent = describe_model(transfer.parent_path(cfg.init))
        size = transfer.check_parent(parent, cfg.image_size, "image_size" in getattr(cfg, "_origins", {}), chips_card)
    elif chips_card is not None and int(chips_card.get("input_size", size)) != size:
        log(f"warning: the chips were cut at {chips_card['input_size']} px for model {chips_card['model']['id']}, "
            f"but the model trains at {size} px: run would tile scenes for {size} px, not as the chips were cut")
    if size < 64:  # the explained block (conv5, 1/32 of the input) is then one cell: flat heatmaps
        log(f"warning: at {size} px the Grad-CAM layer is {max(1, size // 32)} x {max(1, size // 32)} cells: the "
            "heatmaps of this model cannot show where in a tile its evidence lies (64 px or more gives 2 x 2 and up)")
    if parent is None and (cfg.freeze_epochs or cfg.finetune_lr):
        log(f"warning: {cfg.origin('freeze_epochs') if cfg.freeze_epochs else cfg.origin('finetune_lr')} applies only "
            "when fine-tuning (--init); training from scratch")
    return parent, size


def _start_state(ckpt: Path, from_checkpoint: bool, resume: bool, parent, tr_paths, size: int, cfg: TrainConfig,
                 log: Callable[[str], None]) -> tuple[dict, object]:
    """The training state and model of a resumed run (model None for a fresh start, whose folder is emptied)."""
    import keras

    state = {"best": float("inf"), "best_epoch": 0, "wait": 0, "epochs_done": 0, "stopped": None}
    model = None
    if from_checkpoint:
        state.update(json.loads((ckpt / "state.json").read_text()))
        state.pop("staged", None)  # moved into place (resuming.roll_forward)
        history.keep_upto(ckpt / "history.csv", state["epochs_done"])  # a row of an epoch killed while it was saved
        model = keras.saving.load_model(ckpt / "last.keras")
        log(f"resuming from {ckpt} after epoch {state['epochs_done']} (best val_loss {state['best']:.4f} at epoch {state['best_epoch']})")
    else:
        if resume:
            log(f"no checkpoint in {ckpt}; starting from scratch")
        if ckpt.exists():
            for f in ckpt.iterdir():
                f.unlink()
        make_folder(ckpt)
        if parent is not None:  # the parent's normalisation: its backbone expects exactly that input
            mean, std = list(parent.meta["normalization"]["mean"]), list(parent.meta["normalization"]["std"])
        else:
            mean, std = channel_stats(tr_paths, size, seed=cfg.seed)
        state.update(mean=mean, std=std)
    return state, model


def _new_model(size: int, k: int, mean, std, parent, parent_model, classes, tr_paths, tr_y, cfg: TrainConfig,
               state: dict, log: Callable[[str], None]):
    """A fresh ResNet-18 and its head's origin: the parent's weights copied in when fine-tuning (None otherwise)."""
    from . import transfer

    head = None
    model = build_resnet18((size, size, 3), k, mean=mean, std=std)
    if parent_model is not None:
        head = transfer.copy_weights(parent_model, model, parent.meta["classes"], classes)
        if head == "new":
            fit = transfer.imprint_head(model, tr_paths, tr_y, k, size, cfg.label_smoothing, seed=cfg.seed)
            state["imprint"] = fit
            log(f"new head of {k} classes from the parent's features of {fit['images']} training images "
                f"(their accuracy as class means {fit['train_accuracy']:.3f})")
        state["head"] = head
    return model, head


def _phases(cfg: TrainConfig, fine_tuning: bool, freeze: int, finetune_lr: float) -> list:
    """(name, last epoch, config) of each phase: the head alone for ``freeze`` epochs, then the whole model."""
    phases = ([("frozen", freeze, dataclasses.replace(cfg, epochs=freeze, warmup_epochs=0, patience=0))] if freeze else [])
    phases.append(("all", cfg.epochs, dataclasses.replace(cfg, epochs=cfg.epochs - freeze, learning_rate=finetune_lr)
                   if fine_tuning else cfg))
    return phases


def _fit_phases(model, phases: list, train_ds, val_ds, ckpt: Path, state: dict, cfg: TrainConfig, fine_tuning: bool,
                freeze: int, max_seconds: float | None, t0: float, verbose: int, log: Callable[[str], None]) -> None:
    """Fit each phase not finished yet, compiling afresh unless a resumed checkpoint's optimizer goes on."""
    import keras

    from . import transfer

    loaded = getattr(model, "optimizer", None) is not None and state["epochs_done"] > 0  # resumed: the checkpoint's optimizer state
    if state.get("stopped") == "time-limit":
        state["stopped"] = None  # a resumed run goes on where the time limit stopped it
    elif state.get("stopped") == "early-stopping" and state["epochs_done"] < cfg.epochs:
        log(f"nothing to go on with: the checkpointed run stopped early after epoch {state['epochs_done']} "
            "(no better val_loss); --overwrite trains afresh")
    start = 0
    for name, end, phase_cfg in phases:
        if state.get("stopped") or state["epochs_done"] >= end:
            start = end
            continue
        if fine_tuning:
            transfer.set_backbone_trainable(model, name != "frozen")
        going_on = loaded and state["epochs_done"] > start
        if not going_on and name == "all" and freeze:
            state["wait"] = 0  # patience counts from the start of fine-tuning
        # the optimizer as a fresh run makes it, whether or not it goes on: a checkpoint's AdamW comes back without
        # its exclude_from_weight_decay() (its config does not keep it) and would decay BatchNorm scales and biases
        opt = make_optimizer(phase_cfg, len(train_ds))
        if going_on:  # the checkpoint's optimizer state goes on (its step count, moments) on this phase's schedule
            resuming.carry_optimizer_state(model, opt, ckpt)
        model.compile(
            optimizer=opt,
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=["accuracy"],
        )
        # the compiled loss and metrics built on a batch read here: fit() then pulls none through the loader's
        # worker queue (JAX, torch), whose prefetched leftovers it would feed first in the next epoch
        x0, y0 = val_ds[0]
        model.evaluate(x0, y0, batch_size=len(x0), verbose=0)
        if fine_tuning:
            log(f"{'head only (backbone frozen)' if name == 'frozen' else 'whole model'}: epochs "
                f"{state['epochs_done'] + 1}-{end}, peak learning rate {phase_cfg.learning_rate:g}")
        left = None if max_seconds is None else max(0.0, max_seconds - (time.monotonic() - t0))
        model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=end,
            initial_epoch=state["epochs_done"],
            shuffle=False,  # Keras would shuffle the batches' order with Python's `random`, whose draws a resumed
            # process has not made; the loader permutes the images of each epoch by (seed, epoch) itself
            callbacks=[keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs=None: train_ds.set_epoch(epoch)),
                       _checkpointer(ckpt, state, dataclasses.replace(phase_cfg, epochs=cfg.epochs), left, log)],
            verbose=verbose,
        )
        stop.check_noted()  # one lost in the last batch: the checkpoint is whole, --resume exports it
        start = end


def _restore_best(model, ckpt: Path) -> None:
    """Load the best epoch's weights into ``model`` when a checkpoint holds them."""
    if (ckpt / "best.weights.h5").exists():
        with catching_warnings():  # best weights saved in another phase carry another optimizer's state
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(ckpt / "best.weights.h5")


def _export(model, size: int, k: int, mean, std, va_paths, va_y, cfg: TrainConfig):
    """A float32 copy of ``model`` and its val loss and accuracy."""
    import keras

    # Export in float32 whatever the training precision was: CPUs without bf16 run it fast.
    keras.mixed_precision.set_global_policy("float32")
    export = build_resnet18((size, size, 3), k, mean=mean, std=std)
    for layer in export.layers:  # by name: a frozen layer lists its weights elsewhere in model.weights
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    export.compile(loss=keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
    val_loss, val_acc = export.evaluate(
        make_batches(va_paths, va_y, k, cfg.batch_size, size, workers=cfg.workers), verbose=0
    )
    return export, val_loss, val_acc


def _val_scores(accuracy: float, loss: float, n: int, cfg: TrainConfig) -> dict:
    """The exported model's scores on the val split, for its metadata."""
    note = ({"loss_note": f"cross-entropy of the exported model, without the label smoothing ({cfg.label_smoothing:g}) "
                          "in the training log's val_loss"} if cfg.label_smoothing else {})
    return {"accuracy": float(accuracy), "loss": float(loss), "n": n, **note}


def _metadata(dataset: Dataset, cfg: TrainConfig, size: int, mean, std, tr_paths, policy: str, state: dict,
              t0: float, limit: int | None, val_scores: dict) -> dict:
    """The tilescan metadata of a model trained from scratch (chips and parent add to it)."""
    import keras

    from .transfer import middle_gsd

    scale = stated_scale(cfg.gsd_m, tr_paths, size)
    return {
        "id": f"tilescan-resnet18-{dataset.name or 'custom'}-{size}px-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}",
        "classes": list(dataset.classes),
        "input_size": [size, size],
        "bands": ["red", "green", "blue"],
        "normalization": {
            "input": "float32 0..1 (uint8 / 255); the model's first layer subtracts mean and divides by std",
            "mean": mean,
            "std": std,
        },
        "gsd_m": middle_gsd(scale["input_gsd_m"]),  # None where no scale is stated (the chips may set one)
        "scale": scale,
        "cam_layer": DEFAULT_CAM_LAYER,
        "legend": {"classes": list(dataset.classes)},
        "training": {
            **dataset.provenance(),
            "config": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in asdict(cfg).items()},
            "precision": policy,
            "backend": keras.backend.backend(),
            "epochs_run": state["epochs_done"],
            "best_epoch": state["best_epoch"],
            "stopped": state.get("stopped"),
            "seconds_this_run": round(time.monotonic() - t0, 1),
            "limit": limit,
            "images_used": {"train": len(tr_paths), "val": val_scores["n"]},  # after --limit; counts are the splits' own
        },
        "scores": {"val": val_scores},
    }


def _add_chips_metadata(meta: dict, chips_card: dict, cfg: TrainConfig, parent, size: int) -> None:
    """The chips' provenance and labels, and the scale they were cut at unless ``[train] gsd_m`` states one."""
    from . import transfer

    prov = transfer.chips_provenance(chips_card)
    meta["training"]["chips"] = prov
    meta["legend"]["labels"] = prov["labels"]
    if bands := transfer.scene_bands(chips_card, parent):
        meta["scene_bands"] = bands
    if not cfg.gsd_m:  # a stated GSD wins; else the scale the chips were cut at
        scale, gsd = transfer.child_scale(parent.meta if parent is not None else None, chips_card, size)
        if scale is not None:
            meta["scale"], meta["gsd_m"] = scale, gsd


def _add_parent_metadata(meta: dict, parent, head, freeze: int, finetune_lr: float, state: dict, dataset: Dataset,
                         size: int, cfg: TrainConfig, chips_card: dict | None) -> None:
    """What a fine-tuned model inherits from its parent: bands, normalisation, CAM layer, terms, and its id."""
    from . import transfer

    meta["parent"] = transfer.child_metadata(parent, head, freeze, finetune_lr)
    if state.get("imprint"):
        meta["parent"]["head_init"] = {"method": "class means of the parent's features (weight imprinting)", **state["imprint"]}
    meta["bands"] = list(parent.meta["bands"])
    if meta.get("scene_bands") and meta["scene_bands"] != parent.meta.get("scene_bands"):
        meta["bands"] = [f"scene band {b}" for b in meta["scene_bands"]]  # what its inputs hold, not the parent's colours
    meta["normalization"] = dict(parent.meta["normalization"])
    meta["cam_layer"] = parent.meta.get("cam_layer") or DEFAULT_CAM_LAYER
    meta["id"] = f"tilescan-resnet18-{dataset.name or 'custom'}-{size}px-finetuned-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    meta["training"]["init"] = "default" if cfg.init == "default" else Path(cfg.init).name
    if meta["parent"].get("terms"):
        meta["terms"] = f"fine-tuned from {parent.model_id}, whose terms it inherits: {meta['parent']['terms']}"
    if chips_card is None and not cfg.gsd_m:
        meta["scale"]["source"] += ("; the parent's range is not inherited: the images did not come from "
                                    "tilescan chips, so their ground scale is not known")
