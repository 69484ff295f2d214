"""The flat 8-class classifier: the baseline the hierarchy is measured against."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ensemble.classes import CLASSES, VOTE_COLUMNS
from ensemble.config import records_config
from ensemble.engine import StageData
from ensemble.tasks import CLASSIFY

from .neural import train_network


def soft_targets(manifest) -> np.ndarray:
    """(n, 8) target distributions: the votes where the data has them, else one-hot."""
    votes = manifest[VOTE_COLUMNS].to_numpy(np.float32)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[manifest["label"].to_numpy()]
    has = np.isfinite(votes).all(axis=1)
    return np.where(has[:, None], votes, onehot)


@records_config
def fit_flat(exp, resume: bool = False, log=print) -> dict:
    """Train the flat classifier; select on the selection split's balanced accuracy; write ``RUN/flat``."""
    cfg = exp.cfg.for_stage("flat")
    y = exp.manifest["label"].to_numpy()
    tr, vi = exp.idx("train"), exp.idx("val")
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
        {s: (exp.idx(s), y[exp.idx(s)]) for s in exp.eval_splits()},
        log=log,
    )


def ensure_flat_trunk(exp, stage_cfg, stage: str, resume: bool = False, log=print) -> None:
    """The mission's order (fit-stage1, fit-experts, predict) on a fresh run: a stage that builds
    on the flat model's trunk (``model.trunk_from = "flat"``) trains the flat model first when
    the run has none, and says so."""
    if stage_cfg.model.trunk_from == "flat" and not (exp.run / "flat" / "meta.json").is_file():
        log(
            f'{stage}: builds on the flat model\'s trunk (model.trunk_from = "flat") and {exp.run / "flat"} '
            "has none: training the flat model first"
        )
        fit_flat(exp, resume, log)


def stages_on_flat_trunk(run: Path) -> list[str]:
    """The stages of ``run`` trained on its (finished) flat model's trunk: stage 1 and experts
    that borrow it. Retraining the flat model would leave each of them unusable."""
    import json

    run = Path(run)

    def meta(folder: Path) -> dict:
        try:
            m = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return {}
        return m if isinstance(m, dict) else {}

    sha = meta(run / "flat").get("trunk_sha256")
    if not sha:
        return []
    experts = sorted(run.joinpath("experts").glob("*/meta.json"), key=lambda p: p.parent.name)
    found = []
    for folder in [run / "stage1", *(p.parent for p in experts)]:
        m = meta(folder)
        if m.get("trunk_from") == "flat" and m.get("trunk_sha256") == sha:
            found.append(str(folder.relative_to(run)))
    return found
