"""Stage 1: a backbone regressing (valence, arousal) in [-1, 1]^2 (the report's RMSE regressor)."""

from __future__ import annotations

import numpy as np

from ensemble.engine import StageData
from ensemble.tasks import VA_REGRESSION

from .neural import train_network


def va_targets(manifest) -> np.ndarray:
    """(n, 2) float32 valence/arousal of every manifest row."""
    return manifest[["valence", "arousal"]].to_numpy(np.float32)


def fit_stage1(exp, resume: bool = False, log=print) -> dict:
    """Train stage 1 on the training split; select on validation CCC; write ``RUN/stage1``."""
    cfg = exp.cfg.for_stage("stage1")
    y = va_targets(exp.manifest)
    tr, vi, te = exp.idx("train"), exp.idx("val"), exp.idx("test")
    data = StageData(exp.images, tr, y[tr], vi, y[vi])
    return train_network(
        "stage1",
        VA_REGRESSION,
        cfg,
        data,
        exp.run / "stage1",
        exp.run,
        exp.rt,
        resume,
        {"val": (vi, y[vi]), "test": (te, y[te])},
        log=log,
    )
