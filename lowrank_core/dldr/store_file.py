"""File I/O of the snapshot store: opening, locking, emptying and releasing its file."""

from __future__ import annotations

import contextlib
import os

from ..errors import SnapshotStoreError

try:  # advisory file locks (POSIX); without them two stores on one path are not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _release(fd: int | None, path: str | None) -> None:
    """Finalizer of a store: close its file (which drops the lock) and delete a temporary file."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _open_locked(path: str, fd: int | None = None) -> int:
    """Open (or take) ``fd`` for ``path``, lock it exclusively and empty it; SnapshotStoreError if the
    path cannot be a store file or another store holds it."""
    if fd is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise SnapshotStoreError(
                f"`path` {path!r} is a directory; give the name of a file to keep the snapshots in"
            ) from None
        except OSError as exc:
            raise SnapshotStoreError(
                f"cannot open the snapshot file {path!r}: {exc.strerror or exc}"
            ) from exc
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SnapshotStoreError(
                    f"the snapshot file {path!r} is in use by another SnapshotStore (it is locked); "
                    "give each store its own file"
                ) from None
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
