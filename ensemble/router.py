"""The router: which expert(s) decide a face, as one torch module with the whole hierarchy.

``hard``: the expert of the neighborhood stage 1's predicted V/A falls in.
``soft``: every expert's class probabilities weighted by P(neighborhood | predicted V/A)
(the mixture posterior for ``gmm``, else softmax of negative squared distances to the
centers with a temperature fitted on validation); classes outside an expert get zero from it.
``oracle``: the neighborhood of the *true* V/A, an upper bound for analysis.
Final probabilities cover the 8 canonical classes and sum to 1.

Stages that share a trunk (same weights digest) run it once per image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .classes import CLASSES

MODES = ("hard", "soft", "oracle")


class RegionPosterior(nn.Module):
    """P(neighborhood | V/A) of a fitted VANeighborhoods, in torch (exportable)."""

    def __init__(self, nbh, temperature: float):
        super().__init__()
        self.kind = "gmm" if nbh.method == "gmm" else "distance"
        self.register_buffer("centers", torch.tensor(nbh.centers_, dtype=torch.float32))
        self.temperature = float(temperature)
        if self.kind == "gmm":
            g = nbh.estimator_
            self.register_buffer("prec_chol", torch.tensor(g.precisions_cholesky_, dtype=torch.float32))  # (k, 2, 2)
            self.register_buffer("log_weights", torch.tensor(np.log(g.weights_), dtype=torch.float32))

    def logits(self, va: torch.Tensor) -> torch.Tensor:  # (n, 2) -> (n, k)
        if self.kind == "gmm":
            diff = va[:, None, :] - self.centers[None]  # (n, k, 2)
            y = torch.einsum("nki,kij->nkj", diff, self.prec_chol)
            log_det = torch.log(torch.diagonal(self.prec_chol, dim1=1, dim2=2)).sum(-1)
            return -0.5 * (y**2).sum(-1) + log_det + self.log_weights - math.log(2 * math.pi)
        d2 = ((va[:, None, :] - self.centers[None]) ** 2).sum(-1)
        return -d2 / max(self.temperature, 1e-6)

    def forward(self, va: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(va), dim=1)


class HierarchyNet(nn.Module):
    """Preprocessed faces (n, 3, H, W) -> (probabilities (n, 8), V/A (n, 2), region weights (n, k))."""

    def __init__(
        self,
        trunks: dict,
        stage1_head: nn.Module,
        stage1_trunk: str,
        expert_heads: list,
        expert_trunks: list,
        expert_classes: list[list[int]],
        posterior: RegionPosterior,
        mode: str = "soft",
    ):
        super().__init__()
        self.trunks = nn.ModuleDict(trunks)
        self.stage1_head = stage1_head
        self.stage1_trunk = stage1_trunk
        self.expert_heads = nn.ModuleList([h if h is not None else nn.Identity() for h in expert_heads])
        self.expert_trunks = list(expert_trunks)
        self.constant = [h is None for h in expert_heads]
        maps = []
        for cls in expert_classes:
            m = torch.zeros(len(cls), len(CLASSES))
            m[torch.arange(len(cls)), torch.tensor(cls)] = 1
            maps.append(m)
        for i, m in enumerate(maps):
            self.register_buffer(f"map{i}", m)
        self.posterior = posterior
        self.mode = mode

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V/A (n, 2) and every expert's canonical probabilities (k, n, 8)."""
        feats = {key: trunk(x) for key, trunk in self.trunks.items()}
        va = torch.clamp(self.stage1_head(feats[self.stage1_trunk]).float(), -1, 1)
        probs = []
        for i, head in enumerate(self.expert_heads):
            m = getattr(self, f"map{i}")
            if self.constant[i]:
                p = m[0].expand(x.shape[0], -1)
            else:
                p = torch.softmax(head(feats[self.expert_trunks[i]]).float(), dim=1) @ m
            probs.append(p)
        return va, torch.stack(probs)

    def weights(self, va: torch.Tensor, mode: str) -> torch.Tensor:
        post = self.posterior(va)
        if mode == "soft":
            return post
        return torch.nn.functional.one_hot(post.argmax(1), post.shape[1]).to(post.dtype)

    @staticmethod
    def mix(w: torch.Tensor, expert_probs: torch.Tensor) -> torch.Tensor:
        p = torch.einsum("nk,knc->nc", w, expert_probs)
        return p / p.sum(1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor):
        va, ep = self.parts(x)
        w = self.weights(va, self.mode)
        return self.mix(w, ep), va, w


def fit_temperature(posterior: RegionPosterior, va_pred: np.ndarray, true_region: np.ndarray) -> float:
    """The temperature minimising the validation NLL of the true region (distance posteriors)."""
    if posterior.kind == "gmm" or len(va_pred) == 0:
        return posterior.temperature
    va = torch.tensor(va_pred, dtype=torch.float32, device=posterior.centers.device)
    y = torch.tensor(true_region, dtype=torch.long, device=posterior.centers.device)
    best = (math.inf, posterior.temperature)
    for t in np.logspace(-3, 1, 41):
        posterior.temperature = float(t)
        with torch.no_grad():
            nll = torch.nn.functional.cross_entropy(posterior.logits(va), y).item()
        if nll < best[0]:
            best = (nll, float(t))
    posterior.temperature = best[1]
    return best[1]
