"""The final distribution: the hierarchy mixed with the flat model, and logit adjustment.

``p ∝ p_flat^α · p_hier^(1−α) · prior^(−τ)``: α = 1 is the flat model and α = 0 the hierarchy
alone; τ·log(prior) is post-hoc logit adjustment for class priors (Menon et al., ICLR 2021).
Both are chosen on the selection split (:func:`choose_alpha`, :func:`choose_tau`), α before τ;
the grids hold the "do nothing" values, so the selection split can never prefer a
combination worse than the flat model or an adjustment worse than none.

The rule (``router.select``): ``one_se`` (default) takes the simplest value — the flat model
(α = 1), no adjustment (τ = 0), then the nearest to them — whose balanced accuracy is within one
paired standard error of the best on the selection faces (the "one standard error" rule of
model selection, Breiman et al. 1984) among the values that score at least as well as every
simpler one; ``best`` takes the best score outright. A gain of a
hundredth of a point on a few thousand faces is noise, and noise must not buy a change of model.
"""

from __future__ import annotations

import numpy as np
import torch

from .metrics import classification_metrics

ALPHA_GRID = tuple(round(a, 2) for a in np.linspace(0, 1, 11))
TAU_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def log_prior(train_labels, n_classes: int) -> np.ndarray:
    """(n_classes,) log class frequencies of the training faces (add-one smoothed)."""
    counts = np.bincount(np.asarray(train_labels, int), minlength=n_classes).astype(float) + 1.0
    return np.log(counts / counts.sum())


def final_proba(p_hier, p_flat=None, alpha: float = 0.0, tau: float = 0.0, log_prior=None):
    """(n, C) probabilities ∝ p_flat^alpha · p_hier^(1−alpha) · exp(−tau·log_prior); torch or numpy in, same out.
    With alpha = 0 and tau = 0, ``p_hier`` itself."""
    if not alpha and not tau:
        return p_hier
    as_numpy = isinstance(p_hier, np.ndarray)
    ph = torch.as_tensor(p_hier, dtype=torch.float32)
    logit = torch.log(ph.clamp_min(1e-12))
    if alpha:
        pf = torch.as_tensor(p_flat, dtype=torch.float32, device=ph.device)
        logit = (1 - alpha) * logit + alpha * torch.log(pf.clamp_min(1e-12))
    if tau:
        logit = logit - tau * torch.as_tensor(log_prior, dtype=torch.float32, device=ph.device)
    p = torch.softmax(logit, dim=1)
    return p.numpy() if as_numpy else p


def _balanced_accuracy(y, p) -> float:
    return classification_metrics(y, np.asarray(p).argmax(1), list(range(np.asarray(p).shape[1])))["balanced_accuracy"]


def paired_se(y, pred_a, pred_b) -> float:
    """Standard error of balanced accuracy(a) − balanced accuracy(b) on the same faces: per class,
    the variance of the mean of the paired differences in correctness, summed, over the classes."""
    y = np.asarray(y, int)
    d = (np.asarray(pred_a) == y).astype(float) - (np.asarray(pred_b) == y).astype(float)
    # a class with one face has no variance to estimate: its squared difference stands in (0 or 1)
    var = [(dc.var(ddof=1) if len(dc) > 1 else dc[0] ** 2) / len(dc) for dc in (d[y == c] for c in np.unique(y))]
    return float(np.sqrt(np.sum(var)) / len(var)) if var else 0.0


def _select(y, probas: dict, simplest_first: list, rule: str) -> tuple[float, dict, dict]:
    """(value, {value: balanced accuracy}, {value: paired SE vs the best}) under ``rule``."""
    preds = {v: np.asarray(p).argmax(1) for v, p in probas.items()}
    scores = {v: _balanced_accuracy(y, p) for v, p in probas.items()}
    best = max(simplest_first, key=lambda v: scores[v])  # ties: the simpler
    se = {v: paired_se(y, preds[v], preds[best]) for v in simplest_first}
    if rule == "best":
        return best, scores, se
    # the first value within one SE of the best that also scores at least as well as every simpler
    # value: a rejected simpler value never gives way to a worse one with a wider interval
    floor = -np.inf
    for v in simplest_first:
        if scores[v] >= floor and scores[v] >= scores[best] - se[v]:
            return v, scores, se
        floor = max(floor, scores[v])
    return best, scores, se


def choose_alpha(y, p_flat, p_hier, grid=ALPHA_GRID, rule: str = "one_se") -> tuple[float, dict, dict]:
    """The flat model's weight on (selection) faces ``y`` under ``rule`` (module doc); simplest is
    the largest weight (α = 1: the flat model). Returns (alpha, {alpha: score}, {alpha: paired SE})."""
    grid = sorted((float(a) for a in grid), reverse=True)
    return _select(y, {a: final_proba(p_hier, p_flat, a) for a in grid}, grid, rule)


def choose_tau(y, p, log_prior, grid=TAU_GRID, rule: str = "one_se") -> tuple[float, dict, dict]:
    """The logit adjustment on (selection) faces ``y`` under ``rule`` (module doc); simplest is the
    smallest (τ = 0: no adjustment). Returns (tau, {tau: score}, {tau: paired SE})."""
    grid = sorted(float(t) for t in grid)
    return _select(y, {t: final_proba(p, tau=t, log_prior=log_prior) for t in grid}, grid, rule)
