"""Atomic file writes: ``atomic_write(path, write)`` writes a temporary file in the target's folder, fsyncs it and
``os.replace``s it over ``path``, so a process killed at any moment leaves the previous file or the new one, never a
torn one and no temporary file."""

from __future__ import annotations

import contextlib
import os
import shutil
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


@contextlib.contextmanager
def _replacing(path: Path, *, create: bool = True):
    """Yield a temporary path beside ``path`` that the body fills, then move it over ``path``; on any error the
    temporary file is removed and ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    if not create:
        os.unlink(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *,
                 validate: Callable[[str], None] | None = None) -> None:
    """Write ``path`` (its folder created if needed) through ``write(tmp_path)``, which writes the complete new
    content, then move it over ``path`` atomically; ``validate(tmp_path)`` raising keeps the previous ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path) as tmp:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files (and some writers recreate them): usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)`` (UTF-8), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def keep_previous(path: str | os.PathLike, previous: str | os.PathLike) -> bool:
    """Make ``previous`` a copy of the current ``path`` (a hard link where the filesystem allows), atomically;
    ``False`` when ``path`` does not exist yet."""
    path, previous = Path(path), Path(previous)
    if not path.is_file():
        return False
    with _replacing(previous, create=False) as tmp:
        try:
            os.link(path, tmp)
        except OSError:  # no hard links here (some network and FUSE filesystems): copy instead
            shutil.copyfile(path, tmp)
    return True
