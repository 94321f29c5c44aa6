"""Training on a small real AID subset: end to end, resume after SIGKILL, early stopping,
and the test split never being read."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import invoke
from tilescan.config import TrainConfig
from tilescan.training.data import load_dataset, stratified_split
from tilescan.model import load_model, read_metadata

CLASSES = ["Beach", "Forest", "Parking", "Port", "Stadium"]


@pytest.fixture(scope="module")
def mini_aid(aid_dir, tmp_path_factory) -> Path:
    """5 AID classes, 8 train / 4 val / 4 test images each, in the AID layout. The test
    images are NOT copied: their list entries point at files that do not exist, so any
    attempt to read them fails loudly."""
    root = tmp_path_factory.mktemp("aid")
    (root / "images").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    lists = {}
    for split in ("train", "val", "test"):
        lines = (aid_dir / "splits" / f"{split}.txt").read_text().split()
        want = {"train": 8, "val": 4, "test": 4}[split]
        keep = []
        for cls in CLASSES:
            keep += [ln for ln in lines if ln.split("/")[0] == cls][:want]
        lists[split] = keep
        (root / "splits" / f"{split}.txt").write_text("\n".join(keep) + "\n")
    for split in ("train", "val"):
        for ln in lists[split]:
            dst = root / "images" / ln
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(aid_dir / "images" / ln, dst)
    return root


def _train(args):
    return invoke(["train", *args])


def _class_folders(data: Path, classes, n: int, seed: int) -> Path:
    """Plain class folders of ``n`` random 36 px PNGs each."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        (data / cls).mkdir(parents=True)
        for j in range(n):
            cv2.imwrite(str(data / cls / f"{j}.png"), rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    return data


def _history(model_path: Path) -> list[dict]:
    with open(model_path.with_name(model_path.name.replace(".keras", ".history.csv"))) as fh:
        return list(csv.DictReader(fh))


def test_dataset_layouts(mini_aid, tmp_path):
    ds = load_dataset(mini_aid)
    assert ds.classes == CLASSES
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 40, "val": 20, "test": 20}
    assert ds.split_source.startswith("lists:")
    # Train/ Test/ folder layout with a val split carved from train
    for split, src in (("Train", "train"), ("Test", "val")):
        for ln in (mini_aid / "splits" / f"{src}.txt").read_text().split():
            dst = tmp_path / "tt" / split / ln
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mini_aid / "images" / ln, dst)
    ds2 = load_dataset(tmp_path / "tt", val_fraction=0.25, test_fraction=0.0)
    assert ds2.classes == CLASSES and ds2.split_source == "folders"
    assert len(ds2.items("test")) == 20 and len(ds2.items("train")) + len(ds2.items("val")) == 40
    assert not set(ds2.items("train")) & set(ds2.items("val"))


def test_empty_and_case_alike_class_folders_are_said(mini_aid, tmp_path, caplog):
    """A class folder without images leaves the legend with a warning; 'water' beside 'Water'
    (one folder on macOS and Windows) is warned about; the dataset loads either way."""
    plain = tmp_path / "plain"
    shutil.copytree(mini_aid / "images", plain)
    (plain / "wetland").mkdir()
    first = sorted((plain / CLASSES[0]).iterdir())[:2]
    (plain / CLASSES[0].lower()).mkdir()
    for f in first:
        shutil.move(f, plain / CLASSES[0].lower() / f.name)
    ds = load_dataset(plain)
    err = caplog.text
    assert "class folder(s) 'wetland' hold no image: left out of the legend" in err, err
    assert f"class folders '{CLASSES[0]}', '{CLASSES[0].lower()}' differ only in case" in err, err
    assert "wetland" not in ds.classes and CLASSES[0].lower() in ds.classes
    caplog.clear()
    load_dataset(mini_aid)  # the AID layout: its splits/ folder is no class
    assert "hold no image" not in caplog.text
    split = tmp_path / "split"  # Train/ and Test/: a class empty in one split only is still a class
    shutil.copytree(plain / CLASSES[1], split / "Train" / CLASSES[1])
    shutil.copytree(plain / CLASSES[2], split / "Train" / CLASSES[2].upper())
    shutil.copytree(plain / CLASSES[2], split / "Test" / CLASSES[2])
    (split / "Test" / CLASSES[1]).mkdir()
    caplog.clear()
    assert load_dataset(split).classes == sorted([CLASSES[1], CLASSES[2], CLASSES[2].upper()])
    assert "hold no image" not in caplog.text
    assert f"class folders '{CLASSES[2].upper()}', '{CLASSES[2]}' differ only in case" in caplog.text, caplog.text


def test_one_name_in_two_unicode_forms_is_one_class_and_said(mini_aid, tmp_path, caplog):
    """Two folders 'café' (composed, and decomposed as macOS writes it) side by side on Linux
    are one class, said with both names; the two forms in two splits (a split made on a Mac)
    are one class without a word."""
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    plain = tmp_path / "plain"
    for name, cls in ((nfc, CLASSES[0]), (nfd, CLASSES[1]), ("other", CLASSES[2])):
        shutil.copytree(mini_aid / "images" / cls, plain / name)
    ds = load_dataset(plain)
    assert ds.classes == [nfc, "other"]
    assert f"class folders {ascii(nfd)}, {ascii(nfc)} are one name in two Unicode forms" in caplog.text, caplog.text
    caplog.clear()
    split = tmp_path / "split"
    shutil.copytree(plain / nfc, split / "Train" / nfc)
    shutil.copytree(plain / nfd, split / "Test" / nfd)
    assert load_dataset(split).classes == [nfc]
    assert "Unicode forms" not in caplog.text, caplog.text


def test_stratified_split_is_seeded_and_disjoint():
    items = [(f"c{c}/{i}.jpg", c) for c in range(3) for i in range(20)]
    a = stratified_split(items, 0.2, 0.2, seed=1)
    b = stratified_split(items, 0.2, 0.2, seed=1)
    assert a == b
    all_items = a["train"] + a["val"] + a["test"]
    assert sorted(all_items) == sorted(items)
    for split, n in (("val", 4), ("test", 4), ("train", 12)):
        for c in range(3):
            assert sum(1 for _, k in a[split] if k == c) == n


def test_train_end_to_end_never_reads_test(mini_aid, tmp_path):
    out = tmp_path / "m.keras"
    res = _train([mini_aid, "-o", out, "--epochs", "2", "--image-size", "32", "--batch-size", "16", "--patience", "0"])
    assert res.exit_code == 0, res.output
    assert "checkpoints (" in res.output and f"kept in {tmp_path / 'm.ckpt'} for --resume" in res.output
    assert (tmp_path / "m.ckpt").is_dir()  # what the message says is there
    # the test images do not exist: training worked, so it never opened them
    assert not any((mini_aid / "images" / ln).exists() for ln in (mini_aid / "splits/test.txt").read_text().split())
    lm = load_model(out)
    assert lm.classes == CLASSES and lm.input_size == 32
    meta = lm.meta
    assert meta["training"]["counts"]["train"] == 40 and meta["training"]["counts"]["val"] == 20
    assert set(meta["training"]["split_sha256"]) == {"train", "val", "test"}
    assert 0.0 <= meta["scores"]["val"]["accuracy"] <= 1.0 and meta["scores"]["val"]["n"] == 20
    assert meta["training"]["images_used"] == {"train": 40, "val": 20}
    assert "without the label smoothing (0.1)" in meta["scores"]["val"]["loss_note"]  # not the log's val_loss
    # a model that guesses no better than chance is said to, with what would do better
    near = meta["scores"]["val"]["accuracy"] < 1.5 / 5
    assert ("is near chance for 5 classes (0.20) after training on 40 images: fine-tuning" in res.output) == near
    # nothing of this machine in metadata that ships with a model
    blob = json.dumps(meta)
    assert str(tmp_path) not in blob and str(mini_aid) not in blob and "host" not in meta["training"]
    # no ground sample distance stated: the scale is unknown, and run will not guess one
    assert meta["scale"]["input_gsd_m"] is None and lm.scale_range is None and meta["gsd_m"] is None
    hist = _history(out)
    assert [int(r["epoch"]) for r in hist] == [1, 2]
    png = out.with_name("m.curves.png")
    from PIL import Image

    im = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert im.shape[0] > 200 and im.std() > 5  # a drawn chart, not a blank image
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    p = lm.model.predict(x, verbose=0)
    assert p.shape == (2, 5) and np.allclose(p.sum(1), 1, atol=1e-4)
    # refuses to clobber without --overwrite
    res = _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 6 and "exists" in res.output


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_sigkill_or_sigterm(mini_aid, tmp_path, sig):
    """Killed outright, or stopped by a scheduler's SIGTERM (exit 75, saying how to go on):
    --resume continues from the last finished epoch."""
    out = tmp_path / "r.keras"
    ckpt = tmp_path / "r.ckpt"
    cmd = [sys.executable, "-m", "tilescan.cli", "train", str(mini_aid), "-o", str(out), "--epochs", "4",
           "--image-size", "32", "--batch-size", "16", "--patience", "0"]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err.open("w"))
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            st = ckpt / "state.json"
            if st.exists() and json.loads(st.read_text())["epochs_done"] >= 2:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint after 240 s")
    finally:
        proc.send_signal(sig)
        proc.wait(timeout=120)
    if sig == signal.SIGTERM:
        said = err.read_text()
        assert proc.returncode == 75 and "tilescan: stopped by SIGTERM" in said, said
        assert f"the finished epochs are in {ckpt}: the same command with --resume goes on from there" in said
    done_before = json.loads((ckpt / "state.json").read_text())["epochs_done"]
    assert 2 <= done_before < 4 and not out.exists()
    with open(ckpt / "history.csv", "a") as fh:  # the row of an epoch killed while its checkpoint was saved
        fh.write(f"{done_before + 1},9,0,9,0,0.001,1\n")
    args = [mini_aid, "-o", out, "--epochs", "4", "--image-size", "32", "--batch-size", "16", "--patience", "0"]
    res = _train(args)  # the same command without --resume: the finished epochs are not thrown away
    assert res.exit_code == 6 and f"{ckpt} holds {done_before} finished epoch(s)" in res.output, res.output
    assert json.loads((ckpt / "state.json").read_text())["epochs_done"] == done_before
    res = _train([*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert f"after epoch {done_before}" in res.output
    hist = _history(out)
    # each epoch exactly once: the resumed run continued, it did not start over
    assert [int(r["epoch"]) for r in hist] == [1, 2, 3, 4]
    assert json.loads((ckpt / "state.json").read_text())["epochs_done"] == 4
    # the learning-rate schedule continued too (cosine to zero at the last epoch)
    lrs = [float(r["learning_rate"]) for r in hist]
    assert lrs[-1] < lrs[1]
    if sig == signal.SIGTERM:  # the run it would have been: the same losses and rates, epoch by epoch, to the digit
        ref = tmp_path / "ref.keras"
        assert _train([mini_aid, "-o", ref, *args[3:]]).exit_code == 0
        cols = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")
        assert [[r[c] for c in cols] for r in hist] == [[r[c] for c in cols] for r in _history(ref)]
    # the model kept, its checkpoint removed: --resume has nothing to go on from, and the model stays
    kept = out.read_bytes()
    shutil.rmtree(ckpt)
    res = _train([*args, "--resume"])
    assert res.exit_code == 6 and "there is no checkpoint" in res.output and out.read_bytes() == kept


_STOP_IN_GC = """
import gc, os, signal, sys
import tilescan.training.train as T
load, armed = T.train_val_paths, []
def cb(phase, info):  # as JAX's own gc callback runs: a signal's handler may run inside it
    if armed and phase == "start":
        armed.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))
gc.callbacks.append(cb)
def arm(*a, **k):
    armed.append(1)
    gc.collect()
    return load(*a, **k)
T.train_val_paths = arm
from tilescan.cli import entry
sys.argv = ["tilescan", *sys.argv[1:]]
entry()
"""


def test_a_sigterm_python_drops_in_a_gc_callback_still_stops_training(mini_aid, tmp_path):
    """A SIGTERM whose exception is raised inside a garbage-collector callback is only printed
    by Python: train went on to the end and exited 0 (a preempted node kills it instead); the
    stop is kept and raised again at the next batch: exit 75, nothing exported."""
    out = tmp_path / "g.keras"
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", _STOP_IN_GC, "train", str(mini_aid), "-o", str(out), "--epochs", "3",
                           "--image-size", "32", "--batch-size", "16"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "Exception ignored" in proc.stderr, proc.stderr[-2000:]  # Python dropped it, as on a real node
    assert proc.returncode == 75 and "tilescan: stopped by SIGTERM" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_a_second_train_into_the_same_model_is_turned_away(mini_aid, tmp_path):
    """While a train holds a model's lock (another process training into it), a train into the
    same -o is refused (exit 6) and touches nothing; once it is let go, it trains."""
    from tilescan.layout import FileLock

    out = tmp_path / "m.keras"
    held = FileLock(tmp_path / ".m.keras.lock")
    held.acquire()
    try:
        res = _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32", "--limit", "8"])
        assert res.exit_code == 6 and "is training into this model; wait for it" in res.output, res.output
        assert sorted(p.name for p in tmp_path.iterdir()) == [".m.keras.lock"]
    finally:
        held.release()
    res = _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32", "--limit", "8"])
    assert res.exit_code == 0 and out.exists() and not (tmp_path / ".m.keras.lock").exists(), res.output
    res = _train([mini_aid, "-o", tmp_path / "new" / "deeper" / "m.h5", "--epochs", "1"])  # refused: no folder left
    assert res.exit_code == 2 and not (tmp_path / "new").exists(), res.output


def test_a_stop_asked_of_runs_or_seen_by_an_earlier_command_does_not_stop_a_later_train(mini_aid, tmp_path):
    """tilescan.stop_runs() with no run at work (a service's shutdown hook), then a train: it
    trains (the request is the runs'); so does one after a command that was stopped."""
    import tilescan
    from tilescan import stop

    tilescan.stop_runs()
    try:
        got = tilescan.train(mini_aid, tmp_path / "a.keras", epochs=1, image_size=32, limit=8)
        assert got["epochs_done"] == 1 and (tmp_path / "a.keras").exists()
    finally:
        with stop.handling():  # the request forgotten, as the next run forgets it
            pass
    stop.note("SIGTERM")  # as a stopped command leaves it, were its end skipped
    res = _train([mini_aid, "-o", tmp_path / "b.keras", "--epochs", "1", "--image-size", "32", "--limit", "8"])
    assert res.exit_code == 0, res.output


def test_a_full_disk_at_an_epochs_checkpoint_is_an_output_error(mini_aid, tmp_path, monkeypatch):
    """No space left while the second epoch's checkpoint is saved: exit 6 saying so (it was an
    internal error, exit 1), the epoch's half-saved files removed, the first epoch's checkpoint
    whole: --resume goes on from it."""
    import errno

    from tilescan.training import resuming

    commit, calls = resuming.commit_epoch, []

    def full(ckpt, state, staged):
        calls.append(state["epochs_done"])
        if state["epochs_done"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return commit(ckpt, state, staged)

    monkeypatch.setattr(resuming, "commit_epoch", full)
    out = tmp_path / "m.keras"
    args = [mini_aid, "-o", out, "--epochs", "3", "--image-size", "32", "--batch-size", "16", "--patience", "0"]
    res = _train(args)
    assert res.exit_code == 6 and "No space left on device" in res.output, res.output
    ckpt = tmp_path / "m.ckpt"
    assert not list(ckpt.glob(".*tmp*")) and json.loads((ckpt / "state.json").read_text())["epochs_done"] == 1
    monkeypatch.undo()
    res = _train([*args, "--resume"])
    assert res.exit_code == 0 and "after epoch 1" in res.output and out.exists(), res.output


def test_a_stop_once_the_model_and_its_history_are_saved_lets_train_end_done(mini_aid, tmp_path, monkeypatch):
    """A SIGTERM after the model and its history are in place (a scheduler's, as the job ends)
    lets the command end done, exit 0 (it said 'stopped', exit 75, and a job chain requeued
    for nothing)."""
    from tilescan.training import train as T

    say = T._say_saved

    def stopped_then_said(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return say(*a, **k)

    monkeypatch.setattr(T, "_say_saved", stopped_then_said)
    out = tmp_path / "m.keras"
    res = _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32", "--limit", "8"])
    assert res.exit_code == 0 and "stopped" not in res.output and out.exists(), res.output
    assert (tmp_path / "m.history.csv").exists()


def test_early_stopping_restores_best(mini_aid, tmp_path):
    import keras

    from tilescan.training.data import load_dataset
    from tilescan.training.train import train

    ds = load_dataset(mini_aid)
    # min_delta larger than any change: every epoch after the first is a plateau
    cfg = TrainConfig(epochs=10, batch_size=16, image_size=32, patience=2, min_delta=1e30, warmup_epochs=0,
                      schedule="constant", learning_rate=1e-3, mixed_precision="float32", workers=1)
    out = tmp_path / "es.keras"
    said: list[str] = []
    r = train(ds, out, cfg, overwrite=True, verbose=0, log=said.append)
    assert r["stopped"] == "early-stopping"
    assert "early stopping: no better val_loss for 2 epochs (the best, epoch 1, is kept)" in said
    assert r["epochs_done"] == 3 and r["best_epoch"] == 1  # 1 best + patience 2
    hist = _history(out)
    assert len(hist) == 3
    # the saved model has the best (epoch 1) weights, not the last epoch's
    best = keras.saving.load_model(out.with_name("es.ckpt") / "last.keras", compile=False)
    best.load_weights(out.with_name("es.ckpt") / "best.weights.h5")
    last = keras.saving.load_model(out.with_name("es.ckpt") / "last.keras", compile=False)
    saved = load_model(out).model
    w_saved = saved.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(w_saved, best.get_weights()))
    assert not all(np.array_equal(a, b) for a, b in zip(w_saved, last.get_weights()))
    assert r["val_loss"] == pytest.approx(float(hist[0]["val_loss"]), rel=2e-2)


def test_train_bad_inputs(tmp_path):
    res = _train([tmp_path / "nope", "-o", tmp_path / "m.keras"])
    assert res.exit_code == 4 and "not found" in res.output
    res = _train([tmp_path, "-o", tmp_path / "m.h5"])
    assert res.exit_code in (2, 4)
    one = tmp_path / "one" / "Forest"  # one class folder: nothing to tell apart
    one.mkdir(parents=True)
    for k in range(4):
        cv2.imwrite(str(one / f"{k}.png"), np.full((32, 32, 3), 40 * k, np.uint8))
    res = _train([tmp_path / "one", "-o", tmp_path / "m.keras"])
    assert res.exit_code == 4 and "needs two classes or more; this dataset has 1 (Forest)" in res.output, res.output
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / "m.ckpt").exists()


@pytest.mark.parametrize("val, said", [
    ("append", "splits/val.txt: the val split's image 'Port/port_9999.jpg' is not found"),  # a listed image not there
    ("empty", ": the dataset's val split is empty (training stops early and keeps its best epoch by the val chips"),
])
def test_a_val_split_train_cannot_use_stops_before_training_and_says_why(mini_aid, tmp_path, val, said):
    root = tmp_path / "ds"
    root.mkdir()
    for name in ("images", "classes.txt"):
        (root / name).symlink_to(mini_aid / name)
    shutil.copytree(mini_aid / "splits", root / "splits")
    lists = root / "splits" / "val.txt"
    lists.write_text(lists.read_text() + "Port/port_9999.jpg\n" if val == "append" else "")
    res = _train([root, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4 and said in res.output, res.output
    assert not (tmp_path / "m.keras").exists() and not (tmp_path / "m.ckpt").exists()


def test_aid_images_in_a_folder_of_another_name_carry_aids_terms(mini_aid, tmp_path):
    """AID's citation and terms go with its images whatever the folder's name (a subset, a copy,
    one image among one's own); images of AID's class names but not AID's files carry none."""
    from tilescan.training.data import load_dataset

    assert mini_aid.name != "aid"
    info = load_dataset(mini_aid).provenance()
    assert "Xia" in info["citation"] and "research" in info["terms"]
    own = tmp_path / "own"
    for cls in ("Forest", "Farmland"):
        (own / cls).mkdir(parents=True)
        for i in range(3):
            shutil.copy(next((mini_aid / "images").rglob("*.jpg")), own / cls / f"site{i}.jpg")
    info = load_dataset(own).provenance()
    assert "citation" not in info and "terms" not in info
    shutil.copy(next((mini_aid / "images" / "Forest").glob("*.jpg")), own / "Forest" / "forest_7.PNG")  # one of AID's
    assert "research" in load_dataset(own).provenance()["terms"]


def test_packaged_model_metadata():
    meta = read_metadata(Path(__file__).resolve().parents[1] / "tilescan" / "models" / "default.keras")
    assert len(meta["classes"]) == 30 and meta["input_size"] == [128, 128]
    assert "Xia" in meta["training"]["citation"] and "research" in meta["training"]["terms"]


def test_stated_gsd_becomes_the_model_scale(mini_aid, tmp_path):
    out = tmp_path / "g.keras"
    cfg = tmp_path / "g.toml"
    cfg.write_text("[train]\ngsd_m = [2.0, 32.0]\n")  # AID: 0.5-8 m at 600 px, stored at 150 px
    res = _train([mini_aid, "-o", out, "--config", cfg, "--epochs", "1", "--image-size", "32", "--batch-size", "16",
                  "--patience", "0", "--limit", "30"])
    assert res.exit_code == 0, res.output
    assert "train 40, val 20 " in res.output and "--limit 30: 30 and 20 of them used" in res.output  # as trained
    from tilescan.model import describe_model

    card = describe_model(out)
    training = card.meta["training"]  # the metadata says so too: the splits' sizes, and the images trained on
    assert training["counts"]["train"] == 40 and training["images_used"] == {"train": 30, "val": 20}
    side = 150  # the mini AID images keep AID's stored size
    assert card.scale_range == pytest.approx((2.0 * side / 32, 32.0 * side / 32))
    assert card.meta["scale"]["tile_footprint_m"] == pytest.approx([2.0 * side, 32.0 * side])
    # and what resample_to_gsd reads scenes at: the range's geometric middle, inside it
    assert card.meta["gsd_m"] == pytest.approx((2.0 * side / 32 * 32.0 * side / 32) ** 0.5)


def test_training_from_python_leaves_the_callers_random_draws_alone(mini_aid, tmp_path):
    """Training seeds Python's and numpy's global generators, and importing TensorFlow draws from
    them; a notebook's next draws are the ones it would have made without the training between."""
    import random

    import numpy as np

    import tilescan

    random.seed(5)
    np.random.seed(5)
    want = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    tilescan.train(mini_aid, tmp_path / "r.keras", epochs=1, image_size=32, batch_size=16, patience=0, limit=8)
    assert (random.random(), np.random.rand()) == want


def test_limit_takes_every_class_whatever_the_list_order():
    """``--limit``: a chips dataset lists its chips scene by scene, so one class may fill the
    first hundreds; the subset still holds every class, in the list's order."""
    from tilescan.training.data import spread as _spread

    items = [(f"a{i}.png", 0) for i in range(90)] + [(f"b{i}.png", 1) for i in range(8)] + [("c0.png", 2)]
    got = _spread(items, 6)
    assert len(got) == 6 and {c for _, c in got} == {0, 1, 2}
    assert got == sorted(got, key=items.index)
    assert _spread(items, 1000) == items  # a limit above the list: all of it


def test_evaluate_limit_scores_the_images_train_limit_scored(mini_aid, tmp_path):
    """``evaluate --split val --limit N`` takes the N validation images ``train --limit N``
    scored (it drew N at random, missing classes), so the model's recorded score reproduces."""
    import tilescan

    got = tilescan.train(mini_aid, tmp_path / "m.keras", epochs=1, image_size=32, batch_size=16, patience=0, limit=7)
    report = tilescan.evaluate(tmp_path / "m.keras", mini_aid, tmp_path / "eval", split="val", limit=7)
    with open(tmp_path / "eval" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    from tilescan.training.data import load_dataset, spread

    took = [p for p, _ in spread(load_dataset(mini_aid).items("val"), 7)]  # what train --limit 7 scored
    assert report["n"] == 7 and [r["path"] for r in rows] == took and {r["true"] for r in rows} == set(CLASSES)
    assert report["accuracy"] == pytest.approx(got["val_accuracy"], abs=1e-6)


def test_a_failed_training_leaves_keras_precision_as_it_was(tmp_path, mini_aid):
    """The process's Keras precision policy is the caller's again after train, also when the
    run fails once it has set its own (bf16 on CPUs that have it): later models in the same
    process (a notebook) are built in float32, not silently in bfloat16."""
    import keras

    from tilescan.config import load_config
    from tilescan.errors import OutputError
    from tilescan.training.data import load_dataset
    from tilescan.training.train import train

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    cfg = load_config(None, {"train": {"mixed_precision": "bf16", "epochs": 1, "image_size": 32}}).train
    before = keras.mixed_precision.global_policy().name
    with pytest.raises(OutputError, match="cannot create the output folder"):
        train(load_dataset(mini_aid), a_file / "m.keras", cfg, limit=2, verbose=0)
    assert keras.mixed_precision.global_policy().name == before == "float32"


def test_evaluate_splits_as_training_did_and_says_when_the_split_changed(mini_aid, tmp_path, monkeypatch):
    """Plain class folders split with a seed of the user's ([train] seed 7): evaluate draws the
    same split (its test images are none of the model's training images), and once an image is
    added (the class's split moves) it warns, in its output and report, that the test split may
    hold training images."""
    import csv as _csv

    from tilescan.training.data import load_dataset

    plain = tmp_path / "plain"
    shutil.copytree(mini_aid / "images", plain)
    monkeypatch.setenv("TILESCAN_TRAIN__SEED", "7")
    out = tmp_path / "s7.keras"
    res = _train([plain, "-o", out, "--epochs", "1", "--image-size", "32", "--batch-size", "16"])
    assert res.exit_code == 0 and "stratified(seed=7)" in res.output, res.output
    monkeypatch.delenv("TILESCAN_TRAIN__SEED")
    trained = {p for p, _ in load_dataset(plain, seed=7).splits["train"]}
    res = invoke(["evaluate", out, plain, "-o", tmp_path / "ev", "--explain-samples", "0"])
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        tested = [r["path"] for r in _csv.DictReader(fh)]
    assert tested and not set(tested) & trained
    res = invoke(["evaluate", out, plain, "--split", "all", "-o", tmp_path / "ev-all", "--explain-samples", "0"])
    assert res.exit_code == 0 and "holds the model's own train and val images" in res.output, res.output
    assert json.loads((tmp_path / "ev-all" / "report.json").read_text())["n"] == sum(1 for _ in plain.rglob("*.jpg"))
    (tmp_path / "linked").symlink_to(plain)  # the same folder by another name: the same images
    res = invoke(["evaluate", out, tmp_path / "linked", "--split", "all", "-o", tmp_path / "ev-link", "--explain-samples", "0"])
    assert res.exit_code == 0 and "holds the model's own train and val images" in res.output, res.output
    first = sorted((plain / CLASSES[0]).iterdir())[0]
    shutil.copy(first, first.with_name("added.jpg"))  # one more image: that class's split is drawn anew
    res = invoke(["evaluate", out, plain, "-o", tmp_path / "ev2", "--explain-samples", "0"])
    assert res.exit_code == 0 and "may hold images the model was trained on" in res.output, res.output
    assert "may hold images" in json.loads((tmp_path / "ev2" / "report.json").read_text())["split_warning"]


def test_a_set_only_for_scoring_is_not_taken_for_the_changed_training_set(mini_aid, tmp_path):
    """Chips datasets keep their images in images/, as AID does: a model trained on one and
    scored on another region's set (chips --split test: empty train and val lists) gets no
    warning that the test split may hold its training images; its own set with a train list
    changed still does."""
    out = tmp_path / "m.keras"
    assert _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32", "--batch-size", "16"]).exit_code == 0
    region = tmp_path / "region_b"
    shutil.copytree(mini_aid / "images", region / "images")
    (region / "splits").mkdir()
    (region / "classes.txt").write_text((mini_aid / "classes.txt").read_text())
    test = (mini_aid / "splits" / "train.txt").read_text()  # images there, in another region's set
    for split, text in {"train": "", "val": "", "test": test}.items():
        (region / "splits" / f"{split}.txt").write_text(text)
    res = invoke(["evaluate", out, region, "-o", tmp_path / "ev", "--explain-samples", "0"])
    assert res.exit_code == 0 and "may hold images" not in res.output, res.output
    assert "split_warning" not in json.loads((tmp_path / "ev" / "report.json").read_text())
    same = tmp_path / "same"
    shutil.copytree(mini_aid, same / mini_aid.name)
    lines = (same / mini_aid.name / "splits" / "train.txt").read_text().split()
    (same / mini_aid.name / "splits" / "train.txt").write_text("\n".join(lines[1:]) + "\n")  # one image less
    res = invoke(["evaluate", out, same / mini_aid.name, "-o", tmp_path / "ev2", "--explain-samples", "0",
                  "--split", "val"])
    assert res.exit_code == 0 and "may hold images the model was trained on" in res.output, res.output


def test_what_a_class_folder_holds_besides_its_images(tmp_path, caplog):
    """Plain class folders as users' machines leave them: a Jupyter checkpoint folder, a zip's
    __MACOSX folder and macOS's ._ files are not classes or images; a class folder with no
    images yet is no class; images in a class folder's subfolders are that class's; a 16-bit
    image is refused by name instead of being read as a near-black 8-bit one."""
    from tilescan.errors import InputError
    from tilescan.training.data import decode_rgb, load_dataset

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls in ("Forest", "Pond"):
        for j in range(6):
            sub = root / cls / ("batch 2" if j >= 4 else "")
            sub.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(sub / f"{cls}{j}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    (root / "Meadow").mkdir()  # a class to come
    (root / ".ipynb_checkpoints").mkdir()
    cv2.imwrite(str(root / ".ipynb_checkpoints" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    (root / "__MACOSX" / "Pond").mkdir(parents=True)
    (root / "__MACOSX" / "Pond" / "._Pond0.png").write_bytes(b"\0\5\26\7Mac OS X")
    (root / "Pond" / "._Pond0.png").write_bytes(b"\0\5\26\7Mac OS X")
    ds = load_dataset(root)
    assert ds.classes == ["Forest", "Pond"]
    items = sorted(p for split in ds.splits.values() for p, _ in split)
    assert len(items) == 12 and "Pond/batch 2/Pond5.png" in items
    (root / "Pond" / "annexed.jpg").symlink_to("../.git/annex/objects/not-fetched.jpg")  # content not fetched
    with caplog.at_level(logging.WARNING, logger="tilescan"):
        assert load_dataset(root).classes == ["Forest", "Pond"]
    said = [r.getMessage() for r in caplog.records if "links to nothing" in r.getMessage()]
    assert len(said) == 1 and "1 image file(s)" in said[0] and "Pond/annexed.jpg" in said[0], said
    deep = root / "Forest" / "deep.tif"
    cv2.imwrite(str(deep), (rng.integers(0, 4096, (40, 40, 3))).astype(np.uint16))  # 12-bit data
    with pytest.raises(InputError, match="a uint16 image: images to train or evaluate on are 8-bit RGB"):
        decode_rgb(deep)


def test_a_stop_signal_waits_for_the_checkpoint_to_be_whole():
    """A SIGTERM while an epoch's checkpoint is written takes effect once it is written, as the
    handler the command line sets (raise, to unwind) would have taken it."""
    from tilescan import stop

    class Stopped(Exception):
        pass

    def stop_now(signum, frame):
        raise Stopped

    before = signal.signal(signal.SIGTERM, stop_now)
    written = []
    try:
        with pytest.raises(Stopped):
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                written.append("state.json")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert written == ["state.json"]


def test_an_epochs_checkpoint_is_whole_or_not_at_all(tmp_path):
    """An epoch's files are staged, state.json naming them commits them: killed after the
    commit, a resume moves them into place; killed before it, what that epoch staged (its best
    weights among them) is dropped, and the best weights stay those of the epoch the state names."""
    from tilescan.training import resuming

    ckpt = tmp_path / "m.ckpt"
    ckpt.mkdir()
    (ckpt / "best.weights.h5").write_text("epoch 1")
    (ckpt / "last.keras").write_text("epoch 1")
    for name in (".best.e2.tmp.weights.h5", ".last.e2.tmp.keras"):
        (ckpt / name).write_text("epoch 2")
    staged = {".best.e2.tmp.weights.h5": "best.weights.h5", ".last.e2.tmp.keras": "last.keras"}
    state = {"epochs_done": 2, "best_epoch": 2}
    (ckpt / "state.json").write_text(json.dumps({**state, "staged": staged}))  # committed, then killed
    for name in (".best.e3.tmp.weights.h5", ".last.e3.tmp.keras"):  # epoch 3 killed before its commit
        (ckpt / name).write_text("epoch 3")
    resuming.roll_forward(ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.weights.h5", "last.keras", "state.json"]
    assert (ckpt / "best.weights.h5").read_text() == (ckpt / "last.keras").read_text() == "epoch 2"
    (ckpt / ".last.e3.tmp.keras").write_text("epoch 3")
    resuming.commit_epoch(ckpt, {**state, "epochs_done": 3}, {".last.e3.tmp.keras": "last.keras"})
    assert (ckpt / "last.keras").read_text() == "epoch 3" and (ckpt / "best.weights.h5").read_text() == "epoch 2"
    assert json.loads((ckpt / "state.json").read_text())["epochs_done"] == 3


def test_a_model_half_saved_by_a_killed_run_is_removed_by_the_next(mini_aid, tmp_path):
    """The temporary model file a run killed while saving left beside -o is removed when the
    next run starts; one a live process writes, or one written minutes ago, stays."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "m.keras"
    left = tmp_path / f".m.keras.tmp-{int(dead.stdout)}-0123abcd.keras"
    live = tmp_path / f".m.keras.tmp-{os.getpid()}-4567cdef.keras"
    for f in (left, live, fresh := tmp_path / f".m.keras.tmp-{int(dead.stdout)}-89abcdef.keras"):
        f.write_bytes(b"half a model")
    for f in (left, live):  # an hour old: a save takes seconds (a fresh one may be another machine's, at work)
        os.utime(f, (time.time() - 3600,) * 2)
    res = _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32", "--limit", "5"])
    assert res.exit_code == 0, res.output
    assert not left.exists() and live.exists() and fresh.exists() and out.is_file()


def test_resume_with_more_epochs_stretches_the_schedule_over_them(mini_aid, tmp_path):
    """A finished 2-epoch run resumed with nothing left to train keeps its model file as it
    is. Resumed with --epochs 4: epochs 3 and 4 train on a cosine
    schedule over 4 epochs (a learning rate above 0 at the end of epoch 3, 0 at the end of the
    last), not on the 2-epoch one, which had reached 0."""
    out = tmp_path / "m.keras"
    args = [mini_aid, "-o", out, "--image-size", "32", "--batch-size", "16", "--patience", "0"]
    assert _train([*args, "--epochs", "2"]).exit_code == 0
    assert float(_history(out)[-1]["learning_rate"]) == 0.0
    # nothing left to train (a requeued job resuming once more): the saved model is left as it is,
    # not saved again under a new id and sha256 that would make its finished scenes another model's
    saved, history_csv = out.read_bytes(), (tmp_path / "m.history.csv").read_text()
    for end in (".history.csv", ".curves.png"):  # as a stop right after the model's save leaves it
        (tmp_path / f"m{end}").unlink()
    res = _train([*args, "--epochs", "2", "--resume"])
    assert res.exit_code == 0 and "nothing to train" in res.output and "left as it is" in res.output, res.output
    assert out.read_bytes() == saved
    assert (tmp_path / "m.history.csv").read_text() == history_csv and (tmp_path / "m.curves.png").stat().st_size
    res = _train([*args, "--epochs", "4", "--resume"])
    assert res.exit_code == 0, res.output
    lrs = [float(r["learning_rate"]) for r in _history(out)]
    assert len(lrs) == 4 and lrs[2] > 0 and lrs[3] == 0.0, lrs


def test_resume_trains_on_the_checkpointed_runs_split_or_refuses(mini_aid, tmp_path, monkeypatch):
    """Plain class folders split with seed 7, resumed without the seed: the split is the
    checkpoint's (not one drawn with the seed given now, whose train images would hold the
    model's test images), and evaluate finds its test split untouched by training. Resumed
    after an image was added, it is refused: the epochs to come would train on other images."""
    import csv as _csv

    from tilescan.training.data import load_dataset

    plain = tmp_path / "plain"
    shutil.copytree(mini_aid / "images", plain)
    out = tmp_path / "m.keras"
    args = [plain, "-o", out, "--image-size", "32", "--batch-size", "16", "--patience", "0"]
    monkeypatch.setenv("TILESCAN_TRAIN__SEED", "7")
    assert _train([*args, "--epochs", "1"]).exit_code == 0
    monkeypatch.delenv("TILESCAN_TRAIN__SEED")
    res = _train([*args, "--epochs", "2", "--resume"])
    assert res.exit_code == 0 and "resuming with the checkpoint's settings: seed 7 (given 20261126)" in res.output, \
        res.output
    assert "stratified(seed=7)" in res.output
    res = invoke(["evaluate", out, plain, "-o", tmp_path / "ev", "--explain-samples", "0"])
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    with open(tmp_path / "ev" / "predictions.csv") as fh:
        tested = {r["path"] for r in _csv.DictReader(fh)}
    assert tested and not tested & {p for p, _ in load_dataset(plain, seed=7).splits["train"]}
    first = sorted((plain / CLASSES[0]).iterdir())[0]
    shutil.copy(first, first.with_name("added.jpg"))
    res = _train([*args, "--epochs", "3", "--resume"])
    assert res.exit_code == 2 and re.search(r"m\.ckpt: this checkpoint is of a run on other (train|val|train and val) "
                                            r"images \(images added", res.output), res.output
    # an earlier tilescan's checkpoint recorded no run: nothing to check it by, so refused
    state_file = tmp_path / "m.ckpt" / "state.json"
    state = json.loads(state_file.read_text())
    del state["run"]
    state_file.write_text(json.dumps(state))
    res = _train([*args, "--epochs", "3", "--resume"])
    assert res.exit_code == 2 and "was written by an earlier tilescan, which recorded neither the classes, split nor " \
        "settings of its run" in res.output and "train with --overwrite instead of --resume" in res.output, res.output


def test_a_class_without_a_training_image_is_refused(mini_aid, tmp_path):
    data = tmp_path / "tt"
    for split, names in (("Train", CLASSES[:-1]), ("Test", CLASSES)):
        for c in names:
            shutil.copytree(mini_aid / "images" / c, data / split / c)
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4 and f"no training image of 1 class(es) ({CLASSES[-1]})" in res.output, res.output


def test_a_limit_below_the_class_count_says_which_classes_go_without(mini_aid, tmp_path):
    res = _train([mini_aid, "-o", tmp_path / "l.keras", "--epochs", "1", "--image-size", "32", "--limit", "3"])
    assert res.exit_code == 0, res.output
    assert "warning: --limit 3 is below the 5 classes: 2 of them get no image" in res.output


def test_split_lists_that_share_images_are_refused(mini_aid, tmp_path):
    data = tmp_path / "shared"
    data.mkdir()
    for name in ("images", "classes.txt"):
        (data / name).symlink_to(mini_aid / name)
    shutil.copytree(mini_aid / "splits", data / "splits")
    first = (mini_aid / "splits" / "train.txt").read_text().split()[0]
    with open(data / "splits" / "test.txt", "a") as fh:
        fh.write(first + "\n")
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4 and f"train.txt and test.txt share images ('{first}')" in res.output, res.output


def test_a_class_without_val_images_is_named(tmp_path):
    """Plain folders with a class of one image: the stratified split gives it no val image,
    and train says so before it trains."""
    rng = np.random.default_rng(1)
    for cls, n in (("Forest", 12), ("Pond", 12), ("Meadow", 1)):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for j in range(n):
            cv2.imwrite(str(tmp_path / "d" / cls / f"{j}.png"), rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    res = _train([tmp_path / "d", "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 0, res.output
    assert "warning: no val image of 1 class(es) (Meadow)" in res.output


def test_an_image_that_is_none_is_named_before_any_epoch(mini_aid, tmp_path):
    """A zero-byte val image: refused by name before training starts (it ended a whole epoch
    later, at validation)."""
    data = tmp_path / "z"
    shutil.copytree(mini_aid, data)
    bad = (data / "splits" / "val.txt").read_text().split()[2]
    (data / "images" / bad).write_bytes(b"")
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4, res.output
    assert f"the val split's image '{bad}' cannot be read as an image (empty, not an image, or corrupt)" in res.output
    assert "epoch 1/" not in res.output and not (tmp_path / "m.ckpt").exists()


@pytest.mark.parametrize("split, how, said", [
    ("train", "jpeg cut in half", "is cut short (its JPEG end marker is missing"),
    ("val", "16-bit png", "is not 8-bit (PNG, 16-bit RGB): images to train or evaluate on are 8-bit RGB"),
    ("train", "6-band tiff", "is a TIFF of 6 uint16 band(s): images to train or evaluate on are 8-bit RGB"),
])
def test_an_image_train_would_fail_on_or_learn_wrongly_is_named_before_any_epoch(mini_aid, tmp_path, split, how, said):
    """Images that decode only partly (a copy cut short: the rest read as grey, with no file
    named) or not as 8-bit RGB (they failed inside an epoch, or after a whole one for val):
    refused by name, with the others of their kind counted, before training starts."""
    import rasterio

    data = tmp_path / "d"
    shutil.copytree(mini_aid, data)
    bad = (data / "splits" / f"{split}.txt").read_text().split()[1]
    img = data / "images" / bad
    if how == "jpeg cut in half":
        whole = img.read_bytes()
        img.write_bytes(whole[:len(whole) // 2])
    elif how == "16-bit png":
        img.unlink()
        img = img.with_name(img.name + ".png")  # listed by its new name below
        cv2.imwrite(str(img), np.full((64, 64, 3), 3000, np.uint16))
    else:
        img.unlink()
        img = img.with_name(img.name + ".tif")
        with rasterio.open(img, "w", driver="GTiff", width=64, height=64, count=6, dtype="uint16") as ds:
            ds.write(np.ones((6, 64, 64), np.uint16))
    listed = data / "splits" / f"{split}.txt"
    listed.write_text(listed.read_text().replace(bad, str(img.relative_to(data / "images"))))
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4, res.output
    assert f"the {split} split's image '{img.relative_to(data / 'images')}' {said}" in res.output, res.output
    assert "epoch 1/" not in res.output and not (tmp_path / "m.ckpt").exists()


def test_every_bad_image_of_a_drawn_split_is_named_at_once_test_split_too(tmp_path):
    """Plain class folders (the split drawn by tilescan) with an empty image that lands in train
    and a text file named .png that lands in test: train names both in one message, before
    any epoch. (It stopped at the first kind, and never looked at the test split, whose bad
    image could then only be removed, drawing the split again with trained-on images in test.)"""
    from tilescan.training.data import load_dataset

    data = _class_folders(tmp_path / "d", ("Forest", "Pond"), 10, seed=3)
    ds = load_dataset(data)
    train_img, test_img = ds.items("train")[0][0], ds.items("test")[0][0]
    (data / train_img).write_bytes(b"")
    (data / test_img).write_text("not an image")
    assert load_dataset(data).items("test")[0][0] == test_img  # the same draw
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4, res.output
    bad = "cannot be read as an image (empty, not an image, or corrupt)"
    assert f"the train split's image '{train_img}' {bad}" in res.output, res.output
    assert f"the test split's image '{test_img}' {bad}" in res.output, res.output
    assert "epoch 1/" not in res.output and not (tmp_path / "m.ckpt").exists()


def test_an_image_twin_in_another_class_or_split_is_named(mini_aid, tmp_path):
    """The same bytes under two classes (a label conflict) or in train and test (a test image
    trained on, as AID's own Industrial 203 and 205): a warning names the pair before training;
    a twin within one class and split is left alone."""
    from tilescan.training.data import load_dataset, twins

    data = tmp_path / "d"
    shutil.copytree(mini_aid, data)
    train = (data / "splits" / "train.txt").read_text().split()
    test = (data / "splits" / "test.txt").read_text().split()
    a, b = train[0], next(p for p in train if p.split("/")[0] != train[0].split("/")[0])
    shutil.copyfile(data / "images" / a, data / "images" / b)  # b's class now holds a's image
    shutil.copyfile(data / "images" / train[1], data / "images" / test[0])  # a test image that is a train one
    found = twins(load_dataset(data))
    assert sorted(map(sorted, found)) == sorted([sorted([("train", a), ("train", b)]),
                                                 sorted([("train", train[1]), ("test", test[0])])]), found
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32", "--limit", "10"])
    assert res.exit_code == 0, res.output
    assert "warning: 2 image(s) have a twin with the same bytes in another class or split" in res.output
    assert f"'{test[0]}' (test)" in res.output and f"'{b}' (train)" in res.output, res.output


def test_class_names_in_either_unicode_form_are_one_class(tmp_path):
    """'Forêt' written decomposed (as macOS names folders) and composed: one class, so a model
    trained on one copy of the data is evaluated on the other (it was refused, the names looking
    the same)."""
    import unicodedata

    from tilescan.training.data import load_dataset

    rng = np.random.default_rng(2)
    for form, root in (("NFD", tmp_path / "nfd"), ("NFC", tmp_path / "nfc")):
        for name in ("Forêt", "Étang"):
            d = root / unicodedata.normalize(form, name)
            d.mkdir(parents=True)
            for j in range(10):
                cv2.imwrite(str(d / f"{j}.png"), rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    assert load_dataset(tmp_path / "nfd").classes == load_dataset(tmp_path / "nfc").classes == ["Forêt", "Étang"]
    out = tmp_path / "m.keras"
    assert _train([tmp_path / "nfd", "-o", out, "--epochs", "1", "--image-size", "32"]).exit_code == 0
    res = invoke(["evaluate", out, tmp_path / "nfc", "-o", tmp_path / "ev", "--explain-samples", "0"])
    assert res.exit_code == 0, res.output


def test_resume_with_overwrite_and_heatmaps_of_a_tiny_input_are_said(mini_aid, tmp_path):
    """--resume and --overwrite ask for opposite things: refused, before anything is touched.
    At 32 px the explained layer is one cell, so the model's heatmaps are flat: said."""
    out = tmp_path / "m.keras"
    res = _train([mini_aid, "-o", out, "--epochs", "1", "--resume", "--overwrite"])
    assert res.exit_code == 2 and "--resume goes on from the checkpoint and --overwrite starts afresh" in res.output
    assert not out.exists() and not (tmp_path / "m.ckpt").exists()
    res = _train([mini_aid, "-o", out, "--epochs", "1", "--image-size", "32", "--limit", "5"])
    assert res.exit_code == 0 and "warning: at 32 px the Grad-CAM layer is 1 x 1 cells" in res.output, res.output


def test_class_names_a_model_cannot_carry_are_refused_before_training(tmp_path):
    """A class folder whose name holds a control character (a TAB) names no class of a model
    (its label styles and tables): refused before any epoch, not when the trained model is saved."""
    data = _class_folders(tmp_path / "d", ("Forest", "Pond\tedge"), 6, seed=5)
    res = _train([data, "-o", tmp_path / "m.keras", "--epochs", "1", "--image-size", "32"])
    assert res.exit_code == 4 and "must be names, not empty or with control characters: 'Pond\\tedge'" in res.output, res.output
    assert "epoch 1/" not in res.output and not (tmp_path / "m.ckpt").exists()
