"""The router: which expert(s) decide a face, as one torch module with the whole hierarchy.

``hard``: the expert of the neighborhood stage 1's predicted V/A falls in.
``soft``: every expert's class probabilities weighted by P(neighborhood | predicted V/A)
(the mixture posterior for ``gmm``, else softmax of negative squared distances to the
centers with a temperature fitted on validation); classes outside an expert get zero from it.
``oracle``: the neighborhood of the *true* V/A, an upper bound for analysis.
Final probabilities cover the 8 canonical classes and sum to 1; where the run chose them on the
selection split, the flat model is mixed in (p ∝ p_flat^α · p_hier^(1−α)) and logits are
adjusted for class priors (:mod:`ensemble.combine`), in the module itself so that an export
carries them.

Stages that share a trunk (same weights digest) run it once per image; an expert with blocks
of its own (``experts.model.trainable = "blockN"``) reads the shared trunk's output at that
boundary and runs its blocks and head from there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .classes import CLASSES
from .combine import final_proba

MODES = ("hard", "soft", "oracle")


class RegionPosterior(nn.Module):
    """P(neighborhood | V/A) of a fitted VANeighborhoods, in torch (exportable)."""

    def __init__(self, nbh, temperature: float):
        super().__init__()
        self.kind = "gmm" if nbh.method == "gmm" else "distance"
        self.register_buffer("centers", torch.tensor(nbh.centers_, dtype=torch.float32))
        self.temperature = float(temperature)
        if self.kind == "gmm":
            g = nbh.gmm_
            self.register_buffer("prec_chol", torch.tensor(g["precisions_cholesky"], dtype=torch.float32))  # (k, 2, 2)
            self.register_buffer("log_weights", torch.tensor(np.log(g["weights"]), dtype=torch.float32))

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
        flat_head: nn.Module | None = None,
        flat_trunk: str | None = None,
        alpha: float = 0.0,
        tau: float = 0.0,
        log_prior=None,
        inputs: str = "va",
        expert_from: list | None = None,
    ):
        super().__init__()
        self.trunks = nn.ModuleDict(trunks)
        self.stage1_head = stage1_head
        self.stage1_trunk = stage1_trunk
        # an expert's module: its head, or its own blocks then its head
        self.expert_heads = nn.ModuleList([h if h is not None else nn.Identity() for h in expert_heads])
        self.expert_trunks = list(expert_trunks)
        # the block boundary of its shared trunk an expert reads (None: the trunk's output)
        self.expert_from = list(expert_from) if expert_from is not None else [None] * len(expert_heads)
        self.taps = {
            key: sorted({b for b, k in zip(self.expert_from, self.expert_trunks) if k == key and b is not None})
            for key in self.trunks
        }
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
        # the final distribution (ensemble.combine): the flat model's head runs only when alpha > 0
        self.inputs = inputs  # "va": route on stage 1's V/A; "va+flat": also on the flat model's class evidence
        uses_flat = alpha or inputs == "va+flat"
        self.flat_head, self.flat_trunk = (flat_head, flat_trunk) if uses_flat else (None, None)
        # (k, 8): 1 where a class belongs to a neighborhood's expert
        self.register_buffer("members", torch.stack([m.sum(0) for m in maps]) if maps else torch.zeros(0, len(CLASSES)))
        self.alpha, self.tau = float(alpha), float(tau)
        self.register_buffer("log_prior", torch.as_tensor(log_prior if tau else [0.0] * len(CLASSES)).float())

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V/A (n, 2) and every expert's canonical probabilities (k, n, 8), then the flat model's
        as row k when it is mixed in (:meth:`split` tells them apart)."""
        feats = {}  # (trunk, boundary) -> features; each trunk runs once, block by block where tapped
        for key, trunk in self.trunks.items():
            if not self.taps[key]:
                feats[(key, None)] = trunk(x)
                continue
            z = x
            for b, block in enumerate(trunk):
                if b in self.taps[key]:
                    feats[(key, b)] = z
                z = block(z)
            feats[(key, None)] = z
        va = torch.clamp(self.stage1_head(feats[(self.stage1_trunk, None)]).float(), -1, 1)
        probs = []
        for i, head in enumerate(self.expert_heads):
            m = getattr(self, f"map{i}")
            if self.constant[i]:
                p = m[0].expand(x.shape[0], -1)
            else:
                z = feats[(self.expert_trunks[i], self.expert_from[i])]
                p = torch.softmax(head(z).float(), dim=1) @ m
            probs.append(p)
        if self.flat_head is not None:
            probs.append(torch.softmax(self.flat_head(feats[(self.flat_trunk, None)]).float(), dim=1))
        return va, torch.stack(probs)

    def split(self, parts_probs):
        """:meth:`parts`' probabilities as (experts' (k, n, 8), the flat model's (n, 8) or None)."""
        k = len(self.expert_heads)
        return parts_probs[:k], (parts_probs[k] if len(parts_probs) > k else None)

    def finish(self, p_hier, p_flat=None):
        """The final distribution from the hierarchy's (n, 8) (and the flat model's, when mixed in)."""
        return final_proba(p_hier, p_flat, self.alpha if p_flat is not None else 0.0, self.tau, self.log_prior)

    def weights(self, va: torch.Tensor, mode: str, p_flat: torch.Tensor | None = None) -> torch.Tensor:
        """Region weights (n, k): P(neighborhood | V/A), times (``inputs = "va+flat"``) HD-CNN's
        r_n = Σ_{c ∈ n} p_flat(c | x), renormalised; one-hot of the largest for ``hard``."""
        post = self.posterior(va)
        if self.inputs == "va+flat" and p_flat is not None:
            post = post * (p_flat.to(post.dtype) @ self.members.T)
            post = post / post.sum(1, keepdim=True).clamp_min(1e-12)
        if mode == "soft":
            return post
        return torch.nn.functional.one_hot(post.argmax(1), post.shape[1]).to(post.dtype)

    @staticmethod
    def mix(w: torch.Tensor, expert_probs: torch.Tensor) -> torch.Tensor:
        p = torch.einsum("nk,knc->nc", w, expert_probs)
        return p / p.sum(1, keepdim=True).clamp_min(1e-12)

    def forward(self, x: torch.Tensor):
        va, probs = self.parts(x)
        ep, pf = self.split(probs)
        w = self.weights(va, self.mode, pf)
        return self.finish(self.mix(w, ep), pf), va, w


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
