"""Files and directories crowd-sync creates: readable by its own user only, whatever the umask.

The outbox holds full ID numbers and the live login token, and the reports hold the
month's figures: a hand-run command under the usual umask 022 must not leave them
world-readable. A umask can only take permissions away, so creating with 0600 and
0700 gives exactly those. Existing files and directories keep the permissions an
operator gave them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents, each 0700; existing ones are left as they are."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        # Another process may create it at the same moment: that one is as good as ours.
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=DIR_MODE)


def open_private(path: Path, flags: int = os.O_RDWR) -> int:
    """``os.open`` creating the file 0600 if it does not exist (and its directory 0700)."""
    private_dir(path.parent)
    return os.open(path, flags | os.O_CREAT, FILE_MODE)


def touch_private(path: Path) -> None:
    """Create an empty file 0600 unless it exists (SQLite then keeps that mode, and gives it
    to the -wal and -shm files it creates beside it).

    An existing file is never opened: closing any descriptor of a SQLite database drops every
    POSIX lock this process holds on it, SQLite's own included (see SQLite's "How To Corrupt").
    """
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``, a new file being 0600."""
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
