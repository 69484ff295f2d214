"""Classification and valence/arousal metrics, plain numpy (checked against hand values in tests)."""

from __future__ import annotations

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; rows are true classes, columns predictions."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return m


def classification_metrics(y_true, y_pred, class_names) -> dict:
    """accuracy, balanced_accuracy (mean recall over the classes present), macro_f1 (same classes),
    per_class_recall (None for a class with no samples), confusion."""
    y_true, y_pred = np.asarray(y_true, int), np.asarray(y_pred, int)
    k = len(class_names)
    m = confusion(y_true, y_pred, k)
    support = m.sum(axis=1)
    predicted = m.sum(axis=0)
    tp = np.diag(m).astype(float)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(k), where=present)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class_recall": {c: (float(recall[i]) if present[i] else None) for i, c in enumerate(class_names)},
        "confusion": m.tolist(),
    }


def ccc(x, y) -> float:
    """Lin's concordance correlation coefficient."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float("nan")
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(), y.var()
    cov = ((x - mx) * (y - my)).mean()
    denom = vx + vy + (mx - my) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def pcc(x, y) -> float:
    """Pearson's correlation; NaN with fewer than two points or a constant input."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def regression_metrics(true_va, pred_va) -> dict:
    """rmse, ccc, pcc and sagr (sign agreement) for valence and arousal. Inputs (n, 2)."""
    t, p = np.asarray(true_va, float), np.asarray(pred_va, float)
    out = {"n": int(len(t))}
    for j, name in enumerate(("valence", "arousal")):
        out[f"rmse_{name}"] = float(np.sqrt(np.mean((t[:, j] - p[:, j]) ** 2))) if len(t) else float("nan")
        out[f"ccc_{name}"] = ccc(t[:, j], p[:, j])
        out[f"pcc_{name}"] = pcc(t[:, j], p[:, j])
        out[f"sagr_{name}"] = float(np.mean(np.sign(t[:, j]) == np.sign(p[:, j]))) if len(t) else float("nan")
    return out
