"""Stage 1: a backbone regressing (valence, arousal) in [-1, 1]^2 (the report's RMSE regressor)."""

from __future__ import annotations

import numpy as np

from ensemble.config import records_config
from ensemble.engine import StageData
from ensemble.tasks import VA_REGRESSION

from .flat import ensure_flat_trunk
from .neural import train_network


def va_targets(manifest) -> np.ndarray:
    """(n, 2) float32 valence/arousal of every manifest row."""
    return manifest[["valence", "arousal"]].to_numpy(np.float32)


@records_config
def fit_stage1(exp, resume: bool = False, log=print) -> dict:
    """Train stage 1 on the training split; select on validation CCC; write ``RUN/stage1``."""
    cfg = exp.cfg.for_stage("stage1")
    ensure_flat_trunk(exp, cfg, "stage1", resume, log)
    y = va_targets(exp.manifest)
    tr, vi = exp.idx("train"), exp.idx("val")
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
        {s: (exp.idx(s), y[exp.idx(s)]) for s in exp.eval_splits()},
        log=log,
    )
