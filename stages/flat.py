"""The flat 8-class classifier: the baseline the hierarchy is measured against."""

from __future__ import annotations

import numpy as np

from ensemble.classes import CLASSES, VOTE_COLUMNS
from ensemble.engine import StageData
from ensemble.tasks import CLASSIFY

from .neural import train_network


def soft_targets(manifest) -> np.ndarray:
    """(n, 8) target distributions: the votes where the data has them, else one-hot."""
    votes = manifest[VOTE_COLUMNS].to_numpy(np.float32)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[manifest["label"].to_numpy()]
    has = np.isfinite(votes).all(axis=1)
    return np.where(has[:, None], votes, onehot)


def fit_flat(exp, resume: bool = False, log=print) -> dict:
    """Train the flat classifier; select on validation balanced accuracy; write ``RUN/flat``."""
    cfg = exp.cfg.for_stage("flat")
    y = exp.manifest["label"].to_numpy()
    tr, vi, te = exp.idx("train"), exp.idx("val"), exp.idx("test")
    data = StageData(exp.images, tr, y[tr], vi, y[vi], list(CLASSES), train_soft=soft_targets(exp.manifest)[tr])
    return train_network(
        "flat",
        CLASSIFY,
        cfg,
        data,
        exp.run / "flat",
        exp.run,
        exp.rt,
        resume,
        {"val": (vi, y[vi]), "test": (te, y[te])},
        log=log,
    )
