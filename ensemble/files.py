"""Writing files so that a reader never sees half of one: the one atomic write, the one folder swap.

A leaf module (standard library only): every layer may use it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the caller (or a library) to write; on success it is
    fsynced and renamed onto ``path``. On an exception (Ctrl-C included) the temporary file is
    removed and ``path`` is untouched. The one atomic write: :func:`atomic_write` opens it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on success flush, fsync and rename it onto ``path``
    (:func:`atomic_path`). ``mode``: "wb" or "w" (text, newline="" so csv writes what it means)."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
        yield f


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, atomically; numpy and torch scalars and arrays become numbers and lists."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def swap_into_place(new: Path, final: Path) -> Path:
    """Replace the folder ``final`` by the finished folder ``new``: the old one is moved aside,
    the new one renamed in, the old one deleted. ``final`` is never half-written."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
