"""Files written so that a crash never leaves a half-written one: checkpoints, caches, manifests."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_write(path: str | os.PathLike, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary file beside it, renamed over ``path`` once complete.

    Yields the temporary file, opened for binary writing. On success it is flushed, fsync'ed, given
    ``mode`` (default: what a new file gets under the umask, so a shared folder's readers can read
    it) and renamed: a reader sees the old file or the whole new one. On an exception it is removed
    and the exception propagates. The parent directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
