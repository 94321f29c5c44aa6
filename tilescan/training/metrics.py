"""Classification metrics from integer labels, with numpy alone.

Accuracy; per class precision = TP / predicted, recall = TP / support, F1 their harmonic
mean. Per class, a value with nothing to divide by is None (precision of a class never
predicted, recall of a class with no support, F1 of a class with neither); the averages count
it as 0: macro averages over the classes that occur in the true or the predicted labels
(scikit-learn's default), weighted averages by support; ``macro_supported`` averages F1 over
the classes with images alone.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro and weighted averages, the
    confusion matrix and the most frequent confusions, from integer labels."""
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    n = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    pr = precision + recall
    f1 = np.divide(2 * precision * recall, pr, out=np.zeros(k), where=pr > 0)
    present = (support > 0) | (predicted > 0)
    n_present = max(1, int(present.sum()))
    weights = support / max(1.0, support.sum())

    def avg(v, how):
        return float(v[present].sum() / n_present) if how == "macro" else float((v * weights).sum())

    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")
    top = [
        {"true": classes[i], "pred": classes[j], "count": int(off[i, j])}
        for i, j in (divmod(int(o), k) for o in order[:10])
        if off[i, j] > 0
    ]
    def defined(v: np.ndarray, ok: np.ndarray, i: int) -> float | None:
        return float(v[i]) if ok[i] else None

    return {
        "n": n,
        "correct": int(tp.sum()),
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro": {"precision": avg(precision, "macro"), "recall": avg(recall, "macro"), "f1": avg(f1, "macro"), "classes": int(present.sum())},
        "weighted": {"precision": avg(precision, "weighted"), "recall": avg(recall, "weighted"), "f1": avg(f1, "weighted")},
        # over the classes with images alone: a split of a few of the model's classes, where the
        # predictions into the others (all wrong) would each add a 0 to the macro average
        "macro_supported": {"f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
                            "classes": int((support > 0).sum())},
        "per_class": [
            {
                "class": classes[i],
                "index": i,
                "precision": defined(precision, predicted > 0, i),
                "recall": defined(recall, support > 0, i),
                "f1": defined(f1, present, i),
                "support": int(support[i]),
                "predicted": int(predicted[i]),
            }
            for i in range(k)
        ],
        "confusion_matrix": cm.tolist(),
        "top_confusions": top,
    }
