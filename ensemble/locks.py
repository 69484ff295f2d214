"""One writer per run folder: a command that writes ``RUN`` holds ``RUN/.lock`` until it exits.

The lock is an OS file lock (the ``filelock`` package): it is released when the process ends,
however it ends, so a crashed run never leaves a stale lock behind. Who holds it is written
beside it (``RUN/.lock.owner``), so a refused command can say which process to wait for.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError

_HELD: dict[Path, FileLock] = {}  # held until the process exits (a dropped FileLock would release)


def lock_run(run: Path) -> FileLock:
    """Take ``run``'s lock for this process (until it exits or the lock is released), or refuse
    in one line naming the process that holds it."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run / ".lock", timeout=0, is_singleton=True)  # this process may reopen its run
    owner = run / ".lock.owner"
    try:
        lock.acquire()
    except Timeout:
        try:
            who = owner.read_text().strip()
        except OSError:
            who = "another process"
        raise UserError(f"{run} is being written by {who}; wait for it to finish, or write to another --out") from None
    argv = (
        " ".join(["ensemble", *sys.argv[1:]])
        if sys.argv[0].endswith(("ensemble", "__main__.py"))
        else " ".join(sys.argv)
    )
    owner.write_text(f"pid {os.getpid()} on {socket.gethostname()} ({argv})\n")
    _HELD[run.resolve()] = lock
    return lock
