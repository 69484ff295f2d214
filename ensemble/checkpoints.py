"""Checkpoints and resume-safety: a checkpoint is written atomically after every epoch, and
resuming it is refused when the settings or the faces differ from those it was started with
(the config fingerprint; only the settings in ``RESUMABLE`` may change)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write

#: settings a run may change between an interruption and --resume; any other change is refused
RESUMABLE = {
    "train.epochs",
    "train.max_minutes",
    "train.patience",
    "train.device",
    "train.threads",
    "train.compile",
    "data.num_workers",
    "data.cache",
    "data.cache_dir",
    "data.strict",
}


def resume_fingerprint(cfg, train_idx: np.ndarray, val_idx: np.ndarray, extra: dict | None = None) -> dict:
    """What a checkpoint (or a finished stage) must agree on with the command that resumes it:
    the settings, which faces train and validate it, and ``extra`` (e.g. the trunk it builds
    on, the neighborhoods an expert belongs to). Flat and JSON-able."""
    flat = {
        f"{sec}.{k}": v
        for sec in ("data", "model", "train", "balance")
        for k, v in dataclasses.asdict(getattr(cfg, sec)).items()
    }
    keep = {
        k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
        for k, v in flat.items()
        if k not in RESUMABLE
    }
    return {
        **keep,
        "training faces": int(len(train_idx)),
        "validation faces": int(len(val_idx)),
        "which faces": faces_digest(train_idx, val_idx),
        **(extra or {}),
    }


def faces_digest(train_idx: np.ndarray, val_idx: np.ndarray) -> str:
    """Which manifest rows train and which select a stage: equal digests, the same split."""
    faces = hashlib.sha256(np.asarray(train_idx, np.int64).tobytes() + b"|" + np.asarray(val_idx, np.int64).tobytes())
    return faces.hexdigest()[:16]


def save_checkpoint(state: dict, path: Path) -> None:
    """``state`` (tensors, numbers, lists) to ``path``, atomically: a crash leaves the previous
    checkpoint, and a Ctrl-C or SIGTERM arriving meanwhile takes effect once it is written."""
    from .runtime import signals_deferred

    with signals_deferred(), atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path, fingerprint: dict, desc: str) -> dict:
    """The checkpoint at ``path``, after checking it was started with ``fingerprint``; a
    difference is refused in one line naming the first settings that changed. A truncated,
    pickled or foreign file is refused in one line too; nothing in it runs."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for this user
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or not isinstance(ck.get("fingerprint", {}), dict):
            raise TypeError("not a checkpoint of this tool")
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(
            f"{desc}: cannot resume from {path}: not a readable checkpoint ({first}); "
            f"delete it, or run without --resume to start fresh"
        ) from None
    old = ck.get("fingerprint", {})
    changed = [k for k in sorted(set(fingerprint) | set(old)) if fingerprint.get(k) != old.get(k)]
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {fingerprint.get(k)!r})" for k in changed[:3])
        raise UserError(
            f"{desc}: cannot resume {path}: the run was started with other settings: {shown}"
            + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            + "; resume with the same config, or start afresh without --resume"
        )
    return ck


def damaged_checkpoint(path: Path, desc: str, exc: Exception) -> UserError:
    """The one-line error for a checkpoint that loads but lacks, or mis-shapes, what resuming needs."""
    return UserError(
        f"{desc}: cannot resume from {path}: the checkpoint is damaged or incomplete "
        f"({type(exc).__name__}: {str(exc)[:100]}); delete it, or run without --resume to start fresh"
    )


def write_history(history: list[dict], path: Path) -> None:
    """One CSV row per epoch (columns: every key any row has, in first-seen order), atomically."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
