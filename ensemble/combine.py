"""The final distribution: the hierarchy mixed with the flat model, and logit adjustment.

``p ∝ p_flat^α · p_hier^(1−α) · prior^(−τ)``: α = 1 is the flat model and α = 0 the hierarchy
alone; τ·log(prior) is post-hoc logit adjustment for class priors (Menon et al., ICLR 2021).
Both are chosen on the selection split (:func:`choose_alpha`, :func:`choose_tau`), α before τ;
the grids hold the "do nothing" values, so the selection split can never prefer a
combination worse than the flat model or an adjustment worse than none.
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


def choose_alpha(y, p_flat, p_hier, grid=ALPHA_GRID) -> tuple[float, dict]:
    """The flat model's weight with the best balanced accuracy on (selection) faces ``y``; a tie
    goes to the larger weight (the flat model, the simpler model). Returns (alpha, {alpha: score})."""
    scores = {float(a): _balanced_accuracy(y, final_proba(p_hier, p_flat, float(a))) for a in grid}
    best = max(scores, key=lambda a: (scores[a], a))
    return best, scores


def choose_tau(y, p, log_prior, grid=TAU_GRID) -> tuple[float, dict]:
    """The logit adjustment with the best balanced accuracy on (selection) faces ``y``; a tie goes
    to the smaller tau (no adjustment). Returns (tau, {tau: score})."""
    scores = {float(t): _balanced_accuracy(y, final_proba(p, tau=float(t), log_prior=log_prior)) for t in grid}
    best = max(scores, key=lambda t: (scores[t], -t))
    return best, scores
