"""Tests of tilescan.training.evaluate: metrics recomputed independently from predictions.csv, the
files and figures, recording scores into the model file, TTA invariance, errors."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
cv2 = pytest.importorskip("cv2")
Image = pytest.importorskip("PIL.Image")

from tilescan.training import evaluate as E
from tilescan.errors import ConfigError, InputError, OutputExistsError
from tilescan.model import META_MEMBER, load_model, read_metadata
from conftest import tiny_model_file

CLASSES = ["Beach", "Forest", "Parking"]  # AID names: the real-AID test reuses the model
SIZE = 32


def _write_dataset(root: Path, per_class_test: int = 10) -> Path:
    """AID layout: images/<Class>/*.png colour-coded by class, classes.txt, splits/."""
    rng = np.random.default_rng(0)
    lists = {"train": [], "val": [], "test": []}
    for ci, cls in enumerate(CLASSES):
        d = root / "images" / cls
        d.mkdir(parents=True)
        for j in range(per_class_test + 2):
            img = rng.integers(0, 120, (40, 40, 3)).astype(np.uint8)
            chan = (2, 1, 0)[ci]  # colour-coded: Beach blue, Forest green, Parking red
            img[..., chan] = np.clip(img[..., chan] + rng.integers(60, 136), 0, 255)
            img[rng.integers(0, 30) :, rng.integers(0, 30) :, :] //= 2  # some structure
            name = f"{cls.lower()}_{j}.png"
            cv2.imwrite(str(d / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            split = "train" if j == 0 else "val" if j == 1 else "test"
            lists[split].append(f"{cls}/{name}")
    (root / "splits").mkdir()
    for s, v in lists.items():
        (root / "splits" / f"{s}.txt").write_text("\n".join(v) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    def head_reads_colours(m):
        # a head that reads the colours a little, so predictions are neither all right nor all one class
        w, b = m.get_layer("logits").get_weights()
        m.get_layer("logits").set_weights([w * 3.0, np.array([0.3, 0.0, -0.3], np.float32)])

    return tiny_model_file(tmp_path_factory.mktemp("model") / "tiny.keras", CLASSES, SIZE, seed=11,
                           model_id="tiny-test-model", adjust=head_reads_colours)


X_CHECK = np.random.default_rng(4).random((5, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def evaluated(model_file, dataset, tmp_path_factory):
    """One evaluation with record=True on a copy of the model (whose predictions on
    X_CHECK and zip members are noted first), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("eval")
    path = tmp / "rec.keras"
    shutil.copy(model_file, path)
    before = load_model(path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist() if n != META_MEMBER}
    noted = {"path": path, "sha256": before.sha256, "probs": before.model.predict_on_batch(X_CHECK), "members": members}
    logs = []
    out = tmp / "out"
    report = E.run_evaluate(str(path), str(dataset), "test", str(out), batch_size=8, explain_samples=4, record=True, log=logs.append)
    return report, out, logs, noted


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_metrics_match_an_independent_count(evaluated):
    report, out, _, _ = evaluated
    rows = _read_csv(out / "predictions.csv")
    assert rows[0] == ["path", "true", "pred", "confidence"]
    preds = rows[1:]
    n = len(preds)
    assert n == report["n"] == 30
    pairs = [(r[1], r[2]) for r in preds]
    correct = sum(t == p for t, p in pairs)
    assert report["accuracy"] == pytest.approx(correct / n)
    tp = Counter(t for t, p in pairs if t == p)
    sup = Counter(t for t, _ in pairs)
    pred = Counter(p for _, p in pairs)
    f1s, precs, recs = {}, {}, {}
    for c in CLASSES:
        precs[c] = tp[c] / pred[c] if pred[c] else None  # never predicted: undefined
        recs[c] = tp[c] / sup[c] if sup[c] else None  # no support: undefined
        pr, rc = precs[c] or 0.0, recs[c] or 0.0
        f1s[c] = (2 * pr * rc / (pr + rc) if pr + rc else 0.0) if sup[c] or pred[c] else None
    present = [c for c in CLASSES if sup[c] or pred[c]]
    per = {r["class"]: r for r in report["metrics"]["per_class"]}
    for c in CLASSES:
        for got, want in ((per[c]["precision"], precs[c]), (per[c]["recall"], recs[c]), (per[c]["f1"], f1s[c])):
            assert got is None if want is None else got == pytest.approx(want)
        assert per[c]["support"] == sup[c]
    assert report["macro_f1"] == pytest.approx(sum(f1s[c] for c in present) / len(present))
    assert report["weighted_f1"] == pytest.approx(sum(f1s[c] * sup[c] for c in present) / n)
    assert report["metrics"]["macro"]["precision"] == pytest.approx(sum(precs[c] or 0.0 for c in present) / len(present))
    # confusion matrix CSV: header of class names, rows = true, columns = predicted, sums to n
    cm = _read_csv(out / "confusion_matrix.csv")
    assert cm[0][1:] == CLASSES
    counts = {(r[0], CLASSES[j]): int(v) for r in cm[1:] for j, v in enumerate(r[1:])}
    assert sum(counts.values()) == n
    assert counts == {(t, p): sum(1 for q in pairs if q == (t, p)) for t in CLASSES for p in CLASSES}
    # per_class.csv agrees with the report
    pc = _read_csv(out / "per_class.csv")
    assert pc[0] == ["class", "precision", "recall", "f1", "support", "predicted"]
    assert [r[0] for r in pc[1:]] == CLASSES
    assert [int(r[4]) for r in pc[1:]] == [sup[c] for c in CLASSES]
    assert [r[1:4] for r in pc[1:]] == [["" if v is None else f"{v:.6f}" for v in (precs[c], recs[c], f1s[c])]
                                        for c in CLASSES]
    # confidences are probabilities
    conf = np.array([float(r[3]) for r in preds])
    assert ((conf >= 1 / 3 - 1e-6) & (conf <= 1)).all()


def test_report_contents(evaluated):
    report, out, logs, noted = evaluated
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["accuracy"] == report["accuracy"]
    assert on_disk["model"]["id"] == "tiny-test-model"
    assert on_disk["model"]["sha256"] == noted["sha256"]  # the file that was evaluated
    assert on_disk["split"] == "test" and on_disk["tta"] is False and on_disk["n"] == 30
    assert on_disk["dataset"]["split_sha256"]["test"]
    assert on_disk["images_per_s"] > 0 and on_disk["timing"]["predict_s"] > 0
    assert on_disk["recorded"]["key"] == "test"
    assert any("accuracy" in line and "macro F1" in line for line in logs)
    assert any("weakest classes" in line for line in logs)
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("name,min_size", [("confusion_matrix.png", 300), ("explanations.png", 300)])
def test_figures_are_real_images(evaluated, name, min_size):
    _, out, _, _ = evaluated
    with Image.open(out / name) as im:
        im.load()
        w, h = im.size
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert w >= min_size and h >= min_size
    assert px.std() > 20  # not a blank canvas


def test_record_writes_scores_and_keeps_the_model(evaluated):
    report, _, _, noted = evaluated
    path = noted["path"]
    meta = read_metadata(path)
    entry = meta["scores"]["test"]
    assert entry["accuracy"] == pytest.approx(report["accuracy"])
    assert entry["macro_f1"] == pytest.approx(report["macro_f1"])
    assert entry["weighted_f1"] == pytest.approx(report["weighted_f1"])
    assert entry["n"] == 30 and entry["tta"] is False and entry["date"]
    assert entry["split_sha256"] == report["dataset"]["split_sha256"]["test"]
    assert meta["classes"] == CLASSES and meta["id"] == "tiny-test-model"  # the rest is kept
    with zipfile.ZipFile(path) as z:
        assert {n: z.read(n) for n in z.namelist() if n != META_MEMBER} == noted["members"]
    after = load_model(path)
    assert after.sha256 == report["recorded"]["model_sha256_after"] != noted["sha256"]
    np.testing.assert_array_equal(after.model.predict_on_batch(X_CHECK), noted["probs"])
    assert not list(path.parent.glob(".tmp-*"))


def test_recording_val_scores_keeps_the_loss_training_measured_on_them(model_file, dataset, tmp_path):
    """evaluate --record on the val split training scored (the same images, by their sha256)
    keeps the loss training recorded beside the new scores; on other val images it goes."""
    from tilescan.model import rewrite_metadata
    from tilescan.training.data import load_dataset

    val_sha = load_dataset(dataset).split_sha256["val"]
    for trained_on, kept in ((val_sha, True), ("0" * 64, False)):
        path = tmp_path / f"{kept}.keras"
        shutil.copy(model_file, path)

        def as_trained(meta, trained_on=trained_on):
            meta.setdefault("training", {})["split_sha256"] = {"val": trained_on}
            meta.setdefault("scores", {})["val"] = {"accuracy": 0.5, "loss": 1.25, "loss_note": "training's", "n": 30}

        rewrite_metadata(path, as_trained)
        report = E.run_evaluate(str(path), str(dataset), "val", str(tmp_path / f"o{kept}"), batch_size=8,
                                explain_samples=0, record=True, log=lambda s: None)
        entry = read_metadata(path)["scores"]["val"]
        assert entry["accuracy"] == pytest.approx(report["accuracy"]) and entry["split_sha256"] == val_sha
        assert (entry.get("loss"), entry.get("loss_note")) == ((1.25, "training's") if kept else (None, None))


def test_tta_is_invariant_to_flips_and_rotations(model_file):
    model = load_model(model_file).model
    x = np.random.default_rng(5).random((3, SIZE, SIZE, 3)).astype(np.float32)
    p = E.predict_probs(model, x, tta=True, batch_size=16)
    assert p.shape == (3, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    for view in (x[:, :, ::-1], x[:, ::-1], np.rot90(x, 1, axes=(1, 2))):
        np.testing.assert_allclose(E.predict_probs(model, np.ascontiguousarray(view), tta=True, batch_size=16), p, atol=1e-5)
    # without TTA the model is not invariant (so the check above means something)
    plain = E.predict_probs(model, x)
    assert np.abs(plain - E.predict_probs(model, np.ascontiguousarray(x[:, :, ::-1]))).max() > 1e-4


def test_dihedral_views_are_the_eight_symmetries():
    x = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    v = E.dihedral_views(x)
    assert v.shape == (16, 3, 3, 1)
    np.testing.assert_array_equal(v[:2], x)
    assert len({v[k * 2].tobytes() for k in range(8)}) == 8


def test_tta_run_and_explanation_study(model_file, dataset, tmp_path):
    logs = []
    r = E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path), batch_size=16, tta=True, explain_samples=0,
                       explanations=True, faithfulness_limit=6, faithfulness_steps=4, log=logs.append)
    assert r["tta"] is True
    st = r["explanations"]
    assert set(st["methods"]) == {"gradcam", "random"} and st["n"] == 6 and st["steps"] == 4
    g = st["methods"]["gradcam"]
    assert 0 <= g["deletion_auc"] <= 1 and 0 <= g["insertion_auc"] <= 1
    assert g["tiles_per_s"] > 0 and g["x_inference"] > 0
    # the paired difference to random maps is the mean of the per-image differences: the AUCs' difference
    assert g["deletion_vs_random"] == pytest.approx(g["deletion_auc"] - st["methods"]["random"]["deletion_auc"])
    assert g["insertion_vs_random_sem"] >= 0 and "deletion_vs_random" not in st["methods"]["random"]
    rows = _read_csv(tmp_path / "explanations.csv")
    assert [row[0] for row in rows[1:]] == ["inference", "gradcam", "random"]
    assert float(dict(zip(rows[0], rows[2]))["deletion_vs_random"]) == pytest.approx(g["deletion_vs_random"], abs=1e-6)
    # the verdict is kept, not only printed: told apart from random maps by two standard errors on either AUC
    told = -g["deletion_vs_random"] > 2 * g["deletion_vs_random_sem"] or g["insertion_vs_random"] > 2 * g["insertion_vs_random_sem"]
    assert g["unlike_random"] is told and dict(zip(rows[0], rows[2]))["unlike_random"] == str(told).lower()
    table = next(line for line in logs if line.startswith("| method | tiles/s"))
    assert "deletion − random" in table and "± one standard error over the 6 images" in table
    # evaluated again into the same folder without the study: its table, from another run, goes
    r = E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path), batch_size=16, explain_samples=0,
                       log=logs.append)
    assert not (tmp_path / "explanations.csv").exists() and "explanations.csv" not in r["outputs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r["outputs"])


def test_a_stopped_evaluation_leaves_the_earlier_ones_files_as_they_were(model_file, dataset, tmp_path, monkeypatch):
    """A stop (SIGTERM's exception) while the explanations figure is drawn, in the folder of an
    earlier evaluation: its files stay as they were (not the new tables beside the old report),
    nothing half made is left; the next evaluation writes its set whole."""
    from conftest import tree_hashes
    from tilescan import stop

    first = E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path), batch_size=16, explain_samples=2,
                           log=lambda s: None)
    before = tree_hashes(tmp_path)

    def stopped(*a, **k):
        raise stop.Interrupted("SIGTERM")

    monkeypatch.setattr(E, "_explanation_figure", stopped)
    with pytest.raises(stop.Interrupted):
        E.run_evaluate(str(model_file), str(dataset), "val", str(tmp_path), batch_size=16, explain_samples=2,
                       log=lambda s: None)
    assert tree_hashes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(first["outputs"])
    monkeypatch.undo()
    again = E.run_evaluate(str(model_file), str(dataset), "val", str(tmp_path), batch_size=16, explain_samples=0,
                           log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(again["outputs"])
    assert json.loads((tmp_path / "report.json").read_text())["split"] == "val"


def test_a_stop_while_the_files_move_into_place_lets_the_evaluation_end_done(model_file, dataset, tmp_path,
                                                                              monkeypatch):
    """A SIGTERM while the finished files are moved into place waits for them, and the earlier
    evaluation's file this one does not make is removed; the work is in place, so the command
    ends done (exit 0), not stopped."""
    import os
    import signal

    from conftest import invoke

    args = ["evaluate", model_file, dataset, "--split", "test", "-o", tmp_path, "--batch-size", "16"]
    assert invoke([*args, "--explain-samples", "2"]).exit_code == 0 and (tmp_path / "explanations.png").exists()
    replace, sent = os.replace, []

    def moving(src, dst):
        if ".evaluation.tmp-" in str(src) and Path(dst).parent == tmp_path and not sent:  # into place, not into the stage
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # mid-moves
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", moving)
    res = invoke([*args, "--explain-samples", "0"])
    monkeypatch.undo()
    assert sent and res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(report["outputs"]) and "explanations.png" not in report["outputs"]


def test_compute_metrics_by_hand():
    from tilescan.training.metrics import compute_metrics

    m = compute_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 1]), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    f1 = [2 / 3, 2 * (1 / 2) / (1 / 2 + 1), 0.0]
    assert [r["f1"] for r in m["per_class"]] == pytest.approx(f1)
    assert m["macro"]["f1"] == pytest.approx(sum(f1) / 3)
    assert m["per_class"][2]["precision"] is None and m["per_class"][2]["recall"] == 0.0  # c: missed, never predicted
    # d: neither true nor predicted (all None, left out of the macro average); e: predicted, never true
    m = compute_metrics(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 4, 1]), ["a", "b", "c", "d", "e"])
    d, e = m["per_class"][3], m["per_class"][4]
    assert (d["precision"], d["recall"], d["f1"]) == (None, None, None)
    assert (e["precision"], e["recall"], e["f1"]) == (0.0, None, 0.0)
    assert m["macro"]["classes"] == 4
    assert m["macro"]["f1"] == pytest.approx((2 / 3 + 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)) / 4)
    # over a, b, c alone (the classes with images): e's 0, a wrong prediction into it, is left out
    assert m["macro_supported"] == {"f1": pytest.approx((2 / 3 + 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)) / 3), "classes": 3}
    assert m["top_confusions"][0] == {"true": "a", "pred": "b", "count": 1}


def test_pick_examples_mixes_right_and_wrong():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    p = np.array([0, 1, 2, 0, 1, 2, 1, 2, 0, 0])
    pick = E.pick_examples(y, p, 6, seed=1)
    assert len(pick) == 6 and len(set(pick.tolist())) == 6
    assert (y[pick] != p[pick]).sum() == 3
    np.testing.assert_array_equal(pick, E.pick_examples(y, p, 6, seed=1))
    assert len(E.pick_examples(y, y, 4)) == 4  # no wrong ones: all right


def test_top5_accuracy_counts_the_true_class_ranked_fifth_not_sixth():
    """report.json's top5_accuracy: the share of images whose true class is among the five most
    probable, here ranked 1st, 5th, 6th and 7th of 7 classes."""
    ranks = [0, 4, 5, 6]  # of the true class (0: the most probable)
    probs = np.tile(np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05], np.float32), (len(ranks), 1))
    y_true = np.array(ranks)  # class j has rank j
    assert E._top5(probs, y_true) == 0.5
    assert E._top5(probs[1:2], y_true[1:2]) == 1.0 and E._top5(probs[2:3], y_true[2:3]) == 0.0


def test_one_example_picked_from_predictions_with_errors_is_a_wrong_one():
    """An explanation figure of one sample shows a mistake when there is one to show."""
    y = np.array([0, 1, 2, 0, 1, 2])
    p = np.array([0, 1, 2, 0, 1, 0])
    for seed in range(5):
        (i,) = E.pick_examples(y, p, 1, seed=seed)
        assert i == 5


def test_a_dataset_with_some_of_the_models_classes_in_any_order(model_file, dataset, tmp_path):
    """A test region without one of the classes, its classes.txt in another order: scored by
    class name, as the full dataset scores those images; a class the model does not know is
    refused."""
    full = E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path / "full"), explain_samples=0,
                          log=lambda s: None)
    part = tmp_path / "part"
    (part / "splits").mkdir(parents=True)
    kept = CLASSES[:0:-1]  # Parking, Forest: no Beach, in reverse order
    for c in kept:
        (part / "images" / c).parent.mkdir(exist_ok=True)
        (part / "images" / c).symlink_to(dataset / "images" / c)
    for s in ("train", "val", "test"):
        lines = (dataset / "splits" / f"{s}.txt").read_text().split()
        (part / "splits" / f"{s}.txt").write_text("\n".join(ln for ln in lines if ln.split("/")[0] in kept) + "\n")
    (part / "classes.txt").write_text("\n".join(kept) + "\n")
    said: list[str] = []
    r = E.run_evaluate(str(model_file), str(part), "test", str(tmp_path / "o"), explain_samples=0, log=said.append)
    assert any("the scored split has images of 2 of the model's 3 classes; the others (Beach) have none" in m
               for m in said), said
    by = {row["class"]: row for row in r["metrics"]["per_class"]}
    assert [row["class"] for row in r["metrics"]["per_class"]] == CLASSES  # the model's order
    assert by["Beach"]["support"] == 0 and by["Beach"]["recall"] is None  # nothing to recall: undefined, not 0
    beach = next(row for row in _read_csv(tmp_path / "o" / "per_class.csv") if row[0] == "Beach")
    assert beach[2] == "" and beach[4] == "0"
    weakest = next(m for m in said if m.startswith("weakest classes (F1): "))  # a class only predicted is named too
    assert by["Beach"]["predicted"] > 0  # the tiny model predicts it: wrongly, every time
    assert f"; predicted, with no image in the split (all wrong): Beach {by['Beach']['predicted']} times" in weakest
    for c in kept:  # each kept class scored as in the full dataset
        mine = {k: by[c][k] for k in ("support", "recall")}
        assert mine == {k: next(x for x in full["metrics"]["per_class"] if x["class"] == c)[k] for k in mine}
    (part / "classes.txt").write_text("Parking\nForest\nMarsh\n")
    (part / "images" / "Marsh").symlink_to(dataset / "images" / "Beach")
    with pytest.raises(InputError, match=r"the dataset has classes the model does not know: \['Marsh'\].*"
                                         r"evaluate a model on a dataset of its own legend") as e:
        E.run_evaluate(str(model_file), str(part), "test", str(tmp_path / "o2"), log=lambda s: None)
    assert e.value.exit_code == 4  # the data cannot be used, as for train and chips
    scoring = tmp_path / "scoring"  # a set kept for scoring, one folder named in another case: the near miss named
    (scoring / "Test").mkdir(parents=True)
    (scoring / "Test" / "Parking").symlink_to(dataset / "images" / "Parking")
    (scoring / "Test" / "forest").symlink_to(dataset / "images" / "Forest")
    with pytest.raises(InputError, match=r"does not know: \['forest'\].*rename the folders to the model's names "
                                         r"\('forest' is the model's 'Forest'\)"):
        E.run_evaluate(str(model_file), str(scoring), "test", str(tmp_path / "o3"), log=lambda s: None)
    (scoring / "Test" / "Forest").symlink_to(dataset / "images" / "Forest")  # both spellings: merge, not rename
    with pytest.raises(InputError, match=r"\('forest' is the model's 'Forest', whose folder is there too: merge them\)"):
        E.run_evaluate(str(model_file), str(scoring), "test", str(tmp_path / "o4"), log=lambda s: None)


def test_a_folder_kept_only_for_scoring(model_file, dataset, tmp_path):
    """An independent test set in each layout a user makes: Test/<Class>/ alone, a splits folder
    with only test.txt, plain class folders scored whole with --split all; each scores the same
    images as the dataset's own test split. 'all' of the dataset the model was trained on is
    warned about."""
    from conftest import invoke

    want = E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path / "want"), explain_samples=0,
                          log=lambda s: None)["metrics"]
    tests = [ln.split("/") for ln in (dataset / "splits" / "test.txt").read_text().split()]
    only_test = tmp_path / "only_test"
    plain = tmp_path / "plain"
    for c, name in tests:
        for folder in (only_test / "Test" / c, plain / c):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(dataset / "images" / c / name)
    lists = tmp_path / "lists"
    (lists / "splits").mkdir(parents=True)
    (lists / "images").symlink_to(dataset / "images")
    shutil.copy(dataset / "splits" / "test.txt", lists / "splits")
    for data, split in ((only_test, "test"), (lists, "test"), (plain, "all")):
        res = invoke(["evaluate", model_file, data, "--split", split, "-o", tmp_path / f"o-{data.name}",
                      "--explain-samples", "0"])
        assert res.exit_code == 0, res.output
        got = json.loads((tmp_path / f"o-{data.name}" / "report.json").read_text())
        assert got["n"] == len(tests) and got["metrics"]["confusion_matrix"] == want["confusion_matrix"], data
        assert "split_warning" not in got
    c = tests[0][0]  # a broken image among plain folders is named as one, not as in a split they do not have
    (plain / c / "broken.jpg").write_bytes((dataset / "images" / c / tests[0][1]).read_bytes()[:500])
    res = invoke(["evaluate", model_file, plain, "--split", "all", "-o", tmp_path / "o-broken"])
    assert res.exit_code == 4 and f"image '{c}/broken.jpg'" in res.output and "split's" not in res.output, res.output
    res = invoke(["evaluate", model_file, only_test, "--split", "val", "-o", tmp_path / "o-val"])
    assert res.exit_code == 4 and "dataset has no 'val' split (has: test)" in res.output, res.output
    res = invoke(["evaluate", model_file, lists, "--split", "val", "-o", tmp_path / "o-val"])
    assert res.exit_code == 4 and "no val.txt in the splits folder (has: test.txt)" in res.output, res.output


def test_errors(model_file, dataset, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="limit"):
        E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path / "o"), record=True, limit=5, log=lambda s: None)
    for kw, said in (({"batch_size": "x"}, "batch_size must be a whole number >= 1, got 'x'"),
                     ({"batch_size": 0}, "got 0"), ({"limit": 2.5}, "limit must be a whole number >= 1, got 2.5")):
        with pytest.raises(ConfigError, match=said):  # a tilescan error, as every other one, not int()'s ValueError
            E.run_evaluate(str(model_file), str(dataset), "test", str(tmp_path / "o"), log=lambda s: None, **kw)
    with pytest.raises(InputError, match="dataset has no 'nope' split"):  # the data's, exit 4 as an empty one
        E.run_evaluate(str(model_file), str(dataset), "nope", str(tmp_path / "o"), log=lambda s: None)
    ran = tmp_path / "ran"  # a run's output folder: its report.json is not replaced by the evaluation's
    ran.mkdir()
    (ran / "report.json").write_text(json.dumps({"done": [], "exit_code": 0}))
    with pytest.raises(OutputExistsError, match="holds the report.json of a 'tilescan run'"):
        E.run_evaluate(str(model_file), str(dataset), "test", str(ran), log=lambda s: None)
    assert json.loads((ran / "report.json").read_text())["exit_code"] == 0
    # a split list naming an image that is not there: stopped before the model loads, naming the list
    gone = tmp_path / "gone"
    gone.mkdir()
    (gone / "images").symlink_to(dataset / "images")
    (gone / "classes.txt").symlink_to(dataset / "classes.txt")
    shutil.copytree(dataset / "splits", gone / "splits")
    with open(gone / "splits" / "test.txt", "a") as fh:
        fh.write("Forest/forest_99.png\nBeach/beach_98.png\n")
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the split was checked")

    monkeypatch.setattr("tilescan.model.load_model", no_load)
    with pytest.raises(InputError, match=r"test split's image 'Forest/forest_99.png' \(and 1 more\) is not found") as e:
        E.run_evaluate(str(model_file), str(gone), "test", str(tmp_path / "o"), log=lambda s: None)
    assert e.value.path == str(gone / "splits" / "test.txt")
    assert not (tmp_path / "o").exists()
    (gone / "splits" / "test.txt").write_text("")  # a data problem, exit 4 as in train; not a setting's
    with pytest.raises(InputError, match="the 'test' split is empty"):
        E.run_evaluate(str(model_file), str(gone), "test", str(tmp_path / "o"), log=lambda s: None)


def test_real_aid_images(aid_dir, model_file, tmp_path):
    """Real AID JPEGs (three classes, a few images each) through a tiny model: decoding,
    the split bookkeeping and the files work on the real data."""
    classes = CLASSES
    root = tmp_path / "aid3"
    lines = {s: [ln for ln in (aid_dir / "splits" / f"{s}.txt").read_text().split() if ln.split("/")[0] in classes]
             for s in ("train", "val", "test")}
    (root / "splits").mkdir(parents=True)
    for s, v in lines.items():
        keep = v[:2] if s != "test" else [ln for c in classes for ln in [x for x in v if x.startswith(c + "/")][:4]]
        (root / "splits" / f"{s}.txt").write_text("\n".join(keep) + "\n")
        for ln in keep:
            dst = root / "images" / ln
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(aid_dir / "images" / ln, dst)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    r = E.run_evaluate(str(model_file), str(root), "test", str(tmp_path / "out"), batch_size=8, explain_samples=0, log=lambda s: None)
    assert r["n"] == 12 and r["dataset"]["dataset"] == "aid3"
    assert sum(sum(row) for row in r["metrics"]["confusion_matrix"]) == 12


def test_a_stop_before_anything_is_written_leaves_no_empty_folder(dataset, model_file, tmp_path, monkeypatch):
    """Ctrl-C while the split is predicted: the folders evaluate made are gone again; a folder
    that was there before stays, with what it held."""
    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "_predict_split", stopped)
    out = tmp_path / "reports" / "eval"
    with pytest.raises(KeyboardInterrupt):
        E.run_evaluate(str(model_file), str(dataset), out_dir=str(out), explain_samples=0, log=lambda m: None)
    assert not (tmp_path / "reports").exists()
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        E.run_evaluate(str(model_file), str(dataset), out_dir=str(mine / "eval"), explain_samples=0, log=lambda m: None)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_weakest_classes_leave_out_those_scored_perfectly():
    """On a small split most classes score F1 1.000: those are not "weakest"; with none below
    1, the line says so."""
    said: list[str] = []
    per_class = [{"class": c, "f1": f, "support": 3} for c, f in (("Center", 0.667), ("Airport", 1.0), ("Church", 1.0))]
    metrics = {"per_class": per_class, "accuracy": 0.9, "macro": {"f1": 0.9, "classes": 3},
               "macro_supported": {"f1": 0.9, "classes": 3}, "weighted": {"f1": 0.9}}
    E._log_summary(metrics, 9, {"images_per_s": 10.0}, ["metrics.json"], Path("out"), said.append)
    assert "weakest classes (F1): Center 0.667" in said and not any("Airport" in m for m in said)
    assert "macro F1 0.9000  weighted F1" in said[0]
    metrics["macro"] = {"f1": 0.6, "classes": 5}  # two classes predicted with no image: macro F1 over them too
    said.clear()
    E._log_summary(metrics, 9, {"images_per_s": 10.0}, ["metrics.json"], Path("out"), said.append)
    assert "macro F1 0.6000 (0.9000 over the 3 classes with images)  weighted F1" in said[0], said
    for row in per_class:
        row["f1"] = 1.0
    said.clear()
    E._log_summary(metrics, 9, {"images_per_s": 10.0}, ["metrics.json"], Path("out"), said.append)
    assert "weakest classes (F1): none below 1" in said
