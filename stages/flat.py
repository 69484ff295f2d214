"""The flat 8-class classifier: the baseline the hierarchy is measured against."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ensemble.classes import CLASSES, VOTE_COLUMNS
from ensemble.config import records_config
from ensemble.engine import StageData
from ensemble.errors import UserError
from ensemble.tasks import CLASSIFY

from .neural import train_network


def soft_targets(manifest) -> np.ndarray:
    """(n, 8) target distributions: the votes where the data has them, else one-hot."""
    votes = manifest[VOTE_COLUMNS].to_numpy(np.float32)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[manifest["label"].to_numpy()]
    has = np.isfinite(votes).all(axis=1)
    return np.where(has[:, None], votes, onehot)


def teacher_run(name: str) -> Path:
    """``train.teacher``: a run folder, or ``bundled`` for the bundled default model."""
    from ensemble.paths import default_run

    run = default_run() if name == "bundled" else Path(name)
    if run is None:
        raise UserError("train.teacher = 'bundled', but this install has no bundled model: name a run folder")
    if not (run / "flat" / "meta.json").is_file():
        raise UserError(
            f"train.teacher: {run} has no trained flat model ({run}/flat/meta.json); run ensemble fit-flat there first"
        )
    return run


def teacher_probabilities(exp, cfg, tr: np.ndarray, vi: np.ndarray, log=print) -> tuple[np.ndarray, dict]:
    """Distillation (``train.teacher``): the teacher run's flat model's probabilities on the
    training faces ``tr`` (n, 8), each face as it is stored, at the teacher's own input size,
    and what identifies the teacher. The teacher must have trained and selected on exactly this
    run's split, so that no selection face reaches the student through it."""
    from ensemble.artifacts import flat_identity
    from ensemble.checkpoints import faces_digest
    from ensemble.engine import predict_outputs
    from ensemble.prepare import load_images

    from .neural import load_network

    run = teacher_run(cfg.train.teacher)
    net, meta = load_network(run / "flat", run)
    if meta.get("classes") != list(CLASSES):
        raise UserError(f"train.teacher: {run}/flat does not predict the 8 canonical classes")
    theirs = (meta.get("fingerprint") or {}).get("which faces")
    if theirs != faces_digest(tr, vi):
        raise UserError(
            f"train.teacher: {run}'s flat model was trained and selected on another split of the faces "
            "(its training faces may include this run's selection faces, which would leak into the selection): "
            "distil from a run of the same data, data.val_fraction and train.seed"
        )
    size = int(meta["input_size"])
    images = exp.images
    if size != exp.cfg.data.image_size:
        d = exp.cfg.data
        images = load_images(exp.manifest, size, d.cache_dir, d.cache, d.num_workers, progress=False)
    logits, _ = predict_outputs(net, images, tr, tuple(meta["mean"]), tuple(meta["std"]), exp.rt)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = exp.manifest["label"].to_numpy()[tr]
    log(
        f"flat: distilling {run}'s flat model ({meta.get('backbone')}, {size} px; train.teacher_weight "
        f"{cfg.train.teacher_weight:g}): its accuracy on the training faces {(p.argmax(1) == y).mean():.1%}"
    )
    return p.astype(np.float32), {"teacher": flat_identity(meta), "teacher_weight": cfg.train.teacher_weight}


@records_config
def fit_flat(exp, resume: bool = False, log=print) -> dict:
    """Train the flat classifier; select on the selection split's balanced accuracy; write ``RUN/flat``.
    With ``train.teacher``, the targets mix the teacher's probabilities into the votes (or labels)."""
    cfg = exp.cfg.for_stage("flat")
    y = exp.manifest["label"].to_numpy()
    tr, vi = exp.idx("train"), exp.idx("val")
    soft, extra = soft_targets(exp.manifest)[tr], None
    if cfg.train.teacher:
        if not cfg.train.soft_targets:  # one-hot labels stand in for the votes
            soft = np.eye(len(CLASSES), dtype=np.float32)[y[tr]]
        teacher, extra = teacher_probabilities(exp, cfg, tr, vi, log if exp.rt.is_main else (lambda *_: None))
        w = cfg.train.teacher_weight
        soft = ((1 - w) * soft + w * teacher).astype(np.float32)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, soft_targets=True))  # the mix is the target
    data = StageData(exp.images, tr, y[tr], vi, y[vi], list(CLASSES), train_soft=soft)
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
        fingerprint_extra=extra,
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
        fit_flat(exp, resume, log)  # (calibrated by the command: fit-stage1's, or fit-experts' own calibration)


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
