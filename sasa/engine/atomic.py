"""Atomic file writes: every file of a run directory is replaced whole or not at all.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary file in the target's folder, flushes it to disk
and only then ``os.replace``s it over ``path``: a process that is killed, runs out of disk or raises at any
moment leaves either the previous file or the new one, never a torn or half-written one, and no temporary file.
A ``validate(tmp)`` callback, when given, reads the new content back before it replaces the old one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not every filesystem lets a directory be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *,
                 validate: Callable[[str], None] | None = None) -> None:
    """Write ``path`` through ``write(tmp_path)``, then move the temporary file over ``path`` atomically.

    Args:
        path: the target file; its folder is created if needed.
        write: writes the complete new content to the path it is given.
        validate: optional check of the written temporary file; raising keeps the previous ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files (and some writers recreate them): usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)`` (UTF-8), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> bool:
    """Make ``previous`` a copy of the current ``path`` (a hard link where the filesystem allows), atomically.

    Returns ``False`` when ``path`` does not exist yet.
    """
    path, previous = Path(path), Path(previous)
    if not path.is_file():
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{previous.name}.", suffix=".tmp", dir=previous.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(path, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems): copy instead
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(previous.parent)
    return True
