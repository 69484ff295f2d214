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


def check_target(path: Path, what: str = "output", protect=()) -> Path:
    """``path`` if a regular file may be written there; a one-line UserError otherwise.

    ``protect``: the command's inputs (files, or folders such as a run), which an output must
    never replace: a target that is one of those files, or lies inside one of those folders, is
    refused (``predict a.jpg --csv a.jpg`` would otherwise turn the photo into a table)."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows a link: what would be replaced is what it points to
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UserError(f"cannot use {path} as the {what}: {exc.strerror or exc}") from None
    if protect:
        clash = (protect if isinstance(protect, Protected) else Protected(protect)).clash(path, st)
        if clash is not None:
            raise UserError(f"refusing to write the {what} to {shown(path)}: it would replace {clash}")
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


def write_user_file(path: Path, write: Callable[[Path], None], what: str = "output", protect=()) -> Path:
    """Check ``path`` (``protect``: see :func:`check_target`), call ``write(tmp)`` for a temporary
    file beside it, then rename it into place (:func:`ensemble.files.atomic_path`, the one atomic write)."""
    path = check_target(Path(path), what, protect)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
            check_target(path, what, protect)  # nothing was put in its place meanwhile
    except OSError as exc:
        raise UserError(f"cannot write the {what} to {path}: {exc.strerror or exc}") from None
    return path


class Protected:
    """The command's inputs, which no output may replace: files (known by device and inode, so a
    link or another spelling of the path is the same file) and folders (a run: nothing inside).
    Built once; :meth:`clash` is one ``stat`` per target."""

    def __init__(self, paths=()):
        self.files: dict[tuple[int, int], Path] = {}
        self.dirs: list[tuple[Path, str]] = []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:  # not there (yet): nothing to replace
                continue
            if stat.S_ISDIR(st.st_mode):
                self.dirs.append((Path(p), os.path.realpath(p)))
            else:
                self.files[(st.st_dev, st.st_ino)] = Path(p)

    def clash(self, path: Path, st: os.stat_result | None = None) -> str | None:
        """What writing ``path`` would replace ("the input a.jpg", "a file in runs/x, one of the
        inputs"), or None."""
        if st is None:
            try:
                st = os.stat(path)
            except OSError:
                st = None
        if st is not None and (st.st_dev, st.st_ino) in self.files:
            return f"the input {shown(self.files[(st.st_dev, st.st_ino)])}"
        if self.dirs:
            target = Path(os.path.realpath(path))
            for p, real in self.dirs:
                if target.is_relative_to(real):
                    return f"a file in {shown(p)}, one of the inputs"
        return None


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


#: where the bundled runs are installed (package data), and the default one's folder name
PACKAGED = Path(__file__).resolve().parent / "models"
DEFAULT_NAME = "ferplus"


def bundled_models(packaged: Path | None = None) -> list[Path]:
    """Bundled runs installed with the package (folders of ``packaged``), default first."""
    packaged = PACKAGED if packaged is None else packaged
    if not packaged.is_dir():
        return []
    found = sorted(p for p in packaged.iterdir() if (p / "flat" / "meta.json").is_file())
    return sorted(found, key=lambda p: p.name != DEFAULT_NAME)


def default_run(packaged: Path | None = None) -> Path | None:
    """The bundled default model's folder, or None where none is installed."""
    models = bundled_models(packaged)
    return models[0] if models else None
