"""What a ``meta.json`` may hold: every field the tool reads is checked before it is used.

A run folder may come from anywhere (a colleague, a download). ``read_meta`` checks the
description against this schema before any listed file is hashed or read: a field of the
wrong kind or out of range, or a listed file that is not a plain name inside its folder
(``"../../etc/hostname"``), is refused in one line naming the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from .errors import UserError

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_in(lo, hi):
    def check(v):
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be a whole number in {lo}..{hi}"

    return check


def _text(v):
    return None if isinstance(v, str) else "must be text"


def _triple(positive: bool):
    def check(v):
        if not (isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)):
            return "must be a list of 3 finite numbers (one per colour channel)"
        if positive and not all(x > 0 for x in v):
            return "must be > 0 for every channel (the input is divided by it)"
        return None

    return check


def _classes(v):
    if not (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v) and len(set(v)) == len(v)):
        return "must be a non-empty list of distinct class names"
    return None


def plain_file_name(name) -> bool:
    """A file name with no folder part: not '', '.', '..', and no '/', '\\' or NUL in it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and Path(name).name == name
    )


def _files(v):
    if not isinstance(v, dict):
        return "must be a table of file name -> sha256"
    for name, digest in v.items():
        if not plain_file_name(name):
            return f"lists {name!r}, which is not a plain file name inside the artifact's folder"
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            return f"gives {name!r} the digest {digest!r}, not a sha256"
    return None


def _crop(v):
    from .crop import BOX_SOURCES

    if not (
        isinstance(v, dict)
        and v.get("box_source") in BOX_SOURCES
        and _number(v.get("margin"))
        and 0 <= v["margin"] <= 2
    ):
        return f"must be {{box_source: {' | '.join(BOX_SOURCES)}, margin: a number in 0..2}}"
    return None


def _dropout(v):
    return None if _number(v) and 0 <= v < 1 else "must be a number in [0, 1)"


def _temperatures(v):
    ok = isinstance(v, dict) and all(isinstance(k, str) and _number(t) and t > 0 for k, t in v.items())
    return None if ok else "must map model names to temperatures > 0"


#: field -> check (None = fine, else what is wrong); absent fields are not checked here
RULES = {
    "files": _files,
    "input_size": _int_in(8, 4096),
    "mean": _triple(False),
    "std": _triple(True),
    "classes": _classes,
    "backbone": _text,
    "head": _text,
    "trainable": _text,
    "stage": _text,
    "task": _text,
    "trunk_from": _text,
    "trunk_sha256": _text,
    "hidden": _int_in(1, 1 << 20),
    "dropout": _dropout,
    "n_blocks": _int_in(0, 1024),
    "k": _int_in(1, 64),
    "region": _int_in(0, 63),
    "crop": _crop,
    "temperatures": _temperatures,
    "stored_precision": _text,
}


def check_meta(meta, meta_file: Path) -> dict:
    """``meta`` if it is a well-formed artifact description, else a one-line UserError."""
    if not isinstance(meta, dict):
        raise UserError(f"{meta_file} is not an artifact description; the artifact is damaged")
    for key, rule in RULES.items():
        if key in meta and (problem := rule(meta[key])):
            raise UserError(f"{meta_file}: field {key!r} {problem}; the artifact is damaged or not from this tool")
    return meta
