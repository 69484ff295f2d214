"""Paths a user names: checked before anything is written there.

Every file the tool writes at a path the user chose (``export --out``, …) goes through
:func:`write_user_file`: the target must be a regular file or not exist yet, and its folder
must already exist. The data is written beside it under a temporary name and renamed over
it (:func:`ensemble.files.atomic_path`, the one atomic write), so that a half-written file never sits at the target, and a device (``/dev/null``),
a FIFO or a folder is never replaced. Folders the tool creates for its own use
(``data.cache_dir``) go through :func:`make_dir`, which turns an OS error into one line.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .files import atomic_path


def check_target(path: Path, what: str = "output") -> Path:
    """``path`` if a regular file may be written there; a one-line UserError otherwise."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows a link: what would be replaced is what it points to
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UserError(f"cannot use {path} as the {what}: {exc.strerror or exc}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise UserError(f"refusing to write the {what} to {path}: it exists and is {kind}")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"cannot write the {what} to {path}: the folder {parent} does not exist")
    return path


def write_user_file(path: Path, write: Callable[[Path], None], what: str = "output") -> Path:
    """Check ``path``, call ``write(tmp)`` for a temporary file beside it, then rename it into
    place (:func:`ensemble.files.atomic_path`, the one atomic write)."""
    path = check_target(Path(path), what)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
            check_target(path, what)  # nothing was put in its place meanwhile
    except OSError as exc:
        raise UserError(f"cannot write the {what} to {path}: {exc.strerror or exc}") from None
    return path


def not_regular(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file ("no such file", "a FIFO", …), or None for a regular file.
    Only stat()s: a FIFO or a device is never opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else "no such file"
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO, not a regular file"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device, not a regular file"
    return "not a regular file"


def shown(path) -> str:
    """A path for one line of text output: newlines and other control characters escaped."""
    text = str(path)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def make_dir(path: Path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) or say in one line why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{what} {path} is not a folder (a file of that name is in the way)") from None
    except OSError as exc:
        raise UserError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    return path
