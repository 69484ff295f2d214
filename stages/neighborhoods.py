"""Emotion neighborhoods: clusters of the training valence/arousal labels (scikit-learn).

``VANeighborhoods`` follows scikit-learn's conventions: ``__init__`` stores, ``fit`` learns
and returns ``self``, learned attributes end in ``_``, ``get_params``/``set_params`` (so
``sklearn.base.clone`` works). Fitting uses scikit-learn; predicting is numpy alone (nearest
center, or the mixture's posterior from its arrays), so loading a run never imports it. A class belongs to a neighborhood
when at least ``min_share`` of its samples (and ``min_count`` of them) lie there, so a
class may belong to two; every class present belongs to at least one (its largest share).
"""

from __future__ import annotations

import numpy as np

from ensemble.config import DEFAULT_TEMPERATURE
from ensemble.errors import UserError

METHODS = ("kmeans", "gmm", "agglomerative")


def membership(counts: np.ndarray, min_share: float, min_count: int) -> list[list[int]]:
    """Member classes per region from a (k, n_classes) count table."""
    totals = counts.sum(axis=0)
    share = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    member = (share >= min_share) & (counts >= min_count)
    for c in np.flatnonzero(totals > 0):
        if not member[:, c].any():
            member[np.argmax(counts[:, c]), c] = True
    return [np.flatnonzero(member[r]).tolist() for r in range(counts.shape[0])]


def routed_membership(
    members: list[list[int]], routed: np.ndarray, share: float
) -> tuple[list[list[int]], list[tuple[int, int, float]]]:
    """HD-CNN's overlapping groups: a class also joins every region that receives at least
    ``share`` of its faces under the actual router. ``routed``: (k, n_classes) counts of
    (selection) faces per region they are routed to and their class. Returns the members and
    the (region, class, share) added."""
    members = [list(m) for m in members]
    totals = routed.sum(axis=0)
    added = []
    for c in np.flatnonzero(totals > 0):
        for r in range(routed.shape[0]):
            got = routed[r, c] / totals[c]
            if got >= share and c not in members[r]:
                members[r] = sorted([*members[r], int(c)])
                added.append((r, int(c), float(got)))
    return members, added


def complete_membership(
    members: list[list[int]], counts: np.ndarray, centers: np.ndarray, class_names
) -> tuple[list[list[int]], dict[int, int], list[str]]:
    """Give every neighborhood an expert, never fail for lack of one (small data, ties).

    A neighborhood left with no member class but holding training faces (its classes all
    belong to other neighborhoods, e.g. 19 faces of a class here and 19 there under
    ``min_count = 20``) takes the class it holds most of. One with no training faces at all
    is merged with the nearest neighborhood that has some: it shares that one's classes and
    faces. Returns the completed members, ``{merged region: the region it uses}`` and one
    note per change, for the log."""
    members = [list(m) for m in members]
    merged: dict[int, int] = {}
    notes: list[str] = []
    has_faces = counts.sum(axis=1) > 0
    for r, cls in enumerate(members):
        if cls:
            continue
        if has_faces[r]:
            top = int(np.argmax(counts[r]))
            members[r] = [top]
            notes.append(
                f"neighborhood {r}: no class of its own (its {int(counts[r].sum())} training faces are of "
                f"classes that belong to other neighborhoods); its expert takes {class_names[top]}, "
                f"the class it holds most of ({int(counts[r, top])})"
            )
        else:
            others = np.flatnonzero(has_faces)
            if len(others) == 0:
                continue
            target = int(others[np.argmin(((centers[others] - centers[r]) ** 2).sum(axis=1))])
            merged[r] = target
            notes.append(
                f"neighborhood {r}: no training faces; merged with the nearest neighborhood {target} "
                f"(faces routed to {r} are classified by an expert of {target}'s classes and faces)"
            )
    for r, target in merged.items():
        members[r] = list(members[target])
    return members, merged, notes


class NotFittedError(ValueError, AttributeError):
    """Neighborhoods used before ``fit`` (as scikit-learn's, which it mirrors)."""


def _check_fitted(nbh) -> None:
    if not hasattr(nbh, "centers_"):
        raise NotFittedError("these VANeighborhoods are not fitted yet: call fit first")


GMM_ARRAYS = ("weights", "means", "covariances", "precisions_cholesky")


def gmm_log_prob(va: np.ndarray, gmm: dict) -> np.ndarray:
    """(n, k) log p(va, component) of a full-covariance mixture given as arrays (what
    ``GaussianMixture._estimate_weighted_log_prob`` computes)."""
    diff = va[:, None, :] - gmm["means"][None]  # (n, k, 2)
    y = np.einsum("nki,kij->nkj", diff, gmm["precisions_cholesky"])
    log_det = np.log(np.diagonal(gmm["precisions_cholesky"], axis1=1, axis2=2)).sum(-1)
    return -0.5 * (y**2).sum(-1) + log_det + np.log(gmm["weights"]) - va.shape[1] / 2 * np.log(2 * np.pi)


class VANeighborhoods:
    """Cluster (valence, arousal) points into neighborhoods and name their member classes."""

    _PARAMS = (
        "method",
        "k",
        "k_min",
        "k_max",
        "min_share",
        "min_count",
        "max_fit_samples",
        "n_classes",
        "random_state",
    )

    def __init__(
        self,
        method: str = "kmeans",
        k: int = 0,
        k_min: int = 2,
        k_max: int = 6,
        min_share: float = 0.15,
        min_count: int = 20,
        max_fit_samples: int = 20000,
        n_classes: int = 8,
        random_state: int = 0,
    ):
        self.method = method
        self.k = k
        self.k_min = k_min
        self.k_max = k_max
        self.min_share = min_share
        self.min_count = min_count
        self.max_fit_samples = max_fit_samples
        self.n_classes = n_classes
        self.random_state = random_state

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments (scikit-learn's estimator protocol)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params) -> "VANeighborhoods":
        for name, value in params.items():
            if name not in self._PARAMS:
                raise ValueError(f"invalid parameter {name!r} for VANeighborhoods")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = type(self)().get_params()
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return f"VANeighborhoods({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def _make(self, k: int):
        from sklearn.cluster import AgglomerativeClustering, KMeans
        from sklearn.mixture import GaussianMixture

        if self.method == "kmeans":
            return KMeans(n_clusters=k, n_init=10, random_state=self.random_state)
        if self.method == "gmm":
            return GaussianMixture(
                n_components=k, covariance_type="full", reg_covar=1e-3, n_init=3, random_state=self.random_state
            )
        if self.method == "agglomerative":
            return AgglomerativeClustering(n_clusters=k, linkage="ward")
        raise UserError(f"neighborhoods.method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def fit(self, va: np.ndarray, labels: np.ndarray) -> "VANeighborhoods":
        """``va``: (n, 2) training valence/arousal labels; ``labels``: (n,) class indices."""
        from sklearn.metrics import silhouette_score

        va = np.asarray(va, dtype=np.float64)
        labels = np.asarray(labels, dtype=int)
        rng = np.random.default_rng(self.random_state)
        sub = va if len(va) <= self.max_fit_samples else va[rng.choice(len(va), self.max_fit_samples, replace=False)]
        # jitter ties: derived V/A puts many faces on the same prototype point
        sub = sub + rng.normal(0, 1e-4, sub.shape)
        ks = [self.k] if self.k else list(range(self.k_min, self.k_max + 1))
        ks = [k for k in ks if 1 <= k <= len(np.unique(np.round(sub, 3), axis=0))]
        if not ks:
            raise UserError("too few distinct valence/arousal points to form neighborhoods")
        self.scores_ = {}
        best = None
        for k in ks:
            est = self._make(k)
            assign = est.fit_predict(sub)
            if len(ks) == 1:
                score = 0.0
            elif self.method == "gmm":
                score = -est.bic(sub)  # higher is better
            else:
                n_s = min(len(sub), 5000)
                score = float(silhouette_score(sub[:n_s], assign[:n_s])) if len(set(assign[:n_s])) > 1 else -1.0
            self.scores_[k] = float(score)
            if best is None or score > best[0]:
                best = (score, k, est, assign)
        _, self.k_, self.estimator_, assign = best
        if self.method == "gmm":
            self.centers_ = self.estimator_.means_.copy()
            self.gmm_ = {name: np.asarray(getattr(self.estimator_, name + "_"), np.float64) for name in GMM_ARRAYS}
        elif self.method == "kmeans":
            self.centers_ = self.estimator_.cluster_centers_.copy()
        else:
            self.centers_ = np.array([sub[assign == r].mean(axis=0) for r in range(self.k_)])
        self.set_members(self.predict(va), labels)
        return self

    def set_members(self, region: np.ndarray, labels: np.ndarray) -> "VANeighborhoods":
        """Member classes from an assignment of training faces (true or routed V/A)."""
        counts = np.zeros((self.k_, self.n_classes), dtype=np.int64)
        np.add.at(counts, (np.asarray(region, int), np.asarray(labels, int)), 1)
        return self.set_members_from_counts(counts)

    def predict(self, va: np.ndarray) -> np.ndarray:
        """(n,) neighborhood of each (valence, arousal) point."""
        _check_fitted(self)
        va = np.asarray(va, dtype=np.float64)
        if self.method == "gmm":
            return gmm_log_prob(va, self.gmm_).argmax(axis=1)
        return np.argmin(((va[:, None, :] - self.centers_[None]) ** 2).sum(-1), axis=1)  # what KMeans.predict does

    def predict_proba(self, va: np.ndarray, temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
        """(n, k) P(neighborhood | V/A): the mixture posterior, or softmax(-squared distance / T)."""
        _check_fitted(self)
        va = np.asarray(va, dtype=np.float64)
        if self.method == "gmm":
            z = gmm_log_prob(va, self.gmm_)
        else:
            z = -((va[:, None, :] - self.centers_[None]) ** 2).sum(-1) / max(temperature, 1e-6)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    # ---- a plain-array form, so that loading a shared run never unpickles anything
    def save_arrays(self, path) -> None:
        """Everything ``predict``, ``predict_proba`` and ``describe`` need, as a .npz of plain arrays."""
        _check_fitted(self)
        arrays = {
            "params": np.array([repr(self.get_params())]),
            "k_": np.array(self.k_),
            "centers_": self.centers_,
            "counts_": self.counts_,
            "scores_k": np.array(list(self.scores_), dtype=np.int64),
            "scores_v": np.array(list(self.scores_.values()), dtype=np.float64),
        }
        if self.method == "gmm":
            arrays.update({f"gmm_{name}": self.gmm_[name] for name in GMM_ARRAYS})
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load_arrays(cls, path) -> "VANeighborhoods":
        """The inverse of :meth:`save_arrays`; reads with ``allow_pickle=False``."""
        import ast

        with np.load(path, allow_pickle=False) as z:
            params = ast.literal_eval(str(z["params"][0]))  # a dict literal of str/int/float only
            nbh = cls(**params)
            nbh.k_ = int(z["k_"])
            nbh.centers_ = np.asarray(z["centers_"], dtype=np.float64)
            nbh.scores_ = dict(zip(z["scores_k"].tolist(), z["scores_v"].tolist()))
            if nbh.method == "gmm":
                nbh.gmm_ = {name: np.asarray(z[f"gmm_{name}"], np.float64) for name in GMM_ARRAYS}
            nbh.estimator_ = None  # the scikit-learn object is in model.joblib, for users' own analysis
            nbh.set_members_from_counts(np.asarray(z["counts_"], dtype=np.int64))
        return nbh

    def set_members_from_counts(self, counts: np.ndarray) -> "VANeighborhoods":
        """Which classes belong to each neighborhood, from per-neighborhood class counts (k, 8)."""
        self.counts_ = counts
        self.members_ = membership(counts, self.min_share, self.min_count)
        return self

    def describe(self, class_names) -> dict:
        """The fitted neighborhoods as a JSON-able dict: method, k and its scores, and per neighborhood its center, classes and counts."""
        _check_fitted(self)
        return {
            "method": self.method,
            "k": int(self.k_),
            "k_scores": {str(k): v for k, v in self.scores_.items()},
            "min_share": self.min_share,
            "min_count": self.min_count,
            "neighborhoods": [
                {
                    "id": r,
                    "center": {"valence": float(self.centers_[r, 0]), "arousal": float(self.centers_[r, 1])},
                    "classes": [class_names[c] for c in self.members_[r]],
                    "counts": {
                        class_names[c]: int(self.counts_[r, c]) for c in range(self.n_classes) if self.counts_[r, c]
                    },
                }
                for r in range(self.k_)
            ],
        }


def plot_va_map(va: np.ndarray, labels: np.ndarray, nbh: VANeighborhoods, class_names, path) -> None:
    """Training V/A scatter coloured by neighborhood, with class centroids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    region = nbh.predict(va)
    rng = np.random.default_rng(0)
    show = rng.choice(len(va), size=min(len(va), 6000), replace=False)
    fig, ax = plt.subplots(figsize=(6, 6))
    jit = rng.normal(0, 0.015, (len(show), 2))
    ax.scatter(va[show, 0] + jit[:, 0], va[show, 1] + jit[:, 1], c=region[show], cmap="tab10", s=4, alpha=0.4)
    for r, c in enumerate(nbh.centers_):
        ax.scatter(*c, marker="X", s=150, c="black")
        ax.annotate(
            f"N{r}: " + ",".join(class_names[i] for i in nbh.members_[r]),
            c,
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    for ci, name in enumerate(class_names):
        sel = labels == ci
        if sel.any():
            m = va[sel].mean(axis=0)
            ax.scatter(*m, marker="o", s=40, facecolors="none", edgecolors="red")
            ax.annotate(name, m, fontsize=7, color="red", xytext=(-10, -10), textcoords="offset points")
    ax.set(
        xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel="valence", ylabel="arousal", title=f"{nbh.method}, k={nbh.k_}"
    )
    ax.axhline(0, lw=0.5, c="gray")
    ax.axvline(0, lw=0.5, c="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
