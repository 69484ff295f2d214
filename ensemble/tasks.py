"""What a network learns, as an object: the loop and the stages never ask "which task?".

A task owns its output size and names, its per-epoch loss weights, its loss, the
post-processing of raw outputs, its metrics and the one number model selection maximises.
Two tasks exist: :data:`CLASSIFY` (emotions, cross-entropy, balanced accuracy) and
:data:`VA_REGRESSION` (valence/arousal, MSE or MSE+CCC, mean CCC of the clipped outputs).
Their ``name`` is what ``meta.json`` records.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .batches import class_weights
from .metrics import classification_metrics, regression_metrics


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - CCC, averaged over the output columns. ``pred``, ``target``: (batch, k)."""
    pm, tm = pred.mean(0), target.mean(0)
    pv, tv = pred.var(0, unbiased=False), target.var(0, unbiased=False)
    cov = ((pred - pm) * (target - tm)).mean(0)
    return (1 - 2 * cov / (pv + tv + (pm - tm) ** 2 + 1e-8)).mean()


class Classification:
    """Classes in logit order; cross-entropy (hard or vote-distribution targets, class weights,
    label smoothing); argmax; selection on balanced accuracy."""

    name = "classify"
    metric_label = "bal.acc"
    #: the validation metrics a training history records
    history_metrics = ("accuracy", "balanced_accuracy", "macro_f1")

    def output_names(self, class_names: list[str]) -> list[str]:
        """Names of the outputs, in order."""
        return list(class_names)

    def epoch_weights(self, labels: np.ndarray, class_names: list[str], balance_cfg):
        """(effective class counts (C,), loss weights (C,) or None) for one epoch's ``labels``."""
        counts = np.bincount(labels, minlength=len(class_names))
        return counts, class_weights(counts, balance_cfg, class_names)

    def targets(self, data, ok: np.ndarray, train_cfg) -> np.ndarray:
        """Training targets of the faces kept (``ok``): vote distributions (n, C) with
        ``train.soft_targets`` where the data has them, else labels (n,)."""
        if data.train_soft is not None and train_cfg.soft_targets:
            return data.train_soft[ok]
        return data.train_y[ok]

    def loss(self, out: torch.Tensor, target: np.ndarray, weight: torch.Tensor | None, train_cfg) -> torch.Tensor:
        """Cross-entropy of logits ``out`` (batch, C) against labels (batch,) or distributions (batch, C)."""
        if target.ndim == 2:
            tgt = torch.as_tensor(target, dtype=torch.float32, device=out.device)
        else:
            tgt = torch.as_tensor(target, dtype=torch.long, device=out.device)
        return F.cross_entropy(out, tgt, weight=weight, label_smoothing=train_cfg.label_smoothing)

    def metrics(self, y: np.ndarray, out: np.ndarray, class_names: list[str]) -> dict:
        """Metrics of raw outputs ``out`` (n, C) against labels ``y`` (n,)."""
        return classification_metrics(y, out.argmax(1), class_names)

    def selection(self, metrics: dict) -> float:
        """The number model selection maximises."""
        return metrics["balanced_accuracy"]


class VARegression:
    """(valence, arousal) in [-1, 1]; MSE or MSE+CCC (``train.loss``); outputs clipped to
    [-1, 1]; selection on the mean CCC of the clipped outputs, the CCC the stage reports."""

    name = "regress"
    metric_label = "CCC"
    history_metrics = None  # all of them

    def output_names(self, class_names: list[str]) -> list[str]:
        """Names of the outputs, in order."""
        return ["valence", "arousal"]

    def epoch_weights(self, labels: np.ndarray, class_names: list[str], balance_cfg):
        """No class counts, no loss weights."""
        return None, None

    def targets(self, data, ok: np.ndarray, train_cfg) -> np.ndarray:
        """(n, 2) valence/arousal of the faces kept."""
        return data.train_y[ok]

    def loss(self, out: torch.Tensor, target: np.ndarray, weight, train_cfg) -> torch.Tensor:
        """MSE, plus 1 - CCC with ``train.loss = "mse+ccc"``; ``out``, ``target``: (batch, 2)."""
        tgt = torch.as_tensor(target, dtype=torch.float32, device=out.device)
        loss = F.mse_loss(out, tgt)
        if train_cfg.loss == "mse+ccc":
            loss = loss + ccc_loss(out, tgt)
        return loss

    def metrics(self, y: np.ndarray, out: np.ndarray, class_names: list[str]) -> dict:
        """RMSE, CCC, PCC and SAGR of the clipped outputs ``out`` (n, 2) against ``y`` (n, 2)."""
        return regression_metrics(y, np.clip(out, -1, 1))

    def selection(self, metrics: dict) -> float:
        """The number model selection maximises."""
        return (metrics["ccc_valence"] + metrics["ccc_arousal"]) / 2


#: what a stage trains for
Task = Classification | VARegression

CLASSIFY = Classification()
VA_REGRESSION = VARegression()
#: a task by the name ``meta.json`` records
TASKS = {t.name: t for t in (CLASSIFY, VA_REGRESSION)}
